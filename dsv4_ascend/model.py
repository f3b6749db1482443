"""DeepSeek-V4, written once against the Backend seam.

Module and parameter names are the official checkpoint's (`layers.3.attn.wq_a.weight`, `hc_head_fn`, ...), so
loading needs no renaming. The one exception is storage of routed experts: they are stacked per layer
(`ffn.routed.w1` = [E, I, D]) so a grouped matmul can use them; `Transformer.checkpoint_tensors()` exposes them
under their official per-expert names (`ffn.experts.5.w1.weight`, `.scale`).

Every forward takes a `Step`: the positions, the cache and the cache slots of the sequences in the batch.
Prefill chunks know their start on the host; decode steps (one token per sequence) carry positions only as
tensors and do no host syncs, so they can be captured as a graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from . import quant
from .backend import Backend
from .cache import CompressorState, KVCache, LayerCache
from .config import ModelConfig
from .rope import RopeTable, apply_rope_tail

__all__ = ["WeightFormats", "Linear", "Step", "Transformer"]

NEG_INF = float("-inf")


@dataclass(frozen=True)
class WeightFormats:
    """How linear weights are held in memory: 'plain' (dtype of the model), 'fp8' (e4m3 + 128x128 scale) or
    'fp4' (packed e2m1 + 1x32 scale). `dense` covers the FP8 linears of the checkpoint, `experts` the routed ones."""

    dense: str = "plain"
    experts: str = "plain"

    @classmethod
    def from_config(cls, cfg: ModelConfig, dequantize: bool = False) -> "WeightFormats":
        """The checkpoint's own formats, or all-plain when the weights are dequantised at load."""
        if dequantize or cfg.quant_method is None:
            return cls()
        return cls("fp8", cfg.expert_dtype or "fp8")


def _param(*shape: int, dtype: torch.dtype, device=None) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device), requires_grad=False)


def _weight_and_scale(out_f: int, in_f: int, fmt: str, dtype: torch.dtype, lead: tuple[int, ...] = (),
                      device=None) -> tuple[nn.Parameter, nn.Parameter | None]:
    if fmt == "plain":
        return _param(*lead, out_f, in_f, dtype=dtype, device=device), None
    if fmt == "fp8":
        return (_param(*lead, out_f, in_f, dtype=torch.float8_e4m3fn, device=device),
                _param(*lead, -(-out_f // 128), -(-in_f // 128), dtype=torch.float8_e8m0fnu, device=device))
    if fmt == "fp4":
        if in_f % 32:
            raise ValueError(f"MXFP4 weights need in_features % 32 == 0, found {in_f}")
        return (_param(*lead, out_f, in_f // 2, dtype=torch.int8, device=device),
                _param(*lead, out_f, in_f // 32, dtype=torch.float8_e8m0fnu, device=device))
    raise ValueError(f"unknown weight format {fmt!r}; allowed: plain, fp8, fp4")


class Linear(nn.Module):
    """A bias-free linear layer whose weight may be FP8 block-scaled or packed MXFP4 (then it has `.scale`)."""

    def __init__(self, backend: Backend, in_f: int, out_f: int, fmt: str, dtype: torch.dtype, device=None):
        super().__init__()
        self.backend = backend
        self.in_features, self.out_features = in_f, out_f
        self.weight, scale = _weight_and_scale(out_f, in_f, fmt, dtype, device=device)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.backend.linear(x, self.weight, self.scale)


class RMSNorm(nn.Module):
    """Weighted RMSNorm; the weight is kept in fp32 (the checkpoint stores bf16)."""

    def __init__(self, backend: Backend, dim: int, eps: float, device=None):
        super().__init__()
        self.backend, self.eps = backend, eps
        self.weight = _param(dim, dtype=torch.float32, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.backend.rms_norm(x, self.weight, self.eps)


@dataclass
class Step:
    """One forward's bookkeeping: which sequences (cache slots), which positions, prefill or decode.

    Prefill: `start` is the host-known first position of the chunk (same for every row). Decode: `start` is None,
    the chunk is one token per row and `positions` [B,1] may differ per row.
    """

    input_ids: Tensor
    positions: Tensor
    slots: Tensor
    cache: KVCache
    start: int | None
    span_pages: int | None = None  # decode: pages that cover every row's context (host hint; None = all)
    defer: list | None = None      # prefill: leave the cache untouched, collect commit(k) callbacks instead
    _rope: dict = field(default_factory=dict)

    @property
    def decode(self) -> bool:
        return self.start is None

    def cos_sin(self, table: RopeTable) -> tuple[Tensor, Tensor]:
        """cos/sin of this step's positions for one table, computed once per step."""
        if table.name not in self._rope:
            self._rope[table.name] = table.cos_sin(self.positions)
        return self._rope[table.name]


class Compressor(nn.Module):
    """Softmax-pools kv of every `ratio` tokens into one entry (CSA: overlapping windows of 2*ratio)."""

    def __init__(self, backend: Backend, cfg: ModelConfig, ratio: int, width: int, dtype: torch.dtype,
                 rotate: bool, device=None):
        super().__init__()
        self.backend, self.ratio, self.width, self.overlap = backend, ratio, width, ratio == 4
        # Indexer keys get Hadamard + FP4 simulation, kv entries FP8 on their nope dims (deepseek numerics).
        self.sim_rope_dim = None if rotate else cfg.qk_rope_head_dim
        self.dtype = dtype
        coff = 2 if self.overlap else 1
        self.wkv = Linear(backend, cfg.hidden_size, coff * width, "plain", dtype, device)
        self.wgate = Linear(backend, cfg.hidden_size, coff * width, "plain", dtype, device)
        self.ape = _param(ratio, coff * width, dtype=torch.float32, device=device)
        self.norm = RMSNorm(backend, width, cfg.rms_norm_eps, device)

    def _project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.float()
        return self.wkv(xf), self.wgate(xf) + self.ape[positions % self.ratio]

    def _finish(self, pooled: Tensor, entry_pos: Tensor, table: RopeTable) -> Tensor:
        """Norm, RoPE at the window's first position, QAT simulation: the entry as stored in the cache."""
        e = self.norm(pooled.to(self.dtype))
        cos, sin = table.cos_sin(entry_pos)
        e = apply_rope_tail(self.backend, e, cos, sin)
        return finish_keys(self.backend, e, self.sim_rope_dim)

    def project(self, x: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Per-token (kv, score) rows of a prefill chunk starting at `start`."""
        return self._project(x, start + torch.arange(x.shape[1], device=x.device))

    def absorb(self, kv: Tensor, sc: Tensor, start: int, st: CompressorState, slots: Tensor, table: RopeTable,
               write: bool = True) -> tuple[Tensor | None, int]:
        """Entries of every window that the chunk rows [start, start+S) close, and the index of the first.

        With write=True the unfinished-window state is updated; write=False leaves the cache untouched (used to
        verify speculative tokens before committing any of them).
        """
        b, s, _ = kv.shape
        m = self.ratio
        r0 = start % m
        p0 = start - r0
        if r0:
            kv = torch.cat([st.kv_pend[slots, :r0], kv], dim=1)
            sc = torch.cat([st.score_pend[slots, :r0], sc], dim=1)
        n_win = (r0 + s) // m
        full = n_win * m
        entries = None
        if n_win:
            kin, sin_ = kv[:, :full], sc[:, :full]
            if self.overlap:
                if p0 >= m:
                    pk, ps = st.kv_prev[slots], st.score_prev[slots]
                else:  # first window: no previous half-series
                    pk = torch.zeros_like(kv[:, :m])
                    ps = torch.full_like(sc[:, :m], NEG_INF)
                kin, sin_ = torch.cat([pk, kin], 1), torch.cat([ps, sin_], 1)
                if write:
                    st.kv_prev[slots] = kv[:, full - m:full]
                    st.score_prev[slots] = sc[:, full - m:full]
            pooled = self.backend.compress(kin, sin_, m, self.overlap)
            entry_pos = (p0 + m * torch.arange(n_win, device=kv.device)).expand(b, n_win)
            entries = self._finish(pooled, entry_pos, table)
        rest = r0 + s - full
        if rest and write:
            st.kv_pend[slots, :rest] = kv[:, full:]
            st.score_pend[slots, :rest] = sc[:, full:]
        return entries, p0 // m

    def decode(self, x: Tensor, pos: Tensor, st: CompressorState, slots: Tensor, table: RopeTable) -> Tensor:
        """Entry of the window holding `pos` [B] (final once the window closes; invisible until then)."""
        m = self.ratio
        kv, sc = self._project(x, pos.unsqueeze(1))
        row = pos % m
        st.kv_pend[slots, row] = kv[:, 0]
        st.score_pend[slots, row] = sc[:, 0]
        pk, ps_raw = st.kv_pend[slots], st.score_pend[slots]
        unfilled = torch.arange(m, device=x.device).view(1, m, 1) > row.view(-1, 1, 1)
        ps = ps_raw.masked_fill(unfilled, NEG_INF)
        if self.overlap:
            qk, qs_raw = st.kv_prev[slots], st.score_prev[slots]
            qs = qs_raw.masked_fill((pos < m).view(-1, 1, 1), NEG_INF)
            pooled = self.backend.compress(torch.cat([qk, pk], 1), torch.cat([qs, ps], 1), m, True)
            closing = (row == m - 1).view(-1, 1, 1)
            st.kv_prev[slots] = torch.where(closing, pk, qk)
            st.score_prev[slots] = torch.where(closing, ps_raw, qs_raw)
        else:
            pooled = self.backend.compress(pk, ps, m, False)
        return self._finish(pooled, (pos - row).unsqueeze(1), table)


def finish_keys(backend: Backend, e: Tensor, rope_dim: int | None) -> Tensor:
    """DeepSeek numerics only (QAT simulation): FP8-simulate the nope dims of kv (rope_dim given) or
    Hadamard-rotate and FP4-simulate indexer queries/keys (rope_dim None). Identity in exact numerics."""
    if not backend.options.deepseek:
        return e
    if rope_dim is None:
        return quant.fp4_sim(e @ quant.hadamard(e.shape[-1], e.dtype).to(e.device), 32)
    return torch.cat([quant.fp8_sim(e[..., :-rope_dim], 64), e[..., -rope_dim:]], -1)


def _span(w0: int, e: Tensor) -> Tensor:
    """Entry indices [B,N] of N consecutive new entries starting at w0."""
    return (w0 + torch.arange(e.shape[1], device=e.device)).expand(e.shape[0], e.shape[1])


class Indexer(nn.Module):
    """Lightning indexer: scores compressed entries per query and keeps the top `index_topk`."""

    def __init__(self, backend: Backend, cfg: ModelConfig, fmt: WeightFormats, dtype: torch.dtype, device=None):
        super().__init__()
        self.backend = backend
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(backend, cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, fmt.dense, dtype, device)
        self.weights_proj = Linear(backend, cfg.hidden_size, cfg.index_n_heads, "plain", dtype, device)
        self.compressor = Compressor(backend, cfg, 4, cfg.index_head_dim, dtype, rotate=True, device=device)
        self.weight_scale = cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5

    def select(self, x: Tensor, qr: Tensor, keys: Tensor, n_visible: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, _ = x.shape
        q = self.wq_b(qr).view(b, s, self.n_heads, self.head_dim)
        q = finish_keys(self.backend, apply_rope_tail(self.backend, q, cos.unsqueeze(2), sin.unsqueeze(2)), None)
        w = self.weights_proj(x).float() * self.weight_scale
        return self.backend.indexer_topk(q, w, keys, n_visible, self.topk)


class Attention(nn.Module):
    """Shared-KV MQA over a sliding window plus (CSA) selected or (HCA) all compressed entries, with sinks."""

    def __init__(self, backend: Backend, cfg: ModelConfig, layer_id: int, ratio: int, fmt: WeightFormats,
                 dtype: torch.dtype, tables: dict[str, RopeTable], device=None):
        super().__init__()
        self.backend, self.layer_id, self.ratio = backend, layer_id, ratio
        self.n_heads, self.head_dim, self.groups = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups
        self.window = cfg.sliding_window
        self.eps = cfg.rms_norm_eps
        self.table = tables["compress" if ratio else "main"]
        d, h = cfg.head_dim, cfg.num_attention_heads
        self.attn_sink = _param(h, dtype=torch.float32, device=device)
        self.wq_a = Linear(backend, cfg.hidden_size, cfg.q_lora_rank, fmt.dense, dtype, device)
        self.q_norm = RMSNorm(backend, cfg.q_lora_rank, cfg.rms_norm_eps, device)
        self.wq_b = Linear(backend, cfg.q_lora_rank, h * d, fmt.dense, dtype, device)
        self.wkv = Linear(backend, cfg.hidden_size, d, fmt.dense, dtype, device)
        self.kv_norm = RMSNorm(backend, d, cfg.rms_norm_eps, device)
        self.wo_a = Linear(backend, h * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, fmt.dense, dtype, device)
        self.wo_b = Linear(backend, cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, fmt.dense, dtype, device)
        self.compressor = Compressor(backend, cfg, ratio, d, dtype, False, device) if ratio else None
        self.indexer = Indexer(backend, cfg, fmt, dtype, device) if ratio == 4 else None
        self.rope_dim = cfg.qk_rope_head_dim

    # -- window keys ------------------------------------------------------------------------------------------
    def _window_prefill(self, kv: Tensor, step: Step, lc: LayerCache) -> tuple[Tensor, Tensor]:
        b, s, _ = kv.shape
        win, s0 = self.window, step.start
        pool = torch.cat([lc.window.read(step.slots), kv], dim=1)  # ring (positions < s0) then this chunk
        t = s0 + torch.arange(s, device=kv.device)
        p = t.unsqueeze(1) - (win - 1) + torch.arange(win, device=kv.device)  # the window's positions [S, win]
        idx = torch.where(p >= s0, win + p - s0, p % win)
        idx = torch.where(p < 0, -1, idx)
        if step.defer is None:
            self._ring_write(lc, step.slots, s0, kv)
        else:
            step.defer.append(lambda k: k and self._ring_write(lc, step.slots, s0, kv[:, :k]))
        return pool, idx.expand(b, s, win)

    def _ring_write(self, lc: LayerCache, slots: Tensor, start: int, kv: Tensor) -> None:
        """Keep the last `window` rows of a chunk starting at `start` in the ring."""
        keep = min(kv.shape[1], self.window)
        t = start + torch.arange(kv.shape[1] - keep, kv.shape[1], device=kv.device)
        lc.window.write((slots.unsqueeze(1), (t % self.window).unsqueeze(0)), kv[:, -keep:])

    def _window_decode(self, kv: Tensor, step: Step, lc: LayerCache) -> tuple[Tensor, Tensor]:
        win = self.window
        pos = step.positions[:, 0]
        lc.window.write((step.slots, pos % win), kv[:, 0])
        p = pos.unsqueeze(1) - (win - 1) + torch.arange(win, device=kv.device)  # [B, win]
        idx = torch.where(p < 0, -1, p % win)
        return lc.window.read(step.slots), idx.unsqueeze(1)

    # -- compressed keys ----------------------------------------------------------------------------------------
    def _absorb(self, comp: Compressor, store, st: CompressorState, rows: tuple[Tensor, Tensor], step: Step,
                write: bool) -> Tensor:
        """Fold a prefill chunk's compressor rows in; return the entry pool [B, (start+S)//m, c]."""
        m, slots = comp.ratio, step.slots
        e, w0 = comp.absorb(*rows, step.start, st, slots, self.table, write)
        lc = step.cache.layers[self.layer_id]
        n_total = (step.start + rows[0].shape[1]) // m
        if e is not None and write:
            lc.write_entries(store, slots, _span(w0, e), e, m)
        if e is None or write:
            return lc.read_entries(store, slots, n_total, m)
        return torch.cat([lc.read_entries(store, slots, w0, m), e.to(store.dtype)], 1)

    def _compressed(self, x: Tensor, qr: Tensor, step: Step, lc: LayerCache, cos: Tensor,
                    sin: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's new entries; return the entry pool [B,N,d] and per-query picks [B,S,K] (-1 = none)."""
        m, slots, pos = self.ratio, step.slots, step.positions
        comp = self.compressor
        idx_comp = self.indexer.compressor if self.indexer is not None else None
        if step.decode:
            p = pos[:, 0]
            lc.write_entries(lc.entries, slots, (p // m).unsqueeze(1), comp.decode(x, p, lc.comp, slots, self.table), m)
            pages = step.span_pages or lc.block_table.shape[1]  # static per bucket: shapes never depend on data
            n_total = pages * lc.block_size // m
            entries = lc.read_entries(lc.entries, slots, n_total, m)
            if idx_comp is not None:
                lc.write_entries(lc.index_keys, slots, (p // 4).unsqueeze(1),
                                 idx_comp.decode(x, p, lc.index_comp, slots, self.table), 4)
                keys = lc.read_entries(lc.index_keys, slots, n_total, 4)
        else:
            write = step.defer is None
            rows = comp.project(x, step.start)
            entries = self._absorb(comp, lc.entries, lc.comp, rows, step, write)
            if idx_comp is not None:
                irows = idx_comp.project(x, step.start)
                keys = self._absorb(idx_comp, lc.index_keys, lc.index_comp, irows, step, write)
            if not write:
                step.defer.append(lambda k, rows=rows, irows=(irows if idx_comp is not None else None):
                                  self._commit_compressed(step, rows, irows, k))
        n_visible = (pos + 1) // m  # entry w is visible to query t iff w < (t+1)//m
        if self.indexer is None:
            w = torch.arange(entries.shape[1], device=x.device)
            picks = torch.where(w < n_visible.unsqueeze(-1), w, -1)
        else:
            picks = self.indexer.select(x, qr, keys, n_visible, cos, sin)
        return entries, picks

    def _commit_compressed(self, step: Step, rows, irows, k: int) -> None:
        """Fold the first k rows of a deferred chunk into the compressor state and entry pages."""
        if k == 0:
            return
        lc = step.cache.layers[self.layer_id]
        cut = Step(step.input_ids[:, :k], step.positions[:, :k], step.slots, step.cache, step.start)
        self._absorb(self.compressor, lc.entries, lc.comp, (rows[0][:, :k], rows[1][:, :k]), cut, True)
        if irows is not None:
            self._absorb(self.indexer.compressor, lc.index_keys, lc.index_comp, (irows[0][:, :k], irows[1][:, :k]),
                         cut, True)

    def forward(self, x: Tensor, step: Step) -> Tensor:
        b, s, _ = x.shape
        be = self.backend
        cos, sin = step.cos_sin(self.table)
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).view(b, s, self.n_heads, self.head_dim)
        q = be.rms_norm(q, None, self.eps)
        q = apply_rope_tail(be, q, cos.unsqueeze(2), sin.unsqueeze(2))
        kv = self.kv_norm(self.wkv(x))
        kv = finish_keys(be, apply_rope_tail(be, kv, cos, sin), self.rope_dim)
        lc = step.cache.layers[self.layer_id]
        if step.decode:
            pool, idx = self._window_decode(kv, step, lc)
        else:
            pool, idx = self._window_prefill(kv, step, lc)
        if self.ratio:
            entries, picks = self._compressed(x, qr, step, lc, cos, sin)
            picks = torch.where(picks >= 0, picks + pool.shape[1], -1)
            pool = torch.cat([pool, entries.to(pool.dtype)], dim=1)
            idx = torch.cat([idx, picks], dim=-1)
        o = be.sparse_attention(q, pool, idx, self.attn_sink, self.head_dim ** -0.5)
        o = apply_rope_tail(be, o, cos.unsqueeze(2), -sin.unsqueeze(2))  # inverse RoPE at the query position
        z = be.grouped_linear(o.reshape(b, s, self.groups, -1), self.wo_a.weight, self.wo_a.scale)
        return self.wo_b(z.flatten(2))


class Gate(nn.Module):
    """Router: sqrt-softplus scores; learned top-k with a correction bias, or a fixed token->experts table."""

    def __init__(self, backend: Backend, cfg: ModelConfig, hashed: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.backend, self.k, self.scale = backend, cfg.num_experts_per_tok, cfg.routed_scaling_factor
        self.weight = _param(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype, device=device)
        self.hashed = hashed
        if hashed:
            self.tid2eid = _param(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.int64, device=device)
            self.bias = None
        else:
            self.bias = _param(cfg.n_routed_experts, dtype=torch.float32, device=device)

    def forward(self, x: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        logits = torch.nn.functional.linear(x.float(), self.weight.float())
        hash_ids = self.tid2eid[input_ids] if self.hashed else None
        return self.backend.route(logits, self.bias, hash_ids, self.k, self.scale)


class Expert(nn.Module):
    """A clamped SwiGLU MLP (the shared expert): w1 gate, w3 up, w2 down."""

    def __init__(self, backend: Backend, cfg: ModelConfig, fmt: str, dtype: torch.dtype, device=None):
        super().__init__()
        self.backend, self.limit = backend, cfg.swiglu_limit
        d, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.w1 = Linear(backend, d, i, fmt, dtype, device)
        self.w2 = Linear(backend, i, d, fmt, dtype, device)
        self.w3 = Linear(backend, d, i, fmt, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return self.backend.swiglu_mlp(x, self.w1.weight, self.w2.weight, self.w3.weight, self.w1.scale,
                                       self.w2.scale, self.w3.scale, self.limit)


class RoutedExperts(nn.Module):
    """The layer's routed experts `first .. first+count-1`, stacked: w1/w3 [E,I,D], w2 [E,D,I] (+ scales)."""

    def __init__(self, cfg: ModelConfig, fmt: str, dtype: torch.dtype, first: int, count: int, device=None):
        super().__init__()
        self.first, self.count = first, count
        d, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.w1, self.w1_scale = _weight_and_scale(i, d, fmt, dtype, (count,), device)
        self.w2, self.w2_scale = _weight_and_scale(d, i, fmt, dtype, (count,), device)
        self.w3, self.w3_scale = _weight_and_scale(i, d, fmt, dtype, (count,), device)

    def checkpoint_tensors(self, prefix: str) -> Iterator[tuple[str, Tensor]]:
        for j in range(self.count):
            for w in ("w1", "w2", "w3"):
                yield f"{prefix}experts.{self.first + j}.{w}.weight", getattr(self, w)[j]
                s = getattr(self, f"{w}_scale")
                if s is not None:
                    yield f"{prefix}experts.{self.first + j}.{w}.scale", s[j]


class MoE(nn.Module):
    """Routed experts (hash- or score-routed) plus the shared expert."""

    def __init__(self, backend: Backend, cfg: ModelConfig, hashed: bool, fmt: WeightFormats, dtype: torch.dtype,
                 expert_range: tuple[int, int] | None = None, device=None):
        super().__init__()
        self.backend, self.limit = backend, cfg.swiglu_limit
        first, last = expert_range or (0, cfg.n_routed_experts)
        self.gate = Gate(backend, cfg, hashed, dtype, device)
        self.routed = RoutedExperts(cfg, fmt.experts, dtype, first, last - first, device)
        self.n_experts = cfg.n_routed_experts
        self.ep = None  # set by dsv4_ascend.parallel for expert parallelism
        self.shared_experts = Expert(backend, cfg, fmt.dense, dtype, device) if cfg.n_shared_experts else None

    def forward(self, x: Tensor, input_ids: Tensor, sync_free: bool = False) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x, input_ids.reshape(-1))
        if self.ep is not None:  # expert parallel: dispatch to the experts' ranks and combine (parallel.py)
            y = self.ep(self, x, weights, ids, sync_free)
        else:
            y = self.run_local_experts(x, weights, ids, sync_free)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def run_local_experts(self, x: Tensor, weights: Tensor, ids: Tensor, sync_free: bool = False) -> Tensor:
        """This rank's share of the routed output: pairs routed to experts outside `routed` get weight 0."""
        r = self.routed
        if r.count != self.n_experts:
            local = (ids >= r.first) & (ids < r.first + r.count)
            weights = weights * local
            ids = torch.where(local, ids - r.first, 0)
        return self.backend.experts(x, weights, ids, r.w1, r.w2, r.w3, r.w1_scale, r.w2_scale, r.w3_scale,
                                    self.limit, sync_free)


class Block(nn.Module):
    """One layer: attention then MoE, each wrapped by mHC pre/post over the 4 residual streams."""

    def __init__(self, backend: Backend, cfg: ModelConfig, layer_id: int, ratio: int, hashed: bool,
                 fmt: WeightFormats, dtype: torch.dtype, tables: dict[str, RopeTable], device=None,
                 expert_range: tuple[int, int] | None = None):
        super().__init__()
        self.backend, self.cfg = backend, cfg
        n, dim = cfg.hc_mult, cfg.hidden_size
        for sub in ("attn", "ffn"):
            setattr(self, f"hc_{sub}_fn", _param((2 + n) * n, n * dim, dtype=torch.float32, device=device))
            setattr(self, f"hc_{sub}_base", _param((2 + n) * n, dtype=torch.float32, device=device))
            setattr(self, f"hc_{sub}_scale", _param(3, dtype=torch.float32, device=device))
        self.attn_norm = RMSNorm(backend, dim, cfg.rms_norm_eps, device)
        self.ffn_norm = RMSNorm(backend, dim, cfg.rms_norm_eps, device)
        self.attn = Attention(backend, cfg, layer_id, ratio, fmt, dtype, tables, device)
        self.ffn = MoE(backend, cfg, hashed, fmt, dtype, expert_range, device)

    def _hc(self, sub: str, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.cfg
        return self.backend.hc_pre(x, getattr(self, f"hc_{sub}_fn"), getattr(self, f"hc_{sub}_base"),
                                   getattr(self, f"hc_{sub}_scale"), c.hc_sinkhorn_iters, c.rms_norm_eps, c.hc_eps)

    def forward(self, x: Tensor, step: Step) -> Tensor:
        h, post, comb = self._hc("attn", x)
        x = self.backend.hc_post(self.attn(self.attn_norm(h), step), x, post, comb)
        h, post, comb = self._hc("ffn", x)
        return self.backend.hc_post(self.ffn(self.ffn_norm(h), step.input_ids, step.decode), x, post, comb)


class HcHead:
    """Collapses the residual streams to one hidden state (sigmoid weights only)."""

    def hc_head(self, x: Tensor) -> Tensor:
        c = self.cfg
        return self.backend.hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, c.rms_norm_eps,
                                    c.hc_eps)


def _add_hc_head(mod: nn.Module, cfg: ModelConfig, device) -> None:
    n, dim = cfg.hc_mult, cfg.hidden_size
    mod.hc_head_fn = _param(n, n * dim, dtype=torch.float32, device=device)
    mod.hc_head_base = _param(n, dtype=torch.float32, device=device)
    mod.hc_head_scale = _param(1, dtype=torch.float32, device=device)


class MTPBlock(Block, HcHead):
    """Multi-token prediction block: embeds token t+1, mixes it with the main streams at t, one SWA layer."""

    def __init__(self, backend: Backend, cfg: ModelConfig, layer_id: int, fmt: WeightFormats, dtype: torch.dtype,
                 tables: dict[str, RopeTable], device=None, expert_range: tuple[int, int] | None = None):
        super().__init__(backend, cfg, layer_id, cfg.compress_ratios[layer_id], False, fmt, dtype, tables, device,
                         expert_range)
        dim = cfg.hidden_size
        self.e_proj = Linear(backend, dim, dim, fmt.dense, dtype, device)
        self.h_proj = Linear(backend, dim, dim, fmt.dense, dtype, device)
        self.enorm = RMSNorm(backend, dim, cfg.rms_norm_eps, device)
        self.hnorm = RMSNorm(backend, dim, cfg.rms_norm_eps, device)
        self.norm = RMSNorm(backend, dim, cfg.rms_norm_eps, device)
        _add_hc_head(self, cfg, device)

    def forward_mtp(self, streams: Tensor, next_embed: Tensor, step: Step) -> tuple[Tensor, Tensor]:
        """(hidden for the shared head [B,S,D], this block's streams [B,S,n,D] for chained drafts)."""
        x = self.h_proj(self.hnorm(streams)) + self.e_proj(self.enorm(next_embed)).unsqueeze(2)
        x = Block.forward(self, x, step)
        return self.norm(self.hc_head(x)), x


class Transformer(HcHead, nn.Module):
    """The whole model: embedding, 4-stream mHC layers, head collapse, final norm, lm head (+ MTP blocks)."""

    def __init__(self, cfg: ModelConfig, backend: Backend, dtype: torch.dtype = torch.bfloat16,
                 formats: WeightFormats | None = None, device=None, n_mtp: int | None = None,
                 expert_range: tuple[int, int] | None = None):
        """`expert_range` = (first, end): the routed experts this rank holds (expert parallelism); all by default."""
        super().__init__()
        if expert_range is not None and not 0 <= expert_range[0] < expert_range[1] <= cfg.n_routed_experts:
            raise ValueError(f"expert_range {expert_range} must satisfy 0 <= first < end <= n_routed_experts="
                             f"{cfg.n_routed_experts}")
        self.expert_range = expert_range
        self.cfg, self.backend, self.dtype = cfg, backend, dtype
        fmt = formats or WeightFormats()
        self.formats = fmt
        tables = {"main": RopeTable.main(cfg), "compress": RopeTable.compress(cfg)}
        dim = cfg.hidden_size
        self.embed = nn.Module()
        self.embed.weight = _param(cfg.vocab_size, dim, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            Block(backend, cfg, i, r, i < cfg.num_hash_layers, fmt, dtype, tables, device, expert_range)
            for i, r in enumerate(cfg.layer_ratios))
        self.norm = RMSNorm(backend, dim, cfg.rms_norm_eps, device)
        self.head = nn.Module()
        self.head.weight = _param(cfg.vocab_size, dim, dtype=dtype, device=device)
        _add_hc_head(self, cfg, device)
        n_mtp = cfg.num_nextn_predict_layers if n_mtp is None else n_mtp
        self.mtp = nn.ModuleList(MTPBlock(backend, cfg, cfg.num_hidden_layers + j, fmt, dtype, tables, device,
                                          expert_range) for j in range(n_mtp))

    # -- names ------------------------------------------------------------------------------------------------
    def checkpoint_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Every tensor under its official checkpoint name (stacked experts expanded per expert)."""
        for name, p in self.named_parameters():
            if ".routed." in name:
                continue
            yield name, p
        for name, mod in self.named_modules():
            if isinstance(mod, RoutedExperts):
                yield from mod.checkpoint_tensors(name[: -len("routed")])

    # -- forward ----------------------------------------------------------------------------------------------
    def new_cache(self, max_slots: int, max_seq_len: int, **kw) -> KVCache:
        """A cache for this model (see KVCache for paging and C8 options)."""
        return KVCache(self.cfg, max_slots, max_seq_len, self.dtype, self.embed.weight.device, len(self.mtp), **kw)

    def _check_ids(self, input_ids: Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], found {input_ids.dtype} "
                             f"{list(input_ids.shape)}")

    def hidden_streams(self, input_ids: Tensor, step: Step) -> Tensor:
        """Residual streams [B,S,n,D] after the last layer (what the MTP block consumes)."""
        e = self.embed.weight[input_ids]
        x = e.unsqueeze(2).expand(*e.shape[:2], self.cfg.hc_mult, e.shape[-1]).contiguous()
        for layer in self.layers:
            x = layer(x, step)
        return x

    def logits(self, streams: Tensor) -> Tensor:
        return self.backend.lm_head(self.norm(self.hc_head(streams)), self.head.weight)

    def _prefill_step(self, input_ids: Tensor, cache: KVCache | None, slots: Tensor | None, start_pos: int,
                      defer: bool = False) -> Step:
        self._check_ids(input_ids)
        b, s = input_ids.shape
        dev = self.embed.weight.device
        if cache is None:
            if start_pos:
                raise ValueError("start_pos > 0 needs the cache that holds the earlier tokens")
            cache = self.new_cache(b, s)
        if slots is None:
            slots = torch.arange(b, device=dev)
        if start_pos + s > cache.max_seq_len:
            raise ValueError(f"sequence of {start_pos + s} tokens exceeds the cache's max_seq_len "
                             f"{cache.max_seq_len}")
        positions = (start_pos + torch.arange(s, device=dev)).expand(b, s)
        return Step(input_ids, positions, slots, cache, start_pos, defer=[] if defer else None)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, cache: KVCache | None = None, slots: Tensor | None = None,
                start_pos: int = 0, last_only: bool = False) -> Tensor:
        """Prefill (a chunk starting at host-known `start_pos` for every row): fp32 logits [B,S,V] (or [B,1,V])."""
        step = self._prefill_step(input_ids, cache, slots, start_pos)
        x = self.hidden_streams(input_ids, step)
        if last_only:
            x = x[:, -1:]
        return self.logits(x)

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, cache: KVCache, slots: Tensor, start_pos: int,
                defer: bool = False) -> tuple[Tensor, Tensor, Callable[[int], None]]:
        """Prefill returning (logits [B,S,V], final streams [B,S,n,D], commit).

        defer=True leaves the cache untouched; `commit(k)` then writes the state of the first k tokens only (the
        accepted prefix of a speculative verify). Without defer, commit is a no-op.
        """
        step = self._prefill_step(input_ids, cache, slots, start_pos, defer)
        x = self.hidden_streams(input_ids, step)

        def commit(k: int) -> None:
            for f in step.defer or ():
                f(k)

        return self.logits(x), x, commit

    @torch.no_grad()
    def mtp_prefill(self, streams: Tensor, next_ids: Tensor, cache: KVCache, slots: Tensor, start_pos: int,
                    j: int = 0) -> tuple[Tensor, Tensor]:
        """MTP block j over a chunk: main streams at positions [start, start+S) and the tokens that follow each.

        Returns (logits [B,S,V] for the token after next, the block's streams for chained drafts).
        """
        step = self._prefill_step(next_ids, cache, slots, start_pos)
        h, x = self.mtp[j].forward_mtp(streams, self.embed.weight[next_ids], step)
        return self.backend.lm_head(h, self.head.weight), x

    @torch.no_grad()
    def mtp_decode(self, streams: Tensor, next_ids: Tensor, positions: Tensor, cache: KVCache, slots: Tensor,
                   j: int = 0) -> tuple[Tensor, Tensor]:
        """One chained MTP draft step per row at `positions` [B] (see mtp_prefill)."""
        step = Step(next_ids, positions.view(-1, 1), slots, cache, None)
        h, x = self.mtp[j].forward_mtp(streams, self.embed.weight[next_ids], step)
        return self.backend.lm_head(h, self.head.weight), x

    @torch.no_grad()
    def decode(self, input_ids: Tensor, positions: Tensor, cache: KVCache, slots: Tensor,
               max_len: int | None = None) -> Tensor:
        """One token per sequence at per-row `positions` [B]: fp32 logits [B,1,V]. No host syncs.

        `max_len` (host-known, optional): an upper bound on every row's length after this token; compressed
        entries are read only up to it (rounded up to whole pages) instead of the slot's full capacity.
        """
        pages = None if max_len is None else min(cache.pages_for(max_len), cache.pages_per_seq)
        step = Step(input_ids, positions.view(-1, 1), slots, cache, None, pages)
        return self.logits(self.hidden_streams(input_ids, step))
