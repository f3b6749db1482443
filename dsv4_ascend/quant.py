"""Quantisation formats of DeepSeek-V4: FP8 e4m3 block-128x128, MXFP4 e2m1 block-1x32, UE8M0 scales, act_quant.

Every routine computes in fp32 and casts to a low-precision dtype only at the end, because on CPU most ops
(amax, add, abs on e8m0) are not implemented for float8 dtypes and no cast exists for float4. Power-of-two
scales are built from integer exponents, never from `.to(torch.float8_e8m0fnu)` (which rounds half-up).
The facts behind each rule, and the test that proves it, are in docs/checkpoint-format.md.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "FP4_E2M1_VALUES",
    "e8m0_to_float",
    "float_to_e8m0",
    "pow2_scale",
    "unpack_fp4",
    "pack_fp4",
    "fp4_encode",
    "quantize_fp4",
    "dequantize_fp4",
    "quantize_fp8_block",
    "dequantize_fp8_block",
    "act_quant",
    "fp8_sim",
    "fp4_sim",
    "hadamard",
    "hadamard_rotate",
    "dequantize",
    "INT4_QMAX",
    "quantize_int4_per_channel",
    "pack_int4",
    "unpack_int4",
    "int4_assistance_bias",
    "a8w4_scale_u64",
    "MX_BLOCK",
    "MX_EMAX",
    "cast_fp8_saturate",
    "mx_scale_floor",
    "e8m0_pairs",
    "e8m0_unpairs",
    "quantize_mxfp8",
    "dequantize_mxfp8",
    "quantize_int8_per_channel",
    "act_quant_dequant",
]

E4M3_MAX = 448.0
FP4_MAX = 6.0
FP8_BLOCK = 128
ACT_AMAX_FLOOR = 1e-4  # DeepSeek act_quant: amax = max(|x_block|, 1e-4)
FP4_AMAX_FLOOR = 6.0 * 2.0**-126  # DeepSeek's fp4_act_quant (inference/kernel.py): fp4 scale >= 2^-126

# code -> value; bit 3 = sign, bits 2-1 = exponent (bias 1), bit 0 = mantissa. Code 8 is -0.0.
FP4_E2M1_VALUES: torch.Tensor = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)

# Midpoints between consecutive e2m1 magnitudes (codes i and i+1). A tie goes to the even code, so the
# threshold is strict (>) when code i is even and inclusive (>=) when code i is odd.
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e8m0fnu)
_FLOAT4_X2 = getattr(torch, "float4_e2m1fn_x2", None)


def _ceil_log2(r: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(r)) as int32 for positive finite fp32 r (subnormals included), from frexp."""
    m, e = torch.frexp(r)
    return e - (m == 0.5).to(e.dtype)  # r = m * 2^e, m in [0.5, 1): exact power of two iff m == 0.5


def _exp2i(k: torch.Tensor) -> torch.Tensor:
    """Exact fp32 2^k for integer k built from the bit pattern (inf above 2^127, 0 below 2^-149)."""
    k = k.to(torch.int32)
    normal = (k.clamp(-126, 127) + 127) << 23
    subnormal = torch.ones_like(k) << (k.clamp(-149, -127) + 149)
    out = torch.where(k >= -126, normal, subnormal).view(torch.float32)
    out = torch.where(k > 127, torch.full_like(out, math.inf), out)
    return torch.where(k < -149, torch.zeros_like(out), out)


def _e8m0_bytes(scale: torch.Tensor, what: str) -> torch.Tensor:
    """Raw e8m0 bytes (uint8) of a float8_e8m0fnu or uint8 tensor; refuse anything else."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.view(torch.uint8)
    if scale.dtype == torch.uint8:
        return scale
    raise TypeError(f"{what}: e8m0 scales must be float8_e8m0fnu or uint8, got {scale.dtype}")


def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Decode UE8M0 scales (float8_e8m0fnu or raw uint8 byte b) to fp32 2^(b-127), b=255 -> NaN, via bits."""
    b = _e8m0_bytes(scale, "e8m0_to_float").to(torch.int32)
    bits = torch.where(b == 0, torch.full_like(b, 0x00400000), b << 23)  # b=0 is the fp32 subnormal 2^-127
    bits = torch.where(b == 255, torch.full_like(b, 0x7FC00000), bits)
    return bits.view(torch.float32)


def float_to_e8m0(x: torch.Tensor) -> torch.Tensor:
    """Encode x as float8_e8m0fnu 2^ceil(log2 x): exact for powers of two, rounds UP otherwise.

    0 <= x <= 2^-127 gives byte 0 (2^-127); x > 2^127, negative, inf or NaN give byte 255 (NaN).
    """
    xf = x.float()
    b = (_ceil_log2(xf) + 127).clamp_min(0)
    b = torch.where(xf == 0, torch.zeros_like(b), b)
    ok = torch.isfinite(xf) & (xf >= 0) & (b <= 254)
    b = torch.where(ok, b, torch.full_like(b, 255))
    return b.to(torch.uint8).view(torch.float8_e8m0fnu)


def pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """DeepSeek's ue8m0 scale rule: fp32 2^ceil(log2(amax/qmax)), exact (0 -> 0, inf -> inf, <0/NaN -> NaN)."""
    r = amax.float() / qmax
    s = _exp2i(_ceil_log2(r))
    good = torch.isfinite(r) & (r > 0)
    return torch.where(good, s, torch.where(r >= 0, r, torch.full_like(r, math.nan)))


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """View packed FP4 storage (uint8, int8 or float4_e2m1fn_x2) as uint8 without copying."""
    if packed.dtype == torch.uint8:
        return packed
    if packed.dtype == torch.int8 or (_FLOAT4_X2 is not None and packed.dtype == _FLOAT4_X2):
        return packed.view(torch.uint8)
    raise TypeError(f"packed FP4 must be uint8, int8 or float4_e2m1fn_x2, got {packed.dtype}")


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Decode packed e2m1 bytes [..., K/2] to fp32 [..., K]: element 2j = low nibble, 2j+1 = high nibble."""
    b = _as_bytes(packed)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)
    return FP4_E2M1_VALUES.to(b.device)[codes.long()]


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes [..., K] pairwise into bytes (low nibble = even element) without checks."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack e2m1 codes 0..15 [..., K] (K even) into uint8 [..., K/2], low nibble = even element."""
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"pack_fp4 expects integer codes, got {codes.dtype}")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("pack_fp4 codes must lie in 0..15")
    return _pack(codes.to(torch.uint8))


def fp4_encode(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already divided by their scale) to e2m1 codes: nearest, ties to even, saturate at +-6.

    The sign bit is kept, so negative values that round to zero (and -0.0) give code 8 (-0); NaN gives code 0
    or 8 by its sign bit (e2m1 has no NaN).
    """
    a = x.float().abs()
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for i, m in enumerate(_FP4_MIDPOINTS):
        code += ((a >= m) if i % 2 else (a > m)).to(torch.uint8)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def _check_last_dim(x: torch.Tensor, block: int, what: str) -> None:
    """Raise ValueError naming the shape unless x's last dim is a positive multiple of block."""
    if block <= 0 or x.dim() == 0 or x.shape[-1] % block:
        raise ValueError(f"{what}: last dimension must be a multiple of block={block}, got shape {tuple(x.shape)}")


def _fp4_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 1 x block: s = 2^ceil(log2(max(amax, 6*2^-126)/6)), codes = e2m1(clamp(x/s, -6, 6)); [..., nb, block]."""
    xb = x.float().unflatten(-1, (-1, block))
    s = pow2_scale(xb.abs().amax(-1).clamp_min(FP4_AMAX_FLOOR), FP4_MAX)
    return fp4_encode((xb / s.unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX)), s


def quantize_fp4(w: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4-quantise a weight [N, K] (any leading dims) into (packed uint8 [N, K/2], e8m0 scale [N, K/block])."""
    _check_last_dim(w, block, "quantize_fp4")
    if w.shape[-1] % 2:
        raise ValueError(f"quantize_fp4: last dimension must be even, got shape {tuple(w.shape)}")
    codes, s = _fp4_blocks(w, block)
    return _pack(codes.flatten(-2)), float_to_e8m0(s)


def _scale_float(scale: torch.Tensor, what: str) -> torch.Tensor:
    """Return a weight scale (fp32, bf16 or float8_e8m0fnu) as fp32; refuse other dtypes to avoid misreads."""
    if scale.dtype not in _SCALE_DTYPES:
        raise TypeError(
            f"{what}: scale must be float32, bfloat16 or float8_e8m0fnu, got {scale.dtype} "
            "(view raw e8m0 bytes as torch.float8_e8m0fnu first)"
        )
    return e8m0_to_float(scale) if scale.dtype == torch.float8_e8m0fnu else scale.float()


def dequantize_fp4(
    packed: torch.Tensor, scale: torch.Tensor, block: int = 32, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantise MXFP4: packed [N, K/2] (uint8/int8/fp4x2) times scale [N, K/block] -> dtype [N, K]."""
    vals = unpack_fp4(packed)
    _check_last_dim(vals, block, "dequantize_fp4")
    expected = (*vals.shape[:-1], vals.shape[-1] // block)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"dequantize_fp4: expected scale shape {expected} for packed {tuple(packed.shape)} "
            f"(block={block}), found {tuple(scale.shape)}"
        )
    s = _scale_float(scale, "dequantize_fp4")
    return (vals.unflatten(-1, (-1, block)) * s.unsqueeze(-1)).flatten(-2).to(dtype)


def quantize_fp8_block(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), scale_fmt: str = "ue8m0"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise w [N, K] to e4m3 with one scale per block (edge blocks partial): scale = amax/448 or its pow2 ceil.

    amax is floored at 1e-4 (DeepSeek's act_quant floor; keeps all-zero blocks finite). Returns
    (float8_e4m3fn [N, K], scale [ceil(N/bn), ceil(K/bk)]) with scale float8_e8m0fnu ("ue8m0") or fp32 ("fp32").
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8_block expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if scale_fmt not in ("ue8m0", "fp32"):
        raise ValueError(f"scale_fmt must be 'ue8m0' or 'fp32', got {scale_fmt!r}")
    bn, bk = block
    if bn <= 0 or bk <= 0:
        raise ValueError(f"block sizes must be positive, got {block}")
    n, k = w.shape
    nb, kb = -(-n // bn), -(-k // bk)
    wp = F.pad(w.float(), (0, kb * bk - k, 0, nb * bn - n)).view(nb, bn, kb, bk)  # zero padding: amax unchanged
    amax = wp.abs().amax(dim=(1, 3)).clamp_min(ACT_AMAX_FLOOR)
    s = pow2_scale(amax, E4M3_MAX) if scale_fmt == "ue8m0" else amax / E4M3_MAX
    q = (wp / s[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(nb * bn, kb * bk)[:n, :k].contiguous()
    return q, (float_to_e8m0(s) if scale_fmt == "ue8m0" else s)


def dequantize_fp8_block(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantise a 128x128-block FP8 weight: W[i, j] = w8[i, j] * scale[i // 128, j // 128], in dtype."""
    if w8.dim() != 2:
        raise ValueError(f"dequantize_fp8_block expects a 2-D weight [N, K], got shape {tuple(w8.shape)}")
    n, k = w8.shape
    nb, kb = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    if tuple(scale.shape) != (nb, kb):
        raise ValueError(
            f"dequantize_fp8_block: expected scale shape {(nb, kb)} for weight {(n, k)} "
            f"(128x128 blocks), found {tuple(scale.shape)}"
        )
    s = _scale_float(scale, "dequantize_fp8_block")
    wp = F.pad(w8.float(), (0, kb * FP8_BLOCK - k, 0, nb * FP8_BLOCK - n)).view(nb, FP8_BLOCK, kb, FP8_BLOCK)
    out = (wp * s[:, None, :, None]).view(nb * FP8_BLOCK, kb * FP8_BLOCK)[:n, :k]
    return out.to(dtype).contiguous()


def act_quant(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek activation quant per 1 x block of the last dim: s = 2^ceil(log2(max(amax,1e-4)/448)), q = e4m3(x/s).

    Returns (q float8_e4m3fn, same shape as x; s fp32 [..., last/block]).
    """
    _check_last_dim(x, block, "act_quant")
    xb = x.float().unflatten(-1, (-1, block))
    s = pow2_scale(xb.abs().amax(-1).clamp_min(ACT_AMAX_FLOOR), E4M3_MAX)
    q = (xb / s.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), s


def fp8_sim(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """The reference's FP8 QAT simulation: act_quant(x, block) then dequantise, returned in x.dtype."""
    q, s = act_quant(x, block)
    return (q.float().unflatten(-1, (-1, block)) * s.unsqueeze(-1)).flatten(-2).to(x.dtype)


def fp4_sim(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """The reference's FP4 QAT simulation per 1 x block: e2m1(clamp(x/s, -6, 6)) * s, returned in x.dtype."""
    _check_last_dim(x, block, "fp4_sim")
    codes, s = _fp4_blocks(x, block)
    vals = FP4_E2M1_VALUES.to(x.device)[codes.long()]
    return (vals * s.unsqueeze(-1)).flatten(-2).to(x.dtype)


def _sylvester(n: int, dtype: torch.dtype) -> torch.Tensor:
    """The +-1 Sylvester Walsh-Hadamard matrix of order n (power of two), unscaled (exact in every float dtype)."""
    if not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"hadamard order must be a positive power of two, got {n!r}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sylvester Walsh-Hadamard matrix of order n (power of two) scaled by n^-0.5, so it is orthonormal."""
    return (_sylvester(n, torch.float64) * n**-0.5).to(dtype)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] times the orthonormal order-n Hadamard matrix, computed in fp32 and rounded once to x.dtype.

    DeepSeek's `rotate_activation` (`fast_hadamard_transform(x, scale=n**-0.5)`): fp32 sums of +-x, times the
    fp32 scale, one cast at the end. (A matmul with `hadamard(n, bf16)` would round the matrix entries and the
    product to bf16.)
    """
    n = x.shape[-1]
    h = _sylvester(n, torch.float32).to(x.device)
    return ((x.float() @ h) * torch.tensor(n**-0.5, dtype=torch.float32)).to(x.dtype)


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense weight in `dtype` from plain, FP8 (128x128 block scale) or packed FP4 (1x32 scale) storage.

    Leading dims (stacked experts) are allowed.
    """
    if scale is None:
        return weight.to(dtype)
    if weight.dtype == torch.float8_e4m3fn:
        if weight.dim() == 2:
            return dequantize_fp8_block(weight, scale, dtype=dtype)
        return torch.stack([dequantize(w, s, dtype) for w, s in zip(weight, scale)])
    if weight.dtype in (torch.uint8, torch.int8):
        lead = weight.shape[:-1]
        w = dequantize_fp4(weight.reshape(-1, weight.shape[-1]), scale.reshape(-1, scale.shape[-1]), dtype=dtype)
        return w.reshape(*lead, w.shape[-1])
    raise TypeError(f"cannot dequantise a {weight.dtype} weight with a {scale.dtype} scale")


# ---- Atlas A2/A3 W4A8 routed experts: int4 weights for the A8W4 grouped matmul ---------------------------------
# One home for the format: `dsv4 convert --experts w4a8` (convert.py) and AscendBackend(quant="w4a8").prepare()
# (ops/backend.py) both quantise, pack and build the assistance bias with these functions, so a converted checkpoint
# holds bit for bit what prepare() computes.
INT4_QMAX = 7  # symmetric int4: q in [-7, 7] (CR's converter; -8 is never produced)
INT4_CLIP_RATIOS = tuple(0.7 + i * 0.01 for i in range(61))  # CR's per-channel clip search: 0.70 .. 1.30


def quantize_int4_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per output channel with cann-recipes-infer's clip search: int8 values in [-7, 7], fp32 s [N].

    w [..., N, K]. For each row, the clip c = r * amax for r in 0.70, 0.71, ..., 1.30 with the least squared error
    of round(clamp(w, -c, c) / (c/7)) * (c/7) wins (first on ties); s = c / 7. (CR searches r * max(w_row), the
    signed row maximum; amax = max |w_row| is used here so rows whose extreme value is negative are not clipped
    on their large side.) Zero rows give s = 0, q = 0.
    """
    wf = w.float()
    amax = wf.abs().amax(-1, keepdim=True)
    best_err = torch.full_like(amax, float("inf"))
    best_c = amax.clone()
    for r in INT4_CLIP_RATIOS:
        c = r * amax
        s = torch.where(c > 0, c / INT4_QMAX, torch.ones_like(c))
        err = (wf - torch.round(wf.clamp(-c, c) / s) * s).square().sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_c = torch.where(better, c, best_c)
    s = best_c / INT4_QMAX
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(wf.clamp(-best_c, best_c) / safe).clamp(-INT4_QMAX, INT4_QMAX).to(torch.int8)
    return q, s.squeeze(-1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values [..., N] (N % 8 == 0, in [-8, 7]) -> int32 [..., N/8]: element 8i+j in bits 4j..4j+3 of word i.

    The layout `torch_npu.npu_convert_weight_to_int4pack` produces (op-plugin ConvertWeightToINT4Pack: ND,
    `(a & 0xF) | (b & 0xF) << 4 | ... | (h & 0xF) << 28`); as little-endian bytes, two int4 per byte with the
    even element in the low nibble (CR's converter packs the W4A8 experts that way along N)."""
    if q.shape[-1] % 8:
        raise ValueError(f"pack_int4: last dimension must be a multiple of 8, found {tuple(q.shape)}")
    nib = (q.to(torch.int64) & 0xF).unflatten(-1, (-1, 8))
    word = (nib << (4 * torch.arange(8, dtype=torch.int64, device=q.device))).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int32 [..., N/8] -> int8 [..., N] with sign-extended nibbles."""
    w = packed.to(torch.int64) & 0xFFFFFFFF
    nib = (w.unsqueeze(-1) >> (4 * torch.arange(8, dtype=torch.int64, device=packed.device))) & 0xF
    return torch.where(nib >= 8, nib - 16, nib).flatten(-2).to(torch.int8)


def int4_assistance_bias(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The A8W4 grouped matmul's fp32 assistance bias 8 * s[n] * sum_k q[n, k] for q [..., N, K], s [..., N].

    aclnnGroupedMatmulV5 (A8W4): bias = 8 x weight x scale reduced along k, computed offline; the kernel computes
    ((x - 8) @ W * s + bias) * per_token_scale, which this bias turns into x @ W * s * per_token_scale. The integer
    row sum is exact in fp32 (|sum| <= 7 K < 2^24), so the bias is the correctly rounded fp32 value.
    """
    return 8 * s.float() * q.float().sum(-1)


def a8w4_scale_u64(s: torch.Tensor) -> torch.Tensor:
    """fp32 per-channel scales -> the uint64 scale operand of the A8W4 grouped matmul, carried in torch.int64.

    Layout of CR's `scale_fp32_to_u64` (models/deepseek_v4/utils/convert_model.py): the fp32 bit pattern in the
    low 32 bits, high 32 bits zero, so the value is exact. (npu_trans_quant_param is not this layout: it keeps
    19 bits of the fp32 and sets bit 46 -- the A8W8 requant deq-scale format, aclnnTransQuantParam.)
    """
    return s.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


# ---- MX formats of the Ascend 950 (OCP MX v1.0 block scales; e8m0 scales travel in pairs) ----------------------
MX_BLOCK = 32  # elements per e8m0 scale in every MX format
# emax = exponent of the largest normal of the element format (OCP MX v1.0 table; aclnnDynamicMxQuant doc)
MX_EMAX: dict[torch.dtype | str, int] = {torch.float8_e4m3fn: 8, torch.float8_e5m2: 15, "e2m1": 2}
_FP8_MAX = {torch.float8_e4m3fn: E4M3_MAX, torch.float8_e5m2: 57344.0}


def cast_fp8_saturate(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Round fp32 x to an fp8 dtype, nearest-even, saturating at +-max (torch's e5m2 cast would give inf)."""
    if dtype not in _FP8_MAX:
        raise TypeError(f"cast_fp8_saturate: dtype must be float8_e4m3fn or float8_e5m2, got {dtype}")
    m = _FP8_MAX[dtype]
    return x.float().clamp(-m, m).to(dtype)


def mx_scale_floor(amax: torch.Tensor, emax: int) -> torch.Tensor:
    """OCP MX v1.0 e8m0 scale byte (npu_dynamic_mx_quant scale_alg 0): floor(log2 amax) - emax + 127.

    Clamped to [0, 254] (0 = 2^-127); amax 0 gives byte 0, inf or NaN byte 255 (NaN). Returns uint8. floor(log2)
    comes from frexp (exact, subnormals included), never from a float log.
    """
    a = amax.float()
    _, e = torch.frexp(a)  # a = m * 2^e with m in [0.5, 1): floor(log2 a) = e - 1
    b = (e.to(torch.int32) - 1 - emax + 127).clamp(0, 254)
    b = torch.where(a == 0, torch.zeros_like(b), b)
    b = torch.where(torch.isfinite(a), b, torch.full_like(b, 255))
    return b.to(torch.uint8)


def e8m0_pairs(scale: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Per-block e8m0 scales [..., nb (at dim), ...] in the 950 ops' pair layout: dim becomes ceil(nb/2) and a
    trailing dim of 2 holds blocks (2j, 2j+1); an odd count is padded with byte 0. Same dtype as `scale`."""
    b = _e8m0_bytes(scale, "e8m0_pairs")
    d = dim % b.dim()
    b = b.movedim(d, -1)
    if b.shape[-1] % 2:
        b = F.pad(b, (0, 1))  # zero byte = 2^-127; it never multiplies a real element
    p = b.unflatten(-1, (-1, 2)).movedim(-2, d).contiguous()  # [..., nb/2 at d, ..., 2]
    return p.view(scale.dtype) if scale.dtype != torch.uint8 else p


def e8m0_unpairs(pairs: torch.Tensor, n_blocks: int, dim: int = -1) -> torch.Tensor:
    """Inverse of e8m0_pairs: [..., ceil(nb/2) (at dim), ..., 2] -> [..., nb (at dim), ...], padding dropped."""
    b = _e8m0_bytes(pairs, "e8m0_unpairs")
    if b.shape[-1] != 2:
        raise ValueError(f"e8m0_unpairs: the last dim must be the pair dim of size 2, found shape {tuple(b.shape)}")
    d = dim % (b.dim() - 1)
    if b.shape[d] != -(-n_blocks // 2):
        raise ValueError(f"e8m0_unpairs: dim {dim} has {b.shape[d]} pairs, expected ceil({n_blocks}/2) "
                         f"= {-(-n_blocks // 2)} (shape {tuple(b.shape)})")
    flat = b.movedim(d, -2).flatten(-2)[..., :n_blocks]  # [..., nb]
    out = flat.movedim(-1, d).contiguous()
    return out.view(pairs.dtype) if pairs.dtype != torch.uint8 else out


def quantize_mxfp8(w: torch.Tensor, block: int = MX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 of w [..., K] per 1 x block along K with DeepSeek's ceil rule: s = 2^ceil(log2(max(amax,1e-4)/448)).

    The ceil rule never saturates, so re-quantising an FP8 weight whose 128x128 scale is a power of two is
    lossless (every element is an e4m3 value times a power of two no smaller than the new scale's).
    Returns (float8_e4m3fn [..., K], float8_e8m0fnu [..., K/block]).
    """
    _check_last_dim(w, block, "quantize_mxfp8")
    wb = w.float().unflatten(-1, (-1, block))
    s = pow2_scale(wb.abs().amax(-1).clamp_min(ACT_AMAX_FLOOR), E4M3_MAX)
    q = (wb / s.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), float_to_e8m0(s)


def dequantize_mxfp8(q: torch.Tensor, scale: torch.Tensor, block: int = MX_BLOCK,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantise MXFP8: q fp8 [..., K] times e8m0 scale [..., K/block] (one per 1 x block) -> dtype [..., K]."""
    _check_last_dim(q, block, "dequantize_mxfp8")
    expected = (*q.shape[:-1], q.shape[-1] // block)
    if tuple(scale.shape) != expected:
        raise ValueError(f"dequantize_mxfp8: expected scale shape {expected} for {tuple(q.shape)}, "
                         f"found {tuple(scale.shape)}")
    s = _scale_float(scale, "dequantize_mxfp8")
    return (q.float().unflatten(-1, (-1, block)) * s.unsqueeze(-1)).flatten(-2).to(dtype)


# ---- shared by the backends and the converter ----------------------------------------------------------------------
def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel of w [..., N, K]: (int8 [..., N, K], fp32 scale [..., N]).

    s = max|w_row| / 127, q = clamp(round_half_even(w / s), -127, 127) (cann-recipes-infer's W8A8 converter rule);
    an all-zero row keeps s = 0 and q = 0. Used by AscendBackend.prepare() and `dsv4 convert --target a3`.
    """
    wf = w.float()
    s = wf.abs().amax(-1) / 127.0
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(wf / safe.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, s


def act_quant_dequant(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """DeepSeek's FP8 activation simulation: `act_quant` per 1 x block, dequantised to fp32 (a last dim that is
    not a multiple of block raises, as DeepSeek's act_quant asserts)."""
    q, s = act_quant(x, block)
    return (q.float().unflatten(-1, (-1, block)) * s.unsqueeze(-1)).flatten(-2)
