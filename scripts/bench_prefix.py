#!/usr/bin/env python3
"""Prefix-caching benchmark: the engine with and without automatic prefix caching, interleaved in one run, on the
tiny model (random weights, written in the official format and loaded as `dsv4 serve` loads it).

Cases (issue 19):
  a  multi-turn chat: 8 conversations x 6 turns; each turn resends the history (previous prompt + answer) plus a
     new user message; the 8 conversations of a turn arrive together;
  b  64 requests sharing a 1,000-token system prompt, each with its own 50-token question: the first alone, then
     the other 63 together;
  c  prompt lengths 300, 1K, 4K with 90% shared prefix: per length, one request, then 3 sharing its first 90%.
For each case and block size: hit rate = tokens served from the cache / shared tokens (each request's longest
common prefix with an earlier request of the case), prompt tokens each engine computed (prefill, independent of
machine load), TTFT median (request arrival -> first token; requests that arrive together queue behind each
other) with and without caching, and whether both engines produced the same tokens (greedy). The engines run each batch alternately (with, then without), so load on the machine hits both alike.
Memory: bytes per cached token of the boundary state each cached page carries on top of its paged entries
(docs/design.md, "Prefix caching"), for the tiny model and the released V4 configs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _ids(g: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=g).tolist()


def _shared(prompt: list[int], earlier: list[list[int]]) -> int:
    """Longest common prefix of `prompt` with any earlier prompt (what a perfect cache could serve), leaving the
    last token to compute."""
    best = 0
    for e in earlier:
        n = 0
        for a, b in zip(prompt, e):
            if a != b:
                break
            n += 1
        best = max(best, n)
    return min(best, len(prompt) - 1)


class Pair:
    """Two engines over one model, prefix caching on and off; batches run on both, alternately."""

    def __init__(self, model, args, block_size: int) -> None:
        from dsv4_ascend.engine import Engine

        kw = dict(max_slots=args.max_slots, max_seq_len=args.max_seq_len, eos_token_id=-1,
                  prefill_chunk=args.prefill_chunk, block_size=block_size)
        self.on = Engine(model, prefix_cache=True, **kw)
        self.off = Engine(model, prefix_cache=False, **kw)
        self.ttft = {"on": [], "off": []}
        self.hit = self.shared = 0
        self.same = True
        self.seen: list[list[int]] = []

    def batch(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """Run `prompts` (arriving together) on both engines; returns the outputs (the cached engine's)."""
        from dsv4_ascend.sampling import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = {}
        for name, eng in (("on", self.on), ("off", self.off)):
            reqs = [eng.add_request(p, params) for p in prompts]
            while eng.has_work:
                eng.step()
            self.ttft[name] += [r.first_token_time - r.arrival_time for r in reqs]
            outs[name] = [r.output for r in reqs]
            if name == "on":
                self.hit += sum(r.cached_tokens for r in reqs)
        for i, p in enumerate(prompts):
            self.shared += _shared(p, self.seen + prompts[:i])
        self.seen += prompts
        self.same &= outs["on"] == outs["off"]
        return outs["on"]


def case_a(pair: Pair, g, vocab: int, args) -> None:
    convs = [_ids(g, args.a_system, vocab) + _ids(g, args.a_user, vocab) for _ in range(args.a_convs)]
    for turn in range(args.a_turns):
        outs = pair.batch(convs, args.max_tokens)
        convs = [c + o + _ids(g, args.a_user, vocab) for c, o in zip(convs, outs)]
        print(f"    turn {turn + 1}/{args.a_turns}: prompts {len(convs[0]) - len(outs[0]) - args.a_user} tokens",
              flush=True)


def case_b(pair: Pair, g, vocab: int, args) -> None:
    system = _ids(g, args.b_system, vocab)
    prompts = [system + _ids(g, args.b_question, vocab) for _ in range(args.b_requests)]
    pair.batch(prompts[:1], args.max_tokens)
    print("    first request done; the rest arrive together", flush=True)
    pair.batch(prompts[1:], args.max_tokens)


def case_c(pair: Pair, g, vocab: int, args, length: int) -> None:
    head = _ids(g, length * 9 // 10, vocab)
    for _ in range(1 + args.c_followers):
        pair.batch([head + _ids(g, length - len(head), vocab)], args.max_tokens)


def bytes_per_token(cfg, block_size: int | None, dtype: torch.dtype) -> tuple[int, float, float]:
    """(block size, paged-entry bytes per token, boundary-state bytes per cached token) for a config."""
    from dsv4_ascend.cache import KVCache
    from dsv4_ascend.prefix_cache import BoundaryStore

    n_mtp = cfg.num_nextn_predict_layers

    def size(pages: int) -> KVCache:
        return KVCache(cfg, 1, min(cfg.max_position_embeddings, 8192), dtype, "meta", n_mtp, num_blocks=pages,
                       preassign=False, block_size=block_size)

    c = size(2)
    page = c.nbytes() - size(1).nbytes()
    return c.block_size, page / c.block_size, BoundaryStore.bytes_per_page(c) / c.block_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="a,b,c", help="comma-separated: a (multi-turn), b (system prompt), c (lengths)")
    ap.add_argument("--block-sizes", default="256",
                    help="cache page sizes to run (comma-separated; the tiny model's default is 256)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer and shorter requests")
    ap.add_argument("--max-tokens", type=int, default=4, help="generated tokens per request")
    ap.add_argument("--max-slots", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    q = args.quick
    args.a_convs, args.a_turns, args.a_system, args.a_user = (2, 3, 100, 30) if q else (8, 6, 200, 50)
    args.b_requests, args.b_system, args.b_question = (8, 1000, 50) if q else (64, 1000, 50)
    args.c_lengths, args.c_followers = ([300, 1000], 1) if q else ([300, 1000, 4000], 3)
    cases = args.cases.split(",")
    if set(cases) - {"a", "b", "c"}:
        ap.error(f"--cases: unknown {sorted(set(cases) - {'a', 'b', 'c'})}")
    blocks = [int(b) for b in args.block_sizes.split(",")]
    torch.set_num_threads(args.threads)

    from dsv4_ascend.config import preset
    from dsv4_ascend.loading import load_model
    from dsv4_ascend.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_model(str(write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)), dtype="float32")
    vocab = model.cfg.vocab_size
    print(f"prefix-cache benchmark: tiny model (fp32, CPU), {args.threads} torch threads, max_tokens "
          f"{args.max_tokens}, {args.max_slots} slots, prefill_chunk {args.prefill_chunk}{', quick' if q else ''}")
    rows = []
    t_start = time.perf_counter()
    for bs in blocks:
        runs = [(c, None) for c in cases if c != "c"] + ([("c", n) for n in args.c_lengths] if "c" in cases else [])
        for case, length in runs:
            name = {"a": f"a {args.a_convs}x{args.a_turns} chat", "b": f"b {args.b_requests}x sys {args.b_system}",
                    "c": f"c {length} tokens"}[case]
            print(f"  [{time.perf_counter() - t_start:6.1f} s] block {bs}: case {name}", flush=True)
            g = torch.Generator().manual_seed(ord(case) * 7919 + (length or 0))
            pair = Pair(model, args, bs)
            if case == "a":
                case_a(pair, g, vocab, args)
            elif case == "b":
                case_b(pair, g, vocab, args)
            else:
                case_c(pair, g, vocab, args, length)
            rows.append((bs, name, pair))
    print(f"\n{'block':>5} {'case':<18} {'shared':>7} {'hit':>7} {'hit %':>6} | {'prefill on':>10} {'off':>7} | "
          f"{'TTFT ms p50 on':>14} {'off':>7} {'off/on':>6} | same tokens")
    for bs, name, p in rows:
        on, off = statistics.median(p.ttft["on"]) * 1e3, statistics.median(p.ttft["off"]) * 1e3
        rate = 100 * p.hit / max(p.shared, 1)
        print(f"{bs:>5} {name:<18} {p.shared:>7} {p.hit:>7} {rate:>6.1f} | {p.on.stats['prefill_tokens']:>10} "
              f"{p.off.stats['prefill_tokens']:>7} | {on:>14.1f} {off:>7.1f} {off / on:>6.2f} | "
              f"{'yes' if p.same else 'NO'}")
    print("\nboundary record (per-slot state at a page end) per token of its page, next to the page's own entries;"
          " model dtype bf16 except tiny:")
    shown: set = set()
    for name, cfg, dtype in (("tiny (fp32)", model.cfg, torch.float32), ("v4-flash", preset("v4-flash"), torch.bfloat16),
                             ("v4-pro", preset("v4-pro"), torch.bfloat16)):
        for bs in dict.fromkeys([None] + [b for b in blocks if name.startswith("tiny")]):
            block, page, extra = bytes_per_token(cfg, bs, dtype)
            if (name, block) in shown:
                continue
            shown.add((name, block))
            print(f"  {name:<12} block {block:>4}: paged entries {page:>9.1f} B/token, a boundary record "
                  f"{extra:>9.1f} B per token of its page ({100 * extra / page:.0f}% more)")
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
