"""Logit adjustments (penalties, logit_bias, min_p, min_tokens, bad words) against a plain Python loop over each
row's token history, their wiring in the engine, and llguidance grammars driven token by token."""
from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from dsv4_ascend.engine import Engine
from dsv4_ascend.logits_process import LogitRules, adjust_logits
from dsv4_ascend.sampling import SamplingParams

EOS = 1


def _reference(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams, temp: float) -> list[float]:
    """vLLM's rules written out per token, in float64 Python."""
    out = list(logits)
    for t in range(len(out)):
        if len(output) < p.min_tokens and (t == EOS or t in p.stop_token_ids):
            out[t] = -math.inf
        for w in p.bad_words:
            if w[-1] == t and list(w[:-1]) == output[len(output) - len(w) + 1:]:
                out[t] = -math.inf
    for t, b in p.logit_bias:
        out[t] += b
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    if p.min_p > 0:
        cut = max(out) + max(temp, 1e-5) * math.log(p.min_p)
        out = [-math.inf if x < cut else x for x in out]
    return out


def test_adjusted_logits_equal_a_python_loop_over_the_history():
    V, rng = 70, random.Random(0)
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.7, temperature=0.8,
                             logit_bias={3: 2.5, 7: -100, 64: 100}, min_p=0.05, seed=0),
              SamplingParams(seed=1),  # neutral
              SamplingParams(repetition_penalty=0.6, frequency_penalty=-1.0, min_tokens=9, stop_token_ids=(4, 5),
                             temperature=0, max_tokens=20, seed=2),
              SamplingParams(presence_penalty=-2, min_p=0.3, temperature=1.5, bad_words=[(5,), (8, 9), (2, 8, 10)],
                             seed=3)]
    reqs = [SimpleNamespace(prompt=[rng.randrange(V) for _ in range(12)], output=[], params=p, slot=s)
            for s, p in zip((2, 0, 3, 1), params)]
    reqs[3].prompt[-1] = 2  # the output below ends "2, 8": bad word (2, 8, 10) bans 10 next, (8, 9) bans 9
    rules = LogitRules(slots=4, vocab=V, eos=[EOS])
    for r in reqs:
        rules.admit(r)
    for step in range(7):
        toks = [rng.randrange(V) for _ in reqs]
        if step == 6:
            toks[3] = 8
        elif step == 5:
            toks[3] = 2
        for r, t in zip(reqs, toks):
            r.output.append(t)
        rules.record(reqs, torch.tensor(toks), toks)
    logits = torch.randn(len(reqs), V, generator=torch.Generator().manual_seed(0)) * 4
    temps = torch.tensor([p.temperature for p in params])
    got = adjust_logits(logits, rules.batch(reqs), temps)
    want = torch.tensor([_reference(logits[i].double().tolist(), r.prompt, r.output, r.params, r.params.temperature)
                         for i, r in enumerate(reqs)], dtype=torch.float32)
    # fp32 against float64: a handful of roundings of O(10) values, ~1e-6 relative.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], logits[1])  # the neutral row is untouched, bit for bit
    assert got[2, EOS] == got[2, 4] == got[2, 5] == -math.inf  # min_tokens not reached
    assert got[3, 9] == got[3, 10] == got[3, 5] == -math.inf
    assert rules.batch([reqs[1]]) is None  # a neutral batch does no adjustment work at all


def test_engine_counts_and_bias(tiny_model):
    eng = Engine(tiny_model, max_slots=2, max_seq_len=64)
    prompt = [5, 6, 7, 8, 9, 10]
    (base,) = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=6))
    assert EOS not in base.output
    x = base.output[0]
    (up,) = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logit_bias={17: 100}))
    assert up.output == [17] * 6
    (down,) = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logit_bias={x: -100}))
    assert x not in down.output
    # EOS at +100 ends at once; min_tokens makes it (and stop_token_ids) impossible for the first 4 tokens.
    (now,) = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=9, logit_bias={EOS: 100}))
    assert now.output == [EOS]
    (late,) = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=9, logit_bias={EOS: 100, 23: 100},
                                                    stop_token_ids=(23,), min_tokens=4))
    assert len(late.output) == 5 and late.output[-1] in (EOS, 23) and not {EOS, 23} & set(late.output[:4])
    # Penalties: the slot's device counts are the output's histogram, its prompt row the prompt's tokens.
    (pen,) = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=8, repetition_penalty=1.2,
                                                   frequency_penalty=0.4, presence_penalty=0.3))
    slot = next(s for s in range(2) if eng.rules.state.counts[s].sum() == len(pen.output))
    assert torch.equal(eng.rules.state.counts[slot], torch.bincount(torch.tensor(pen.output), minlength=512).int())
    assert eng.rules.state.prompt[slot].nonzero().flatten().tolist() == sorted(set(prompt))


def test_engine_refuses_adjustments_with_mtp_drafting():
    rules = LogitRules(slots=1, vocab=8, eos=[EOS])
    with pytest.raises(ValueError, match="speculative"):
        rules.check(SamplingParams(min_p=0.1), speculative=True)
    rules.check(SamplingParams(), speculative=True)


@pytest.mark.parametrize("field,value,match", [
    ("presence_penalty", 2.5, "presence_penalty"), ("frequency_penalty", float("nan"), "frequency_penalty"),
    ("repetition_penalty", 0, "repetition_penalty"), ("min_p", 1.1, "min_p"), ("min_tokens", 99, "min_tokens"),
    ("logit_bias", {3: 101}, "logit_bias"), ("logit_bias", {-1: 1}, "logit_bias"), ("bad_words", [()], "bad_words"),
    ("guided", "json", "guided"),
])
def test_bad_params_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(max_tokens=10, **{field: value})
    with pytest.raises(ValueError, match="logit_bias token ids must be in"):
        SamplingParams(logit_bias={600: 1.0}).check_vocab(512)


# ------------------------------------------------------------------------------------------------ grammars

@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    pytest.importorskip("llguidance")
    from dsv4_ascend.tokenizer import build_tiny_tokenizer, load_tokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(d, 512)
    return load_tokenizer(d)


def _walk(spec, tok, seed: int, steps: int = 600) -> str:
    """Random tokens among those the matcher allows, until EOS; the decoded text (EOS included)."""
    from dsv4_ascend.constraints import Matcher, mask_words
    from dsv4_ascend.logits_process import allowed_tokens

    m, rng, out = Matcher(spec, 512), random.Random(seed), []
    row = torch.zeros(mask_words(512), dtype=torch.int32)
    for _ in range(steps):
        m.fill(row)
        allowed = allowed_tokens(row.view(1, -1), 512)[0].nonzero().flatten().tolist()
        t = rng.choice(allowed)
        assert m.advance(t)
        out.append(t)
        if t == tok.eos_id:
            return tok.decode(out)
    raise AssertionError(f"no EOS after {steps} tokens: {tok.decode(out)!r}")


TOOLS = ({"type": "function", "function": {"name": "f", "parameters": {
             "type": "object", "required": ["a"], "properties": {"a": {"type": "string", "maxLength": 4},
                                                                 "b": {"type": "integer", "maximum": 99}}}}},
         {"type": "function", "function": {"name": "g"}})


def test_tool_call_grammar_writes_what_the_dsml_parser_reads(tiny_tok):
    import jsonschema

    from dsv4_ascend.chat import EOS as EOS_TEXT
    from dsv4_ascend.chat import parse_completion
    from dsv4_ascend.constraints import GuidedSpec

    seen = set()
    for seed in range(6):
        spec = GuidedSpec("tool_call", tools=TOOLS, tokenizer=tiny_tok, thinking=seed % 2 == 1)
        text = _walk(spec, tiny_tok, seed)
        assert text.endswith(EOS_TEXT)
        msg = parse_completion(text, thinking=spec.thinking)
        for call in msg["tool_calls"]:
            fn = next(t["function"] for t in TOOLS if t["function"]["name"] == call["function"]["name"])
            jsonschema.validate(json.loads(call["function"]["arguments"]), fn.get("parameters", {}))
        seen.add(len(msg["tool_calls"]))
    assert max(seen) > 1  # "required" allows parallel calls
    one = GuidedSpec("tool_call", tools=TOOLS, name="g", tokenizer=tiny_tok)
    assert [c["function"]["name"] for c in parse_completion(_walk(one, tiny_tok, 0), False)["tool_calls"]] == ["g"]


def test_json_grammars_and_refusals(tiny_tok):
    from dsv4_ascend.constraints import GuidedSpec, Matcher

    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"enum": ["x", "y"]}},
              "required": ["n", "s"], "additionalProperties": False}
    import jsonschema

    for seed in range(3):
        text = _walk(GuidedSpec("json_schema", schema=schema, tokenizer=tiny_tok), tiny_tok, seed)
        jsonschema.validate(json.loads(text.removesuffix(tiny_tok.eos_token)), schema)
    m = Matcher(GuidedSpec("json_object", tokenizer=tiny_tok), 512)
    assert not m.advance(tiny_tok.encode_text("x")[0]) and m.error  # JSON cannot start with "x"
    with pytest.raises(ValueError):
        GuidedSpec("json_schema", schema={"type": "no-such"}, tokenizer=tiny_tok).check(512)
    with pytest.raises(ValueError, match="not among the tools"):
        GuidedSpec("tool_call", tools=TOOLS, name="h", tokenizer=tiny_tok)
