"""Structured output and sampling adjustments through the real server and the official `openai` client, on the
tiny random model: with random weights only constrained decoding can make the output parse, so a parse that
validates proves the grammar was enforced token by token."""
from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from dsv4_ascend.engine import Engine  # noqa: E402
from dsv4_ascend.server import BackgroundServer, create_app  # noqa: E402

NAME = "tiny"
TIMEOUT = 120.0

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 150},
                         "ok": {"type": "boolean"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "required": ["city", "days"],
                                                          "properties": {"city": {"type": "string", "maxLength": 6},
                                                                         "days": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 7}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "required": ["zone"], "properties": {"zone": {"enum": ["utc", "cet"]}}}}}]
MSGS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(served_tiny):
    model, tok, _ = served_tiny
    engine = Engine(model, max_slots=4, max_seq_len=1536)  # the tools section alone is ~900 tiny-vocab tokens
    srv = BackgroundServer(create_app(engine, tok, served_model_name=NAME)).start()
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    srv.stop(60)


def _chat(client, stream: bool = False, **kw):
    args = {"model": NAME, "messages": MSGS, "max_tokens": 150, "temperature": 0, **kw}
    if not stream:
        return client.chat.completions.create(**args).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **args))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].choices[0].finish_reason


def test_json_schema_output_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    choice = _chat(client, response_format=fmt)
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    free = _chat(client, max_tokens=20)  # the same request unconstrained: random-weight noise, not JSON
    with pytest.raises(ValueError):
        json.loads(free.message.content)
    text, reason = _chat(client, stream=True, response_format=fmt)
    assert (text, reason) == (choice.message.content, "stop")


def test_json_object_output_parses(client):
    choice = _chat(client, response_format={"type": "json_object"})
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("tool_choice,names", [
    ("required", ("get_weather", "get_time")),
    ({"type": "function", "function": {"name": "get_time"}}, ("get_time",)),
    ({"type": "function", "function": {"name": "get_weather"}}, ("get_weather",)),
])
def test_tool_choice_forces_a_parsable_call(client, tool_choice, names):
    # "required" allows one or more calls unless parallel_tool_calls is false; these random weights, greedy, would
    # open another call forever.
    choice = _chat(client, tools=TOOLS, tool_choice=tool_choice, max_tokens=500, parallel_tool_calls=False)
    assert choice.finish_reason == "tool_calls", choice.message
    calls = choice.message.tool_calls
    assert calls and all(c.function.name in names for c in calls)
    if len(names) == 1:
        assert len(calls) == 1
    for c in calls:
        params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == c.function.name)
        jsonschema.validate(json.loads(c.function.arguments), params)


def test_bad_constraints_are_400s_naming_the_field(client):
    cases = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
             ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}},
              "response_format"),
             ({"response_format": {"type": "xml"}}, "response_format"),
             ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
             ({"tool_choice": "required"}, "tool_choice"),
             ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
             ({"parallel_tool_calls": False}, "parallel_tool_calls"),  # no tools (with tools: tool_stream)
             ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
             ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"), ({"repetition_penalty": 0}, "repetition_penalty"),
             ({"min_p": 1.5}, "min_p"), ({"presence_penalty": 2.5}, "presence_penalty")]
    for extra, param in cases:
        body = {"max_tokens": 4, **extra}
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=NAME, messages=MSGS, extra_body=body)
        assert err.value.body["param"] == param, (extra, err.value.body)


def test_logit_bias_and_min_tokens_through_the_server(client, served_tiny):
    _, tok, _ = served_tiny
    word = tok.encode_text(" Paris")[-1]
    r = client.completions.create(model=NAME, prompt="The capital", max_tokens=5, temperature=0,
                                  logit_bias={str(word): 100})
    assert tok.encode_text(r.choices[0].text) == [word] * 5
    # EOS favoured by +100 ends at once, unless min_tokens forbids it: then exactly min_tokens tokens.
    eos = {str(tok.eos_id): 100}
    r = client.completions.create(model=NAME, prompt="The capital", max_tokens=10, temperature=0, logit_bias=eos)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=NAME, prompt="The capital", max_tokens=10, temperature=0, logit_bias=eos,
                                  extra_body={"min_tokens": 4})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "stop"


def test_stop_strings_wait_for_min_tokens(client, served_tiny):
    """As vLLM does, stop strings are looked for once min_tokens tokens are out: they ended the output before."""
    _, tok, _ = served_tiny
    word = tok.encode_text(" the")[0]
    text = tok.decode([word])
    kw = dict(model=NAME, prompt="The capital", max_tokens=10, temperature=0, logit_bias={str(word): 100},
              stop=[text])
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason) == ("", 1, "stop")
    for stream in (False, True):
        r = client.completions.create(stream=stream, extra_body={"min_tokens": 3}, **kw)
        if stream:
            chunks = list(r)
            got = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            got = r.choices[0].text, r.choices[0].finish_reason
            assert r.usage.completion_tokens == 3
        assert got == (text * 2, "stop")  # the third token completes the first stop string looked for


# ------------------------------------------------------------------------- vLLM's structured-output parameters

GBNF = 'root ::= "yes" | "no" | "maybe"'
LARK = 'start: "id-" /[0-9]{3}/'


def _valid(t: str) -> bool:
    return jsonschema.validate(json.loads(t), SCHEMA) is None


@pytest.mark.parametrize("body,check,full", [  # full: also streamed and on /v1/completions
    ({"guided_json": SCHEMA, "max_tokens": 150}, _valid, True),
    ({"guided_json": json.dumps(SCHEMA), "max_tokens": 150}, _valid, False),
    ({"structured_outputs": {"json": SCHEMA}, "max_tokens": 150}, _valid, False),
    ({"structured_outputs": {"json_object": True}, "max_tokens": 150}, lambda t: isinstance(json.loads(t), dict),
     False),
    ({"guided_regex": r"[a-c]{2}-\d{3}"}, lambda t: re.fullmatch(r"[a-c]{2}-\d{3}", t) is not None, True),
    ({"structured_outputs": {"regex": "(red|green) [0-9]"}}, lambda t: re.fullmatch("(red|green) [0-9]", t), False),
    ({"guided_choice": ["Paris", "Rome", "a b"]}, lambda t: t in ("Paris", "Rome", "a b"), True),
    ({"structured_outputs": {"choice": ["x1", "y2"]}}, lambda t: t in ("x1", "y2"), False),
    ({"guided_grammar": LARK}, lambda t: re.fullmatch("id-[0-9]{3}", t), True),
    ({"structured_outputs": {"grammar": GBNF}}, lambda t: t in ("yes", "no", "maybe"), True),
])
def test_vllm_guided_fields_force_the_output(client, body, check, full):
    """Each of vLLM's fields on the tiny random model: only the grammar can make the output match; chat, and for
    one field of each kind also streamed and on /v1/completions."""
    choice = _chat(client, extra_body={"max_tokens": 60, **body})
    assert choice.finish_reason == "stop" and check(choice.message.content), choice.message.content
    if not full:
        return
    text, reason = _chat(client, stream=True, extra_body={"max_tokens": 60, **body})
    assert (text, reason) == (choice.message.content, "stop")
    r = client.completions.create(model=NAME, prompt="Answer:", max_tokens=60, temperature=0, extra_body=body)
    assert r.choices[0].finish_reason == "stop" and check(r.choices[0].text), r.choices[0].text


def test_vllm_guided_fields_refused_clearly(client):
    cases = [({"guided_regex": "("}, "guided_regex"), ({"guided_grammar": "start: nope"}, "guided_grammar"),
             ({"guided_json": "{not json"}, "guided_json"), ({"guided_choice": []}, "guided_choice"),
             ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
             ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
             ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
             ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
             ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
             ({"bad_words": ["  "]}, "bad_words"), ({"bad_words": "x"}, "bad_words"),
             # a trailing lone backslash: llguidance's regex_to_lark dropped it ("a\\" was enforced as "a")
             ({"guided_regex": "a\\"}, "guided_regex"), ({"structured_outputs": {"regex": "\\"}}, "structured_outputs")]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=NAME, messages=MSGS, extra_body={"max_tokens": 4, **extra})
        assert err.value.body["param"] == param, (extra, err.value.body)


def test_escaped_backslashes_in_a_regex_still_work(client):
    r = client.completions.create(model=NAME, prompt="x", max_tokens=4, temperature=0,
                                  extra_body={"guided_regex": "a\\\\"})  # the regex a\\ : "a" then a backslash
    assert r.choices[0].text == "a\\" and r.choices[0].finish_reason == "stop"


def test_bad_words_as_strings(client, served_tiny):
    """vLLM's semantics over HTTP: a word given as text is banned as its token sequence (and after a space); a
    single-token word never appears. The free greedy reply's first token, banned by its text, is never generated."""
    from dsv4_ascend.server.protocol import _bad_words

    _, tok, _ = served_tiny
    word = "Paris"
    ids, spaced = tuple(tok.encode_text(word)), tuple(tok.encode_text(" " + word))
    want = {ids} | ({spaced} if len(spaced) == len(ids) and spaced[0] != ids[0] else set())
    assert set(_bad_words(["  " + word], tok)) == want
    kw = dict(model=NAME, prompt="The capital", max_tokens=16, temperature=0, logprobs=0)
    free = client.completions.create(**kw).choices[0].logprobs.tokens
    # the first generated token that is a word on its own: one token, no leading space (so banned always)
    i = next(i for i, t in enumerate(free) if t.strip() == t and len(tok.encode_text(t)) == 1)
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(stream=True, extra_body={"bad_words": [free[i]]}, **kw))
            got = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        else:
            got = client.completions.create(extra_body={"bad_words": [free[i]]}, **kw).choices[0].logprobs.tokens
        assert got[:i] == free[:i] and free[i] not in got, (free, got)  # greedy: the same up to the banned word


# ------------------------------------------------------------------------------------------------ chat n > 1

def test_chat_n_choices_each_with_its_seed(client):
    """n choices, each its own index; choice i is the single-choice request with seed + i; usage counts every
    choice's tokens; streamed, the deltas of each index add up to the non-streamed choices."""
    kw = dict(model=NAME, messages=MSGS, max_tokens=12, temperature=1.0, seed=7)
    r = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(**{**kw, "seed": 7 + i}) for i in range(3)]
    assert [c.message.content for c in r.choices] == [s.choices[0].message.content for s in singles]
    assert len({c.message.content for c in r.choices}) > 1  # different seeds sample differently
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens
    chunks = list(client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw))
    text, reasons = ["", "", ""], [None, None, None]
    for c in chunks:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    assert text == [c.message.content for c in r.choices]
    assert reasons == [c.finish_reason for c in r.choices]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # with a constraint, every choice is constrained
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    r = client.chat.completions.create(n=2, response_format=fmt, **{**kw, "max_tokens": 150})
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
