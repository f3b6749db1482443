"""Load anything: find the model directory, tell which kind of checkpoint it is, choose the backend and the
Ascend quant mode, and build the model and its tokenizer, with one-line errors that name the file or flag.

Directory kinds: an official snapshot (or a `dsv4 convert --target 950` copy, same format) loads with
`checkpoint.load_checkpoint`; a `dsv4 convert --target a3` directory (int8 weights) with
`converted.load_converted`. `load_checkpoint` here makes that choice, one level above both loaders.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from .backend import Backend, RunOptions
from .checkpoint import load_checkpoint as load_official
from .config import ModelConfig, load_config, read_config_json
from .converted import converted_config, converted_quant, load_converted

__all__ = ["LoadError", "default_model_dir", "resolve_model_dir", "read_model_config", "check_device",
           "make_backend", "auto_quant", "resolve_quant", "load_checkpoint", "load_model", "load_model_tokenizer"]


class LoadError(ValueError):
    """A model directory, device or backend choice that cannot work; the message names it."""


def default_model_dir() -> Path:
    """The embedded default: a tiny random model in the official format, created on first use."""
    root = Path(os.environ.get("DSV4_HOME", Path.home() / ".cache" / "dsv4-ascend"))
    d = root / "tiny-seed0"
    if not (d / "config.json").exists() or not (d / "model.safetensors.index.json").exists():
        from .tiny import write_tiny_checkpoint

        print(f"[dsv4] creating the tiny random default model in {d}", file=sys.stderr)
        write_tiny_checkpoint(d, seed=0)
    return d


def resolve_model_dir(model_dir: str | Path | None) -> Path:
    """`model_dir` checked to be a directory holding config.json (None: the tiny default)."""
    if model_dir is None:
        return default_model_dir()
    d = Path(model_dir)
    if not d.exists():
        raise LoadError(f"{d}: no such model directory")
    if not d.is_dir():
        raise LoadError(f"{d}: not a directory (a model directory holds config.json, the safetensors shards and "
                        "tokenizer.json)")
    return d


def read_model_config(model_dir: Path) -> ModelConfig:
    """The model config of any checkpoint directory (config.json only, no weights); errors name the file."""
    if converted_quant(model_dir) is not None:  # a3: int8 weights go to the backend; the model is plain
        return converted_config(read_config_json(model_dir / "config.json"), model_dir)
    return load_config(model_dir / "config.json")


def check_device(device: str) -> torch.device:
    """The torch device `device` names, or LoadError saying what is missing (torch_npu / CANN, CUDA, index)."""
    kind = device.split(":", 1)[0]
    if kind == "npu":
        if importlib.util.find_spec("torch_npu") is None:
            raise LoadError(f"--device {device} needs torch_npu (Ascend's PyTorch adapter) and the CANN toolkit; "
                            "torch_npu is not installed (use --device cpu, where --backend ascend runs emulated)")
        try:
            import torch_npu  # noqa: F401  (registers the npu device type)
        except Exception as e:  # torch_npu raises assorted errors when CANN is missing or mismatched
            raise LoadError(f"--device {device}: torch_npu is installed but does not load ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no message'}); is CANN installed and its "
                            "set_env.sh sourced?") from None
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LoadError(f"--device {device!r}: not a torch device ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise LoadError(f"--device {device}: {why} (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LoadError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "npu":
        mod = getattr(torch, "npu", None)
        if mod is None or not mod.is_available():
            raise LoadError(f"--device {device}: torch_npu loaded but no NPU is visible")
        if dev.index is not None and dev.index >= mod.device_count():
            raise LoadError(f"--device {device}: only {mod.device_count()} NPU(s)")
    return dev


def make_backend(name: str, numerics: str, quant: str = "bf16") -> Backend:
    """The Backend named on the command line (`quant`: the Ascend weight format, w8a8 / w4a8 for converted A3
    dirs)."""
    opts = RunOptions(numerics)
    if name == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend(opts)
    if name == "ascend":
        from .ops import AscendBackend

        return AscendBackend(options=opts, quant=quant)
    raise LoadError(f"unknown --backend {name!r}; allowed: reference, ascend")


def auto_quant(qc: dict, backend: str, weights: str, implied: str = "bf16") -> str:
    """The Ascend quant mode a checkpoint implies for `--quant auto`: what `implied` says for converted A2/A3
    dirs, "fp8" (the 950's native FP8 + MXFP4 path) for an FP8 checkpoint kept native on --backend ascend (the
    official one or a `dsv4 convert --target 950` copy), else "bf16"."""
    if implied == "bf16" and backend == "ascend" and weights == "native" and qc.get("quant_method") == "fp8":
        return "fp8"
    return implied


def resolve_quant(path: Path, backend: str, weights: str, quant: str) -> str:
    """The Ascend quant mode to run `path` with: `quant`, or for "auto" what the checkpoint implies."""
    implied = converted_quant(path) or "bf16"  # an a3 directory runs only on its own integer path
    if quant == "auto":
        qc = read_config_json(path / "config.json").get("quantization_config")
        return auto_quant(qc if isinstance(qc, dict) else {}, backend, weights, implied)
    if backend != "ascend" and quant != "bf16":
        raise LoadError(f"--quant {quant} needs --backend ascend (the reference backend runs the checkpoint as "
                        "stored, dequantising per call)")
    return quant


def load_checkpoint(model_dir: str | Path, *, backend: Backend | None = None, dtype: torch.dtype = torch.bfloat16,
                    weights: str = "native", device: str | torch.device = "cpu",
                    expert_range: tuple[int, int] | None = None, n_mtp: int | None = None,
                    progress: bool = True, check_weights: bool = True):
    """Any checkpoint directory -> model: `converted.load_converted` for a `dsv4 convert --target a3` directory
    (needs AscendBackend(quant="w8a8"/"w4a8"); `weights` does not apply), else `checkpoint.load_checkpoint`
    (official format, also a `--target 950` copy). Arguments as `checkpoint.load_checkpoint`."""
    if converted_quant(model_dir) is not None:
        return load_converted(model_dir, backend, dtype=dtype, device=device, expert_range=expert_range,
                              n_mtp=n_mtp, progress=progress)
    return load_official(model_dir, backend=backend, dtype=dtype, weights=weights, device=device,
                         expert_range=expert_range, n_mtp=n_mtp, progress=progress, check_weights=check_weights)


def load_model(model_dir: str | None, device: str = "cpu", backend: str = "reference", dtype: str = "bfloat16",
               weights: str = "native", numerics: str = "exact", quant: str = "auto", progress: bool = True):
    """Model from a checkpoint directory (or the tiny default) on `device` with the chosen backend.

    `quant` (Ascend only): "auto" picks it from the checkpoint (`auto_quant`), or one of AscendBackend's modes.
    `progress`: the loading bar and summary on stderr. Returns (model, path).
    """
    path = resolve_model_dir(model_dir)
    check_device(device)
    quant = resolve_quant(path, backend, weights, quant)
    model = load_checkpoint(path, backend=make_backend(backend, numerics, quant), dtype=getattr(torch, dtype),
                            weights=weights, device=device, progress=progress)
    if quant in ("fp8", "mxfp8"):
        model.backend.prepare(model)  # the 950 scale layouts once, before the first request or a graph capture
    return model, path


def load_model_tokenizer(model_dir: Path):
    """`model_dir/tokenizer.json` as a Tokenizer (cheap: no weights); LoadError naming the file otherwise."""
    from .tokenizer import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise LoadError(f"{path}: missing (the model directory must hold the model's tokenizer.json; the "
                        "official snapshots ship it next to config.json)")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception for a malformed file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoadError(f"{path}: not a usable tokenizer ({msg})") from None

