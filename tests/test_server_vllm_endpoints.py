"""`dsv4 serve`'s vLLM-style extras against the real server (tiny model, loopback, official `openai` client where
the client sends the request): /tokenize, /detokenize, /version, HEAD on GET routes, CORS behind
--allowed-origins, X-Request-Id, usage.prompt_tokens_details.cached_tokens, stream_options.continuous_usage_stats."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import dsv4_ascend  # noqa: E402
from dsv4_ascend import cli  # noqa: E402
from dsv4_ascend.chat import ASSISTANT, THINK_END, THINK_START, encode_message_segments  # noqa: E402
from dsv4_ascend.engine import Engine  # noqa: E402
from dsv4_ascend.server import BackgroundServer, build_server, create_app  # noqa: E402
from dsv4_ascend.server.run import allowed_origins  # noqa: E402

NAME = "tiny"
SEQ = 128
SLOTS = 4
TIMEOUT = 120.0
GOOD_ORIGIN = "http://app.example:3000"
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <｜User｜> there"}]


def _serve(served_tiny, **kw) -> BackgroundServer:
    model, tok, _ = served_tiny
    app = create_app(Engine(model, max_slots=SLOTS, max_seq_len=SEQ), tok, served_model_name=NAME, **kw)
    return BackgroundServer(app, drain_timeout=5.0).start()


@pytest.fixture(scope="module")
def server(served_tiny):
    srv = _serve(served_tiny)
    yield srv
    srv.stop(60)
    assert not srv.thread.is_alive()


def _client(srv, key="unused"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def _err(resp, status=400) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return body


# ------------------------------------------------------------------------------------- /tokenize, /detokenize

def test_tokenize_gives_the_ids_the_generation_endpoints_feed_the_engine(server, served_tiny):
    _, tok, _ = served_tiny
    srv = server
    c = _client(srv)
    max_len = c.models.retrieve(NAME).model_extra["max_model_len"]
    with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as h:
        text = "Hello world <｜User｜> again"
        r = h.post("/tokenize", json={"model": NAME, "prompt": text})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"tokens", "count", "max_model_len"}
        assert body["tokens"] == [tok.bos_id] + tok.encode_text(text)  # special-token text stays text
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == max_len
        used = c.completions.create(model=NAME, prompt=text, max_tokens=1).usage.prompt_tokens
        assert used == body["count"]
        plain = h.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
        assert plain["tokens"] == body["tokens"][1:]
        strs = h.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
        assert strs["token_strs"] == [tok.id_to_token(i) for i in body["tokens"]]

        for thinking in (False, True):
            extra = {"chat_template_kwargs": {"thinking": thinking}}
            r = h.post("/tokenize", json={"model": NAME, "messages": MSGS, **extra})
            assert r.status_code == 200, r.text
            ids = r.json()["tokens"]
            assert ids == tok.encode_segments(encode_message_segments(MSGS, thinking=thinking))
            chat = c.chat.completions.create(model=NAME, messages=MSGS, max_tokens=1, extra_body=extra)
            assert chat.usage.prompt_tokens == len(ids) == r.json()["count"]
            bare = h.post("/tokenize", json={"messages": MSGS, "add_generation_prompt": False, **extra}).json()
            opener = [tok.token_to_id(ASSISTANT), tok.token_to_id(THINK_START if thinking else THINK_END)]
            assert ids[-2:] == opener and bare["tokens"] == ids[:-2]


def test_reasoning_effort_maps_as_deepseeks_api(server, served_tiny):
    """DeepSeek's API takes low / medium (-> high) and xhigh (-> max) too (api-docs.deepseek.com, thinking mode);
    they were 400s. The prompt is the template's for the mapped effort, on /tokenize and on the chat route."""
    _, tok, _ = served_tiny
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:
        for given, used in [("low", "high"), ("medium", "high"), ("high", "high"), ("xhigh", "max"), ("max", "max")]:
            want = tok.encode_segments(encode_message_segments(MSGS, thinking=True, reasoning_effort=used))
            body = {"messages": MSGS, "thinking": True, "reasoning_effort": given}
            assert h.post("/tokenize", json=body).json()["tokens"] == want, given
            if used == "high":  # the max preamble does not fit this server's context
                r = c.chat.completions.create(model=NAME, messages=MSGS, max_tokens=1, reasoning_effort=given,
                                              extra_body={"thinking": True})
                assert r.usage.prompt_tokens == len(want)
        assert want != tok.encode_segments(encode_message_segments(MSGS, thinking=True))  # max adds its preamble


def test_detokenize_inverts_tokenize(server, served_tiny):
    _, tok, _ = served_tiny
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:
        for text in ("Hello world", "héllo ✓ 漢字 <｜User｜>", ""):
            ids = h.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
            r = h.post("/detokenize", json={"model": NAME, "tokens": ids})
            assert r.status_code == 200, r.text
            assert r.json() == {"prompt": text}
        ids = h.post("/tokenize", json={"messages": MSGS}).json()["tokens"]
        prompt = h.post("/detokenize", json={"tokens": ids}).json()["prompt"]
        assert prompt == tok.decode(ids) and prompt.startswith(tok.decode([tok.bos_id])) and ASSISTANT in prompt


@pytest.mark.parametrize("path, body, param", [
    ("/detokenize", {"tokens": [1, 512]}, "tokens"),                    # vocab is 512: out of range
    ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [10**40]}, "tokens"),
    ("/detokenize", {"tokens": [1, "2"]}, "tokens"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
    ("/detokenize", {"tokens": [1.5]}, "tokens"),
    ("/detokenize", {"tokens": [None]}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ("/detokenize", {}, "tokens"),
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": [1, 2]}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": MSGS}, "prompt"),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"prompt": "a", "return_token_strs": 1}, "return_token_strs"),
    ("/tokenize", {"prompt": "x" * 200_000}, "prompt"),                 # cannot fit the 128-token context
    ("/tokenize", {"messages": MSGS, "add_special_tokens": True}, "add_special_tokens"),
    ("/tokenize", {"messages": MSGS, "add_generation_prompt": "no"}, "add_generation_prompt"),
    ("/tokenize", {"messages": MSGS, "chat_template": "{{ x }}"}, "chat_template"),
    ("/tokenize", {"messages": MSGS, "continue_final_message": True}, "continue_final_message"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("/tokenize", {"messages": []}, "messages"),
    ("/tokenize", {"messages": MSGS, "reasoning_effort": "none"}, "reasoning_effort"),
    ("/tokenize", {"messages": MSGS, "tools": "x"}, "tools"),
    ("/tokenize", {"prompt": "a", "model": 3}, "model"),
])
def test_tokenize_and_detokenize_bad_input_is_a_400_naming_the_field(server, path, body, param):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:
        err = _err(h.post(path, json=body))
        assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_tokenize_other_model_is_a_404_and_bad_json_a_400(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:
        for path, body in (("/tokenize", {"model": "other", "prompt": "a"}),
                           ("/detokenize", {"model": "other", "tokens": []})):
            err = _err(h.post(path, json=body), 404)
            assert err["param"] == "model" and err["code"] == "model_not_found"
            assert _err(h.post(path, content=b"{not json"))["param"] is None


# ------------------------------------------------------------------------------------------- /version, HEAD

def test_version_and_head_on_every_get_route(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:
        assert h.get("/version").json() == {"version": dsv4_ascend.__version__}
        for path in ("/health", "/v1/models", f"/v1/models/{NAME}", "/metrics", "/version"):
            get, head = h.get(path), h.head(path)
            assert get.status_code == head.status_code == 200, (path, head.status_code)
            assert get.content and head.content == b""
            assert head.headers["content-type"] == get.headers["content-type"]
        assert h.head("/v1/models/other").status_code == 404
        assert h.head("/v1/completions").status_code == 405  # POST routes are not given HEAD


def test_every_get_route_also_has_head(served_tiny):
    """Introspection: a GET route added later without HEAD fails here."""
    model, tok, _ = served_tiny
    gate = create_app(Engine(model, max_slots=1, max_seq_len=SEQ), tok, served_model_name=NAME)
    get = {r.path for r in gate.app.routes if "GET" in getattr(r, "methods", ())}
    head = {r.path for r in gate.app.routes if "HEAD" in getattr(r, "methods", ())}  # (a route of its own: not in
    assert get >= {"/health", "/v1/models", "/v1/models/{name:path}", "/metrics", "/version", "/docs"}  # OpenAPI)
    assert get <= head, get - head


# ------------------------------------------------------------------------------------------- X-Request-Id

def test_x_request_id_is_echoed_and_names_the_response(server):
    c = _client(server)
    rid = "trace-0123456789abcdef:span/1"
    raw = c.chat.completions.with_raw_response.create(
        model=NAME, messages=MSGS, max_tokens=2, extra_headers={"X-Request-Id": rid})
    assert raw.headers["x-request-id"] == rid and raw.parse().id == f"chatcmpl-{rid}"
    raw = c.completions.with_raw_response.create(model=NAME, prompt="Hi", max_tokens=2,
                                                 extra_headers={"X-Request-Id": rid})
    assert raw.headers["x-request-id"] == rid and raw.parse().id == f"cmpl-{rid}"
    with c.chat.completions.with_streaming_response.create(
            model=NAME, messages=MSGS, max_tokens=3, stream=True, stream_options={"include_usage": True},
            extra_headers={"X-Request-Id": rid}) as resp:
        assert resp.headers["x-request-id"] == rid
        ids = {chunk.id for chunk in resp.parse()}
    assert ids == {f"chatcmpl-{rid}"}
    with c.completions.with_streaming_response.create(model=NAME, prompt="Hi", max_tokens=3, stream=True,
                                                      extra_headers={"X-Request-Id": rid}) as resp:
        assert {chunk.id for chunk in resp.parse()} == {f"cmpl-{rid}"}
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:
        assert h.get("/health", headers={"X-Request-Id": "h-1"}).headers["x-request-id"] == "h-1"
        err = h.post("/v1/completions", json={"model": NAME}, headers={"X-Request-Id": "e-1"})
        assert err.status_code == 400 and err.headers["x-request-id"] == "e-1"  # errors echo it too
        plain = h.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 1})
        assert "x-request-id" not in plain.headers and plain.json()["id"].startswith("cmpl-")
        other = h.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 1}).json()["id"]
        assert other != plain.json()["id"]  # without the header each response gets a fresh id


@pytest.mark.parametrize("headers", [
    [("X-Request-Id", "x" * 129)],
    [("X-Request-Id", "")],
    [("X-Request-Id", b"caf\xe9")],
    [("X-Request-Id", "a\tb")],
    [("X-Request-Id", "a"), ("X-Request-Id", "b")],
])
def test_bad_x_request_id_is_a_400_naming_the_header(server, headers):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/health"), ("POST", "/tokenize")):
            body = {"model": NAME, "messages": MSGS, "max_tokens": 1, "prompt": "a"} if method == "POST" else None
            resp = h.request(method, path, json=body if path != "/tokenize" else {"prompt": "a"}, headers=headers)
            err = _err(resp)
            assert err["param"] == "X-Request-Id" and "x-request-id" not in resp.headers
    ok = "x" * 128  # the longest allowed
    assert httpx.get(server.url + "/health", headers={"X-Request-Id": ok}, timeout=TIMEOUT).status_code == 200


# ------------------------------------------------------------------------------------------- usage

def test_usage_reports_cached_tokens_zero(server):
    c = _client(server)
    r = c.completions.create(model=NAME, prompt="Hi", max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    r = c.chat.completions.create(model=NAME, messages=MSGS, max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens == 0 and r.usage.prompt_tokens > 0
    for create, kw in ((c.completions.create, {"prompt": "Hi"}), (c.chat.completions.create, {"messages": MSGS})):
        chunks = list(create(model=NAME, max_tokens=2, stream=True, stream_options={"include_usage": True}, **kw))
        assert all(ch.usage is None for ch in chunks[:-1])  # without continuous_usage_stats only the last has it
        assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens_details.cached_tokens == 0


def test_continuous_usage_stats_puts_usage_so_far_on_every_chunk(server):
    c = _client(server)
    opts = {"include_usage": True, "continuous_usage_stats": True}
    n = 9
    chat = list(c.chat.completions.create(
        model=NAME, messages=MSGS, max_tokens=n, temperature=0, logprobs=True, stream=True, stream_options=opts,
        extra_body={"ignore_eos": True}))
    cmpl = list(c.completions.create(
        model=NAME, prompt="Hello", max_tokens=n, temperature=0, logprobs=0, stream=True, stream_options=opts,
        extra_body={"ignore_eos": True}))
    for chunks, counted in ((chat, lambda ch: len(ch.choices[0].logprobs.content)),
                            (cmpl, lambda ch: len(ch.choices[0].logprobs.tokens))):
        assert len(chunks) > 3 and all(ch.usage is not None for ch in chunks)
        seen = 0
        for ch in chunks:
            u = ch.usage
            if ch.choices and ch.choices[0].logprobs is not None:
                seen += counted(ch)
            assert u.completion_tokens == seen, (u, seen)  # exactly the tokens streamed so far
            assert u.prompt_tokens == chunks[0].usage.prompt_tokens
            assert u.total_tokens == u.prompt_tokens + u.completion_tokens
            assert u.prompt_tokens_details.cached_tokens == 0
        assert seen == n and chunks[-1].choices == [] and chunks[-2].choices[0].finish_reason == "length"
    assert chat[0].choices[0].delta.role == "assistant" and chat[0].usage.completion_tokens == 0
    plain = c.chat.completions.create(model=NAME, messages=MSGS, max_tokens=n, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert chat[-1].usage == plain.usage


def test_continuous_usage_stats_without_include_usage_is_refused(server):
    with httpx.Client(base_url=server.url + "/v1", timeout=TIMEOUT) as h:
        for path, body in (("/completions", {"prompt": "Hi"}), ("/chat/completions", {"messages": MSGS})):
            for opts, param in (({"continuous_usage_stats": True}, "stream_options.continuous_usage_stats"),
                                ({"include_usage": True, "continuous_usage_stats": "yes"},
                                 "stream_options.continuous_usage_stats")):
                err = _err(h.post(path, json={"model": NAME, "stream": True, "stream_options": opts, **body}))
                assert err["param"] == param


# ------------------------------------------------------------------------------------------- CORS

def _preflight(h, origin: str, path="/v1/chat/completions"):
    return h.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                    "Access-Control-Request-Headers": "authorization,content-type,x-request-id"})


def test_cors_only_behind_allowed_origins(server, served_tiny):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as h:  # default: no CORS headers at all
        for resp in (_preflight(h, GOOD_ORIGIN), h.get("/health", headers={"Origin": GOOD_ORIGIN}),
                     h.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 1},
                            headers={"Origin": GOOD_ORIGIN})):
            assert not [k for k in resp.headers if k.startswith("access-control-")], resp.headers
        assert _preflight(h, GOOD_ORIGIN).status_code == 405
    srv = _serve(served_tiny, api_key="k", allowed_origins=[GOOD_ORIGIN])
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as h:
            pre = _preflight(h, GOOD_ORIGIN)  # no key on a preflight, as browsers send it
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == GOOD_ORIGIN
            assert "POST" in pre.headers["access-control-allow-methods"]
            assert "authorization" in pre.headers["access-control-allow-headers"].lower()
            bad = _preflight(h, "http://evil.example")
            assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
            ok = h.post("/v1/chat/completions", json={"model": NAME, "messages": MSGS, "max_tokens": 1},
                        headers={"Origin": GOOD_ORIGIN, "Authorization": "Bearer k", "X-Request-Id": "r1"})
            assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == GOOD_ORIGIN
            assert ok.headers["access-control-expose-headers"].lower() == "x-request-id"
            assert ok.headers["x-request-id"] == "r1"
            denied = h.post("/v1/chat/completions", json={"model": NAME, "messages": MSGS},
                            headers={"Origin": GOOD_ORIGIN})
            assert _err(denied, 401) and denied.headers["access-control-allow-origin"] == GOOD_ORIGIN
            other = h.get("/health", headers={"Origin": "http://evil.example"})
            assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    finally:
        srv.stop(60)
    assert not srv.thread.is_alive()


def test_allowed_origins_flag(served_tiny):
    assert allowed_origins(None) == []
    assert allowed_origins(["http://a.example, https://b.example:8443", "*"]) == [
        "http://a.example", "https://b.example:8443", "*"]
    for bad in (["http://a.example/"], ["a.example"], ["http://a.example,"], ["https://a.example/app"]):
        with pytest.raises(SystemExit, match="--allowed-origins"):
            allowed_origins(bad)
    _, _, ckpt = served_tiny
    args = cli._build_parser().parse_args(
        ["serve", "--model", str(ckpt), "--dtype", "float32", "--port", "0", "--max-slots", "1", "--max-seq-len",
         "128", "--log-level", "warning", "--allowed-origins", "http://a.example,http://b.example",
         "--allowed-origins", GOOD_ORIGIN])
    srv = BackgroundServer(build_server(args).config.app, drain_timeout=5.0).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=TIMEOUT) as h:
            for origin in ("http://b.example", GOOD_ORIGIN):
                assert _preflight(h, origin).headers["access-control-allow-origin"] == origin
            assert _preflight(h, "http://c.example").status_code == 400
    finally:
        srv.stop(60)
    with pytest.raises(SystemExit, match="--allowed-origins"):
        build_server(cli._build_parser().parse_args(["serve", "--model", str(ckpt), "--allowed-origins", "x"]))
