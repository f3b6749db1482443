"""scripts/bench_forward.py's `--gemms` helpers: every GEMM of a call is recorded with its operands and replayed."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_spec = importlib.util.spec_from_file_location(
    "bench_forward", Path(__file__).resolve().parents[1] / "scripts" / "bench_forward.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_gemm_recorder_records_each_gemm_with_its_operands_and_replays_them():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 16, generator=g), torch.randn(16, 4, generator=g)
    x, y = torch.randn(2, 8, 16, generator=g).bfloat16(), torch.randn(2, 16, 3, generator=g).bfloat16()
    out = torch.empty(2, 8, 3, dtype=torch.bfloat16)
    w = torch.randn(5, 16, generator=g)

    def forward():
        torch.mm(a, b)
        torch.bmm(x, y, out=out)
        F.linear(a, w)  # a GEMM under another name (aten::linear -> mm)
        (a + 1).relu()  # not a GEMM
    calls = bench._record_gemms(forward)
    assert [f for f, _, _ in calls] == [torch.ops.aten.mm.default, torch.ops.aten.bmm.out, torch.ops.aten.mm.default]
    a.zero_()  # the recorded operands are copies
    assert torch.equal(calls[0][0](*calls[0][1]), torch.mm(calls[0][1][0], calls[0][1][1]))
    assert calls[0][1][0].abs().sum() > 0
    assert [bench._fp32_operands(c) for c in calls] == [True, False, True]
    assert bench._replay(calls, time.process_time) >= 0
    assert bench._replay([c for c in calls if bench._fp32_operands(c)], time.process_time, torch.bfloat16) >= 0
