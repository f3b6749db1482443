"""Compiled prefill: the model's per-token backend ops compiled once, with dynamic shapes, for every chunk.

A prefill chunk's shapes depend on its length and, through the cache (compressed entries read so far, windows a
chunk closes), on its start position; the routed experts group tokens by a host read of their counts. A whole-
forward graph would recompile per start or break per layer. What is compiled instead is the set of backend ops
whose inputs are per-token activations and weights (`PREFILL_OPS`: mHC pre/post/head with their Sinkhorn loop,
the shared expert, RoPE (its pairwise form when compiled: inductor's flip kernel is slow) and RMSNorm): each is
one graph with symbolic sizes, shared by every layer (weights are graph inputs) and every chunk length, so no
chunk recompiles after the first calls. In eager mode these ops are chains of small elementwise kernels (the
Sinkhorn normalisation alone is ~80 per call); compiled they fuse. GEMMs, the cache reads/writes, the compressor,
the indexer top-k, attention and the grouped experts run as in eager (`docs/design.md`, performance section).

Backends: inductor on CPU and CUDA; torchair's NPU backend on Ascend (wired, not run here); the emulated Ascend
backend (a correctness model) traces with "aot_eager", as `GraphDecoder` does.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

from dsv4_ascend.cache import KVCache
from dsv4_ascend.model import Transformer

__all__ = ["PREFILL_OPS", "GraphPrefiller"]

# Backend ops compiled for prefill: inputs [B, S, ...] activations and weights only (no cache, no host reads).
PREFILL_OPS = ("hc_pre", "hc_post", "hc_head", "swiglu_mlp", "rope", "rms_norm")


def _prefill_compiler(device: torch.device) -> str | Callable:
    if device.type == "npu":  # pragma: no cover - needs an NPU and CANN; not verified here
        import torchair  # noqa: PLC0415  (lazy: only with torch_npu + CANN)

        return torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
    return "inductor"


class GraphPrefiller:
    """`prefiller(ids, cache, slots, start_pos, last_only)` = `model(...)` (one prefill chunk) with the backend's
    `PREFILL_OPS` compiled (dynamic shapes); counts compilations in `compiles`."""

    def __init__(self, model: Transformer, compiler: str | Callable | None = None,
                 ops: tuple[str, ...] = PREFILL_OPS) -> None:
        self.model = model
        self.backend = model.backend
        missing = [op for op in ops if not callable(getattr(self.backend, op, None))]
        if missing:
            raise ValueError(f"compiled prefill: backend {self.backend.name!r} has no op(s) {missing}")
        device = model.embed.weight.device
        if compiler is None and getattr(self.backend, "emulated", False) and device.type == "cpu":
            compiler = "aot_eager"  # the torch_npu emulator: capture without C++ code generation (GraphDecoder)
        inner = compiler if compiler is not None else _prefill_compiler(device)
        inner = torch._dynamo.lookup_backend(inner) if isinstance(inner, str) else inner
        self.compiles = 0

        def counting(gm, example_inputs):
            self.compiles += 1
            return inner(gm, example_inputs)

        # A few graphs per op (input ranks, optional weights); each must stay cached.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
        self._ops = {op: torch.compile(getattr(self.backend, op), dynamic=True, fullgraph=True, backend=counting)
                     for op in ops}

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        """The compiled ops shadow the backend's methods (instance attributes) for the duration of one call;
        every module of the model holds this same backend object."""
        shadowed = {op: self.backend.__dict__[op] for op in self._ops if op in self.backend.__dict__}
        if shadowed:
            raise RuntimeError(f"compiled prefill: backend ops {sorted(shadowed)} are already replaced")
        self.backend.__dict__.update(self._ops)
        try:
            yield
        finally:
            for op in self._ops:
                del self.backend.__dict__[op]

    def __call__(self, ids: Tensor, cache: KVCache, slots: Tensor, start_pos: int, last_only: bool = False) -> Tensor:
        """One prefill chunk: fp32 logits [B,S,V] (or [B,1,V] with last_only), as `Transformer.forward`."""
        with self._installed():
            return self.model(ids, cache, slots, start_pos, last_only=last_only)

    def prefill_streams(self, *args, **kwargs):
        """`Transformer.prefill_streams` (the engine's ragged chunk batches) with the compiled ops installed."""
        with self._installed():
            return self.model.prefill_streams(*args, **kwargs)

    def warmup(self, lengths: tuple[int, ...] = (2, 3)) -> None:
        """Compile now: one-row chunks of `lengths` tokens (last-position logits, as the engine asks) in a scratch
        cache. Sizes 0 and 1 are specialised by the compiler: other batch sizes, full logits or a 1-token chunk
        compile their own graphs the first time they occur."""
        dev = self.model.embed.weight.device
        cache = self.model.new_cache(1, max(lengths))
        for n in lengths:
            self(torch.zeros(1, n, dtype=torch.int64, device=dev), cache, torch.zeros(1, dtype=torch.int64,
                                                                                      device=dev), 0, True)
