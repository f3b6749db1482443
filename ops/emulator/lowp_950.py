"""Emulated Ascend 950 low-precision paths: FP8-block and MX dynamic quant, FP8 / MXFP8 matmuls, MXFP4 / MXFP8 /
FP8-block grouped matmuls."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4_ascend import quant as _quant

from .numerics import _dtype_arg, _FP8_DTYPES, _group_bounds, _is_e8m0, _mx_scales, _per_group, _rows_of


# Summation order of the FP8-block matmul (npu_quant_matmul group_sizes [1, gn, gk], FP8-block grouped matmul).
# "blockwise" (default) models a block-scaled Cube GEMM: fp32 partial sums per K block, then scaled and summed;
# "dequant" dequantises both operands and runs one fp32 GEMM (the reference's order). Same math; results differ
# only by fp32 rounding order, which the device does not document (verify).
FP8_BLOCK_ACCUMULATION = "blockwise"


def npu_dynamic_block_quant(x: Tensor, *, min_scale=0.0, round_mode="rint", dst_type=1, row_block_size=1,
                            col_block_size=128, dst_type_max=0.0) -> tuple[Tensor, Tensor]:
    """TNPU `npu_dynamic_block_quant` (ops-nn DynamicBlockQuant), FP8 destinations only.

    x [M, N] or [B, M, N] in blocks of row_block_size x col_block_size (edge blocks partial). Per block:
    inf/NaN -> 0 before amax (the CR goldens do this (verify for this op)); scale = max(amax / FP8_MAX,
    min_scale) (the doc writes the reciprocal capped at 1/min_scale), fp32, not rounded; y = fp8(x / scale),
    round-to-nearest-even, saturating (an all-zero block gives scale 0 and y 0). x / scale versus
    x * (FP8_MAX / amax) can differ at an exact tie (verify). Returns (y [x.shape] fp8, scale fp32
    [ceil(M/rb), ceil(N/cb)] or [B, ...]). dst_type: torch.float8_e4m3fn / float8_e5m2 or their codes; the
    default 1 (int8, A2/A3) and HiF8 are not emulated.
    """
    dt = _dtype_arg(dst_type, "npu_dynamic_block_quant dst_type")
    if dt not in _FP8_DTYPES:
        raise NotImplementedError(f"npu_dynamic_block_quant: dst_type {dt} not emulated (float8_e4m3fn, float8_e5m2)")
    if round_mode != "rint":
        raise NotImplementedError("npu_dynamic_block_quant: FP8 destinations take round_mode='rint' only")
    if x.dim() not in (2, 3):
        raise ValueError(f"npu_dynamic_block_quant: x must be 2-D or 3-D, found shape {tuple(x.shape)}")
    rb, cb = row_block_size, col_block_size
    if rb <= 0 or cb <= 0:
        raise ValueError(f"npu_dynamic_block_quant: block sizes must be positive, found {rb} x {cb}")
    qmax = float(dst_type_max) if dst_type_max else float(torch.finfo(dt).max)
    x3 = x.float() if x.dim() == 3 else x.float().unsqueeze(0)
    b, m, n = x3.shape
    mb, nb = -(-m // rb), -(-n // cb)
    xf = torch.nan_to_num(x3, nan=0.0, posinf=0.0, neginf=0.0)
    xp = F.pad(xf, (0, nb * cb - n, 0, mb * rb - m)).view(b, mb, rb, nb, cb)
    s = torch.clamp_min(xp.abs().amax(dim=(2, 4)) / qmax, float(min_scale))  # [b, mb, nb]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    y = _quant.cast_fp8_saturate((xp / safe[:, :, None, :, None]).clamp(-qmax, qmax), dt)
    y = y.view(b, mb * rb, nb * cb)[:, :m, :n].contiguous()
    if x.dim() == 2:
        return y[0], s[0]
    return y, s


def npu_dynamic_mx_quant(input: Tensor, *, axis=-1, round_mode="rint", dst_type=296, block_size=32,  # noqa: A002
                         scale_alg=0, dst_type_max=0.0, max_low_bound=0.0) -> tuple[Tensor, Tensor]:
    """TNPU `npu_dynamic_mx_quant` (ops-nn aclnnDynamicMxQuant), scale_alg 0 (OCP MX v1.0).

    Per block of block_size along `axis` (the last block zero-padded): e8m0 byte = floor(log2 amax) - emax + 127
    clamped to [0, 254] (emax 8 e4m3, 15 e5m2, 2 e2m1; amax 0 -> byte 0; inf/NaN amax -> 255); y = cast(x / 2^(byte
    - 127)), nearest-even and saturating at the format max (|x/scale| reaches ~512 > 448 for e4m3, so the top
    values clamp; saturation rather than NaN is (verify)). Returns (y, mxscale uint8): y has x's shape for FP8
    (float8 dtype) and is uint8 [..., last/2] for dst_type float4_e2m1fn_x2 (296, the default; two e2m1 codes per
    byte along the last dim, low nibble first); mxscale = x's shape with the axis dim -> ceil(ceil(n/bs)/2) plus a
    trailing dim of 2 (block pairs (2j, 2j+1), odd counts padded with byte 0). Other scale_alg / round modes,
    dst_type_max and max_low_bound are not emulated.
    """
    dt = _dtype_arg(dst_type, "npu_dynamic_mx_quant dst_type")
    if dt in _FP8_DTYPES:
        emax = _quant.MX_EMAX[dt]
    elif dt == torch.float4_e2m1fn_x2:
        emax = _quant.MX_EMAX["e2m1"]
    else:
        raise NotImplementedError(f"npu_dynamic_mx_quant: dst_type {dt} not emulated "
                                  "(float8_e4m3fn, float8_e5m2, float4_e2m1fn_x2)")
    if scale_alg != 0 or round_mode != "rint" or dst_type_max or max_low_bound:
        raise NotImplementedError("npu_dynamic_mx_quant: only scale_alg=0, round_mode='rint', dst_type_max=0, "
                                  "max_low_bound=0 are emulated")
    if block_size <= 0 or block_size % 32 or block_size > 1024:
        raise ValueError(f"npu_dynamic_mx_quant: block_size must be a multiple of 32 in [32, 1024], found {block_size}")
    if input.dim() == 0:
        raise ValueError("npu_dynamic_mx_quant: input must have at least one dim")
    d = axis % input.dim()
    xf = input.float().movedim(d, -1)
    k = xf.shape[-1]
    nb = -(-k // block_size)
    xb = F.pad(xf, (0, nb * block_size - k)).unflatten(-1, (nb, block_size))
    byte = _quant.mx_scale_floor(xb.abs().amax(-1), emax)  # [..., nb]
    v = xb / _quant.e8m0_to_float(byte).unsqueeze(-1)
    if dt in _FP8_DTYPES:
        y = _quant.cast_fp8_saturate(v, dt).flatten(-2)[..., :k].movedim(-1, d).contiguous()
    else:
        if input.shape[-1] % 2:
            raise ValueError(f"npu_dynamic_mx_quant: FP4 output needs an even last dim, found {tuple(input.shape)}")
        codes = _quant.fp4_encode(v.clamp(-_quant.FP4_MAX, _quant.FP4_MAX)).flatten(-2)[..., :k].movedim(-1, d)
        y = _quant.pack_fp4(codes.contiguous())
    return y, _quant.e8m0_pairs(byte.movedim(-1, d), d)


def _blocked_fp8_matmul(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, gn: int, gk: int) -> Tensor:
    """fp32 sum over K blocks of a_scale[m, kb] * b_scale[kb, n // gn] * (a[m, kb-block] . b[kb-block, n])."""
    m, k = a.shape
    n = b.shape[1]
    kb = -(-k // gk)
    if tuple(a_scale.shape) != (m, kb) or tuple(b_scale.shape) != (kb, -(-n // gn)):
        raise ValueError(f"FP8 block matmul: expected pertoken_scale {(m, kb)} and scale {(kb, -(-n // gn))} for "
                         f"x1 {(m, k)} / x2 {(k, n)} with group_sizes [1, {gn}, {gk}], found "
                         f"{tuple(a_scale.shape)} / {tuple(b_scale.shape)}")
    if FP8_BLOCK_ACCUMULATION == "dequant":
        ad = a.float() * a_scale.float().repeat_interleave(gk, 1)[:, :k]
        bd = b.float() * b_scale.float().repeat_interleave(gk, 0)[:k].repeat_interleave(gn, 1)[:, :n]
        return F.linear(ad, bd.t())
    ap = F.pad(a.float(), (0, kb * gk - k)).view(m, kb, gk).transpose(0, 1)  # [kb, m, gk]
    bp = F.pad(b.float(), (0, 0, 0, kb * gk - k)).view(kb, gk, n)
    part = torch.bmm(ap, bp)  # per-block partial sums, fp32
    bs = b_scale.float().repeat_interleave(gn, dim=1)[:, :n]
    return (part * a_scale.float().t().unsqueeze(-1) * bs.unsqueeze(1)).sum(0)


def _mx_matmul(a: Tensor, a_pairs: Tensor, b: Tensor, b_pairs: Tensor, block: int = 32) -> Tensor:
    """fp32 sum_k (a[m,k] 2^(sa[m,k/32]-127)) (b[k,n] 2^(sb[k/32,n]-127)); a, b already decoded to fp32."""
    k = a.shape[-1]
    nb = -(-k // block)
    sa = _mx_scales(a_pairs, nb, -1, "per-token MX scale").repeat_interleave(block, -1)[..., :k]
    sb = _mx_scales(b_pairs, nb, -2, "weight MX scale").repeat_interleave(block, -2)[..., :k, :]
    return (a.float() * sa) @ (b.float() * sb)


def _quant_matmul_950(x1: Tensor, x2: Tensor, scale: Tensor, pertoken_scale, bias, output_dtype, scale_dtype,
                      pertoken_scale_dtype, group_sizes) -> Tensor:
    """npu_quant_matmul's FP8 paths: FP8 block (fp32 scales, group_sizes [1, gn, gk]) or MXFP8 (e8m0 pairs)."""
    if x2.dtype not in _FP8_DTYPES or x1.dim() < 2 or x2.dim() != 2:
        raise NotImplementedError(f"npu_quant_matmul: FP8 x1 [..., M, K] with an FP8 x2 [K, N] only, found "
                                  f"{x1.dtype} {tuple(x1.shape)} / {x2.dtype} {tuple(x2.shape)}")
    if output_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise NotImplementedError(f"npu_quant_matmul: FP8 output_dtype {output_dtype} not emulated "
                                  "(bfloat16, float16, float32)")
    if pertoken_scale is None:
        raise ValueError("npu_quant_matmul: the FP8 paths need pertoken_scale (the activation scales)")
    lead, (m, k) = x1.shape[:-2], x1.shape[-2:]
    if x2.shape[0] != k:
        raise ValueError(f"npu_quant_matmul: x1 K={k} but x2 is {tuple(x2.shape)} (expected [K, N])")
    a = x1.reshape(-1, k)
    mx = _is_e8m0(scale, scale_dtype) or _is_e8m0(pertoken_scale, pertoken_scale_dtype)
    gs = list(group_sizes) if group_sizes is not None else None
    if mx:
        if gs not in ([1, 1, 32], [0, 0, 32]) or not (_is_e8m0(scale, scale_dtype)
                                                     and _is_e8m0(pertoken_scale, pertoken_scale_dtype)):
            raise ValueError("npu_quant_matmul: MXFP8 needs group_sizes [1, 1, 32] and e8m0 scale / pertoken_scale "
                             f"(scale_dtype / pertoken_scale_dtype float8_e8m0fnu), found group_sizes {gs}")
        y = _mx_matmul(a, pertoken_scale.reshape(-1, *pertoken_scale.shape[-2:]), x2, scale)
    else:
        if gs is None or len(gs) != 3 or gs[0] != 1:
            raise ValueError(f"npu_quant_matmul: FP8 block scaling needs group_sizes [1, gn, gk], found {gs}")
        y = _blocked_fp8_matmul(a, pertoken_scale.reshape(a.shape[0], -1), x2, scale, gs[1], gs[2])
    if bias is not None:
        y = y + bias.float()
    return y.to(output_dtype).view(*lead, m, x2.shape[1])


def _blocked_fp8_bmm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, gn: int, gk: int) -> Tensor:
    """Batched `_blocked_fp8_matmul`: a [B, M, K], a_scale [B, M, ceil(K/gk)], b [B, K, N], b_scale
    [B, ceil(K/gk), ceil(N/gn)] -> fp32 [B, M, N], in the same summation order (FP8_BLOCK_ACCUMULATION)."""
    bsz, m, k = a.shape
    n = b.shape[-1]
    kb = -(-k // gk)
    if tuple(a_scale.shape) != (bsz, m, kb) or tuple(b_scale.shape) != (bsz, kb, -(-n // gn)):
        raise ValueError(f"FP8 block matmul: expected activation scales {(bsz, m, kb)} and weight scales "
                         f"{(bsz, kb, -(-n // gn))} for x {(bsz, m, k)} / w {tuple(b.shape)} with blocks "
                         f"[1, {gn}, {gk}], found {tuple(a_scale.shape)} / {tuple(b_scale.shape)}")
    bs = b_scale.float().repeat_interleave(gn, dim=-1)[..., :n]  # [B, kb, N]
    if FP8_BLOCK_ACCUMULATION == "dequant":
        ad = a.float() * a_scale.float().repeat_interleave(gk, -1)[..., :k]
        return torch.bmm(ad, b.float() * bs.repeat_interleave(gk, -2)[:, :k])
    ap = F.pad(a.float(), (0, kb * gk - k)).view(bsz, m, kb, gk).transpose(1, 2)  # [B, kb, M, gk]
    bp = F.pad(b.float(), (0, 0, 0, kb * gk - k)).view(bsz, kb, gk, n)
    part = ap @ bp  # [B, kb, M, N] per-block partial sums, fp32
    return (part * a_scale.float().transpose(1, 2).unsqueeze(-1) * bs.unsqueeze(2)).sum(1)


def _grouped_matmul_950(xm: Tensor, w: Tensor, group_list, group_list_type: int, bias, scale, antiquant_scale,
                        per_token_scale, output_dtype, weight_dtype, scale_dtype, per_token_scale_dtype) -> Tensor:
    """npu_grouped_matmul's 950 paths with FP8 x [M, K]: MXFP4 weights (antiquant_scale pairs), MXFP8 or FP8-block
    weights (scale); per group an fp32 accumulation, one cast; rows past the groups are NaN (see the caller)."""
    if output_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise NotImplementedError(f"npu_grouped_matmul: FP8 x needs output_dtype bf16/fp16/fp32, got {output_dtype}")
    if per_token_scale is None:
        raise ValueError("npu_grouped_matmul: FP8 x needs per_token_scale (the activation scales)")
    if group_list is None:
        raise ValueError("npu_grouped_matmul: group_list is required with a stacked weight")
    fp4 = _dtype_arg(weight_dtype, "weight_dtype") == torch.float4_e2m1fn_x2
    if w.dim() != 3:
        raise ValueError(f"npu_grouped_matmul: weight must be stacked [E, K, N] (FP4: [E, K/2, N]), found "
                         f"{tuple(w.shape)}")
    m, k = xm.shape
    e = w.shape[0]
    if w.shape[1] != (k // 2 if fp4 else k):
        want = "K/2 (FP4 x2)" if fp4 else "K"
        raise ValueError(f"npu_grouped_matmul: x has K={k}, weight is {tuple(w.shape)}: expected {want} in dim 1")
    gid = _group_bounds(group_list, group_list_type, e, m)
    pts = per_token_scale[0]
    mx = _is_e8m0(pts, per_token_scale_dtype)
    if fp4:
        if antiquant_scale is None or not mx:
            raise ValueError("npu_grouped_matmul: MXFP4 weights need antiquant_scale=[e8m0 (E, K/64, N, 2)] and "
                             "per_token_scale=[e8m0 (M, K/64, 2)] with per_token_scale_dtype float8_e8m0fnu")
        wscale = antiquant_scale[0]
    else:
        if w.dtype not in _FP8_DTYPES or scale is None:
            raise NotImplementedError("npu_grouped_matmul: FP8 x with an FP8 weight needs scale=[...]; "
                                      "set weight_dtype=float4_e2m1fn_x2 for packed MXFP4 weights")
        wscale = scale[0]
        if mx != _is_e8m0(wscale, scale_dtype):
            raise ValueError("npu_grouped_matmul: MXFP8 needs e8m0 scale and per_token_scale (scale_dtype and "
                             "per_token_scale_dtype float8_e8m0fnu); FP8 block needs fp32 for both")
    # One GEMM per group on its own rows (numerics._per_group): no per-row weight copies.
    def gemm(rows, j):
        wj = _quant.unpack_fp4(w[j].t()).t() if fp4 else w[j]  # packed along K: byte j holds k = 2j (low), 2j + 1
        if fp4 or mx:
            return _mx_matmul(xm[rows], pts[rows], wj, wscale[j])
        return _blocked_fp8_bmm(xm[rows].unsqueeze(0), pts[rows].unsqueeze(0), wj.unsqueeze(0),
                                wscale[j].unsqueeze(0), 128, 128)[0]

    y = _per_group(m, gid, e, gemm)
    if bias is not None:
        y = y + _rows_of(bias[0].float(), gid, e)
    nan = torch.full((), float("nan"), dtype=output_dtype, device=xm.device)
    return torch.where((gid < e).unsqueeze(-1), y.to(output_dtype), nan)
