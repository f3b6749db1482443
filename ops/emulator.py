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
from dsv4_ascend.backend import redirect_skipped_rows

__all__ = [
    "npu_rms_norm",
    "npu_rotary_mul",
    "inplace_partial_rotary_mul",
    "npu_format_cast",
    "npu_transpose_batchmatmul",
    "npu_transpose_quant_batchmatmul",
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
    "scatter_nd_update_asc",
    "npu_scatter_nd_update_",
    "npu_top_k_top_p_sample",
    "npu_dequant_swiglu_clamp_quant",
    "npu_hc_pre",
    "npu_hc_post",
    "compressor",
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


def npu_transpose_quant_batchmatmul(x1: Tensor, x2: Tensor, dtype, *, bias=None, x1_scale=None, x2_scale=None,
                                    group_sizes=None, perm_x1=None, perm_x2=None, perm_y=None, batch_split_factor=1,
                                    x1_dtype=None, x2_dtype=None) -> Tensor:
    """TNPU `npu_transpose_quant_batchmatmul` (950 only; spec 3.6, aclnnTransposeQuantBatchMatMul): quantised
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


def _checking_values() -> bool:
    """Whether to run argument checks that read tensor *values* on the host (group_list totals, scale bits).

    Eager calls run them (clear errors); while torch.compile traces (graph mode) they are skipped so the op stays
    capturable, as the device op is (it does not check either)."""
    return not torch.compiler.is_compiling()


def _group_bounds(group_list, group_list_type: int, n_groups: int, m: int) -> Tensor:
    """Group index int64 [M] of every row of x [M, ...] from group_list counts (type 1) or a non-decreasing
    cumsum (type 0); rows past the last group get n_groups (the tail). Tensor ops only: searchsorted of the row
    index in the group ends, so it traces without a host read (the value checks run in eager calls only)."""
    gl = group_list if isinstance(group_list, Tensor) else torch.tensor(list(group_list), dtype=torch.int64)
    if gl.dim() != 1 or gl.shape[0] != n_groups:
        raise ValueError(f"group_list must be 1-D with one entry per weight group ({n_groups}), found shape "
                         f"{tuple(gl.shape)}")
    if group_list_type == 1:
        ends = gl.long().cumsum(0)
    elif group_list_type == 0:
        ends = gl.long()
    else:
        raise NotImplementedError(f"group_list_type {group_list_type} not emulated (0 = cumsum, 1 = counts)")
    if _checking_values() and n_groups:
        if group_list_type == 1 and bool((gl < 0).any()):
            raise ValueError(f"group_list counts must be >= 0, found {gl.tolist()}")
        if group_list_type == 0 and (bool((ends[1:] < ends[:-1]).any()) or int(ends[0]) < 0):
            raise ValueError(f"group_list cumsum must be non-decreasing and >= 0, found {gl.tolist()}")
        if int(ends[-1]) > m:
            raise ValueError(f"group_list covers {int(ends[-1])} rows but x has {m}")
    return torch.searchsorted(ends, torch.arange(m, device=ends.device), right=True)


def _rows_of(t: Tensor, gid: Tensor, n_groups: int) -> Tensor:
    """t[group of each row] [M, ...] for a per-group tensor t [E, ...]; tail rows read group E-1 (masked later)."""
    return t.index_select(0, gid.clamp(max=n_groups - 1))


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
    # Every row against its own group's weight (gathered per row, one batched matmul): static shapes, no host read.
    w_rows = _rows_of(w, gid, e)  # [M, K, N]
    if quant:
        y = _int_matmul(xm.unsqueeze(1), w_rows).squeeze(1)  # exact int32 accumulators
        if out_dt != torch.int32:
            y = y.float() * _rows_of(scale[0].float(), gid, e)
            if per_token_scale is not None:
                y = y * per_token_scale[0].float().unsqueeze(-1)
    elif xm.dtype in (torch.bfloat16, torch.float16) and w.dtype == xm.dtype == out_dt:
        # 16-bit operands: torch's 16-bit CPU bmm accumulates in fp32 (the documented semantics) and is the
        # product the reference backend's decode uses, so the two round alike.
        y = torch.bmm(xm.unsqueeze(1), w_rows).squeeze(1).float()
    else:
        y = torch.bmm(xm.float().unsqueeze(1), w_rows.float()).squeeze(1)
    if bias is not None and out_dt != torch.int32:
        y = y + _rows_of(bias[0].float(), gid, e)
    fill = torch.iinfo(torch.int32).min if out_dt == torch.int32 else float("nan")
    out = torch.where((gid < e).unsqueeze(-1), y.to(out_dt), torch.full((), fill, dtype=out_dt, device=xm.device))
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
    gid = _group_bounds(group_list, 1, e, xm.shape[0])
    wq = _quant.unpack_int4(w)  # int8 [E, K, N]
    w_sums = wq.double().unflatten(1, (n_grp, k // n_grp)).sum(2)  # [E, G, N], exact
    b_star = (8 * (s.double() * w_sums).sum(1)).float()  # [E, N], the documented bias, correctly rounded
    dev = bias[0].float() - b_star
    pts = per_token_scale[0].float()
    # Per row against its group's weight (gathered, batched): static shapes, no host read.
    xg = xm.unflatten(1, (n_grp, k // n_grp)).unsqueeze(2)  # [M, G, 1, K/G]
    wg = _rows_of(wq, gid, e).unflatten(1, (n_grp, k // n_grp))  # [M, G, K/G, N]
    acc = _int_matmul(xg, wg).squeeze(2)  # [M, G, N] exact int32 per K-group
    s_rows = _rows_of(s, gid, e)  # [M, G, N]
    y = sum(acc[:, j].float() * s_rows[:, j] for j in range(n_grp))
    y = ((y + _rows_of(dev, gid, e)) * pts.unsqueeze(-1)).to(output_dtype)
    out = torch.where((gid < e).unsqueeze(-1), y, torch.full((), float("nan"), dtype=output_dtype, device=xm.device))
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


def scatter_nd_update_asc(var: Tensor, indices: Tensor, update: Tensor) -> None:
    """CR custom `scatter_nd_update_asc` (ScatterNdUpdateAsc; spec 3.8), in place: var[indices[i, 0]] = update[i].

    var [b, s] bf16 / fp16 / int8, contiguous, s in {1, 128, 512}; indices int32 / int64 [u, 1], u <= b; update
    [u, s] of var's dtype. Negative indices are skipped (documented). The device does no bounds check; the
    emulator raises on an index >= b. Duplicate indices are undocumented: the emulator applies the rows in order,
    so the last one wins (verify).
    """
    if var.dtype not in (torch.bfloat16, torch.float16, torch.int8):
        raise TypeError(f"scatter_nd_update_asc: var must be bfloat16, float16 or int8, found {var.dtype}")
    if var.dim() != 2 or not var.is_contiguous():
        raise ValueError(f"scatter_nd_update_asc: var must be a contiguous [b, s] tensor, found {list(var.shape)} "
                         f"(contiguous={var.is_contiguous()})")
    b, s = var.shape
    if s not in (1, 128, 512):
        raise ValueError(f"scatter_nd_update_asc: var's last dim s must be 1, 128 or 512, found {s}")
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 2 or indices.shape[1] != 1:
        raise ValueError(f"scatter_nd_update_asc: indices must be int32/int64 [u, 1], found {indices.dtype} "
                         f"{list(indices.shape)}")
    u = indices.shape[0]
    if u > b:
        raise ValueError(f"scatter_nd_update_asc: u (indices rows) must be <= b = {b}, found {u}")
    if update.dtype != var.dtype or tuple(update.shape) != (u, s):
        raise ValueError(f"scatter_nd_update_asc: update must be {var.dtype} [{u}, {s}], found {update.dtype} "
                         f"{list(update.shape)}")
    rows = indices[:, 0].long()
    if _checking_values() and bool((rows >= b).any()):  # eager only: no host read inside a captured graph
        i = int((rows >= b).nonzero()[0, 0])
        raise IndexError(f"scatter_nd_update_asc: indices[{i}] = {int(rows[i])} out of range for var rows {b} "
                         "(undefined on the device)")
    # documented: negative indices are skipped (sync-free: they rewrite the last valid row with its own value)
    rows, update = redirect_skipped_rows(var, rows, _last_write_values(rows.unsqueeze(1), update))
    var.index_put_((rows,), update)


def _last_write_values(ix: Tensor, updates: Tensor) -> Tensor:
    """updates [u, ...] with every write replaced by the last write to the same index (ix [u, a]): duplicates are
    undocumented in both scatter ops, the emulator lets the last one win (verify). Every duplicate then carries one
    value, so index_put_'s (unordered on CPU for large rows) application order cannot matter; no host sync."""
    if ix.shape[0] == 0:
        return updates
    same = (ix.unsqueeze(1) == ix.unsqueeze(0)).all(-1)  # [u, u]
    pos = torch.arange(ix.shape[0], device=ix.device)
    return updates.index_select(0, torch.where(same, pos, -1).amax(1))


def npu_scatter_nd_update_(input: Tensor, indices: Tensor, updates: Tensor) -> Tensor:  # noqa: A002
    """torch_npu built-in `npu_scatter_nd_update_` (TNPU), in place; returns `input`.

    indices int32 / int64 [..., a] (a <= input.dim()) address the first a dims of input; updates has shape
    indices.shape[:-1] + input.shape[a:] and input's dtype (float32, float16, bfloat16, bool, int64, int8 on
    A2/A3). Out-of-range indices are documented as unsupported and nothing says negative ones are skipped, so the
    emulator raises on both (callers must not pass them). Duplicates are undocumented: applied in order, the last
    one wins (verify).
    """
    allowed = (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.int64, torch.int8)
    if input.dtype not in allowed:
        raise TypeError(f"npu_scatter_nd_update_: input dtype {input.dtype} is not one of {allowed}")
    if updates.dtype != input.dtype:
        raise TypeError(f"npu_scatter_nd_update_: updates dtype {updates.dtype} must equal input's {input.dtype}")
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() < 2:
        raise ValueError(f"npu_scatter_nd_update_: indices must be int32/int64 with >= 2 dims, found "
                         f"{indices.dtype} {list(indices.shape)}")
    a = indices.shape[-1]
    if a > input.dim():
        raise ValueError(f"npu_scatter_nd_update_: indices' last dim {a} exceeds input dims {input.dim()}")
    want = tuple(indices.shape[:-1]) + tuple(input.shape[a:])
    if tuple(updates.shape) != want:
        raise ValueError(f"npu_scatter_nd_update_: updates must have shape {list(want)}, found "
                         f"{list(updates.shape)}")
    rows = updates.reshape(-1, *input.shape[a:])
    ix = indices.reshape(-1, a).long()
    if _checking_values():  # eager only: a value check would be a host read inside a captured graph
        bad = (ix < 0) | (ix >= torch.tensor(input.shape[:a], dtype=torch.int64))
        if bad.any():
            first = ix[bad.any(-1)][0].tolist()
            raise IndexError(f"npu_scatter_nd_update_: index {first} out of range for input {list(input.shape)} "
                             "(negative / out-of-range indices are not supported by the op)")
    input.index_put_(tuple(ix.unbind(-1)), _last_write_values(ix, rows))  # last duplicate wins (verify)
    return input


def npu_top_k_top_p_sample(logits: Tensor, top_k: Tensor, top_p: Tensor, q=None, eps=1e-8, is_need_logits=False,
                           top_k_guess=32, min_ps=None, ks_max=1024, input_is_logits=True, post_sample="qSample",
                           generator=None) -> tuple[Tensor, Tensor]:
    """torch_npu built-in `npu_top_k_top_p_sample` (TNPU 2.14 docs + op-plugin golden test; spec 3.16).

    Per row b of logits [B, V] (fp16 / bf16 / fp32; computed in fp32):
    - top-k if 1 <= top_k[b] <= min(V, ks_max') (ks_max' = ks_max rounded up to 8, at most 1024): keep the
      first top_k[b] of a stable descending sort (ties to the lower index); otherwise the stage is skipped.
    - top-p on the softmax of the kept logits (renormalised after top-k), in sorted order: 0 < top_p[b] < 1
      drops a candidate when (cumsum - own prob) > top_p[b]; top_p[b] <= 0 keeps the top candidate only;
      top_p[b] >= 1 skips the stage.
    - qSample (q float32 [B, V], post_sample="qSample"): probs = softmax over the kept candidates, pick
      argmax(probs / (|q| + eps)). q is read by *sorted position* (q[b, j] goes with the j-th kept candidate)
      when a top-k or top-p stage ran, and by token id when both were skipped (golden test). Without q (or
      post_sample "None"): argmax of probs.
    Returns (logits_select_idx int64 [B], logits_top_kp_select): with is_need_logits the input logits (fp32) at
    kept tokens and -inf elsewhere (docs' defLogit for input_is_logits=True; the golden test fills 0: verify),
    else an empty fp32 tensor. top_k_guess only changes how the device finds the top-p cut, not the result.
    Not emulated: min_ps, input_is_logits=False, post_sample="multiNomial" (NotImplementedError).
    """
    if logits.dim() != 2 or logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"npu_top_k_top_p_sample: logits must be 2-D float16/bfloat16/float32, found "
                         f"{logits.dtype} {list(logits.shape)}")
    bsz, vocab = logits.shape
    if top_k.dtype != torch.int32 or tuple(top_k.shape) != (bsz,):
        raise ValueError(f"npu_top_k_top_p_sample: top_k must be int32 [{bsz}], found {top_k.dtype} "
                         f"{list(top_k.shape)}")
    if top_p.dtype != logits.dtype or tuple(top_p.shape) != (bsz,):
        raise ValueError(f"npu_top_k_top_p_sample: top_p must be {logits.dtype} [{bsz}] (logits' dtype), found "
                         f"{top_p.dtype} {list(top_p.shape)}")
    if min_ps is not None or not input_is_logits or post_sample not in ("qSample", "None", None):
        raise NotImplementedError("npu_top_k_top_p_sample: min_ps, input_is_logits=False and "
                                  "post_sample='multiNomial' are not emulated")
    if ks_max < 1:
        raise ValueError(f"npu_top_k_top_p_sample: ks_max must be >= 1, found {ks_max}")
    use_q = q is not None and post_sample == "qSample"
    if use_q and (q.dtype != torch.float32 or tuple(q.shape) != (bsz, vocab)):
        raise ValueError(f"npu_top_k_top_p_sample: q must be float32 [{bsz}, {vocab}] for qSample, found "
                         f"{q.dtype} {list(q.shape)}")
    ks = min(1024, -(-ks_max // 8) * 8)
    x = logits.float()
    k, p = top_k.long(), top_p.float()
    k_on = (k >= 1) & (k <= min(vocab, ks))
    p_on, p_one = (p > 0) & (p < 1), p <= 0
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=x.device)
    keep = ~k_on.unsqueeze(1) | (rank < k.unsqueeze(1))
    probs = torch.softmax(sorted_x.masked_fill(~keep, float("-inf")), dim=-1)
    above = probs.cumsum(-1) - probs
    keep &= ~(p_on.unsqueeze(1) & (above > p.unsqueeze(1)))
    keep &= ~(p_one.unsqueeze(1) & (rank > 0))
    sel = torch.softmax(sorted_x.masked_fill(~keep, float("-inf")), dim=-1)
    plain = torch.softmax(x, dim=-1)  # rows where no stage ran: token order
    if use_q:
        qa = q.abs() + eps
        sel, plain = sel / qa, plain / qa
    sorted_pick = order.gather(1, sel.argmax(-1, keepdim=True)).squeeze(1)
    idx = torch.where(k_on | p_on | p_one, sorted_pick, plain.argmax(-1))
    if not is_need_logits:
        return idx, torch.empty(0, dtype=torch.float32, device=x.device)
    kept = torch.zeros_like(keep).scatter(1, order, keep)
    return idx, x.masked_fill(~kept, float("-inf"))


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
    if quant_scale is not None:
        out = out * quant_scale.float()
    q, s = _per_row_int8(out)
    if gid is not None and (weight_scale is None or weight_scale.dim() > 1):
        valid = gid < group_index.shape[0]
        q = torch.where(valid.unsqueeze(-1), q, torch.zeros((), dtype=q.dtype, device=x.device))
        s = torch.where(valid, s, torch.zeros((), dtype=s.dtype, device=x.device))
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


# ---- KV compressor (custom, ops-transformer kernel) --------------------------------------------------------------
def compressor(x: Tensor, wkv: Tensor, wgate: Tensor, state_cache: Tensor, ape: Tensor, norm_weight: Tensor,
               rope_sin: Tensor, rope_cos: Tensor, rope_head_dim: int, cmp_ratio: int, *, state_block_table=None,
               cu_seqlens=None, seqused=None, start_pos=None, coff=1, norm_eps=1e-6, rotary_mode=1,
               cache_mode=1) -> Tensor:
    """Custom `compressor` (spec 3.7; ops-transformer experimental Compressor doc). Mutates state_cache.

    x [B,S,H] (BSND, cu_seqlens None) or [T,H] (TND, cu_seqlens [B+1] prefix sums); batch b's tokens sit at
    positions start_pos[b] (default 0) + i, and only its first seqused[b] (default all) take part. Per token:
    kv = x wkv^T, score = x wgate^T + ape[p % cmp_ratio] (fp32 accumulate), stored in state_cache fp32
    [blocks, block_size, 2*coff*D] as [kv | score] at block state_block_table[b, p // block_size], row
    p % block_size; a 0 block means "do not touch" (not written). Tokens are written in position order; rows of
    positions before start_pos are read from the state as it was before the call. Window w of a batch closes
    when its last position w*r + r - 1 is among the new tokens; its entry softmax-pools per channel over the r
    slots of window w (coff 1) or (coff 2) over 2r slots: window w-1's kv/score channels [0, D) and window w's
    [D, 2D) (w = 0: the previous slots are absent, kv 0 / score -inf). Entry -> x.dtype (DeepSeek's reference
    rounds here before the norm (verify)) -> RMSNorm * norm_weight in fp32 (eps norm_eps) -> x.dtype (verify)
    -> interleaved RoPE on the last rope_head_dim dims, out = e*cos + rot(e)*sin with rot pairs (a, b) ->
    (-b, a), cos/sin taken as given (pair-repeated tables) from the entry's output row -> x.dtype.
    Output: BSND [B, ceil(S/r), D], batch b's closed entries from row 0; TND [min(T, T//r + B), D], every
    batch's closed entries packed in batch order. rope_sin/rope_cos have the output's shape with last dim
    rope_head_dim. Rows no entry fills are garbage on the device; here NaN, so a read of one shows.
    Device limits (not enforced here): x/wkv/wgate bf16 or fp16 (the emulator also takes fp32, for the tiny
    fp32 models); only C4A (D 512, coff 2, r 4), C4 indexer (D 128, coff 2, r 4) and C128A (D 512, coff 1,
    r 128); H 1K-10K, a multiple of 512; rope_head_dim 64; rotary_mode 2 (interleave) only; cache_mode 1 only on
    A3 (2 = ring buffer, 950 only). The emulator takes any D, H, ratio and rope_head_dim <= D. BSND runs as
    tensor code without host reads (graph capture; value checks only in eager calls); TND reads cu_seqlens.
    """
    if cache_mode != 1:
        raise NotImplementedError(f"compressor: cache_mode {cache_mode} not emulated (1 = paged state cache)")
    if rotary_mode != 2:
        raise NotImplementedError(f"compressor: rotary_mode {rotary_mode} not emulated (2 = interleave; the "
                                  "device supports 2 only)")
    if coff not in (1, 2):
        raise ValueError(f"compressor: coff must be 1 or 2, found {coff}")
    if state_block_table is None:
        raise NotImplementedError("compressor: state_block_table is required (paged state cache)")
    d, h, m = norm_weight.shape[0], x.shape[-1], cmp_ratio
    c = coff * d
    for name, w in (("wkv", wkv), ("wgate", wgate)):
        if tuple(w.shape) != (c, h):
            raise ValueError(f"compressor: {name} must be [coff*D, H] = {[c, h]}, found {list(w.shape)}")
    if tuple(ape.shape) != (m, c) or ape.dtype != torch.float32:
        raise ValueError(f"compressor: ape must be fp32 [cmp_ratio, coff*D] = {[m, c]}, found {ape.dtype} "
                         f"{list(ape.shape)}")
    if state_cache.dim() != 3 or state_cache.shape[-1] != 2 * c or state_cache.dtype != torch.float32:
        raise ValueError(f"compressor: state_cache must be fp32 [blocks, block_size, 2*coff*D = {2 * c}], found "
                         f"{state_cache.dtype} {list(state_cache.shape)}")
    if rope_head_dim % 2 or not 0 < rope_head_dim <= d:
        raise ValueError(f"compressor: rope_head_dim must be even and in (0, D = {d}], found {rope_head_dim}")
    if x.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError("compressor: x [B,S,H] (BSND) needs cu_seqlens=None")
        bsz, s = x.shape[0], x.shape[1]
        xb, lens = x, torch.full((bsz,), s, dtype=torch.int64, device=x.device)
        out_lead = (bsz, -(-s // m))
    elif x.dim() == 2:  # TND (prefill, eager): padded to [B, Smax, H] here, packed again at the end
        if cu_seqlens is None:
            raise ValueError("compressor: x [T,H] (TND) needs cu_seqlens [B+1]")
        cu = [int(v) for v in cu_seqlens.tolist()]
        bsz, t = len(cu) - 1, x.shape[0]
        s = max([e - a for a, e in zip(cu[:-1], cu[1:])] + [1])
        xb = torch.stack([F.pad(x[a:e], (0, 0, 0, s - (e - a))) for a, e in zip(cu[:-1], cu[1:])])
        lens = torch.tensor([e - a for a, e in zip(cu[:-1], cu[1:])], dtype=torch.int64, device=x.device)
        out_lead = (min(t, t // m + bsz),)
    else:
        raise ValueError(f"compressor: x must be [B,S,H] or [T,H], found {list(x.shape)}")
    if tuple(rope_sin.shape) != out_lead + (rope_head_dim,) or rope_cos.shape != rope_sin.shape:
        raise ValueError(f"compressor: rope_sin/rope_cos must be {list(out_lead) + [rope_head_dim]}, found "
                         f"{list(rope_sin.shape)} and {list(rope_cos.shape)}")
    dev, bs = x.device, state_cache.shape[1]
    start = torch.zeros(bsz, dtype=torch.int64, device=dev) if start_pos is None else start_pos.long()
    used = lens if seqused is None else seqused.long()
    table = state_block_table.long()
    if _checking_values():
        if bool(((used < 0) | (used > lens)).any()):
            raise ValueError(f"compressor: seqused {used.tolist()} must be in [0, tokens per batch {lens.tolist()}]")
        need = int(((start + used - 1).clamp(min=0) // bs).max()) + 1 if bsz else 0
        if need > table.shape[1]:
            raise ValueError(f"compressor: state_block_table has {table.shape[1]} columns, positions up to "
                             f"{int((start + used).max()) - 1} need {need} (block_size {bs})")
    ar_s = torch.arange(s, device=dev)
    pos = start.unsqueeze(1) + ar_s  # [B,S]
    xf = xb.float()
    new = torch.cat([xf @ wkv.float().t(), xf @ wgate.float().t() + ape[pos % m]], -1)  # [B,S,2c] fp32

    def addr(p: Tensor) -> tuple[Tensor, Tensor]:  # (block, row) of positions p [B,N] (p >= 0)
        return table.gather(1, (p // bs).clamp(max=table.shape[1] - 1)), p % bs

    # Entries: output row j of batch b is window w = start//r + j; it is closed when (w+1)*r <= start + used.
    n_out = -(-s // m)
    vpos = ((start // m - (coff - 1)) * m).unsqueeze(1) + torch.arange((n_out + coff - 1) * m, device=dev)  # [B,L]
    blk, row = addr(vpos.clamp(min=0))
    old = state_cache[blk, row]  # rows of earlier positions, read before this call writes anything
    rows = torch.where((vpos < start.unsqueeze(1)).unsqueeze(-1), old,
                       new.gather(1, (vpos - start.unsqueeze(1)).clamp(0, s - 1).unsqueeze(-1).expand(-1, -1, 2 * c)))
    absent = (vpos < 0).unsqueeze(-1)
    kv = rows[..., :c].masked_fill(absent, 0.0).unflatten(1, (-1, m))  # [B, windows (+1), r, c]
    sc = rows[..., c:].masked_fill(absent, float("-inf")).unflatten(1, (-1, m))
    if coff == 2:  # window w: window w-1's channels [0, D), then its own [D, 2D)
        kv = torch.cat([kv[:, :-1, :, :d], kv[:, 1:, :, d:]], 2)
        sc = torch.cat([sc[:, :-1, :, :d], sc[:, 1:, :, d:]], 2)
    e = (torch.softmax(sc, 2) * kv).sum(2).to(x.dtype).float()  # [B, n_out, D]
    e = (e * torch.rsqrt(e.square().mean(-1, keepdim=True) + norm_eps) * norm_weight.float()).to(x.dtype).float()
    closed = torch.arange(n_out, device=dev) < ((start % m + used) // m).unsqueeze(1)  # [B, n_out]
    if x.dim() == 2:  # TND: batch b's closed entries packed after those of batches < b
        first = torch.cumsum(closed.sum(1), 0) - closed.sum(1)
        dest = torch.where(closed, first.unsqueeze(1) + torch.arange(n_out, device=dev), out_lead[0])
        cos = F.pad(rope_cos.float(), (0, 0, 0, 1))[dest]
        sin = F.pad(rope_sin.float(), (0, 0, 0, 1))[dest]
    else:
        cos, sin = rope_cos.float(), rope_sin.float()
    tail = e[..., d - rope_head_dim:]
    rot = torch.stack([-tail[..., 1::2], tail[..., 0::2]], -1).flatten(-2)
    e = torch.cat([e[..., :d - rope_head_dim], tail * cos + rot * sin], -1).to(x.dtype)
    e = e.masked_fill(~closed.unsqueeze(-1), float("nan"))  # rows no entry fills: NaN (garbage on the device)
    if x.dim() == 2:
        out = torch.full((out_lead[0] + 1, d), float("nan"), dtype=x.dtype, device=dev)
        out[dest] = e  # unclosed rows all go to the dump row out_lead[0]
        out = out[:-1]
    else:
        out = e
    # State: every taking-part token's row at its (block, row) unless the block is 0, in position order (a later
    # position with the same address wins: every writer of an address writes that final value, so the scatter is
    # deterministic whatever order it runs in).
    wblk, wrow = addr(pos)
    writes = (ar_s < used.unsqueeze(1)) & (wblk != 0)  # [B,S]
    key = wblk * bs + wrow
    same = (key.unsqueeze(2) == key.unsqueeze(1)) & writes.unsqueeze(1)  # [B, i, j]: j writes i's address
    last = torch.where(same, ar_s.view(1, 1, -1), -1).amax(-1)  # [B,S] last writer of each address, -1 = none
    final = torch.where((last >= 0).unsqueeze(-1), new.gather(1, last.clamp(min=0).unsqueeze(-1).expand(-1, -1, 2 * c)),
                        state_cache[wblk, wrow])
    state_cache[wblk, wrow] = final
    return out


# ---- lightning indexer -------------------------------------------------------------------------------------------
def _li_rows(layout_query: str, q_shape, actual_seq_lengths_query, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per flat query row (BSND rows are b*S1 + s): its batch b, whether it belongs to one, its index i among the
    batch's queries and the batch's query count sq; int64 / bool [T]. TND: actual_seq_lengths_query = prefix sums
    (B entries); BSND: per-batch query counts (default S1). Tensor ops only, no host read."""
    if layout_query == "TND":
        if actual_seq_lengths_query is None:
            raise ValueError("layout TND needs actual_seq_lengths_query (prefix sums, B entries)")
        ends = torch.as_tensor(actual_seq_lengths_query, device=device).long()
        t = torch.arange(q_shape[0], device=device)
        b = torch.searchsorted(ends, t, right=True)  # the batch whose [start, end) holds row t; B past the end
        valid = b < ends.shape[0]
        bc = b.clamp(max=ends.shape[0] - 1)
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        return bc, valid, t - starts[bc], ends[bc] - starts[bc]
    if layout_query == "BSND":
        bsz, s1 = q_shape[0], q_shape[1]
        t = torch.arange(bsz * s1, device=device)
        b, i = t // s1, t % s1
        lens = (torch.full((bsz,), s1, dtype=torch.int64, device=device) if actual_seq_lengths_query is None
                else torch.as_tensor(actual_seq_lengths_query, device=device).long())
        return b, i < lens[b], i, lens[b]
    raise NotImplementedError(f"layout_query {layout_query!r} not emulated (BSND, TND)")


def _paged_all(cache: Tensor, block_table: Tensor, b_rows: Tensor) -> Tensor:
    """Every row a block table can address, for each query row's batch: cache [blocks, block_size, ...] read
    through block_table[b_rows] -> [T, max_blocks * block_size, ...]."""
    bs = cache.shape[1]
    pos = torch.arange(block_table.shape[1] * bs, device=cache.device)
    blk = block_table.long()[b_rows][:, pos // bs]  # [T, nmax]
    return cache[blk, pos % bs]


def _li_select(layout_query, q_shape, actual_seq_lengths_query, actual_seq_lengths_key, score_fn, n_max,
               sparse_count, sparse_mode, cmp_ratio, device) -> Tensor:
    """Shared LI top-k: per query, scores over its batch's visible compressed keys, top sparse_count, -1 padded.

    score_fn(b_rows [T]) gives fp32 [T, n_max] over every addressable key; keys past the batch's n_keys =
    kv_len // cmp_ratio (and, sparse_mode 3, not yet visible to the query) are masked before a stable descending
    sort (score desc, index asc). Static shapes, no host read, so it traces (graph mode)."""
    if sparse_mode not in (0, 3):
        raise ValueError(f"sparse_mode must be 0 or 3, found {sparse_mode}")
    b, in_batch, i, sq = _li_rows(layout_query, q_shape, actual_seq_lengths_query, device)
    kv_len = torch.as_tensor(actual_seq_lengths_key, device=device).long()[b]
    n_keys = kv_len // cmp_ratio
    if _checking_values() and bool((in_batch & (n_keys > n_max)).any()):
        raise ValueError(f"lightning indexer: actual_seq_lengths_key / cmp_ratio exceeds the {n_max} keys the "
                         "block_table addresses")
    j = torch.arange(n_max, device=device)
    visible = (j < n_keys.unsqueeze(-1)) & in_batch.unsqueeze(-1)
    if sparse_mode == 3:  # right-down causal in compressed units; the last query sits at kv_len - 1
        pos = kv_len - sq + i
        visible = visible & (j < ((pos + 1) // cmp_ratio).unsqueeze(-1))
    scores = score_fn(b).masked_fill(~visible, float("-inf"))
    vals, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    kk = min(sparse_count, n_max)
    picks = torch.where(vals[:, :kk] == float("-inf"), torch.full_like(order[:, :kk], -1), order[:, :kk])
    return F.pad(picks.to(torch.int32), (0, sparse_count - kk), value=-1)


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

    def score_fn(b_rows):
        keys = _paged_all(key, block_table, b_rows)[:, :, 0].float()  # [T, n_max, D]
        dots = torch.einsum("thd,tnd->thn", qf, keys).relu()
        return (dots * wf.unsqueeze(-1)).sum(1)

    out = _li_select(layout_query, query.shape, actual_seq_lengths_query, actual_seq_lengths_key, score_fn,
                     block_table.shape[1] * key.shape[1], sparse_count, sparse_mode, 1, query.device)
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

    def score_fn(b_rows):
        keys = _paged_all(key, block_table, b_rows)[:, :, 0].double()  # [T, n_max, D]
        ks = _paged_all(key_dequant_scale, block_table, b_rows)[:, :, 0].float()  # [T, n_max]
        dots = torch.einsum("thd,tnd->thn", qi, keys).float().relu()  # exact int32 values
        return (dots * wq.unsqueeze(-1)).sum(1) * ks

    out = _li_select(layout_query, query.shape, actual_seq_lengths_query, actual_seq_lengths_key, score_fn,
                     block_table.shape[1] * key.shape[1], sparse_count, sparse_mode, cmp_ratio, query.device)
    return out.view(_li_shape(layout_query, query.shape, sparse_count)), torch.empty(0, device=query.device)


def npu_quant_lightning_indexer_metadata(num_heads_q, num_heads_k, head_dim, query_quant_mode, key_quant_mode, *,
                                         actual_seq_lengths_query=None, actual_seq_lengths_key=None, batch_size=0,
                                         max_seqlen_q=0, max_seqlen_k=0, layout_query="BSND", layout_key="BSND",
                                         sparse_count=2048, sparse_mode=3, pre_tokens=2**63 - 1,
                                         next_tokens=2**63 - 1, cmp_ratio=1, device="npu:0") -> Tensor:
    """CR custom AICPU tiling op: carries no math, so the emulator returns an int32 [1024] placeholder."""
    return torch.zeros(1024, dtype=torch.int32)


# ---- shared-KV sparse attention ----------------------------------------------------------------------------------
def _sas_query_rows(q: Tensor, layout_q: str, cu_seqlens_q) -> tuple[Tensor, Tensor, Tensor]:
    """Per flat query row r: (batch b [R], rows of b from r to its end >= 1 [R], row belongs to a batch [R]).

    TND: batch b owns rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1; BSND: b owns b*S1 .. (b+1)*S1-1. Tensor ops
    only (no host reads), so the op stays capturable."""
    dev = q.device
    if layout_q == "BSND":
        bsz, s1 = q.shape[:2]
        r = torch.arange(bsz * s1, device=dev)
        b = r // s1
        return b, (b + 1) * s1 - r, torch.ones_like(r, dtype=torch.bool)
    if layout_q != "TND":
        raise NotImplementedError(f"npu_sparse_attn_sharedkv: layout_q {layout_q!r} not emulated (BSND, TND)")
    if cu_seqlens_q is None or cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 2:
        raise ValueError("npu_sparse_attn_sharedkv: layout_q 'TND' needs cu_seqlens_q int32 [B+1] (prefix sums)")
    cu = cu_seqlens_q.to(dev).long()
    r = torch.arange(q.shape[0], device=dev)
    b = torch.searchsorted(cu[1:], r, right=True)  # first batch whose end is past r
    inside = (r >= cu[0]) & (b < cu.numel() - 1)
    b = b.clamp(max=cu.numel() - 2)
    return b, cu[1:][b] - r, inside


def _sas_paged(cache: Tensor, table: Tensor, b: Tensor, pos: Tensor) -> Tensor:
    """Rows at logical positions pos [R, K] (clamped in range) of batches b [R] from a paged [blocks, bs, 1, D]."""
    bs = cache.shape[1]
    col = (pos // bs).clamp(max=table.shape[1] - 1)
    blk = table.long()[b].gather(1, col)
    return cache[blk, pos % bs, 0]


def npu_sparse_attn_sharedkv(q: Tensor, *, ori_kv=None, cmp_kv=None, ori_sparse_indices=None,
                             cmp_sparse_indices=None, ori_block_table=None, cmp_block_table=None, cu_seqlens_q=None,
                             cu_seqlens_ori_kv=None, cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None,
                             sinks=None, metadata=None, softmax_scale=0, cmp_ratio=0, ori_mask_mode=4,
                             cmp_mask_mode=3, ori_win_left=127, ori_win_right=0, layout_q="BSND",
                             layout_kv="PA_ND", return_softmax_lse=False) -> tuple[Tensor, Tensor]:
    """CR custom `npu_sparse_attn_sharedkv` (custom-npu_sparse_attn_sharedkv.md; spec 3.10).

    q [B, S1, N1, D] (BSND) or [T, N1, D] (TND with cu_seqlens_q, B+1 prefix sums). ori_kv / cmp_kv paged
    [blocks, block_size, 1, D] (PA_ND), same dtype as q, through ori_block_table / cmp_block_table [B, cols]:
    logical row p of batch b is cache[table[b, p // block_size], p % block_size]. seqused_kv int32 [B] =
    per-batch *uncompressed* kv length; the query s of a batch with S queries sits at P = seqused_kv - S + s.
    Keys of that query, one softmax, K = V (shared):
      ori (band, mode 4): positions p with P - ori_win_left <= p <= P + ori_win_right and 0 <= p < seqused_kv;
      cmp (mode 3, right-down causal in compressed units): entries j < (P + 1) // cmp_ratio, all of them
      (scenario 2) or only those listed in cmp_sparse_indices [T|B*S1, 1, K2] (scenario 3; -1 and entries
      violating the causal rule are skipped; a repeated index counts once per listing (verify: the lightning
      indexer never emits repeats, so V4 never depends on it)).
    logits = softmax_scale * q.k (0 -> 1/sqrt(D)); out = sum exp(l - m) v / (sum exp(l - m) + exp(sink_h - m)):
    the sink adds mass but no value. fp32 softmax and accumulation, output q.dtype, shape of q; rows outside
    every batch (TND tail) are 0. The lse output is documented as invalid: an empty tensor is returned.
    ori_sparse_indices is ignored (documented). Tensor ops only: no host reads (capturable like the kernel).
    The device takes D = 512, N1 = 64, K2 = 512, block sizes 16k <= 1024; the emulator accepts any.
    """
    if layout_kv != "PA_ND":
        raise NotImplementedError("npu_sparse_attn_sharedkv: only PA_ND kv is emulated")
    if ori_kv is None or ori_block_table is None:
        raise ValueError("npu_sparse_attn_sharedkv: ori_kv and ori_block_table are required in every documented "
                         "scenario")
    if ori_mask_mode != 4 or (cmp_kv is not None and cmp_mask_mode != 3):
        raise NotImplementedError("npu_sparse_attn_sharedkv: only ori_mask_mode 4 / cmp_mask_mode 3 emulated")
    if cmp_kv is not None and (cmp_block_table is None or cmp_ratio <= 0):
        raise ValueError(f"npu_sparse_attn_sharedkv: cmp_kv needs cmp_block_table and cmp_ratio > 0, found "
                         f"table {'None' if cmp_block_table is None else 'given'}, cmp_ratio={cmp_ratio}")
    for name, kv in (("ori_kv", ori_kv), ("cmp_kv", cmp_kv)):
        if kv is not None and (kv.dim() != 4 or kv.shape[2] != 1 or kv.shape[3] != q.shape[-1]
                               or kv.dtype != q.dtype):
            raise ValueError(f"npu_sparse_attn_sharedkv: {name} must be [blocks, block_size, 1, {q.shape[-1]}] "
                             f"{q.dtype} (q's dtype), found {list(kv.shape)} {kv.dtype}")
    if cmp_sparse_indices is not None and cmp_sparse_indices.dtype != torch.int32:
        raise TypeError(f"npu_sparse_attn_sharedkv: cmp_sparse_indices must be int32, found "
                        f"{cmp_sparse_indices.dtype}")
    d = q.shape[-1]
    dev = q.device
    scale = softmax_scale if softmax_scale else 1.0 / math.sqrt(d)
    b, left, inside = _sas_query_rows(q, layout_q, cu_seqlens_q)
    if seqused_kv is not None:
        kv_len = seqused_kv.to(dev).long()[b]
    else:
        kv_len = torch.full_like(b, ori_block_table.shape[1] * ori_kv.shape[1])
    pos = kv_len - left  # absolute position of each query row [R]
    qf = q.float().reshape(-1, q.shape[-2], d)  # [R, H, D]
    p = pos.unsqueeze(1) - ori_win_left + torch.arange(ori_win_left + 1 + ori_win_right, device=dev)
    masks = [(p >= 0) & (p < kv_len.unsqueeze(1))]
    pools = [_sas_paged(ori_kv, ori_block_table, b, p.clamp(min=0))]
    if cmp_kv is not None:
        if cmp_sparse_indices is None:  # every entry the block table can hold; the causal rule masks the rest
            j = torch.arange(cmp_block_table.shape[1] * cmp_kv.shape[1], device=dev).expand(qf.shape[0], -1)
        else:
            j = cmp_sparse_indices.reshape(qf.shape[0], -1).long()
        masks.append((j >= 0) & (j < ((pos + 1) // cmp_ratio).unsqueeze(1)))
        pools.append(_sas_paged(cmp_kv, cmp_block_table, b, j.clamp(min=0)))
    kk = torch.cat(pools, 1).float()  # [R, K, D]
    mask = torch.cat(masks, 1) & inside.unsqueeze(1)  # [R, K]
    logits = torch.einsum("rhd,rkd->rhk", qf, kk) * scale
    logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.float().view(1, -1, 1).expand(qf.shape[0], -1, 1)], -1)
    m = logits.amax(-1, keepdim=True).clamp(min=-1e30)  # all-masked rows without sink stay finite
    e = torch.exp(logits - m)
    denom = e.sum(-1, keepdim=True)
    out = torch.einsum("rhk,rkd->rhd", e[..., :kk.shape[1]], kk) / denom.clamp(min=1e-30)
    return out.view(q.shape).to(q.dtype), torch.empty(0, device=dev)


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
    e, n = w.shape[0], w.shape[2]
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
    # Per row against its group's weight and scales (gathered, batched over rows): no host read.
    w_rows, ws_rows = _rows_of(w, gid, e), _rows_of(wscale, gid, e)
    if fp4:  # packed along K (dim 1 of the [E, K/2, N] view): byte j holds k = 2j (low) and 2j + 1 (high)
        w_rows = _quant.unpack_fp4(w_rows.transpose(1, 2)).transpose(1, 2)  # [M, K, N] fp32
    if fp4 or mx:
        y = _mx_matmul(xm.unsqueeze(1), pts.unsqueeze(1), w_rows, ws_rows)
    else:
        y = _blocked_fp8_bmm(xm.unsqueeze(1), pts.unsqueeze(1), w_rows, ws_rows, 128, 128)
    y = y.squeeze(1)
    if bias is not None:
        y = y + _rows_of(bias[0].float(), gid, e)
    nan = torch.full((), float("nan"), dtype=output_dtype, device=xm.device)
    return torch.where((gid < e).unsqueeze(-1), y.to(output_dtype), nan)
