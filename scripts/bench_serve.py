#!/usr/bin/env python3
"""Serving benchmark: the token-budget scheduler against the single-user schedule ("before": one prefill chunk of
one sequence per step, pages for prompt + max_tokens reserved at admission; the same scheduler with other
parameters), in one run. Sections: serve, long, mtp, memory (--sections).

serve: throughput and TTFT / TPOT percentiles of `dsv4 serve` at several concurrency levels.

Starts the real server (FastAPI + uvicorn + the continuous-batching engine) in this process on loopback with the
tiny model (written to a temporary directory in the official format unless --model is given), then for each
concurrency level C keeps C streaming /v1/completions requests in flight until --requests of them have finished.
Every request is greedy with ignore_eos, so it generates exactly --max-tokens tokens; `logprobs: 0` makes every
SSE chunk list its tokens, so token arrival times are exact. The client runs in the same process as the server
(it competes for the same cores; on the tiny model that overhead is part of what is measured).

With --nproc-per-node N the server is `dsv4 serve --nproc-per-node N` in a child process (N ranks through
torchrun: DP attention, EP MoE; each rank with --max-slots slots), and the table ends with each rank's resident
memory (VmRSS, read from /proc after the last level).

TTFT: request sent -> first token received. TPOT: (last token - first token) / (tokens - 1), per request.
Throughput: generated tokens / wall time of the level.
long: the engine alone, prompts of 200-2000 tokens arriving together (TTFT p50 / p99). mtp: batch 8 with MTP off
and on, drafts from an oracle right with probability --oracle-p (forwards per token, tok/s). memory: a fixed KV
budget and max_tokens 4096 requests (how many run at once).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


async def one(client, url: str, prompt: str, max_tokens: int, model: str) -> tuple[float, list[float], int]:
    """One streaming request; returns (send time, token arrival times, tokens)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}
    times: list[float] = []
    t0 = time.perf_counter()
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"]["message"])
            for ch in data["choices"]:
                n = len((ch.get("logprobs") or {}).get("tokens") or [])
                times += [now] * n
    return t0, times, len(times)


async def level(base: str, concurrency: int, requests: int, max_tokens: int, prompts: list[str], model: str,
                timeout: float) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    results = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        todo = iter(range(requests))

        async def runner():
            for i in todo:
                results.append(await one(client, base + "/v1/completions", prompts[i % len(prompts)], max_tokens,
                                         model))

        t = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(runner() for _ in range(concurrency))), timeout)
        wall = time.perf_counter() - t
    ttft = [ts[0] - t0 for t0, ts, n in results if n]
    tpot = [(ts[-1] - ts[0]) / (n - 1) for _, ts, n in results if n > 1]
    tokens = sum(n for *_, n in results)
    return {"c": concurrency, "requests": len(results), "tokens": tokens, "wall": wall, "tps": tokens / wall,
            "ttft": ttft, "tpot": tpot}


def rank_rss() -> dict[int, int]:
    """VmRSS bytes of every process of this user whose environment says it is a torchrun rank of our child."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if b"DSV4_BENCH_RANKS=1" not in env:
                continue
            rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
            rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
        if rank is not None:
            out[rank] = rss * 1024
    return out


@contextlib.contextmanager
def ranked_server(args, model_dir: str):
    """`dsv4 serve --nproc-per-node N` on a free loopback port; yields its URL; SIGTERM (drain) at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dsv4_ascend.cli", "serve", "--model", model_dir, "--dtype", args.dtype, "--device",
           args.device, "--port", str(port), "--max-slots", str(args.max_slots), "--max-seq-len",
           str(args.max_seq_len), "--served-model-name", "bench", "--log-level", "warning", "--nproc-per-node",
           str(args.nproc_per_node)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DSV4_BENCH_RANKS": "1"}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + args.timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {args.nproc_per_node}-rank server did not start")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


SCHEDULES = {
    # The single-user schedule as parameters of the one scheduler: one prefill chunk of one sequence per step,
    # pages for prompt + max_tokens reserved at admission.
    "before": dict(max_num_batched_tokens=None, max_prefill_seqs=1, reserve_full=True),
    # Token-budget steps: decode rows plus prefill chunks of as many prompts as fit; pages on demand.
    "after": dict(max_num_batched_tokens=None, max_prefill_seqs=None, reserve_full=False),
}


def schedule(name: str, prefill_chunk: int, budget: int) -> dict:
    kw = dict(SCHEDULES[name])
    kw["max_num_batched_tokens"] = prefill_chunk if name == "before" else budget
    return kw


def serve_section(args, model, tok) -> None:
    """The server at each concurrency level, before and after."""
    from dsv4_ascend.engine import Engine
    from dsv4_ascend.server import BackgroundServer, create_app

    prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(64)]
    levels = [int(x) for x in args.concurrency.split(",")]
    rows = []
    # --repeats: before and after alternate, so load from other processes on a shared machine hits both alike
    for _ in range(args.repeats):
        for name in ("before", "after"):
            engine = Engine(model, max_slots=args.max_slots, max_seq_len=args.max_seq_len,
                            prefill_chunk=args.prefill_chunk, **schedule(name, args.prefill_chunk, args.budget))
            app = create_app(engine, tok, served_model_name="bench")
            with BackgroundServer(app) as srv:
                asyncio.run(level(srv.url, 1, 2, 4, prompts, "bench", args.timeout))  # warm-up
                for c in levels:
                    n = args.requests or max(4, 2 * c)
                    rows.append((name, asyncio.run(level(srv.url, c, n, args.max_tokens, prompts, "bench",
                                                         args.timeout)), dict(engine.stats)))
    plen = statistics.mean(len(tok.encode(p)) + 1 for p in prompts)
    print(f"\n== serve: {args.max_slots} slots, prompt ~{plen:.0f} tokens, {args.max_tokens} tokens/request "
          f"(greedy, ignore_eos), prefill chunk {args.prefill_chunk}, budget after {args.budget}; client "
          f"in-process over loopback")
    head = (f"{'sched':>6} {'conc':>4} {'reqs':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>7} | {'TTFT ms p50':>11} "
            f"{'p90':>7} {'p99':>7} | {'TPOT ms p50':>11} {'p99':>7} | {'tok/step':>8}")
    print(head)
    print("-" * len(head))
    for name, r, st in rows:
        t, p = [x * 1e3 for x in r["ttft"]], [x * 1e3 for x in r["tpot"]]
        print(f"{name:>6} {r['c']:>4} {r['requests']:>5} {r['tokens']:>7} {r['wall']:>7.2f} {r['tps']:>7.1f} | "
              f"{pct(t, 50):>11.1f} {pct(t, 90):>7.1f} {pct(t, 99):>7.1f} | {pct(p, 50):>11.1f} {pct(p, 99):>7.1f} | "
              f"{st['batched_tokens'] / max(st['steps'], 1):>8.1f}")
    if args.repeats > 1:
        for c in levels:
            best = {name: max(r["tps"] for n, r, _ in rows if n == name and r["c"] == c)
                    for name in ("before", "after")}
            print(f"conc {c}: best of {args.repeats} tok/s before {best['before']:.1f}, after {best['after']:.1f}: "
                  f"{best['after'] / best['before']:.2f}x")


def _drive(engine, prompts: list[list[int]], params) -> dict:
    """Run every prompt through the engine (all arrive at once); TTFT per request and wall time."""
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, params) for p in prompts]
    peak = 0
    while engine.has_work:
        engine.step()
        peak = max(peak, len(engine.running))
    wall = time.perf_counter() - t0
    return {"ttft": [r.first_token_time - r.arrival_time for r in reqs], "wall": wall, "peak": peak,
            "tokens": sum(len(r.output) for r in reqs)}


def long_section(args, model) -> None:
    """Prompts of 200-2000 tokens, all arriving at once: TTFT p50 / p99, before and after."""
    from dsv4_ascend.engine import Engine
    from dsv4_ascend.sampling import SamplingParams

    g = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size
    lens = torch.randint(200, 2001, (args.long_requests,), generator=g).tolist()
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lens]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    print(f"\n== long-prompt mix: {len(prompts)} requests arriving together, prompts {min(lens)}-{max(lens)} tokens "
          f"(mean {statistics.mean(lens):.0f}), {args.max_tokens} tokens each, {args.max_slots} slots, chunk "
          f"{args.prefill_chunk} (after*: {args.budget})")
    print(f"{'sched':>6} {'wall s':>7} {'tok/s':>7} | {'TTFT s p50':>10} {'p99':>7} {'p99/p50':>7} | {'steps':>6} "
          f"{'tok/step':>8}")
    # "after*": chunks of up to the whole budget per sequence (vLLM's default), so the oldest prompt goes first.
    for name, chunk in (("before", args.prefill_chunk), ("after", args.prefill_chunk), ("after*", args.budget)):
        eng = Engine(model, max_slots=args.max_slots, max_seq_len=2048 + args.max_tokens, eos_token_id=-1,
                     prefill_chunk=chunk, **schedule(name.rstrip("*"), chunk, args.budget))
        r = _drive(eng, prompts, params)
        st = eng.stats
        p50, p99 = pct(r["ttft"], 50), pct(r["ttft"], 99)
        print(f"{name:>6} {r['wall']:>7.2f} {r['tokens'] / r['wall']:>7.1f} | {p50:>10.2f} {p99:>7.2f} "
              f"{p99 / p50:>7.2f} | {st['steps']:>6} {st['batched_tokens'] / max(st['steps'], 1):>8.1f}")


def mtp_section(args, model) -> None:
    """Batch of 8 greedy requests, MTP off vs on with an oracle draft hook right ~70% of the time (random weights:
    the MTP block's own drafts are almost never accepted)."""
    from dsv4_ascend.engine import Engine
    from dsv4_ascend.sampling import SamplingParams
    from dsv4_ascend import speculative

    g = torch.Generator().manual_seed(1)
    vocab = model.cfg.vocab_size
    prompts = [torch.randint(2, vocab, (35,), generator=g).tolist() for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=args.mtp_tokens, ignore_eos=True)
    seq = 35 + args.mtp_tokens + args.spec + 8
    off = Engine(model, max_slots=8, max_seq_len=seq, eos_token_id=-1)
    t = time.perf_counter()
    ref = off.generate(prompts, params)
    wall_off = time.perf_counter() - t
    truth = {tuple(r.prompt): r.prompt + r.output for r in ref}
    on = Engine(model, max_slots=8, max_seq_len=seq, eos_token_id=-1, speculative_tokens=args.spec)
    rng = torch.Generator().manual_seed(2)
    orig = speculative.Speculator.propose
    current = [on]  # the engine being run

    def oracle(self, slots, logits, x, pos, params_, states):
        orig(self, slots, logits, x, pos, params_, states)  # the MTP block's work stays in the timing
        owner = {id(r.spec): r for r in current[0].running}
        for p, st in zip(pos, states):
            tr = truth[tuple(owner[id(st)].prompt)]
            right = torch.rand(self.n, generator=rng) < args.oracle_p
            st.drafts = [(tr[p + 2 + i] if p + 2 + i < len(tr) else 0) if right[i] else
                         ((tr[p + 2 + i] + 1) % vocab if p + 2 + i < len(tr) else 1) for i in range(self.n)]

    graph = None
    if args.mtp_graph:  # the verify as a captured graph (graph_mode.GraphVerifier), one bucket of 8 rows
        t = time.perf_counter()
        graph = Engine(model, max_slots=8, max_seq_len=seq, eos_token_id=-1, speculative_tokens=args.spec,
                       graph=True, graph_buckets=[8])
        compile_s = time.perf_counter() - t
    speculative.Speculator.propose = oracle
    try:
        t = time.perf_counter()
        got = on.generate(prompts, params)
        wall_on = time.perf_counter() - t
        if graph is not None:
            current[0] = graph
            rng.manual_seed(2)  # the same oracle drafts
            t = time.perf_counter()
            got_graph = graph.generate(prompts, params)
            wall_graph = time.perf_counter() - t
    finally:
        speculative.Speculator.propose = orig
    assert [r.output for r in got] == [r.output for r in ref], "MTP changed greedy output"
    st = on.spec_stats()
    tokens = sum(len(r.output) for r in got)
    print(f"\n== MTP: batch 8, {args.spec} drafts, oracle drafts right with p={args.oracle_p}, prompts 35, "
          f"{args.mtp_tokens} tokens each (greedy; outputs identical to MTP off)")
    print(f"MTP off: {off.stats['decode_steps']} decode forwards for {off.stats['decode_tokens']} tokens, "
          f"wall {wall_off:.2f} s, {tokens / wall_off:.1f} tok/s")
    print(f"MTP on : {on.stats['decode_steps']} verify forwards for {on.stats['decode_tokens']} tokens "
          f"(acceptance {st['acceptance_rate']:.2f}); per sequence {st['rounds'] / on.stats['decode_tokens']:.3f} "
          f"main forwards per generated token (off: 1.000); batch forwards per token "
          f"{on.stats['decode_steps'] / on.stats['decode_tokens']:.3f} (off: "
          f"{off.stats['decode_steps'] / off.stats['decode_tokens']:.3f}); wall {wall_on:.2f} s, "
          f"{tokens / wall_on:.1f} tok/s")
    if graph is not None:
        same = [r.output for r in got_graph] == [r.output for r in ref]
        print(f"MTP on, captured verify (graph mode, inductor, compile {compile_s:.0f} s): "
              f"{graph.stats['decode_steps']} verify forwards for {graph.stats['decode_tokens']} tokens (acceptance "
              f"{graph.spec_stats()['acceptance_rate']:.2f}), outputs {'identical' if same else 'DIFFERENT'}; "
              f"wall {wall_graph:.2f} s, {tokens / wall_graph:.1f} tok/s")


def memory_section(args, model) -> None:
    """Fixed KV-cache budget, max_tokens 4096 requests with ~100-token prompts: how many run at once."""
    from dsv4_ascend.engine import Engine
    from dsv4_ascend.sampling import SamplingParams

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, model.cfg.vocab_size, (100,), generator=g).tolist() for _ in range(args.max_slots)]
    # max_tokens 4096 where the model's positions allow it (the tiny preset stops at 4096 positions: 3996).
    seq = min(100 + 4096, model.cfg.max_position_embeddings)
    params = SamplingParams(temperature=0, max_tokens=seq - 100, ignore_eos=True)
    budget = int(args.kv_cache_gib * 2**30)
    print(f"\n== memory: --kv-cache-gib {args.kv_cache_gib}, {len(prompts)} requests of 100-token prompts with "
          f"max_tokens {seq - 100}, {args.max_slots} slots, {args.memory_steps} engine steps")
    for name in ("before", "after"):
        eng = Engine(model, max_slots=args.max_slots, max_seq_len=seq, eos_token_id=-1, cache_bytes=budget,
                     prefill_chunk=args.prefill_chunk, **schedule(name, args.prefill_chunk, args.budget))
        for p in prompts:
            eng.add_request(p, params)
        peak = 0
        for _ in range(args.memory_steps):
            eng.step()
            peak = max(peak, len(eng.running))
        print(f"{name:>6}: {eng.cache.num_blocks - 1} pages of {eng.cache.block_size} tokens; running at once: "
              f"peak {peak}, after {args.memory_steps} steps {len(eng.running)} (waiting {len(eng.waiting)}, "
              f"preemptions {eng.stats['preemptions']})")


def ranked_levels(args, model_dir: str, tok) -> None:
    """The serve levels against `dsv4 serve --nproc-per-node N` (a child process), then each rank's memory."""
    path = Path(model_dir)
    server = ranked_server(args, model_dir)
    prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(64)]
    levels = [int(x) for x in args.concurrency.split(",")]
    rows, rss = [], {}
    with server as srv:
        url = srv if isinstance(srv, str) else srv.url
        asyncio.run(level(url, 1, 2, 4, prompts, "bench", args.timeout))  # warm-up
        for c in levels:
            n = args.requests or max(4, 2 * c)
            rows.append(asyncio.run(level(url, c, n, args.max_tokens, prompts, "bench", args.timeout)))
        rss = rank_rss()
    plen = statistics.mean(len(tok.encode(p)) + 1 for p in prompts)

    ranks = f"{args.nproc_per_node} ranks x "
    print(f"dsv4 serve benchmark: model {Path(path).name} ({args.dtype}, {args.device}), {args.threads} torch "
          f"threads per rank, {ranks}{args.max_slots} slots, prompt ~{plen:.0f} tokens, "
          f"{args.max_tokens} tokens/request (greedy, ignore_eos), client in-process over loopback")
    head = (f"{'conc':>4} {'reqs':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>7} | {'TTFT ms p50':>11} {'p90':>7} "
            f"{'p99':>7} | {'TPOT ms p50':>11} {'p90':>7} {'p99':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        t, p = [x * 1e3 for x in r["ttft"]], [x * 1e3 for x in r["tpot"]]
        print(f"{r['c']:>4} {r['requests']:>5} {r['tokens']:>7} {r['wall']:>7.2f} {r['tps']:>7.1f} | "
              f"{pct(t, 50):>11.1f} {pct(t, 90):>7.1f} {pct(t, 99):>7.1f} | "
              f"{pct(p, 50):>11.1f} {pct(p, 90):>7.1f} {pct(p, 99):>7.1f}")
    for rank, b in sorted(rss.items()):
        print(f"rank {rank}: resident memory {b / 2**20:.1f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="official-format model dir (default: tiny model, written fresh)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sections", default="serve,long,mtp,memory",
                    help="comma-separated: serve (the server, before/after), long (200-2000-token prompts), mtp "
                         "(batch 8, oracle drafts), memory (fixed KV budget, max_tokens 4096)")
    ap.add_argument("--concurrency", default="32", help="comma-separated levels (default 32)")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default max(4, 2 x C))")
    ap.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request (default 32)")
    ap.add_argument("--max-slots", type=int, default=32, help="engine slots (default 32)")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens after (default 2048)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="serve: run before and after alternately this many times (best of each reported)")
    ap.add_argument("--long-requests", type=int, default=8)
    ap.add_argument("--spec", type=int, default=3, help="MTP drafts per step (mtp section)")
    ap.add_argument("--oracle-p", type=float, default=0.7, help="chance an oracle draft is right")
    ap.add_argument("--mtp-tokens", type=int, default=48)
    ap.add_argument("--mtp-graph", action="store_true",
                    help="mtp: also run MTP with the verify captured (graph mode; compiles first, minutes on CPU)")
    ap.add_argument("--kv-cache-gib", type=float, default=0.02, help="memory section KV budget (GiB)")
    ap.add_argument("--memory-steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per level")
    ap.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                    help="serve over N ranks (`dsv4 serve --nproc-per-node N` in a child process; default: one "
                         "in-process engine)")
    args = ap.parse_args()
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        ap.error(f"--nproc-per-node must be >= 1, found {args.nproc_per_node}")
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    bad = set(sections) - {"serve", "long", "mtp", "memory"}
    if bad:
        ap.error(f"--sections: unknown {sorted(bad)}")

    from dsv4_ascend.loading import load_model
    from dsv4_ascend.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from dsv4_ascend.tiny import write_tiny_checkpoint

            model_dir = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        path = Path(model_dir)
        tok = load_tokenizer(path)
        if args.nproc_per_node is not None:  # the ranked server, its levels and per-rank memory
            ranked_levels(args, str(model_dir), tok)
            return 0
        model, path = load_model(str(model_dir), args.device, dtype=args.dtype)
        print(f"dsv4 serve benchmark: model {Path(path).name} ({args.dtype}, {args.device}), {args.threads} torch "
              f"threads")
        if "serve" in sections:
            serve_section(args, model, tok)
        if "long" in sections:
            long_section(args, model)
        if "mtp" in sections:
            mtp_section(args, model)
        if "memory" in sections:
            memory_section(args, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
