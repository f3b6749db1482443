"""Tiny random DeepSeek-V4 models for tests and the demo, in exactly the official on-disk tensor layout."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from .backend import Backend
from .config import ModelConfig, preset

__all__ = ["random_weights", "official_dtypes", "official_tensors", "dequantized_weights", "write_tiny_checkpoint",
           "make_tiny_main", "wide_config"]


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from .model import Transformer  # local import: model imports nothing from here

    m = Transformer(cfg, Backend(), torch.float32, device="meta")
    return {name: tuple(t.shape) for name, t in m.checkpoint_tensors()}


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    """Dense fp32 weights (int64 for tid2eid) under official names, at magnitudes that exercise every path."""
    return dict(_random_tensors(cfg, seed))


def _random_tensors(cfg: ModelConfig, seed: int = 0) -> Iterator[tuple[str, Tensor]]:
    """`random_weights` one tensor at a time (the same tensors, in name order): a wide model's fp32 weights need
    not all be in memory at once."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    for name, shape in sorted(_shapes(cfg).items()):
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("tid2eid"):
            yield name, torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: shape[1]]
                                     for _ in range(shape[0])])
        elif "norm" in name and leaf == "weight":
            yield name, randn(*shape, std=0.1, mean=1.0)
        elif leaf.endswith("_fn"):
            yield name, randn(*shape, std=1.0 / math.sqrt(shape[-1]))
        elif leaf.endswith("_base"):
            yield name, randn(*shape, std=0.5)
        elif leaf.endswith("_scale") and leaf.startswith("hc_"):
            yield name, torch.rand(*shape, generator=g) + 0.5
        elif leaf in ("attn_sink", "ape"):
            yield name, randn(*shape, std=0.5)
        elif name.endswith("gate.bias"):
            yield name, randn(*shape, std=0.1)
        elif name == "embed.weight":
            yield name, randn(*shape)
        else:  # linear weights [out, in]
            yield name, randn(*shape, std=1.0 / math.sqrt(shape[-1]))


# ---- the official on-disk formats ----------------------------------------------------------------------------

def _is_fp32_on_disk(name: str) -> bool:
    """FP32 in the official files: mHC tensors, attention sinks, gate bias, compressor position biases."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("hc_") or leaf in ("attn_sink", "ape") or name.endswith("gate.bias")


def official_dtypes(cfg: ModelConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor of an official checkpoint for `cfg` (before any sharding).

    FP8 linears are float8_e4m3fn + float8_e8m0fnu `.scale` [ceil(N/128), ceil(K/128)]; routed experts with
    `expert_dtype="fp4"` are int8 [N, K/2] + float8_e8m0fnu `.scale` [N, K/32]; the rest is bf16, fp32 (see
    `_is_fp32_on_disk`) or int64 (`tid2eid`). With `quant_method=None` the linears are bf16 too.
    """
    from .model import Transformer, WeightFormats

    m = Transformer(cfg, Backend(), torch.bfloat16, WeightFormats.from_config(cfg), device="meta")
    out = {}
    for name, t in m.checkpoint_tensors():
        dt = t.dtype
        if dt not in (torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int8, torch.int64):
            dt = torch.float32 if _is_fp32_on_disk(name) else torch.bfloat16
        out[name] = (dt, tuple(t.shape))
    return out


def official_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, Tensor]:
    """`random_weights(cfg, seed)` quantised to exactly the official on-disk formats (see `official_dtypes`).

    FP8 blocks use ue8m0 scales (`quant.quantize_fp8_block`), experts MXFP4 (`quant.quantize_fp4`, bytes viewed
    as int8). Every tensor is contiguous and owns its storage, ready for safetensors.
    """
    from . import quant

    disk = official_dtypes(cfg)
    out: dict[str, Tensor] = {}
    for name, w in _random_tensors(cfg, seed):
        dt, shape = disk[name]
        scale_name = name[: -len("weight")] + "scale"
        if dt == torch.float8_e4m3fn:
            out[name], out[scale_name] = quant.quantize_fp8_block(w, scale_fmt="ue8m0")
        elif dt == torch.int8:
            packed, out[scale_name] = quant.quantize_fp4(w, 32)
            out[name] = packed.view(torch.int8)
        else:
            out[name] = w.to(dt).contiguous()
    bad = {n for n in disk if n not in out or (out[n].dtype, tuple(out[n].shape)) != disk[n]} | (set(out) - set(disk))
    if bad:  # guards the rules above against model changes
        raise AssertionError(f"official_tensors: formats disagree with the model for {sorted(bad)[:5]}")
    return out


def dequantized_weights(tensors: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """What a model loaded with `--weights bf16` holds: each FP8/FP4 `.weight` + `.scale` pair dequantised.

    Quantised weights become dense `dtype` tensors (their `.scale` entries disappear); every other tensor is
    returned as stored (the model casts it on assignment). FP8 x 2^k and FP4 x 2^k values are exact in bf16 and
    fp32, so the result does not depend on `dtype` among those two.
    """
    from . import quant

    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(".scale") and name[: -len("scale")] + "weight" in tensors:
            continue
        s = tensors.get(name[: -len("weight")] + "scale") if name.endswith(".weight") else None
        if s is not None and t.dtype == torch.float8_e4m3fn:
            out[name] = quant.dequantize_fp8_block(t, s, dtype)
        elif s is not None and t.dtype in (torch.int8, torch.uint8):
            out[name] = quant.dequantize_fp4(t, s, 32, dtype)
        else:
            out[name] = t
    return out


def _shard_order(name: str) -> tuple:
    """Main model first, layer by layer, MTP last (the official files put the whole MTP block in the last shard)."""
    parts = name.split(".")
    if parts[0] == "mtp":
        return (2, int(parts[1]), name)
    if parts[0] == "layers":
        return (1, int(parts[1]), name)
    return (0, 0, name)


def write_tiny_checkpoint(out_dir: str | Path, cfg: ModelConfig | None = None, seed: int = 0,
                          shard_bytes: int | None = None, tokenizer: bool = True) -> Path:
    """Write a random model in the official snapshot layout and return its directory.

    Files: `config.json` (official native names), `model-0000i-of-0000n.safetensors` shards (greedy in
    `_shard_order`, at most `shard_bytes` each unless one tensor is larger, the MTP block starting a new shard
    as in the official files; default: two shards, the main model then the MTP block),
    `model.safetensors.index.json` (`metadata.total_size` = sum of tensor bytes, `weight_map`), and a tiny
    byte-level BPE tokenizer (`tokenizer.json`, `tokenizer_config.json`; `tokenizer=False` skips it).
    """
    from safetensors.torch import save_file

    cfg = cfg or preset("tiny")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = official_tensors(cfg, seed)
    names = sorted(tensors, key=_shard_order)
    total = sum(t.nbytes for t in tensors.values())
    main = [n for n in names if not n.startswith("mtp.")]
    if shard_bytes is None:  # two shards: the main model, then the MTP block (or halves without MTP)
        limit = sum(tensors[n].nbytes for n in main) if len(main) < len(names) else -(-total // 2)
    else:
        limit = shard_bytes
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        nb = tensors[n].nbytes
        mtp_starts = n.startswith("mtp.") and groups[-1] and not groups[-1][-1].startswith("mtp.")
        if groups[-1] and (size + nb > limit or mtp_starts):
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nb
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg.save(out / "config.json")
    if tokenizer:
        from .tokenizer import build_tiny_tokenizer

        build_tiny_tokenizer(out, cfg.vocab_size)
    return out


def make_tiny_main(argv: list[str] | None = None) -> int:
    """`dsv4 make-tiny DIR [--seed N] [--preset tiny]`: write a random official-format checkpoint to DIR."""
    ap = argparse.ArgumentParser(
        prog="dsv4 make-tiny",
        description="Write a tiny random DeepSeek-V4 model in exactly the official checkpoint format "
                    "(config.json, FP8/MXFP4 safetensors shards, index json, a small tokenizer). The tiny preset "
                    "(3.6 MB of weights) has whole 128x128 blocks, so DeepSeek's own convert.py and FP8 kernels "
                    "accept it.")
    ap.add_argument("dir", metavar="DIR", help="output directory (created if missing)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    ap.add_argument("--preset", default="tiny", choices=("tiny", "small"),
                    help="model size preset (default: tiny; 'small' is the benchmark size)")
    ap.add_argument("--shard-bytes", type=int, default=None,
                    help="maximum bytes per safetensors shard (default: 2 shards, the main model then the "
                         "MTP block)")
    ap.add_argument("--force", action="store_true", help="overwrite DIR even if it already holds a config.json")
    args = ap.parse_args(argv)
    if not 0 <= args.seed < 2**63:  # torch seeds are 64-bit; generate's --seed takes the same range
        ap.error(f"--seed must be in [0, 2**63 - 1], found {args.seed}")
    if args.shard_bytes is not None and args.shard_bytes < 1:  # was: one shard per tensor
        ap.error(f"--shard-bytes must be >= 1, found {args.shard_bytes}")
    out = Path(args.dir)
    if (out / "config.json").exists() and not args.force:
        ap.error(f"{out} already holds a config.json; pass --force to overwrite it")
    path = write_tiny_checkpoint(out, preset(args.preset), args.seed, args.shard_bytes)
    n = len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"])
    print(f"wrote {args.preset} model (seed {args.seed}, {n} tensors) to {path}")
    return 0


def wide_config(layers: int = 2) -> ModelConfig:
    """V4-Flash's real widths (hidden 4096, 64 heads x 512, rope 64, indexer 64 x 128, window 128, 512 picks,
    FP8 dense + MXFP4 experts) with few layers, 8 experts, a 8192-token vocabulary and no MTP block: the widths
    at which numerics and compiled code meet real sizes, small enough for a CPU (~0.4 GB of weights per layer)."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, found {layers}")
    # CSA and HCA from 2 layers on, a sliding-window-only layer first from 3 on (V4-Flash: 0, 0, 4, 128, 4, ...).
    ratios = ([0] + [4, 128] * layers)[:layers] if layers > 2 else [4, 128][:layers]
    return dataclasses.replace(preset("v4-flash"), num_hidden_layers=layers, compress_ratios=ratios,
                               num_nextn_predict_layers=0, n_routed_experts=8, vocab_size=8192,
                               num_hash_layers=min(1, layers - 1))
