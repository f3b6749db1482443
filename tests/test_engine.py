"""Engine: continuous batching equals running each request alone; sampling semantics; capacity errors."""
from __future__ import annotations

import pytest
import torch

from dsv4_ascend.engine import CapacityError, Engine
from dsv4_ascend.sampling import SamplingBatch, SamplingParams, sample


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _greedy_by_recompute(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_engine_matches_recompute(tiny_model):
    eng = Engine(tiny_model, max_slots=2, max_seq_len=64, prefill_chunk=7, eos_token_id=-1)
    p = _prompt(13, 0)
    (req,) = eng.generate([p], SamplingParams(temperature=0, max_tokens=20))
    assert req.output == _greedy_by_recompute(tiny_model, p, 20)
    assert req.finish_reason == "length"


def test_continuous_batching_equals_alone(tiny_model):
    # 5 requests through 2 slots: they join and leave between steps; each must equal its solo run.
    prompts = [_prompt(n, i) for i, n in enumerate([3, 17, 9, 30, 5])]
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=i, max_tokens=6 + i) for i in range(5)]
    eng = Engine(tiny_model, max_slots=2, max_seq_len=64, prefill_chunk=8, eos_token_id=-1)
    together = [r.output for r in eng.generate(prompts, params)]
    for p, sp, out in zip(prompts, params, together):
        solo = Engine(tiny_model, max_slots=1, max_seq_len=64, eos_token_id=-1)
        assert solo.generate([p], sp)[0].output == out
    assert not eng.running and len(eng.free_slots) == 2


def test_stop_tokens_and_capacity(tiny_model):
    eng = Engine(tiny_model, max_slots=1, max_seq_len=32, eos_token_id=-1)
    p = _prompt(5, 1)
    first = eng.generate([p], SamplingParams(temperature=0, max_tokens=4))[0].output
    req = eng.generate([p], SamplingParams(temperature=0, max_tokens=4, stop_token_ids=(first[1],)))[0]
    assert req.output == first[:2] and req.finish_reason == "stop"
    with pytest.raises(CapacityError, match="max_seq_len 32"):
        eng.add_request(_prompt(30, 2), SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        eng.add_request([1, 999], SamplingParams())


def test_every_id_of_a_config_eos_list_ends_a_sequence(tiny_model, monkeypatch):
    # config.json may give eos_token_id as a list (transformers stops on any of them): the later ids end a
    # sequence too, and min_tokens holds every one of them back.
    from dsv4_ascend.config import ModelConfig

    cfg = ModelConfig.from_dict({**tiny_model.cfg.to_dict(), "eos_token_id": [7, 9, 7]})
    assert (cfg.eos_token_id, cfg.extra_eos_token_ids, cfg.eos_ids) == (7, [9], [7, 9])
    assert ModelConfig.from_dict(cfg.to_dict()).eos_ids == [7, 9]  # written back as the list
    p = _prompt(7, 3)
    free = Engine(tiny_model, max_slots=1, max_seq_len=64, eos_token_id=-1).generate(
        [p], SamplingParams(temperature=0, max_tokens=12))[0].output
    i = next(k for k in range(2, 12) if free[k] not in free[:k])  # a token seen first at step i >= 2
    monkeypatch.setattr(tiny_model.cfg, "eos_token_id", -5)  # never sampled: only the list's other id can stop it
    monkeypatch.setattr(tiny_model.cfg, "extra_eos_token_ids", [free[i]])
    eng = Engine(tiny_model, max_slots=1, max_seq_len=64)
    req = eng.generate([p], SamplingParams(temperature=0, max_tokens=12))[0]
    assert req.output == free[:i + 1] and req.finish_reason == "stop"
    held = eng.generate([p], SamplingParams(temperature=0, max_tokens=12, min_tokens=i + 2))[0]
    assert held.output[:i] == free[:i] and free[i] not in held.output[:i + 2]
    with pytest.raises(Exception, match="eos_token_id"):
        ModelConfig.from_dict({**tiny_model.cfg.to_dict(), "eos_token_id": []})


def test_sampling_rules():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    sb = SamplingBatch.of([SamplingParams(temperature=0, seed=1), SamplingParams(temperature=1.0, top_k=1, seed=2),
                           SamplingParams(temperature=1.0, top_p=1e-6, seed=3),
                           SamplingParams(temperature=5.0, top_k=3, seed=4)])
    step = torch.zeros(4, dtype=torch.long)
    tok, lp = sample(logits, sb, step)
    top1 = logits.argmax(-1)
    assert tok[:3].tolist() == top1[:3].tolist()  # greedy, top_k=1 and tiny top_p all reduce to argmax
    assert tok[3].item() in logits[3].topk(3).indices.tolist()
    assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0])
    # Same seed and step -> same token, regardless of batch position; different steps -> a spread.
    row = SamplingBatch.of([SamplingParams(temperature=1.0, seed=7)])
    draws = [sample(logits[3:4], row, torch.tensor([s]))[0].item() for s in range(200)]
    again = [sample(logits[3:4], row, torch.tensor([s]))[0].item() for s in range(200)]
    assert draws == again and len(set(draws)) > 5
    # Empirical distribution at temperature 1 follows softmax (2000 draws; 5 sigma bound on the top token).
    p = torch.softmax(logits[3], -1)
    many = torch.tensor([sample(logits[3:4], row, torch.tensor([s]))[0].item() for s in range(2000)])
    top = p.argmax()
    freq = (many == top).float().mean()
    sigma = (p[top] * (1 - p[top]) / 2000).sqrt()
    assert abs(freq - p[top]) < 5 * sigma


def test_max_seq_len_is_the_limit_not_the_page_rounded_cache(tiny_model):
    """The cache rounds max_seq_len up to whole pages (100 -> 112 with 16-token pages); a request reaching past 100
    was accepted and decoded positions up to 111, past the length asked for (and, when max_seq_len equals it, past
    max_position_embeddings). The limit is now the max_seq_len given; the server's context follows it."""
    eng = Engine(tiny_model, max_slots=1, max_seq_len=100, block_size=16, eos_token_id=-1)
    assert eng.cache.max_seq_len == 112
    prompt = list(range(2, 52))
    with pytest.raises(CapacityError, match="= 101 exceeds the engine's max_seq_len 100"):
        eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=51))
    req = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=50))[0]
    assert len(req.output) == 50 and req.finish_reason == "length"
