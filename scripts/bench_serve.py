#!/usr/bin/env python3
"""Serving benchmark: throughput and TTFT / TPOT percentiles of `dsv4 serve` at several concurrency levels.

Starts the real server (FastAPI + uvicorn + the continuous-batching engine) in this process on loopback with the
tiny model (written to a temporary directory in the official format unless --model is given), then for each
concurrency level C keeps C streaming /v1/completions requests in flight until --requests of them have finished.
Every request is greedy with ignore_eos, so it generates exactly --max-tokens tokens; `logprobs: 0` makes every
SSE chunk list its tokens, so token arrival times are exact. The client runs in the same process as the server
(it competes for the same cores; on the tiny model that overhead is part of what is measured).

TTFT: request sent -> first token received. TPOT: (last token - first token) / (tokens - 1), per request.
Throughput: generated tokens / wall time of the level.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="official-format model dir (default: tiny model, written fresh)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated levels (default 1,8,32)")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default max(4, 2 x C))")
    ap.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request (default 32)")
    ap.add_argument("--max-slots", type=int, default=32, help="engine slots (default 32)")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per level")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dsv4_ascend.loading import load_model
    from dsv4_ascend.engine import Engine
    from dsv4_ascend.server import BackgroundServer, create_app
    from dsv4_ascend.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from dsv4_ascend.tiny import write_tiny_checkpoint

            model_dir = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        model, path = load_model(str(model_dir), args.device, dtype=args.dtype)
        tok = load_tokenizer(path)
        engine = Engine(model, max_slots=args.max_slots, max_seq_len=args.max_seq_len)
        app = create_app(engine, tok, served_model_name="bench")
        prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(64)]
        levels = [int(x) for x in args.concurrency.split(",")]
        rows = []
        with BackgroundServer(app) as srv:
            asyncio.run(level(srv.url, 1, 2, 4, prompts, "bench", args.timeout))  # warm-up
            for c in levels:
                n = args.requests or max(4, 2 * c)
                rows.append(asyncio.run(level(srv.url, c, n, args.max_tokens, prompts, "bench", args.timeout)))
        plen = statistics.mean(len(tok.encode(p)) + 1 for p in prompts)

    print(f"dsv4 serve benchmark: model {Path(path).name} ({args.dtype}, {args.device}), {args.threads} torch "
          f"threads, {args.max_slots} slots, prompt ~{plen:.0f} tokens, {args.max_tokens} tokens/request "
          f"(greedy, ignore_eos), client in-process over loopback")
    head = (f"{'conc':>4} {'reqs':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>7} | {'TTFT ms p50':>11} {'p90':>7} "
            f"{'p99':>7} | {'TPOT ms p50':>11} {'p90':>7} {'p99':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        t, p = [x * 1e3 for x in r["ttft"]], [x * 1e3 for x in r["tpot"]]
        print(f"{r['c']:>4} {r['requests']:>5} {r['tokens']:>7} {r['wall']:>7.2f} {r['tps']:>7.1f} | "
              f"{pct(t, 50):>11.1f} {pct(t, 90):>7.1f} {pct(t, 99):>7.1f} | "
              f"{pct(p, 50):>11.1f} {pct(p, 90):>7.1f} {pct(p, 99):>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
