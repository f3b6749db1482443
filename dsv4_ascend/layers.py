"""The linear layers and the norm every V4 module is built from: weight formats (plain, FP8 block-scaled, packed
MXFP4) held as stored, and the backend op each one calls."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backend import Backend
from .config import ModelConfig

__all__ = ["WeightFormats", "Linear", "RMSNorm", "param", "weight_and_scale"]


@dataclass(frozen=True)
class WeightFormats:
    """How linear weights are held in memory: 'plain' (dtype of the model), 'fp8' (e4m3 + 128x128 scale) or
    'fp4' (packed e2m1 + 1x32 scale). `dense` covers the FP8 linears of the checkpoint, `experts` the routed ones."""

    dense: str = "plain"
    experts: str = "plain"

    @classmethod
    def from_config(cls, cfg: ModelConfig, dequantize: bool = False) -> "WeightFormats":
        """The checkpoint's own formats, or all-plain when the weights are dequantised at load."""
        if dequantize or cfg.quant_method is None:
            return cls()
        return cls("fp8", cfg.expert_dtype or "fp8")


def param(*shape: int, dtype: torch.dtype, device=None) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device), requires_grad=False)


def weight_and_scale(out_f: int, in_f: int, fmt: str, dtype: torch.dtype, lead: tuple[int, ...] = (),
                      device=None) -> tuple[nn.Parameter, nn.Parameter | None]:
    if fmt == "plain":
        return param(*lead, out_f, in_f, dtype=dtype, device=device), None
    if fmt == "fp8":
        return (param(*lead, out_f, in_f, dtype=torch.float8_e4m3fn, device=device),
                param(*lead, -(-out_f // 128), -(-in_f // 128), dtype=torch.float8_e8m0fnu, device=device))
    if fmt == "fp4":
        if in_f % 32:
            raise ValueError(f"MXFP4 weights need in_features % 32 == 0, found {in_f}")
        return (param(*lead, out_f, in_f // 2, dtype=torch.int8, device=device),
                param(*lead, out_f, in_f // 32, dtype=torch.float8_e8m0fnu, device=device))
    raise ValueError(f"unknown weight format {fmt!r}; allowed: plain, fp8, fp4")


class Linear(nn.Module):
    """A bias-free linear layer whose weight may be FP8 block-scaled or packed MXFP4 (then it has `.scale`)."""

    def __init__(self, backend: Backend, in_f: int, out_f: int, fmt: str, dtype: torch.dtype, device=None):
        super().__init__()
        self.backend = backend
        self.in_features = in_f
        self.out_features = out_f
        self.weight, self.scale = weight_and_scale(out_f, in_f, fmt, dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.backend.linear(x, self.weight, self.scale)


class RMSNorm(nn.Module):
    """Weighted RMSNorm; the weight is kept in fp32 (the checkpoint stores bf16)."""

    def __init__(self, backend: Backend, dim: int, eps: float, device=None):
        super().__init__()
        self.backend = backend
        self.eps = eps
        self.weight = param(dim, dtype=torch.float32, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.backend.rms_norm(x, self.weight, self.eps)
