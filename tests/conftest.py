"""Shared fixtures: tiny random models with fixed seeds."""
from __future__ import annotations

import pytest
import torch

from dsv4_ascend.config import preset
from dsv4_ascend.model import Transformer
from dsv4_ascend.reference import ReferenceBackend
from dsv4_ascend.tiny import random_weights
from dsv4_ascend.weights import assign_tensors

torch.set_num_threads(2)


def build_tiny(seed: int = 0, dtype: torch.dtype = torch.float32, cfg=None, backend=None) -> Transformer:
    """The `tiny` preset (all three layer types, hash + learned MoE) with plain random weights."""
    cfg = cfg or preset("tiny")
    m = Transformer(cfg, backend or ReferenceBackend(), dtype)
    assign_tensors(m, random_weights(cfg, seed).items())
    return m


@pytest.fixture(scope="session")
def tiny_model() -> Transformer:
    return build_tiny()


def bf16_norms(model):
    """Round the norm weights to bf16 values (as the official checkpoint stores them), in place; returns model.

    npu_rms_norm casts gamma to the activation dtype, so parity in bf16 needs bf16-valued norm weights."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(p.to(torch.bfloat16).float())
    return model
