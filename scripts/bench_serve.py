#!/usr/bin/env python3
"""Serving benchmark: throughput and TTFT / TPOT percentiles of `dsv4 serve` at several concurrency levels.

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
    ap.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                    help="serve over N ranks (`dsv4 serve --nproc-per-node N` in a child process; default: one "
                         "in-process engine)")
    args = ap.parse_args()
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        ap.error(f"--nproc-per-node must be >= 1, found {args.nproc_per_node}")
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
        path = Path(model_dir)
        tok = load_tokenizer(path)
        if args.nproc_per_node is None:
            model, path = load_model(str(model_dir), args.device, dtype=args.dtype)
            engine = Engine(model, max_slots=args.max_slots, max_seq_len=args.max_seq_len)
            server = BackgroundServer(create_app(engine, tok, served_model_name="bench"))
        else:
            server = ranked_server(args, str(model_dir))
        prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(64)]
        levels = [int(x) for x in args.concurrency.split(",")]
        rows, rss = [], {}
        with server as srv:
            url = srv if isinstance(srv, str) else srv.url
            asyncio.run(level(url, 1, 2, 4, prompts, "bench", args.timeout))  # warm-up
            for c in levels:
                n = args.requests or max(4, 2 * c)
                rows.append(asyncio.run(level(url, c, n, args.max_tokens, prompts, "bench", args.timeout)))
            rss = rank_rss() if args.nproc_per_node is not None else {}
        plen = statistics.mean(len(tok.encode(p)) + 1 for p in prompts)

    ranks = f"{args.nproc_per_node} ranks x " if args.nproc_per_node is not None else ""
    print(f"dsv4 serve benchmark: model {Path(path).name} ({args.dtype}, {args.device}), {args.threads} torch "
          f"threads{' per rank' if ranks else ''}, {ranks}{args.max_slots} slots, prompt ~{plen:.0f} tokens, "
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
