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
import sys
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import quant
from .backend import Backend
from .checkpoint_names import BLOCK_RE, MERGED_EXPERTS_RE, native_name
from .config import ConfigError, ModelConfig, load_config
from .safetensors_io import (FLOAT_DTYPES, FP4_DTYPES, INDEX_NAME, SCALE_DTYPES, SINGLE_NAME, CheckpointError,
                             TensorInfo, read_safetensors_header, stream_tensors)
from .weights import check_values, put_tensor

__all__ = ["CheckpointScan", "LoadJob", "LoadReport", "scan_checkpoint", "plan_load", "load_checkpoint"]

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

    `config`: use this instead of parsing config.json (dsv4_ascend.converted reads converted checkpoints, whose
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
        headers: dict[str, dict[str, TensorInfo]] = {}
        for fname, keys in sorted(by_file.items()):
            path = d / fname
            if not path.is_file():
                more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
                raise CheckpointError(f"{index_path}: points at missing shard {path} (for tensor '{keys[0]}'"
                                      f"{more})")
            headers[fname] = read_safetensors_header(path, expect=keys[0])
        holder = {key: fname for fname, header in headers.items() for key in header}
        for fname, keys in sorted(by_file.items()):
            for key in keys:
                if key not in headers[fname]:
                    where = (f"it is in {holder[key]}" if key in holder
                             else "no shard the index names holds it")
                    raise CheckpointError(f"{index_path}: says tensor '{key}' is in {fname}, but {d / fname} does "
                                          f"not hold it ({where})")
        for fname, header in sorted(headers.items()):
            extra = sorted(set(header) - set(by_file[fname]))
            if extra:
                named = weight_map.get(extra[0])
                said = f"the index names {named} for it" if named else "the index does not list it"
                raise CheckpointError(f"{d / fname}: holds tensor '{extra[0]}', but {said} ({len(extra)} such "
                                      f"tensors in {fname})")
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
        if MERGED_EXPERTS_RE.search(key):
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
class LoadJob:
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


def plan_load(scan: CheckpointScan, targets: dict[str, tuple[torch.dtype, tuple[int, ...]]],
          expert_range: tuple[int, int] | None, n_mtp: int, dequantize: bool) -> tuple[list[LoadJob], int]:
    """Match stored tensors to the model's parameters; raise on anything wrong. Returns (jobs, skipped)."""
    cfg, cfg_path = scan.config, scan.config_path
    first, end = expert_range or (0, cfg.n_routed_experts)
    max_expert = max((int(m.group(1)) for n in scan.tensors if (m := re.search(r"\.experts\.(\d+)\.", n))),
                     default=-1)

    def what(info: TensorInfo, name: str) -> str:
        return f"{info.file}: tensor '{info.key}'" + (f" (read as '{name}')" if name != info.key else "")

    jobs: dict[str, LoadJob] = {}
    consumed: set[str] = set()
    skipped = 0
    for name, info in scan.tensors.items():
        blk = BLOCK_RE.match(name)
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
            jobs[name] = LoadJob(name, info)
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
    for sname in missing:  # a plain float weight where an FP8 one (with its scale) is expected
        w = scan.tensors.get(sname[: -len("scale")] + "weight") if sname.endswith(".scale") else None
        if w is not None and w.dtype in FLOAT_DTYPES:
            raise CheckpointError(f"{what(w, sname[: -len('scale')] + 'weight')} is {w.dtype} without the scale "
                                  f"'{sname}' that {cfg_path} (quantization_config / expert_dtype) implies: a "
                                  "dequantised copy, as DeepSeek's convert.py writes wo_a; load with weights='bf16' "
                                  "(--weights bf16) to accept plain weights")
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{scan.source}: missing {len(missing)} tensors: {', '.join(missing[:5])}{more}; "
                              f"the model described by {cfg_path} needs them")

    for name, job in jobs.items():
        info, (tdt, tshape) = job.info, targets[name]
        st, shape = info.dtype, info.packed_shape
        quantised = st == "F8_E4M3" or (st in FP4_DTYPES and tdt not in (torch.int8, torch.uint8))
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
            if scale.dtype not in SCALE_DTYPES or scale.packed_shape != swant:
                raise CheckpointError(f"{what(scale, sname)} is {scale.dtype} {list(scale.packed_shape)}, expected "
                                      f"one of {'/'.join(SCALE_DTYPES)} {list(swant)} for {st} weight '{info.key}'")
            consumed.discard(sname)
            job.scale = scale
            continue
        if tdt == torch.float8_e4m3fn:
            ok = st == "F8_E4M3"
            fix = "an FP8 e4m3 weight (F8_E4M3); load with weights='bf16' to accept a plain weight"
        elif tdt == torch.int8:
            ok = st in FP4_DTYPES
            fix = (f"packed FP4 (I8/U8/F4) because {cfg_path} says expert_dtype={cfg.expert_dtype!r}; load "
                   "with weights='bf16' or fix expert_dtype")
        elif tdt == torch.float8_e8m0fnu:
            ok = st in SCALE_DTYPES
            fix = f"a scale ({'/'.join(SCALE_DTYPES)})"
        elif tdt == torch.int64:
            ok = st in ("I64", "I32")
            fix = "I64"
        else:
            ok = st in FLOAT_DTYPES
            fix = f"a float ({'/'.join(FLOAT_DTYPES)})"
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



def _check_expert_ids(info: TensorInfo, ids: torch.Tensor, n_experts: int, cfg_path: Path) -> None:
    """A hash layer's token -> expert table must name experts that exist (else the first prompt holding such a
    token fails mid-run with an index error, or a negative id silently picks another expert)."""
    bad = (ids < 0) | (ids >= n_experts)
    if bool(bad.any()):
        tok, k = (int(i) for i in torch.nonzero(bad)[0])
        raise CheckpointError(f"{info.file}: tensor '{info.key}' routes token {tok} to expert {int(ids[tok, k])}, "
                              f"outside [0, n_routed_experts={n_experts}) of {cfg_path} ({int(bad.sum())} such "
                              "entries); config.json and weights disagree or the checkpoint is damaged")


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


def load_checkpoint(model_dir: str | Path, *, backend: Backend | None = None, dtype: torch.dtype = torch.bfloat16,
                    weights: str = "native", device: str | torch.device = "cpu",
                    expert_range: tuple[int, int] | None = None, n_mtp: int | None = None,
                    progress: bool = True, check_weights: bool = True):
    """Build the model an official-format `model_dir/config.json` describes and stream its weights in.

    weights="native": FP8 / packed FP4 stay as stored (dequantised per GEMM by the backend);
    weights="bf16": they are dequantised once, at load, to `dtype` (the name is the CLI's `--weights bf16`).
    `expert_range=(first, end)`: this rank's routed experts (others are never read). `n_mtp`: MTP blocks to build
    (default: config's num_nextn_predict_layers). `progress`: a tqdm bar on stderr and a one-line summary.
    Every quantisation scale is checked for NaN/inf; `check_weights` also checks the FP8 weight bytes and the
    float (BF16/F16/F32) tensors (FP4 has no NaN encoding); every hash-routing table for expert ids in range.
    Raises CheckpointError (a WeightError) naming the file and tensor for any malformed input.
    Directories written by `dsv4 convert --target a3` are `converted.load_converted`'s; `loading.load_checkpoint`
    picks the right loader for any directory.
    """
    from .model import Transformer, WeightFormats

    if weights not in ("native", "bf16"):
        raise ValueError(f"weights must be 'native' or 'bf16', found {weights!r}")
    if backend is None:
        from .reference import ReferenceBackend

        backend = ReferenceBackend()
    scan = scan_checkpoint(model_dir)
    cfg = scan.config
    fmt = WeightFormats.from_config(cfg, dequantize=weights == "bf16")
    if n_mtp is None and scan.spelling != "native" and not any(n.startswith("mtp.") for n in scan.tensors):
        n_mtp = 0  # transformers' DeepseekV4ForCausalLM has no MTP block, so what it saves has none either
    n_mtp = cfg.num_nextn_predict_layers if n_mtp is None else n_mtp
    meta = Transformer(cfg, Backend(), dtype, fmt, device="meta", n_mtp=n_mtp, expert_range=expert_range)
    targets_meta = {n: (t.dtype, tuple(t.shape)) for n, t in meta.checkpoint_tensors()}
    del meta
    jobs, skipped = plan_load(scan, targets_meta, expert_range, n_mtp, weights == "bf16")

    model = Transformer(cfg, backend, dtype, fmt, device=device, n_mtp=n_mtp, expert_range=expert_range)
    targets = dict(model.checkpoint_tensors())
    report = LoadReport(scan.model_dir, scan.layout, scan.spelling, scan.renamed, weights, 0, skipped, 0)
    stream = stream_tensors([(j.info, j.scale) for j in jobs], f"loading {scan.model_dir.name}", progress)
    with closing(stream):  # on an error, the bar ends (and shards close) before the error propagates
        for k, src, scale in stream:
            job = jobs[k]
            info = job.info
            nbytes = info.nbytes
            name_is_scale = job.name.endswith(".scale")
            scale_info = job.scale if job.scale is not None else (info if name_is_scale else None)
            if scale_info is not None:  # the stored scale dtype, for the report
                report.scale_dtypes[scale_info.dtype] = report.scale_dtypes.get(scale_info.dtype, 0) + 1
            where = str(info.file)
            if scale is not None:
                check_values(job.scale.key, scale, str(job.scale.file), CheckpointError)
            if name_is_scale or (check_weights and info.dtype in ("F8_E4M3", *FLOAT_DTYPES)):
                check_values(info.key, src, where, CheckpointError, raw_e8m0=name_is_scale)
            if job.name.endswith(".tid2eid"):
                _check_expert_ids(info, src, cfg.n_routed_experts, scan.config_path)
            if scale is not None:
                dt = targets[job.name].dtype
                src = (quant.dequantize_fp8_block(src, scale, dt) if info.dtype == "F8_E4M3"
                       else quant.dequantize_fp4(src, scale, 32, dt))
                nbytes += job.scale.nbytes
            elif name_is_scale and src.dtype == torch.uint8:
                src = src.view(torch.float8_e8m0fnu)
            if put_tensor(model, targets, job.name, src, source=where, error=CheckpointError):
                targets = dict(model.checkpoint_tensors())
            report.loaded += 1
            report.bytes_read += nbytes
    model.eval()
    model.load_report = report
    if progress:
        print(report.summary(), file=sys.stderr)
    return model

