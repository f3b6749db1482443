"""Structured output and sampling adjustments through the real server and the official `openai` client, on the
tiny random model: with random weights only constrained decoding can make the output parse, so a parse that
validates proves the grammar was enforced token by token."""
from __future__ import annotations

import json

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
             ({"tools": TOOLS, "parallel_tool_calls": False}, "parallel_tool_calls"),
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
