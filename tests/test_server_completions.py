"""/v1/completions as scoring and sampling clients use it: echo with prompt logprobs (computed in the prefill),
vLLM's prompt_logprobs, lists of prompts, n > 1 and best_of, streamed and not, through the official `openai`
client and raw HTTP, checked against the model's own log-probabilities computed directly."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from dsv4_ascend.engine import Engine  # noqa: E402
from dsv4_ascend.sampling import SamplingParams  # noqa: E402
from dsv4_ascend.server import BackgroundServer, create_app  # noqa: E402
from dsv4_ascend.server.protocol import choice_seed  # noqa: E402

NAME = "tiny"
SEQ = 128
TIMEOUT = 120.0
# The server's prefill and the direct forward run the same fp32 computation on the same tokens; 1e-4 leaves room
# for a different reduction order (chunk layout) in fp32 log-softmax over an 8k vocabulary.
TOL = 1e-4


@pytest.fixture(scope="module")
def server(served_tiny):
    model, tok, _ = served_tiny
    engine = Engine(model, max_slots=8, max_seq_len=SEQ)
    srv = BackgroundServer(create_app(engine, tok, served_model_name=NAME)).start()
    yield srv, engine
    srv.stop(60)


def _client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def _direct(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 from one full forward pass (no engine), [len-1] fp32, and the log-softmax
    rows [len-1, V]."""
    with torch.no_grad():
        lps = torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), -1)
    return lps.gather(-1, torch.tensor(ids[1:]).unsqueeze(1))[:, 0], lps


def _refs(model, prompts: list[list[int]], params: list[SamplingParams]):
    """The same requests run together through one engine of their own (seeded sampling depends on the seed and
    the position only, never on the batch)."""
    return Engine(model, max_slots=len(prompts), max_seq_len=SEQ).generate(prompts, params)


def _solo(model, prompt, max_tokens, **kw):
    return _refs(model, [prompt], [SamplingParams(max_tokens=max_tokens, **kw)])[0]


def test_echo_logprobs_equal_the_models_own_streamed_and_not(server, served_tiny):
    srv, _ = server
    model, tok, _ = served_tiny
    c = _client(srv)
    prompt = "The quick brown fox jumps over"
    ids = [tok.bos_id] + tok.encode_text(prompt)
    want, rows = _direct(model, ids)
    ref = _solo(model, ids, 3, temperature=0)
    gen_text = tok.decode(ref.output, skip_special_tokens=True)

    r = c.completions.create(model=NAME, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0)
    ch = r.choices[0]
    assert ch.text == prompt + gen_text
    lp = ch.logprobs
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want.tolist(), abs=TOL)
    assert lp.token_logprobs[len(ids):] == pytest.approx(ref.logprobs, abs=TOL)
    for i, top in enumerate(lp.top_logprobs[1:len(ids)]):  # the prompt's top-2 are the model's top-2
        # (and, as OpenAI's legacy format promises, the prompt token itself: up to logprobs + 1 entries)
        want = rows[i].topk(2).values.tolist() + [lp.token_logprobs[i + 1]]
        assert max(top.values()) == pytest.approx(want[0], abs=TOL) and len(top) <= 3
        assert all(min(abs(v - w) for w in want) < TOL for v in top.values())
        assert top[lp.tokens[i + 1]] >= lp.token_logprobs[i + 1] - 1e-6  # ids sharing a text keep the best
    assert lp.text_offset[:2] == [0, 0] and lp.text_offset[len(ids)] == len(prompt)  # BOS prints as nothing
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 3

    chunks = list(c.completions.create(model=NAME, prompt=prompt, echo=True, logprobs=2, max_tokens=3,
                                       temperature=0, stream=True))
    assert "".join(x.choices[0].text for x in chunks) == ch.text
    streamed = [v for x in chunks if x.choices[0].logprobs for v in x.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)

    # echo without logprobs: the prompt text only; token-id prompts echo their decoded text
    r = c.completions.create(model=NAME, prompt=ids, echo=True, max_tokens=3, temperature=0)
    assert r.choices[0].text == prompt + gen_text and r.choices[0].logprobs is None


def test_top_logprobs_always_hold_the_chosen_token(server, served_tiny):
    """OpenAI's legacy completions: "the API will always return the logprob of the sampled token, so there may be up
    to logprobs+1 elements" (vLLM too); logprobs 0 gave {} and a sampled token outside the top-N was missing."""
    srv, _ = server
    c = _client(srv)
    for n in (0, 1):
        r = c.completions.create(model=NAME, prompt="The quick brown fox", max_tokens=8, temperature=1.0, seed=3,
                                 logprobs=n, echo=True)
        lp = r.choices[0].logprobs
        for tok_text, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert 1 <= len(top) <= n + 1 and top[tok_text] >= value - 1e-6  # ids sharing a text keep the best


def test_vllm_prompt_logprobs_field(server, served_tiny):
    srv, _ = server
    model, tok, _ = served_tiny
    ids = [tok.bos_id] + tok.encode_text("Hello! How are you today?")
    want, rows = _direct(model, ids)
    body = {"model": NAME, "prompt": ids, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 3}
    for stream in (False, True):
        if stream:
            with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True},
                              timeout=TIMEOUT) as resp:
                import json
                events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
            pl = next(e["choices"][0]["prompt_logprobs"] for e in events if "prompt_logprobs" in e["choices"][0])
        else:
            pl = httpx.post(srv.url + "/v1/completions", json=body, timeout=TIMEOUT).json()["choices"][0][
                "prompt_logprobs"]
        assert len(pl) == len(ids) and pl[0] is None
        for i, entry in enumerate(pl[1:]):
            mine = entry[str(ids[i + 1])]
            assert mine["logprob"] == pytest.approx(want[i].item(), abs=TOL)
            assert mine["rank"] == int((rows[i] > want[i]).sum()) + 1
            top = sorted((v for k, v in entry.items() if v["rank"] <= 3), key=lambda v: v["rank"])
            assert [v["rank"] for v in top] == [1, 2, 3]
            assert [v["logprob"] for v in top] == pytest.approx(rows[i].topk(3).values.tolist(), abs=TOL)


def test_list_of_prompts_one_choice_each(server, served_tiny):
    srv, _ = server
    model, tok, _ = served_tiny
    c = _client(srv)
    texts = ["The capital of France is", "Numbers such as", "She sells sea shells"]
    ids = [[tok.bos_id] + tok.encode_text(t) for t in texts]
    refs = [tok.decode(r.output, skip_special_tokens=True)
            for r in _refs(model, ids, [SamplingParams(max_tokens=5, temperature=0) for _ in ids])]
    for prompt in (texts, ids, [texts[0], ids[1], texts[2]]):
        r = c.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0)
        assert [ch.index for ch in r.choices] == [0, 1, 2] and [ch.text for ch in r.choices] == refs
        assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 15
        chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        got = ["".join(x.choices[0].text for x in chunks if x.choices and x.choices[0].index == i) for i in range(3)]
        assert got == refs and chunks[-1].usage.completion_tokens == 15
        assert sorted(x.choices[0].index for x in chunks if x.choices and x.choices[0].finish_reason) == [0, 1, 2]


def test_n_choices_use_derived_seeds_streamed_and_not(server, served_tiny):
    srv, _ = server
    model, tok, _ = served_tiny
    c = _client(srv)
    kw = dict(model=NAME, max_tokens=6, temperature=1.0)
    prompts = ["Hello! How are you", "In the morning the train"]
    r = c.completions.create(prompt=prompts, n=3, seed=11, **kw)
    assert [ch.index for ch in r.choices] == list(range(6))
    ids = [[tok.bos_id] + tok.encode_text(p) for p in prompts for _ in range(3)]
    # choice j of each prompt = one request with seed 11 + j
    refs = _refs(model, ids, [SamplingParams(max_tokens=6, temperature=1.0, seed=choice_seed(11, j))
                              for _ in prompts for j in range(3)])
    assert [ch.text for ch in r.choices] == [tok.decode(x.output, skip_special_tokens=True) for x in refs]
    assert len({ch.text for ch in r.choices[:3]}) > 1  # different seeds, different samples (8k vocab, T=1)
    chunks = list(c.completions.create(prompt=prompts, n=3, seed=11, stream=True, **kw))
    got = ["".join(x.choices[0].text for x in chunks if x.choices[0].index == i) for i in range(6)]
    assert got == [ch.text for ch in r.choices]
    assert choice_seed(2**63 - 1, 1) == -(2**63)  # wraps inside int64


def test_best_of_keeps_the_highest_cumulative_logprob(server, served_tiny):
    srv, _ = server
    model, tok, _ = served_tiny
    c = _client(srv)
    ids = [tok.bos_id] + tok.encode_text("Reading, writing and")
    r = c.completions.create(model=NAME, prompt=ids, n=2, best_of=4, seed=5, max_tokens=4, temperature=1.0,
                             logprobs=0)
    cands = _refs(model, [ids] * 4, [SamplingParams(max_tokens=4, temperature=1.0, seed=choice_seed(5, j))
                                     for j in range(4)])
    order = sorted(range(4), key=lambda j: -sum(cands[j].logprobs))
    assert [ch.text for ch in r.choices] == [tok.decode(cands[j].output, skip_special_tokens=True) for j in order[:2]]
    scores = [sum(ch.logprobs.token_logprobs) for ch in r.choices]
    assert scores[0] >= scores[1] and math.isclose(scores[0], sum(cands[order[0]].logprobs), abs_tol=1e-3)
    assert r.usage.completion_tokens == 8  # the returned choices' tokens


def test_lm_eval_style_scoring_request(server, served_tiny):
    """What lm-eval's local-completions sends for loglikelihood: token-id prompts in a list, echo, logprobs 1,
    max_tokens 1, temperature 0: one choice per prompt, prompt + 1 token logprobs each."""
    srv, _ = server
    model, tok, _ = served_tiny
    prompts = [[tok.bos_id] + tok.encode_text(t) for t in ("The sky is clear", "Paris is a city on the river")]
    body = {"model": NAME, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    out = httpx.post(srv.url + "/v1/completions", json=body, timeout=TIMEOUT).json()
    for ch, ids in zip(sorted(out["choices"], key=lambda ch: ch["index"]), prompts):
        lps = ch["logprobs"]["token_logprobs"]
        assert len(lps) == len(ids) + 1 and lps[0] is None
        assert lps[1:-1] == pytest.approx(_direct(model, ids)[0].tolist(), abs=TOL)


def test_max_tokens_0_with_echo_scores_the_prompt_alone(server, served_tiny):
    """max_tokens 0 with echo (OpenAI's legacy scoring request, which vLLM also answers): the prompt alone, its
    logprobs the model's own, no completion token (the engine samples one: it is dropped), streamed and not;
    without echo it is a 400 naming max_tokens. It used to be refused whatever echo said."""
    srv, _ = server
    model, tok, _ = served_tiny
    c = _client(srv)
    prompts = [[tok.bos_id] + tok.encode_text(t) for t in ("The sky is clear", "Paris is a city on the river")]
    r = c.completions.create(model=NAME, prompt=prompts, echo=True, logprobs=1, max_tokens=0, temperature=0, n=2)
    assert len(r.choices) == 4 and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == sum(map(len, prompts))
    for ch in r.choices:
        ids = prompts[ch.index // 2]
        assert ch.text == tok.decode(ids, skip_special_tokens=True) and ch.finish_reason == "length"
        lp = ch.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(_direct(model, ids)[0].tolist(), abs=TOL)

    text = "The quick brown fox"
    ids = [tok.bos_id] + tok.encode_text(text)
    chunks = list(c.completions.create(model=NAME, prompt=text, echo=True, logprobs=1, max_tokens=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(x.choices[0].text for x in chunks if x.choices) == text
    streamed = [v for x in chunks if x.choices and x.choices[0].logprobs for v in x.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(_direct(model, ids)[0].tolist(), abs=TOL)
    assert [x.choices[0].finish_reason for x in chunks if x.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 0 and chunks[-1].usage.prompt_tokens == len(ids)

    r = httpx.post(srv.url + "/v1/completions", json={"model": NAME, "prompt": text, "max_tokens": 0},
                   timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
