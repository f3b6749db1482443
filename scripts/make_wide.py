#!/usr/bin/env python3
"""Write a random checkpoint with DeepSeek-V4-Flash's real widths in the official format (FP8 dense weights with
e8m0 block scales, MXFP4 experts, safetensors shards, index, tokenizer): `dsv4_ascend.tiny.wide_config` (hidden
4096, 64 heads x 512, rope 64, indexer 64 x 128, window 128, 512 picks; few layers, 8 experts, vocab 8192).

    python scripts/make_wide.py DIR [--layers 2] [--seed 0]

Then e.g. `dsv4 generate --model DIR --graph`, `dsv4 parity --model DIR` (~3 min, 2.5 GiB for 2 layers) or
`DSV4_WIDE_MODEL=DIR pytest -m slow tests/test_graph_mode.py -k wide`. The fp32 random weights are drawn and
quantised one tensor at a time (`tiny.official_tensors`), so only the quantised checkpoint is held in memory.
Prints wall time and peak RSS.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", metavar="DIR", help="output directory (created if missing)")
    ap.add_argument("--layers", type=int, default=2, help="transformer layers (default 2: one CSA, one HCA)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    ap.add_argument("--force", action="store_true", help="overwrite DIR even if it already holds a config.json")
    args = ap.parse_args()
    from dsv4_ascend.tiny import wide_config, write_tiny_checkpoint

    out = Path(args.dir)
    if (out / "config.json").exists() and not args.force:
        ap.error(f"{out} already holds a config.json; pass --force to overwrite it")
    cfg = wide_config(args.layers)
    t0 = time.perf_counter()
    write_tiny_checkpoint(out, cfg, args.seed)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    print(f"wrote {args.layers}-layer wide model (ratios {cfg.layer_ratios}, seed {args.seed}) to {out}: "
          f"{size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s, peak RSS {rss:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
