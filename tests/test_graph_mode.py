"""Graph mode on CPU: the decode step compiles whole (no graph breaks), equals eager, never recompiles.

The default run traces with `aot_eager` (the full dynamo + AOTAutograd capture, no C++ code generation) to keep CI
fast; the same checks with inductor code generation run under `-m slow`.
"""
from __future__ import annotations

import pytest
import torch

from dsv4_ascend.engine import Engine
from dsv4_ascend.graph_mode import GraphDecoder
from dsv4_ascend.sampling import SamplingParams

from conftest import graph_vs_eager_logits

# Compiled code may reorder fp32 reductions (different summation order): logits then differ at ~1e-6 relative.
TOL = 1e-4


def test_decode_graph_has_no_breaks(tiny_model):
    cache = tiny_model.new_cache(3, 32)
    dec = GraphDecoder(tiny_model, cache, pad_slot=2, buckets=[2], compiler="aot_eager")
    z = torch.zeros(2, dtype=torch.int64)
    explained = torch._dynamo.explain(dec._step)(z.view(2, 1), z.clone(), torch.tensor([0, 1]), torch.zeros(2),
                                                 z.clone(), torch.ones(2), z.clone())
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def _check_compiled(model, compiler: str | None, tuning: str = "default") -> None:
    torch._dynamo.reset()
    prompts = [torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 14, 5)]
    params = SamplingParams(temperature=0, max_tokens=12)
    eager = Engine(model, max_slots=3, max_seq_len=32, eos_token_id=-1)
    # Bucket 1 takes the one-row path (GEMVs compiled as reductions on CPU); 2-row batches pad to bucket 3.
    compiled = Engine(model, max_slots=3, max_seq_len=32, eos_token_id=-1, graph=True, graph_buckets=[1, 3],
                      graph_compiler=compiler, graph_tuning=tuning)
    after_warmup = compiled.graph.compiles
    assert after_warmup == 2  # one graph per bucket
    want = [r.output for r in eager.generate(prompts, params)]
    got = [r.output for r in compiled.generate(prompts, params)]  # batches of 1..3 rows, padded to 1 or 3
    assert got == want
    # Sampled rows mixed with a greedy one take the graph's sampling branch (all-greedy batches the greedy one);
    # counter-based noise makes both engines draw the same tokens.
    mixed = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1, max_tokens=12),
             SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=1.0, seed=2, max_tokens=12)]
    want = [r.output for r in eager.generate(prompts, mixed)]
    assert [r.output for r in compiled.generate(prompts, mixed)] == want
    assert want[0] != got[0] or want[2] != got[2]  # the sampled rows really sampled
    assert compiled.graph.compiles == after_warmup  # every later step reused its bucket's graph
    # Logits step by step against eager on an identical copy of the cache.
    for e, g in graph_vs_eager_logits(model, compiled.graph, prompts, params, max_len=32, steps=10):
        assert (e - g).abs().max().item() <= TOL
    assert compiled.graph.compiles == after_warmup


def test_compiled_equals_eager_and_does_not_recompile(tiny_model):
    _check_compiled(tiny_model, "aot_eager")


@pytest.mark.slow
def test_inductor_compiled_equals_eager(tiny_model):
    _check_compiled(tiny_model, None)  # the product's path: inductor with the C++ wrapper, guards skipped


@pytest.mark.slow
def test_inductor_max_tuning_equals_eager(tiny_model):
    _check_compiled(tiny_model, None, "max")  # frozen weights, MKL-packed / autotuned GEMMs


def test_one_row_matmuls_compile_as_reductions():
    """The CPU graph config compiles a one-row matmul as inductor's multiply + sum reduction (decode GEMVs use
    every thread), also above inductor's own 2048-wide limit, with the same result up to summation order."""
    from torch._dynamo.utils import counters

    from dsv4_ascend.graph_mode.decoder import _compiler_backend

    backend, _ = _compiler_backend(torch.device("cpu"), cpp_wrapper=False)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 64, generator=g), torch.randn(3000, 64, generator=g)
    torch._dynamo.reset()
    counters.clear()
    got = torch.compile(torch.nn.functional.linear, backend=backend, fullgraph=True)(x, w)
    assert counters["inductor"]["decompose_mm"] == 1
    # fp32, 64-term dot products in another order: differences of a few ulp of the largest partial sum.
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
