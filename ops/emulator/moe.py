"""Emulated MoE routing ops: init routing, finalize routing, gating top-k and the dequant-SwiGLU-clamp-quant step."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .numerics import _group_bounds, _per_row_int8, _rows_of


# ---- MoE routing -------------------------------------------------------------------------------------------------
def npu_moe_init_routing_v2(x: Tensor, expert_idx: Tensor, *, scale=None, offset=None, active_num=-1,
                            expert_capacity=-1, expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0,
                            expert_tokens_num_flag=False, quant_mode=-1, active_expert_range=[],  # noqa: B006
                            row_idx_type=0, x_dtype=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TNPU `npu_moe_init_routing_v2` (TNPU doc; OT moe_init_routing_v2 README and gather-out kernel).

    Dropless mode (drop_pad_mode 0) only. The (token i, slot k) copies are flattened token-major (src = i*K + k)
    and key-value sorted by expert, stable in src (verify: tie order). Outputs:
    - expanded_x [R, H]: row r = x[sorted_src[r] // K]; R = N*K (or active_num when smaller and > 0). With
      quant_mode 1, per-row dynamic int8 of x (times the expert's smooth row of `scale` [E_range, H] if given)
      and expanded_scale fp32 [R]; quant_mode -1 keeps x's dtype and expanded_scale is `scale[src // K]` when a
      [N] scale is given, else zeros (documented as undefined).
    - expanded_row_idx int32 [N*K]: row_idx_type 0 (the doc's "gather" index: finalize gathers expanded rows
      through it; valid and -1 entries interleaved) = expanded_row_idx[src] = destination row; row_idx_type 1
      (the doc's "scatter" index; the first available entries valid, the rest undefined) = expanded_row_idx[r] =
      src (verify). Copies whose expert falls outside active_expert_range get -1 (type 0) and are not in
      expanded_x.
    - expert_tokens_count_or_cumsum int64 [E_range]: counts (expert_tokens_num_type 1) or cumsum (0).
    expert_tokens_num_flag must be True (the doc: "currently only True"; the meta function then gives the
    count); x_dtype (HiF8 / FP4 / int4 inputs) must be None.
    """
    if not expert_tokens_num_flag:
        raise NotImplementedError("npu_moe_init_routing_v2: expert_tokens_num_flag=False is documented as "
                                  "unsupported (the device then returns no token counts); pass True")
    if x_dtype is not None:
        raise NotImplementedError(f"npu_moe_init_routing_v2: x_dtype={x_dtype!r} (HiF8 / FP4 / int4 x) not emulated")
    if drop_pad_mode != 0 or expert_capacity not in (-1, 0) or offset is not None:
        raise NotImplementedError("npu_moe_init_routing_v2: only dropless mode without offset is emulated")
    if quant_mode not in (-1, 1):
        raise NotImplementedError(f"npu_moe_init_routing_v2: quant_mode {quant_mode} not emulated")
    n, k = expert_idx.shape
    # expert_num <= 0 (unknown count) derives it from the ids: a host read, so callers that compile pass it.
    e_total = expert_num if expert_num > 0 else int(expert_idx.max()) + 1
    lo, hi = (active_expert_range or [0, e_total])
    flat = expert_idx.reshape(-1).long()
    keep = (flat >= lo) & (flat < hi)
    key = torch.where(keep, flat, torch.full_like(flat, hi))  # out-of-range copies sort last and are dropped
    sorted_key, order = torch.sort(key, stable=True)  # sorted position -> src
    rows = n * k if active_num is None or active_num <= 0 else min(n * k, active_num)
    src_sorted = order[:rows]
    # Kept copies form a prefix of the sorted order (their keys are < hi); everything is static-shape tensor
    # math, no count is read on the host.
    valid = sorted_key[:rows] < hi
    pos = torch.arange(rows, device=x.device)
    dst_of_src = torch.full((n * k,), -1, dtype=torch.int64, device=x.device)
    dst_of_src = dst_of_src.scatter(0, src_sorted, torch.where(valid, pos, torch.full_like(pos, -1)))
    counts = torch.zeros(hi - lo, dtype=torch.int64, device=x.device).scatter_add(
        0, torch.where(keep, flat - lo, torch.zeros_like(flat)), keep.long())
    tok = src_sorted // k
    xe = x[tok]
    if quant_mode == 1:
        xf = xe.float()
        if scale is not None:
            xf = xf * scale.float()[(flat[src_sorted] - lo).clamp(0, hi - lo - 1)]
        expanded_x, expanded_scale = _per_row_int8(xf)
    else:
        expanded_x = xe.clone()
        expanded_scale = (scale.float()[tok] if scale is not None and scale.dim() == 1
                          else torch.zeros(rows, dtype=torch.float32, device=x.device))
    # tail rows hold dropped copies: garbage on the device, zeroed here
    expanded_x = torch.where(valid.unsqueeze(-1), expanded_x, torch.zeros((), dtype=expanded_x.dtype,
                                                                           device=x.device))
    if row_idx_type == 0:
        row_idx = dst_of_src
    elif row_idx_type == 1:
        row_idx = torch.full((n * k,), -1, dtype=torch.int64, device=x.device)
        row_idx[:rows] = torch.where(valid, src_sorted, torch.full_like(src_sorted, -1))
    else:
        raise ValueError(f"row_idx_type must be 0 or 1, found {row_idx_type}")
    if expert_tokens_num_type == 1:
        tokens = counts
    elif expert_tokens_num_type == 0:
        tokens = counts.cumsum(0)
    else:
        raise NotImplementedError("expert_tokens_num_type 2 (key-value) not emulated")
    return expanded_x, row_idx.to(torch.int32), tokens, expanded_scale


def npu_moe_finalize_routing(expanded_permuted_rows: Tensor, skip1, skip2, bias, scales, expanded_src_to_dst_row,
                             export_for_source_row, drop_pad_mode=0, k=1) -> Tensor:
    """TNPU `npu_moe_finalize_routing` (OT MoeFinalizeRouting README, TNPU meta function).

    out[i] = skip1[i] + skip2[i] + sum_k scales[i,k] * (rows[idx(i,k)] + bias[expert(i,k)]), fp32 accumulation,
    output in the rows' dtype. idx(i,k) = expanded_src_to_dst_row[i + k*N] for drop_pad_mode 0/1 (documented,
    column-major) and [i*K + k] for 2/3 (token-major, matching init_routing_v2's src order; verify).
    Missing scales count as 1. N and K as in torch_npu's meta function: from scales [N, K] when given (k is then
    ignored), else K = k and N = len(expanded_src_to_dst_row) // k; an export_for_source_row of another [N, K]
    is an error (it catches a caller that forgot k).
    """
    rows = expanded_permuted_rows
    if scales is not None:
        n, k = scales.shape
    else:
        if k is None or k <= 0:
            raise ValueError(f"npu_moe_finalize_routing: k must be > 0 without scales, found {k}")
        n = expanded_src_to_dst_row.numel() // k
    if export_for_source_row is not None and tuple(export_for_source_row.shape) != (n, k):
        raise ValueError(f"npu_moe_finalize_routing: export_for_source_row {tuple(export_for_source_row.shape)} is "
                         f"not [N, K] = [{n}, {k}] (pass k = top-k when scales is None)")
    src = torch.arange(n * k, device=rows.device)
    i, kk = src // k, src % k
    flat = i + kk * n if drop_pad_mode in (0, 1) else src
    dst = expanded_src_to_dst_row.long()[flat].view(n, k)
    gathered = rows.float()[dst.clamp(min=0)]  # [N, K, H]
    if bias is not None:
        gathered = gathered + bias.float()[export_for_source_row.long()]
    w = scales.float().unsqueeze(-1) if scales is not None else torch.ones(n, k, 1, device=rows.device)
    w = torch.where((dst >= 0).unsqueeze(-1), w, torch.zeros_like(w))
    out = (gathered * w).sum(1)
    for s in (skip1, skip2):
        if s is not None:
            out = out + s.float()
    return out.to(rows.dtype)


def npu_moe_gating_top_k(x: Tensor, k: int, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                         routed_scaling_factor=1.0, eps=1e-20, group_select_mode=0, renorm=0, norm_type=0,
                         out_flag=False) -> tuple[Tensor, Tensor, Tensor]:
    """CR custom `npu_moe_gating_top_k` (MoeGatingTopKHash; CR op doc). The built-in of the same name shares the
    shape contract but documents norm_type 0/1 only (verify 2 on the device).

    s = softmax(x) (norm_type 0), sigmoid(x) (1) or sqrt(softplus(x)) (2), in fp32. Experts: tid2eid[input_ids]
    when both are given (hash routing), else top-k of s + bias (descending; ties to the lower expert id).
    y = s at those experts (no bias); for norm_type != 0 divided by (sum + eps); times routed_scaling_factor.
    Returns (y in x.dtype [T,k], expert_idx int32 [T,k], s fp32 [T,E] (norm_out, meaningful with out_flag)).
    Grouped selection (k_group/group_count > 1) and renorm=1 are not emulated. group_select_mode (0: a group
    scores its max expert, 1: the sum of its top two; Huawei's V4 port passes 1) picks among groups, so with one
    group both modes select every expert.
    """
    if k_group != 1 or group_count != 1 or renorm != 0:
        raise NotImplementedError("npu_moe_gating_top_k: only k_group=group_count=1, renorm=0 is emulated")
    if group_select_mode not in (0, 1):
        raise ValueError(f"group_select_mode must be 0 or 1, found {group_select_mode}")
    xf = x.float()
    if norm_type == 0:
        s = torch.softmax(xf, dim=-1)
    elif norm_type == 1:
        s = torch.sigmoid(xf)
    elif norm_type == 2:
        s = F.softplus(xf).sqrt()
    else:
        raise ValueError(f"norm_type must be 0, 1 or 2, found {norm_type}")
    if (input_ids is None) != (tid2eid is None):
        raise ValueError("input_ids and tid2eid must be given together")
    if input_ids is not None:
        idx = tid2eid[input_ids.long()].long()
    else:
        sel = s if bias is None else s + bias.float()
        idx = torch.sort(sel, dim=-1, descending=True, stable=True).indices[..., :k]
    y = s.gather(-1, idx)
    if norm_type != 0:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    return y.to(x.dtype), idx.to(torch.int32), s


def npu_dequant_swiglu_clamp_quant(x: Tensor, *, weight_scale=None, activation_scale=None, bias=None,
                                   quant_scale=None, quant_offset=None, group_index=None, activate_left=False,
                                   quant_mode=0, dst_type=None, round_mode=None, activate_dim=None, swiglu_mode=0,
                                   clamp_limit=7.0, glu_alpha=1.702, glu_bias=1.0) -> tuple[Tensor, Tensor]:
    """CR custom `npu_dequant_swiglu_clamp_quant` (CR op doc), the dynamic-quant (quant_mode=1) form.

    x int32 [M, 2I] (GMM1 accumulators). deq = x * weight_scale[e(m)] * activation_scale[m] in fp32, with
    e(m) the group of row m from group_index (counts) or a single weight_scale [2I] row. x bf16/fp16 (GMM1 output
    already dequantised, as the A8W4 grouped matmul gives): no scales (documented for the built-in
    npu_dequant_swiglu_quant: x int32 or bfloat16, scales required only for int32; same for the custom op (verify)),
    and group_index only bounds the valid rows. With activate_left the activated half is the left one:
    A = deq[:, :I], B = deq[:, I:] (else swapped). swiglu_mode 1 (V4 clamp):
    A = min(A, L), B = clamp(B, -L, L), out = A * sigmoid(glu_alpha * A) * (B + glu_bias); swiglu_mode 0:
    out = silu(A) * B. Then out * quant_scale (smooth, if given) and per-row int8 (scale = rowmax/127, rint,
    saturate). Rows past sum(group_index) are left as zeros (untouched on the device).
    """
    if quant_mode != 1 or quant_offset is not None or bias is not None:
        raise NotImplementedError("npu_dequant_swiglu_clamp_quant: only quant_mode=1 without offset/bias emulated")
    if x.dtype == torch.int32:
        if weight_scale is None or activation_scale is None:
            raise ValueError("npu_dequant_swiglu_clamp_quant: int32 x (GMM accumulators) needs weight_scale and "
                             "activation_scale")
    elif x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"npu_dequant_swiglu_clamp_quant: x must be int32, bfloat16 or float16, found {x.dtype}")
    m, two_i = x.shape
    half = two_i // 2
    deq = x.float()
    # Row groups from the counts by tensor ops (no host read, so the op traces); rows past sum(group_index) are
    # masked to zero at the end.
    gid = None if group_index is None else _group_bounds(group_index, 1, group_index.shape[0], m)
    if weight_scale is not None:
        ws = weight_scale.float()
        if ws.dim() == 1:
            deq = deq * ws
        else:
            if gid is None:
                raise ValueError("a per-expert weight_scale needs group_index")
            deq = deq * _rows_of(ws, gid, ws.shape[0])
    if activation_scale is not None:
        deq = deq * activation_scale.float().unsqueeze(-1)
    a, b = (deq[:, :half], deq[:, half:]) if activate_left else (deq[:, half:], deq[:, :half])
    if swiglu_mode == 1:
        a = a.clamp(max=clamp_limit)
        b = b.clamp(-clamp_limit, clamp_limit)
        out = a * torch.sigmoid(glu_alpha * a) * (b + glu_bias)
    elif swiglu_mode == 0:
        out = F.silu(a) * b
    else:
        raise ValueError(f"swiglu_mode must be 0 or 1, found {swiglu_mode}")
    if quant_scale is not None:  # smooth scales: [I] for every row, or [E, I] per group (group_index)
        qs = quant_scale.float()
        if qs.dim() > 1:
            if gid is None:
                raise ValueError("npu_dequant_swiglu_clamp_quant: a per-group quant_scale [E, I] needs group_index")
            qs = _rows_of(qs, gid, qs.shape[0])
        out = out * qs
    q, s = _per_row_int8(out)
    if gid is not None and (weight_scale is None or weight_scale.dim() > 1):
        valid = gid < group_index.shape[0]
        q = torch.where(valid.unsqueeze(-1), q, torch.zeros((), dtype=q.dtype, device=x.device))
        s = torch.where(valid, s, torch.zeros((), dtype=s.dtype, device=x.device))
    return q, s
