"""Rotary position embedding tables: plain RoPE (sliding-window layers, MTP) and YaRN (CSA/HCA layers).

Only the last `qk_rope_head_dim` dims of a head rotate, as interleaved pairs (2k, 2k+1). The rotation itself
is a Backend op; this module owns the frequencies and the cos/sin at given positions.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import ModelConfig

__all__ = ["rope_inv_freq", "RopeTable", "apply_rope_tail"]


def rope_inv_freq(dim: int, theta: float, yarn_factor: float = 1.0, original_max: int = 0,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> Tensor:
    """Per-pair angular frequencies [dim/2] in fp32; YaRN-interpolated when yarn_factor > 1 and original_max > 0."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn_factor <= 1.0 or original_max <= 0:
        return inv

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv / yarn_factor * ramp + inv * (1 - ramp)


class RopeTable:
    """Frequencies of one RoPE table; `cos_sin(positions)` gives cos/sin [..., dim/2] in fp32."""

    def __init__(self, name: str, inv_freq: Tensor) -> None:
        self.name = name
        self.inv_freq = inv_freq

    @classmethod
    def main(cls, cfg: ModelConfig) -> "RopeTable":
        return cls("main", rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta))

    @classmethod
    def compress(cls, cfg: ModelConfig) -> "RopeTable":
        return cls("compress", rope_inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_factor,
                                             cfg.rope_original_max_position, cfg.rope_beta_fast, cfg.rope_beta_slow))

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq if self.inv_freq.device == positions.device else self.inv_freq.to(positions.device)
        angles = positions.to(torch.float32).unsqueeze(-1) * inv
        return angles.cos(), angles.sin()


def apply_rope_tail(backend, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the last 2*cos.shape[-1] dims of x (the rope slice); the leading 'nope' dims pass through."""
    r = 2 * cos.shape[-1]
    return torch.cat([x[..., :-r], backend.rope(x[..., -r:], cos, sin)], dim=-1)
