"""Emulated norm, rotary embedding and format ops (torch_npu built-ins and CR's in-place partial RoPE)."""
from __future__ import annotations

import torch
from torch import Tensor


# ---- norm, rope, formats -----------------------------------------------------------------------------------------
def npu_rms_norm(self: Tensor, gamma: Tensor, epsilon: float = 1e-6) -> tuple[Tensor, Tensor]:
    """TNPU `npu_rms_norm(self, gamma, epsilon=1e-6) -> (y, rstd)` (`self` = x, the schema's name).

    y = x * rsqrt(mean(x^2, -1) + eps) * gamma computed in fp32, cast once to x.dtype; rstd fp32 with the
    normalised (last) dim kept as size 1. gamma must have x's dtype (documented constraint; the emulator
    enforces it so the backend cannot silently rely on mixed dtypes).
    """
    x = self
    if gamma.dtype != x.dtype:
        raise TypeError(f"npu_rms_norm: gamma dtype {gamma.dtype} must equal x dtype {x.dtype}")
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def npu_rotary_mul(self: Tensor, r1: Tensor, r2: Tensor, rotary_mode: str = "half", rotate=None) -> Tensor:
    """TNPU `npu_rotary_mul(self, r1, r2, rotary_mode='half', rotate=None) -> Tensor` (`self` = the input).

    4-D input (BSND/BNSD/SBND), r1 = cos and r2 = sin broadcastable to it, all of one dtype.
    half: out = r1*x + r2*cat(-x2, x1); interleave: out = r1*x + r2*rot(x) with rot pairs (x2i, x2i+1) ->
    (-x2i+1, x2i), so cos/sin must be repeated per pair. Computed in fp32, cast to input dtype (the kernel's
    internal precision for bf16 is not documented (verify)).
    """
    input = self  # noqa: A001
    if rotate is not None:
        raise NotImplementedError("npu_rotary_mul: the `rotate` matrix is not emulated (None only)")
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
    """CR custom `inplace_partial_rotary_mul(x, r1, r2, *, rotary_mode, partial_slice) -> ()` (CR op doc;
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


def npu_format_cast(self: Tensor, acl_format: int, *, customize_dtype=None, input_dtype=None) -> Tensor:
    """TNPU `npu_format_cast(self, acl_format, *, customize_dtype=None, input_dtype=None)`.

    FRACTAL_NZ (29) / ND (2) change only the device memory tiling; torch keeps the logical shape, so on CPU this
    is the identity.
    """
    input = self  # noqa: A001
    if acl_format not in (2, 29):
        raise NotImplementedError(f"npu_format_cast: format {acl_format} not emulated (2 = ND, 29 = NZ)")
    return input
