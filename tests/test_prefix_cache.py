"""Prefix caching: a hit gives the output computing the whole prompt gives (greedy token for token, logprobs within
1e-5), for hits ending inside compression windows, whole-prompt repeats, prefixes being computed by a running
request, preemption and eviction in between; eager, graph decode, MTP on and off.

Tolerance: the reference engine has no prefix cache, so it prefills in `prefill_chunk` chunks, while a hit
computes only the part after the hit as its own chunk (chunks also end at page boundaries). The same fp32
prefill, cut differently, sums attention and matmul terms in another order: ~1e-6 on a log-softmax of the tiny
model (24-bit mantissa, values O(10)); 1e-5 bounds that with margin. Against a cold prefix-caching engine (same
chunking) a hit is bit for bit equal: the restored state is a copy of what the cold run had at the boundary.
The tiny preset has window 8, CSA ratio 4 and HCA ratio 8; block_size 16 puts page boundaries every 16 tokens.
"""
from __future__ import annotations

import pytest
import torch

from dsv4_ascend.engine import Engine
from dsv4_ascend.prefix_cache import RECORD_SHARE, page_hashes
from dsv4_ascend.sampling import SamplingParams

TOL = 1e-5
GREEDY = SamplingParams(temperature=0, max_tokens=10, logprobs=3)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


MODES = {"eager": {}, "mtp": {"speculative_tokens": 2},
         "graph": {"graph": True, "graph_buckets": [1, 6], "graph_compiler": "aot_eager"}}


def _engine(model, mode: str, prefix: bool, **kw) -> Engine:
    args = dict(max_slots=6, max_seq_len=128, eos_token_id=-1, prefill_chunk=24, block_size=16, **MODES[mode])
    if prefix and "cache_bytes" not in kw:
        args["prefix_records"] = 64  # a record for every page boundary these tests reach
    if mode == "graph":
        torch._dynamo.reset()
    return Engine(model, prefix_cache=prefix, **{**args, **kw})


def _same(got, want, exact: bool = False) -> None:
    """Same tokens; per-token logprobs and top-3 logprobs within TOL (or bit for bit)."""
    assert got.output == want.output
    tol = 0.0 if exact else TOL
    assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)) <= tol
    for g, w in zip(got.top_logprobs, want.top_logprobs):
        assert g.keys() == w.keys() and max(abs(g[k] - w[k]) for k in g) <= tol


def _reference(model, mode: str, prompts, params=GREEDY):
    """Each prompt run alone through an engine without prefix caching."""
    eng = _engine(model, mode, False)
    return [eng.generate([p], params)[0] for p in prompts]


def test_300_token_system_prompt_hits_at_256(tiny_model):
    # Default page (256 tokens for the tiny preset): a 300-token shared system prompt hits its first 256 tokens.
    system = _prompt(300, 1)
    prompts = [system + _prompt(20, 10 + i) for i in range(2)]
    eng = Engine(tiny_model, max_slots=2, max_seq_len=512, eos_token_id=-1, prefix_cache=True)
    assert eng.cache.block_size == 256
    got = [eng.generate([p], GREEDY)[0] for p in prompts]
    assert [r.cached_tokens for r in got] == [0, 256]
    plain = Engine(tiny_model, max_slots=2, max_seq_len=512, eos_token_id=-1)
    for r, p in zip(got, prompts):
        _same(r, plain.generate([p], GREEDY)[0])
    # Bit for bit against a cold run with the same chunking: the restored slot state is the cold run's.
    cold = Engine(tiny_model, max_slots=2, max_seq_len=512, eos_token_id=-1, prefix_cache=True)
    _same(got[1], cold.generate([prompts[1]], GREEDY)[0], exact=True)
    st = eng.prefix.stats
    assert st["hit_tokens"] == 256 and st["query_tokens"] == 2 * 320


def _scenario(model, mode: str) -> None:
    shared = _prompt(37, 2)  # diverges at 37: inside CSA window [36, 40) and HCA window [32, 40)
    a = shared + _prompt(21, 3)                    # 58 tokens: pages end at 16, 32, 48
    b = shared + _prompt(15, 4)                    # hit 32 (ends inside both compression windows' next page)
    c = list(a[:48])                               # whole-prompt repeat of a page-aligned prefix: hit 32, not 48
    d = a[:32] + [(a[32] + 1) % 512] + a[33:50]    # diverges at the boundary 32 itself
    e = _prompt(70, 5)                             # a new prefix, computed while f and g arrive
    f = e[:50] + _prompt(9, 6)
    g = e[:66] + _prompt(5, 7)
    eng = _engine(model, mode, True)
    got = {"a": eng.generate([a], GREEDY)[0]}
    reqs = {k: eng.add_request(p, GREEDY) for k, p in (("b", b), ("c", c), ("d", d), ("e", e))}
    eng.step()  # b, c, d hit a's pages; e starts (nothing cached yet); all four in one ragged prefill
    reqs["f"] = eng.add_request(f, GREEDY)  # e's first page is registered: f hits 16 tokens
    for _ in range(2):
        eng.step()  # e's chunks are 16 tokens (page ends): after these, its pages up to 48 are registered
    reqs["g"] = eng.add_request(g, GREEDY)
    for _ in eng.run():
        pass
    got.update(reqs)
    mtp = mode == "mtp"
    # With MTP a page's record holds the MTP row of its last position, computed from the next token: d's token
    # 32 differs, so d hits one page less; f hits 16 when e's first chunk registered page 0.
    want_hits = {"a": 0, "b": 32, "c": 32, "d": 16 if mtp else 32, "e": 0, "f": 16, "g": 48}
    assert {k: r.cached_tokens for k, r in got.items()} == want_hits
    prompts = {"a": a, "b": b, "c": c, "d": d, "e": e, "f": f, "g": g}
    for k, want in zip(prompts, _reference(model, mode, prompts.values())):
        _same(got[k], want)
    assert eng.cache.free_pages == eng.cache.num_blocks - 1  # cached pages count as free once no one holds them
    assert eng.prefix.cached_pages > 0


@pytest.mark.parametrize("mode", ["eager", "mtp"])
def test_hits_are_exact(tiny_model, mode):
    _scenario(tiny_model, mode)


@pytest.mark.slow
def test_hits_are_exact_graph(tiny_model):
    _scenario(tiny_model, "graph")


@pytest.mark.parametrize("mode", ["eager", pytest.param("mtp", marks=pytest.mark.slow)])
def test_preemption_and_eviction_keep_exactness(tiny_model, mode):
    # 12 pages of 16 tokens: six requests over three shared 40-token prefixes, 6 slots, 24 tokens each: sequences
    # grow into each other (preemption) and new pages push out cached ones (eviction), in between hits.
    heads = [_prompt(40, 20 + i) for i in range(3)]
    prompts = [heads[i % 3] + _prompt(6 + i, 30 + i) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=3)
    # 6 boundary records (the budget's own share would hold one of these fp32 records of window-8 rings)
    small = _engine(tiny_model, mode, True, cache_bytes=_bytes_for_pages(tiny_model, mode, 12), prefix_records=6)
    assert small.cache.num_blocks - 1 == 12
    first = [small.add_request(p, params) for p in prompts[:3]]
    for _ in small.run():
        pass
    rest = [small.add_request(p, params) for p in prompts[3:]]
    for _ in small.run():
        pass
    st = small.prefix.stats
    assert small.stats["preemptions"] > 0 and st["evicted_pages"] > 0 and st["evicted_records"] > 0
    assert any(r.cached_tokens for r in rest)
    for got, want in zip(first + rest, _reference(tiny_model, mode, prompts, params)):
        _same(got, want)


def _bytes_for_pages(model, mode: str, pages: int) -> int:
    """A cache budget of exactly `pages` usable pages (plus the null page) for `_engine`'s shape."""
    from dsv4_ascend.engine import plan_capacity

    lo, hi = 1, 1 << 34
    while lo < hi:  # the smallest budget plan_capacity turns into pages + 1 blocks
        mid = (lo + hi) // 2
        try:
            n = plan_capacity(model, int(mid * (1 - RECORD_SHARE)), 6, 128, block_size=16)
        except ValueError:
            n = 0
        lo, hi = (mid + 1, hi) if n < pages + 1 else (lo, mid)
    return lo


def test_prompt_logprobs_requests_compute_their_prompt(tiny_model):
    p = _prompt(40, 8)
    eng = _engine(tiny_model, "eager", True)
    eng.generate([p], GREEDY)
    lp = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2)
    r = eng.generate([p], lp)[0]
    assert r.cached_tokens == 0 and len(r.prompt_logprobs) == len(p)
    assert eng.generate([p], GREEDY)[0].cached_tokens == 32


def test_page_hashes_chain_the_prefix():
    t = _prompt(64, 9)
    h = page_hashes(t, 16, 4)
    assert len(set(h)) == 4 and page_hashes(t[:32], 16, 2) == h[:2]
    u = [t[0] + 1] + t[1:]  # a change in page 0 changes every later page's hash
    assert not set(page_hashes(u, 16, 4)) & set(h)


def test_server_reports_cached_tokens_and_hit_metrics(served_tiny):
    """`dsv4 serve` (prefix caching on by default): a repeated 300-token prompt reports 256 cached tokens and the
    /metrics counters move; --no-prefix-cache reports 0 and gives the same text and logprobs."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from dsv4_ascend import cli
    from dsv4_ascend.server import BackgroundServer, create_app
    from dsv4_ascend.server.run import build_engine

    model, tok, ckpt = served_tiny
    prompt = _prompt(300, 11)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 2}
    results = {}
    for flags in ([], ["--no-prefix-cache"]):
        args = cli._build_parser().parse_args(["serve", "--model", str(ckpt), "--dtype", "float32", "--max-slots",
                                               "2", "--max-seq-len", "512", *flags])
        engine = build_engine(args, model)
        assert (engine.prefix is None) == bool(flags)
        srv = BackgroundServer(create_app(engine, tok, served_model_name="tiny")).start()
        try:
            got = [httpx.post(srv.url + "/v1/completions", json=body, timeout=120).json() for _ in range(2)]
            metrics = httpx.get(srv.url + "/metrics", timeout=120).text
        finally:
            srv.stop(60)
        results[bool(flags)] = got
        cached = [g["usage"]["prompt_tokens_details"]["cached_tokens"] for g in got]
        assert cached == ([0, 0] if flags else [0, 256])
        if not flags:
            assert "dsv4_prefix_cache_hit_tokens_total 256.0" in metrics
            assert "dsv4_prefix_cache_query_tokens_total 600.0" in metrics
            assert "dsv4_prefix_cache_hit_rate 0.4266" in metrics  # 256 / 600
    on, off = results[False], results[True]
    for a, b in zip(on, off):
        assert a["choices"][0]["text"] == b["choices"][0]["text"]
        la, lb = a["choices"][0]["logprobs"]["token_logprobs"], b["choices"][0]["logprobs"]["token_logprobs"]
        assert max(abs(x - y) for x, y in zip(la, lb)) <= TOL


def test_pages_without_a_record_serve_as_middle_pages(tiny_model):
    # One boundary record: after a (50 tokens + 10 generated: pages end at 16, 32, 48) only the boundary 48 keeps
    # it, so c (shares 49 tokens) hits 48 through the record-less pages 0 and 1; c's own boundary 64 then takes
    # the record, and b (shares 40 tokens) hits nothing.
    a = _prompt(50, 12)
    c, b = a[:49] + _prompt(9, 13), a[:40] + _prompt(10, 14)
    eng = _engine(tiny_model, "eager", True, prefix_records=1)
    got = [eng.generate([p], GREEDY)[0] for p in (a, c, b)]
    assert [r.cached_tokens for r in got] == [0, 48, 0]
    assert eng.prefix.stats["evicted_records"] >= 3
    for r, want in zip(got, _reference(tiny_model, "eager", [a, c, b])):
        _same(r, want)
