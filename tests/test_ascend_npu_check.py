"""scripts/npu_check.py, the device checks of the emulator's "(verify)" points: on CPU it refuses with a clear
message; its plumbing runs with the emulator standing in for the device (every check matches itself) and reports
a device that differs."""
from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

from dsv4_ascend.ops import emulator as E

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "npu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("npu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["npu_check"] = mod  # dataclasses look the module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_cpu_without_torch_npu_exits_with_a_clear_message():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "torch_npu" in run.stderr and "NPU" in run.stderr
    listed = subprocess.run([sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "kv_quant_sparse_attn_sharedkv" in listed.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--only", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown check" in bad.stderr


def test_every_check_runs_and_matches_with_the_emulator_as_device():
    mod = _module()
    for chip in ("a3", "950"):
        out = io.StringIO()
        good, bad, skipped = mod.run_checks(mod.Ctx(E, E, "cpu"), chip, out=out)
        n = sum(chip in c.chips for c in mod.CHECKS)
        assert (good, bad, skipped) == (n, 0, 0), out.getvalue()


class _Wrong:
    """A 'device' whose npu_dynamic_quant scales differ from the emulator's."""

    def __getattr__(self, name):
        return getattr(E, name)

    @staticmethod
    def npu_dynamic_quant(x, **kw):
        q, s = E.npu_dynamic_quant(x, **kw)
        return q, s * 2


def test_a_differing_device_is_reported():
    mod = _module()
    out = io.StringIO()
    good, bad, _ = mod.run_checks(mod.Ctx(_Wrong(), None, "cpu"), "a3", only=["dynamic_quant", "rotary_mul_bf16"],
                                  out=out)
    assert (good, bad) == (1, 1) and "FAIL  dynamic_quant [scales]" in out.getvalue()
    assert "SKIP" not in out.getvalue()  # both are built-ins
