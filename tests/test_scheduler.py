"""The serving scheduler: ragged prefill batches, token budget, pages on demand with preemption, batched MTP.

Every engine check compares with each request run alone (one slot, one request at a time): token for token,
greedy and seeded sampling (counter-based noise keyed on seed and position, so batch-mates never matter).
The tiny preset has window 8 and compress ratios 4 (CSA) and 8 (HCA): the prompt lengths below cross all three.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv4_ascend.cache import KVCache
from dsv4_ascend.engine import CapacityError, Engine
from dsv4_ascend.sampling import SamplingParams

LENGTHS = [3, 9, 17, 30, 12, 41]


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _params(i: int, max_tokens: int = 6) -> SamplingParams:
    if i % 3 == 1:  # every third request samples with its own seed
        return SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=100 + i, max_tokens=max_tokens + i % 4)
    return SamplingParams(temperature=0, max_tokens=max_tokens + i % 4)


# One request set for every engine test (their solo runs are computed once): 3..41-token prompts, 6..9 tokens.
PROMPTS = [_prompt(n, i) for i, n in enumerate(LENGTHS)]
PARAMS = [_params(i) for i in range(len(LENGTHS))]
GREEDY = [i for i, sp in enumerate(PARAMS) if sp.temperature == 0]


_SOLO: dict[tuple, list[int]] = {}


def _alone(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """The request run by itself (one slot, no preemption, no batch-mates); memoised across tests."""
    key = (tuple(prompt), repr(params))
    if key not in _SOLO:
        eng = Engine(model, max_slots=1, max_seq_len=64, eos_token_id=-1)
        _SOLO[key] = eng.generate([prompt], params)[0].output
    return _SOLO[key]


def _run(eng: Engine, prompts, params) -> list[list[int]]:
    reqs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    budget = eng.scheduler.budget
    while eng.has_work:
        eng.step()
        st = eng.last_step
        # Prefill only ever fills what the decode rows leave of the budget.
        assert st["prefill_tokens"] == 0 or st["tokens"] <= budget
    assert not eng.running and len(eng.free_slots) == eng.scheduler.max_slots
    assert eng.cache.free_pages == eng.cache.num_blocks - 1  # every page came back
    return [r.output for r in reqs]


@pytest.mark.parametrize("backend", ["reference", "ascend"])
def test_ragged_prefill_equals_each_row(tiny_model, backend):
    # Three sequences at different positions, chunks of different lengths, one forward; then a decode step. The
    # last row's padding runs past the cache's max_seq_len (64): it must be computed and dropped, never stored.
    # Ascend (emulated custom compressor op, per-row seqused; attention falls back to the composite for ragged
    # batches).
    from dsv4_ascend.ops import AscendBackend

    from conftest import build_tiny

    m = tiny_model if backend == "reference" else build_tiny(backend=AscendBackend())
    toks = [_prompt(70, s) for s in range(3)]
    before, chunk = [5, 0, 58], [7, 12, 3]
    ref, rag = m.new_cache(3, 64), m.new_cache(3, 64)
    want = []
    for b in range(3):
        s = torch.tensor([b])
        for c in (ref, rag):
            if before[b]:
                m(torch.tensor([toks[b][:before[b]]]), c, s, 0)
        want.append(m(torch.tensor([toks[b][before[b]:before[b] + chunk[b]]]), ref, s, before[b])[0])
    ids = torch.tensor([t[p:p + n] + [0] * (12 - n) for t, p, n in zip(toks, before, chunk)])
    logits, _, _ = m.prefill(ids, rag, torch.arange(3), before, lengths=chunk)
    for b in range(3):
        # Same ops, other batch shapes: fp32 rounding only.
        assert torch.allclose(logits[b, :chunk[b]], want[b], atol=1e-4, rtol=1e-4)
    nxt = torch.tensor([[t[p + n]] for t, p, n in zip(toks, before, chunk)])
    pos = torch.tensor([p + n for p, n in zip(before, chunk)])
    a, r = m.decode(nxt, pos, ref, torch.arange(3)), m.decode(nxt, pos, rag, torch.arange(3))
    assert torch.allclose(a, r, atol=1e-4, rtol=1e-4)  # the padding wrote nothing the next token reads
    with pytest.raises(ValueError, match="lengths"):
        m.prefill(ids, rag, torch.arange(3), before, lengths=[7, 13, 3])


def test_ragged_deferred_commit_per_row(tiny_model):
    # A batched verify: rows at different positions, each commits its own prefix; the next decode step must see
    # exactly the committed tokens (as if the rest had never been run).
    m = tiny_model
    toks = [_prompt(40, 10 + s) for s in range(3)]
    before, keep = [13, 6, 29], [1, 4, 3]
    spec, ref = m.new_cache(3, 64), m.new_cache(3, 64)
    for b in range(3):
        s = torch.tensor([b])
        m(torch.tensor([toks[b][:before[b]]]), spec, s, 0)
        m(torch.tensor([toks[b][:before[b] + keep[b]]]), ref, s, 0)
    ids = torch.tensor([t[p:p + 5] for t, p in zip(toks, before)])
    _, _, commit = m.prefill(ids, spec, torch.arange(3), before, defer=True)
    commit(keep)
    nxt = torch.tensor([[t[p + k]] for t, p, k in zip(toks, before, keep)])
    pos = torch.tensor([p + k for p, k in zip(before, keep)])
    a, r = m.decode(nxt, pos, spec, torch.arange(3)), m.decode(nxt, pos, ref, torch.arange(3))
    assert torch.allclose(a, r, atol=1e-4, rtol=1e-4)


def test_budget_batches_prefills_and_equals_alone(tiny_model):
    prompts, params = PROMPTS, PARAMS
    eng = Engine(tiny_model, max_slots=4, max_seq_len=64, prefill_chunk=16, max_num_batched_tokens=40,
                 eos_token_id=-1)
    got = _run(eng, prompts, params)
    assert got == [_alone(tiny_model, p, sp) for p, sp in zip(prompts, params)]
    st = eng.stats
    assert st["prefill_rows"] > st["steps"] / 4 and st["preemptions"] == 0
    # The single-user schedule is the same scheduler with other parameters: same tokens.
    old = Engine(tiny_model, max_slots=4, max_seq_len=64, prefill_chunk=16, max_num_batched_tokens=16,
                 max_prefill_seqs=1, reserve_full=True, eos_token_id=-1)
    assert _run(old, prompts, params) == got
    assert old.stats["steps"] > st["steps"]


def _pages_cache_bytes(model, slots: int, max_seq_len: int, pages: int, block: int) -> int:
    return KVCache(model.cfg, slots, max_seq_len, model.dtype, "meta", len(model.mtp), num_blocks=pages + 1,
                   block_size=block, preassign=False).nbytes()


@pytest.mark.parametrize("mtp", [0, 2])
def test_preemption_keeps_outputs(tiny_model, mtp, capsys):
    # 10 pages of 8 tokens for 4 slots: the requests grow past what the cache holds and the newest is preempted
    # (recomputed later); outputs must not change and no token may be emitted twice.
    prompts, params = PROMPTS, PARAMS
    eng = Engine(tiny_model, max_slots=4, max_seq_len=64, prefill_chunk=16, max_num_batched_tokens=32,
                 eos_token_id=-1, block_size=8, speculative_tokens=mtp,
                 cache_bytes=_pages_cache_bytes(tiny_model, 4, 64, 10, 8))
    assert eng.cache.num_blocks - 1 == 10
    emitted: dict[int, list[int]] = {}
    reqs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    while eng.has_work:
        for r, t in eng.step():
            emitted.setdefault(r.id, []).append(t)
    got = [r.output for r in reqs]
    assert [emitted[r.id] for r in reqs] == got  # every token streamed exactly once
    want = [_alone(tiny_model, p, sp) for p, sp in zip(prompts, params)]
    if mtp:  # greedy rows are exact under MTP; sampled rows follow the speculative rule (another draw)
        got, want = [g for g, sp in zip(got, params) if sp.temperature == 0], \
            [w for w, sp in zip(want, params) if sp.temperature == 0]
    assert got == want
    n = eng.stats["preemptions"]
    with capsys.disabled():
        print(f"\n[test_preemption_keeps_outputs mtp={mtp}] preemptions forced: {n}")
    assert n > 0 and sum(r.preemptions for r in reqs) == n
    assert eng.cache.free_pages == 10 and len(eng.free_slots) == 4


def test_batched_mtp_equals_plain_greedy(tiny_model):
    prompts, params = [PROMPTS[i] for i in GREEDY], [PARAMS[i] for i in GREEDY]
    eng = Engine(tiny_model, max_slots=4, max_seq_len=64, prefill_chunk=16, max_num_batched_tokens=64,
                 eos_token_id=-1, speculative_tokens=3)
    assert _run(eng, prompts, params) == [_alone(tiny_model, p, sp) for p, sp in zip(prompts, params)]
    st = eng.spec_stats()
    # One verify forward per step for all decoding rows.
    assert st["verify_steps"] == eng.stats["decode_steps"] and st["rounds"] == eng.stats["decode_rows"]
    assert st["rounds"] > 2 * st["verify_steps"]


def test_graph_decode_with_budget_scheduler(tiny_model):
    prompts, params = PROMPTS[:3], PARAMS[:3]
    torch._dynamo.reset()
    eng = Engine(tiny_model, max_slots=3, max_seq_len=64, prefill_chunk=8, max_num_batched_tokens=20,
                 eos_token_id=-1, graph=True, graph_buckets=[3], graph_compiler="aot_eager")
    assert _run(eng, prompts, params) == [_alone(tiny_model, p, sp) for p, sp in zip(prompts, params)]
    assert eng.decoder.compiles == 1


def test_empty_step_and_refusals(tiny_model):
    eng = Engine(tiny_model, max_slots=2, max_seq_len=32, eos_token_id=-1, block_size=8)
    assert eng.step() == [] and eng.last_step["tokens"] == 0 and eng.stats["steps"] == 0
    with pytest.raises(CapacityError, match="max_seq_len 32"):
        eng.add_request(_prompt(30, 1), SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Engine(tiny_model, max_slots=1, max_seq_len=32, max_num_batched_tokens=0)


def test_step_metrics(tiny_model):
    from dsv4_ascend.server.metrics import Metrics
    from dsv4_ascend.server.worker import EngineWorker

    eng = Engine(tiny_model, max_slots=2, max_seq_len=64, eos_token_id=-1, speculative_tokens=1, block_size=8)
    worker = EngineWorker(eng, Metrics())  # not started: the test drives the engine and the step counting
    prompts = [_prompt(9, 70), _prompt(14, 71)]
    for p in prompts:
        eng.add_request(p, SamplingParams(temperature=0, max_tokens=5))
    while eng.has_work:
        eng.step()
        worker._count_step()
    values = {}
    for line in worker.metrics.render().splitlines():
        if line.startswith("dsv4_") and " " in line:
            name, v = line.rsplit(" ", 1)
            values[name] = float(v)
    st, spec = eng.stats, eng.spec_stats()
    assert values["dsv4_engine_steps_total"] == st["steps"] > 0
    assert values["dsv4_engine_prefill_tokens_total"] == st["prefill_tokens"] == 9 + 14
    assert values["dsv4_engine_decode_tokens_total"] == st["decode_tokens"] == 2 * 5 - 2  # first tokens: prefill
    assert values["dsv4_engine_step_tokens_sum"] == st["batched_tokens"]
    assert values["dsv4_spec_draft_tokens_total"] == spec["proposed"] > 0
    assert values["dsv4_spec_accepted_tokens_total"] == spec["accepted"]
    assert values["dsv4_preemptions_total"] == 0


def test_preemption_keeps_prompt_logprobs_and_penalty_state(tiny_model):
    # A preempted request is recomputed from prompt + output: its prompt logprobs must be recorded once (not again
    # for the recomputed chunks) and its penalty counts must be replayed (LogitRules.admit), or the outputs drift.
    # logit_bias makes token 7 likely and the frequency penalty then pushes it down per use: the output depends
    # on the counts, so counts lost at a preemption would change it (checked: the request preempted here diverges
    # without the replay).
    params = [dataclasses.replace(sp, prompt_logprobs=2, frequency_penalty=1.0, logit_bias=((7, 4.0),))
              for sp in PARAMS]
    eng = Engine(tiny_model, max_slots=4, max_seq_len=64, prefill_chunk=16, max_num_batched_tokens=32,
                 eos_token_id=-1, block_size=8, cache_bytes=_pages_cache_bytes(tiny_model, 4, 64, 10, 8))
    reqs = [eng.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    while eng.has_work:
        eng.step()
    assert eng.stats["preemptions"] > 0
    for p, sp, r in zip(PROMPTS, params, reqs):
        solo = Engine(tiny_model, max_slots=1, max_seq_len=64, eos_token_id=-1).generate([p], sp)[0]
        assert r.output == solo.output
        assert len(r.prompt_logprobs) == len(p) and r.prompt_logprobs[0] is None
        for got, want in zip(r.prompt_logprobs[1:], solo.prompt_logprobs[1:]):
            assert got[1] == want[1] and got[2].keys() == want[2].keys()
            # fp32 logits of the same positions from a different batch: summation order only (~1e-6 relative)
            assert abs(got[0] - want[0]) <= 1e-4


def _fuzz_case(seed: int):
    """A seeded random tiny variant (window, per-layer ratios, index_topk) and a request mix: prompts sharing a
    random prefix (page-aligned and not, one that is the whole prefix plus a little, a repeat), one request that
    reaches max_seq_len exactly, short prompts that grow past a page, stop tokens."""
    import random

    from conftest import build_tiny
    from dsv4_ascend.config import preset

    rng = random.Random(seed)
    cfg = preset("tiny")
    cfg.sliding_window = rng.choice([1, 2, 4, 8, 16])
    cfg.compress_ratios = [rng.choice([0, 4, 8, 16]) for _ in range(cfg.num_hidden_layers)] + [0]
    cfg.index_topk = rng.choice([1, 4, 64])
    cfg.validate()
    msl, block = 32, 16
    base = [rng.randrange(2, 512) for _ in range(rng.randrange(block, 2 * block))]
    prompts = [base[:k] + [rng.randrange(2, 512) for _ in range(rng.randrange(1, 12))]
               for k in (block, len(base), rng.randrange(1, len(base)), 0)]
    prompts += [list(prompts[1])]
    prompts = [p[: msl - 4] for p in prompts]
    params = [SamplingParams(temperature=0, max_tokens=msl - len(prompts[0]))]  # to the context limit exactly
    params += [SamplingParams(temperature=0, max_tokens=rng.randrange(1, msl - len(p) - 1),
                              stop_token_ids=[rng.randrange(2, 512) for _ in range(20)]) for p in prompts[1:]]
    for _ in range(2):  # short prompts that grow long: sequences that need pages while others hold them
        prompts.insert(1, [rng.randrange(2, 512) for _ in range(rng.randrange(2, 6))])
        params.insert(1, SamplingParams(temperature=0, max_tokens=20))
    return build_tiny(seed, cfg=cfg), prompts, params, msl, block


# Seed 0 by default, without the MTP engine (37 s at load 5 on 2 cores); the other seeds (with MTP)
# are slow. A longer version of this loop ran over 20 seeds while hunting, with no mismatch.
@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in range(1, 4))])
def test_seeded_fuzz_engine_invariants(seed):
    """Greedy outputs equal each request alone, with prefix caching, preemption under a tight page budget, small
    prefill chunks and token budgets, and MTP drafting; every slot and page comes back after each run."""
    model, prompts, params, msl, block = _fuzz_case(seed)
    alone = Engine(model, max_slots=1, max_seq_len=msl, block_size=block, eos_token_id=-1)
    want = [alone.generate([p], sp)[0].output for p, sp in zip(prompts, params)]
    assert any(len(w) < sp.max_tokens for w, sp in zip(want, params)) or seed  # stop tokens do fire (seed 0)
    tight = _pages_cache_bytes(model, 3, msl, -(-msl // block), block)  # the pages of one full sequence
    engines = [Engine(model, max_slots=3, max_seq_len=msl, block_size=block, eos_token_id=-1, prefill_chunk=5,
                      max_num_batched_tokens=9, prefix_cache=True, prefix_records=4),
               Engine(model, max_slots=3, max_seq_len=msl, block_size=block, eos_token_id=-1, cache_bytes=tight),
               Engine(model, max_slots=3, max_seq_len=msl + 2, block_size=block, eos_token_id=-1,
                      speculative_tokens=2, prefix_cache=True, prefix_records=8)][: 3 if seed else 2]
    for eng, rounds in zip(engines, (2, 1, 2)):
        for _ in range(rounds):  # a second round hits the prefixes the first one cached
            assert _run(eng, prompts, params) == want
    assert engines[0].prefix.stats["hit_tokens"] > 0 and engines[1].stats["preemptions"] > 0
