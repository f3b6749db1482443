"""Tiny random DeepSeek-V4 models for tests and the demo, in exactly the official on-disk tensor layout."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .backend import Backend
from .config import ModelConfig

__all__ = ["random_weights"]


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from .model import Transformer  # local import: model imports nothing from here

    m = Transformer(cfg, Backend(), torch.float32, device="meta")
    return {name: tuple(t.shape) for name, t in m.checkpoint_tensors()}


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    """Dense fp32 weights (int64 for tid2eid) under official names, at magnitudes that exercise every path."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    out: dict[str, Tensor] = {}
    for name, shape in sorted(_shapes(cfg).items()):
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("tid2eid"):
            out[name] = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: shape[1]]
                                     for _ in range(shape[0])])
        elif "norm" in name and leaf == "weight":
            out[name] = randn(*shape, std=0.1, mean=1.0)
        elif leaf.endswith("_fn"):
            out[name] = randn(*shape, std=1.0 / math.sqrt(shape[-1]))
        elif leaf.endswith("_base"):
            out[name] = randn(*shape, std=0.5)
        elif leaf.endswith("_scale") and leaf.startswith("hc_"):
            out[name] = torch.rand(*shape, generator=g) + 0.5
        elif leaf in ("attn_sink", "ape"):
            out[name] = randn(*shape, std=0.5)
        elif name.endswith("gate.bias"):
            out[name] = randn(*shape, std=0.1)
        elif name == "embed.weight":
            out[name] = randn(*shape)
        else:  # linear weights [out, in]
            out[name] = randn(*shape, std=1.0 / math.sqrt(shape[-1]))
    return out
