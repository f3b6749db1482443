"""`dsv4 parity` and `dsv4 convert` on a tiny official-format checkpoint (CPU; the Ascend side is emulated)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4_ascend import quant
from dsv4_ascend.cli import main
from dsv4_ascend.convert import convert_checkpoint, pack_int4, unpack_int4
from dsv4_ascend.converted import ConvertError, converted_target, load_converted
from dsv4_ascend.loading import load_checkpoint
from dsv4_ascend.ops import AscendBackend, emulator
from dsv4_ascend.reference import ReferenceBackend
from dsv4_ascend.safetensors_io import CheckpointError
from dsv4_ascend.tiny import write_tiny_checkpoint

INT8_NAMES = ("attn.wq_b", "attn.wo_b", "attn.indexer.wq_b", "ffn.shared_experts.w", "ffn.experts.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "official", seed=0)


@pytest.fixture(scope="module")
def a3(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "a3"
    convert_checkpoint(tiny, out, "a3", shard_bytes=300_000, progress=False)
    return out


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for fname in sorted(set(index.values())):
        with safe_open(str(d / fname), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    assert set(out) == set(index)
    return out


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(7))


# ---- parity --------------------------------------------------------------------------------------------------------
def _parity(capsys, *args: str) -> tuple[int, str]:
    rc = main(["parity", *args, "--tokens", "12", "--decode-steps", "8"])
    return rc, capsys.readouterr().out


def test_parity_bf16_passes(tiny, capsys):
    rc, out = _parity(capsys, "--model", str(tiny))
    assert rc == 0, out
    assert "npu ops: emulated" in out and "quant=bf16" in out and "weights:   bf16" in out
    assert all(f"  {i} " in out for i in range(4))  # one line per layer
    assert "top-1 agreement: prompt 12/12" in out and "decode 8/8" in out
    assert "bf16 floor (reference bf16 vs fp32, same tokens): cosine" in out
    assert "PASS (cosine >= 0.99" in out and "top-1 flips at near-ties only" in out


def test_same_weights_fp32_run_equals_an_fp32_model(tiny):
    # The fp32 floor runs on the bf16 model's weight tensors (parity._same_weights): it must be the model loaded
    # in fp32, bit for bit (every op casts its weights per call; the FP8/FP4 values are exact in both dtypes).
    from dsv4_ascend.parity import _same_weights

    ids = _ids()
    bf = load_checkpoint(tiny, backend=ReferenceBackend(), dtype=torch.bfloat16, weights="bf16", progress=False)
    shared = _same_weights(bf, ReferenceBackend(), torch.float32)
    assert shared.layers[0].attn.wq_a.weight.data_ptr() == bf.layers[0].attn.wq_a.weight.data_ptr()
    f32 = load_checkpoint(tiny, backend=ReferenceBackend(), dtype=torch.float32, progress=False)
    assert torch.equal(shared(ids), f32(ids))


def test_parity_weights_bf16_equals_native(tiny):
    # --weights bf16 (dequantised once) gives the per-call dequantised values: every figure is the same.
    from dsv4_ascend.parity import run_parity

    a = run_parity(tiny, tokens=12, decode_steps=4, weights="native")
    b = run_parity(tiny, tokens=12, decode_steps=4, weights="bf16")
    assert (a.weights, b.weights) == ("native", "bf16")
    assert a.layers == b.layers and a.floor == b.floor
    assert (a.logits_cosine, a.logits_rel_rms, a.top1) == (b.logits_cosine, b.logits_rel_rms, b.top1)


def test_parity_weights_bf16_refused_where_it_changes_numerics(tiny, capsys):
    for extra in (("--numerics", "deepseek"), ("--quant", "w8a8")):
        rc = main(["parity", "--model", str(tiny), "--weights", "bf16", *extra])
        assert rc == 2 and "--weights bf16 needs --quant bf16 and --numerics exact" in capsys.readouterr().err


class _OffNorm:
    """The emulator with npu_rms_norm 1% off (a kernel bug of ~2.5 bf16 ulps): the derived bounds must catch it."""

    def __getattr__(self, name):
        return getattr(emulator, name)

    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        y, rstd = emulator.npu_rms_norm(x, gamma, epsilon)
        return (y.float() * 1.01).to(y.dtype), rstd


def test_parity_derived_bounds_catch_a_one_percent_kernel_error(tiny):
    from dsv4_ascend.parity import format_report, run_parity

    r = run_parity(tiny, tokens=12, decode_steps=8, npu=_OffNorm())
    assert not r.passed, format_report(r)
    assert any("logit cosine" in f or "top-1 flip" in f for f in r.failures)


def test_parity_w8a8_passes_with_its_tolerance(tiny, capsys):
    rc, out = _parity(capsys, "--model", str(tiny), "--quant", "w8a8")
    assert rc == 0, out
    assert "quant=w8a8" in out and "PASS (cosine >= 0.98, top-1 >= 80.00%)" in out


def test_parity_fails_past_tolerance(tiny, capsys):
    rc, out = _parity(capsys, "--model", str(tiny), "--min-cosine", "1.01")
    assert rc == 1 and "FAIL: logit cosine" in out
    rc, out = _parity(capsys, "--model", str(tiny), "--quant", "w8a8", "--min-top1", "1.0001")
    assert rc == 1 and "FAIL: top-1 agreement" in out


def test_parity_converted_a3_against_reference(tiny, a3, capsys):
    rc, out = _parity(capsys, "--model", str(tiny), "--ascend-model", str(a3))
    assert rc == 0, out
    assert "quant=w8a8" in out and "ascend side" in out  # an a3 checkpoint implies the w8a8 path and bounds


# ---- convert: a3 ---------------------------------------------------------------------------------------------------
def test_convert_a3_layout(tiny, a3):
    src, got = _tensors(tiny), _tensors(a3)
    cfg = json.loads((a3 / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "w8a8_int8" and qc["ascend_target"] == "a3" and qc["weight_format"] == "ND"
    assert "expert_dtype" not in cfg and converted_target(a3) == "a3"
    assert len(list(a3.glob("model-*.safetensors"))) > 1  # shard_bytes=300 kB: several shards
    assert (a3 / "tokenizer.json").is_file()
    n_int8 = 0
    for name, t in src.items():
        if name.endswith(".scale"):
            continue
        w = quant.dequantize(t, src.get(name[: -len("weight")] + "scale") if name.endswith(".weight") else None,
                             torch.float32) if t.dtype in (torch.float8_e4m3fn, torch.int8) else t
        if name.endswith(".weight") and any(k in name for k in INT8_NAMES):
            n_int8 += 1
            q, s = got[name], got[name[: -len("weight")] + "scale"]
            assert q.dtype == torch.int8 and tuple(q.shape) == tuple(w.shape), name
            assert s.dtype == torch.float32 and tuple(s.shape) == (w.shape[0], 1), name
            # independent: numpy per-channel symmetric int8, rint = round half to even, clamp to +-127
            wn = w.numpy()
            s_ref = np.abs(wn).max(1, keepdims=True) / np.float32(127)
            q_ref = np.clip(np.rint(wn / s_ref), -127, 127)
            assert np.array_equal(s.numpy(), s_ref), name
            assert np.array_equal(q.numpy(), q_ref), name
        elif t.dtype in (torch.float8_e4m3fn, torch.int8):  # the other FP8 weights: bf16, exact, no scale
            assert got[name].dtype == torch.bfloat16 and torch.equal(got[name].float(), w), name
            assert name[: -len("weight")] + "scale" not in got
        else:
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert n_int8 == 5 * (2 + 3 + 8 * 3) + 2  # 4 layers + MTP: q_b, o_b, shared w1-3, 8 experts; 2 CSA indexers


def test_convert_a3_loads_like_prepare(tiny, a3, tmp_path):
    # Exact: the converter quantises with prepare()'s own rule on the same fp32 dequantised values, so the int8
    # weights and scales are bit-identical; the remaining FP8 weights are stored as bf16, which holds e4m3 x 2^k
    # exactly, and the bf16 GEMM path dequantises them to bf16 per call anyway. Same ops, same operands.
    ids = _ids()
    be = AscendBackend(emulator, quant="w8a8")
    model = load_checkpoint(tiny, backend=be, progress=False)
    be.prepare(model)
    want = model(ids)
    be2 = AscendBackend(emulator, quant="w8a8")
    conv = load_checkpoint(a3, backend=be2, progress=False)  # dispatches to load_converted
    assert (len(be2.scheme.linears), len(be2.scheme.routed), len(be2.scheme.shared)) == (
        len(be.scheme.linears), len(be.scheme.routed), len(be.scheme.shared)) == (12, 5, 5)
    assert torch.equal(conv(ids), want)
    # the model's int8 parameters are views of the backend's [K, N] tensors (no second copy)
    wq = conv.layers[0].attn.wq_b.weight
    assert wq.dtype == torch.int8 and wq.data_ptr() == be2.scheme.linears[id(wq)][0].data_ptr()
    # --nz: recorded; the emulator's npu_format_cast is the identity (nothing is cast on CPU)
    nz = tmp_path / "a3nz"
    assert main(["convert", str(tiny), str(nz), "--target", "a3", "--nz", "--quiet"]) == 0
    assert json.loads((nz / "config.json").read_text())["quantization_config"]["weight_format"] == "NZ"
    be3 = AscendBackend(emulator, quant="w8a8")
    assert torch.equal(load_converted(nz, be3, progress=False)(ids), want)


# ---- convert: 950 --------------------------------------------------------------------------------------------------
def test_convert_950_roundtrip(tiny, tmp_path, capsys):
    out = tmp_path / "a950"
    assert main(["convert", str(tiny), str(out), "--target", "950"]) == 0
    err = capsys.readouterr().err
    assert "convert -> 950" in err and "100%" in err and "converted for 950" in err  # progress bar + summary
    src, got = _tensors(tiny), _tensors(out)
    assert set(got) == set(src)
    for name, t in src.items():  # byte-identical copies
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["ascend_target"] == "950" and qc["weight_format"] == "ND"
    ids = _ids()
    a = load_checkpoint(tiny, backend=ReferenceBackend(), progress=False)(ids)
    b = load_checkpoint(out, backend=ReferenceBackend(), progress=False)(ids)
    assert torch.equal(a, b)


# ---- convert: errors, W4A8 -----------------------------------------------------------------------------------------
def test_convert_errors(tiny, a3, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # unknown target: argparse
        main(["convert", str(tiny), str(tmp_path / "x"), "--target", "a5"])
    assert e.value.code == 2 and "invalid choice: 'a5'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # missing target
        main(["convert", str(tiny), str(tmp_path / "x")])
    assert e.value.code == 2 and "--target" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="unknown target 'a5'"):
        convert_checkpoint(tiny, tmp_path / "x", "a5")
    for tgt in ("a3", "950"):  # already converted
        assert main(["convert", str(a3), str(tmp_path / "y"), "--target", tgt]) == 2
        assert "already converted (for a3" in capsys.readouterr().err
    assert main(["convert", str(tiny), str(a3), "--target", "a3", "--quiet"]) == 2  # output holds a checkpoint
    assert "already holds a checkpoint" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="only AscendBackend\\(quant='w8a8'\\)"):
        load_checkpoint(a3, backend=ReferenceBackend(), progress=False)
    with pytest.raises(ConvertError, match="only AscendBackend\\(quant='w8a8'\\)"):
        load_checkpoint(a3, backend=AscendBackend(emulator), progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("flags,want", [
    # were: 0 / -1 silently meant 1-byte shards (one file per tensor), nan a "cannot convert float NaN" error
    (["--target", "a3", "--shard-size", "0"], "--shard-size must be a positive number of GiB, found 0.0"),
    (["--target", "a3", "--shard-size", "-1"], "--shard-size must be a positive number of GiB, found -1.0"),
    (["--target", "a3", "--shard-size", "nan"], "--shard-size must be a positive number of GiB, found nan"),
    # was: recorded as weight_format NZ in a 950 copy, whose loader never reads it
    (["--target", "950", "--nz"], "nz (--nz) applies to the a3 target's int8 weights"),
])
def test_convert_flags_refused_before_writing(tiny, tmp_path, capsys, flags, want):
    assert main(["convert", str(tiny), str(tmp_path / "x"), "--quiet", *flags]) == 2
    assert want in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags,want", [
    # were checked after both models had loaded, or not at all: -1 decode steps died in torch.stack, a NaN
    # --min-cosine failed every run, a bad --device gave torch's bare RuntimeError
    (["--tokens", "0"], "--tokens must be >= 1, found 0"),
    (["--decode-steps", "-1"], "--decode-steps must be >= 0, found -1"),
    (["--min-cosine", "nan"], "--min-cosine must be a finite number, found nan"),
    (["--min-top1", "inf"], "--min-top1 must be a finite number, found inf"),
    (["--seed", "-1"], "--seed must be in [0, 2**63 - 1], found -1"),
    (["--device", "bogus"], "--device 'bogus': not a torch device"),
])
def test_parity_flags_refused_before_any_weight(tiny, tmp_path, capsys, flags, want):
    d = tmp_path / "no-weights"  # config, index and tokenizer only: reading a weight would fail otherwise
    d.mkdir()
    for f in tiny.glob("*.json"):
        shutil.copy(f, d / f.name)
    assert main(["parity", "--model", str(d), *flags]) == 2
    err = capsys.readouterr().err
    assert want in err and "shard" not in err, err


def test_int4_pack_layout():
    # independent: op-plugin's convert_to_int4_pack, word i = sum_j (v[8i+j] & 0xF) << 4j, as unsigned 32-bit
    q = torch.randint(-8, 8, (3, 16), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    words = []
    for row in q.tolist():
        out = []
        for i in range(len(row) // 8):
            w = 0
            for j in range(8):
                w |= (row[8 * i + j] & 0xF) << (4 * j)
            out.append(np.uint32(w).view(np.int32).item())
        words.append(out)
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.tolist() == words
    assert torch.equal(unpack_int4(packed), q)
    # little-endian bytes: low nibble = even element (two int4 per byte along the packed dim)
    b = packed.contiguous().view(torch.uint8)
    assert torch.equal((b & 0xF).to(torch.int8), torch.where(q[:, 0::2] < 0, q[:, 0::2] + 16, q[:, 0::2]))


def test_convert_w4a8_experts(tiny, tmp_path):
    out = tmp_path / "w4"
    rep = convert_checkpoint(tiny, out, "a3", experts="w4a8", progress=False)
    assert rep.int4 == 5 * 8 * 3 and rep.int8 == 5 * 5 + 2
    got, src = _tensors(out), _tensors(tiny)
    name = "layers.2.ffn.experts.5.w2"
    w = quant.dequantize(src[name + ".weight"], src[name + ".scale"], torch.float32)  # [N, K]
    p, s, bias = got[name + ".weight"], got[name + ".scale"], got[name + ".bias"]
    n, k = w.shape
    assert p.dtype == torch.int32 and tuple(p.shape) == (k, n // 8)  # GMM weight [K, N] packed along N
    assert tuple(s.shape) == (n, 1) and tuple(bias.shape) == (n,)
    q = unpack_int4(p).t()  # [N, K]
    assert q.abs().max() <= 7
    assert torch.allclose(bias, 8 * s[:, 0] * q.float().sum(1))
    err = (q.float() * s - w).norm() / w.norm()
    assert err < 0.15  # int4 per-channel on Gaussian-like rows: ~9% measured
    assert json.loads((out / "config.json").read_text())["quantization_config"]["experts"] == "w4a8"
    with pytest.raises(ConvertError, match="only AscendBackend\\(quant='w4a8'\\) runs it"):  # runs: test_ascend_w4a8
        load_converted(out, AscendBackend(emulator, quant="w8a8"), progress=False)


def test_parity_converted_w4a8_implies_its_path_and_bounds(tiny, tmp_path, capsys):
    out = tmp_path / "w4p"
    convert_checkpoint(tiny, out, "a3", experts="w4a8", progress=False)
    rc, text = _parity(capsys, "--model", str(tiny), "--ascend-model", str(out))
    assert rc == 0, text
    # int4 experts: the w4a8 bounds (format error, dsv4_ascend/parity.py), not w8a8's tighter ones.
    assert "quant=w4a8" in text and "PASS (cosine >= 0.95, top-1 >= 55.00%)" in text


def test_convert_refuses_nan_scales_and_fp8_bytes(tiny, tmp_path):
    # The loader's value checks run in the converter too: nothing damaged reaches a converted checkpoint.
    for name, byte in (("layers.1.attn.wq_b.scale", 0xFF), ("layers.1.attn.wq_a.weight", 0x7F)):
        src = tmp_path / f"bad-{byte}"
        shutil.copytree(tiny, src)
        shard = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
        with safe_open(str(shard), "pt") as f:
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        tensors[name].view(torch.uint8).view(-1)[0] = byte
        save_file(tensors, str(shard), metadata={"format": "pt"})
        for target in ("a3", "950"):
            with pytest.raises(CheckpointError, match=f"tensor '{name}' .* NaN/inf"):
                convert_checkpoint(src, tmp_path / f"out-{byte}-{target}", target, progress=False)


def test_parity_per_op_names_the_op_that_differs(tiny):
    # --per-op: each op re-run by the Ascend backend on the reference's inputs. On the tiny model (bf16, exact)
    # the emulated ops equal the reference's except `attend`, whose kernel sums keys in blocks of 16 (fp32
    # summation order: ~0.02% of its outputs one bf16 ulp off); a broken op is named: the 1%-off rms_norm.
    from dsv4_ascend.parity import format_report, run_parity

    clean = run_parity(tiny, tokens=8, decode_steps=2, per_op=True)
    assert {d.op for d in clean.op_diffs if d.differ} <= {"attend"}, format_report(clean)
    assert all(d.differ / d.count < 1e-3 for d in clean.op_diffs), format_report(clean)
    # (_OffNorm has no custom-op provider: the composite compressor then runs the off norm too, and the built-in
    # npu_rotary_mul rounds its tables to bf16, both listed as well.)
    off = run_parity(tiny, tokens=8, decode_steps=2, per_op=True, npu=_OffNorm())
    norms = [d for d in off.op_diffs if d.op == "rms_norm"]
    assert norms and all(d.differ == d.count and 0.009 < d.rel_rms < 0.011 for d in norms), format_report(off)
    assert "per op (each op re-run" in format_report(off)
