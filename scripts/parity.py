#!/usr/bin/env python
"""Ascend backend vs reference backend on one checkpoint and prompt (same as `dsv4 parity`).

    python scripts/parity.py                                  # tiny default model, bf16, emulated on CPU
    python scripts/parity.py --model DIR                      # e.g. a scripts/make_wide.py checkpoint (real widths)
    python scripts/parity.py --model DIR --quant w8a8 --tokens 64 --decode-steps 128
    python scripts/parity.py --model DIR --ascend-model DIR_A3 # a `dsv4 convert --target a3` output vs reference
    python scripts/parity.py --model DIR --device npu          # on an Ascend machine (torch_npu)

Prints per-layer max-abs-diff, cosine and routing differences of the layer output streams, the same for the
logits, top-1 agreement over the prompt and a teacher-forced greedy decode; in bf16 also the reference's own bf16
error against an fp32 run (the floor) from which the bounds are derived. Exits 1 past a bound (--min-cosine /
--min-top1 override them), 2 on a usage or checkpoint error.
"""
from __future__ import annotations

import sys

from dsv4_ascend.parity import main

if __name__ == "__main__":
    sys.exit(main())
