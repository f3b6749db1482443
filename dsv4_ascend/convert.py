"""`dsv4 convert`: an official DeepSeek-V4 checkpoint in the layout an Ascend chip wants.

Streaming: tensors are read one at a time from the memory-mapped source shards (`safetensors_io.stream_tensors`),
converted, and buffered into output shards of at most `shard_bytes` that are written as soon as they fill, so
memory holds one source tensor plus one output shard, never the model. Input is validated from the headers first
(`checkpoint.plan_load`, the loader's own checks), so a bad snapshot fails before anything is written.

Targets (docs/ascend.md, "Converted checkpoints"):
- `a3` (Atlas A2/A3: no FP8/FP4 arithmetic): W8A8, Huawei's W8A8C16 split as in cann-recipes-infer
  `models/deepseek_v4/utils/convert_model.py`. The linears AscendBackend(quant="w8a8").prepare() quantises
  (attn.wq_b, attn.wo_b, attn.indexer.wq_b, ffn.shared_experts.w1/w2/w3, ffn.experts.E.w1/w2/w3, MTP blocks
  included) are dequantised to fp32 and stored as int8 `.weight` [out, in] + fp32 `.scale` [out, 1]:
  s = max|w_row| / 127, q = clamp(round_half_even(w / s), -127, 127) (symmetric; -128 is never produced,
  as in CR's converter; npu_quant_matmul / npu_grouped_matmul accept any int8 and compute y = acc * s[n] *
  s_token[m]). It is the very function prepare() uses (`quant.quantize_int8_per_channel`), so a converted
  checkpoint holds bit-for-bit the int8 weights prepare() would compute. Every other FP8 weight is
  dequantised to bf16 (exact: e4m3 x 2^k fits bf16); bf16 / fp32 / int64 tensors are copied.
  `experts="w4a8"`: routed experts become int4 (symmetric [-7, 7], per channel, CR's clip search) packed as
  `npu_convert_weight_to_int4pack` lays out the GMM weight [K, N]: int32 [K, N/8], element 8i+j of a row in
  bits 4j..4j+3 of word i; + fp32 `.scale` [N, 1] + CR's fp32 assistance `.bias` [N] = 8 * s[n] * sum_k q[n, k]
  (the format lives in dsv4_ascend/quant.py). AscendBackend(quant="w4a8") runs it (load_converted hands the
  packed weights, scales and biases to `register_routed_int4` unchanged).
- `950` (Ascend 950PR/DT: FP8 e4m3 and MXFP4 native): the official formats are what the chip computes in, so
  every tensor is copied unchanged (native names). The 950 ops want the scales in other *layouts* -- the FP8
  block scale transposed with the [K, N] weight view, MXFP4 e8m0 scales as pairs [K/64, N, 2] -- which are
  load-time views / permutes of the official [N, K/32] (cann-recipes-infer does the same at load), so they are
  not rewritten on disk: a straight copy, recorded as such in config.json.

config.json gets `quantization_config.ascend_target` ("a3" / "950", the marker that refuses a second
conversion) and `weight_format`: "ND" (default) or "NZ" (`nz=True`: the NPU should `npu_format_cast(w, 29)`
the int8 weights at load; on CPU the emulator's cast is the identity, so nothing is cast there).
Reading a converted directory back is `dsv4_ascend.converted` (`dsv4_ascend.loading` picks the loader).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import quant
from .checkpoint import plan_load, scan_checkpoint
from .config import ConfigError, read_config_json
from .converted import A3_METHOD, MARKER, ROUTED_RE, ConvertError
from .safetensors_io import INDEX_NAME, SINGLE_NAME, CheckpointError, stream_tensors
from .weights import check_values

__all__ = ["TARGETS", "ConvertReport", "convert_checkpoint", "quantize_int8_per_channel",
           "quantize_int4_per_channel", "pack_int4", "unpack_int4", "add_convert_args", "convert_main"]

TARGETS = ("a3", "950")
DEFAULT_SHARD_BYTES = 4 << 30
_INT8_RE = re.compile(r"^(layers|mtp)\.\d+\.(attn\.wq_b|attn\.wo_b|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]|"
                      r"ffn\.experts\.\d+\.w[123])\.weight$")


quantize_int8_per_channel = quant.quantize_int8_per_channel  # prepare()'s rule, one home: dsv4_ascend/quant.py


# The int4 format (W4A8 routed experts) lives in dsv4_ascend/quant.py, shared with AscendBackend.prepare();
# re-exported here because the converter writes it.
quantize_int4_per_channel = quant.quantize_int4_per_channel
pack_int4 = quant.pack_int4
unpack_int4 = quant.unpack_int4


# ---- converting --------------------------------------------------------------------------------------------------

class _ShardWriter:
    """Buffers tensors into shards of at most `limit` bytes; each shard is written as soon as it is full."""

    def __init__(self, out: Path, limit: int) -> None:
        self.out, self.limit = out, limit
        self.buf: dict[str, Tensor] = {}
        self.size = 0
        self.tmp: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: Tensor) -> None:
        t = t.contiguous()
        if self.buf and self.size + t.nbytes > self.limit:
            self.flush()
        self.buf[name] = t
        self.size += t.nbytes
        self.total += t.nbytes

    def flush(self) -> None:
        if not self.buf:
            return
        from safetensors.torch import save_file

        path = self.out / f".dsv4-convert-{len(self.tmp):05d}.safetensors"
        save_file(self.buf, str(path), metadata={"format": "pt"})
        self.tmp.append((path, list(self.buf)))
        self.buf, self.size = {}, 0

    def finish(self) -> tuple[dict[str, str], int]:
        self.flush()
        n = len(self.tmp)
        weight_map = {}
        for i, (path, names) in enumerate(self.tmp):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out / fname)
            weight_map.update({k: fname for k in names})
        return dict(sorted(weight_map.items())), n


@dataclass
class ConvertReport:
    """What `convert_checkpoint` wrote."""

    out_dir: Path
    target: str
    experts: str
    weight_format: str
    tensors: int = 0
    int8: int = 0  # int8 weights written (a3)
    int4: int = 0  # int4 routed-expert weights written (a3, experts="w4a8")
    dequantised: int = 0  # FP8/FP4 weights written as bf16 (a3)
    copied: int = 0  # tensors copied unchanged
    shards: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    other_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        what = (f"{self.int8} int8 weights + fp32 per-channel scales, "
                + (f"{self.int4} int4 expert weights, " if self.int4 else "")
                + f"{self.dequantised} dequantised to bf16, {self.copied} copied") if self.target == "a3" else \
            f"{self.copied} tensors copied unchanged (FP8 e4m3 + MXFP4, native on Ascend 950)"
        return (f"converted for {self.target} ({self.weight_format} weights): {self.tensors} tensors, {what}; "
                f"{self.shards} shards, {self.bytes_in / 2**20:.1f} MiB -> {self.bytes_out / 2**20:.1f} MiB in "
                f"{self.seconds:.1f} s -> {self.out_dir}")


def _quant_config(raw_qc: dict | None, target: str, experts: str, nz: bool) -> dict:
    fmt = "NZ" if nz else "ND"
    if target == "950":
        qc = dict(raw_qc or {})
        qc.update({MARKER: "950", "weight_format": fmt, "converted_by": "dsv4-ascend convert",
                   "layout_note": "tensors copied unchanged from the official checkpoint (FP8 e4m3 128x128 "
                                  "ue8m0 block scales; MXFP4 experts packed low-nibble-first with e8m0 scales "
                                  "per 1x32); the 950 ops' scale layouts are load-time views of these"})
        return qc
    return {
        "quant_method": A3_METHOD, MARKER: "a3", "weight_format": fmt, "converted_by": "dsv4-ascend convert",
        "source_quantization_config": raw_qc,
        "weights": {"dtype": "int8", "strategy": "channel", "symmetric": True, "range": [-127, 127],
                    "rounding": "half_to_even", "scale_dtype": "float32", "scale_shape": "[out_features, 1]",
                    "scale_rule": "max|w_row| / 127"},
        "activations": {"dtype": "int8", "strategy": "token", "dynamic": True, "symmetric": True},
        "quantized": ["attn.wq_b", "attn.wo_b", "attn.indexer.wq_b", "ffn.shared_experts.w1/w2/w3",
                      "ffn.experts.*.w1/w2/w3"],
        "experts": experts,
        "experts_int4": None if experts == "w8a8" else {
            "dtype": "int4", "range": [-7, 7], "scale": "float32 [out_features, 1], clip-searched",
            "layout": "int32 [in_features, out_features/8] (npu_convert_weight_to_int4pack of the [K, N] weight)",
            "bias": "float32 [out_features] = 8 * scale * sum_k q (assistance term of the A8W4 grouped matmul)"},
        "other_weights": "bfloat16 (dequantised)",
        "kv_cache": "bfloat16", "indexer_cache": "int8 per token + float16 scale (computed at run time)",
    }


def convert_checkpoint(src: str | Path, dst: str | Path, target: str, *, experts: str = "w8a8", nz: bool = False,
                       shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                       progress: bool = True) -> ConvertReport:
    """Convert the official checkpoint `src` for `target` ("a3" or "950") into `dst` (see the module doc).

    Raises ConvertError for an unknown target / experts mode, a checkpoint that is already converted, or an
    output directory that already holds a checkpoint (unless `overwrite`); CheckpointError for a bad snapshot.
    """
    if target not in TARGETS:
        raise ConvertError(f"unknown target {target!r}; allowed: {', '.join(TARGETS)} (a3 = Atlas A2/A3 W8A8, "
                           "950 = Ascend 950 FP8/MXFP4)")
    if experts not in ("w8a8", "w4a8"):
        raise ConvertError(f"unknown experts mode {experts!r}; allowed: w8a8, w4a8")
    if experts == "w4a8" and target != "a3":
        raise ConvertError("experts='w4a8' is an Atlas A2/A3 format; Ascend 950 keeps the MXFP4 experts")
    if nz and target != "a3":  # only the a3 loader (converted.py) reads weight_format; 950 keeps FP8/MXFP4 as is
        raise ConvertError("nz (--nz) applies to the a3 target's int8 weights; Ascend 950 keeps the tensors as stored")
    if shard_bytes <= 0:
        raise ConvertError(f"shard_bytes must be positive, found {shard_bytes}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory (expected an official snapshot with config.json)")
    try:
        raw = read_config_json(src / "config.json")
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    qc = raw.get("quantization_config")
    if isinstance(qc, dict) and qc.get(MARKER):
        raise ConvertError(f"{src}: already converted (for {qc[MARKER]}, by dsv4 convert: "
                           f"quantization_config.{MARKER}={qc[MARKER]!r}); convert from the official checkpoint")
    if isinstance(qc, dict) and qc.get("quant_method") not in (None, "fp8"):
        raise ConvertError(f"{src}: quantization_config.quant_method is {qc.get('quant_method')!r}, so this is not "
                           "an official DeepSeek-V4 checkpoint (fp8) but one converted by another tool; convert "
                           "from the official checkpoint")
    if dst.resolve() == src.resolve():
        raise ConvertError(f"{dst}: the output directory must differ from the input")
    holds_checkpoint = dst.is_dir() and ((dst / "config.json").exists() or any(dst.glob("*.safetensors")))
    if holds_checkpoint and not overwrite:
        raise ConvertError(f"{dst}: already holds a checkpoint; pass overwrite=True (--force) to replace it")

    t_start = time.perf_counter()
    from .backend import Backend
    from .model import Transformer, WeightFormats

    scan = scan_checkpoint(src)
    cfg = scan.config
    n_mtp = cfg.num_nextn_predict_layers
    # a3: plan against an all-plain model, so every FP8/FP4 weight comes with its scale (job.scale) to dequantise;
    # 950: against the checkpoint's own formats, so every tensor (scales too) is its own job, copied as stored.
    fmt = WeightFormats() if target == "a3" else WeightFormats.from_config(cfg)
    meta = Transformer(cfg, Backend(), torch.bfloat16, fmt, device="meta", n_mtp=n_mtp)
    targets = {n: (t.dtype, tuple(t.shape)) for n, t in meta.checkpoint_tensors()}
    del meta
    jobs, _ = plan_load(scan, targets, None, n_mtp, dequantize=target == "a3")

    dst.mkdir(parents=True, exist_ok=True)
    for old in list(dst.glob("*.safetensors")) + [dst / INDEX_NAME, dst / SINGLE_NAME]:
        if old.exists():
            old.unlink()
    rep = ConvertReport(dst, target, experts, "NZ" if nz else "ND")
    writer = _ShardWriter(dst, shard_bytes)
    try:
        for k, t, scale in stream_tensors([(j.info, j.scale) for j in jobs], f"convert -> {target}", progress):
            job = jobs[k]
            info = job.info
            nbytes = info.nbytes + (job.scale.nbytes if job.scale else 0)
            if scale is not None:  # the loader's checks: no NaN/inf scale or FP8 byte reaches the output
                check_values(job.scale.key, scale, str(job.scale.file), CheckpointError)
            if job.name.endswith(".scale") or info.dtype == "F8_E4M3":
                check_values(info.key, t, str(info.file), CheckpointError, raw_e8m0=True)
            if target == "950":
                if info.dtype == "F4" and hasattr(torch, "float4_e2m1fn_x2"):
                    t = t.view(torch.float4_e2m1fn_x2)
                elif job.name.endswith(".scale") and t.dtype == torch.uint8:
                    t = t.view(torch.float8_e8m0fnu)
                writer.add(job.name, t)
                rep.copied += 1
            else:
                w = quant.dequantize(t, scale, torch.float32) if scale is not None else t
                _convert_a3(job.name, w, scale is not None, experts, writer, rep)
            rep.bytes_in += nbytes
        weight_map, rep.shards = writer.finish()
    except BaseException:
        for path, _ in writer.tmp:
            path.unlink(missing_ok=True)
        raise
    rep.tensors = len(weight_map)
    rep.bytes_out = writer.total
    index = {"metadata": {"total_size": writer.total, MARKER: target}, "weight_map": weight_map}
    (dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    out_cfg = dict(raw)
    out_cfg["quantization_config"] = _quant_config(qc if isinstance(qc, dict) else None, target, experts, nz)
    if target == "a3":
        out_cfg.pop("expert_dtype", None)
    (dst / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n")
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", INDEX_NAME):
            shutil.copy2(f, dst / f.name)
            rep.other_files.append(f.name)
    rep.seconds = time.perf_counter() - t_start
    if progress:
        print(rep.summary(), file=sys.stderr)
    return rep


def _convert_a3(name: str, w: Tensor, was_quantised: bool, experts: str, writer: _ShardWriter,
                rep: ConvertReport) -> None:
    if _INT8_RE.match(name):
        base = name[: -len("weight")]
        if experts == "w4a8" and ROUTED_RE.match(name):
            q, s = quantize_int4_per_channel(w)  # [N, K] in [-7, 7], [N]
            writer.add(name, pack_int4(q.t().contiguous()))  # GMM weight [K, N] -> int32 [K, N/8]
            writer.add(base + "scale", s.unsqueeze(-1))
            writer.add(base + "bias", quant.int4_assistance_bias(q, s))
            rep.int4 += 1
        else:
            q, s = quantize_int8_per_channel(w)
            writer.add(name, q)
            writer.add(base + "scale", s.unsqueeze(-1))
            rep.int8 += 1
    elif was_quantised:
        writer.add(name, w.to(torch.bfloat16))
        rep.dequantised += 1
    else:
        writer.add(name, w)
        rep.copied += 1


# ---- command line --------------------------------------------------------------------------------------------------

def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="official checkpoint directory (config.json, index json, shards)")
    p.add_argument("dst", metavar="DST", help="output directory (created if missing)")
    p.add_argument("--target", required=True, choices=TARGETS,
                   help="a3: Atlas A2/A3 (no FP8): W8A8 int8 per-channel weights for q_b/o_b/indexer q_b/shared "
                        "and routed experts, the rest dequantised to bf16. 950: Ascend 950 (FP8 + MXFP4 native): "
                        "tensors copied unchanged")
    p.add_argument("--experts", default="w8a8", choices=["w8a8", "w4a8"],
                   help="a3 routed experts: int8 (w8a8, default) or int4 packed for npu_convert_weight_to_int4pack "
                        "(w4a8, CR's Hybrid INT8-INT4; runs with AscendBackend(quant='w4a8'))")
    p.add_argument("--nz", action="store_true",
                   help="record weight_format NZ: the NPU casts the int8 weights to FRACTAL_NZ at load "
                        "(npu_format_cast(w, 29)); nothing is cast on CPU. Default ND")
    p.add_argument("--shard-size", type=float, default=DEFAULT_SHARD_BYTES / 2**30, metavar="GIB",
                   help="maximum output shard size in GiB (default 4)")
    p.add_argument("--force", action="store_true", help="replace a checkpoint already in DST")
    p.add_argument("--quiet", action="store_true", help="no progress bar / summary")


def convert_main(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.shard_size) and args.shard_size * 2**30 >= 1):
        print(f"dsv4 convert: error: --shard-size must be a positive number of GiB, found {args.shard_size}",
              file=sys.stderr)
        return 2
    try:
        convert_checkpoint(args.src, args.dst, args.target, experts=args.experts, nz=args.nz,
                           shard_bytes=int(args.shard_size * 2**30), overwrite=args.force,
                           progress=not args.quiet)
    except CheckpointError as e:
        print(f"dsv4 convert: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsv4 convert", description="Convert an official DeepSeek-V4 checkpoint "
                                 "into the layout an Ascend chip wants (streaming, tensor by tensor).")
    add_convert_args(ap)
    return convert_main(ap.parse_args(argv))
