"""The Ascend backend: torch_npu fused operators (or their CPU emulator) behind the Backend seam.

Importing this package never imports torch_npu; `AscendBackend()` picks torch_npu only when
`npu_available()` says it imports and sees an NPU, else `dsv4_ascend.ops.emulator`.
"""
from . import emulator
from .backend import AscendBackend, default_npu
from .npu import load_custom_ops, load_torch_npu, npu_available

__all__ = ["AscendBackend", "default_npu", "emulator", "npu_available", "load_torch_npu", "load_custom_ops"]
