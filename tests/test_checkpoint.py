"""Official-format checkpoints: the tiny writer, the lazy safetensors loader, its errors, expert slicing."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4_ascend import quant
from dsv4_ascend.checkpoint import load_checkpoint
from dsv4_ascend.checkpoint_names import hf_name, native_name
from dsv4_ascend.safetensors_io import INDEX_NAME, CheckpointError, read_safetensors_header, stream_tensors
from dsv4_ascend.config import ModelConfig, preset
from dsv4_ascend.model import Transformer
from dsv4_ascend.reference import ReferenceBackend
from dsv4_ascend.tiny import (dequantized_weights, make_tiny_main, official_tensors, random_weights,
                              write_tiny_checkpoint)
from dsv4_ascend.weights import WeightError, assign_tensors

SEED = 3
FP8_LINEARS = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b", "attn.indexer.wq_b",
               "ffn.shared_experts.w1", "ffn.shared_experts.w2", "ffn.shared_experts.w3", "e_proj", "h_proj")


def _load(path, **kw) -> Transformer:
    kw.setdefault("dtype", torch.float32)
    return load_checkpoint(path, backend=ReferenceBackend(), progress=False, **kw)


def _ids(n: int = 24, b: int = 2) -> torch.Tensor:
    # tiny: window 8, CSA ratio 4 (6 entries > index_topk 4), HCA ratio 8: every path runs.
    return torch.randint(0, 512, (b, n), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "snapshot", seed=SEED)


@pytest.fixture(scope="module")
def in_memory() -> Transformer:
    """The plain fp32 model built from the dequantised official tensors (no files involved)."""
    cfg = preset("tiny")
    m = Transformer(cfg, ReferenceBackend(), torch.float32)
    assign_tensors(m, dequantized_weights(official_tensors(cfg, SEED)).items())
    return m


@pytest.fixture(scope="module")
def ref_logits(in_memory) -> torch.Tensor:
    out = in_memory(_ids())
    assert torch.isfinite(out).all() and out.std() > 0.1
    return out


@pytest.fixture(scope="module")
def native(ckpt) -> Transformer:
    return _load(ckpt)


def _headers(d: Path) -> dict[str, tuple[str, list[int], str]]:
    out = {}
    for p in sorted(d.glob("*.safetensors")):
        for k, info in read_safetensors_header(p).items():
            out[k] = (info.dtype, list(info.shape), p.name)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(d: Path, edit) -> None:
    """Rewrite every shard through `edit(dict) -> dict` and the index to match (the loader sees a valid file)."""
    index = json.loads((d / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    weight_map = {}
    for fname in files:
        with safe_open(str(d / fname), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = edit(tensors, fname)
        save_file(tensors, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    index["weight_map"] = weight_map
    (d / INDEX_NAME).write_text(json.dumps(index))


# ---- the files ----------------------------------------------------------------------------------------------------

def test_snapshot_layout(ckpt):
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(shards) >= 2
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    index = json.loads((ckpt / INDEX_NAME).read_text())
    heads = _headers(ckpt)
    assert index["weight_map"] == {k: v[2] for k, v in heads.items()}
    sizes = sum(i.nbytes for p in ckpt.glob("*.safetensors") for i in read_safetensors_header(p).values())
    assert index["metadata"]["total_size"] == sizes
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["quantization_config"]["scale_fmt"] == "ue8m0" and raw["expert_dtype"] == "fp4"
    assert ModelConfig.from_dict(raw) == preset("tiny")
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "tokenizer_config.json").is_file()
    # the MTP block sits in the last shard, as in the official files
    assert {v[2] for k, v in heads.items() if k.startswith("mtp.")} == {shards[-1]}


def test_on_disk_formats_are_the_official_ones(ckpt):
    cfg = preset("tiny")
    heads = _headers(ckpt)
    # names: exactly the dense model's names, plus one .scale beside every FP8/FP4 weight
    dense = random_weights(cfg, 0)
    quantised = {n for n in dense if n.endswith(".weight") and
                 (any(n.endswith(f"{m}.weight") for m in FP8_LINEARS) or ".experts." in n)}
    assert set(heads) == set(dense) | {n[:-len("weight")] + "scale" for n in quantised}
    d, i, k = cfg.hidden_size, cfg.moe_intermediate_size, 0
    for name, (dt, shape, _) in heads.items():
        leaf = name.rsplit(".", 1)[-1]
        if ".experts." in name:
            n_out, n_in = (d, i) if ".w2." in name else (i, d)
            assert (dt, shape) == (("I8", [n_out, n_in // 2]) if leaf == "weight" else ("F8_E8M0", [n_out, n_in // 32]))
            k += 1
        elif name in quantised:
            assert dt == "F8_E4M3" and shape == list(dense[name].shape), name
            n_out, n_in = dense[name].shape
            assert heads[name[:-len("weight")] + "scale"][:2] == ("F8_E8M0", [-(-n_out // 128), -(-n_in // 128)])
        elif leaf == "scale":
            assert dt == "F8_E8M0"
        elif leaf == "tid2eid":
            assert dt == "I64"
        elif leaf.startswith("hc_") or leaf in ("attn_sink", "ape") or name.endswith("gate.bias"):
            assert dt == "F32", name
        else:  # embed, head, gate.weight, compressor/indexer-compressor wkv/wgate, weights_proj, every norm
            assert dt == "BF16", name
    assert k == 3 * 2 * cfg.n_routed_experts * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    # the FP4 bytes really are MXFP4 of the random weights (low nibble first, e8m0 per 32)
    t = official_tensors(cfg, SEED)
    w = "layers.3.ffn.experts.5.w2"
    ref_q, ref_s = quant.quantize_fp4(random_weights(cfg, SEED)[f"{w}.weight"])
    assert torch.equal(t[f"{w}.weight"].view(torch.uint8), ref_q)
    assert torch.equal(t[f"{w}.scale"].view(torch.uint8), ref_s.view(torch.uint8))


# ---- loading ------------------------------------------------------------------------------------------------------

# Tolerance 0: both models hold the same values (FP8 x 2^k and FP4 x 2^k are exact in fp32), and the reference
# backend dequantises the packed weights to the activation dtype (fp32) before the same F.linear / einsum the
# plain model runs, so the two forwards execute identical fp32 ops on identical operands. Measured: 0.0.
TOL = 0.0


def test_native_load_keeps_formats_and_matches_dequantised_model(native, in_memory, ref_logits):
    r = native.layers[2].ffn.routed
    assert r.w1.dtype == torch.int8 and r.w1_scale.dtype == torch.float8_e8m0fnu
    assert native.layers[1].attn.wq_a.weight.dtype == torch.float8_e4m3fn
    assert native.layers[1].attn.wq_a.scale.dtype == torch.float8_e8m0fnu
    rep = native.load_report
    assert (rep.layout, rep.spelling, rep.weights, rep.skipped) == ("sharded", "native", "native", 0)
    assert rep.scale_dtypes == {"F8_E8M0": 164}
    ids = _ids()
    cache, slots = native.new_cache(2, 25), torch.arange(2)
    assert (native(ids, cache, slots) - ref_logits).abs().max().item() <= TOL
    # decode (the gathered-experts path) too
    cache2 = in_memory.new_cache(2, 25)
    in_memory(ids, cache2, slots)
    nxt, pos = ids[:, :1], torch.full((2,), 24)
    assert (native.decode(nxt, pos, cache, slots) - in_memory.decode(nxt, pos, cache2, slots)).abs().max() <= TOL


def test_bf16_mode_dequantises_at_load(ckpt, in_memory, ref_logits):
    m32 = _load(ckpt, weights="bf16")
    assert m32.layers[2].ffn.routed.w1.dtype == torch.float32 and m32.layers[2].ffn.routed.w1_scale is None
    assert m32.layers[1].attn.wq_a.scale is None
    ids = _ids()
    assert (m32(ids) - ref_logits).abs().max().item() <= TOL
    m16 = _load(ckpt, weights="bf16", dtype=torch.bfloat16)
    assert m16.layers[2].ffn.routed.w1.dtype == torch.bfloat16
    ref = dict(in_memory.checkpoint_tensors())
    for name, t in m16.checkpoint_tensors():  # dequantised values are exact in bf16
        if t.dtype == torch.bfloat16 and ref[name].dtype == torch.float32:
            assert torch.equal(t.float(), ref[name]), name
    assert torch.isfinite(m16(ids)).all()


def test_hf_spelling_fp32_scales_and_single_file(ckpt, ref_logits, tmp_path):
    # transformers names + fp32 scales (`.weight_scale_inv`), all in one model.safetensors without index
    d = tmp_path / "hf"
    d.mkdir()
    shutil.copy(ckpt / "config.json", d)
    tensors = {}
    for p in ckpt.glob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                tensors[hf_name(k)] = quant.e8m0_to_float(t) if t.dtype == torch.float8_e8m0fnu else t
    assert "model.layers.1.self_attn.q_a_proj.weight_scale_inv" in tensors
    save_file(tensors, str(d / "model.safetensors"))
    m = _load(d)
    rep = m.load_report
    assert rep.layout == "single" and rep.spelling == "hf" and rep.renamed == 427
    assert rep.scale_dtypes == {"F32": 164}
    assert m.layers[1].attn.wq_a.scale.dtype == torch.float32  # dense FP8 scales kept as stored
    assert m.layers[2].ffn.routed.w1_scale.dtype == torch.float8_e8m0fnu  # powers of two: back to e8m0
    assert (m(_ids()) - ref_logits).abs().max().item() <= TOL


def test_native_name_mapping():
    cases = {
        "model.layers.3.self_attn.q_a_proj.weight_scale_inv": "layers.3.attn.wq_a.scale",
        "model.layers.3.mlp.gate.e_score_correction_bias": "layers.3.ffn.gate.bias",
        "model.layers.3.self_attn.compressor.indexer.scorer.weights_proj.weight":
            "layers.3.attn.indexer.weights_proj.weight",
        "model.layers.3.self_attn.compressor.kv_norm.weight": "layers.3.attn.compressor.norm.weight",
        "model.layers.3.mlp.experts.7.up_proj.weight": "layers.3.ffn.experts.7.w3.weight",
        "model.layers.0.attn_hc.fn": "layers.0.hc_attn_fn",
        "model.layers.0.self_attn.wq_b.weight": "layers.0.attn.wq_b.weight",  # converter style
        "model.embed_tokens.weight": "embed.weight",
        "lm_head.weight": "head.weight",
        "layers.2.ffn.experts.1.w2.scale": "layers.2.ffn.experts.1.w2.scale",
    }
    for hf, nat in cases.items():
        assert native_name(hf) == nat
    for n in random_weights(preset("tiny"), 0):
        assert native_name(hf_name(n)) == n


def test_expert_range_and_mtp_are_sliced(ckpt, native):
    m = _load(ckpt, expert_range=(2, 5), n_mtp=0)
    names = [n for n, _ in m.checkpoint_tensors()]
    experts = {int(x) for x in re.findall(r"\.experts\.(\d+)\.", " ".join(names))}
    assert experts == {2, 3, 4}
    assert not any(n.startswith("mtp.") for n in names)
    assert m.layers[0].ffn.routed.w1.shape[0] == 3 and m.layers[0].ffn.routed.first == 2
    full = dict(native.checkpoint_tensors())
    for n, t in m.checkpoint_tensors():
        assert torch.equal(t.view(torch.uint8) if t.dtype != torch.float32 else t,
                           full[n].view(torch.uint8) if t.dtype != torch.float32 else full[n]), n
    rep = m.load_report
    n_exp_tensors = 6 * (preset("tiny").n_routed_experts - 3) * preset("tiny").num_hidden_layers
    mtp_tensors = sum(1 for n in full if n.startswith("mtp."))
    assert rep.skipped == n_exp_tensors + mtp_tensors
    with pytest.raises(ValueError, match="expert_range"):
        _load(ckpt, expert_range=(6, 9))


def test_make_tiny_main(tmp_path, capsys):
    out = tmp_path / "cli"
    assert make_tiny_main([str(out), "--seed", "1"]) == 0
    assert "wrote tiny model" in capsys.readouterr().out
    assert (out / INDEX_NAME).is_file()
    with pytest.raises(SystemExit):
        make_tiny_main([str(out)])  # refuses to overwrite without --force
    assert make_tiny_main([str(out), "--force", "--shard-bytes", "100000"]) == 0
    assert len(list(out.glob("*.safetensors"))) > 3
    # were: --shard-bytes 0 / -5 wrote one shard per tensor, --seed 2**64 a bare "Overflow" ValueError
    for flags, want in ((["--shard-bytes", "0"], "--shard-bytes must be >= 1, found 0"),
                        (["--seed", str(2**64)], "--seed must be in [0, 2**63 - 1]"),
                        (["--seed", "-1"], "--seed must be in [0, 2**63 - 1], found -1")):
        with pytest.raises(SystemExit):
            make_tiny_main([str(tmp_path / "bad"), *flags])
        assert want in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_progress_bar_goes_to_stderr(ckpt, capsys):
    load_checkpoint(ckpt, backend=ReferenceBackend(), dtype=torch.float32, n_mtp=0, progress=True)
    cap = capsys.readouterr()
    assert cap.out == "" and "loaded" in cap.err and "names: native" in cap.err


# ---- malformed inputs ---------------------------------------------------------------------------------------------

def _shard_of(d: Path, name: str) -> str:
    return json.loads((d / INDEX_NAME).read_text())["weight_map"][name]


def _break_missing(d):
    _rewrite(d, lambda t, f: {k: v for k, v in t.items() if k != "layers.1.attn.wkv.weight"})
    return INDEX_NAME, "layers.1.attn.wkv.weight", "missing 1 tensors"


def _break_unexpected(d):
    f0 = _shard_of(d, "embed.weight")
    _rewrite(d, lambda t, f: {**t, "layers.0.attn.bogus.weight": torch.zeros(2)} if f == f0 else t)
    return f0, "layers.0.attn.bogus.weight", "unexpected"


def _break_shape(d):
    f0 = _shard_of(d, "layers.2.attn.q_norm.weight")
    _rewrite(d, lambda t, f: {**t, "layers.2.attn.q_norm.weight": torch.ones(31, dtype=torch.bfloat16)}
             if f == f0 else t)
    return f0, "layers.2.attn.q_norm.weight", r"shape \[31\].*expects \[128\].*q_lora_rank=128"


def _break_dtype(d):
    f0 = _shard_of(d, "layers.1.attn.wq_a.weight")
    _rewrite(d, lambda t, f: {**t, "layers.1.attn.wq_a.weight": t["layers.1.attn.wq_a.weight"].float()}
             if f == f0 else t)
    return f0, "layers.1.attn.wq_a.weight", "dtype F32, expected an FP8"


def _break_scale_dtype(d):
    name = "layers.2.ffn.experts.3.w1.scale"
    f0 = _shard_of(d, name)
    _rewrite(d, lambda t, f: {**t, name: torch.zeros(t[name].shape, dtype=torch.int64)} if f == f0 else t)
    return f0, name, "dtype I64, expected a scale"


def _break_truncated(d):
    f0 = _shard_of(d, "embed.weight")
    raw = (d / f0).read_bytes()
    (d / f0).write_bytes(raw[: len(raw) // 2])
    return f0, r"tensor '[\w.]+' needs bytes", "truncated"


def _break_garbage_header(d):
    f0 = _shard_of(d, "embed.weight")
    raw = (d / f0).read_bytes()
    (d / f0).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json at all!" + raw[24:])
    return f0, "it should hold tensor '", "not valid JSON"


def _break_huge_header_length(d):
    f0 = _shard_of(d, "embed.weight")
    raw = (d / f0).read_bytes()
    (d / f0).write_bytes(b"\xff" * 8 + raw[8:])
    return f0, "it should hold tensor '", "garbage header"


def _break_missing_shard(d):
    f0 = _shard_of(d, "embed.weight")
    (d / f0).unlink()
    return f0, "for tensor '", "points at missing shard"


def _break_index_lists_absent_tensor(d):
    index = json.loads((d / INDEX_NAME).read_text())
    f0 = index["weight_map"]["embed.weight"]
    index["weight_map"]["layers.0.attn.ghost.weight"] = f0
    (d / INDEX_NAME).write_text(json.dumps(index))
    return INDEX_NAME, "layers.0.attn.ghost.weight", f"is in {f0}, but"


def _break_corrupt_index(d):
    (d / INDEX_NAME).write_text('{"weight_map": ')
    return INDEX_NAME, "", "corrupt index"


def _break_missing_config(d):
    (d / "config.json").unlink()
    return "config.json", "", "missing config.json"


def _break_no_index(d):
    (d / INDEX_NAME).unlink()
    return "", "", r"no model\.safetensors\.index\.json and no model\.safetensors \(found model-00001"


def _break_more_experts_on_disk(d):
    raw = json.loads((d / "config.json").read_text())
    raw["n_routed_experts"] = 6
    (d / "config.json").write_text(json.dumps(raw))
    return "model-", r"experts\.[67]\.", "n_routed_experts=6 .*experts 0..7"


def _break_hidden_size(d):
    raw = json.loads((d / "config.json").read_text())
    raw["hidden_size"] = 256
    (d / "config.json").write_text(json.dumps(raw))
    return "model-", "tensor '", "hidden_size=256"


def _break_quant_config(d):
    raw = json.loads((d / "config.json").read_text())
    del raw["quantization_config"]
    (d / "config.json").write_text(json.dumps(raw))
    return "model-", "tensor '", "quantization_config"


def _break_merged_hf_experts(d):
    f0 = _shard_of(d, "embed.weight")
    _rewrite(d, lambda t, f: {**t, "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(1)} if f == f0 else t)
    return f0, "model.layers.0.mlp.experts.gate_up_proj", "merged"


def _poke(d: Path, name: str, edit) -> str:
    """Rewrite the one tensor `name` through `edit(tensor) -> tensor`; returns its shard."""
    f0 = _shard_of(d, name)
    _rewrite(d, lambda t, f: {**t, name: edit(t[name].clone())} if f == f0 else t)
    return f0


def _set_byte(t: torch.Tensor, i: int, byte: int) -> torch.Tensor:
    t.view(torch.uint8).view(-1)[i] = byte
    return t


def _break_nan_e8m0_scale(d):
    name = "layers.1.attn.wq_b.scale"
    return _poke(d, name, lambda t: _set_byte(t, 0, 0xFF)), name, r"1 NaN/inf value \(first at index \[0, 0\]\)"


def _break_inf_float_scale(d):
    name = "layers.2.ffn.experts.3.w2.scale"
    def edit(t: torch.Tensor) -> torch.Tensor:  # stored as F32 (allowed), one value inf
        f = quant.e8m0_to_float(t)
        f[2, 0] = float("inf")
        return f
    return _poke(d, name, edit), name, r"\(float32 \[\d+, \d+\]\) holds 1 NaN/inf value \(first at index \[2, 0\]\)"


def _break_nan_fp8_weight(d):
    name = "layers.1.attn.wq_a.weight"  # 0x7F and 0xFF are e4m3fn's two NaN encodings
    return _poke(d, name, lambda t: _set_byte(_set_byte(t, 5, 0x7F), 9, 0xFF)), name, "holds 2 NaN/inf values"


def _break_wrong_shard(d):
    index = json.loads((d / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    actual = index["weight_map"]["embed.weight"]
    other = next(f for f in files if f != actual)
    index["weight_map"]["embed.weight"] = other
    (d / INDEX_NAME).write_text(json.dumps(index))
    return INDEX_NAME, "embed.weight", rf"is in {other}, but .* \(it is in {actual}\)"


def _break_nan_bf16_norm(d):  # was loaded: every logit NaN
    name = "layers.0.attn_norm.weight"
    def edit(t: torch.Tensor) -> torch.Tensor:
        t[3] = float("nan")
        return t
    return _poke(d, name, edit), name, r"\(bfloat16 \[128\]\) holds 1 NaN/inf value \(first at index \[3\]\)"


def _tid2eid(value: int):
    def brk(d):  # was loaded: the first prompt holding token 5 failed mid-run with an index error
        name = "layers.0.ffn.gate.tid2eid"
        def edit(t: torch.Tensor) -> torch.Tensor:
            t[5, 1] = value
            return t
        return _poke(d, name, edit), name, rf"routes token 5 to expert {value}, outside \[0, n_routed_experts=8\)"
    brk.__name__ = f"_break_tid2eid_{value}".replace("-", "minus")
    return brk


def _break_plain_fp8_weight(d):  # DeepSeek's convert.py layout: wo_a dequantised to BF16, no scale
    name = "layers.1.attn.wo_a"
    f0 = _shard_of(d, name + ".weight")
    def edit(t, f):
        if f != f0:
            return t
        t = {**t, name + ".weight": quant.dequantize(t[name + ".weight"], t[name + ".scale"]).bfloat16()}
        del t[name + ".scale"]
        return t
    _rewrite(d, edit)
    return f0, name + r"\.weight' is BF16 without the scale '" + name, r"load with weights='bf16'"


def _config_value(key: str, value):
    def brk(d):
        raw = json.loads((d / "config.json").read_text())
        raw[key] = value
        (d / "config.json").write_text(json.dumps(raw))
        return "config.json", f"config key '{key}'", "must be"
    brk.__name__ = f"_break_{key}_{value}"
    return brk


BREAKS = [_break_missing, _break_unexpected, _break_shape, _break_dtype, _break_scale_dtype, _break_truncated,
          _break_garbage_header, _break_huge_header_length, _break_missing_shard, _break_index_lists_absent_tensor,
          _break_corrupt_index, _break_missing_config, _break_no_index, _break_more_experts_on_disk,
          _break_hidden_size, _break_quant_config, _break_merged_hf_experts, _break_nan_e8m0_scale,
          _break_inf_float_scale, _break_nan_fp8_weight, _break_wrong_shard, _config_value("rms_norm_eps", 0),
          _config_value("rope_theta", -1.0), _config_value("rope_theta", "abc"), _config_value("hc_eps", "1e-6"),
          _config_value("compress_rope_theta", 0), _config_value("hidden_size", "64"),
          _config_value("rope_scaling", "yarn"), _config_value("quantization_config", "fp8"),
          _break_nan_bf16_norm, _tid2eid(8), _tid2eid(-1), _break_plain_fp8_weight]  # were: ignored / an
# AttributeError text ("'str' object has no attribute 'get'") not naming the key


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__[len("_break_"):])
def test_malformed_snapshot_errors_name_file_and_tensor(ckpt, tmp_path, breaker):
    d = _copy(ckpt, tmp_path / "broken")
    file_part, tensor_part, what = breaker(d)
    with pytest.raises(CheckpointError) as ei:
        _load(d)
    msg = str(ei.value)
    assert isinstance(ei.value, WeightError)
    assert str(d) in msg and file_part in msg, msg
    assert re.search(tensor_part, msg), msg
    assert re.search(what, msg), msg


def test_plain_fp8_weight_loads_with_weights_bf16(ckpt, tmp_path):
    """DeepSeek's convert.py layout (wo_a dequantised to BF16, no scale) is refused in native mode (above) and loads
    with weights='bf16', equal to the official files: e4m3 x 2^k is exact in bf16."""
    d = _copy(ckpt, tmp_path / "plain")
    _break_plain_fp8_weight(d)
    assert torch.equal(_load(d, weights="bf16")(_ids()), _load(ckpt, weights="bf16")(_ids()))


def test_weights_mode_is_checked(ckpt):
    with pytest.raises(ValueError, match="weights must be"):
        _load(ckpt, weights="fp16")


def test_assign_tensors_float_scales_into_expert_stacks():
    # In memory too: fp32 expert scales that are powers of two stay e8m0; others move the stack to fp32.
    from dsv4_ascend.model import WeightFormats

    cfg = preset("tiny")
    t = official_tensors(cfg, SEED)
    m = Transformer(cfg, ReferenceBackend(), torch.float32, WeightFormats.from_config(cfg))
    t = {k: (quant.e8m0_to_float(v) if v.dtype == torch.float8_e8m0fnu else v) for k, v in t.items()}
    assign_tensors(m, t.items())
    assert m.layers[0].ffn.routed.w1_scale.dtype == torch.float8_e8m0fnu
    t["layers.0.ffn.experts.1.w1.scale"] = t["layers.0.ffn.experts.1.w1.scale"] * 1.5
    assign_tensors(m, t.items())
    s = m.layers[0].ffn.routed.w1_scale
    assert s.dtype == torch.float32
    assert torch.equal(s[1], t["layers.0.ffn.experts.1.w1.scale"])
    assert torch.equal(s[0], t["layers.0.ffn.experts.0.w1.scale"])  # earlier e8m0 values kept exactly


def test_fp8_byte_check_is_what_catches_nan_weights(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "nan8")
    _break_nan_fp8_weight(d)
    with pytest.raises(CheckpointError, match="layers.1.attn.wq_a.weight"):
        _load(d)
    model = _load(d, check_weights=False)  # switched off: the NaN bytes load as they are
    w = model.layers[1].attn.wq_a.weight
    assert w.dtype == torch.float8_e4m3fn and torch.isnan(w.float()).sum() == 2


def test_each_shard_is_unmapped_when_its_tensors_are_done(ckpt):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux /proc to see the mappings")
    shards = sorted(ckpt.glob("*.safetensors"))
    infos = sorted((i for p in shards for i in read_safetensors_header(p).values()),
                   key=lambda i: (str(i.file), i.start))

    def mapped() -> set[str]:
        text = maps.read_text()
        return {p.name for p in shards if str(p) in text}

    seen = []
    for k, t, _ in stream_tensors([(i, None) for i in infos], "test", progress=False):
        seen.append((infos[k].file.name, mapped()))
        del t
    assert mapped() == set()
    # while a later shard streams, the earlier ones are no longer mapped (only the current one is)
    assert len(shards) >= 2 and all(now <= {cur} for cur, now in seen), seen


@pytest.mark.parametrize("name", ["v4-flash", "v4-pro"])
def test_released_configs_build_on_meta_with_the_official_formats(name):
    """The released configs (presets equal to the hub config.json files) read back from their native config.json
    form and build on the meta device (no memory) with the tensors of docs/checkpoint-format.md §1: FP8 linears
    with 128x128 e8m0 scales, MXFP4 experts packed two per byte with 1x32 scales, BF16 embeddings."""
    from dsv4_ascend.backend import Backend
    from dsv4_ascend.model import WeightFormats

    cfg = preset(name)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    meta = Transformer(cfg, Backend(), torch.bfloat16, WeightFormats.from_config(cfg), device="meta")
    got = {n: (t.dtype, tuple(t.shape)) for n, t in meta.checkpoint_tensors()}
    d, q, inter = cfg.hidden_size, cfg.q_lora_rank, cfg.moe_intermediate_size
    assert got["embed.weight"] == got["head.weight"] == (torch.bfloat16, (cfg.vocab_size, d))
    assert got["layers.2.attn.wq_a.weight"] == (torch.float8_e4m3fn, (q, d))
    assert got["layers.2.attn.wq_a.scale"] == (torch.float8_e8m0fnu, (q // 128, d // 128))
    assert got["layers.3.ffn.experts.5.w1.weight"] == (torch.int8, (inter, d // 2))
    assert got["layers.3.ffn.experts.5.w1.scale"] == (torch.float8_e8m0fnu, (inter, d // 32))
    assert got["layers.0.ffn.gate.tid2eid"] == (torch.int64, (cfg.vocab_size, cfg.num_experts_per_tok))
    assert any(n.startswith("mtp.0.") for n in got)
    assert not any(n.startswith(f"layers.{cfg.num_hidden_layers}.") for n in got)
