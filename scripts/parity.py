#!/usr/bin/env python
"""Ascend backend vs reference backend on one checkpoint and prompt (same as `dsv4 parity`).

    python scripts/parity.py                                  # tiny default model, bf16, emulated on CPU
    python scripts/parity.py --model DIR --quant w8a8 --tokens 64 --decode-steps 128
    python scripts/parity.py --model DIR --ascend-model DIR_A3 # a `dsv4 convert --target a3` output vs reference
    python scripts/parity.py --model DIR --device npu          # on an Ascend machine (torch_npu)

Prints per-layer max-abs-diff and cosine of the layer output streams, the same for the logits, top-1 agreement
over the prompt and a teacher-forced greedy decode; exits 1 past --min-cosine / --min-top1 (defaults per --quant),
2 on a usage or checkpoint error.
"""
from __future__ import annotations

import sys

from dsv4_ascend.parity import main

if __name__ == "__main__":
    sys.exit(main())
