"""Emulated GEMMs: transpose (quant) batch matmul, dynamic int8 quant, quant matmul, grouped matmul (float, int8,
A8W4 with int4 weight packing)."""
from __future__ import annotations

import torch
from torch import Tensor

from dsv4_ascend import quant as _quant

from .numerics import (_checking_values, _dtype_arg, _FP8_DTYPES, _group_bounds, _int_matmul, _is_e8m0, _per_group,
                       _per_row_int8, _rows_of)
from .lowp_950 import _grouped_matmul_950, _mx_matmul, _quant_matmul_950


# ---- dense GEMMs -------------------------------------------------------------------------------------------------
def npu_transpose_batchmatmul(input: Tensor, weight: Tensor, *, bias=None, scale=None, perm_x1=None,  # noqa: A002
                              perm_x2=None, perm_y=None, batch_split_factor=1) -> Tensor:
    """TNPU `npu_transpose_batchmatmul`: 3-D operands; perm_x1 ((0, 1, 2) or (1, 0, 2), default the first)
    brings input to [B,M,K], perm_x2 ((0, 1, 2) or (0, 2, 1)) the weight to [B,K,N]; y = bmm (fp32
    accumulation) permuted by perm_y, which must be (1, 0, 2) (also its default, as in torch_npu's meta function):
    output [M, B, N] in input.dtype. Only the float path (no quant `scale`, no bias, batch_split_factor 1)."""
    if scale is not None or bias is not None or batch_split_factor != 1:
        raise NotImplementedError("npu_transpose_batchmatmul: only the plain float path is emulated")
    if input.dim() != 3 or weight.dim() != 3:
        raise ValueError("npu_transpose_batchmatmul expects 3-D input and weight")
    perm_x1, perm_x2, perm_y = (tuple(perm_x1 or (0, 1, 2)), tuple(perm_x2 or (0, 1, 2)),
                                tuple(perm_y or (1, 0, 2)))
    if perm_x1 not in ((0, 1, 2), (1, 0, 2)) or perm_x2 not in ((0, 1, 2), (0, 2, 1)) or perm_y != (1, 0, 2):
        raise ValueError(f"npu_transpose_batchmatmul: perm_x1 must be (0, 1, 2) or (1, 0, 2), perm_x2 (0, 1, 2) or "
                         f"(0, 2, 1) and perm_y (1, 0, 2), found {perm_x1} / {perm_x2} / {perm_y}")
    a = input.permute(*perm_x1).float()
    b = weight.permute(*perm_x2).float()
    y = torch.bmm(a, b)
    return y.permute(*perm_y).to(input.dtype)


def npu_transpose_quant_batchmatmul(x1: Tensor, x2: Tensor, dtype, *, bias=None, x1_scale=None, x2_scale=None,
                                    group_sizes=None, perm_x1=None, perm_x2=None, perm_y=None, batch_split_factor=1,
                                    x1_dtype=None, x2_dtype=None) -> Tensor:
    """TNPU `npu_transpose_quant_batchmatmul` (950 only; aclnnTransposeQuantBatchMatMul): quantised
    batched matmul, x1 (M, B, K) with perm_x1 (1, 0, 2) -> [B, M, K]; x2 (B, K, N) with perm_x2 (0, 1, 2) or
    (B, N, K) with (0, 2, 1); y = ((x1 @ x2) * x2_scale * x1_scale) in fp32, cast once to `dtype` (fp16 / bf16),
    returned (M, B, N) (perm_y (1, 0, 2)). Defaults of the perms are those values. Modes:
    - MX (MXFP8): x1, x2 float8_e4m3fn; x1_scale e8m0 pairs (M, B, K/64, 2); x2_scale e8m0 pairs (B, K/64, N, 2)
      (perm_x2 (0, 1, 2)) or (B, N, K/64, 2) (perm_x2 (0, 2, 1)); one scale per 32 along K; K % 64 == 0;
      group_sizes [gm, gn, 32] with gm, gn in {0, 1}.
    - K-C: x1, x2 e4m3fn / e5m2; x1_scale fp32 (M,) per token, x2_scale fp32 (N,) per channel (shared by every
      batch); documented for K = 512, N = 128 and perm_x2 (0, 1, 2) only; group_sizes ignored.
    bias is reserved (must be None), batch_split_factor must be 1. T-C (HiF8) and FP4 inputs are not emulated.
    """
    out_dt = _dtype_arg(dtype, "npu_transpose_quant_batchmatmul dtype")
    if out_dt not in (torch.float16, torch.bfloat16):
        raise ValueError(f"npu_transpose_quant_batchmatmul: dtype must be torch.float16 or torch.bfloat16, found "
                         f"{dtype!r}")
    if bias is not None or batch_split_factor != 1:
        raise ValueError("npu_transpose_quant_batchmatmul: bias is reserved (None) and batch_split_factor must be 1")
    perm_x1, perm_x2, perm_y = (tuple(perm_x1 or (1, 0, 2)), tuple(perm_x2 or (0, 1, 2)),
                                tuple(perm_y or (1, 0, 2)))
    if perm_x1 != (1, 0, 2) or perm_y != (1, 0, 2) or perm_x2 not in ((0, 1, 2), (0, 2, 1)):
        raise ValueError(f"npu_transpose_quant_batchmatmul: perm_x1 / perm_y must be (1, 0, 2) and perm_x2 (0, 1, 2) "
                         f"or (0, 2, 1), found {perm_x1} / {perm_y} / {perm_x2}")
    views = []
    for name, t, declared in (("x1", x1, x1_dtype), ("x2", x2, x2_dtype)):
        want = _dtype_arg(declared, f"{name}_dtype")
        if want is not None and t.dtype in (torch.uint8, torch.int8) and want in _FP8_DTYPES:
            t = t.view(want)  # FP8 carried in a byte tensor, its dtype given by x*_dtype
        if t.dtype not in _FP8_DTYPES or (want is not None and t.dtype != want):
            raise NotImplementedError(f"npu_transpose_quant_batchmatmul: {name} must be float8_e4m3fn / float8_e5m2 "
                                      f"(HiF8 / FP4 not emulated), found {t.dtype} (declared {declared!r})")
        if t.dim() != 3:
            raise ValueError(f"npu_transpose_quant_batchmatmul: {name} must be 3-D, found shape {tuple(t.shape)}")
        views.append(t)
    x1, x2 = views
    a = x1.permute(1, 0, 2)  # [B, M, K]
    b = x2.permute(*perm_x2)  # [B, K, N]
    bsz, m, k = a.shape
    n = b.shape[2]
    if b.shape[:2] != (bsz, k):
        raise ValueError(f"npu_transpose_quant_batchmatmul: x1 {tuple(x1.shape)} (M, B, K) and x2 {tuple(x2.shape)} "
                         f"with perm_x2 {perm_x2} do not share B and K")
    if x1_scale is None or x2_scale is None:
        raise ValueError("npu_transpose_quant_batchmatmul: x1_scale and x2_scale are required (K-C or MX mode)")
    if _is_e8m0(x1_scale, None) or _is_e8m0(x2_scale, None):  # MX
        if x1.dtype != torch.float8_e4m3fn or x2.dtype != torch.float8_e4m3fn:
            raise ValueError(f"npu_transpose_quant_batchmatmul: MX mode takes float8_e4m3fn x1 / x2, found "
                             f"{x1.dtype} / {x2.dtype}")
        gs = None if group_sizes is None else [int(v) for v in group_sizes]
        if gs is None or len(gs) != 3 or gs[0] not in (0, 1) or gs[1] not in (0, 1) or gs[2] != 32:
            raise ValueError(f"npu_transpose_quant_batchmatmul: MX mode needs group_sizes [0|1, 0|1, 32], found {gs}")
        if k % 64:
            raise ValueError(f"npu_transpose_quant_batchmatmul: MX mode needs K % 64 == 0, found K = {k}")
        s2_want = (bsz, k // 64, n, 2) if perm_x2 == (0, 1, 2) else (bsz, n, k // 64, 2)
        if tuple(x1_scale.shape) != (m, bsz, k // 64, 2) or tuple(x2_scale.shape) != s2_want:
            raise ValueError(f"npu_transpose_quant_batchmatmul: MX scales must be x1_scale {(m, bsz, k // 64, 2)} and "
                             f"x2_scale {s2_want}, found {tuple(x1_scale.shape)} / {tuple(x2_scale.shape)}")
        if not (_is_e8m0(x1_scale, None) and _is_e8m0(x2_scale, None)):
            raise ValueError("npu_transpose_quant_batchmatmul: MX mode takes float8_e8m0fnu x1_scale and x2_scale")
        s2 = x2_scale if perm_x2 == (0, 1, 2) else x2_scale.permute(0, 2, 1, 3)  # [B, K/64, N, 2]
        y = _mx_matmul(a, x1_scale.permute(1, 0, 2, 3), b, s2)  # [B, M, N] fp32
    else:  # K-C
        if x1_scale.dtype != torch.float32 or x2_scale.dtype != torch.float32:
            raise ValueError(f"npu_transpose_quant_batchmatmul: K-C mode takes fp32 scales (MX mode float8_e8m0fnu), "
                             f"found {x1_scale.dtype} / {x2_scale.dtype}")
        if tuple(x1_scale.shape) != (m,) or tuple(x2_scale.shape) != (n,):
            raise ValueError(f"npu_transpose_quant_batchmatmul: K-C scales must be x1_scale ({m},) and x2_scale "
                             f"({n},), found {tuple(x1_scale.shape)} / {tuple(x2_scale.shape)}")
        if k != 512 or n != 128 or perm_x2 != (0, 1, 2):
            raise ValueError(f"npu_transpose_quant_batchmatmul: K-C mode is documented for K = 512, N = 128, perm_x2 "
                             f"(0, 1, 2) only, found K = {k}, N = {n}, perm_x2 {perm_x2}")
        y = torch.bmm(a.float(), b.float()) * x2_scale.view(1, 1, n) * x1_scale.view(1, m, 1)
    return y.to(out_dt).permute(1, 0, 2)


def npu_dynamic_quant(input: Tensor, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                      dst_type_max=0.0) -> tuple[Tensor, Tensor]:
    """TNPU `npu_dynamic_quant`: per-token symmetric int8 over the last dim.

    x' = x * smooth_scales (if given, [H]); scale = rowmax|x'| / 127 (fp32, shape x.shape[:-1]);
    y = rint(x' / scale) saturated to [-128, 127], int8. Round-half-even and division (vs multiply by 127/amax)
    are assumptions (verify). group_index (MoE per-expert smooth rows) and non-int8 dst_type are not emulated.
    """
    if dst_type not in (None, torch.int8) or quant_mode != "pertoken" or group_index is not None:
        raise NotImplementedError("npu_dynamic_quant: only per-token int8 without group_index is emulated")
    xf = input.float()
    if smooth_scales is not None:
        xf = xf * smooth_scales.float()
    return _per_row_int8(xf)


def npu_quant_matmul(x1: Tensor, x2: Tensor, scale: Tensor, *, offset=None, pertoken_scale=None, bias=None,
                     output_dtype=None, x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None,
                     group_sizes=None, y_scale=None) -> Tensor:
    """TNPU `npu_quant_matmul`, W8A8 int8: x1 int8 [..., M, K] @ x2 int8 [K, N] with exact int32
    accumulation. output_dtype=int32: the raw accumulators (scale ignored). output_dtype bf16/fp16/fp32:
    y = acc * scale[N] * pertoken_scale[M] (+ bias) in fp32, cast once. The int8-output requant path
    (output_dtype None, uint64 scale) is not emulated.

    950 (FP8 x1 [..., M, K] @ FP8 x2 [K, N], fp32 accumulation, one cast to output_dtype; `_quant_matmul_950`):
    FP8 block, group_sizes [1, gn, gk] (CR: [1, 128, 128]): pertoken_scale fp32 [M, ceil(K/gk)], scale fp32
    [ceil(K/gk), ceil(N/gn)], y = sum_kb pts[m, kb] * scale[kb, n // gn] * (x1 . x2 over block kb).
    MXFP8, group_sizes [1, 1, 32] with scale_dtype = pertoken_scale_dtype = float8_e8m0fnu: pertoken_scale e8m0
    pairs [M, K/64, 2], scale e8m0 pairs [K/64, N, 2]; y = sum_k x1 2^(sx[m, k/32] - 127) x2 2^(sw[k/32, n] - 127).
    """
    if x1.dtype in _FP8_DTYPES:
        return _quant_matmul_950(x1, x2, scale, pertoken_scale, bias, output_dtype, scale_dtype,
                                 pertoken_scale_dtype, group_sizes)
    if x1.dtype != torch.int8 or x2.dtype != torch.int8:
        raise NotImplementedError("npu_quant_matmul: only int8 x int8 is emulated")
    if offset is not None or group_sizes is not None or y_scale is not None:
        raise NotImplementedError("npu_quant_matmul: offset / group_sizes / y_scale not emulated")
    if output_dtype is None or output_dtype == torch.int8:
        raise NotImplementedError("npu_quant_matmul: int8 (requant) output not emulated; pass output_dtype")
    acc = _int_matmul(x1, x2)
    if output_dtype == torch.int32:
        return acc
    y = acc.float() * scale.float()
    if pertoken_scale is not None:
        y = y * pertoken_scale.float().unsqueeze(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(output_dtype)


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, tuning_config=None, output_dtype=None, x_dtype=None,
                       weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None) -> list[Tensor]:
    """TNPU `npu_grouped_matmul` in the MoE form (aclnnGroupedMatmulV5): one x [M, K], one weight [E, K, N],
    group_type 0 (split M), split_item 2/3 (one output [M, N]); group_list int64 [E] = counts (group_list_type=1)
    or cumsum (0). Rows past the last group are not computed: the emulator fills them with NaN (float) / INT32_MIN so a
    caller that reads them fails loudly (the device leaves garbage).

    float path: fp32 accumulation, output x.dtype (bias [E, N] added per group).
    int8 path (W8A8): exact int32 accumulation; output_dtype int32 -> raw accumulators; output_dtype bf16/fp16
    -> acc * scale[e, n] * per_token_scale[m], cast once. Weight-only (antiquant) paths are not emulated.
    A8W4 (int8 x, int4 weight packed in int32 [E, K, N/8], uint64 scale, assistance bias; A2/A3 W4A8 experts):
    `_grouped_matmul_a8w4`.

    950 (FP8 x [M, K], output_dtype required; `_grouped_matmul_950`): MXFP4 weights ("W4A8 MX") with
    weight_dtype=float4_e2m1fn_x2: weight uint8 [E, K/2, N] (the `.transpose(1, 2)` view of the checkpoint's
    [E, N, K/2], packed along K, low nibble = even k), antiquant_scale=[e8m0 (E, K/64, N, 2)], per_token_scale=
    [e8m0 (M, K/64, 2)], per_token_scale_dtype=float8_e8m0fnu; MXFP8 weights fp8 [E, K, N] with scale=[e8m0
    (E, K/64, N, 2)], scale_dtype=float8_e8m0fnu; FP8 block weights fp8 [E, K, N] with scale=[fp32
    (E, K/128, N/128)], per_token_scale=[fp32 (M, K/128)]. fp32 accumulation, one cast.
    """
    if x and x[0].dtype in _FP8_DTYPES:
        if len(x) != 1 or len(weight) != 1 or split_item not in (2, 3) or group_type not in (None, 0):
            raise NotImplementedError("npu_grouped_matmul: only single x / single stacked weight, split_item 2|3, "
                                      "group_type 0 is emulated")
        if offset is not None or antiquant_offset is not None or activation_input is not None or act_type != 0:
            raise NotImplementedError("npu_grouped_matmul: offsets / fused activation not emulated on FP8 x")
        return [_grouped_matmul_950(x[0], weight[0], group_list, group_list_type, bias, scale, antiquant_scale,
                                    per_token_scale, output_dtype, weight_dtype, scale_dtype, per_token_scale_dtype)]
    if len(x) != 1 or len(weight) != 1 or split_item not in (2, 3) or group_type not in (None, 0):
        raise NotImplementedError("npu_grouped_matmul: only single x / single stacked weight, split_item 2|3, "
                                  "group_type 0 is emulated")
    if antiquant_scale is not None or offset is not None or activation_input is not None or act_type != 0:
        raise NotImplementedError("npu_grouped_matmul: antiquant / offset / fused activation not emulated")
    xm, w = x[0], weight[0]
    if xm.dtype == torch.int8 and w.dtype == torch.int32 and weight_dtype is None:  # A8W4: int4 packed in int32
        return [_grouped_matmul_a8w4(xm, w, group_list, group_list_type, bias, scale, per_token_scale, output_dtype)]
    if w.dim() != 3:
        raise ValueError("npu_grouped_matmul: weight must be stacked [E, K, N]")
    e = w.shape[0]
    if group_list is None:
        raise ValueError("npu_grouped_matmul: group_list is required with a stacked weight")
    gid = _group_bounds(group_list, group_list_type, e, xm.shape[0])
    quant = xm.dtype == torch.int8
    if quant != (w.dtype == torch.int8):
        raise NotImplementedError("npu_grouped_matmul: mixed int8/float operands not emulated")
    if quant:
        out_dt = output_dtype or torch.int32
        if out_dt not in (torch.int32, torch.bfloat16, torch.float16, torch.float32):
            raise NotImplementedError(f"npu_grouped_matmul: int8 output dtype {out_dt} not emulated")
        if out_dt != torch.int32 and scale is None:
            raise ValueError("npu_grouped_matmul: int8 with a float output needs `scale`")
    else:
        out_dt = output_dtype or xm.dtype
    # One GEMM per group on its own rows (numerics._per_group): no per-row weight copies.
    if quant:  # exact int32 accumulators (fp64 holds every partial sum exactly), one fp64 weight copy per group
        y = _per_group(xm.shape[0], gid, e, lambda rows, j: _int_matmul(xm[rows], w[j]))
        if out_dt != torch.int32:
            y = y.float() * _rows_of(scale[0].float(), gid, e)
            if per_token_scale is not None:
                y = y * per_token_scale[0].float().unsqueeze(-1)
    elif xm.dtype in (torch.bfloat16, torch.float16) and w.dtype == xm.dtype == out_dt:
        # 16-bit operands: torch's 16-bit CPU matmul accumulates in fp32 (the documented semantics), rounded once.
        # Row by row within the group ([1, K] @ [K, N], the group's weight read in place): the product the
        # reference backend's decode forms per row, so the two round alike (a multi-row GEMM sums in another fp32
        # order and moved the tiny model's bf16 decode parity to cosine 0.999889).
        def rows_16bit(rows, j):
            xs, wj = xm[rows], w[j]
            return torch.cat([torch.mm(xs[i:i + 1], wj) for i in range(xs.shape[0])]) if xs.shape[0] else \
                xs.new_zeros((0, wj.shape[1]))

        y = _per_group(xm.shape[0], gid, e, rows_16bit).float()
    else:
        y = _per_group(xm.shape[0], gid, e, lambda rows, j: xm[rows].float() @ w[j].float())
    if bias is not None and out_dt != torch.int32:
        y = y + _rows_of(bias[0].float(), gid, e)
    fill = torch.iinfo(torch.int32).min if out_dt == torch.int32 else float("nan")
    out = torch.where((gid < e).unsqueeze(-1), y.to(out_dt), torch.full((), fill, dtype=out_dt, device=xm.device))
    return [out]


# ---- Atlas A2/A3 W4A8: int4 weights for the A8W4 grouped matmul (aclnnGroupedMatmulV5 A8W4) --------------------------
def npu_convert_weight_to_int4pack(weight: Tensor, inner_k_tiles: int = 0) -> Tensor:
    """TNPU `npu_convert_weight_to_int4pack(weight, inner_k_tiles=0) -> Tensor` (op-plugin doc,
    aclnnConvertWeightToINT4Pack): eight int4 values per int32, ND output.

    weight int32 [k, n] (or [n, k]), contiguous, every value in the int4 range [-8, 7], last dim a multiple of 8
    -> int32 [k, n/8]: element 8i+j of a row in bits 4j..4j+3 of word i (quant.pack_int4, the layout the
    converter writes). inner_k_tiles is documented as reserved and unused.
    """
    if not isinstance(weight, Tensor) or weight.dtype != torch.int32:
        found = weight.dtype if isinstance(weight, Tensor) else type(weight).__name__
        raise TypeError(f"npu_convert_weight_to_int4pack: weight must be int32 holding int4 values, found {found}")
    if weight.dim() != 2:
        raise ValueError(f"npu_convert_weight_to_int4pack: weight must be 2-D, found shape {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError("npu_convert_weight_to_int4pack: non-contiguous weight is not supported (documented)")
    if weight.shape[-1] % 8:
        raise ValueError(f"npu_convert_weight_to_int4pack: last dim must be a multiple of 8, found "
                         f"{tuple(weight.shape)}")
    if weight.numel() and (int(weight.min()) < -8 or int(weight.max()) > 7):
        raise ValueError(f"npu_convert_weight_to_int4pack: values must be in the int4 range [-8, 7], found "
                         f"[{int(weight.min())}, {int(weight.max())}]")
    return _quant.pack_int4(weight)


def _a8w4_scale(scale: Tensor, e: int, k: int, n: int) -> Tensor:
    """fp32 [E, G, N] from the A8W4 scale operand: uint64 (carried in int64) [E, N] or [E, G, N], G | K.

    CR's layout (quant.a8w4_scale_u64): the fp32 bits in the low 32 bits, high 32 bits zero. Anything in the high
    half (e.g. npu_trans_quant_param's bit 46 + fp19 deq-scale format) is a layout the emulator does not know.
    """
    if scale.dtype != torch.int64 and scale.dtype != getattr(torch, "uint64", None):
        raise TypeError(f"npu_grouped_matmul (A8W4): scale must be uint64 carried in int64, found {scale.dtype} "
                        "(see quant.a8w4_scale_u64)")
    s = scale.view(torch.int64)
    if s.dim() == 2:
        s = s.unsqueeze(1)
    if s.dim() != 3 or s.shape[0] != e or s.shape[2] != n or s.shape[1] == 0 or k % s.shape[1]:
        raise ValueError(f"npu_grouped_matmul (A8W4): scale must be [E, N] or [E, G, N] with G dividing K "
                         f"(E={e}, K={k}, N={n}), found {tuple(scale.shape)}")
    if _checking_values() and bool(((s < 0) | (s >= 2**32)).any()):
        raise NotImplementedError("npu_grouped_matmul (A8W4): scale has bits in its high 32; only CR's layout "
                                  "(fp32 bits in the low half, high half zero) is emulated")
    return torch.where(s >= 2**31, s - 2**32, s).to(torch.int32).view(torch.float32)


def _grouped_matmul_a8w4(xm: Tensor, w: Tensor, group_list, group_list_type: int, bias, scale, per_token_scale,
                         output_dtype) -> Tensor:
    """The A8W4 branch of npu_grouped_matmul (aclnnGroupedMatmulV5 "A8W4"; CR's W4A8 MoE): one output [M, N].

    x int8 [M, K]; weight int4 as int32 [E, K, N/8] (npu_convert_weight_to_int4pack layout, packed along N);
    scale = [uint64-in-int64 (E, N) or (E, G, N)]; bias = [fp32 (E, N)] (mandatory); per_token_scale = [fp32 (M,)];
    group_list counts (group_list_type 1); output bf16 / fp16.

    How the bias enters. The documented formula is y = ((x - 8) @ W * scale + bias) * per_token_scale with
    bias = 8 * sum_k W * scale computed offline (the kernel works on an offset operand; the bias cancels the
    offset). In exact arithmetic that is  y = (x @ W * scale + (bias - b*)) * pts,  b* = 8 * sum_k W * scale.
    The emulator computes x @ W exactly in int32 per K-group of the scale, applies the fp32 scales, adds only the
    deviation bias - b* (b* formed as the correctly rounded fp32 value, which is what quant.int4_assistance_bias
    gives), then multiplies by pts in fp32 and casts once. So the documented bias contributes exactly nothing --
    the result is the mathematical pts[m] * sum_k x[m,k] W[k,n] scale[n] -- while any other bias
    moves y as the documented formula says, and a caller that passes a wrong bias is caught instead of silently
    repaired. Not settled without a device (docs/ascend.md): the kernel's fp32 association order, whether it
    reads the scale as full fp32 or as fp19, and per-channel [E, 1, N] (CR) vs the documented [E, K/256, N].
    """
    if group_list_type != 1:
        raise NotImplementedError("npu_grouped_matmul (A8W4): group_list must be counts (group_list_type=1); the "
                                  "documented A8W4 kernel reads group_list as counts whatever the type says")
    if w.dim() != 3 or xm.dim() != 2 or xm.shape[1] != w.shape[1]:
        raise ValueError(f"npu_grouped_matmul (A8W4): x [M, K] and weight [E, K, N/8] expected, found "
                         f"{tuple(xm.shape)} and {tuple(w.shape)}")
    e, k, n = w.shape[0], w.shape[1], 8 * w.shape[2]
    if output_dtype not in (torch.bfloat16, torch.float16):
        raise NotImplementedError(f"npu_grouped_matmul (A8W4): output_dtype must be bfloat16 or float16 "
                                  f"(documented), found {output_dtype}")
    if bias is None or len(bias) != 1 or bias[0].dtype != torch.float32 or tuple(bias[0].shape) != (e, n):
        found = None if bias is None else [(b.dtype, tuple(b.shape)) for b in bias]
        raise ValueError(f"npu_grouped_matmul (A8W4): bias (the assistance term 8 * sum_k W * scale) is mandatory: "
                         f"[fp32 ({e}, {n})] expected, found {found}")
    if scale is None or len(scale) != 1:
        raise ValueError("npu_grouped_matmul (A8W4): scale=[uint64 per-channel weight scale] is required")
    if per_token_scale is None or len(per_token_scale) != 1 or tuple(per_token_scale[0].shape) != (xm.shape[0],):
        raise ValueError(f"npu_grouped_matmul (A8W4): per_token_scale=[fp32 ({xm.shape[0]},)] is required")
    s = _a8w4_scale(scale[0], e, k, n)  # [E, G, N] fp32
    n_grp = s.shape[1]
    gid = _group_bounds(group_list, 1, e, xm.shape[0])
    wq = _quant.unpack_int4(w)  # int8 [E, K, N]
    w_sums = wq.double().unflatten(1, (n_grp, k // n_grp)).sum(2)  # [E, G, N], exact
    b_star = (8 * (s.double() * w_sums).sum(1)).float()  # [E, N], the documented bias, correctly rounded
    dev = bias[0].float() - b_star
    pts = per_token_scale[0].float()
    kg = k // n_grp

    def gemm(rows, j):  # exact int32 per K-group: [rows, G, N]
        xg = xm[rows].unflatten(1, (n_grp, kg)).transpose(0, 1)  # [G, rows, K/G]
        return _int_matmul(xg, wq[j].unflatten(0, (n_grp, kg))).transpose(0, 1)

    acc = _per_group(xm.shape[0], gid, e, gemm)  # [M, G, N], one GEMM per expert on its rows
    s_rows = _rows_of(s, gid, e)  # [M, G, N]
    y = sum(acc[:, j].float() * s_rows[:, j] for j in range(n_grp))
    y = ((y + _rows_of(dev, gid, e)) * pts.unsqueeze(-1)).to(output_dtype)
    out = torch.where((gid < e).unsqueeze(-1), y, torch.full((), float("nan"), dtype=output_dtype, device=xm.device))
    return out
