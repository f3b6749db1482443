#!/usr/bin/env python
"""Convert an official DeepSeek-V4 checkpoint for an Ascend chip (same as `dsv4 convert`), streaming with progress.

    python scripts/convert.py /data/DeepSeek-V4-Flash /data/V4-Flash-a3 --target a3        # Atlas A2/A3, W8A8
    python scripts/convert.py /data/DeepSeek-V4-Pro /data/V4-Pro-a3 --target a3 --experts w4a8 --nz
    python scripts/convert.py /data/DeepSeek-V4-Flash /data/V4-Flash-950 --target 950      # Ascend 950

The a3 output loads with `dsv4_ascend.loading.load_checkpoint(DIR, backend=AscendBackend(quant="w8a8"))`
(quant="w4a8" for `--experts w4a8`; int8 / int4 weights go to the backend as stored); see docs/ascend.md
"Converted checkpoints".
"""
from __future__ import annotations

import sys

from dsv4_ascend.convert import main

if __name__ == "__main__":
    sys.exit(main())
