"""The captured MTP verify (graph_mode.GraphVerifier): one graph per bucket, its rollback leaves the cache as the
eager verify's commit does, and the engine in graph mode with MTP emits the tokens of eager and of solo runs.

The default tests capture with dynamo's "eager" backend (the whole forward traced as one graph, fullgraph: no
graph break, run op by op: fast); the engine test under `-m slow` also runs AOTAutograd ("aot_eager") and the
product's CPU path (inductor, C++ wrapper).
"""
from __future__ import annotations

import pytest
import torch

from dsv4_ascend.engine import Engine
from dsv4_ascend.graph_mode import GraphVerifier
from dsv4_ascend.sampling import SamplingParams

from test_speculative import _oracle, _prompt, _valid_state


def _rings(model, cache, slots: list[int]) -> list[torch.Tensor]:
    """The raw window-ring and compressor-ring rows of `slots` in every main layer (what rollback restores)."""
    out = []
    for lc in cache.layers[:model.cfg.num_hidden_layers]:
        out.append(lc.window.data[slots])
        out += [st.state[[s + 1 for s in slots]] for st in (lc.comp, lc.index_comp) if st is not None]
    return out


@pytest.mark.parametrize("backend", ["reference", pytest.param("ascend", marks=pytest.mark.slow)])
def test_rollback_equals_eager_commit(tiny_model, backend):
    # Three rows at different positions (one pad row fills bucket 4), each keeping its own prefix; the rejected
    # tokens sit inside CSA (4) and HCA (8) windows and close some, and overwrite window-ring rows (window 8).
    # Ascend: the emulated custom compressor op writes the compressor rings.
    from dsv4_ascend.ops import AscendBackend

    from conftest import build_tiny

    m, n = tiny_model if backend == "reference" else build_tiny(backend=AscendBackend()), 3
    toks = [_prompt(40, 20 + s) for s in range(3)]
    before, keep = [13, 6, 29], [1, 4, 3]
    eager, graph = m.new_cache(4, 64), m.new_cache(4, 64)
    for b in range(3):
        for c in (eager, graph):
            m(torch.tensor([toks[b][:before[b]]]), c, torch.tensor([b]), 0)
    ids = torch.tensor([t[p:p + n + 1] for t, p in zip(toks, before)])
    slots = torch.arange(3)
    torch._dynamo.reset()
    ver = GraphVerifier(m, graph, pad_slot=3, buckets=[4], n_tokens=n, compiler="eager")
    logits, streams, rollback = ver.verify(ids, torch.tensor(before), slots)
    x, commit = m.prefill_streams(ids, eager, slots, before, defer=True)
    # Same ops, other shapes (a [4, 4] batch, entry pools read to max_seq_len, the decode-path MoE): fp32 rounding.
    assert torch.allclose(logits, m.logits(x), atol=1e-4, rtol=1e-4)
    assert torch.allclose(streams, x, atol=1e-4, rtol=1e-4)
    commit(keep)
    written = _rings(m, graph, [0, 1, 2])
    rollback(torch.tensor(keep))
    for g, e, w in zip(_rings(m, graph, [0, 1, 2]), _rings(m, eager, [0, 1, 2]), written):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(w, e, atol=1e-5, rtol=1e-5)  # the verify did overwrite rows; rollback undid them
    for b in range(3):
        for g, e in zip(_valid_state(m, graph, b, before[b] + keep[b]), _valid_state(m, eager, b, before[b] + keep[b])):
            assert torch.allclose(g.float(), e.float(), atol=1e-5, rtol=1e-5)
    nxt = torch.tensor([[t[p + k]] for t, p, k in zip(toks, before, keep)])
    pos = torch.tensor([p + k for p, k in zip(before, keep)])
    assert torch.allclose(m.decode(nxt, pos, graph, slots), m.decode(nxt, pos, eager, slots), atol=1e-4, rtol=1e-4)
    assert ver.compiles == 1
    with pytest.raises(ValueError, match="4 tokens per row"):
        ver.verify(ids[:, :3], torch.tensor(before), slots)
    with pytest.raises(ValueError, match="rings of at least 9 rows; sliding_window has 8"):
        GraphVerifier(m, graph, pad_slot=3, buckets=[4], n_tokens=8, compiler="aot_eager")


@pytest.mark.parametrize("compiler", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow),
                                      pytest.param(None, marks=pytest.mark.slow, id="inductor")])
def test_graph_mtp_engine_equals_eager_and_solo(tiny_model, monkeypatch, compiler):
    # Oracle drafts (every 3rd one wrong) so rounds accept 0..3 drafts; 3 greedy requests join at different steps
    # (1, 2 or 3 rows in bucket 4: pad rows in every step), prompts across the window / CSA / HCA boundaries; a
    # 4th, seeded sampled request waits for a slot (its drafts follow the acceptance rule: graph equals eager).
    prompts = [_prompt(n, 30 + i) for i, n in enumerate([9, 17, 30, 12])]
    greedy = SamplingParams(temperature=0, max_tokens=12)
    params = [greedy] * 3 + [SamplingParams(temperature=0.8, top_k=40, seed=7, max_tokens=12)]
    solo = [Engine(tiny_model, max_slots=1, max_seq_len=64, eos_token_id=-1).generate([p], greedy)[0].output
            for p in prompts[:3]] + [[]]

    def run(graph: bool) -> tuple[list[list[int]], Engine]:
        torch._dynamo.reset()
        eng = Engine(tiny_model, max_slots=3, max_seq_len=64, eos_token_id=-1, speculative_tokens=3,
                     prefill_chunk=8, max_num_batched_tokens=24, graph=graph, graph_buckets=[4],
                     graph_compiler=compiler)
        warm = eng.spec.graph.compiles if graph else 0
        reqs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
        _oracle(monkeypatch, eng, {r.id: p + s for r, p, s in zip(reqs, prompts, solo)}, wrong_every=3)
        while eng.has_work:
            eng.step()
        if graph:
            assert warm == 1 and eng.spec.graph.compiles == warm  # one graph per bucket, none after warm-up
        monkeypatch.undo()
        return [r.output for r in reqs], eng

    eager, _ = run(False)
    graph, eng = run(True)
    assert graph == eager and graph[:3] == solo[:3] and len(graph[3]) == 12
    st = eng.spec_stats()
    assert 0.3 < st["acceptance_rate"] < 1.0 and st["rounds"] > st["verify_steps"]
