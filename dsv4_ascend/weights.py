"""Putting named tensors (official checkpoint names) into a model, with errors that name the tensor.

`assign_tensors` takes in-memory tensors (tests, converters); `dsv4_ascend.checkpoint` streams safetensors files
through the same `put_tensor`, so both accept the same dtypes and convert them the same way.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from . import quant

__all__ = ["WeightError", "assign_tensors", "put_tensor", "compatible", "check_values"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_BYTES = (torch.int8, torch.uint8)


class WeightError(ValueError):
    """A checkpoint tensor is missing, unexpected, or has the wrong shape or dtype."""


def compatible(dst: torch.dtype, src: torch.dtype) -> bool:
    """Whether a `src` tensor can fill a `dst` parameter without changing what it means.

    Float weights may change precision (bf16 norm weights are kept in fp32); packed FP4 may be int8 or uint8;
    scales may be e8m0, fp32/bf16/fp16 (a float scale multiplies exactly like an e8m0 one) or raw e8m0 bytes
    (uint8) where the model holds e8m0; int32 token tables widen to int64.
    """
    if dst == src:
        return True
    if dst in _FLOATS and src in _FLOATS:
        return True
    if dst in _BYTES and src in _BYTES:
        return True
    if dst == torch.float8_e8m0fnu and (src in _FLOATS or src == torch.uint8):
        return True
    if dst in _FLOATS and src == torch.float8_e8m0fnu:  # an fp32 scale stack that also receives e8m0 scales
        return True
    return dst == torch.int64 and src == torch.int32


def _bad_values(t: Tensor) -> Tensor | None:
    """Mask of the entries of `t` that are NaN / inf, by dtype; None when the dtype has no such values.

    e4m3fn (OCP FP8): no inf, NaN is S.1111.111 (bytes 0x7F / 0xFF). e8m0 (OCP MX scales): 0xFF is NaN.
    Packed FP4 (e2m1) and integers encode only finite values.
    """
    if t.dtype == torch.float8_e4m3fn:
        return (t.view(torch.uint8) & 0x7F) == 0x7F
    if t.dtype == torch.float8_e8m0fnu:
        return t.view(torch.uint8) == 0xFF
    if t.dtype in _FLOATS or t.dtype == torch.float64:
        return ~torch.isfinite(t)
    return None


def check_values(name: str, t: Tensor, source: str = "state dict", error: type[WeightError] = WeightError,
                 raw_e8m0: bool = False) -> None:
    """Raise `error` naming the tensor when `t` holds a NaN or inf (`raw_e8m0`: uint8 bytes are e8m0 scales).

    The loaders call it on every quantisation scale (small) and, unless switched off, on FP8 and float weights."""
    t = t.view(torch.float8_e8m0fnu) if raw_e8m0 and t.dtype == torch.uint8 else t
    # Fast tests first (reductions, no temporaries; ~3x the speed of building the mask), the mask only for the
    # message. e4m3fn's NaN bytes are the extremes of two views: 0xFF the uint8 maximum, 0x7F the int8 maximum.
    if t.dtype == torch.float8_e4m3fn and t.numel() and int(t.view(torch.uint8).amax()) != 0xFF \
            and int(t.view(torch.int8).amax()) != 0x7F:
        return
    if t.dtype == torch.float8_e8m0fnu and t.numel() and int(t.view(torch.uint8).amax()) != 0xFF:
        return
    if t.dtype in _FLOATS and all(bool(torch.isfinite(c).all()) for c in t.reshape(-1).split(1 << 22)):
        return  # in 4M-element pieces: no full-size mask for a 1 GiB embedding
    mask = _bad_values(t)
    if mask is None or not bool(mask.any()):
        return
    n = int(mask.sum())
    first = [int(i) for i in torch.nonzero(mask)[0]] if t.dim() else []
    raise error(f"{source}: tensor '{name}' ({str(t.dtype).replace('torch.', '')} {list(t.shape)}) holds {n} "
                f"NaN/inf value{'s' if n > 1 else ''} (first at index {first}); the checkpoint is damaged")


def _owner(model: nn.Module, target: Tensor) -> tuple[nn.Module, str]:
    """The module and attribute of the parameter `target` is (a per-expert view of a stack counts as its stack)."""
    base = target._base if target._base is not None else target
    for pname, p in model.named_parameters():
        if p is base:
            mod_name, _, attr = pname.rpartition(".")
            return model.get_submodule(mod_name), attr
    raise KeyError("tensor is not a parameter (or a view of one) of the model")


def _to_float_scale(model: nn.Module, target: Tensor) -> None:
    """Hold the e8m0 scale parameter behind `target` in fp32 from now on (values already there decode exactly)."""
    mod, attr = _owner(model, target)
    old = getattr(mod, attr)
    setattr(mod, attr, nn.Parameter(quant.e8m0_to_float(old.detach()), requires_grad=False))


def put_tensor(model: nn.Module, targets: dict[str, Tensor], name: str, src: Tensor, source: str = "state dict",
               error: type[WeightError] = WeightError) -> bool:
    """Check `src` against `targets[name]` (from `model.checkpoint_tensors()`) and copy it in.

    Float scales where the model holds e8m0: a scale of its own parameter (FP8 linears) is kept as stored, in
    fp32 (the parameter is replaced); a scale inside a stack of routed experts is stored as e8m0 when every value
    is an exact power of two (always so for MXFP4), otherwise the whole stack moves to fp32. Returns True when a
    parameter was replaced: then `targets` is stale and must be rebuilt.
    """
    dst = targets[name]
    if tuple(dst.shape) != tuple(src.shape):
        raise error(f"{source}: tensor '{name}' has shape {list(src.shape)}, expected {list(dst.shape)}")
    if not compatible(dst.dtype, src.dtype):
        raise error(f"{source}: tensor '{name}' has dtype {src.dtype}, expected {dst.dtype}")
    replaced = False
    if dst.dtype == torch.float8_e8m0fnu and src.dtype in _FLOATS:
        stacked = dst._base is not None
        enc = quant.float_to_e8m0(src)
        if stacked and torch.equal(quant.e8m0_to_float(enc), src.float()):
            src = enc
        else:
            _to_float_scale(model, dst)
            dst, replaced = dict(model.checkpoint_tensors())[name], True
    with torch.no_grad():
        if dst.dtype in _BYTES or dst.dtype in (torch.float8_e8m0fnu, torch.float8_e4m3fn):
            dst.view(torch.uint8).copy_(src.view(torch.uint8))
        elif src.dtype == torch.float8_e8m0fnu:
            dst.copy_(quant.e8m0_to_float(src))
        else:
            dst.copy_(src)
    return replaced


def assign_tensors(model: nn.Module, tensors: Iterable[tuple[str, Tensor]], strict: bool = True,
                   source: str = "state dict") -> set[str]:
    """Copy tensors into `model.checkpoint_tensors()` by name; returns the names assigned.

    A float scale given where the model holds ue8m0 replaces the parameter (keeping the checkpoint's fp32 scale);
    see `put_tensor` for routed-expert stacks.
    """
    targets = dict(model.checkpoint_tensors())
    done: set[str] = set()
    for name, src in tensors:
        if name not in targets:
            if strict:
                raise WeightError(f"{source}: unexpected tensor '{name}' (not a parameter of this model/config)")
            continue
        if put_tensor(model, targets, name, src, source):
            targets = dict(model.checkpoint_tensors())
        done.add(name)
    if strict:
        missing = sorted(set(targets) - done)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise WeightError(f"{source}: missing {len(missing)} tensors: {', '.join(missing[:5])}{more}")
    return done
