"""scripts/device_check.py runs on CPU (`--device cpu --tiny`) so it cannot rot, and its correctness check fails on
a wrong device kernel."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dsv4_ascend.reference import ReferenceBackend

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"
_spec = importlib.util.spec_from_file_location("device_check", _PATH)
device_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_check)

FAST = ["--device", "cpu", "--tiny", "--contexts", "16,40", "--batches", "1,2", "--repeats", "1", "--chunk", "16"]


def test_device_check_tiny_cpu(capsys):
    assert device_check.main(FAST + ["--no-graph"]) == 0
    out = capsys.readouterr().out
    assert "correctness" in out and ": PASS" in out
    assert out.count("prefill  ctx") == 2 and out.count("decode   ctx") == 4  # 2 contexts x (1 | 2 batches)


def test_correctness_check_fails_on_a_wrong_kernel(monkeypatch, capsys):
    """A device-side RoPE that does nothing (only the bf16 device model is hit; the reference runs fp32)."""
    rope = ReferenceBackend.rope
    monkeypatch.setattr(ReferenceBackend, "rope",
                        lambda self, x, cos, sin: x if x.dtype == torch.bfloat16 else rope(self, x, cos, sin))
    assert not device_check.check_correctness(torch.device("cpu"), "reference", torch.bfloat16)
    assert "FAIL" in capsys.readouterr().out


def test_unknown_device_is_refused(capsys):
    assert device_check.main(["--device", "nosuchdevice"]) == 2
    assert "nosuchdevice" in capsys.readouterr().err


@pytest.mark.slow
def test_device_check_tiny_cpu_with_graphs(capsys):
    assert device_check.main(FAST + ["--graph-compiler", "aot_eager"]) == 0
    assert "graph" in capsys.readouterr().out
