"""V4's MoE: the sqrt-softplus router (learned top-k with a correction bias, or hash-routed), the stacked routed
experts and the shared expert, whose output joins the routed experts' fp32 sum (DeepSeek's order)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from .backend import Backend, fp32_linear
from .config import ModelConfig
from .layers import Linear, WeightFormats, param, weight_and_scale

__all__ = ["Gate", "Expert", "RoutedExperts", "MoE"]


class Gate(nn.Module):
    """Router: sqrt-softplus scores; learned top-k with a correction bias, or a fixed token->experts table."""

    def __init__(self, backend: Backend, cfg: ModelConfig, hashed: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.backend = backend
        self.k = cfg.num_experts_per_tok
        self.scale = cfg.routed_scaling_factor
        self.weight = param(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype, device=device)
        self.hashed = hashed
        if hashed:
            self.tid2eid = param(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.int64, device=device)
            self.bias = None
        else:
            self.bias = param(cfg.n_routed_experts, dtype=torch.float32, device=device)

    def forward(self, x: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        logits = fp32_linear(x, self.weight)
        hash_ids = self.tid2eid[input_ids] if self.hashed else None
        return self.backend.route(logits, self.bias, hash_ids, self.k, self.scale)


class Expert(nn.Module):
    """A clamped SwiGLU MLP (the shared expert): w1 gate, w3 up, w2 down."""

    def __init__(self, backend: Backend, cfg: ModelConfig, fmt: str, dtype: torch.dtype, device=None):
        super().__init__()
        self.backend = backend
        self.limit = cfg.swiglu_limit
        d, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.w1 = Linear(backend, d, i, fmt, dtype, device)
        self.w2 = Linear(backend, i, d, fmt, dtype, device)
        self.w3 = Linear(backend, d, i, fmt, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return self.backend.swiglu_mlp(x, self.w1.weight, self.w2.weight, self.w3.weight, self.w1.scale,
                                       self.w2.scale, self.w3.scale, self.limit)


class RoutedExperts(nn.Module):
    """The layer's routed experts `first .. first+count-1`, stacked: w1/w3 [E,I,D], w2 [E,D,I] (+ scales)."""

    def __init__(self, cfg: ModelConfig, fmt: str, dtype: torch.dtype, first: int, count: int, device=None):
        super().__init__()
        self.first = first
        self.count = count
        d, i = cfg.hidden_size, cfg.moe_intermediate_size
        self.w1, self.w1_scale = weight_and_scale(i, d, fmt, dtype, (count,), device)
        self.w2, self.w2_scale = weight_and_scale(d, i, fmt, dtype, (count,), device)
        self.w3, self.w3_scale = weight_and_scale(i, d, fmt, dtype, (count,), device)

    def checkpoint_tensors(self, prefix: str) -> Iterator[tuple[str, Tensor]]:
        for j in range(self.count):
            for w in ("w1", "w2", "w3"):
                yield f"{prefix}experts.{self.first + j}.{w}.weight", getattr(self, w)[j]
                s = getattr(self, f"{w}_scale")
                if s is not None:
                    yield f"{prefix}experts.{self.first + j}.{w}.scale", s[j]


class MoE(nn.Module):
    """Routed experts (hash- or score-routed) plus the shared expert."""

    def __init__(self, backend: Backend, cfg: ModelConfig, hashed: bool, fmt: WeightFormats, dtype: torch.dtype,
                 expert_range: tuple[int, int] | None = None, device=None):
        super().__init__()
        self.backend = backend
        self.limit = cfg.swiglu_limit
        first, last = expert_range or (0, cfg.n_routed_experts)
        self.gate = Gate(backend, cfg, hashed, dtype, device)
        self.routed = RoutedExperts(cfg, fmt.experts, dtype, first, last - first, device)
        self.n_experts = cfg.n_routed_experts
        self.ep = None  # set by dsv4_ascend.parallel for expert parallelism
        self.shared_experts = Expert(backend, cfg, fmt.dense, dtype, device) if cfg.n_shared_experts else None

    def forward(self, x: Tensor, input_ids: Tensor, sync_free: bool = False) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x, input_ids.reshape(-1))
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        if self.ep is None:  # the shared output joins the routed experts' fp32 sum; one cast
            return self.run_local_experts(x, weights, ids, sync_free, shared).view(shape)
        # expert parallel: dispatch to the experts' ranks and combine (parallel.py); the combine adds the shared
        # output to its fp32 sum and casts
        return self.ep(self, x, weights, ids, sync_free, shared).view(shape)

    def run_local_experts(self, x: Tensor, weights: Tensor, ids: Tensor, sync_free: bool = False,
                          shared: Tensor | None = None) -> Tensor:
        """This rank's share of the routed output (+ `shared`, added in fp32): pairs routed to experts outside
        `routed` get weight 0."""
        r = self.routed
        if r.count != self.n_experts:
            local = (ids >= r.first) & (ids < r.first + r.count)
            weights = weights * local
            ids = torch.where(local, ids - r.first, 0)
        return self.backend.experts(x, weights, ids, r.w1, r.w2, r.w3, r.w1_scale, r.w2_scale, r.w3_scale,
                                    self.limit, sync_free, shared)
