#!/usr/bin/env python3
"""Prefill throughput: dsv4-ascend's reference backend vs transformers' DeepseekV4ForCausalLM, same weights.

Builds one random model (transformers' module with the same weights mapped into ours), runs full forwards of
`--seq` tokens on both, and prints tokens/s of each and their ratio. Threads are pinned (unpinned runs on small
shared machines vary by orders of magnitude).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model config preset (tiny, small); default small")
    ap.add_argument("--seq", type=int, default=512, help="prompt length in tokens (default 512)")
    ap.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per implementation; median reported")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value (default 2)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activation/weight dtype")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dsv4_ascend.hf_oracle import build_hf_model, hf_logits
    from dsv4_ascend.config import ModelConfig, preset
    from dsv4_ascend.model import Transformer
    from dsv4_ascend.reference import ReferenceBackend
    from dsv4_ascend.weights import assign_tensors

    dtype = getattr(torch, args.dtype)
    native = preset(args.preset).to_dict()
    native.pop("quantization_config", None)
    native.pop("expert_dtype", None)
    hf, sd = build_hf_model(native, seed=0, dtype=dtype)
    cfg = ModelConfig.from_dict(native)
    ours = Transformer(cfg, ReferenceBackend(), dtype, n_mtp=0)
    assign_tensors(ours, sd.items())
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_ours = timed(lambda: ours(ids))
    t_hf = timed(lambda: hf_logits(hf, ids))
    diff = (ours(ids).float() - hf_logits(hf, ids).float()).abs().max().item()
    n = args.batch * args.seq
    print(f"config={args.preset} batch={args.batch} seq={args.seq} dtype={args.dtype} threads={args.threads}")
    print(f"dsv4-ascend reference: {n / t_ours:9.1f} tok/s  ({t_ours * 1e3:.0f} ms)")
    print(f"transformers 5.23    : {n / t_hf:9.1f} tok/s  ({t_hf * 1e3:.0f} ms)")
    print(f"ratio ours/transformers: {t_hf / t_ours:.2f}x   (logits max-abs-diff {diff:.2e})")


if __name__ == "__main__":
    main()
