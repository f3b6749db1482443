"""Multi-card and multi-node inference on torch.distributed: DP attention, EP MoE, vocab-parallel lm head.

The layout V4 deployments use (one process per card, launched by `torchrun`):

- Attention (and everything outside the routed experts: embedding, mHC, norms, shared expert, gate) is
  data-parallel: every rank holds these weights whole and runs its own sequences with its own KV cache.
- Routed experts are expert-parallel: rank r of W holds and loads only experts [r*E/W, (r+1)*E/W). Each MoE layer
  dispatches every token row to the ranks holding its top-k experts (all-to-all), the expert ranks compute, and
  the partial outputs come back (all-to-all) and are summed per token in fp32, in rank order (deterministic).
- The lm head is vocab-parallel (optional): rank r holds rows [r*Vs, (r+1)*Vs) of `head.weight`; the final hidden
  states of all ranks are all-gathered, each rank computes its vocab slice for every token, and an all-to-all
  returns each rank the full-vocab logits of its own tokens.
- o-projection tensor parallelism is not implemented (attention is pure DP).

Collectives are torch.distributed ones, so the same code runs on HCCL (Ascend, backend "hccl"), NCCL (GPU) and
gloo (CPU, the CI test). On an NPU with torch_npu's MC2 ops (`npu_moe_distribute_dispatch/combine`) the MoE can
use the fused dispatch/combine instead (`fused=True`; never run here: no NPU).

Lockstep rule: every MoE layer and the vocab-parallel head are collectives, so every rank must make the same
sequence of model calls (prefill chunk / decode step / MTP block), whatever its own batch. A rank with nothing to
do calls `idle_forward(model)`: it joins each collective with 0 rows (the EP and head paths accept empty batches).
`generate_lockstep` is a complete greedy loop that follows the rule.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .ep_dispatch import mc2_dispatch_combine, static_dispatch_combine, static_vocab_head

__all__ = ["ParallelContext", "init_parallel", "expert_range_for", "ExpertParallel", "VocabParallelHead",
           "install_parallel", "load_parallel_model", "idle_forward", "generate_lockstep", "resident_weight_bytes",
           "static_buffer_bytes"]

_DEVICE_OF = {"hccl": "npu", "nccl": "cuda", "gloo": "cpu"}


# ---- process group ------------------------------------------------------------------------------------------

@dataclass
class ParallelContext:
    """Where this process sits: rank, world size, its device and the process group used for EP / TP."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # process-group backend ("hccl", "nccl", "gloo"); None = no process group
    group: Any = None           # None = the default (world) group

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1

    def max_int(self, value: int) -> int:
        """The largest `value` over all ranks (a collective; every rank must call it)."""
        if not self.distributed:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (a collective)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def close(self) -> None:
        """Destroy the process group (call once at the end of the program)."""
        if self.backend is not None and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _npu_usable() -> bool:
    from .ops.npu import npu_available  # imports torch_npu only when it is installed

    return npu_available()[0]


def init_parallel(backend: str | None = None, device: str | None = None,
                  timeout_s: float = 600.0) -> ParallelContext:
    """Join the job `torchrun` (or any launcher setting the same variables) started.

    Reads RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR / MASTER_PORT through the `env://` rendezvous).
    `backend`: process-group backend; default per device: "hccl" when torch_npu sees an NPU, "nccl" with CUDA,
    else "gloo". `device`: the torch device type to run on ("npu", "cuda", "cpu"); default: the backend's. The
    device index is LOCAL_RANK (one process per card) and is made current. Without WORLD_SIZE in the
    environment (a plain `python` run) this returns a one-rank context and creates no process group.
    """
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if backend is None:
        if device is not None:
            backend = {"npu": "hccl", "cuda": "nccl"}.get(torch.device(device).type, "gloo")
        elif _npu_usable():
            backend = "hccl"
        elif torch.cuda.is_available():
            backend = "nccl"
        else:
            backend = "gloo"
    if backend not in _DEVICE_OF:
        raise ValueError(f"unknown process-group backend {backend!r}; allowed: hccl (Ascend NPU), nccl (GPU), "
                         "gloo (CPU)")
    dev_type = torch.device(device).type if device is not None else _DEVICE_OF[backend]
    if dev_type == "cpu":
        dev = torch.device("cpu")
    else:
        if dev_type == "npu":
            import torch_npu  # noqa: F401  (registers torch.npu; only reached on an Ascend machine)
        mod = getattr(torch, dev_type)
        if local >= mod.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} has no {dev_type} device: this node shows "
                               f"{mod.device_count()}; start at most that many processes per node "
                               "(torchrun --nproc-per-node)")
        mod.set_device(local)
        dev = torch.device(dev_type, local)
    if "WORLD_SIZE" not in os.environ:
        return ParallelContext(0, 1, 0, dev, None)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return ParallelContext(rank, world, local, dev, backend)


def expert_range_for(rank: int, world_size: int, n_experts: int) -> tuple[int, int]:
    """The routed experts (first, end) rank `rank` of `world_size` holds: an equal, contiguous share."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    if n_experts % world_size:
        ok = [w for w in range(1, n_experts + 1) if n_experts % w == 0]
        raise ValueError(f"world size {world_size} does not divide the number of routed experts {n_experts} "
                         f"(config.json 'n_routed_experts'): expert parallelism gives every rank the same "
                         f"number of experts; use a world size in {ok}")
    per = n_experts // world_size
    return rank * per, (rank + 1) * per


# ---- expert parallelism -------------------------------------------------------------------------------------

def _a2a(out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], group) -> None:
    """all_to_all_single along dim 0 with uneven splits; fp8 travels as bytes (gloo has no fp8)."""
    if inp.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu):
        out, inp = out.view(torch.uint8), inp.view(torch.uint8)
    dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group)


def _fused_ops():
    """torch_npu's MC2 dispatch/combine pair, or None (no torch_npu, no NPU, or an older torch_npu)."""
    if not _npu_usable():
        return None
    import torch_npu

    if hasattr(torch_npu, "npu_moe_distribute_dispatch") and hasattr(torch_npu, "npu_moe_distribute_combine"):
        return torch_npu
    return None


class ExpertParallel:
    """The `MoE.ep` hook: token dispatch to the experts' ranks, expert compute there, combine back.

    `__call__(moe, x [T,D], weights [T,k] fp32, ids [T,k] global expert ids, sync_free, shared)` returns this
    rank's tokens' routed-expert output [T,D], plus `shared` (the shared expert's output) added to the fp32 sum
    before the one cast. T may be 0: the rank still takes part in every collective. Two paths, chosen per call
    from host-known facts only:

    - static (`static=True`, a sync-free call, T <= `max_tokens_per_rank`, `force_exact` off): fixed-shape
      buffers and traceable collectives, no host read, so a compiled decode step contains the all-to-alls
      (`ep_dispatch.static_dispatch_combine`); with `fused=True` torch_npu's MC2 `npu_moe_distribute_dispatch/
      combine` instead (`ep_dispatch.mc2_dispatch_combine`; `npu=` the CPU emulator runs it over gloo).
    - exact (everything else: prefill, a call wider than the capacity): variable splits, host sync.
      1. rows: each token goes once to every rank holding at least one of its experts (ordered by rank, token);
         its k weights and ids travel with it, ids made local and the other ranks' pairs marked -1.
      2. all_to_all of the per-rank row counts (host sync: split sizes must be known), then of the rows, then
         of the weights+ids (packed as int32 [rows, 2k]).
      3. expert rank: `moe.backend.experts` over its experts (the routing weight scales the SwiGLU output
         before the down projection, as in one process); -1 pairs are dropped.
      4. all_to_all of the results back; per token, the partial outputs of its ranks are summed in fp32 in
         rank order (deterministic), the shared output added, then cast to x.dtype. Each rank's partial output
         arrives in x.dtype (`backend.experts` casts), so in bf16 the sum has one rounding per rank more than
         one process's.

    Both paths give the same result (exact in fp32 up to summation order). They must never meet in one
    collective, so every rank must make the same choice for a call: the callers guarantee it (`Lockstep`,
    `generate_lockstep`, `idle_forward(static=...)`). `last_static` records the choice of the latest call; the
    vocab-parallel head follows it.
    """

    def __init__(self, ctx: ParallelContext, fused: bool = False, max_tokens_per_rank: int = 256,
                 static: bool = False, npu=None) -> None:
        self.ctx, self.group = ctx, ctx.group
        self.world, self.rank = ctx.world_size, ctx.rank
        self.npu = None
        if fused:
            self.npu = npu if npu is not None else _fused_ops()
            if npu is None and (self.npu is None or ctx.backend != "hccl"):
                raise RuntimeError("fused MoE dispatch/combine needs torch_npu with npu_moe_distribute_dispatch/"
                                   f"combine and the hccl backend (backend here: {ctx.backend}), or npu= the "
                                   "CPU emulator (dsv4_ascend.ops.emulator)")
            grp = self.group if self.group is not None else dist.group.WORLD
            self.hccl_name = (grp.group_name if npu is not None
                              else grp._get_backend(torch.device("npu")).get_hccl_comm_name(self.rank))
        if max_tokens_per_rank < 1:
            raise ValueError(f"max_tokens_per_rank must be >= 1, found {max_tokens_per_rank}")
        self.max_tokens_per_rank = max_tokens_per_rank
        self.static = static or fused
        self.force_exact = False  # set by a caller whose ranks agreed on the exact path for the next calls
        self.lockstep = None      # a lockstep.Lockstep that must be pairing every call (serving over ranks)
        self.last_static = False
        self.stats = {"calls": 0, "static_calls": 0, "rows_sent_local": 0, "rows_sent_remote": 0,
                      "rows_received": 0}

    def _check(self, moe) -> int:
        r = moe.routed
        if r.count * self.world != moe.n_experts or r.first != self.rank * r.count:
            raise ValueError(f"this MoE holds experts [{r.first}, {r.first + r.count}) of {moe.n_experts}; rank "
                             f"{self.rank} of {self.world} must hold "
                             f"{expert_range_for(self.rank, self.world, moe.n_experts)} (load it with "
                             "expert_range=expert_range_for(rank, world, n_routed_experts))")
        return r.count

    def takes_static(self, rows: int, sync_free: bool) -> bool:
        """Whether a call with `rows` token rows takes the static path (host-known: shapes and flags only)."""
        return self.static and sync_free and not self.force_exact and rows <= self.max_tokens_per_rank

    def __call__(self, moe, x: Tensor, weights: Tensor, ids: Tensor, sync_free: bool = False,
                 shared: Tensor | None = None) -> Tensor:
        per = self._check(moe)
        if self.lockstep is not None and not self.lockstep.inside:
            raise RuntimeError("an expert-parallel MoE call outside the lockstep pairing: a model entry point that "
                               "lockstep.Lockstep.install does not wrap was called; the other ranks would never "
                               "join its collectives (wrap it there)")
        self.last_static = self.takes_static(x.shape[0], sync_free)
        if not torch.compiler.is_compiling():
            self.stats["calls"] += 1
            self.stats["static_calls"] += int(self.last_static)
        if self.last_static and self.npu is not None:
            return mc2_dispatch_combine(self.npu, moe, x, weights, ids, self.world, self.rank, self.hccl_name,
                                        self.max_tokens_per_rank, shared)
        if self.last_static:
            grp = self.group if self.group is not None else dist.group.WORLD
            return static_dispatch_combine(moe, x, weights, ids, self.world, self.max_tokens_per_rank, grp, shared)
        return self._all_to_all(moe, x, weights, ids, per, shared)

    # -- exact path: torch.distributed all_to_all_single with variable splits ---------------------------------
    def _all_to_all(self, moe, x: Tensor, weights: Tensor, ids: Tensor, per: int,
                    shared: Tensor | None = None) -> Tensor:
        t, d = x.shape
        k, w, dev = ids.shape[1], self.world, x.device
        dest = ids // per                                                    # [T,k] rank of each pair
        hit = torch.zeros(t, w, dtype=torch.bool, device=dev)
        hit.scatter_(1, dest, True)                                          # [T,W] token needs rank r
        r_idx, t_idx = hit.t().nonzero(as_tuple=True)                        # send rows, by rank then token
        send_counts = hit.sum(0)
        mine = dest[t_idx] == r_idx.unsqueeze(1)                             # [S,k] pairs of that rank
        send_ids = torch.where(mine, ids[t_idx] - r_idx.unsqueeze(1) * per, -1).to(torch.int32)
        send_w = torch.where(mine, weights[t_idx].float(), 0.0)
        meta = torch.cat([send_w.view(torch.int32), send_ids], 1)            # [S,2k] int32, bit-exact
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        s_list, r_list = send_counts.tolist(), recv_counts.tolist()          # host sync: split sizes
        n_recv = sum(r_list)
        self.stats["rows_sent_local"] += s_list[self.rank]
        self.stats["rows_sent_remote"] += sum(s_list) - s_list[self.rank]
        self.stats["rows_received"] += n_recv
        recv_x = x.new_empty(n_recv, d)
        _a2a(recv_x, x[t_idx], r_list, s_list, self.group)
        recv_meta = meta.new_empty(n_recv, 2 * k)
        _a2a(recv_meta, meta, r_list, s_list, self.group)
        y = self._local(moe, recv_x, recv_meta[:, :k].contiguous().view(torch.float32), recv_meta[:, k:].long())
        back = x.new_empty(t_idx.shape[0], d)
        _a2a(back, y, s_list, r_list, self.group)
        # Combine: contribution j of token t is its j-th rank in rank order; a fixed-shape fp32 sum over j.
        slot = (hit.cumsum(1) - 1)[t_idx, r_idx]
        buf = torch.zeros(t, min(k, w), d, dtype=torch.float32, device=dev)
        buf[t_idx, slot] = back.float()
        out = buf.sum(1)
        return (out if shared is None else out + shared.float()).to(x.dtype)

    @staticmethod
    def _local(moe, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """Received rows through this rank's experts; ids are local, -1 = a pair another rank computes."""
        if x.shape[0] == 0:
            return x.new_empty(0, x.shape[1])
        k = ids.shape[1]
        mine = ids >= 0
        kk = int(mine.sum(1).max())  # the widest row: pairs past it are all -1 (host already synced above)
        key = (~mine).long() * k + torch.arange(k, device=ids.device)  # local pairs first, order kept
        order = key.argsort(1)[:, :kk]
        ids, weights = ids.gather(1, order), weights.gather(1, order)
        keep = ids >= 0
        ids, weights = torch.where(keep, ids, 0), torch.where(keep, weights, 0.0)
        r = moe.routed
        return moe.backend.experts(x, weights, ids, r.w1, r.w2, r.w3, r.w1_scale, r.w2_scale, r.w3_scale,
                                   moe.limit, False)


# ---- vocab-parallel lm head ---------------------------------------------------------------------------------

class VocabParallelHead:
    """lm head with `head.weight` sharded by vocabulary rows; each rank gets full logits for its own tokens.

    Rank r holds rows [r*Vs, (r+1)*Vs), Vs = ceil(V / W) (the last shard zero-padded). Per call: all_gather of
    the row counts and of the (padded) hidden rows, the local slice of logits for every rank's rows, then an
    all_to_all that returns each rank [its rows, Vs] from every rank, concatenated to [rows, V]. Exact: each
    logit is one rank's dot product, no reduction across ranks.
    """

    def __init__(self, ctx: ParallelContext, vocab_size: int, ep: ExpertParallel | None = None) -> None:
        self.ctx, self.vocab, self.ep = ctx, vocab_size, ep
        self.shard = -(-vocab_size // ctx.world_size)
        self.start = ctx.rank * self.shard

    def shard_weight(self, full: Tensor) -> Tensor:
        part = full[self.start:self.start + self.shard]
        if part.shape[0] < self.shard:
            part = torch.cat([part, part.new_zeros(self.shard - part.shape[0], *part.shape[1:])])
        return part.clone()

    def __call__(self, inner, x: Tensor, weight: Tensor) -> Tensor:
        if self.ep is not None and self.ep.last_static:  # the forward's MoE calls were static: so is the head
            return static_vocab_head(self, inner, x, weight, self.ep.max_tokens_per_rank)
        ctx, w = self.ctx, self.ctx.world_size
        lead, d = x.shape[:-1], x.shape[-1]
        rows = x.reshape(-1, d)
        n = rows.shape[0]
        counts_t = torch.tensor([n], dtype=torch.int64, device=rows.device)
        all_counts = [torch.empty_like(counts_t) for _ in range(w)]
        dist.all_gather(all_counts, counts_t, group=ctx.group)
        counts = [int(c.item()) for c in all_counts]
        nmax = max(counts)
        if nmax == 0:
            return rows.new_zeros(*lead, self.vocab, dtype=torch.float32)
        padded = torch.cat([rows, rows.new_zeros(nmax - n, d)]) if n < nmax else rows.contiguous()
        gathered = [torch.empty_like(padded) for _ in range(w)]
        dist.all_gather(gathered, padded, group=ctx.group)
        h_all = torch.cat([g[:c] for g, c in zip(gathered, counts)])
        part = inner.lm_head(h_all, weight).float().contiguous()            # [sum(counts), Vs]
        out = part.new_empty(w * n, self.shard)
        dist.all_to_all_single(out, part, [n] * w, counts, group=ctx.group)
        logits = out.view(w, n, self.shard).permute(1, 0, 2).reshape(n, w * self.shard)[:, :self.vocab]
        return logits.reshape(*lead, self.vocab)


class _HeadBackend:
    """The Transformer's own backend view: every op forwards to the real backend, except a vocab-parallel
    lm_head. Only the Transformer gets it; its layers keep the real backend."""

    def __init__(self, inner, head: VocabParallelHead) -> None:
        self._inner, self._vp_head = inner, head

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def lm_head(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._vp_head(self._inner, x, weight)


# ---- model-level helpers ------------------------------------------------------------------------------------

def _moes(model: nn.Module) -> list[nn.Module]:
    from .model import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


def install_parallel(model: nn.Module, ctx: ParallelContext, tp_head: bool = True, fused: bool = False,
                     max_tokens_per_rank: int = 256, static: bool = False, npu=None) -> nn.Module:
    """Put `ExpertParallel` on every MoE (main layers and MTP blocks) and, with `tp_head`, shard the lm head.

    `static`: sync-free calls of at most `max_tokens_per_rank` rows take the capturable static path (`fused`:
    on the MC2 ops; `npu`: their provider, default torch_npu). The model must hold this rank's experts
    (`expert_range_for`). A one-rank context changes nothing.
    """
    if not ctx.distributed:
        return model
    ep = ExpertParallel(ctx, fused, max_tokens_per_rank, static, npu)
    for moe in _moes(model):
        ep._check(moe)
        moe.ep = ep
    model.expert_parallel = ep
    if tp_head and not isinstance(model.backend, _HeadBackend):
        head = VocabParallelHead(ctx, model.cfg.vocab_size, ep)
        model.head.weight = nn.Parameter(head.shard_weight(model.head.weight.data), requires_grad=False)
        model.backend = _HeadBackend(model.backend, head)
    model.parallel = ctx
    return model


def load_parallel_model(model_dir: str | Path, ctx: ParallelContext, *, backend=None,
                        dtype: torch.dtype = torch.bfloat16, weights: str = "native", n_mtp: int | None = None,
                        tp_head: bool = True, fused: bool = False, max_tokens_per_rank: int = 256,
                        static: bool = False, npu=None, progress: bool = True) -> nn.Module:
    """Rank-aware loading from one official snapshot: this rank's experts only, then `install_parallel`.

    Every rank reads the dense weights (DP attention needs them whole) and only its routed experts; with
    `tp_head` the full head is read once and then cut to this rank's vocab slice. Raises ValueError when the
    world size does not divide `n_routed_experts`.
    """
    from .checkpoint import load_checkpoint
    from .config import load_config

    cfg = load_config(model_dir)
    rng = expert_range_for(ctx.rank, ctx.world_size, cfg.n_routed_experts) if ctx.world_size > 1 else None
    model = load_checkpoint(model_dir, backend=backend, dtype=dtype, weights=weights, device=ctx.device,
                            expert_range=rng, n_mtp=n_mtp, progress=progress and ctx.rank == 0)
    return install_parallel(model, ctx, tp_head, fused, max_tokens_per_rank, static, npu)


def idle_forward(model: nn.Module, blocks: list[nn.Module] | None = None, head: bool = True,
                 static: bool = False) -> None:
    """Join one forward's collectives with no tokens: every expert-parallel MoE in `blocks` (default: the main
    layers, in order) with 0 rows, then (`head`) the vocab-parallel lm head with 0 rows.

    To mirror an MTP draft step on a busy rank, call it with `blocks=model.mtp[j:j+1]` (and `head` as that step
    uses the head). `static`: mirror a call that takes the static path (a sync-free decode within the capacity
    of an `ExpertParallel(static=True)`); otherwise the exact path."""
    dev, dim = model.embed.weight.device, model.cfg.hidden_size
    k = model.cfg.num_experts_per_tok
    for blk in (model.layers if blocks is None else blocks):
        moe = blk.ffn
        if moe.ep is not None:
            moe.ep(moe, torch.empty(0, dim, dtype=model.dtype, device=dev),
                   torch.empty(0, k, dtype=torch.float32, device=dev),
                   torch.empty(0, k, dtype=torch.int64, device=dev), static, None)
    if head and isinstance(model.backend, _HeadBackend):
        model.backend.lm_head(torch.empty(0, dim, dtype=model.dtype, device=dev), model.head.weight)


@torch.no_grad()
def generate_lockstep(model: nn.Module, ctx: ParallelContext, prompts: list[list[int]], max_tokens: int,
                      eos_token_id: int | None = None) -> list[list[int]]:
    """Greedy generation of this rank's `prompts` while every rank steps in lockstep (DP attention).

    Prefill: one forward per prompt; ranks with fewer prompts pad with `idle_forward`. Decode: one batched step
    for this rank's unfinished sequences per round, `idle_forward` when none is left, until every rank is done
    (one small all_reduce per round decides, and gives the widest batch: the static EP path when it fits the
    capacity on every rank). Returns the generated ids per prompt.
    """
    dev = model.embed.weight.device
    n = len(prompts)
    max_len = max((len(p) + max_tokens for p in prompts), default=1)
    cache = model.new_cache(max(n, 1), max_len)
    outs: list[list[int]] = [[] for _ in prompts]
    for i in range(ctx.max_int(n)):
        if i < n:
            logits = model(torch.tensor([prompts[i]], device=dev), cache, torch.tensor([i], device=dev), 0,
                           last_only=True)
            outs[i].append(int(logits[0, -1].argmax()))
        else:
            idle_forward(model)

    def running(i: int) -> bool:
        return len(outs[i]) < max_tokens and not (eos_token_id is not None and outs[i][-1] == eos_token_id)

    while True:
        active = [i for i in range(n) if running(i)]
        widest = ctx.max_int(len(active))
        ep = getattr(model, "expert_parallel", None)
        if ep is not None:
            ep.force_exact = False
        if widest == 0:
            return outs
        static = ep is not None and ep.takes_static(widest, True)  # the same choice on every rank
        if ep is not None:
            ep.force_exact = not static
        if not active:
            idle_forward(model, static=static)
            continue
        ids = torch.tensor([[outs[i][-1]] for i in active], device=dev)
        pos = torch.tensor([len(prompts[i]) + len(outs[i]) - 1 for i in active], device=dev)
        logits = model.decode(ids, pos, cache, torch.tensor(active, device=dev),
                              max_len=max(len(prompts[i]) + len(outs[i]) for i in active))
        for j, tok in enumerate(logits[:, -1].argmax(-1).tolist()):
            outs[active[j]].append(tok)


def resident_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the weights this process holds (each storage once), split into routed experts, lm head,
    embedding and the rest."""
    seen: set[int] = set()
    out = {"routed_experts": 0, "head": 0, "embed": 0, "other": 0}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        part = ("routed_experts" if ".routed." in name else "head" if name == "head.weight"
                else "embed" if name == "embed.weight" else "other")
        out[part] += t.untyped_storage().nbytes() if t.device.type != "meta" else t.nbytes
    out["total"] = sum(out.values())
    return out


def static_buffer_bytes(model: nn.Module) -> int:
    """Activation bytes one static-path MoE call moves through this rank's buffers (sent + received, rows and
    routing metadata, both directions; the lm head's gather/all-to-all excluded): 0 without a static EP."""
    ep = getattr(model, "expert_parallel", None)
    if ep is None or not ep.static:
        return 0
    rows = ep.world * ep.max_tokens_per_rank
    row = model.cfg.hidden_size * model.embed.weight.element_size()
    meta = 2 * model.cfg.num_experts_per_tok * 4
    return 2 * rows * (2 * row + meta)  # dispatch rows + metadata, sent and received; results back, both ways
