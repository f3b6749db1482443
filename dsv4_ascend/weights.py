"""Putting named tensors (official checkpoint names) into a model, with errors that name the tensor."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

__all__ = ["WeightError", "assign_tensors"]


class WeightError(ValueError):
    """A checkpoint tensor is missing, unexpected, or has the wrong shape or dtype."""


def _compatible(dst: Tensor, src: Tensor) -> bool:
    if dst.dtype == src.dtype:
        return True
    fl = (torch.float32, torch.bfloat16, torch.float16)
    # Float weights may change precision (e.g. bf16 norm weights kept in fp32); int8/uint8 packed FP4 both ok;
    # ue8m0 and fp32 scales are both accepted for FP8 weights.
    if dst.dtype in fl and src.dtype in fl:
        return True
    if {dst.dtype, src.dtype} <= {torch.int8, torch.uint8}:
        return True
    if dst.dtype == torch.float8_e8m0fnu and src.dtype in fl:
        return True
    return dst.dtype == torch.int64 and src.dtype == torch.int32


def assign_tensors(model: nn.Module, tensors: Iterable[tuple[str, Tensor]], strict: bool = True,
                   source: str = "state dict") -> set[str]:
    """Copy tensors into `model.checkpoint_tensors()` by name; returns the names assigned.

    A float scale given where the model holds ue8m0 replaces the parameter (keeping the checkpoint's fp32 scale).
    """
    targets = dict(model.checkpoint_tensors())
    params = dict(model.named_parameters())
    done: set[str] = set()
    for name, src in tensors:
        if name not in targets:
            if strict:
                raise WeightError(f"{source}: unexpected tensor '{name}' (not a parameter of this model/config)")
            continue
        dst = targets[name]
        if tuple(dst.shape) != tuple(src.shape):
            raise WeightError(f"{source}: tensor '{name}' has shape {list(src.shape)}, expected {list(dst.shape)}")
        if not _compatible(dst, src):
            raise WeightError(f"{source}: tensor '{name}' has dtype {src.dtype}, expected {dst.dtype}")
        if dst.dtype == torch.float8_e8m0fnu and src.dtype != dst.dtype and name in params:
            mod_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(mod_name), attr, nn.Parameter(src.float().to(dst.device), requires_grad=False))
        elif dst.dtype == src.dtype or dst.dtype.is_floating_point == src.dtype.is_floating_point:
            with torch.no_grad():
                if dst.dtype in (torch.int8, torch.uint8):
                    dst.view(torch.uint8).copy_(src.view(torch.uint8))
                elif dst.dtype == torch.float8_e8m0fnu:
                    dst.view(torch.uint8).copy_(src.view(torch.uint8))
                else:
                    dst.copy_(src)
        else:
            with torch.no_grad():
                dst.copy_(src)
        done.add(name)
    if strict:
        missing = sorted(set(targets) - done)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise WeightError(f"{source}: missing {len(missing)} tensors: {', '.join(missing[:5])}{more}")
    return done
