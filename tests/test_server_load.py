"""`dsv4 serve` under a storm of concurrent clients (the official `AsyncOpenAI` and raw httpx): greedy requests,
streamed and not, chat and completions, n > 1 sampled with a seed, next to clients that disconnect mid-stream, cancel
before the answer, ask for more than the context or send broken JSON. Every good request must get exactly the
answer it gets alone (fp32: same text, same token count, logprobs within 1e-4), the bad ones their error, and
afterwards the server must be idle with no slot or page held and /metrics must add up."""
from __future__ import annotations

import asyncio
import json
import random

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from dsv4_ascend.engine import Engine  # noqa: E402
from dsv4_ascend.server import BackgroundServer, create_app  # noqa: E402

NAME = "tiny"
SEQ = 96
SLOTS = 4
# The same fp32 computation alone and batched with others: only the reduction order may differ (a few 1e-6 here).
TOL = 1e-4
WORDS = "alpha beta gamma river stone paris seven dog quick brown lazy fox".split()


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line and not line.startswith("#") and "_created" not in line:
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def _requests(rng: random.Random, count: int) -> list[tuple[str, dict]]:
    """Good requests: (endpoint, body), greedy or seeded, logprobs on, a few tokens each."""
    out = []
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        kind, mt = rng.choice(["chat", "cmpl", "chat_n", "cmpl_n", "cmpl_echo"]), rng.randint(1, 6)
        if kind.startswith("chat"):
            b = {"model": NAME, "messages": [{"role": "user", "content": text}], "max_tokens": mt, "temperature": 0,
                 "logprobs": True}
        else:
            b = {"model": NAME, "prompt": text, "max_tokens": mt, "temperature": 0, "logprobs": 1,
                 "echo": kind == "cmpl_echo"}
        if kind.endswith("_n"):
            b.update(n=2, temperature=0.9, seed=i)
        out.append(("chat/completions" if kind.startswith("chat") else "completions", b))
    return out


def _answer(endpoint: str, j: dict) -> list[tuple]:
    """(index, text, token logprobs, finish_reason) per choice, and the usage's token counts."""
    out = []
    for ch in sorted(j["choices"], key=lambda c: c["index"]):
        if endpoint == "chat/completions":
            out.append((ch["index"], ch["message"]["content"], [t["logprob"] for t in ch["logprobs"]["content"]],
                        ch["finish_reason"]))
        else:
            out.append((ch["index"], ch["text"], ch["logprobs"]["token_logprobs"], ch["finish_reason"]))
    return [out, j["usage"]["prompt_tokens"], j["usage"]["completion_tokens"]]


async def _streamed(c: httpx.AsyncClient, url: str, endpoint: str, body: dict) -> list:
    """The same answer read from the server-sent events."""
    texts: dict[int, str] = {}
    lps: dict[int, list] = {}
    fins: dict[int, str] = {}
    usage = None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with c.stream("POST", f"{url}/v1/{endpoint}", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            j = json.loads(line[6:])
            assert "error" not in j, j
            usage = j.get("usage") or usage
            for ch in j["choices"]:
                k = ch["index"]
                if endpoint == "chat/completions":
                    texts[k] = texts.get(k, "") + (ch["delta"].get("content") or "")
                    lp = [t["logprob"] for t in (ch["logprobs"] or {}).get("content") or []]
                else:
                    texts[k] = texts.get(k, "") + ch["text"]
                    lp = (ch["logprobs"] or {}).get("token_logprobs") or []
                lps.setdefault(k, []).extend(lp)
                if ch["finish_reason"]:
                    fins[k] = ch["finish_reason"]
    return [[(k, texts[k], lps[k], fins[k]) for k in sorted(texts)], usage["prompt_tokens"],
            usage["completion_tokens"]]


def _same(got: list, want: list) -> bool:
    (gch, gp, gc), (wch, wp, wc) = got, want
    if (gp, gc) != (wp, wc) or [(k, t, f) for k, t, _, f in gch] != [(k, t, f) for k, t, _, f in wch]:
        return False
    return all(len(a) == len(b) and all((x is None and y is None) or abs(x - y) < TOL for x, y in zip(a, b))
               for (_, _, a, _), (_, _, b, _) in zip(gch, wch))


def test_a_storm_of_clients_gets_the_answers_each_gets_alone(served_tiny):
    model, tok, _ = served_tiny
    engine = Engine(model, max_slots=SLOTS, max_seq_len=SEQ)
    srv = BackgroundServer(create_app(engine, tok, served_model_name=NAME)).start()
    url = srv.url
    good = _requests(random.Random(0), 18)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as c:
            alone = []
            for endpoint, body in good:
                r = await c.post(f"{url}/v1/{endpoint}", json=body)
                assert r.status_code == 200, r.text
                alone.append(_answer(endpoint, r.json()))
            before = _metrics(url)
            sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)

            async def one(i: int, endpoint: str, body: dict) -> list:
                if i % 3 == 0:
                    return await _streamed(c, url, endpoint, body)
                if i % 3 == 1 and endpoint == "chat/completions":  # the official client, its types
                    r = await sdk.chat.completions.create(**body)
                    return _answer(endpoint, r.model_dump())
                r = await c.post(f"{url}/v1/{endpoint}", json=body)
                assert r.status_code == 200, r.text
                return _answer(endpoint, r.json())

            async def disconnect(i: int) -> str:
                body = {"model": NAME, "prompt": "dog " * 5, "max_tokens": 60, "stream": True, "ignore_eos": True}
                async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                    k = 0
                    async for _ in r.aiter_lines():
                        k += 1
                        if k > 2 + i:
                            break
                return "disconnected"

            async def cancel(i: int) -> str:
                body = {"model": NAME, "messages": [{"role": "user", "content": "river"}], "max_tokens": 60,
                        "extra_body": {"ignore_eos": True}}
                task = asyncio.create_task(sdk.chat.completions.create(**body))
                await asyncio.sleep(0.2 + 0.1 * i)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                return "cancelled"

            async def too_long(i: int) -> str:
                body = ({"model": NAME, "prompt": "x", "max_tokens": SEQ} if i % 2 else
                        {"model": NAME, "prompt": list(range(3, 3 + SEQ)), "max_tokens": 1})
                r = await c.post(f"{url}/v1/completions", json=body)
                assert r.status_code == 400
                return r.json()["error"]["param"]

            async def broken(_: int) -> int:
                r = await c.post(f"{url}/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                                 headers={"content-type": "application/json"})
                return r.status_code

            jobs = [one(i, e, b) for i, (e, b) in enumerate(good)]
            jobs += [disconnect(i) for i in range(4)] + [cancel(i) for i in range(3)]
            jobs += [too_long(i) for i in range(4)] + [broken(i) for i in range(2)]
            order = list(range(len(jobs)))
            random.Random(1).shuffle(order)
            got = dict(zip(order, await asyncio.gather(*[jobs[k] for k in order])))
            for i in range(len(good)):
                assert _same(got[i], alone[i]), (good[i], got[i], alone[i])
            extra = [got[k] for k in range(len(good), len(jobs))]
            assert extra == ["disconnected"] * 4 + ["cancelled"] * 3 + ["prompt", "max_tokens"] * 2 + [400, 400]

            for _ in range(100):  # aborts land within an engine step or two
                m = _metrics(url)
                if m["dsv4_cache_slots_used"] == m["dsv4_requests_running"] == m["dsv4_requests_waiting"] == 0:
                    break
                await asyncio.sleep(0.1)
            assert m["dsv4_cache_slots_used"] == m["dsv4_cache_pages_used"] == m["dsv4_cache_tokens_used"] == 0
            assert len(engine.free_slots) == SLOTS
            finished = {k: v - before.get(k, 0) for k, v in m.items() if k.startswith("dsv4_requests_finished_total")}
            sequences = sum(b.get("n", 1) for _, b in good)
            assert sum(finished.values()) == sequences + 4 + 3  # every sequence counted once, aborts too
            aborted = sum(v for k, v in finished.items() if 'finish_reason="abort"' in k)
            assert aborted == 4 + 3
            r = await c.post(f"{url}/v1/{good[0][0]}", json=good[0][1])  # and it still answers the same
            assert _same(_answer(good[0][0], r.json()), alone[0])

    try:
        asyncio.run(main())
    finally:
        srv.stop(60)
