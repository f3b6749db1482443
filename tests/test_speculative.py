"""MTP speculative decoding: same greedy output as plain decoding, exact cache rollback, the sampling rule."""
from __future__ import annotations

import pytest
import torch

from dsv4_ascend.engine import Engine
from dsv4_ascend.sampling import SamplingParams
from dsv4_ascend.speculative import Speculator, accept_drafts


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("n_spec", [1, 3])
def test_greedy_with_mtp_equals_without(tiny_model, n_spec):
    # 10 + 60 tokens: crosses the window (8), CSA (4) and HCA (8) boundaries many times inside verify chunks.
    prompts = [_prompt(10, 1), _prompt(23, 2)]
    params = SamplingParams(temperature=0, max_tokens=60)
    plain = [r.output for r in Engine(tiny_model, max_slots=2, max_seq_len=128, eos_token_id=-1)
             .generate(prompts, params)]
    eng = Engine(tiny_model, max_slots=2, max_seq_len=128, eos_token_id=-1, speculative_tokens=n_spec,
                 prefill_chunk=7)
    spec = [r.output for r in eng.generate(prompts, params)]
    assert spec == plain
    st = eng.spec_stats()
    assert st["proposed"] > 0 and 0 <= st["acceptance_rate"] <= 1


def _oracle(monkeypatch, engine, truths: dict[int, list[int]], wrong_every: int):
    """Replace MTP drafts by the true greedy continuation (truths: request id -> prompt + greedy output) with
    every `wrong_every`-th draft corrupted, so rounds accept 0..n drafts (random MTP weights would almost never
    agree with the main model)."""
    calls = {"n": 0}
    orig = Speculator.propose

    def propose(self, slots, logits, x, pos, params, states):
        orig(self, slots, logits, x, pos, params, states)  # keep the MTP cache work identical
        by_state = {id(r.spec): r.id for r in engine.running}
        for p, st in zip(pos, states):
            truth = truths[by_state[id(st)]]
            drafts = []
            for i in range(self.n):
                calls["n"] += 1
                t = truth[p + 2 + i] if p + 2 + i < len(truth) else 0
                drafts.append((t + 1) % 512 if calls["n"] % wrong_every == 0 else t)
            st.drafts = drafts

    monkeypatch.setattr(Speculator, "propose", propose)


def test_partial_acceptance_keeps_greedy_output(tiny_model, monkeypatch):
    prompt = _prompt(9, 3)
    params = SamplingParams(temperature=0, max_tokens=50)
    plain = Engine(tiny_model, max_slots=1, max_seq_len=96, eos_token_id=-1).generate([prompt], params)[0].output
    eng = Engine(tiny_model, max_slots=1, max_seq_len=96, eos_token_id=-1, speculative_tokens=3)
    req = eng.add_request(prompt, params)
    _oracle(monkeypatch, eng, {req.id: prompt + plain}, wrong_every=3)
    for _ in eng.run():
        pass
    assert req.output == plain
    st = eng.spec_stats()
    assert 0.3 < st["acceptance_rate"] < 1.0 and st["main_steps_per_token"] < 0.8


def _valid_state(model, cache, slot: int, length: int) -> list[torch.Tensor]:
    """The cache contents that matter for a sequence of `length` cached tokens (stale rows excluded)."""
    out = []
    s = torch.tensor([slot])
    for lc in cache.layers[: model.cfg.num_hidden_layers]:
        win = lc.window.size
        rows = lc.window.row(torch.arange(max(0, length - win), length))
        out.append(lc.window.read(s.view(1, 1), rows.view(1, -1)))
        if lc.ratio:
            m = lc.ratio
            out.append(lc.read_entries(lc.entries, s, length // m, m))
            out += _live_rows(lc.comp, slot, length, m == 4)
        if lc.index_keys is not None:
            out.append(lc.read_entries(lc.index_keys, s, length // 4, 4))
            out += _live_rows(lc.index_comp, slot, length, True)
    return out


def _live_rows(st, slot: int, length: int, overlap: bool) -> list[torch.Tensor]:
    """(kv, score) ring rows the next step reads: the unfinished window, plus the previous window (overlap)."""
    m = st.ratio
    first = max(0, (length // m - int(overlap)) * m)
    return list(st.rows(slot, torch.arange(first, length)))


@pytest.mark.parametrize("length,accept", [(13, 0), (14, 1), (15, 2), (29, 2), (31, 0)])
def test_cache_after_rejection_equals_never_seen(tiny_model, length, accept):
    # Verify 4 drafts after `length` cached tokens, reject all but `accept`: the rejected tokens sit inside
    # CSA windows (4) and HCA windows (8) and would close some of them.
    ids = _prompt(length + 6, 4)
    spec_cache = tiny_model.new_cache(1, 64)
    ref_cache = tiny_model.new_cache(1, 64)
    slot = torch.tensor([0])
    tiny_model(torch.tensor([ids[:length]]), spec_cache, slot, 0)
    _, _, commit = tiny_model.prefill(torch.tensor([ids[length:length + 5]]), spec_cache, slot, length, defer=True)
    commit(accept + 1)
    tiny_model(torch.tensor([ids[: length + accept + 1]]), ref_cache, slot, 0)
    got = _valid_state(tiny_model, spec_cache, 0, length + accept + 1)
    want = _valid_state(tiny_model, ref_cache, 0, length + accept + 1)
    for g, w in zip(got, want):
        # Same ops in a different chunking: fp32 rounding only.
        assert torch.allclose(g.float(), w.float(), atol=1e-5, rtol=1e-5)


def test_sampling_acceptance_rule_preserves_the_target_distribution():
    # One round with 1 draft: the first emitted token must be distributed as p, whatever q is.
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([0.1, 0.1, 0.4, 0.4])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=gen))
        a, bonus = accept_drafts(p, [q], [d], False, gen)
        counts[d if a == 1 else bonus] += 1
    freq = counts / n
    sigma = (p[0] * (1 - p[0]) / n).sqrt()
    assert torch.all((freq - p[0]).abs() <= 5 * sigma + 1e-9)
