"""Tool calls while streaming: DeepSeek's DSML parsed as it arrives (`dsml_stream`), checked against the non-streamed
parser (`chat.parse_completion`) on rendered calls split at every kind of point, and end to end through the server
with the official `openai` client on an engine that emits scripted tokens (the tiny random model never writes DSML)."""
from __future__ import annotations

import itertools
import json
from collections import deque
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4_ascend.chat import DSML, EOS, THINK_END, _render_tool_calls, parse_completion
from dsv4_ascend.dsml_stream import ToolCallStream, partial_tool_calls
from dsv4_ascend.engine import Request

_ids = itertools.count()


def _stream(text: str, cuts: list[int]) -> tuple[str, list[dict], bool]:
    """Feed `text` in pieces cut at `cuts`; return (content, reassembled tool_calls, closed)."""
    ts = ToolCallStream(lambda: f"call_{next(_ids)}")
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    deltas = [d for i, p in enumerate(pieces) for d in ts.feed(p, final=i == len(pieces) - 1)]
    content = "".join(d.get("content", "") for d in deltas)
    calls: list[dict] = []
    for d in deltas:
        for tc in d.get("tool_calls", []):
            if tc["index"] == len(calls):
                assert set(tc) == {"index", "id", "type", "function"} and tc["function"]["arguments"] == ""
                calls.append({"type": tc["type"], "function": {"name": tc["function"]["name"], "arguments": ""}})
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    return content, calls, ts.closed


_VALUES = st.one_of(st.text(alphabet='ab<>/"\\\n{}é😀 ', max_size=12), st.integers(-5, 5), st.booleans(),
                    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.sampled_from("xy"), st.integers()))
_CALLS = st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({
    "name": st.text(alphabet="abc_", min_size=1, max_size=6),
    "arguments": st.dictionaries(st.text(alphabet="kq_", min_size=1, max_size=4), _VALUES, max_size=3)})}),
    min_size=1, max_size=3)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(content=st.text(alphabet="ab\n<", max_size=8), calls=_CALLS, data=st.data())
def test_streamed_tool_calls_equal_the_non_streamed_parse(content, calls, data):
    text = content + "".join(_render_tool_calls(calls))
    want = parse_completion(text + EOS, thinking=False)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(text) - 1, 1)), max_size=12)))
    got_content, got_calls, closed = _stream(text, cuts)
    assert closed and got_content == want["content"] and got_calls == want["tool_calls"]
    one_by_one = _stream(text, list(range(1, len(text))))
    assert one_by_one == (got_content, got_calls, True)


def test_arguments_stream_as_the_value_arrives_and_closing_tags_are_held_back():
    text = "".join(_render_tool_calls([{"type": "function", "function": {"name": "get_weather",
                                                                       "arguments": {"city": "Par<is"}}}]))
    block = text[len("\n\n<｜DSML｜tool_calls"):]
    upto = block.index("Par<is") + len("Par<")
    calls, closed = partial_tool_calls(block[:upto])
    assert calls == [("get_weather", '{"city": "Par', False)] and not closed  # "<" may open the closing tag
    calls, _ = partial_tool_calls(block[:upto + 1])
    assert calls == [("get_weather", '{"city": "Par<i', False)]


@pytest.mark.parametrize("text", [
    "hi\n\n<｜DSML｜tool_calls>\noops",                      # not an invoke
    "hi\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke nam=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",  # bad header
])
def test_malformed_block_before_any_call_becomes_content_as_when_not_streamed(text):
    content, calls, closed = _stream(text, list(range(1, len(text))))
    assert calls == [] and not closed
    assert content == text  # the non-streamed reply falls back to the whole text as content
    with pytest.raises(ValueError):
        parse_completion(text + EOS, thinking=False)


_GOOD = "".join(_render_tool_calls([
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}},
    {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}]))
MALFORMED = [  # malformed markup after a call was sent: (text, the calls its valid prefix holds)
    ("Sure." + _GOOD.replace('invoke name="get_time"', 'invoke nam="get_time"'),
     [("get_weather", '{"city": "Paris", "days": 3}')]),                        # a bad second header
    ("Sure." + _GOOD.replace('name="days"', 'name="city"'), [("get_weather", '{"city": "Paris"')]),  # duplicate
    ("Sure." + _GOOD.replace("</｜DSML｜invoke>\n<｜DSML｜invoke", "</｜DSML｜invoke>\nxx<｜DSML｜invoke"),
     [("get_weather", '{"city": "Paris", "days": 3}')]),                        # junk between invokes
    ("Sure." + _GOOD.replace("Paris</｜DSML｜parameter>\n", "Paris</｜DSML｜parameter>\nzz"),
     [("get_weather", '{"city": "Paris"')]),                                    # junk between parameters
]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=st.sampled_from(range(len(MALFORMED))), data=st.data())
def test_malformed_block_after_a_call_ends_the_same_however_the_stream_is_cut(case, data):
    """Streamed cut anywhere, one character at a time, or fed whole (as the non-streamed reply is built): the same
    content (text before the block, then the block's raw text), the same calls (those of the longest prefix that
    could still be valid), never closed (finish_reason stays the engine's)."""
    text, calls = MALFORMED[case]
    whole = _stream(text, [])
    cuts = sorted(data.draw(st.sets(st.integers(1, len(text) - 1), max_size=12)))
    assert _stream(text, cuts) == whole == _stream(text, list(range(1, len(text))))
    content, got, closed = whole
    assert not closed and content == text  # "Sure." + the raw block
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got] == calls
    with pytest.raises(ValueError):
        parse_completion(text + EOS, thinking=False)


# ------------------------------------------------------------------------------------- end to end, openai client

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from dsv4_ascend.server import BackgroundServer, create_app  # noqa: E402


class ScriptedEngine:
    """The engine surface the server uses, emitting a fixed token script for every request (two tokens a step)."""

    def __init__(self, vocab: int, eos: int, script: list[int], slots: int = 4) -> None:
        self.model = SimpleNamespace(cfg=SimpleNamespace(vocab_size=vocab))
        self.cache = SimpleNamespace(max_seq_len=4096, num_blocks=33, block_size=128, free_pages=32)
        self.max_seq_len = 4096  # Engine's per-request length limit (the server's context)
        self.eos, self.script = eos, script
        self.free_slots, self.waiting, self.running = deque(range(slots)), deque(), []
        self.last_step: dict[str, int] = {}  # Engine's per-step figures (none: no step metrics)

    @property
    def has_work(self) -> bool:
        return bool(self.running)

    def add_request(self, prompt, params) -> Request:
        req = Request(list(prompt), params)
        self.running.append(req)
        return req

    def abort(self, req: Request) -> None:
        req.finish_reason = req.finish_reason or "abort"
        if req in self.running:
            self.running.remove(req)

    def step(self) -> list:
        events = []
        self.last_step = {"tokens": 0}
        for r in list(self.running):
            for _ in range(2):
                tok = self.script[len(r.output)]
                r.output.append(tok)
                r.logprobs.append(-0.5)
                if tok == self.eos:
                    r.finish_reason = "stop"
                elif len(r.output) >= r.params.max_tokens:
                    r.finish_reason = "length"
                events.append((r, tok))
                if r.finished:
                    self.running.remove(r)
                    break
        self.last_step = {"tokens": len(events), "prefill_tokens": 0, "decode_tokens": len(events),
                          "preemptions": 0}
        return events

    def spec_stats(self) -> dict:
        return {}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CALLS = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris \"<i>\"", "days": 3}}},
         {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}]


@pytest.mark.parametrize("thinking", [False, True])
def test_streamed_chat_tool_calls_reassemble_to_the_non_streamed(served_tiny, thinking):
    _, tok, _ = served_tiny
    parts = (["Let me check", THINK_END] if thinking else []) + ["Checking the weather.", *_render_tool_calls(CALLS)]
    reply = "".join(parts)
    # as the model writes it: DSML markers and </think> as their own tokens (the template's control parts)
    script = tok.encode_segments([(p, p in (THINK_END, DSML)) for p in parts] + [(EOS, True)])
    assert tok.decode(script[:-1]) == reply and tok.token_to_id(DSML) in script  # DSML survives decoding
    engine = ScriptedEngine(tok.vocab_size, tok.eos_id, script)
    srv = BackgroundServer(create_app(engine, tok, served_model_name="tiny")).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        kw = dict(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                  max_tokens=len(script) + 5, extra_body={"thinking": thinking})
        r = c.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Checking the weather."
        want = [{"type": "function", "function": {"name": x["function"]["name"],
                                                  "arguments": json.dumps(x["function"]["arguments"])}}
                for x in CALLS]
        got = [{"type": tc.type, "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
               for tc in msg.tool_calls]
        assert got == want and all(tc.id.startswith("call_") for tc in msg.tool_calls)
        assert getattr(msg, "reasoning_content", None) == ("Let me check" if thinking else None)

        chunks = list(c.chat.completions.create(stream=True, **kw))
        deltas = [x.choices[0].delta for x in chunks]
        content = "".join(d.content or "" for d in deltas)
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        calls: dict[int, dict] = {}
        for d in deltas:
            for tc in d.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": tc.id, "type": tc.type,
                                                    "function": {"name": tc.function.name, "arguments": ""}})
                entry["function"]["arguments"] += tc.function.arguments or ""
        assert content == msg.content and reasoning == (msg.reasoning_content if thinking else "")
        assert [{k: v for k, v in x.items() if k != "id"} for x in calls.values()] == got
        assert len({x["id"] for x in calls.values()}) == 2
        assert sum(1 for d in deltas for tc in d.tool_calls or [] if tc.function.arguments) > 4  # fragments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # the openai client's own stream accumulator reaches the same message
        with c.chat.completions.stream(**kw) as s:
            final = s.get_final_completion().choices[0].message
        assert [(tc.function.name, tc.function.arguments) for tc in final.tool_calls] == [
            (x["function"]["name"], x["function"]["arguments"]) for x in got]

        # parallel_tool_calls false under tool_choice "auto": the first call only, as vLLM answers (was a 400)
        one = c.chat.completions.create(parallel_tool_calls=False, **kw).choices[0]
        assert one.finish_reason == "tool_calls" and one.message.content == msg.content
        assert [(tc.function.name, tc.function.arguments) for tc in one.message.tool_calls] == [
            (got[0]["function"]["name"], got[0]["function"]["arguments"])]
        with c.chat.completions.stream(parallel_tool_calls=False, **kw) as s:
            final = s.get_final_completion().choices[0]
        assert final.finish_reason == "tool_calls"
        assert [(tc.function.name, tc.function.arguments) for tc in final.message.tool_calls] == [
            (got[0]["function"]["name"], got[0]["function"]["arguments"])]
    finally:
        srv.stop(30)


def test_forced_tool_call_on_the_real_engine_streams_as_it_is_not_streamed(served_tiny):
    """tool_choice names a function: the grammar (constraints, llguidance) makes the tiny random model write DSML;
    greedy, the streamed deltas reassemble to exactly the non-streamed tool_calls."""
    pytest.importorskip("llguidance")
    from dsv4_ascend.engine import Engine

    model, tok, _ = served_tiny
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city", "days"],
        "properties": {"city": {"type": "string", "maxLength": 6}, "days": {"type": "integer", "minimum": 1,
                                                                              "maximum": 7}}}}}]
    engine = Engine(model, max_slots=2, max_seq_len=1536)  # the tools section is ~900 tiny-vocab tokens
    srv = BackgroundServer(create_app(engine, tok, served_model_name="tiny")).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        kw = dict(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0,
                  max_tokens=150, parallel_tool_calls=False)
        r = c.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "tool_calls"
        want = [(tc.function.name, tc.function.arguments) for tc in r.choices[0].message.tool_calls]
        assert want[0][0] == "get_weather" and set(json.loads(want[0][1])) == {"city", "days"}
        chunks = list(c.chat.completions.create(stream=True, **kw))
        calls: dict[int, list[str]] = {}
        for x in chunks:
            for tc in x.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(tc.index, [tc.function.name, ""])
                entry[1] += tc.function.arguments or ""
        assert [tuple(v) for v in calls.values()] == want
        assert "".join(x.choices[0].delta.content or "" for x in chunks) == (r.choices[0].message.content or "")
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    finally:
        srv.stop(60)


def test_malformed_dsml_after_a_call_same_message_streamed_or_not(served_tiny):
    """Through the server (scripted engine writing a reply whose second invoke header is malformed): the streamed
    deltas add up to exactly the non-streamed message: content, tool calls and finish_reason."""
    _, tok, _ = served_tiny
    text = MALFORMED[0][0]
    parts = [p for p in text.split(DSML)]  # DSML markers as their own (control) tokens, as the model writes them
    segments = [(p, False) for p in parts[:1]] + [x for p in parts[1:] for x in ((DSML, True), (p, False))]
    script = tok.encode_segments([s for s in segments if s[0]] + [(EOS, True)])
    assert tok.decode(script[:-1]) == text
    engine = ScriptedEngine(tok.vocab_size, tok.eos_id, script)
    srv = BackgroundServer(create_app(engine, tok, served_model_name="tiny")).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        kw = dict(model="tiny", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
                  max_tokens=len(script) + 5)
        r = c.chat.completions.create(**kw).choices[0]
        assert r.finish_reason == "stop" and r.message.content == text
        calls = [(tc.function.name, tc.function.arguments) for tc in r.message.tool_calls]
        assert calls == MALFORMED[0][1]
        chunks = list(c.chat.completions.create(stream=True, **kw))
        got: dict[int, list[str]] = {}
        for x in chunks:
            for tc in x.choices[0].delta.tool_calls or []:
                got.setdefault(tc.index, [tc.function.name, ""])[1] += tc.function.arguments or ""
        assert [tuple(v) for v in got.values()] == calls
        assert "".join(x.choices[0].delta.content or "" for x in chunks) == text
        assert chunks[-1].choices[0].finish_reason == "stop"
    finally:
        srv.stop(30)
