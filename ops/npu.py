"""Lazy, failure-tolerant loading of torch_npu and of the V4 custom-op package.

Nothing here imports torch_npu at module import time: on a machine without CANN, `import torch_npu` raises
(ImportError on libhccl.so) and an installed torch_npu even breaks a plain `import torch` through its autoload
entry point (torch's device-backend autoload imports it). Every probe returns a reason instead of raising.
"""
from __future__ import annotations

import importlib
import importlib.util

from . import emulator

__all__ = ["npu_available", "load_torch_npu", "load_custom_ops", "custom_or_emulated"]


def npu_available() -> tuple[bool, str]:
    """(True, "ok") when torch_npu imports and an NPU is visible, else (False, why)."""
    if importlib.util.find_spec("torch_npu") is None:
        return False, "torch_npu not installed"
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except (ImportError, OSError, RuntimeError) as e:
        return False, f"{type(e).__name__}: {e}"
    import torch

    try:
        ok = bool(torch.npu.is_available())
    except Exception as e:  # noqa: BLE001 - a broken driver must not take the caller down
        return False, f"torch.npu.is_available() failed: {type(e).__name__}: {e}"
    return (ok, "ok") if ok else (False, "torch_npu imported but no NPU is visible")


def load_torch_npu():
    """The torch_npu module, or raise RuntimeError naming why it cannot be used."""
    ok, why = npu_available()
    if not ok:
        raise RuntimeError(f"torch_npu is not usable here: {why}")
    return importlib.import_module("torch_npu")


def load_custom_ops():
    """`torch.ops.custom` when the V4 custom-op wheel (cann-recipes-infer `custom_ops`) is installed, else None.

    The wheel registers its schemas on import (and also copies them onto `torch_npu.*`); we only need the
    namespace. Returns None, never raises, when the package is absent or fails to load.
    """
    if importlib.util.find_spec("custom_ops") is None:
        return None
    try:
        importlib.import_module("custom_ops")
    except (ImportError, OSError, RuntimeError):
        return None
    import torch

    ns = torch.ops.custom
    try:
        ns.npu_hc_pre  # noqa: B018 - attribute probe: raises when the schema is not registered
    except (AttributeError, RuntimeError):
        return None
    return ns


def custom_or_emulated(custom, name: str):
    """The custom op `name` from the provider `custom`, or the emulator's plain-torch one when the provider lacks it
    (those are aten ops, so they also run on an NPU)."""
    if custom is not None and hasattr(custom, name):
        return getattr(custom, name)
    return getattr(emulator, name)
