"""The pure-PyTorch backend: every Backend op in plain torch, on any torch device."""
from .backend import ReferenceBackend, dequantize_weight

__all__ = ["ReferenceBackend", "dequantize_weight"]
