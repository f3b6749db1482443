"""CPU emulator of the torch_npu built-ins and V4 custom ops that `AscendBackend` calls.

Pass this module as `npu=` (and it doubles as the `custom=` provider, standing in for `torch.ops.custom`).
Every function keeps the name, argument names, argument order, keyword-only marker and defaults of the op it
emulates and implements its documented semantics: layouts, accumulation and output dtypes, rounding,
saturation, group_list meaning, -1 padding. Nothing here is fast; it is the executable statement of the
contract the backend relies on. Sources (read for facts only):

- TNPU: torch_npu 2.14 op docs (`_op_plugin_docs.py`, hiascend.com "torch_npu.npu_*" pages).
- CR: hicann/cann-recipes-infer `ops/ascendc/docs/custom-npu_*.md` (the V4 custom ops) and its examples.
- OT: hicann/ops-transformer (kernel READMEs / sources, e.g. moe_init_routing_v2 gather-out kernel).
- Research notes: /work/shared/spec/ascend-ops.md (section numbers below refer to it).

Points no document settles are marked "(verify)" in the docstrings and listed in docs/ascend.md; only a run on
an NPU can settle them. Unsupported argument combinations raise NotImplementedError instead of guessing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4_ascend import quant as _quant

__all__ = [
    "npu_rms_norm",
    "npu_rotary_mul",
    "inplace_partial_rotary_mul",
    "npu_format_cast",
    "npu_transpose_batchmatmul",
    "npu_dynamic_quant",
    "npu_dynamic_block_quant",
    "npu_dynamic_mx_quant",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "npu_quant_matmul",
    "npu_grouped_matmul",
    "npu_convert_weight_to_int4pack",
    "npu_moe_init_routing_v2",
    "npu_moe_finalize_routing",
    "npu_moe_gating_top_k",
    "npu_dequant_swiglu_clamp_quant",
    "npu_hc_pre",
    "npu_hc_post",
    "npu_lightning_indexer",
    "npu_quant_lightning_indexer",
    "npu_quant_lightning_indexer_metadata",
    "npu_sparse_attn_sharedkv",
    "npu_sparse_attn_sharedkv_metadata",
    "hf32",
    "round_half_even",
]

IS_EMULATOR = True
INT8_MAX = 127.0
# Precision of npu_hc_pre's mixing matmul. CR's documented golden (examples/test_npu_hc_pre.py) is an fp32
# F.linear checked at 0.5% relative tolerance; the AscendC kernel may run the Cube in HF32 (10-bit mantissa,
# truncation), which that tolerance admits (verify on the device). "fp32" follows the golden; "hf32" models the
# suspected kernel behaviour.
HC_PRE_MATMUL = "fp32"


# ---- shared numerics ---------------------------------------------------------------------------------------------
def hf32(t: Tensor) -> Tensor:
    """fp32 -> HF32 as the Ascend Cube reads it: keep 10 mantissa bits, truncate (round toward zero) the low 13.

    (spec 3.2: HcPre's matmul runs in HF32; CR/VA goldens clear the low 13 bits.)
    """
    bits = t.float().contiguous().view(torch.int32)
    return (bits & ~0x1FFF).view(torch.float32)


def round_half_even(t: Tensor) -> Tensor:
    """Round to nearest, ties to even (torch.round's rule; CANN's "rint")."""
    return torch.round(t)


def _per_row_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic int8 over the last dim: s = amax/127, q = rint(x/s) saturated to [-128, 127].

    An all-zero row has s = 0 and gives q = 0 (the 0/0 case is undocumented (verify)).
    """
    xf = x.float()
    s = xf.abs().amax(-1) / INT8_MAX
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = round_half_even(xf / safe.unsqueeze(-1)).clamp(-128, 127)
    return q.to(torch.int8), s


def _int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact int8 x int8 -> int32 matmul. fp64 holds every partial sum exactly (|sum| < 2^53 for K < 2^38)."""
    return (a.double() @ b.double()).to(torch.int32)


# ---- norm, rope, formats -----------------------------------------------------------------------------------------
def npu_rms_norm(x: Tensor, gamma: Tensor, epsilon: float = 1e-6) -> tuple[Tensor, Tensor]:
    """TNPU `npu_rms_norm(x, gamma, epsilon=1e-6) -> (y, rstd)` (spec 3.1).

    y = x * rsqrt(mean(x^2, -1) + eps) * gamma computed in fp32, cast once to x.dtype; rstd fp32 with the
    normalised (last) dim kept as size 1. gamma must have x's dtype (documented constraint; the emulator
    enforces it so the backend cannot silently rely on mixed dtypes).
    """
    if gamma.dtype != x.dtype:
        raise TypeError(f"npu_rms_norm: gamma dtype {gamma.dtype} must equal x dtype {x.dtype}")
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def npu_rotary_mul(input: Tensor, r1: Tensor, r2: Tensor, rotary_mode: str = "half") -> Tensor:  # noqa: A002
    """TNPU `npu_rotary_mul(input, r1, r2, rotary_mode='half') -> Tensor`.

    4-D input (BSND/BNSD/SBND), r1 = cos and r2 = sin broadcastable to it, all of one dtype.
    half: out = r1*x + r2*cat(-x2, x1); interleave: out = r1*x + r2*rot(x) with rot pairs (x2i, x2i+1) ->
    (-x2i+1, x2i), so cos/sin must be repeated per pair. Computed in fp32, cast to input dtype (the kernel's
    internal precision for bf16 is not documented (verify)).
    """
    if input.dim() != 4 or r1.dim() != 4 or r2.dim() != 4:
        raise ValueError("npu_rotary_mul expects 4-D input, r1 and r2")
    if not (input.dtype == r1.dtype == r2.dtype):
        raise TypeError(f"npu_rotary_mul: dtypes differ: {input.dtype}, {r1.dtype}, {r2.dtype}")
    x = input.float()
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat([-x2, x1], dim=-1)
    elif rotary_mode == "interleave":
        rot = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    else:
        raise ValueError(f"rotary_mode must be 'half' or 'interleave', found {rotary_mode!r}")
    return (x * r1.float() + rot * r2.float()).to(input.dtype)


def inplace_partial_rotary_mul(x: Tensor, r1: Tensor, r2: Tensor, *, rotary_mode: str,
                               partial_slice) -> None:
    """CR custom `inplace_partial_rotary_mul(x, r1, r2, *, rotary_mode, partial_slice) -> ()` (spec 3.5;
    CR examples/test_npu_inplace_partial_rotary_mul.py golden). Mutates x [b, s, n, d] in place.

    On x[..., a:b] (partial_slice = [a, b]) applies the interleave rule of npu_rotary_mul:
    out = r1 * x + rot(x) * r2 computed in fp32 and cast to x.dtype; r1/r2 [b|1, s|1, n|1, b-a] may be fp32
    while x is bf16/fp16 (mixed precision is documented for A2/A3/950). Only rotary_mode="interleave".
    """
    if rotary_mode != "interleave":
        raise ValueError("inplace_partial_rotary_mul supports rotary_mode='interleave' only")
    if x.dim() != 4:
        raise ValueError("inplace_partial_rotary_mul expects a 4-D x")
    a, b = partial_slice
    xs = x[..., a:b].float()
    rot = torch.stack([-xs[..., 1::2], xs[..., 0::2]], dim=-1).flatten(-2)
    x[..., a:b] = (xs * r1.float() + rot * r2.float()).to(x.dtype)


def npu_format_cast(input: Tensor, acl_format: int, *, customize_dtype=None, input_dtype=None) -> Tensor:  # noqa: A002
    """TNPU `npu_format_cast(self, acl_format, *, customize_dtype=None, input_dtype=None)`.

    FRACTAL_NZ (29) / ND (2) change only the device memory tiling; torch keeps the logical shape, so on CPU this
    is the identity (spec 3.6).
    """
    if acl_format not in (2, 29):
        raise NotImplementedError(f"npu_format_cast: format {acl_format} not emulated (2 = ND, 29 = NZ)")
    return input


# ---- dense GEMMs -------------------------------------------------------------------------------------------------
def npu_transpose_batchmatmul(input: Tensor, weight: Tensor, *, bias=None, scale=None, perm_x1=None,  # noqa: A002
                              perm_x2=None, perm_y=None, batch_split_factor=1) -> Tensor:
    """TNPU `npu_transpose_batchmatmul` (spec 3.6): 3-D operands; perm_x1 brings input to [B,M,K], perm_x2 the
    weight to [B,K,N]; y = bmm (fp32 accumulation) permuted by perm_y, output in input.dtype.
    Only the float path (no quant `scale`, no bias, batch_split_factor 1) is emulated."""
    if scale is not None or bias is not None or batch_split_factor != 1:
        raise NotImplementedError("npu_transpose_batchmatmul: only the plain float path is emulated")
    if input.dim() != 3 or weight.dim() != 3:
        raise ValueError("npu_transpose_batchmatmul expects 3-D input and weight")
    a = input.permute(*(perm_x1 or (0, 1, 2))).float()
    b = weight.permute(*(perm_x2 or (0, 1, 2))).float()
    y = torch.bmm(a, b)
    return y.permute(*(perm_y or (0, 1, 2))).to(input.dtype)


def npu_dynamic_quant(x: Tensor, *, smooth_scales=None, group_index=None, dst_type=None, quant_mode="pertoken",
                      dst_type_max=0.0) -> tuple[Tensor, Tensor]:
    """TNPU `npu_dynamic_quant` (spec 3.6): per-token symmetric int8 over the last dim.

    x' = x * smooth_scales (if given, [H]); scale = rowmax|x'| / 127 (fp32, shape x.shape[:-1]);
    y = rint(x' / scale) saturated to [-128, 127], int8. Round-half-even and division (vs multiply by 127/amax)
    are assumptions (verify). group_index (MoE per-expert smooth rows) and non-int8 dst_type are not emulated.
    """
    if dst_type not in (None, torch.int8) or quant_mode != "pertoken" or group_index is not None:
        raise NotImplementedError("npu_dynamic_quant: only per-token int8 without group_index is emulated")
    xf = x.float()
    if smooth_scales is not None:
        xf = xf * smooth_scales.float()
    return _per_row_int8(xf)


def npu_quant_matmul(x1: Tensor, x2: Tensor, scale: Tensor, *, offset=None, pertoken_scale=None, bias=None,
                     output_dtype=None, x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None, scale_dtype=None,
                     group_sizes=None, y_scale=None) -> Tensor:
    """TNPU `npu_quant_matmul`, W8A8 int8 (spec 3.6): x1 int8 [..., M, K] @ x2 int8 [K, N] with exact int32
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


def _group_bounds(group_list: Tensor, group_list_type: int, n_groups: int) -> list[tuple[int, int]]:
    """[start, end) row range per group from counts (type 1) or a non-decreasing cumsum (type 0)."""
    g = [int(v) for v in group_list.tolist()]
    if len(g) != n_groups:
        raise ValueError(f"group_list has {len(g)} entries for {n_groups} weight groups")
    if group_list_type == 1:
        ends = []
        acc = 0
        for c in g:
            if c < 0:
                raise ValueError("group_list counts must be >= 0")
            acc += c
            ends.append(acc)
    elif group_list_type == 0:
        if any(b < a for a, b in zip(g, g[1:])) or (g and g[0] < 0):
            raise ValueError("group_list cumsum must be non-decreasing and >= 0")
        ends = g
    else:
        raise NotImplementedError(f"group_list_type {group_list_type} not emulated (0 = cumsum, 1 = counts)")
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, tuning_config=None, output_dtype=None, x_dtype=None,
                       weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None) -> list[Tensor]:
    """TNPU `npu_grouped_matmul` in the MoE form (spec 3.14): one x [M, K], one weight [E, K, N], group_type 0
    (split M), split_item 2/3 (one output [M, N]); group_list int64 [E] = counts (group_list_type=1) or cumsum
    (0). Rows past the last group are not computed: the emulator fills them with NaN (float) / INT32_MIN so a
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
    (E, K/128, N/128)], per_token_scale=[fp32 (M, K/128)]. Math: spec 3.14, fp32 accumulation, one cast.
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
    bounds = _group_bounds(group_list, group_list_type, e)
    if bounds and bounds[-1][1] > xm.shape[0]:
        raise ValueError(f"group_list covers {bounds[-1][1]} rows but x has {xm.shape[0]}")
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
    fill = torch.iinfo(torch.int32).min if out_dt == torch.int32 else float("nan")
    out = torch.full((xm.shape[0], w.shape[2]), fill, dtype=out_dt, device=xm.device)
    pts = None if per_token_scale is None else per_token_scale[0].float()
    for g, (a, b) in enumerate(bounds):
        if b <= a:
            continue
        if quant:
            acc = _int_matmul(xm[a:b], w[g])
            if out_dt == torch.int32:
                out[a:b] = acc
                continue
            y = acc.float() * scale[0][g].float()
            if pts is not None:
                y = y * pts[a:b].unsqueeze(-1)
        else:
            y = xm[a:b].float() @ w[g].float()
        if bias is not None:
            y = y + bias[0][g].float()
        out[a:b] = y.to(out_dt)
    return [out]


# ---- Atlas A2/A3 W4A8: int4 weights for the A8W4 grouped matmul (spec 3.14 W4A8 bullet) ---------------------------
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
    if ((s < 0) | (s >= 2**32)).any():
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
    the result is the mathematical pts[m] * sum_k x[m,k] W[k,n] scale[n] (spec 3.14) -- while any other bias
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
    bounds = _group_bounds(group_list, 1, e)
    if bounds and bounds[-1][1] > xm.shape[0]:
        raise ValueError(f"group_list covers {bounds[-1][1]} rows but x has {xm.shape[0]}")
    wq = _quant.unpack_int4(w)  # int8 [E, K, N]
    w_sums = wq.double().unflatten(1, (n_grp, k // n_grp)).sum(2)  # [E, G, N], exact
    b_star = (8 * (s.double() * w_sums).sum(1)).float()  # [E, N], the documented bias, correctly rounded
    dev = bias[0].float() - b_star
    pts = per_token_scale[0].float()
    out = torch.full((xm.shape[0], n), float("nan"), dtype=output_dtype, device=xm.device)
    for g, (a, b) in enumerate(bounds):
        if b <= a:
            continue
        xg = xm[a:b].unflatten(1, (n_grp, k // n_grp))  # [m, G, K/G]
        wg = wq[g].unflatten(0, (n_grp, k // n_grp))  # [G, K/G, N]
        y = sum(_int_matmul(xg[:, j], wg[j]).float() * s[g, j] for j in range(n_grp))
        out[a:b] = ((y + dev[g]) * pts[a:b].unsqueeze(-1)).to(output_dtype)
    return out

# ---- MoE routing -------------------------------------------------------------------------------------------------
def npu_moe_init_routing_v2(x: Tensor, expert_idx: Tensor, *, scale=None, offset=None, active_num=-1,
                            expert_capacity=-1, expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0,
                            expert_tokens_num_flag=False, quant_mode=-1, active_expert_range=None,
                            row_idx_type=0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TNPU `npu_moe_init_routing_v2` (spec 3.13; OT moe_init_routing_v2 README and gather-out kernel).

    Dropless mode (drop_pad_mode 0) only. The (token i, slot k) copies are flattened token-major (src = i*K + k)
    and key-value sorted by expert, stable in src (verify: tie order). Outputs:
    - expanded_x [R, H]: row r = x[sorted_src[r] // K]; R = N*K (or active_num when smaller and > 0). With
      quant_mode 1, per-row dynamic int8 of x (times the expert's smooth row of `scale` [E_range, H] if given)
      and expanded_scale fp32 [R]; quant_mode -1 keeps x's dtype and expanded_scale is `scale[src // K]` when a
      [N] scale is given, else zeros (documented as undefined).
    - expanded_row_idx int32 [N*K]: row_idx_type 0 = scatter form, expanded_row_idx[src] = destination row;
      row_idx_type 1 = gather form, expanded_row_idx[r] = src (verify). Copies whose expert falls outside
      active_expert_range get -1 (scatter form) and are not in expanded_x.
    - expert_tokens_count_or_cumsum int64 [E_range]: counts (expert_tokens_num_type 1) or cumsum (0).
    """
    if drop_pad_mode != 0 or expert_capacity not in (-1, 0) or offset is not None:
        raise NotImplementedError("npu_moe_init_routing_v2: only dropless mode without offset is emulated")
    if quant_mode not in (-1, 1):
        raise NotImplementedError(f"npu_moe_init_routing_v2: quant_mode {quant_mode} not emulated")
    n, k = expert_idx.shape
    e_total = expert_num if expert_num > 0 else int(expert_idx.max()) + 1
    lo, hi = (active_expert_range or [0, e_total])
    flat = expert_idx.reshape(-1).long()
    keep = (flat >= lo) & (flat < hi)
    key = torch.where(keep, flat, torch.full_like(flat, hi))  # out-of-range copies sort last and are dropped
    order = torch.sort(key, stable=True).indices  # sorted position -> src
    n_keep = int(keep.sum())
    rows = n * k if active_num is None or active_num <= 0 else min(n * k, active_num)
    src_sorted = order[:rows]
    dst_of_src = torch.full((n * k,), -1, dtype=torch.int64, device=x.device)
    valid_rows = min(rows, n_keep)
    dst_of_src[src_sorted[:valid_rows]] = torch.arange(valid_rows, device=x.device)
    counts = torch.bincount(flat[keep] - lo, minlength=hi - lo).to(torch.int64)
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
    if valid_rows < rows:  # tail rows hold dropped copies: garbage on the device, zeroed here
        expanded_x[valid_rows:] = 0
    if row_idx_type == 0:
        row_idx = dst_of_src
    elif row_idx_type == 1:
        row_idx = torch.full((n * k,), -1, dtype=torch.int64, device=x.device)
        row_idx[:valid_rows] = src_sorted[:valid_rows]
    else:
        raise ValueError(f"row_idx_type must be 0 or 1, found {row_idx_type}")
    if expert_tokens_num_type == 1:
        tokens = counts
    elif expert_tokens_num_type == 0:
        tokens = counts.cumsum(0)
    else:
        raise NotImplementedError("expert_tokens_num_type 2 (key-value) not emulated")
    return expanded_x, row_idx.to(torch.int32), tokens, expanded_scale


def npu_moe_finalize_routing(expanded_permuted_rows: Tensor, skip1=None, skip2=None, bias=None, scales=None,
                             expanded_src_to_dst_row=None, export_for_source_row=None,
                             drop_pad_mode=0) -> Tensor:
    """TNPU `npu_moe_finalize_routing` (OT MoeFinalizeRouting README, spec 3.13).

    out[i] = skip1[i] + skip2[i] + sum_k scales[i,k] * (rows[idx(i,k)] + bias[expert(i,k)]), fp32 accumulation,
    output in the rows' dtype. idx(i,k) = expanded_src_to_dst_row[i + k*N] for drop_pad_mode 0/1 (documented,
    column-major) and [i*K + k] for 2/3 (token-major, matching init_routing_v2's src order; verify).
    Missing scales count as 1; N and K come from scales / export_for_source_row / skip1.
    """
    rows = expanded_permuted_rows
    ref = scales if scales is not None else export_for_source_row
    if ref is not None:
        n, k = ref.shape
    elif skip1 is not None:
        n = skip1.shape[0]
        k = expanded_src_to_dst_row.numel() // n
    else:
        raise ValueError("npu_moe_finalize_routing needs scales, export_for_source_row or skip1 for N and K")
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
    """CR custom `npu_moe_gating_top_k` (MoeGatingTopKHash; spec 3.11). The built-in of the same name shares the
    shape contract but documents norm_type 0/1 only (verify 2 on the device).

    s = softmax(x) (norm_type 0), sigmoid(x) (1) or sqrt(softplus(x)) (2), in fp32. Experts: tid2eid[input_ids]
    when both are given (hash routing), else top-k of s + bias (descending; ties to the lower expert id).
    y = s at those experts (no bias); for norm_type != 0 divided by (sum + eps); times routed_scaling_factor.
    Returns (y in x.dtype [T,k], expert_idx int32 [T,k], s fp32 [T,E] (norm_out, meaningful with out_flag)).
    Grouped selection (k_group/group_count > 1) and renorm=1 are not emulated.
    """
    if k_group != 1 or group_count != 1 or renorm != 0:
        raise NotImplementedError("npu_moe_gating_top_k: only k_group=group_count=1, renorm=0 is emulated")
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
    """CR custom `npu_dequant_swiglu_clamp_quant` (spec 3.15), the dynamic-quant (quant_mode=1) form.

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
    valid = m
    if weight_scale is None and group_index is not None:
        valid = int(group_index.long().sum())
        deq = deq[:valid]
    if weight_scale is not None:
        ws = weight_scale.float()
        if ws.dim() == 1:
            deq = deq * ws
        else:
            if group_index is None:
                raise ValueError("a per-expert weight_scale needs group_index")
            counts = group_index.long()
            valid = int(counts.sum())
            row_group = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
            deq = deq[:valid] * ws[row_group]
    if activation_scale is not None:
        deq = deq * activation_scale.float()[:valid].unsqueeze(-1)
    a, b = (deq[:, :half], deq[:, half:]) if activate_left else (deq[:, half:], deq[:, :half])
    if swiglu_mode == 1:
        a = a.clamp(max=clamp_limit)
        b = b.clamp(-clamp_limit, clamp_limit)
        out = a * torch.sigmoid(glu_alpha * a) * (b + glu_bias)
    elif swiglu_mode == 0:
        out = F.silu(a) * b
    else:
        raise ValueError(f"swiglu_mode must be 0 or 1, found {swiglu_mode}")
    if quant_scale is not None:
        out = out * quant_scale.float()
    q, s = _per_row_int8(out)
    if valid < m:
        q = torch.cat([q, torch.zeros(m - valid, half, dtype=torch.int8, device=x.device)])
        s = torch.cat([s, torch.zeros(m - valid, device=x.device)])
    return q, s


# ---- mHC (A2/A3 custom ops) --------------------------------------------------------------------------------------
def npu_hc_pre(x: Tensor, hc_fn: Tensor, hc_scale: Tensor, hc_base: Tensor, *, hc_mult=4, hc_sinkhorn_iters=20,
               norm_eps=1e-6, hc_eps=1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """CR custom `npu_hc_pre` (spec 3.2; CR examples/test_npu_hc_pre.py golden).

    x [T, n, d] or [B, S, n, d]; hc_fn fp32 [(2+n)n, n*d]; hc_scale fp32 [3]; hc_base fp32 [(2+n)n].
    xf = x flattened to [.., n*d] in fp32; r = rsqrt(mean(xf^2) + norm_eps); mixes = (xf @ hc_fn^T) * r in fp32
    as CR's golden does (HC_PRE_MATMUL = "hf32" instead truncates both operands to 10 mantissa bits, the
    suspected Cube behaviour (verify));
    pre = sigmoid(mix_pre*s0 + b_pre) + hc_eps; post = 2*sigmoid(mix_post*s1 + b_post);
    comb = softmax(mix_comb*s2 + b_comb, -1) + hc_eps, column-normalised (/(colsum + hc_eps)), then
    (iters-1) x [row-normalise, column-normalise]; y = sum_n pre[n] * x[n] in fp32 -> x.dtype.
    Returns (y [.., d] in x.dtype, post fp32 [.., n], comb fp32 [.., n, n]). The documented dtype of x is bf16
    (d = 4096, hc_mult = 4); the emulator also accepts fp32 and other sizes.
    """
    n = hc_mult
    if x.shape[-2] != n:
        raise ValueError(f"npu_hc_pre: x has {x.shape[-2]} streams, hc_mult is {n}")
    xf = x.flatten(-2).float()
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    fn = hc_fn.float()
    mix = ((hf32(xf) @ hf32(fn).t()) if HC_PRE_MATMUL == "hf32" else (xf @ fn.t())) * r
    s0, s1, s2 = hc_scale.float()
    base = hc_base.float()
    pre = torch.sigmoid(mix[..., :n] * s0 + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mix[..., n:2 * n] * s1 + base[n:2 * n])
    comb = (mix[..., 2 * n:] * s2 + base[2 * n:]).unflatten(-1, (n, n))
    comb = torch.softmax(comb, dim=-1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(hc_sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    y = (pre.unsqueeze(-1) * x.float()).sum(-2)
    return y.to(x.dtype), post, comb


def npu_hc_post(x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """CR custom `npu_hc_post` (spec 3.4): y[.., j, :] = post[j] * x + sum_m comb[m, j] * residual[.., m, :]
    (first comb index = input stream), fp32 math, output in x.dtype. x [T, d] or [B, S, d]; residual [.., n, d]."""
    out = post.float().unsqueeze(-1) * x.float().unsqueeze(-2)
    out = out + torch.einsum("...mj,...md->...jd", comb.float(), residual.float())
    return out.to(x.dtype)


# ---- lightning indexer -------------------------------------------------------------------------------------------
def _li_batches(layout_query: str, q_shape, actual_seq_lengths_query) -> list[tuple[int, list[int]]]:
    """Per batch b, the list of flat query rows it owns (in order). BSND rows are b*S1 + s."""
    if layout_query == "TND":
        if actual_seq_lengths_query is None:
            raise ValueError("layout TND needs actual_seq_lengths_query (prefix sums, B entries)")
        ends = [int(v) for v in actual_seq_lengths_query.tolist()]
        starts = [0] + ends[:-1]
        return [(b, list(range(a, e))) for b, (a, e) in enumerate(zip(starts, ends))]
    if layout_query == "BSND":
        bsz, s1 = q_shape[0], q_shape[1]
        lens = [s1] * bsz if actual_seq_lengths_query is None else [int(v) for v in actual_seq_lengths_query]
        return [(b, [b * s1 + s for s in range(lens[b])]) for b in range(bsz)]
    raise NotImplementedError(f"layout_query {layout_query!r} not emulated (BSND, TND)")


def _paged_rows(cache: Tensor, block_table: Tensor, b: int, n: int) -> Tensor:
    """Rows 0..n-1 of batch b from a paged cache [blocks, block_size, ...] through block_table [B, max_blocks]."""
    bs = cache.shape[1]
    pos = torch.arange(n, device=cache.device)
    blk = block_table[b].long()[pos // bs]
    return cache[blk, pos % bs]


def _li_select(layout_query, q_shape, actual_seq_lengths_query, actual_seq_lengths_key, score_fn, sparse_count,
               sparse_mode, cmp_ratio, device) -> Tensor:
    """Shared LI top-k: per query, scores over its batch's visible compressed keys, top sparse_count, -1 padded."""
    flat_rows = q_shape[0] * q_shape[1] if layout_query == "BSND" else q_shape[0]
    out = torch.full((flat_rows, sparse_count), -1, dtype=torch.int32, device=device)
    for b, rows in _li_batches(layout_query, q_shape, actual_seq_lengths_query):
        if not rows:
            continue
        kv_len = int(actual_seq_lengths_key[b])
        n_keys = kv_len // cmp_ratio
        if n_keys <= 0:
            continue
        scores = score_fn(b, rows, n_keys)  # fp32 [len(rows), n_keys]
        sq = len(rows)
        if sparse_mode == 3:  # right-down causal in compressed units; last query sits at kv_len - 1
            pos = kv_len - sq + torch.arange(sq, device=device)
            visible = torch.arange(n_keys, device=device) < ((pos + 1) // cmp_ratio).unsqueeze(-1)
        elif sparse_mode == 0:
            visible = torch.ones_like(scores, dtype=torch.bool)
        else:
            raise ValueError(f"sparse_mode must be 0 or 3, found {sparse_mode}")
        scores = scores.masked_fill(~visible, float("-inf"))
        kk = min(sparse_count, n_keys)
        vals, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        vals, order = vals[:, :kk], order[:, :kk]
        picks = torch.where(vals == float("-inf"), torch.full_like(order, -1), order)
        out[torch.tensor(rows, device=device), :kk] = picks.to(torch.int32)
    return out


def _li_shape(layout_query: str, q_shape, sparse_count: int) -> tuple[int, ...]:
    return ((q_shape[0], q_shape[1], 1, sparse_count) if layout_query == "BSND" else (q_shape[0], 1, sparse_count))


def npu_lightning_indexer(query: Tensor, key: Tensor, weights: Tensor, *, actual_seq_lengths_query=None,
                          actual_seq_lengths_key=None, block_table=None, layout_query="BSND", layout_key="PA_BSND",
                          sparse_count=2048, sparse_mode=3) -> Tensor:
    """TNPU / CR `npu_lightning_indexer` (bf16, V3.2 contract: no cmp_ratio; CR custom-npu_lightning_indexer.md).

    query bf16 [B, S1, N1, D] (BSND) or [T, N1, D] (TND, actual_seq_lengths_query = prefix sums, B entries);
    key bf16 paged [blocks, block_size, 1, D] (PA_BSND) read through block_table; weights [B, S1, N1, 1] or
    [T, N1, 1]. score[t, j] = sum_h w[t,h] * ReLU(q[t,h] . k[j]) in fp32 (accumulation precision (verify)).
    sparse_mode 3: key j visible to the query at absolute position P (right-aligned: last query at kv_len-1)
    iff j <= P; top sparse_count indices by score (order within the top-k is implementation-defined; here score
    desc, index asc), -1 padded. Returns int32 [B, S1, 1, sparse_count] or [T, 1, sparse_count].
    The emulator also accepts fp32 operands (the device takes bf16 only).
    """
    if layout_key != "PA_BSND" or block_table is None or actual_seq_lengths_key is None:
        raise NotImplementedError("npu_lightning_indexer: only PA_BSND keys with block_table and "
                                  "actual_seq_lengths_key are emulated")
    qf = query.float().reshape(-1, query.shape[-2], query.shape[-1])
    wf = weights.float().reshape(qf.shape[0], -1)

    def score_fn(b, rows, n_keys):
        keys = _paged_rows(key, block_table, b, n_keys)[:, 0].float()  # [n, D]
        r = torch.tensor(rows, device=query.device)
        dots = torch.einsum("thd,nd->thn", qf[r], keys).relu()
        return (dots * wf[r].unsqueeze(-1)).sum(1)

    out = _li_select(layout_query, query.shape, actual_seq_lengths_query, actual_seq_lengths_key, score_fn,
                     sparse_count, sparse_mode, 1, query.device)
    return out.view(_li_shape(layout_query, query.shape, sparse_count))


def npu_quant_lightning_indexer(query: Tensor, key: Tensor, weights: Tensor, query_dequant_scale: Tensor,
                                key_dequant_scale: Tensor, *, actual_seq_lengths_query=None,
                                actual_seq_lengths_key=None, block_table=None, metadata=None, query_quant_mode=0,
                                key_quant_mode=0, layout_query="BSND", layout_key="BSND", sparse_count=2048,
                                sparse_mode=3, pre_tokens=2**63 - 1, next_tokens=2**63 - 1, cmp_ratio=1,
                                return_value=False) -> tuple[Tensor, Tensor]:
    """CR custom `npu_quant_lightning_indexer` (custom-npu_quant_lightning_indexer.md; spec 3.9). The torch_npu
    2.14 built-in of the same name lacks metadata/cmp_ratio; a call that leaves those at their defaults is valid
    for both.

    query int8 [B,S1,N1,D] / [T,N1,D]; key int8 paged [blocks, block_size, 1, D] (PA_BSND); weights and
    query_dequant_scale fp16 [B,S1,N1] / [T,N1]; key_dequant_scale fp16 [blocks, block_size, 1].
    score[t,j] = ks[j] * sum_h fp16(w[t,h] * qs[t,h]) * ReLU(int32 q[t,h] . k[j]) (the doc requires w*qs to
    fit fp16, so the product is formed in fp16; the order of the fp32 multiplies is (verify)).
    sparse_mode 3: key j (compressed) visible to the query at absolute position P iff j < (P + 1) // cmp_ratio,
    with actual_seq_lengths_key the *uncompressed* length and P right-aligned. Top sparse_count, -1 padded
    (verify: -1 tail when fewer keys are valid). Returns (int32 [B,S1,1,K] or [T,1,K], empty sparse_values).
    """
    if query_quant_mode != 0 or key_quant_mode != 0 or return_value:
        raise NotImplementedError("npu_quant_lightning_indexer: only per-token-head modes 0, no values emulated")
    if layout_key != "PA_BSND" or block_table is None or actual_seq_lengths_key is None:
        raise NotImplementedError("npu_quant_lightning_indexer: only PA_BSND keys with block_table emulated")
    if query.dtype != torch.int8 or key.dtype != torch.int8:
        raise TypeError("npu_quant_lightning_indexer: query and key must be int8")
    qi = query.reshape(-1, query.shape[-2], query.shape[-1]).double()
    wq = (weights.float() * query_dequant_scale.float()).to(torch.float16).float().reshape(qi.shape[0], -1)

    def score_fn(b, rows, n_keys):
        keys = _paged_rows(key, block_table, b, n_keys)[:, 0].double()  # [n, D]
        ks = _paged_rows(key_dequant_scale, block_table, b, n_keys)[:, 0].float()  # [n]
        r = torch.tensor(rows, device=query.device)
        dots = torch.einsum("thd,nd->thn", qi[r], keys).float().relu()  # exact int32 values
        return (dots * wq[r].unsqueeze(-1)).sum(1) * ks

    out = _li_select(layout_query, query.shape, actual_seq_lengths_query, actual_seq_lengths_key, score_fn,
                     sparse_count, sparse_mode, cmp_ratio, query.device)
    return out.view(_li_shape(layout_query, query.shape, sparse_count)), torch.empty(0, device=query.device)


def npu_quant_lightning_indexer_metadata(num_heads_q, num_heads_k, head_dim, query_quant_mode, key_quant_mode, *,
                                         actual_seq_lengths_query=None, actual_seq_lengths_key=None, batch_size=0,
                                         max_seqlen_q=0, max_seqlen_k=0, layout_query="BSND", layout_key="BSND",
                                         sparse_count=2048, sparse_mode=3, pre_tokens=2**63 - 1,
                                         next_tokens=2**63 - 1, cmp_ratio=1, device="npu:0") -> Tensor:
    """CR custom AICPU tiling op: carries no math, so the emulator returns an int32 [1024] placeholder."""
    return torch.zeros(1024, dtype=torch.int32)


# ---- shared-KV sparse attention ----------------------------------------------------------------------------------
def npu_sparse_attn_sharedkv(q: Tensor, *, ori_kv=None, cmp_kv=None, ori_sparse_indices=None,
                             cmp_sparse_indices=None, ori_block_table=None, cmp_block_table=None, cu_seqlens_q=None,
                             cu_seqlens_ori_kv=None, cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None,
                             sinks=None, metadata=None, softmax_scale=0, cmp_ratio=0, ori_mask_mode=4,
                             cmp_mask_mode=3, ori_win_left=127, ori_win_right=0, layout_q="BSND",
                             layout_kv="PA_ND", return_softmax_lse=False) -> tuple[Tensor, Tensor]:
    """CR custom `npu_sparse_attn_sharedkv` (custom-npu_sparse_attn_sharedkv.md; spec 3.10).

    q [B, S1, N1, D] (BSND) or [T, N1, D] (TND with cu_seqlens_q, B+1 prefix sums). ori_kv / cmp_kv paged
    [blocks, block_size, 1, D] (PA_ND) through ori_block_table / cmp_block_table; seqused_kv int32 [B] =
    per-batch *uncompressed* kv length; the query s of a batch with S queries sits at P = seqused_kv - S + s.
    Keys of that query, one softmax, K = V (shared):
      ori (band, mode 4): positions p with P - ori_win_left <= p <= P + ori_win_right and 0 <= p < seqused_kv;
      cmp (mode 3, right-down causal in compressed units): entries j < (P + 1) // cmp_ratio, all of them
      (scenario 2) or only those listed in cmp_sparse_indices [T|B*S1, 1, K2] (scenario 3; -1 and entries
      violating the causal rule are skipped).
    logits = softmax_scale * q.k (0 -> 1/sqrt(D)); out = sum exp(l - m) v / (sum exp(l - m) + exp(sink_h - m)):
    the sink adds mass but no value. fp32 softmax and accumulation, output q.dtype, shape of q. The lse output is
    documented as invalid: an empty tensor is returned. ori_sparse_indices is ignored (documented).
    """
    if layout_kv != "PA_ND":
        raise NotImplementedError("npu_sparse_attn_sharedkv: only PA_ND kv is emulated")
    if ori_kv is None:
        raise ValueError("npu_sparse_attn_sharedkv: ori_kv is required in every documented scenario")
    if ori_mask_mode != 4 or (cmp_kv is not None and cmp_mask_mode != 3):
        raise NotImplementedError("npu_sparse_attn_sharedkv: only ori_mask_mode 4 / cmp_mask_mode 3 emulated")
    d = q.shape[-1]
    scale = softmax_scale if softmax_scale else 1.0 / math.sqrt(d)
    if layout_q == "BSND":
        bsz, s1 = q.shape[:2]
        batches = [(b, list(range(b * s1, (b + 1) * s1))) for b in range(bsz)]
    elif layout_q == "TND":
        cu = [int(v) for v in cu_seqlens_q.tolist()]
        batches = [(b, list(range(cu[b], cu[b + 1]))) for b in range(len(cu) - 1)]
    else:
        raise NotImplementedError(f"layout_q {layout_q!r} not emulated")
    qf = q.float().reshape(-1, q.shape[-2], d)  # [rows, H, D]
    out = torch.zeros_like(qf)
    sink = None if sinks is None else sinks.float()
    cmp_idx = None if cmp_sparse_indices is None else cmp_sparse_indices.reshape(qf.shape[0], -1).long()
    for b, rows in batches:
        if not rows:
            continue
        sq = len(rows)
        kv_len = int(seqused_kv[b]) if seqused_kv is not None else ori_block_table.shape[1] * ori_kv.shape[1]
        r = torch.tensor(rows, device=q.device)
        pos = kv_len - sq + torch.arange(sq, device=q.device)  # [sq]
        # ori band
        win = ori_win_left + 1 + ori_win_right
        p = pos.unsqueeze(1) - ori_win_left + torch.arange(win, device=q.device)  # [sq, win]
        ok = (p >= 0) & (p < kv_len)
        pc = p.clamp(0, max(kv_len - 1, 0))
        bs = ori_kv.shape[1]
        keys = ori_kv[ori_block_table[b].long()[pc // bs], pc % bs, 0].float()  # [sq, win, D]
        masks = [ok]
        pools = [keys]
        if cmp_kv is not None:
            n_vis = (pos + 1) // cmp_ratio  # [sq]
            cbs = cmp_kv.shape[1]
            if cmp_idx is None:
                n_max = max(int(n_vis.max()), 1)
                j = torch.arange(n_max, device=q.device).expand(sq, n_max)
            else:
                j = cmp_idx[r]
            cok = (j >= 0) & (j < n_vis.unsqueeze(1))
            jc = j.clamp(min=0)
            ckeys = cmp_kv[cmp_block_table[b].long()[jc // cbs], jc % cbs, 0].float()
            masks.append(cok)
            pools.append(ckeys)
        kk = torch.cat(pools, 1)  # [sq, K, D]
        mask = torch.cat(masks, 1)  # [sq, K]
        logits = torch.einsum("shd,skd->shk", qf[r], kk) * scale
        logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
        if sink is not None:
            logits = torch.cat([logits, sink.view(1, -1, 1).expand(sq, -1, 1)], -1)
        m = logits.amax(-1, keepdim=True).clamp(min=-1e30)  # all-masked rows without sink stay finite
        e = torch.exp(logits - m)
        denom = e.sum(-1, keepdim=True)
        e = e[..., :kk.shape[1]]
        out[r] = torch.einsum("shk,skd->shd", e, kk) / denom.clamp(min=1e-30)
    return out.view(q.shape).to(q.dtype), torch.empty(0, device=q.device)


def npu_sparse_attn_sharedkv_metadata(num_heads_q, num_heads_kv, head_dim, *, cu_seqlens_q=None,
                                      cu_seqlens_ori_kv=None, cu_seqlens_cmp_kv=None, seqused_q=None,
                                      seqused_kv=None, batch_size=0, max_seqlen_q=0, max_seqlen_kv=0, ori_topk=0,
                                      cmp_topk=0, cmp_ratio=-1, ori_mask_mode=4, cmp_mask_mode=3,
                                      ori_win_left=127, ori_win_right=0, layout_q="BSND", layout_kv="PA_ND",
                                      has_ori_kv=True, has_cmp_kv=True, device="npu:0") -> Tensor:
    """CR custom AICPU tiling op: carries no math, so the emulator returns an int32 [1024] placeholder."""
    return torch.zeros(1024, dtype=torch.int32)


# ---- Ascend 950 low-precision paths: FP8 block and MX (spec 3.6, 3.14, 3.18) -------------------------------------
# torch_npu spells these dtypes torch_npu.float8_e8m0fnu / torch_npu.float4_e2m1fn_x2 (dtype codes 293 / 296);
# torch 2.13 has dtypes of the same meaning, which stand in for them so `npu.float4_e2m1fn_x2` works with either
# module. FP4 data and e8m0 scales may arrive as uint8 (what torch_npu returns) or as these dtypes.
float8_e8m0fnu = torch.float8_e8m0fnu
float4_e2m1fn_x2 = torch.float4_e2m1fn_x2
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Summation order of the FP8-block matmul (npu_quant_matmul group_sizes [1, gn, gk], FP8-block grouped matmul).
# "blockwise" (default) models a block-scaled Cube GEMM: fp32 partial sums per K block, then scaled and summed;
# "dequant" dequantises both operands and runs one fp32 GEMM (the reference's order). Same math; results differ
# only by fp32 rounding order, which the device does not document (verify).
FP8_BLOCK_ACCUMULATION = "blockwise"
_DTYPE_CODES = {1: torch.int8, 23: torch.float8_e5m2, 291: torch.float8_e5m2, 24: torch.float8_e4m3fn,
                292: torch.float8_e4m3fn, 293: torch.float8_e8m0fnu, 296: torch.float4_e2m1fn_x2}


def _dtype_arg(value, what: str) -> torch.dtype | None:
    """A dtype argument given as a torch dtype or a torch_npu dtype code (spec section 0) -> torch dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, int) and value in _DTYPE_CODES:
        return _DTYPE_CODES[value]
    raise NotImplementedError(f"{what}={value!r} not emulated (codes {sorted(_DTYPE_CODES)} or torch dtypes)")


def _is_e8m0(t: Tensor | None, declared) -> bool:
    """Whether a scale is e8m0: its *_dtype argument says so, or the tensor already is float8_e8m0fnu."""
    return _dtype_arg(declared, "scale dtype") == torch.float8_e8m0fnu or (
        t is not None and t.dtype == torch.float8_e8m0fnu)


def _mx_scales(pairs: Tensor, n_blocks: int, dim: int, what: str) -> Tensor:
    """fp32 2^(b-127) per block from e8m0 pairs (uint8 or float8_e8m0fnu) [..., ceil(nb/2) at dim, ..., 2]."""
    if pairs.dtype not in (torch.uint8, torch.float8_e8m0fnu):
        raise TypeError(f"{what}: e8m0 scales must be uint8 or float8_e8m0fnu, got {pairs.dtype}")
    try:
        return _quant.e8m0_to_float(_quant.e8m0_unpairs(pairs, n_blocks, dim))
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def npu_dynamic_block_quant(x: Tensor, *, min_scale=0.0, round_mode="rint", dst_type=1, row_block_size=1,
                            col_block_size=128, dst_type_max=0.0) -> tuple[Tensor, Tensor]:
    """TNPU `npu_dynamic_block_quant` (spec 3.6; ops-nn DynamicBlockQuant), FP8 destinations only.

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
    """TNPU `npu_dynamic_mx_quant` (spec 3.6; ops-nn aclnnDynamicMxQuant), scale_alg 0 (OCP MX v1.0).

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
    e, n = w.shape[0], w.shape[2]
    if w.shape[1] != (k // 2 if fp4 else k):
        want = "K/2 (FP4 x2)" if fp4 else "K"
        raise ValueError(f"npu_grouped_matmul: x has K={k}, weight is {tuple(w.shape)}: expected {want} in dim 1")
    bounds = _group_bounds(group_list, group_list_type, e)
    if bounds and bounds[-1][1] > m:
        raise ValueError(f"group_list covers {bounds[-1][1]} rows but x has {m}")
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
    out = torch.full((m, n), float("nan"), dtype=output_dtype, device=xm.device)
    for g, (a, b) in enumerate(bounds):
        if b <= a:
            continue
        if fp4:  # packed along K (dim 0 of the [K/2, N] view): byte j holds k = 2j (low) and 2j + 1 (high)
            wg = _quant.unpack_fp4(w[g].t()).t()
            y = _mx_matmul(xm[a:b], pts[a:b], wg, wscale[g])
        elif mx:
            y = _mx_matmul(xm[a:b], pts[a:b], w[g], wscale[g])
        else:
            y = _blocked_fp8_matmul(xm[a:b], pts[a:b], w[g], wscale[g], 128, 128)
        if bias is not None:
            y = y + bias[0][g].float()
        out[a:b] = y.to(output_dtype)
    return out
