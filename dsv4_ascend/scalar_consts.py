"""Eager-dispatch helpers for the batch-1 decode step's thousands of tiny ops (docs/design.md "Performance").

A Python number in a tensor op (`x + eps`, `p // m`) is wrapped into a fresh 0-dim tensor on every call, ~6 us of
CPU on the machine measured against ~3 us for the same op with a tensor operand; a `.to(dtype)` that changes
nothing still costs ~2.6 us. `scalar` returns a cached 0-dim CPU tensor instead (a 0-dim tensor neither promotes
the other operand's dtype nor leaves the host: the kernels read it as the scalar it holds, the same value the
wrapped number gives), and `cast` skips a no-op `.to`. Under a compiler both give what they replace, so
compiled graphs do not change.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.compiler import is_compiling  # bound once: `torch.compiler` is a lazy attribute, ~1.4 us a lookup

__all__ = ["scalar", "cast"]

_CACHE: dict[tuple, Tensor] = {}


def scalar(v: float | int, dtype: torch.dtype = torch.float32) -> Tensor | float | int:
    """v as a cached 0-dim CPU tensor of `dtype` (fp32 for float operands, int64 for index arithmetic), or v
    itself while compiling."""
    if is_compiling():
        return v
    key = (v, dtype)
    t = _CACHE.get(key)
    if t is None:
        with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
            t = _CACHE[key] = torch.tensor(v, dtype=dtype)
    return t


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in `dtype`, without dispatching when it already is."""
    return t if t.dtype == dtype else t.to(dtype)
