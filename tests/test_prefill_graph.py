"""Compiled prefill (graph_mode.GraphPrefiller): equals eager prefill across window / CSA / HCA boundaries and does
not recompile once its ops have compiled.

The default run traces with `aot_eager` (dynamo + AOTAutograd, no code generation) to keep CI fast; inductor's
C++ code generation runs under `-m slow`.
"""
from __future__ import annotations

import pytest
import torch

from dsv4_ascend.engine import Engine
from dsv4_ascend.graph_mode import GraphPrefiller
from dsv4_ascend.sampling import SamplingParams

# fp32. aot_eager runs the same aten ops (decomposed): equal up to a few ulp. Inductor fuses the mHC / norm
# reductions and may sum in another order: relative differences ~1e-7 per op, a few 1e-6 absolute on logits of
# magnitude ~5 after 4 layers; the bar is 1e-5.
TOL = 1e-5

# tiny preset: window 8, CSA (ratio 4, top-4 of the indexer) and HCA (ratio 8) layers. Chunks of these lengths
# start and end inside and on window / CSA / HCA boundaries (starts 0, 5, 12, 28, 31, 40).
CHUNKS = (5, 7, 16, 3, 9, 6)


def _chunked(fn, model, ids: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    slots = torch.arange(ids.shape[0])
    out, start = [], 0
    for n in CHUNKS:
        out.append(fn(ids[:, start:start + n], cache, slots, start))
        start += n
    return torch.cat(out, 1)


def _check(model, compiler: str | None) -> None:
    """One compile serves every check: chunked prefill equal to eager, no recompile on other lengths and starts,
    and the engine (compile_prefill=True) generating what the eager engine does."""
    torch._dynamo.reset()
    eng = Engine(model, max_slots=2, max_seq_len=48, prefill_chunk=8, eos_token_id=-1, compile_prefill=True,
                 graph_compiler=compiler)
    pre = eng.prefiller
    assert isinstance(pre, GraphPrefiller)
    ids = torch.randint(2, 512, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(0))
    want = _chunked(lambda *a: model(*a), model, ids)
    got = _chunked(pre, model, ids)
    assert (got - want).abs().max().item() <= TOL
    # The engine's prefill chunks (8 tokens, then the rest; one row, last position only) go through the prefiller.
    params = SamplingParams(temperature=0, max_tokens=6)
    ref = Engine(model, max_slots=2, max_seq_len=48, prefill_chunk=8, eos_token_id=-1)

    def same_tokens(prompts: list[list[int]]) -> bool:
        return [r.output for r in eng.generate(prompts, params)] == [r.output for r in ref.generate(prompts, params)]

    assert same_tokens([ids[0, :21].tolist(), ids[1, :13].tolist()])
    # Warm: batch 2 and batch 1 (size 1 is specialised by dynamo, so one-row chunks have their own graphs). Other
    # lengths, starts and prompts: no new graph.
    warm = pre.compiles
    assert warm > 0
    again = _chunked(pre, model, torch.flip(ids, [1]))
    assert again.shape == got.shape
    assert same_tokens([ids[1, 3:30].tolist(), ids[0, 5:16].tolist()])
    assert pre.compiles == warm
    assert not any(op in model.backend.__dict__ for op in pre._ops)  # the eager ops are back after each call


def test_compiled_prefill_equals_eager_and_does_not_recompile(tiny_model):
    _check(tiny_model, "aot_eager")


@pytest.mark.slow
def test_inductor_compiled_prefill_equals_eager(tiny_model):
    _check(tiny_model, None)


def test_unknown_op_is_refused(tiny_model):
    with pytest.raises(ValueError, match="no op"):
        GraphPrefiller(tiny_model, "aot_eager", ops=("hc_pre", "no_such_op"))
