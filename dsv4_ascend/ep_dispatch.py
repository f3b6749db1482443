"""Static-shape expert-parallel dispatch / combine and vocab-parallel head for a capturable decode step.

Every buffer has a shape fixed by the per-rank capacity C (the most token rows one rank brings to one MoE call),
so the step has no host reads and the collectives are the traceable ones of
`torch.distributed._functional_collectives` (torch.compile records them in the graph as `_c10d_functional` ops).

Capacity: each token goes to each rank at most once, so a rank never receives more than C rows from one peer when
every rank brings at most C rows. The buffers are therefore sized so that overflow is impossible, with no drop
and no overflow check on the device; a call with more than C rows (a long prefill, a wide MTP verify) is known to
be one from its shape on the host and takes the exact variable-split path instead (`parallel.ExpertParallel`).
The price is padding: each rank sends W x C rows each way per MoE call whatever the routing (a plain
all_to_all moves whole buffers); torch_npu's MC2 dispatch (`npu_moe_distribute_dispatch`) sizes the same way
(global_bs = bs x ep_world_size, torch_npu's meta function) but moves only the routed rows.
"""
from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor

__all__ = ["static_dispatch_combine", "static_vocab_head", "mc2_dispatch_combine"]

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu)
# Newer torch names it all_gather_single and deprecates all_gather_tensor (2.13 warns); older ones lack it.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def _a2a(t: Tensor, group) -> Tensor:
    """all_to_all along dim 0 with equal splits (traceable); fp8 travels as bytes (gloo has no fp8)."""
    if t.dtype in _FP8:
        return _a2a(t.view(torch.uint8), group).view(t.dtype)
    return funcol.wait_tensor(funcol.all_to_all_single(t.contiguous(), None, None, group))


def static_dispatch_combine(moe, x: Tensor, weights: Tensor, ids: Tensor, world: int, capacity: int,
                            group, shared: Tensor | None = None) -> Tensor:
    """This rank's tokens' routed-expert output [T, D] (T <= capacity; + `shared` in the fp32 sum), exchanged
    through fixed-size buffers.

    Row t of the block sent to rank r is token t with its k weights and ids made local to r (pairs of other
    ranks: id -1, weight 0); rows past T are padding (all -1). Rank r runs the received [W*C] rows through its
    experts (sync-free), sends each block back, and every token sums its W partial outputs in fp32 in rank order.
    """
    t, d = x.shape
    k, c = ids.shape[1], capacity
    if t > c:
        raise ValueError(f"{t} token rows exceed the static expert-parallel capacity {c} (take the exact path)")
    per = moe.routed.count
    ranks = torch.arange(world, device=x.device).view(world, 1, 1)
    mine = (ids // per).unsqueeze(0) == ranks                                      # [W,T,k]
    local = torch.where(mine, ids.unsqueeze(0) - ranks * per, -1).to(torch.int32)
    w = torch.where(mine, weights.float().unsqueeze(0), 0.0)
    meta = torch.cat([w.view(torch.int32), local], 2)                              # [W,T,2k] int32, bit-exact
    if t < c:
        pad = torch.cat([torch.zeros(world, c - t, k, dtype=torch.int32, device=x.device),
                         torch.full((world, c - t, k), -1, dtype=torch.int32, device=x.device)], 2)
        meta = torch.cat([meta, pad], 1)
        x = torch.cat([x, x.new_zeros(c - t, d)])
    recv_x = _a2a(x.unsqueeze(0).expand(world, c, d).reshape(world * c, d), group)
    recv_meta = _a2a(meta.reshape(world * c, 2 * k), group)
    r_ids = recv_meta[:, k:].long()
    keep = r_ids >= 0
    r_w = torch.where(keep, recv_meta[:, :k].contiguous().view(torch.float32), 0.0)
    r = moe.routed
    y = moe.backend.experts(recv_x, r_w, torch.where(keep, r_ids, 0), r.w1, r.w2, r.w3, r.w1_scale, r.w2_scale,
                            r.w3_scale, moe.limit, True)                           # [W*C, D]; padding -> 0
    back = _a2a(y, group).view(world, c, d)[:, :t]                                  # block r: partials of rank r
    out = back.float().sum(0)
    return (out if shared is None else out + shared.float()).to(y.dtype)


def static_vocab_head(head, inner, x: Tensor, weight: Tensor, capacity: int) -> Tensor:
    """`parallel.VocabParallelHead` with fixed shapes: rows padded to the capacity, all-gathered, each rank's
    vocab slice computed for every rank's rows, returned by one all_to_all. Exact like the variable path."""
    ctx, w = head.ctx, head.ctx.world_size
    group = ctx.group if ctx.group is not None else torch.distributed.group.WORLD
    lead, d = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, d)
    n, c = rows.shape[0], capacity
    if n > c:
        raise ValueError(f"{n} rows exceed the static lm-head capacity {c} (take the exact path)")
    if n < c:
        rows = torch.cat([rows, rows.new_zeros(c - n, d)])
    every = funcol.wait_tensor(_all_gather(rows.contiguous(), 0, group))                # [W*C, D]
    part = inner.lm_head(every, weight).float()                                        # [W*C, Vs]
    mine = _a2a(part, group).view(w, c, head.shard)[:, :n]                              # slice r of my rows
    logits = mine.permute(1, 0, 2).reshape(n, w * head.shard)[:, :head.vocab]
    return logits.reshape(*lead, head.vocab)


def mc2_dispatch_combine(npu, moe, x: Tensor, weights: Tensor, ids: Tensor, world: int, rank: int, group_ep: str,
                         capacity: int, shared: Tensor | None = None) -> Tensor:
    """The static path on torch_npu's MC2 ops (`npu` = torch_npu, or the CPU emulator over gloo).

    `npu_moe_distribute_dispatch` lays this rank's received rows out expert by expert in a buffer of static size
    global_bs * min(local experts, k), global_bs = capacity * world (torch_npu's meta function); rows past the
    sum of `expert_token_nums` are padding and run through the last expert, whose output nobody reads. The
    experts run with weight 1 and `npu_moe_distribute_combine` applies the routing weights while summing and
    adds `shared` (its `shared_expert_x`).
    """
    t, d = x.shape
    k, per = ids.shape[1], moe.routed.count
    if t > capacity:
        raise ValueError(f"{t} token rows exceed the MC2 dispatch capacity {capacity} (take the exact path)")
    active = None
    if t == 0:  # the MC2 ops need at least one row: send an inactive dummy
        shared = None
        x = x.new_zeros(1, d)
        ids = torch.arange(k, device=x.device).view(1, k)
        weights = torch.zeros(1, k, dtype=torch.float32, device=x.device)
        active = torch.zeros(1, dtype=torch.bool, device=x.device)
    common = dict(group_ep=group_ep, ep_world_size=world, ep_rank_id=rank, moe_expert_num=moe.n_experts,
                  global_bs=capacity * world)
    ids32 = ids.to(torch.int32)
    expand_x, _, expand_idx, counts, ep_recv_counts, tp_recv_counts, _ = npu.npu_moe_distribute_dispatch(
        x, ids32, x_active_mask=active, expert_token_nums_type=1, quant_mode=0, **common)
    rows = expand_x.shape[0]
    local = torch.searchsorted(counts.cumsum(0), torch.arange(rows, device=x.device), right=True)
    local = local.clamp(max=per - 1).view(-1, 1)
    r = moe.routed
    ones = torch.ones(rows, 1, dtype=torch.float32, device=x.device)
    y = moe.backend.experts(expand_x, ones, local, r.w1, r.w2, r.w3, r.w1_scale, r.w2_scale, r.w3_scale,
                            moe.limit, True)
    out = npu.npu_moe_distribute_combine(y, ids32, expand_idx, ep_recv_counts, weights.float(),
                                         tp_send_counts=tp_recv_counts, x_active_mask=active,
                                         shared_expert_x=shared, **common)
    return out[:t]
