"""Shared numerics of the emulated ops: int8 rounding, exact integer GEMMs, group bounds of grouped ops,
dtype arguments and e8m0 scales of the 950 paths."""
from __future__ import annotations

import torch
from torch import Tensor

from dsv4_ascend import quant as _quant



INT8_MAX = 127.0


# ---- shared numerics ---------------------------------------------------------------------------------------------
def hf32(t: Tensor) -> Tensor:
    """fp32 -> HF32 as the Ascend Cube reads it: keep 10 mantissa bits, truncate (round toward zero) the low 13.

    (CR's HcPre goldens model an HF32 Cube matmul by clearing the low 13 mantissa bits.)
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


# |int8 x int8| <= 2^14, so any partial sum of at most 2^10 products is an integer of magnitude <= 2^24: exact in
# fp32 (24-bit significand) whatever the GEMM's summation order.
_EXACT_FP32_K = 1024


def _int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact int8 x int8 -> int32 matmul (batched a [..., M, K] @ b [..., K, N]): fp32 GEMMs over K-chunks of
    _EXACT_FP32_K (each exact), summed in int32. No fp64 copy of the weight (at K = N = 4096 one was 128 MiB per
    expert and call). Assumes torch's default fp32 matmul precision ("highest"; nothing here lowers it)."""
    af, bf = a.float(), b.float()
    k = af.shape[-1]
    out = (af[..., :_EXACT_FP32_K] @ bf[..., :_EXACT_FP32_K, :]).to(torch.int32)
    for i in range(_EXACT_FP32_K, k, _EXACT_FP32_K):
        out += (af[..., i:i + _EXACT_FP32_K] @ bf[..., i:i + _EXACT_FP32_K, :]).to(torch.int32)
    return out


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


# torch_npu spells these dtypes torch_npu.float8_e8m0fnu / torch_npu.float4_e2m1fn_x2 (dtype codes 293 / 296);
# torch 2.13 has dtypes of the same meaning, which stand in for them so `npu.float4_e2m1fn_x2` works with either
# module. FP4 data and e8m0 scales may arrive as uint8 (what torch_npu returns) or as these dtypes.
float8_e8m0fnu = torch.float8_e8m0fnu
float4_e2m1fn_x2 = torch.float4_e2m1fn_x2
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


_DTYPE_CODES = {1: torch.int8, 23: torch.float8_e5m2, 291: torch.float8_e5m2, 24: torch.float8_e4m3fn,
                292: torch.float8_e4m3fn, 293: torch.float8_e8m0fnu, 296: torch.float4_e2m1fn_x2}


def _dtype_arg(value, what: str) -> torch.dtype | None:
    """A dtype argument given as a torch dtype or a torch_npu dtype code (e.g. 291/292 FP8, 293 e8m0, 296 FP4x2)
    -> torch dtype."""
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


def _per_group(m: int, gid: Tensor, n_groups: int, gemm) -> Tensor:
    """The rows of a grouped op through their group's operand, one GEMM per group: gemm(rows, e) computes the rows
    `rows` (a slice of the M rows) against group e. Rows of a group are contiguous and in group order (the
    group_list contract), so an eager call reads the group sizes on the host and runs each group's GEMM on its own
    rows (no per-row weight copies); tail rows come back as zeros (callers mask them). While torch.compile traces
    (graph mode) it stays static: every group's GEMM on all M rows, each row keeping its own group's result."""
    if torch.compiler.is_compiling():
        out = None
        for e in range(n_groups):
            ye = gemm(slice(None), e)
            mine = (gid == e).view(-1, *([1] * (ye.dim() - 1)))
            out = torch.where(mine, ye, torch.zeros((), dtype=ye.dtype, device=ye.device) if out is None else out)
        return out
    sizes = torch.bincount(gid, minlength=n_groups + 1).tolist()
    parts, start = [], 0
    for e in range(n_groups):
        if sizes[e]:
            parts.append(gemm(slice(start, start + sizes[e]), e))
            start += sizes[e]
    empty = gemm(slice(0, 0), 0)
    parts.append(empty.new_zeros((m - start, *empty.shape[1:])))
    return torch.cat(parts)
