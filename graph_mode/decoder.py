"""Static-graph decode: the decode step (model + sampling) captured once per batch-size bucket.

The step is the engine's `decode_step.Decoder`: same call and result as the eager one. On NPU the step compiles with torchair's NPU backend in "reduce-overhead" mode (aclgraph, as Huawei's V4
recipe runs it); elsewhere with `torch.compile(fullgraph=True)` (inductor; on CUDA "reduce-overhead" adds CUDA
graphs). Batches are padded to the next bucket with rows that point at a reserved pad slot, whose writes land in
the cache's null page, so every step of a bucket has identical shapes and addresses and never recompiles.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

import torch
from torch import Tensor, nn

from dsv4_ascend.cache import KVCache
from dsv4_ascend.decode_step import StepResult, next_tokens
from dsv4_ascend.logits_process import AdjustBatch
from dsv4_ascend.model import Transformer
from dsv4_ascend.sampling import SamplingBatch, SamplingParams, sample

__all__ = ["GRAPH_TUNING", "BucketGraphs", "GraphDecoder", "bucket_for", "default_buckets"]


def default_buckets(max_batch: int) -> list[int]:
    """Powers of two up to max_batch (and max_batch itself)."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def bucket_for(buckets: list[int], n: int) -> int:
    """The smallest bucket (sorted) that holds n rows."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"batch of {n} exceeds the largest graph bucket {buckets[-1]}")


GRAPH_TUNING = ("default", "max")


def _gemv_as_reduction() -> dict[str, object]:
    """Inductor config that compiles one-row matmuls (the batch-1 decode's GEMVs) as fused multiply + sum
    reductions instead of BLAS calls.

    A decode GEMV is bound by how fast the weights stream from memory. MKL runs a one-row fp32 GEMM on one
    thread, and one core of the 2-vCPU benchmark machine streams ~5 GB/s; inductor's reduction kernels use every
    thread (small preset, fp32, batch 1: compiled step 10.3 -> 6.1 ms). Inductor ships the pass
    ("decompose_mm_pass"), but on CPU only for matrices up to 2048 wide; that limit is a module constant, raised
    here for every later compile in the process. Rows stay at one: more rows would re-read the weight per row.
    """
    try:
        from torch._inductor.fx_passes import decompose_mem_bound_mm as dmm  # noqa: PLC0415
    except ImportError:  # pragma: no cover - older or newer torch without the pass: plain BLAS GEMVs
        return {}
    if not hasattr(dmm, "cpu_max_other_dimension_decomposition"):  # pragma: no cover - as above
        return {}
    dmm.cpu_max_other_dimension_decomposition = max(dmm.cpu_max_other_dimension_decomposition, 1 << 30)
    return {"post_grad_fusion_options": {"decompose_mm_pass": {}}}


def _compiler_backend(device: torch.device, cpp_wrapper: bool, tuning: str = "default") -> tuple[object, str | None]:
    if device.type == "npu":  # pragma: no cover - needs an NPU; not verified here
        import torchair  # noqa: PLC0415  (lazy: only with torch_npu + CANN)

        cfg = torchair.CompilerConfig()
        cfg.mode = "reduce-overhead"
        return torchair.get_npu_backend(compiler_config=cfg), None
    if device.type == "cuda":
        return "inductor", "reduce-overhead"
    patches: dict[str, object] = {}
    if tuning == "default":
        patches.update(_gemv_as_reduction())
    if cpp_wrapper:
        # CPU: the compiled step calls its kernels from generated C++ instead of a Python wrapper; at decode
        # batch sizes the per-kernel Python calls are a large share of the step (scripts/bench_decode.py
        # --graph). Costs a longer compile (a C++ build of the wrapper).
        patches["cpp_wrapper"] = True
    if tuning == "max":
        # Freezing folds the weights into the graph as constants, so the linears become MKL-packed GEMMs (a
        # second, packed copy of those weights) and max-autotune benchmarks GEMM kernels per shape: faster
        # decode for minutes more compile. Weights must not change after the compile.
        patches.update({"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"})
    if patches:
        from torch._inductor.compile_fx import compile_fx  # noqa: PLC0415

        return functools.partial(compile_fx, config_patches=patches), None
    return "inductor", None


def scale_bytes(model: nn.Module) -> dict[str, Tensor]:
    """The model's e8m0 scale parameters as uint8 views of the same bytes (no copy), by parameter name.

    Inductor's C++ code generation has no type for torch.float8_e8m0fnu (KeyError while declaring a kernel
    argument of that dtype), so a compiled step takes these views as inputs and views them back inside the graph,
    where the view pair folds away and the scale decode (`quant.e8m0_to_float`: byte << 23 as fp32 bits) reads
    the uint8 bytes.
    """
    return {name: p.view(torch.uint8) for name, p in model.named_parameters() if p.dtype == torch.float8_e8m0fnu}


class BucketGraphs:
    """`fn` compiled whole (fullgraph, static shapes) with the device's graph backend, one graph per batch bucket;
    counts compilations. Shared by the decode step and the MTP verify (graph_mode.verify)."""

    def __init__(self, fn: Callable, model: Transformer, n_buckets: int, compiler: str | Callable | None = None,
                 cpp_wrapper: bool = True, skip_guards: bool = True, tuning: str = "default") -> None:
        device = model.embed.weight.device
        if getattr(model, "expert_parallel", None) is not None:
            # torch 2.13: inductor's C++ wrapper cannot call the functional collectives of the static EP path
            # (custom_op_wrapper: "arg type Any is not yet supported"); the Python wrapper can.
            cpp_wrapper = False
        backend, mode = _compiler_backend(device, cpp_wrapper, tuning)
        inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        if compiler is None and getattr(model.backend, "emulated", False) and device.type == "cpu":
            # The torch_npu emulator is a correctness model, not a fast path: capture it whole (dynamo +
            # AOTAutograd) without C++ code generation, which also has no CPU code for its e8m0 scale dtypes.
            compiler = "aot_eager"
        # Inductor (CPU C++ code generation) gets the e8m0 weight scales as uint8 views (see scale_bytes).
        self.scale_bytes = scale_bytes(model) if compiler is None and device.type != "npu" else {}
        if compiler is not None:
            inner = torch._dynamo.lookup_backend(compiler) if isinstance(compiler, str) else compiler
            mode = None
        self.compiles = 0
        self.skip_guards = skip_guards
        self.ready: set[int] = set()  # buckets whose graph exists

        def counting(gm, example_inputs):
            self.compiles += 1
            return inner(gm, example_inputs)

        # One graph per bucket (static shapes); allow every bucket to stay cached.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * n_buckets)
        opts = {"fullgraph": True, "dynamic": False, "backend": counting}
        if mode:
            opts = {"fullgraph": True, "dynamic": False, "mode": mode}  # inductor + CUDA graphs
        self._compiled = torch.compile(fn, **opts)

    def __call__(self, bucket: int, *args):
        """Run (compiling on a bucket's first call) with the inputs of one bucket."""
        with torch.no_grad():
            if self.skip_guards and bucket in self.ready:
                # Every input is fixed per bucket (shapes, dtypes, the model's weights and cache buffers), so
                # after a bucket compiled only the guards that tell buckets apart are evaluated: checking every
                # weight tensor's guards on each call costs ~1 ms/step on CPU.
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self._compiled(*args)
            out = self._compiled(*args)
            self.ready.add(bucket)
            return out


class _Decode(nn.Module):
    """`model.decode` as a module's forward, so `torch.func.functional_call` can swap parameters for one call."""

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, ids: Tensor, pos: Tensor, slots: Tensor) -> Tensor:
        return self.model.decode(ids, pos, self.cache, slots)[:, -1]


class GraphDecoder:
    """Runs `model.decode` + token choice as one compiled graph per bucket; counts compilations."""

    def __init__(self, model: Transformer, cache: KVCache, pad_slot: int, buckets: list[int],
                 compiler: str | Callable | None = None, cpp_wrapper: bool = True,
                 skip_guards: bool = True, tuning: str = "default") -> None:
        if tuning not in GRAPH_TUNING:
            raise ValueError(f"graph tuning must be one of {GRAPH_TUNING}, found {tuning!r}")
        if not 0 <= pad_slot < cache.max_slots:
            raise ValueError(f"pad_slot {pad_slot} is not a slot of the cache (max_slots {cache.max_slots})")
        self.model = model
        self.cache = cache
        self.pad_slot = pad_slot
        self.buckets = sorted(set(buckets))
        self.device = model.embed.weight.device
        self._decode = _Decode(model, cache)
        self.graphs = BucketGraphs(self._step, model, len(self.buckets), compiler, cpp_wrapper, skip_guards, tuning)
        # Token choice: torch.cond for all-greedy batches where a data-dependent branch is free (CPU); CUDA
        # graphs and torchair capture sampling unconditionally instead. torch_npu documents
        # npu_top_k_top_p_sample as eager-only, so a captured NPU step samples in plain torch.
        self._greedy_rows = None if self.device.type == "cpu" else False
        self._sample = sample if self.device.type == "npu" else model.backend.sample
        # Logit adjustments are graph inputs ([bucket, V] rows and per-row scalars, see logits_process); steps
        # without any pass these neutral ones, and the compiled step skips the work on their `active` flag (CPU:
        # torch.cond) or applies them as exact no-ops (elsewhere).
        self._neutral: dict[int, AdjustBatch] = {}

    @property
    def compiles(self) -> int:
        """Graphs compiled so far (one per bucket once warm)."""
        return self.graphs.compiles

    def _step(self, ids: Tensor, pos: Tensor, slots: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
              seed: Tensor, scales: dict[str, Tensor], adjust: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        e8m0 = {f"model.{name}": b.view(torch.float8_e8m0fnu) for name, b in scales.items()}
        logits = torch.func.functional_call(self._decode, e8m0, (ids, pos, slots))
        sb = SamplingBatch(temperature, top_k, top_p, seed)
        tokens, logprobs = next_tokens(logits, sb, pos + 1, self._sample, self._greedy_rows, AdjustBatch(*adjust))
        return tokens, logprobs, logits

    def bucket_for(self, n: int) -> int:
        return bucket_for(self.buckets, n)

    def step(self, ids: Tensor, positions: Tensor, slots: Tensor, params: list[SamplingParams],
             max_len: int | None = None, adjust: AdjustBatch | None = None,
             lengths: list[int] | None = None) -> StepResult:
        """Decode one token for n rows (padded to the bucket). `max_len` and `lengths` are not needed: a bucket's
        graph reads every page of the block table rows (static shapes), which bounds any length, and computes
        every compressor's entry each step (no host values in the graph). `adjust`: the rows' logit adjustments
        (None: none)."""
        sb = SamplingBatch.of(params, ids.device)
        n = ids.shape[0]
        pad = self.bucket_for(n) - n

        def padded(t: Tensor, fill) -> Tensor:  # contiguous: a strided input would fail the graph's guards
            if not pad:
                return t.contiguous()
            return torch.cat([t, torch.full((pad, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)])

        bucket = n + pad
        if adjust is None:
            if bucket not in self._neutral:
                self._neutral[bucket] = AdjustBatch.neutral(bucket, self.model.cfg.vocab_size, ids.device)
            adjust = self._neutral[bucket]
        elif pad:
            adjust = adjust.padded(bucket)
        args = (padded(ids, 0), padded(positions, 0), padded(slots, self.pad_slot), padded(sb.temperature, 0.0),
                padded(sb.top_k, 0), padded(sb.top_p, 1.0), padded(sb.seed, 0), self.graphs.scale_bytes,
                tuple(t.contiguous() for t in adjust.tensors()))
        out = self.graphs(bucket, *args)
        return StepResult(*(o[:n] for o in out))

    def warmup(self, progress: bool = True) -> None:
        """Compile every bucket now (rows on the pad slot, greedy), so serving never stalls on a compile."""
        for i, b in enumerate(self.buckets):
            if progress:
                print(f"[dsv4] compiling decode graph for batch {b} ({i + 1}/{len(self.buckets)})", file=sys.stderr,
                      flush=True)
            dev = self.device

            def z() -> Tensor:  # distinct tensors: aliased inputs would specialise the graph
                return torch.zeros(b, dtype=torch.int64, device=dev)

            params = [SamplingParams(temperature=0, seed=0) for _ in range(b)]
            self.step(z().view(b, 1), z(), torch.full((b,), self.pad_slot, device=dev), params)
