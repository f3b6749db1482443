"""`dsv4 serve`: the real server (uvicorn, loopback, free port) on the tiny model, driven by the official `openai`
client and raw HTTP. Every wait is bounded; every server is stopped at the end of its test or module."""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from dsv4_ascend.chat import encode_messages  # noqa: E402
from dsv4_ascend.engine import Engine  # noqa: E402
from dsv4_ascend.sampling import SamplingParams  # noqa: E402
from dsv4_ascend.server import BackgroundServer, create_app  # noqa: E402
from dsv4_ascend.server.text import Output, ThinkSplit  # noqa: E402

NAME = "tiny"
SEQ = 128  # cache capacity per sequence (one 128-token page)
SLOTS = 8
TIMEOUT = 120.0  # per HTTP request (slow shared CI machines)


def _start(served_tiny, api_key=None, slots=SLOTS, drain=30.0, max_queue=512):
    model, tok, _ = served_tiny
    engine = Engine(model, max_slots=slots, max_seq_len=SEQ)
    app = create_app(engine, tok, served_model_name=NAME, api_key=api_key, max_queue=max_queue)
    srv = BackgroundServer(app, drain_timeout=drain)
    return srv.start(), engine


@pytest.fixture(scope="module")
def server(served_tiny):
    srv, engine = _start(served_tiny)
    yield srv, engine
    srv.stop(60)
    assert not srv.thread.is_alive()


def _client(srv, key="unused", **kw):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT, **kw)


def _solo(model, prompt, max_tokens):
    """Greedy reference: the same prompt alone through its own engine (one slot)."""
    eng = Engine(model, max_slots=1, max_seq_len=SEQ)
    (req,) = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens))
    return req


def _metrics(srv) -> dict[str, float]:
    text = httpx.get(srv.url + "/metrics", timeout=TIMEOUT).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _wait_for(srv, ok, what: str, deadline_s=30.0) -> dict[str, float]:
    deadline = time.monotonic() + deadline_s
    while True:
        m = _metrics(srv)
        if ok(m):
            return m
        assert time.monotonic() < deadline, f"{what}: {m}"
        time.sleep(0.05)


def _wait_idle(srv, deadline_s=30.0) -> dict[str, float]:
    return _wait_for(srv, lambda m: m["dsv4_requests_running"] == m["dsv4_cache_slots_used"]
                     == m["dsv4_requests_waiting"] == 0, "server did not go idle", deadline_s)


def _err(resp, status=400) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


# ------------------------------------------------------------------------------------------- pure helpers

def test_stop_strings_and_think_split_stream_equal_one_shot():
    class Chars:  # a "tokenizer" whose ids are characters: every split point gets exercised
        def stream_decoder(self, skip_special_tokens=False):
            class D:
                def push(self, t):
                    return chr(t)

                def flush(self):
                    return ""
            return D()

    text = "abc<think-ish>reason</think>the answer. STOP here"
    out, pieces = Output(Chars(), ("STOP", "zzz")), []
    for ch in text:
        out.push(ord(ch), 0.0, None)
        pieces.append(out.take())
    out.end("length")
    pieces.append(out.take())
    assert "".join(pieces) == "abc<think-ish>reason</think>the answer. " and out.finish == "stop" and out.stop_hit
    assert all("S" not in p for p in pieces)  # the held-back stop prefix never leaked
    split = ThinkSplit(True)
    parts = [split.feed(p) for p in pieces] + [split.feed("", final=True)]
    assert "".join(r for r, _ in parts) == "abc<think-ish>reason"
    assert "".join(c for _, c in parts) == "the answer. "


# ------------------------------------------------------------------------------------ openai client, basic

def test_models_health_and_metrics_format(server):
    srv, _ = server
    assert httpx.get(srv.url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    models = _client(srv).models.list()
    assert [m.id for m in models.data] == [NAME]
    text = httpx.get(srv.url + "/metrics", timeout=TIMEOUT).text
    for name, kind in [("dsv4_time_to_first_token_seconds", "histogram"),
                       ("dsv4_time_per_output_token_seconds", "histogram"),
                       ("dsv4_cache_slots_used", "gauge"), ("dsv4_generation_tokens_total", "counter"),
                       ("dsv4_prompt_tokens_total", "counter"), ("dsv4_http_requests_total", "counter")]:
        assert f"# TYPE {name} {kind}" in text
    assert re.search(r'^dsv4_time_to_first_token_seconds_bucket\{le="\+Inf"\} \d+(\.0)?$', text, re.M)
    assert f"dsv4_cache_slots_total {SLOTS}" in text


def test_completions_stream_and_not_with_stop_and_logprobs(server, served_tiny):
    srv, _ = server
    model, tok, _ = served_tiny
    c = _client(srv)
    prompt = "The capital of France is"
    ref = _solo(model, [tok.bos_id] + tok.encode(prompt), 12)
    ref_text = tok.decode(ref.output, skip_special_tokens=True)

    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    ch = r.choices[0]
    assert ch.text == ref_text and r.usage.completion_tokens == len(ref.output)
    assert r.usage.prompt_tokens == len(ref.prompt)
    assert ch.finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert ch.logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    # top-3 per token, keyed by token text (distinct ids can share a text, e.g. partial UTF-8, so <= 3 keys)
    for top, lp in zip(ch.logprobs.top_logprobs, ch.logprobs.token_logprobs):
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(lp, abs=1e-4)  # greedy = the top-1

    chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(x.choices[0].text for x in chunks if x.choices) == ref_text
    assert [x.choices[0].finish_reason for x in chunks if x.choices][-1] == ch.finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref.output)

    # A stop string cut from the middle of the greedy text: output ends right before it, in both modes.
    k = next((i for i in range(2, len(ref_text) - 2) if "\ufffd" not in ref_text[i:i + 2]), None)
    if k is None:
        pytest.skip("greedy text has no clean two-character window")
    stop = ref_text[k:k + 2]
    want = ref_text[:ref_text.find(stop)]
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "\x00never"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True)
    assert "".join(x.choices[0].text for x in streamed) == want
    _wait_idle(srv)  # the stop-string hits aborted their requests


def test_sampling_is_seeded(server):
    srv, _ = server
    c = _client(srv)
    kw = dict(model=NAME, prompt="Hello! How are you", max_tokens=6, temperature=1.0, top_p=0.9)
    a = c.completions.create(seed=7, **kw).choices[0].text
    assert a == c.completions.create(seed=7, **kw).choices[0].text


def test_chat_stream_and_not_thinking_on_and_off(server, served_tiny):
    srv, _ = server
    model, tok, _ = served_tiny
    c = _client(srv)
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    plain = [msgs[0], {"role": "user", "content": "What is the capital of France?"}]
    for thinking, extra in [(False, {}), (True, {"thinking": True}),
                            (True, {"chat_template_kwargs": {"thinking": True}})]:
        ref = _solo(model, tok.encode(encode_messages(plain, thinking=thinking)), 10)
        text = tok.decode(ref.output, skip_special_tokens=True)
        reasoning, _, content = text.partition("</think>") if thinking else ("", "", text)
        if thinking and "</think>" not in text:
            reasoning, content = text, ""

        r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0, extra_body=extra,
                                      logprobs=True, top_logprobs=2)
        msg = r.choices[0].message
        assert msg.role == "assistant" and msg.content == content
        assert getattr(msg, "reasoning_content", None) == (reasoning if thinking else None)
        assert r.usage.prompt_tokens == len(ref.prompt) and r.usage.completion_tokens == len(ref.output)
        lps = r.choices[0].logprobs.content
        assert [x.logprob for x in lps] == pytest.approx(ref.logprobs, abs=1e-4)
        assert all(len(x.top_logprobs) == 2 and isinstance(x.bytes, list) for x in lps)

        chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=10, temperature=0,
                                                stream=True, extra_body=extra))
        deltas = [x.choices[0].delta for x in chunks]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == content
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == (reasoning if thinking else "")
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


# --------------------------------------------------------------------------------------------- concurrency

def test_50_concurrent_streams_equal_their_solo_greedy_outputs(server, served_tiny):
    srv, _ = server
    model, tok, _ = served_tiny
    n, max_tokens = 50, 4
    texts = [f"Request {i}: the quick brown fox number {i * 7 % 13}" for i in range(n)]
    kinds = ["chat" if i % 2 else "completion" for i in range(n)]
    prompts = [tok.encode(encode_messages([{"role": "user", "content": t}])) if k == "chat"
               else [tok.bos_id] + tok.encode(t) for t, k in zip(texts, kinds)]
    refs = [_solo(model, p, max_tokens) for p in prompts]
    want = [tok.decode(r.output, skip_special_tokens=True) for r in refs]
    assert len(set(want)) > n // 2  # distinct outputs: mixing streams up would show

    async def one(client, i):
        got, usage, finish = [], None, None
        if kinds[i] == "chat":
            stream = await client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": texts[i]}], max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True})
        else:
            stream = await client.completions.create(model=NAME, prompt=texts[i], max_tokens=max_tokens,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                got.append((ch.delta.content or "") if kinds[i] == "chat" else ch.text)
                finish = ch.finish_reason or finish
        return "".join(got), usage, finish

    async def main():
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
        async with client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n))), 4 * TIMEOUT)

    before = _metrics(srv)
    results = asyncio.run(main())
    for i, (text, usage, finish) in enumerate(results):
        assert text == want[i], f"request {i} ({kinds[i]})"
        assert usage.prompt_tokens == len(prompts[i]) and usage.completion_tokens == len(refs[i].output)
        assert finish == ("length" if refs[i].finish_reason == "length" else "stop")
    after = _wait_idle(srv)
    gen = sum(len(r.output) for r in refs)
    assert after["dsv4_generation_tokens_total"] - before["dsv4_generation_tokens_total"] == gen
    assert after["dsv4_prompt_tokens_total"] - before["dsv4_prompt_tokens_total"] == sum(map(len, prompts))
    assert (after["dsv4_time_to_first_token_seconds_count"] - before["dsv4_time_to_first_token_seconds_count"]
            == n)


# ----------------------------------------------------------------------------------------- disconnection

def test_disconnect_mid_stream_frees_the_slot(server):
    srv, engine = server
    key = 'dsv4_requests_finished_total{endpoint="completions",finish_reason="abort"}'
    before = _metrics(srv)
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 110, "temperature": 0, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as h:
        with h.stream("POST", srv.url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(20):  # read until the first token arrives, then hang up
                if next(lines).startswith("data: {"):
                    break
            _wait_for(srv, lambda m: m["dsv4_cache_slots_used"] == 1, "the request holds no slot")
    after = _wait_idle(srv)
    assert after.get(key, 0) == before.get(key, 0) + 1
    assert after["dsv4_generation_tokens_total"] - before["dsv4_generation_tokens_total"] < 110
    assert len(engine.free_slots) == SLOTS and not engine.running

    # Non-streaming: the client gives up (read timeout closes the connection); the request is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    _wait_idle(srv)  # the handler counts the abort once it has read the engine's last event: wait for it too
    _wait_for(srv, lambda m: m.get(key, 0) == before.get(key, 0) + 2, "the abort was not counted")
    assert len(engine.free_slots) == SLOTS


# ----------------------------------------------------------------------------------------- bad requests

BAD = [  # (endpoint, body changes, param named in the error)
    ("completions", {"temperature": -1}, "temperature"),
    ("completions", {"temperature": "hot"}, "temperature"),
    ("completions", {"temperature": 2.5}, "temperature"),
    ("completions", {"top_p": 0}, "top_p"),
    ("completions", {"top_p": 1.5}, "top_p"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"max_tokens": "10"}, "max_tokens"),
    ("completions", {"max_tokens": 1.5}, "max_tokens"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"stop": 5}, "stop"),
    ("completions", {"stop": ["ok", 3]}, "stop"),
    ("completions", {"stream": "yes"}, "stream"),
    ("completions", {"seed": "x"}, "seed"),
    ("completions", {"n": 0}, "n"),
    ("completions", {"n": 2, "best_of": 1}, "best_of"),
    ("completions", {"best_of": 3, "stream": True}, "best_of"),
    ("completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("completions", {"prompt": [1, [2]]}, "prompt"),
    ("completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("chat/completions", {"n": 0}, "n"),
    ("chat/completions", {"best_of": 2}, "best_of"),
    ("chat/completions", {"echo": True}, "echo"),
    ("chat/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("completions", {"prompt": None}, "prompt"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": [3, 999999]}, "prompt"),
    ("completions", {"model": None}, "model"),
    ("completions", {"model": 3}, "model"),
    ("chat/completions", {"messages": None}, "messages"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("chat/completions", {"messages": ["hi"]}, "messages"),
    ("chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("chat/completions", {"logprobs": 1}, "logprobs"),
    ("chat/completions", {"thinking": "yes"}, "thinking"),
    ("chat/completions", {"chat_template_kwargs": {"thinking": 1}}, "chat_template_kwargs.thinking"),
    ("chat/completions", {"reasoning_effort": "none"}, "reasoning_effort"),
    ("chat/completions", {"stream_options": 1}, "stream_options"),
    ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),  # was ignored without stream
    ("chat/completions", {"stream_options": {"include_usage": False}, "stream": False}, "stream_options"),
    ("chat/completions", {"temperature": None, "top_p": -0.5}, "top_p"),
]


def test_bad_requests_get_400_naming_the_field(server):
    srv, _ = server
    base = {"completions": {"model": NAME, "prompt": "Hi", "max_tokens": 2},
            "chat/completions": {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}}
    with httpx.Client(base_url=srv.url + "/v1/", timeout=TIMEOUT) as h:
        for endpoint, change, param in BAD:
            body = {k: v for k, v in {**base[endpoint], **change}.items() if v is not None}
            err = _err(h.post(endpoint, json=body))
            assert (err["param"], err["type"]) == (param, "invalid_request_error"), (endpoint, change, err)
        err = _err(h.post("completions", json={**base["completions"], "model": "gpt-9"}), 404)
        assert err["param"] == "model" and err["code"] == "model_not_found"
        for raw in (b"{bad json", b'{"model": "tiny",', b"\xff\xfe", b"[1, 2]", b""):  # malformed bodies
            err = _err(h.post("completions", content=raw, headers={"content-type": "application/json"}))
            assert err["param"] is None and err["type"] == "invalid_request_error"
        # A batch whose second prompt does not fit the context: the error names that prompt (was: no index).
        err = _err(h.post("completions", json={**base["completions"], "prompt": [[5] * 10, [5] * (SEQ + 1)]}))
        assert err["param"] == "prompt" and err["message"].startswith("prompt[1]: the prompt is"), err
        _err(h.get("completions"), 405)
        assert _err(h.get("nope"), 404)["type"] == "not_found_error"
    # Through the official client: a typed error carrying the same body.
    with pytest.raises(openai.BadRequestError) as info:
        _client(srv).completions.create(model=NAME, prompt="Hi", temperature=5)
    assert info.value.body["param"] == "temperature"
    assert _wait_idle(srv)["dsv4_cache_slots_used"] == 0


def test_oversize_prompts_get_a_clear_400(server, served_tiny):
    srv, _ = server
    _, tok, _ = served_tiny
    long_text = "The quick brown fox jumps over the lazy dog. " * 40
    assert len(tok.encode(long_text)) > SEQ
    with httpx.Client(base_url=srv.url + "/v1/", timeout=TIMEOUT) as h:
        err = _err(h.post("completions", json={"model": NAME, "prompt": long_text}))
        assert err["param"] == "prompt" and str(SEQ) in err["message"]
        err = _err(h.post("completions", json={"model": NAME, "prompt": list(range(2, 2 + SEQ))}))
        assert err["param"] == "prompt"
        msgs = [{"role": "user", "content": long_text}]
        err = _err(h.post("chat/completions", json={"model": NAME, "messages": msgs}))
        assert err["param"] == "messages"
        err = _err(h.post("completions", json={"model": NAME, "prompt": list(range(2, 102)), "max_tokens": 40}))
        assert err["param"] == "max_tokens" and "at most" in err["message"]
        ok = h.post("completions", json={"model": NAME, "prompt": list(range(2, 102)), "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


# ------------------------------------------------------------------------------ API key and shutdown

def test_api_key(served_tiny):
    srv, _ = _start(served_tiny, api_key="sekret", slots=2)
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as h:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                err = _err(h.get("/v1/models", headers=headers), 401)
                assert err["code"] == "invalid_api_key"
            _err(h.post("/v1/completions", json={"model": NAME, "prompt": "Hi"}), 401)
            assert h.get("/health").status_code == 200  # probes stay open
        with pytest.raises(openai.AuthenticationError):
            _client(srv, key="wrong").models.list()
        r = _client(srv, key="sekret").completions.create(model=NAME, prompt="Hi", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens <= 2
    finally:
        srv.stop(60)
    assert not srv.thread.is_alive()


def test_graceful_shutdown_drains_in_flight_requests(served_tiny):
    srv, engine = _start(served_tiny, slots=2, drain=60)
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 30, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    events, done = [], False
    try:
        with httpx.Client(timeout=TIMEOUT) as h, h.stream("POST", srv.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            for _ in range(20):
                line = next(lines)
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    break
            srv.shutdown()  # SIGINT/SIGTERM equivalent: stop accepting, let this stream finish
            deadline = time.monotonic() + 10
            while srv.thread.is_alive() and time.monotonic() < deadline:  # the listening socket closes
                try:
                    httpx.get(srv.url + "/health", timeout=2)
                except httpx.TransportError:
                    break
                time.sleep(0.05)
            with pytest.raises(httpx.TransportError):
                httpx.get(srv.url + "/health", timeout=2)
            for line in lines:
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    finally:
        srv.stop(60)
    assert not srv.thread.is_alive()
    assert done
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 30
    assert not engine.running and len(engine.free_slots) == 2


def test_drain_deadline_ends_streams_cleanly(served_tiny):
    """Past the drain timeout, what is left is aborted: the stream still ends with a finish chunk and [DONE]."""
    srv, engine = _start(served_tiny, slots=2, drain=0.5)
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 110, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    events, done = [], False
    try:
        with httpx.Client(timeout=TIMEOUT) as h, h.stream("POST", srv.url + "/v1/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if len(events) == 1:
                        srv.shutdown()
    finally:
        srv.stop(60)
    assert not srv.thread.is_alive() and done
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "abort"
    assert events[-1]["usage"]["completion_tokens"] < 110
    assert not engine.running and len(engine.free_slots) == 2


def test_cli_serve_subcommand(served_tiny, monkeypatch):
    """`dsv4 serve` flags go through the real parser into a working server."""
    from dsv4_ascend import cli, server as server_mod

    _, _, ckpt = served_tiny
    built = {}

    def fake_serve_main(args):
        built["server"] = srv = server_mod.build_server(args)
        srv.run()
        return 0

    monkeypatch.setattr(server_mod, "serve_main", fake_serve_main)
    argv = ["serve", "--model", str(ckpt), "--dtype", "float32", "--port", "0", "--max-slots", "2",
            "--max-seq-len", "128", "--served-model-name", "cli-tiny", "--api-key", "k", "--log-level", "warning"]
    t = threading.Thread(target=cli.main, args=(argv,), daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not (built.get("server") and built["server"].started):
        assert t.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    srv = built["server"]
    try:
        port = srv.servers[0].sockets[0].getsockname()[1]
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=TIMEOUT)
        assert [m.id for m in c.models.list().data] == ["cli-tiny"]
        r = c.chat.completions.create(model="cli-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert r.usage.completion_tokens <= 2
    finally:
        srv.should_exit = True
        t.join(60)
    assert not t.is_alive()


def test_engine_failure_and_overload(served_tiny, monkeypatch):
    """A failing engine step fails only the requests in flight (500, server keeps serving); a full queue -> 503."""
    srv, engine = _start(served_tiny, slots=1, max_queue=0)
    try:
        real_step, calls = engine.step, {"n": 0}

        def flaky_step():
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("boom")
            return real_step()

        monkeypatch.setattr(engine, "step", flaky_step)
        with httpx.Client(base_url=srv.url + "/v1/", timeout=TIMEOUT) as h:
            err = _err(h.post("completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2}), 500)
            assert err["type"] == "server_error" and "boom" in err["message"]
            ok = h.post("completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2})
            assert ok.status_code == 200
            body = {"model": NAME, "prompt": "Hello", "max_tokens": 100, "temperature": 0, "stream": True}
            with h.stream("POST", "completions", json=body) as resp:  # holds the only slot (queue size 0)
                assert resp.status_code == 200
                err = _err(h.post("completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2}), 503)
                assert "overloaded" in err["message"]
            # more sequences than the server can ever queue: a 400 naming the field, not a 503 retried forever
            cases = [({"n": 2}, "n"), ({"n": 1, "best_of": 2}, "best_of"), ({"prompt": ["a", "b"]}, "prompt")]
            for body, param in cases:
                err = _err(h.post("completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 2, **body}))
                assert err["param"] == param and "at most 1" in err["message"]
            err = _err(h.post("chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 2, "n": 2}))
            assert err["param"] == "n"
        _wait_idle(srv)
    finally:
        srv.stop(60)
    assert not srv.thread.is_alive()
