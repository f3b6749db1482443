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


def graph_vs_eager_logits(model, dec, prompts: list[list[int]], params, max_len: int, steps: int):
    """Logits of a GraphDecoder's steps and of eager `model.decode`, step by step on identical cache copies:
    two rows prefilled with the first 5 tokens of `prompts[0]` / `prompts[1]`, then `steps` greedy decode steps
    (eager's argmax fed to both). Yields (eager, graph) logits per step."""
    ids = torch.tensor([p[:5] for p in prompts[:2]])
    slots = torch.arange(2)
    eager_cache = model.new_cache(dec.cache.max_slots, max_len)
    model(ids, eager_cache, slots, 0)
    for slot in (0, 1):
        dec.cache.allocate(slot, max_len)  # an engine freed its pages when its requests finished
    model(ids, dec.cache, slots, 0)
    tok = ids[:, -1:]
    for t in range(5, 5 + steps):
        pos = torch.full((2,), t)
        e = model.decode(tok, pos, eager_cache, slots)[:, -1]
        g = dec.step(tok, pos, slots, [params, params]).logits
        yield e, g
        tok = e.argmax(-1, keepdim=True)


@pytest.fixture(scope="module")
def served_tiny(tmp_path_factory):
    """The tiny random model written in the official format and loaded as `dsv4 serve` loads it (fp32):
    (model, tokenizer, checkpoint directory). One per test module, as each server module starts its own engines."""
    from dsv4_ascend.loading import load_model
    from dsv4_ascend.tiny import write_tiny_checkpoint
    from dsv4_ascend.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("tiny")
    write_tiny_checkpoint(d, seed=0)
    model, path = load_model(str(d), dtype="float32")
    return model, load_tokenizer(path), d
