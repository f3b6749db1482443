"""safetensors files, read without trusting them: headers parsed and checked before any tensor is, tensors
copied one at a time from memory-mapped shards, each shard unmapped as soon as its last tensor is read.

The format (https://github.com/huggingface/safetensors, "Format"): 8-byte little-endian header length, a JSON
header mapping tensor names to {dtype, shape, data_offsets}, then the data section. Reads go through
`safetensors.safe_open` (never pickle, never a whole shard at once).
"""
from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from .weights import WeightError

__all__ = ["CheckpointError", "TensorInfo", "read_safetensors_header", "stream_tensors", "INDEX_NAME",
           "SINGLE_NAME", "FLOAT_DTYPES", "SCALE_DTYPES", "FP4_DTYPES"]

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
FLOAT_DTYPES = ("F32", "BF16", "F16")
SCALE_DTYPES = ("F8_E8M0", "U8") + FLOAT_DTYPES
FP4_DTYPES = ("I8", "U8", "F4")


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


# ---- reading ----------------------------------------------------------------------------------------------------

def _read(handle, info: TensorInfo) -> Tensor:
    try:
        t = handle.get_tensor(info.key)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{info.file}: cannot read tensor '{info.key}': {e}") from e
    if info.dtype == "F4":
        t = t.view(torch.uint8)
    return t


def stream_tensors(items: list[tuple[TensorInfo, TensorInfo | None]], desc: str,
                   progress: bool = True) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    """Read tensors one at a time from memory-mapped shards, in order, with a byte progress bar on stderr.

    Each item is (tensor, its FP8/FP4 scale or None); yields (index, tensor, scale) with raw-byte scales viewed
    as e8m0. A shard is opened at its first tensor and closed (unmapped) right after its last one, so with
    items sorted by file at most the current shard (and a scale's shard) is mapped, never the whole checkpoint.
    """
    from safetensors import safe_open
    from tqdm.auto import tqdm

    last: dict[Path, int] = {}
    for k, (info, sinfo) in enumerate(items):
        last[info.file] = k
        if sinfo is not None:
            last[sinfo.file] = k
    total = sum(i.nbytes + (si.nbytes if si else 0) for i, si in items)
    handles: dict[Path, object] = {}

    def handle(info: TensorInfo):
        if info.file not in handles:
            try:
                handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu").__enter__()
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{info.file}: cannot open: {e}") from e
        return handles[info.file]

    def close(path: Path) -> None:
        h = handles.pop(path, None)
        if h is not None:
            h.__exit__(None, None, None)

    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                  disable=not progress, desc=desc, dynamic_ncols=True) as bar:
            current = None
            for k, (info, sinfo) in enumerate(items):
                if info.file != current:
                    current = info.file
                    bar.set_postfix_str(info.file.name, refresh=False)
                t = _read(handle(info), info)
                sc = None
                if sinfo is not None:
                    sc = _read(handle(sinfo), sinfo)
                    if sc.dtype == torch.uint8:
                        sc = sc.view(torch.float8_e8m0fnu)
                for f in {info.file} | ({sinfo.file} if sinfo is not None else set()):
                    if last[f] == k:
                        close(f)
                yield k, t, sc
                bar.update(info.nbytes + (sinfo.nbytes if sinfo else 0))
    finally:
        for f in list(handles):
            close(f)
