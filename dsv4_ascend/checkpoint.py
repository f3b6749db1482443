"""Loading official DeepSeek-V4 snapshots: safetensors shards read lazily, tensor by tensor, with clear errors.

A snapshot directory holds `config.json` and either `model.safetensors.index.json` + the shards it names, or a
single `model.safetensors`. `load_checkpoint` first reads only the JSON headers of the shards and checks every
name, dtype and shape against the model that `config.json` describes (so a bad snapshot fails before any weight
is read, with a message naming the file and the tensor), then copies the tensors it needs one by one from
memory-mapped files (`safetensors.safe_open`; never pickle, never a whole shard at once). Routed experts outside
`expert_range` and MTP blocks beyond `n_mtp` are never read.

Names: the official files use DeepSeek's native names (`layers.3.attn.wq_a.weight`, `.scale`). transformers'
spelling (`model.layers.3.self_attn.q_a_proj.weight`, `.weight_scale_inv`, `e_score_correction_bias`, ...) is
accepted too, wherever it maps 1:1 onto a native name (`native_name`); transformers' merged 3-D expert tensors
are refused with a clear error. The load report says which spelling was found.
Formats: see docs/checkpoint-format.md. `.scale` may be F8_E8M0 (official), U8 (raw e8m0 bytes) or F32/BF16/F16;
packed FP4 experts may be I8 (official), U8 or F4.
"""
from __future__ import annotations

import json
import re
import struct
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from typing import Iterator

import torch
from torch import Tensor

from . import quant
from .backend import Backend
from .config import ConfigError, ModelConfig, load_config
from .weights import WeightError, put_tensor

__all__ = ["CheckpointError", "TensorInfo", "CheckpointScan", "LoadReport", "read_safetensors_header",
           "scan_checkpoint", "native_name", "hf_name", "load_checkpoint", "INDEX_NAME", "SINGLE_NAME"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header

_FLOAT4_X2 = getattr(torch, "float4_e2m1fn_x2", None)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
if _FLOAT4_X2 is not None:
    _ST_DTYPES["F4"] = _FLOAT4_X2
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_FLOAT_ST = ("F32", "BF16", "F16")
_SCALE_ST = ("F8_E8M0", "U8") + _FLOAT_ST
_FP4_ST = ("I8", "U8", "F4")


class CheckpointError(WeightError):
    """A snapshot file is missing, truncated or corrupt, or disagrees with config.json / the model."""


# ---- safetensors headers ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it (nothing is read yet)."""

    file: Path
    key: str  # the name as stored
    dtype: str  # safetensors dtype string, e.g. "F8_E4M3"
    shape: tuple[int, ...]  # as stored in the header (F4: the logical fp4 count)
    start: int  # absolute byte offsets of the data in the file
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return _ST_DTYPES[self.dtype]

    @property
    def packed_shape(self) -> tuple[int, ...]:
        """The shape of the tensor we read: F4 packs two values per byte along the last dim."""
        if self.dtype == "F4":
            return (*self.shape[:-1], self.shape[-1] // 2)
        return self.shape

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _itembits(dtype: str) -> int:
    return 4 if dtype == "F4" else torch.empty(0, dtype=_ST_DTYPES[dtype]).element_size() * 8


def read_safetensors_header(path: str | Path, expect: str | None = None) -> dict[str, TensorInfo]:
    """Parse and validate one file's header: key -> TensorInfo. Raises CheckpointError naming the file (and
    `expect`, a tensor the index places in this file, when the header is unreadable)."""
    path = Path(path)
    hint = f" (it should hold tensor '{expect}')" if expect else ""

    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors file{hint}: {msg}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"file is {size} bytes, too short for a header (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise bad(f"header length field says {n} bytes but the file has {size} bytes (garbage header "
                          "or truncated file)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read{hint}: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for key, ent in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = ent["dtype"], tuple(ent["shape"]), ent["data_offsets"]
            ok = all(isinstance(v, int) and v >= 0 for v in (*shape, a, b)) and b >= a
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"malformed header entry for tensor '{key}': {ent!r}")
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor '{key}' has dtype {dtype}, which this loader does not know "
                                  f"(known: {', '.join(sorted(_ST_DTYPES))})")
        numel = 1
        for d in shape:
            numel *= d
        if numel * _itembits(dtype) != (b - a) * 8:
            raise bad(f"tensor '{key}' ({dtype} {list(shape)}) needs {numel * _itembits(dtype) // 8} bytes but "
                      f"its data_offsets span {b - a}")
        if b > data_len:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor '{key}' needs bytes {a}..{b} of the data section, "
                f"which holds only {data_len} bytes (file size {size}); re-download or re-write this shard")
        out[key] = TensorInfo(path, key, dtype, shape, data_start + a, data_start + b)
    spans = sorted((t.start, t.end, t.key) for t in out.values())
    for (a0, b0, k0), (a1, b1, k1) in zip(spans, spans[1:]):
        if a1 < b0:
            raise bad(f"tensors '{k0}' and '{k1}' overlap in the data section")
    end = max((t.end for t in out.values()), default=data_start)
    if end != size:
        raise bad(f"{size - end} bytes after the last tensor's data (data section mis-sized)")
    return out


# ---- names ------------------------------------------------------------------------------------------------------

# transformers (HF) module path -> native module path, after `model.layers.{i}.` / `layers.{i}.`
# (from transformers 5.23's deepseek_v4 conversion mapping; see docs/checkpoint-format.md §1).
_HF_MODULES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_a_proj": "attn.wq_a",
    "self_attn.q_a_norm": "attn.q_norm",
    "self_attn.q_b_proj": "attn.wq_b",
    "self_attn.kv_proj": "attn.wkv",
    "self_attn.kv_norm": "attn.kv_norm",
    "self_attn.o_a_proj": "attn.wo_a",
    "self_attn.o_b_proj": "attn.wo_b",
    "self_attn.compressor.kv_proj": "attn.compressor.wkv",
    "self_attn.compressor.gate_proj": "attn.compressor.wgate",
    "self_attn.compressor.kv_norm": "attn.compressor.norm",
    "self_attn.compressor.indexer.q_b_proj": "attn.indexer.wq_b",
    "self_attn.compressor.indexer.scorer.weights_proj": "attn.indexer.weights_proj",
    "self_attn.compressor.indexer.kv_proj": "attn.indexer.compressor.wkv",
    "self_attn.compressor.indexer.gate_proj": "attn.indexer.compressor.wgate",
    "self_attn.compressor.indexer.kv_norm": "attn.indexer.compressor.norm",
    "mlp.shared_experts.gate_proj": "ffn.shared_experts.w1",
    "mlp.shared_experts.up_proj": "ffn.shared_experts.w3",
    "mlp.shared_experts.down_proj": "ffn.shared_experts.w2",
}
# HF parameter leaf -> native parameter leaf (same prefix).
_HF_LEAVES = {
    "attn_hc.fn": "hc_attn_fn", "attn_hc.base": "hc_attn_base", "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn", "ffn_hc.base": "hc_ffn_base", "ffn_hc.scale": "hc_ffn_scale",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
}
_HF_TOP = {
    "embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base",
    "hc_head.hc_scale": "hc_head_scale",
}
_HF_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_BLOCK_RE = re.compile(r"^(layers|mtp)\.(\d+)\.(.+)$")
_EXPERT_HF_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(.+)$")
_MERGED_RE = re.compile(r"(^|\.)(mlp|ffn)\.experts\.(gate_up_proj|down_proj)")


def native_name(key: str) -> str:
    """The native (official) name of a stored tensor name; native names map to themselves.

    Only 1:1 renames: `model.` prefix, transformers' module names, `weight_scale_inv` -> `scale`,
    `e_score_correction_bias` -> `bias`, per-expert `mlp.experts.E.{gate,up,down}_proj` -> `ffn.experts.E.w{1,3,2}`,
    and DeepSeek converter-style `self_attn` -> `attn`, `mlp` -> `ffn`.
    """
    n = key
    if n.endswith(".weight_scale_inv"):
        n = n[: -len("weight_scale_inv")] + "scale"
    if n.startswith("model."):
        n = n[len("model."):]
    if n in _HF_TOP:
        return _HF_TOP[n]
    m = _BLOCK_RE.match(n)
    if not m:
        return n
    kind, i, leaf = m.groups()
    if leaf in _HF_LEAVES:
        leaf = _HF_LEAVES[leaf]
    else:
        for hf in sorted(_HF_MODULES, key=len, reverse=True):
            if leaf.startswith(hf + "."):
                leaf = _HF_MODULES[hf] + leaf[len(hf):]
                break
        else:
            e = _EXPERT_HF_RE.match(leaf)
            if e:
                leaf = f"ffn.experts.{e.group(1)}.{_HF_EXPERT[e.group(2)]}.{e.group(3)}"
    if leaf.startswith("self_attn."):
        leaf = "attn." + leaf[len("self_attn."):]
    if leaf.startswith("mlp."):
        leaf = "ffn." + leaf[len("mlp."):]
    if leaf.endswith(".e_score_correction_bias"):
        leaf = leaf[: -len("e_score_correction_bias")] + "bias"
    return f"{kind}.{i}.{leaf}"


def hf_name(native: str) -> str:
    """transformers' spelling of a native name (inverse of `native_name`; `.scale` -> `.weight_scale_inv`).

    MTP blocks have no transformers names: they keep their native names under a `model.` prefix. Routed experts
    get the per-expert spelling `mlp.experts.E.{gate,up,down}_proj` (transformers itself merges them).
    """
    n = native
    if n.endswith(".scale"):  # a linear's scale (mHC scales are `hc_*_scale`, no dot)
        n = n[: -len("scale")] + "weight_scale_inv"
    if n == "head.weight":
        return "lm_head.weight"
    top = {v: k for k, v in _HF_TOP.items()}
    if n in top:
        return "model." + top[n]
    m = _BLOCK_RE.match(n)
    if not m or m.group(1) == "mtp":
        return "model." + n
    i, leaf = m.group(2), m.group(3)
    leaves = {v: k for k, v in _HF_LEAVES.items()}
    mods = {v: k for k, v in _HF_MODULES.items()}
    e = re.match(r"^ffn\.experts\.(\d+)\.(w[123])\.(.+)$", leaf)
    if leaf in leaves:
        leaf = leaves[leaf]
    elif e:
        proj = {v: k for k, v in _HF_EXPERT.items()}[e.group(2)]
        leaf = f"mlp.experts.{e.group(1)}.{proj}.{e.group(3)}"
    else:
        for nat in sorted(mods, key=len, reverse=True):
            if leaf.startswith(nat + "."):
                leaf = mods[nat] + leaf[len(nat):]
                break
        else:
            if leaf.startswith("ffn."):
                leaf = "mlp." + leaf[len("ffn."):]
    return f"model.layers.{i}.{leaf}"


# ---- scanning a snapshot ----------------------------------------------------------------------------------------

@dataclass
class CheckpointScan:
    """What a snapshot directory holds, from config.json and the shard headers only."""

    model_dir: Path
    config_path: Path
    config: ModelConfig
    layout: str  # "sharded" (index json + shards) or "single" (model.safetensors)
    source: Path  # the index json, or the single file: where "the checkpoint" lists its tensors
    tensors: dict[str, TensorInfo]  # native name -> where it is stored
    renamed: int  # how many stored names were not native

    @property
    def spelling(self) -> str:
        """'native', 'hf' (every name in transformers' spelling) or 'mixed'."""
        if not self.renamed:
            return "native"
        return "hf" if self.renamed == len(self.tensors) else "mixed"


def scan_checkpoint(model_dir: str | Path, config: ModelConfig | None = None) -> CheckpointScan:
    """Read config.json, the index (if any) and every shard header; check they agree with each other.

    `config`: use this instead of parsing config.json (dsv4_ascend.convert reads converted checkpoints, whose
    quantization_config ModelConfig does not accept)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory (expected a model snapshot with config.json and "
                              "safetensors files)")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing config.json (a snapshot holds config.json next to its "
                              "safetensors shards)")
    try:
        cfg = config if config is not None else load_config(cfg_path)
    except ConfigError as e:
        msg = str(e)
        raise CheckpointError(msg if str(cfg_path) in msg else f"{cfg_path}: {msg}") from e
    index_path, single = d / INDEX_NAME, d / SINGLE_NAME
    stored: dict[str, TensorInfo] = {}
    if index_path.is_file():
        layout, source = "sharded", index_path
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: corrupt index ({type(e).__name__}: {e})") from None
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
        for fname, keys in sorted(by_file.items()):
            path = d / fname
            if not path.is_file():
                more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
                raise CheckpointError(f"{index_path}: points at missing shard {path} (for tensor '{keys[0]}'"
                                      f"{more})")
            header = read_safetensors_header(path, expect=keys[0])
            for key in keys:
                if key not in header:
                    raise CheckpointError(f"{index_path}: says tensor '{key}' is in {fname}, but {path} does "
                                          "not hold it")
            extra = sorted(set(header) - set(keys))
            if extra:
                raise CheckpointError(f"{path}: holds tensor '{extra[0]}', which {index_path} does not list "
                                      f"({len(extra)} such tensors)")
            stored.update(header)
    elif single.is_file():
        layout, source = "single", single
        stored = read_safetensors_header(single)
    else:
        found = sorted(p.name for p in d.glob("*.safetensors"))
        raise CheckpointError(f"{d}: no {INDEX_NAME} and no {SINGLE_NAME}"
                              + (f" (found {', '.join(found[:5])}: the index json is missing)" if found else ""))
    tensors: dict[str, TensorInfo] = {}
    renamed = 0
    for key in sorted(stored):
        info = stored[key]
        if _MERGED_RE.search(key):
            raise CheckpointError(f"{info.file}: tensor '{key}' is transformers' merged 3-D expert layout, which "
                                  "does not map 1:1 onto the official per-expert tensors; use the official "
                                  "snapshot (per-expert `ffn.experts.E.w1/w2/w3`)")
        name = native_name(key)
        if name in tensors:
            other = tensors[name]
            raise CheckpointError(f"{info.file}: tensor '{key}' and '{other.key}' (in {other.file}) both mean "
                                  f"'{name}'")
        renamed += name != key
        tensors[name] = info
    return CheckpointScan(d, cfg_path, cfg, layout, source, tensors, renamed)


# ---- planning: every check from headers only ---------------------------------------------------------------------

@dataclass
class _Job:
    name: str  # native target name
    info: TensorInfo
    scale: TensorInfo | None = None  # set when the weight is dequantised at load


_HINT_KEYS = ("vocab_size", "hidden_size", "moe_intermediate_size", "n_routed_experts", "num_attention_heads",
              "head_dim", "q_lora_rank", "o_lora_rank", "o_groups", "index_n_heads", "index_head_dim",
              "num_experts_per_tok", "hc_mult", "qk_rope_head_dim")


def _shape_hint(cfg: ModelConfig, want: tuple[int, ...], got: tuple[int, ...]) -> str:
    parts = []
    for i, (w, g) in enumerate(zip(want, got)):
        if w != g:
            keys = [f"{k}={w}" for k in _HINT_KEYS if getattr(cfg, k) == w]
            parts.append(f"dim {i}: expected {w}" + (f" ({', '.join(keys)})" if keys else "") + f", found {g}")
    if len(want) != len(got):
        parts.append(f"rank {len(want)} expected, found {len(got)}")
    return "; ".join(parts)


def _plan(scan: CheckpointScan, targets: dict[str, tuple[torch.dtype, tuple[int, ...]]],
          expert_range: tuple[int, int] | None, n_mtp: int, dequantize: bool) -> tuple[list[_Job], int]:
    """Match stored tensors to the model's parameters; raise on anything wrong. Returns (jobs, skipped)."""
    cfg, cfg_path = scan.config, scan.config_path
    first, end = expert_range or (0, cfg.n_routed_experts)
    max_expert = max((int(m.group(1)) for n in scan.tensors if (m := re.search(r"\.experts\.(\d+)\.", n))),
                     default=-1)

    def what(info: TensorInfo, name: str) -> str:
        return f"{info.file}: tensor '{info.key}'" + (f" (read as '{name}')" if name != info.key else "")

    jobs: dict[str, _Job] = {}
    consumed: set[str] = set()
    skipped = 0
    for name, info in scan.tensors.items():
        blk = _BLOCK_RE.match(name)
        if blk and blk.group(1) == "layers" and int(blk.group(2)) >= cfg.num_hidden_layers:
            raise CheckpointError(f"{what(info, name)} belongs to layer {blk.group(2)}, but {cfg_path} says "
                                  f"num_hidden_layers={cfg.num_hidden_layers}; config.json and weights disagree")
        if blk and blk.group(1) == "mtp" and int(blk.group(2)) >= cfg.num_nextn_predict_layers:
            raise CheckpointError(f"{what(info, name)} belongs to MTP block {blk.group(2)}, but {cfg_path} says "
                                  f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}; config.json and "
                                  "weights disagree")
        ex = re.search(r"\.experts\.(\d+)\.", name)
        if ex and int(ex.group(1)) >= cfg.n_routed_experts:
            raise CheckpointError(f"{what(info, name)} belongs to routed expert {ex.group(1)}, but {cfg_path} says "
                                  f"n_routed_experts={cfg.n_routed_experts} (the weights have experts 0.."
                                  f"{max_expert}); config.json and weights disagree")
        if (blk and blk.group(1) == "mtp" and int(blk.group(2)) >= n_mtp) or \
                (ex and not first <= int(ex.group(1)) < end):
            skipped += 1  # another rank's experts, or an MTP block this model does not build
            continue
        if name in targets:
            jobs[name] = _Job(name, info)
        elif dequantize and name.endswith(".scale") and name[: -len("scale")] + "weight" in targets:
            consumed.add(name)  # checked with its weight below
        elif name.endswith(".scale") and name[: -len("scale")] + "weight" in targets:
            raise CheckpointError(f"{what(info, name)} is a quantisation scale, but the model built from {cfg_path} "
                                  "holds its weight unquantised (config.json's quantization_config / expert_dtype "
                                  "disagree with the weights); load with weights='bf16' or fix config.json")
        else:
            raise CheckpointError(f"{what(info, name)} is unexpected: the model built from {cfg_path} has no "
                                  "such parameter")
    missing = sorted(set(targets) - set(jobs))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{scan.source}: missing {len(missing)} tensors: {', '.join(missing[:5])}{more}; "
                              f"the model described by {cfg_path} needs them")

    for name, job in jobs.items():
        info, (tdt, tshape) = job.info, targets[name]
        st, shape = info.dtype, info.packed_shape
        quantised = st == "F8_E4M3" or (st in _FP4_ST and tdt not in (torch.int8, torch.uint8))
        if tdt in (torch.float32, torch.bfloat16, torch.float16) and quantised:
            sname = name[: -len("weight")] + "scale"
            scale = scan.tensors.get(sname)
            if not dequantize or not name.endswith(".weight") or scale is None:
                why = (f"has no scale tensor '{sname}'" if dequantize else
                       f"but the model built from {cfg_path} expects a plain {tdt} weight (config.json's "
                       "quantization_config / expert_dtype disagree with the weights)")
                raise CheckpointError(f"{what(info, name)} is {st} {why}")
            n, k = tshape
            if st == "F8_E4M3":
                want, swant = (n, k), (-(-n // 128), -(-k // 128))
            else:
                want, swant = (n, k // 2), (n, k // 32)
            if shape != want:
                raise CheckpointError(f"{what(info, name)} has shape {list(shape)}, but dequantising to the model's "
                                      f"{list(tshape)} needs {list(want)} ({_shape_hint(scan.config, want, shape)})")
            if scale.dtype not in _SCALE_ST or scale.packed_shape != swant:
                raise CheckpointError(f"{what(scale, sname)} is {scale.dtype} {list(scale.packed_shape)}, expected "
                                      f"one of {'/'.join(_SCALE_ST)} {list(swant)} for {st} weight '{info.key}'")
            consumed.discard(sname)
            job.scale = scale
            continue
        if tdt == torch.float8_e4m3fn:
            ok = st == "F8_E4M3"
            fix = "an FP8 e4m3 weight (F8_E4M3); load with weights='bf16' to accept a plain weight"
        elif tdt == torch.int8:
            ok = st in _FP4_ST
            fix = (f"packed FP4 (I8/U8/F4) because {cfg_path} says expert_dtype={cfg.expert_dtype!r}; load "
                   "with weights='bf16' or fix expert_dtype")
        elif tdt == torch.float8_e8m0fnu:
            ok = st in _SCALE_ST
            fix = f"a scale ({'/'.join(_SCALE_ST)})"
        elif tdt == torch.int64:
            ok = st in ("I64", "I32")
            fix = "I64"
        else:
            ok = st in _FLOAT_ST
            fix = f"a float ({'/'.join(_FLOAT_ST)})"
        if not ok:
            raise CheckpointError(f"{what(info, name)} has dtype {st}, expected {fix}")
        if shape != tshape:
            raise CheckpointError(f"{what(info, name)} has shape {list(shape)}, but the model built from "
                                  f"{cfg_path} expects {list(tshape)} ({_shape_hint(scan.config, tshape, shape)}); "
                                  "config.json and weights disagree")
    if consumed:  # a .scale whose weight is plain on disk
        name = sorted(consumed)[0]
        raise CheckpointError(f"{what(scan.tensors[name], name)} is unexpected: its weight is not quantised")
    order = sorted(jobs.values(), key=lambda j: (str(j.info.file), j.info.start))
    return order, skipped


# ---- loading ----------------------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What `load_checkpoint` did (kept as `model.load_report`)."""

    model_dir: Path
    layout: str
    spelling: str  # 'native', 'hf' or 'mixed'
    renamed: int
    weights: str
    loaded: int
    skipped: int
    bytes_read: int
    scale_dtypes: dict[str, int] = field(default_factory=dict)  # stored `.scale` dtype -> count

    def summary(self) -> str:
        scales = ", ".join(f"{k} x{v}" for k, v in sorted(self.scale_dtypes.items())) or "none"
        return (f"loaded {self.loaded} tensors ({self.bytes_read / 2**20:.1f} MiB) from {self.model_dir} "
                f"[{self.layout}; names: {self.spelling}"
                + (f", {self.renamed} renamed" if self.renamed else "")
                + f"; scales: {scales}; weights: {self.weights}; skipped {self.skipped}]")


def _read(handles: dict[Path, object], stack: ExitStack, info: TensorInfo) -> Tensor:
    from safetensors import safe_open

    try:
        h = handles.get(info.file)
        if h is None:
            h = handles[info.file] = stack.enter_context(safe_open(str(info.file), framework="pt", device="cpu"))
        t = h.get_tensor(info.key)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{info.file}: cannot read tensor '{info.key}': {e}") from e
    if info.dtype == "F4":
        t = t.view(torch.uint8)
    return t


def stream_tensors(items: list[tuple[TensorInfo, TensorInfo | None]], desc: str,
                   progress: bool = True) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    """Read tensors one at a time from memory-mapped shards, in order, with a byte progress bar on stderr.

    Each item is (tensor, its FP8/FP4 scale or None); yields (index, tensor, scale) with raw-byte scales viewed
    as e8m0. Shards stay open until the stream ends; nothing else is held.
    """
    from tqdm.auto import tqdm

    total = sum(i.nbytes + (si.nbytes if si else 0) for i, si in items)
    with ExitStack() as stack, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                                    disable=not progress, desc=desc, dynamic_ncols=True) as bar:
        handles: dict[Path, object] = {}
        current = None
        for k, (info, sinfo) in enumerate(items):
            if info.file != current:
                current = info.file
                bar.set_postfix_str(info.file.name, refresh=False)
            t = _read(handles, stack, info)
            sc = None
            if sinfo is not None:
                sc = _read(handles, stack, sinfo)
                if sc.dtype == torch.uint8:
                    sc = sc.view(torch.float8_e8m0fnu)
            yield k, t, sc
            bar.update(info.nbytes + (sinfo.nbytes if sinfo else 0))


def load_checkpoint(model_dir: str | Path, *, backend: Backend | None = None, dtype: torch.dtype = torch.bfloat16,
                    weights: str = "native", device: str | torch.device = "cpu",
                    expert_range: tuple[int, int] | None = None, n_mtp: int | None = None,
                    progress: bool = True):
    """Build the model `model_dir/config.json` describes and stream its weights in.

    weights="native": FP8 / packed FP4 stay as stored (dequantised per GEMM by the backend);
    weights="bf16": they are dequantised once, at load, to `dtype` (the name is the CLI's `--weights bf16`).
    `expert_range=(first, end)`: this rank's routed experts (others are never read). `n_mtp`: MTP blocks to build
    (default: config's num_nextn_predict_layers). `progress`: a tqdm bar on stderr and a one-line summary.
    Raises CheckpointError (a WeightError) naming the file and tensor for any malformed input.
    A directory written by `dsv4 convert --target a3` (int8 weights) is handed to `convert.load_converted`
    (it needs an AscendBackend(quant="w8a8"), or quant="w4a8" for `--experts w4a8`; `weights` does not apply).
    """
    from .convert import converted_target, load_converted
    from .model import Transformer, WeightFormats

    if converted_target(model_dir) == "a3":
        return load_converted(model_dir, backend, dtype=dtype, device=device, expert_range=expert_range,
                              n_mtp=n_mtp, progress=progress)

    if weights not in ("native", "bf16"):
        raise ValueError(f"weights must be 'native' or 'bf16', found {weights!r}")
    if backend is None:
        from .reference import ReferenceBackend

        backend = ReferenceBackend()
    scan = scan_checkpoint(model_dir)
    cfg = scan.config
    fmt = WeightFormats.from_config(cfg, dequantize=weights == "bf16")
    n_mtp = cfg.num_nextn_predict_layers if n_mtp is None else n_mtp
    meta = Transformer(cfg, Backend(), dtype, fmt, device="meta", n_mtp=n_mtp, expert_range=expert_range)
    targets_meta = {n: (t.dtype, tuple(t.shape)) for n, t in meta.checkpoint_tensors()}
    del meta
    jobs, skipped = _plan(scan, targets_meta, expert_range, n_mtp, weights == "bf16")

    model = Transformer(cfg, backend, dtype, fmt, device=device, n_mtp=n_mtp, expert_range=expert_range)
    targets = dict(model.checkpoint_tensors())
    report = LoadReport(scan.model_dir, scan.layout, scan.spelling, scan.renamed, weights, 0, skipped, 0)
    stream = stream_tensors([(j.info, j.scale) for j in jobs], f"loading {scan.model_dir.name}", progress)
    for k, src, scale in stream:
        job = jobs[k]
        info = job.info
        nbytes = info.nbytes
        name_is_scale = job.name.endswith(".scale")
        scale_info = job.scale if job.scale is not None else (info if name_is_scale else None)
        if scale_info is not None:  # the stored scale dtype, for the report
            report.scale_dtypes[scale_info.dtype] = report.scale_dtypes.get(scale_info.dtype, 0) + 1
        if scale is not None:
            dt = targets[job.name].dtype
            src = (quant.dequantize_fp8_block(src, scale, dt) if info.dtype == "F8_E4M3"
                   else quant.dequantize_fp4(src, scale, 32, dt))
            nbytes += job.scale.nbytes
        elif name_is_scale and src.dtype == torch.uint8:
            src = src.view(torch.float8_e8m0fnu)
        if put_tensor(model, targets, job.name, src, source=str(info.file), error=CheckpointError):
            targets = dict(model.checkpoint_tensors())
        report.loaded += 1
        report.bytes_read += nbytes
    model.eval()
    model.load_report = report
    if progress:
        print(report.summary(), file=sys.stderr)
    return model
