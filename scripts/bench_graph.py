#!/usr/bin/env python3
"""Graph-mode decode benchmark: compiled (torch.compile fullgraph, one graph per batch bucket) vs eager decode
step time on the same model and cache, printed as a ratio in one run. Threads are pinned and reported.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model config preset (tiny, small); default small")
    ap.add_argument("--batch", type=int, default=4, help="sequences per decode step (the graph bucket)")
    ap.add_argument("--context", type=int, default=256, help="tokens already in each sequence's cache")
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compiler", default="inductor", help="torch.compile backend (default inductor)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dsv4_ascend.config import preset
    from dsv4_ascend.graph_mode import GraphDecoder
    from dsv4_ascend.model import Transformer
    from dsv4_ascend.reference import ReferenceBackend
    from dsv4_ascend.decode_step import EagerDecoder
    from dsv4_ascend.sampling import SamplingParams
    from dsv4_ascend.tiny import random_weights
    from dsv4_ascend.weights import assign_tensors

    cfg = preset(args.preset)
    cfg.quant_method, cfg.expert_dtype = None, None
    dtype = getattr(torch, args.dtype)
    model = Transformer(cfg, ReferenceBackend(), dtype, n_mtp=0)
    assign_tensors(model, [(k, v) for k, v in random_weights(cfg, 0).items() if not k.startswith("mtp.")])
    b, ctx = args.batch, args.context
    total = ctx + args.steps + 8
    caches = [model.new_cache(b + 1, total) for _ in range(2)]  # +1: the graph's pad slot
    slots = torch.arange(b)
    prompt = torch.randint(0, cfg.vocab_size, (b, ctx), generator=torch.Generator().manual_seed(0))
    for c in caches:
        model(prompt, c, slots, 0)
    params = [SamplingParams(temperature=0, seed=i) for i in range(b)]
    eager_dec = EagerDecoder(model, caches[0])
    dec = GraphDecoder(model, caches[1], pad_slot=b, buckets=[b], compiler=args.compiler)
    t0 = time.perf_counter()
    dec.warmup(progress=False)
    compile_s = time.perf_counter() - t0
    ids = prompt[:, -1:].contiguous()

    def eager(k: int) -> None:
        eager_dec.step(ids, torch.full((b,), ctx + k), slots, params)

    def compiled(k: int) -> None:
        dec.step(ids, torch.full((b,), ctx + k), slots, params)

    def timed(fn) -> float:
        fn(0)
        ts = []
        for k in range(args.steps):
            t = time.perf_counter()
            fn(k % 8)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    te, tc = timed(eager), timed(compiled)
    print(f"config={args.preset} batch={b} context={ctx} dtype={args.dtype} threads={args.threads} "
          f"compiler={args.compiler} (compile {compile_s:.1f} s, {dec.compiles} graph)")
    print(f"eager decode step   : {te * 1e3:8.2f} ms")
    print(f"compiled decode step: {tc * 1e3:8.2f} ms")
    print(f"speed-up compiled/eager: {te / tc:.2f}x   (recompiles during timing: {dec.compiles - 1})")


if __name__ == "__main__":
    main()
