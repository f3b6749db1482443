#!/usr/bin/env python3
"""Decode benchmark: step time vs context length, KV bytes per token, and decode speed vs transformers.

1. Decode step time at several context lengths (default 1K, 4K, 16K, 32K). The cache pages are filled with
   random values and the positions set to the context length: a decode step's work depends on how many entries
   exist, not on their values, so this measures the same step without spending minutes on prefill.
2. KV-cache bytes per token of context, measured from the allocated buffers, vs V4's theoretical minimum
   (CSA: head_dim/4 kv values + index_head_dim/4 index values; HCA: head_dim/128; per layer) for this config and
   for V4-Flash / V4-Pro.
3. Decode tokens/s of our engine vs transformers' cached greedy decode on the same weights after the same
   (real) prompt.
Threads are pinned and reported.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch



def _median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model config preset (default small)")
    ap.add_argument("--contexts", default="1024,4096,16384,32768", help="comma-separated context lengths")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps per measurement")
    ap.add_argument("--prompt", type=int, default=256, help="prompt length for the transformers comparison")
    ap.add_argument("--new-tokens", type=int, default=33, help="generated tokens in the transformers comparison")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="transformers comparison clock: wall "
                    "(perf_counter) or this process's CPU time (time.process_time; a loaded shared machine does not "
                    "inflate it; meaningful with --threads 1)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the transformers comparison")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the comparison, print the N costliest aten ops of one decode step, ours (eager engine) "
                         "next to transformers (torch.profiler, self CPU time; generate(new) minus generate(1), per "
                         "step)")
    ap.add_argument("--graph", action="store_true", help="also time our engine with graph-mode decode (compiles)")
    ap.add_argument("--graph-tuning", default="default", choices=["default", "max"],
                    help="graph compile tuning: 'max' = frozen weights + autotuned GEMMs (longer compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    from dsv4_ascend.cache import KVCache
    from dsv4_ascend.config import ModelConfig, preset
    from dsv4_ascend.model import Transformer
    from dsv4_ascend.reference import ReferenceBackend
    from dsv4_ascend.tiny import random_weights
    from dsv4_ascend.weights import assign_tensors

    dtype = getattr(torch, args.dtype)
    native = preset(args.preset).to_dict()
    native.pop("quantization_config", None)
    native.pop("expert_dtype", None)
    cfg = ModelConfig.from_dict(native)
    model = Transformer(cfg, ReferenceBackend(), dtype, n_mtp=0)
    assign_tensors(model, [(k, v) for k, v in random_weights(cfg, 0).items() if not k.startswith("mtp.")])
    b = args.batch
    print(f"config={args.preset} (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, ratios "
          f"{cfg.layer_ratios}) batch={b} dtype={args.dtype} threads={args.threads}")

    # 1. step time vs context
    print("\n1. decode step time vs context length (random-filled cache)")
    times = {}
    for ctx in [int(c) for c in args.contexts.split(",")]:
        cache = model.new_cache(b, ctx + args.steps + 1)
        g = torch.Generator().manual_seed(0)
        for t in (t for lc in cache.layers for t in lc.tensors()):
            if t.dtype.is_floating_point:
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
        slots = torch.arange(b)
        ids = torch.randint(0, cfg.vocab_size, (b, 1))

        def run(ctx=ctx, cache=cache, slots=slots, ids=ids) -> None:
            for k in range(args.steps):
                model.decode(ids, torch.full((b,), ctx + k), cache, slots, max_len=ctx + k + 1)

        times[ctx] = _median_time(run, 3) / args.steps
        print(f"  context {ctx:>6}: {times[ctx] * 1e3:8.2f} ms/step")
    c0, c1 = min(times), max(times)
    print(f"  t({c1})/t({c0}) = {times[c1] / times[c0]:.2f}  (goal <= 1.5)")

    # 2. KV bytes per token
    print("\n2. KV-cache bytes per token of context (paged part; window rings and compressor rows are per slot)")
    for name, c in (("this config", cfg), ("v4-flash", preset("v4-flash")), ("v4-pro", preset("v4-pro"))):
        el = 2  # bf16
        theory = sum((c.head_dim / m if m else 0) + (c.index_head_dim / 4 if m == 4 else 0)
                     for m in c.layer_ratios) * el
        n = 1 << 16
        a = KVCache(c, 1, n, torch.bfloat16, "meta", 0, preassign=False, num_blocks=2)
        z = KVCache(c, 1, n, torch.bfloat16, "meta", 0, preassign=False, num_blocks=1)
        measured = (a.nbytes() - z.nbytes()) / a.block_size
        a8 = KVCache(c, 1, n, torch.bfloat16, "meta", 0, preassign=False, num_blocks=2, kv_fp8=True)
        z8 = KVCache(c, 1, n, torch.bfloat16, "meta", 0, preassign=False, num_blocks=1, kv_fp8=True)
        m8 = (a8.nbytes() - z8.nbytes()) / a8.block_size
        full = c.num_hidden_layers * c.head_dim * el
        print(f"  {name:12s}: measured {measured:8.1f} B/token (bf16), theoretical minimum {theory:8.1f}, "
              f"ratio {measured / theory:.3f}; C8 {m8:8.1f} B/token ({m8 / measured:.2f}x); "
              f"an uncompressed 1-head MQA cache would be {full} B/token")

    if args.skip_hf:
        return
    # 3. vs transformers
    from dsv4_ascend.hf_oracle import build_hf_model, stable_indexer_topk

    from dsv4_ascend.engine import Engine
    from dsv4_ascend.sampling import SamplingParams

    hf, sd = build_hf_model(native, seed=0, dtype=dtype)
    assign_tensors(model, sd.items())
    prompt = torch.randint(2, cfg.vocab_size, (b, args.prompt), generator=torch.Generator().manual_seed(1))

    def hf_generate(new: int) -> float:
        with torch.no_grad(), stable_indexer_topk():
            t0 = clock()
            hf.generate(prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new)
            return clock() - t0

    engines: dict[bool, Engine] = {}

    def ours_generate(new: int, graph: bool = False) -> float:
        # One engine per mode, reused across calls (a graph engine compiles once, at construction).
        if graph not in engines:
            engines[graph] = Engine(model, max_slots=b, max_seq_len=args.prompt + args.new_tokens + 1,
                                    prefill_chunk=args.prompt, eos_token_id=-1, graph=graph, graph_buckets=[b],
                                    graph_tuning=args.graph_tuning)
        t0 = clock()
        engines[graph].generate(prompt.tolist(), SamplingParams(temperature=0, max_tokens=new))
        return clock() - t0

    def decode_time(run) -> float:
        """Time of new_tokens - 1 decode steps: generate(N) minus generate(1) (same prompt, same prefill)."""
        return run(args.new_tokens) - run(1)

    runs = {"ours": ours_generate, "hf": hf_generate}
    if args.graph:
        runs["graph"] = lambda new: ours_generate(new, True)
    for run in runs.values():
        run(1)  # warm (and, for graph mode, compile) outside the timing
    # Interleaved per repeat (a shared machine's load hits every implementation alike); median and min reported.
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, run in runs.items():
            times[k].append(decode_time(run))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    n = b * (args.new_tokens - 1)
    print(f"\n3. decode tokens/s after a {args.prompt}-token prompt, batch {b}: (generate {args.new_tokens} tokens "
          f"minus generate 1 token) for both; transformers' own generate(), greedy; {args.repeats} interleaved "
          f"repeats, median (min), {args.clock} clock")
    print(f"  dsv4-ascend engine (eager) : {n / med['ours']:8.1f} tok/s ({n / best['ours']:8.1f})  ratio vs "
          f"transformers {med['hf'] / med['ours']:.2f}x ({best['hf'] / best['ours']:.2f}x)")
    if args.graph:
        print(f"  dsv4-ascend engine (graph, tuning {args.graph_tuning}): {n / med['graph']:8.1f} tok/s "
              f"({n / best['graph']:8.1f})  ratio vs transformers {med['hf'] / med['graph']:.2f}x "
              f"({best['hf'] / best['graph']:.2f}x)")
    print(f"  transformers 5.23          : {n / med['hf']:8.1f} tok/s ({n / best['hf']:8.1f})  (goals: eager >= 2x, "
          "graph >= 5x)")
    if args.profile:
        _print_profile({"ours": ours_generate, "transformers": hf_generate}, args.new_tokens, args.profile)


def _op_table(run, new: int, repeats: int = 3) -> dict[str, tuple[float, float]]:
    """{aten op: (calls, self CPU us)} of run(new) under torch.profiler; per op the minimum time of `repeats` runs
    (the profiler's clock is wall time, which a loaded shared machine inflates unevenly)."""
    from torch.profiler import ProfilerActivity, profile

    table: dict[str, tuple[float, float]] = {}
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(new)
        for e in prof.key_averages():
            if e.key.startswith("aten::"):
                t = min(e.self_cpu_time_total, table.get(e.key, (0, float("inf")))[1])
                table[e.key] = (e.count, t)
    return table


def _print_profile(runs: dict, new_tokens: int, top: int) -> None:
    """Per decode step: generate(new_tokens) minus generate(1) (same prompt, same prefill), divided by the steps."""
    steps = new_tokens - 1
    per = {}
    for name, run in runs.items():
        full, one = _op_table(run, new_tokens), _op_table(run, 1)
        per[name] = {k: ((c - one.get(k, (0, 0))[0]) / steps, (t - one.get(k, (0, 0))[1]) / steps)
                     for k, (c, t) in full.items()}
    a, b = per["ours"], per["transformers"]
    print(f"\n4. aten ops per decode step (torch.profiler: calls, nested ones included; self time, min of 3 runs, "
          f"profiler overhead included; {steps} steps)")
    for name, d in per.items():
        print(f"  {name}: {sum(c for c, _ in d.values()):8.0f} ops, {sum(t for _, t in d.values()) / 1e3:7.2f} ms "
              "self CPU")
    print(f"  {'op':28s} {'ours calls':>10s} {'ours ms':>8s} {'hf calls':>9s} {'hf ms':>7s}")
    for k in sorted(set(a) | set(b), key=lambda k: -max(a.get(k, (0, 0))[1], b.get(k, (0, 0))[1]))[:top]:
        (ca, ta), (cb, tb) = a.get(k, (0, 0)), b.get(k, (0, 0))
        print(f"  {k:28s} {ca:10.0f} {ta / 1e3:8.3f} {cb:9.0f} {tb / 1e3:7.3f}")


if __name__ == "__main__":
    main()
