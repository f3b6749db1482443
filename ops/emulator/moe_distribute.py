"""MC2 expert-parallel dispatch / combine (`npu_moe_distribute_dispatch`, `npu_moe_distribute_combine`) emulated
over torch.distributed (gloo on CPU).

Signatures: torch_npu's schemas (`npu_native_functions_by_codegen.yaml`); output shapes and dtypes: its meta
functions (`_meta_registrations.py`: expand_x [global_bs * min(local_experts, k), H], expand_idx [bs * k] int32,
expert_token_nums [local_experts] int64, ep_recv_counts [ep_world_size * local_experts] int32, tp_recv_counts
[tp_world_size] int32; combine -> [bs, H] in expand_x's dtype). Semantics (torch_npu op docs): dispatch sends each
(token, k) copy to the rank holding its expert; every rank's expand_x holds its received rows grouped by local
expert; combine returns each token's sum over its k copies of expert_scales * expert output.

The layout of the two "assist" tensors is internal to the op pair and no document fixes it; here (verify):
expand_x rows are ordered by local expert, then source rank, then source token and slot; ep_recv_counts[e * W + s]
counts the rows local expert e received from rank s; expand_idx[t * k + j] is the position of copy (t, j) among
this rank's copies sent to the same expert. Only quant_mode 0 (no quantisation), no tensor parallelism and no
shared-expert ranks are emulated: other arguments raise NotImplementedError. The split sizes are read on the host
(a correctness model; on the NPU the ops have static shapes and are graph-capturable).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["npu_moe_distribute_dispatch", "npu_moe_distribute_combine"]


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _unsupported(**kw) -> None:
    bad = {k: v for k, v in kw.items() if v}
    if bad:
        raise NotImplementedError(f"the MC2 emulator runs quant_mode 0 without tensor parallelism or shared-expert "
                                  f"ranks; unsupported arguments: {sorted(bad)}")


def _copies(expert_ids: Tensor, active: Tensor | None, per: int) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's (token, slot) copies of active tokens, sorted by global expert (stable), and their expert."""
    bs, k = expert_ids.shape
    flat = expert_ids.reshape(-1).long()
    ok = torch.ones(bs * k, dtype=torch.bool) if active is None else active.bool().repeat_interleave(k)
    pos = torch.arange(bs * k)[ok]
    order = torch.argsort(flat[pos], stable=True)
    pos = pos[order]
    return pos, flat[pos], flat[pos] // per


def npu_moe_distribute_dispatch(x: Tensor, expert_ids: Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int,
                                moe_expert_num: int, *, scales: Tensor | None = None,
                                x_active_mask: Tensor | None = None, expert_scales: Tensor | None = None,
                                group_tp: str = "", tp_world_size: int = 0, tp_rank_id: int = 0,
                                expert_shard_type: int = 0, shared_expert_num: int = 1,
                                shared_expert_rank_num: int = 0, quant_mode: int = 0, global_bs: int = 0,
                                expert_token_nums_type: int = 1):
    """(expand_x, dynamic_scales, expand_idx, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales)."""
    _unsupported(scales=scales is not None, expert_scales=expert_scales is not None, group_tp=group_tp,
                 tp_world_size=tp_world_size, expert_shard_type=expert_shard_type,
                 shared_expert_rank_num=shared_expert_rank_num, quant_mode=quant_mode)
    if expert_token_nums_type not in (0, 1):
        raise ValueError(f"expert_token_nums_type must be 0 (cumsum) or 1 (counts), found {expert_token_nums_type}")
    grp, w = _group(group_ep), ep_world_size
    if moe_expert_num % w:
        raise ValueError(f"moe_expert_num {moe_expert_num} is not a multiple of ep_world_size {w}")
    bs, h = x.shape
    k, per = expert_ids.shape[1], moe_expert_num // w
    gbs = global_bs or bs * w
    rows = gbs * min(per, k)
    pos, expert, dest = _copies(expert_ids, x_active_mask, per)
    # expand_idx: rank of each copy among this rank's copies of the same expert.
    start = torch.searchsorted(expert, expert, side="left")
    expand_idx = torch.zeros(bs * k, dtype=torch.int32)
    expand_idx[pos] = (torch.arange(pos.numel()) - start).to(torch.int32)
    send = torch.bincount(dest, minlength=w)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=grp)
    s_list, r_list = send.tolist(), recv.tolist()
    got_x = x.new_empty(sum(r_list), h)
    dist.all_to_all_single(got_x, x[pos // k].contiguous(), r_list, s_list, group=grp)
    got_e = torch.empty(sum(r_list), dtype=torch.int64)
    dist.all_to_all_single(got_e, (expert % per).contiguous(), r_list, s_list, group=grp)
    src = torch.repeat_interleave(torch.arange(w), torch.tensor(r_list, dtype=torch.int64))
    order = torch.argsort(got_e * w + src, stable=True)  # by local expert, then source rank (then token, slot)
    if order.numel() > rows:
        raise ValueError(f"{order.numel()} rows received exceed expand_x's {rows} (global_bs {gbs}): some rank "
                         "sent more than global_bs / ep_world_size tokens")
    expand_x = x.new_zeros(rows, h)
    expand_x[:order.numel()] = got_x[order]
    counts = torch.bincount(got_e, minlength=per)
    recv_counts = torch.bincount(got_e * w + src, minlength=per * w).to(torch.int32)
    nums = counts if expert_token_nums_type == 1 else counts.cumsum(0)
    return (expand_x, torch.zeros(rows, dtype=torch.float32), expand_idx, nums.to(torch.int64), recv_counts,
            torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.float32))


def npu_moe_distribute_combine(expand_x: Tensor, expert_ids: Tensor, expand_idx: Tensor, ep_send_counts: Tensor,
                               expert_scales: Tensor, group_ep: str, ep_world_size: int, ep_rank_id: int,
                               moe_expert_num: int, *, tp_send_counts: Tensor | None = None,
                               x_active_mask: Tensor | None = None, activation_scale: Tensor | None = None,
                               weight_scale: Tensor | None = None, group_list: Tensor | None = None,
                               expand_scales: Tensor | None = None, shared_expert_x: Tensor | None = None,
                               group_tp: str = "", tp_world_size: int = 0, tp_rank_id: int = 0,
                               expert_shard_type: int = 0, shared_expert_num: int = 1,
                               shared_expert_rank_num: int = 0, global_bs: int = 0, out_dtype: int = 0,
                               comm_quant_mode: int = 0, group_list_type: int = 0) -> Tensor:
    """[bs, H]: per token, the sum over its k copies of expert_scales * the expert output (fp32, then expand_x's
    dtype); `shared_expert_x` is added to that sum. Inactive tokens get zeros."""
    _unsupported(activation_scale=activation_scale is not None, weight_scale=weight_scale is not None,
                 group_list=group_list is not None, expand_scales=expand_scales is not None, group_tp=group_tp,
                 tp_world_size=tp_world_size, expert_shard_type=expert_shard_type,
                 shared_expert_rank_num=shared_expert_rank_num, out_dtype=out_dtype, comm_quant_mode=comm_quant_mode)
    grp, w = _group(group_ep), ep_world_size
    bs, k = expert_ids.shape
    per, h = moe_expert_num // w, expand_x.shape[1]
    # Expert side: blocks (e, s) in expand_x order; send each source rank its blocks, expert by expert.
    cnt = ep_send_counts.long().view(per, w)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), cnt.reshape(-1).cumsum(0)[:-1]]).view(per, w)
    back = torch.cat([expand_x[offsets[e, s]:offsets[e, s] + cnt[e, s]] for s in range(w) for e in range(per)]
                     ) if cnt.sum() else expand_x[:0]
    s_list = cnt.sum(0).tolist()
    # Token side: the copies this rank sent, in (destination, expert, position) order.
    pos, expert, dest = _copies(expert_ids, x_active_mask, per)
    r_list = torch.bincount(dest, minlength=w).tolist()
    got = expand_x.new_empty(sum(r_list), h)
    dist.all_to_all_single(got, back.contiguous(), r_list, s_list, group=grp)
    scale = expert_scales.float().reshape(-1)[pos]
    out = torch.zeros(bs, h, dtype=torch.float32)
    out.index_add_(0, pos // k, got.float() * scale.unsqueeze(1))
    if shared_expert_x is not None:
        out += shared_expert_x.float()
    return out.to(expand_x.dtype)
