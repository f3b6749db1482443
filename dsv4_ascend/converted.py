"""Reading back what `dsv4 convert` wrote: which target a directory was converted for, and the loader of
`--target a3` directories (int8 weights, int4 routed experts with `--experts w4a8`).

The marker is config.json's `quantization_config.ascend_target` ("a3" / "950"). A 950 copy is in the official
format and loads with `checkpoint.load_checkpoint`; `dsv4_ascend.loading` decides which loader a directory
gets. `load_converted` builds the model and hands the stored int8 weights and scales to AscendBackend
(`register_linear/_shared/_routed/_routed_int4`, prepare()'s own tables): nothing is re-quantised.
"""
from __future__ import annotations

import re
import sys
from contextlib import closing
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import LoadReport, scan_checkpoint
from .config import ConfigError, ModelConfig, read_config_json
from .safetensors_io import CheckpointError, stream_tensors
from .weights import check_values, put_tensor

__all__ = ["MARKER", "A3_METHOD", "ConvertError", "converted_target", "converted_quant", "converted_config",
           "load_converted", "ROUTED_RE"]

MARKER = "ascend_target"
A3_METHOD = "w8a8_int8"
ROUTED_RE = re.compile(r"^((?:layers|mtp)\.\d+\.ffn\.)experts\.(\d+)\.(w[123])\.(weight|scale|bias)$")
_SHARED_RE = re.compile(r"^((?:layers|mtp)\.\d+\.ffn\.shared_experts)\.(w[123])\.(weight|scale)$")


class ConvertError(CheckpointError):
    """A checkpoint cannot be converted (already converted, unknown target) or loaded as converted."""


def _quant_config(model_dir: str | Path) -> dict:
    """config.json's quantization_config ({} when absent); raises ConfigError naming the file when unreadable."""
    qc = read_config_json(Path(model_dir) / "config.json").get("quantization_config")
    return qc if isinstance(qc, dict) else {}


def converted_target(model_dir: str | Path) -> str | None:
    """"a3" / "950" when `model_dir/config.json` was written by `dsv4 convert`, else None (also when unreadable)."""
    try:
        return _quant_config(model_dir).get(MARKER)
    except ConfigError:
        return None


def converted_quant(model_dir: str | Path) -> str | None:
    """The AscendBackend quant mode a `--target a3` directory was written for: "w4a8" (int4 routed experts,
    `--experts w4a8`) or "w8a8"; None for any other directory. The one place this rule lives."""
    qc = _quant_config(model_dir)
    if qc.get(MARKER) != "a3":
        return None
    experts = qc.get("experts", "w8a8")
    if experts not in ("w8a8", "w4a8"):
        raise ConvertError(f"{Path(model_dir) / 'config.json'}: quantization_config.experts is {experts!r}; known "
                           "routed-expert formats: w8a8, w4a8")
    return experts


def converted_config(raw: dict, where: Path) -> ModelConfig:
    """The model config of a converted a3 checkpoint: unquantised formats (int8 goes to the backend)."""
    d = {k: v for k, v in raw.items() if k not in ("quantization_config", "expert_dtype")}
    try:
        return ModelConfig.from_dict(d)
    except ConfigError as e:
        raise ConvertError(f"{where / 'config.json'}: {e}") from e


def _placeholder(shape, device) -> Tensor:
    """A zero-byte int8 tensor of `shape` (stride 0): the model's stand-in when the backend holds the NZ copy."""
    return torch.zeros((), dtype=torch.int8, device=device).expand(*shape)


def load_converted(model_dir: str | Path, backend=None, *, dtype: torch.dtype = torch.bfloat16,
                   device: str | torch.device = "cpu", expert_range: tuple[int, int] | None = None,
                   n_mtp: int | None = None, progress: bool = True):
    """Build the model a `dsv4 convert --target a3` directory describes; int8 weights go to `backend` as they are.

    a3: `backend` must be an AscendBackend whose quant matches the checkpoint's experts ("w8a8", or "w4a8" for
    `--experts w4a8`); its tables are filled through register_linear / register_shared / register_routed with
    the stored int8 weights (transposed to the ops' [K, N]) and fp32 scales -- int4 experts through
    register_routed_int4 with the stored packed int32 [K, N/8] weights, scales and assistance biases -- so
    nothing is re-quantised and the result equals prepare() on the original checkpoint. The model's
    int8 parameters are views of those same tensors (with weight_format "NZ", the backend casts them with
    npu_format_cast and the model keeps zero-byte placeholders). Only a3 directories: a 950 copy is in the
    official format (checkpoint.load_checkpoint).
    """
    from .model import Attention, Expert, Indexer, RoutedExperts, Transformer, WeightFormats

    d = Path(model_dir)
    experts = converted_quant(d)
    if experts is None:
        raise ConvertError(f"{d}: not a checkpoint written by dsv4 convert --target a3 (no "
                           f"quantization_config.{MARKER}='a3'); dsv4_ascend.loading.load_checkpoint loads any "
                           "checkpoint directory")
    raw = read_config_json(d / "config.json")
    qc = raw["quantization_config"]
    int4 = experts == "w4a8"  # routed experts int4 (packed int32 + scale + assistance bias), the rest int8
    if not hasattr(backend, "register_routed") or getattr(backend, "quant", None) != experts:
        got = "the default ReferenceBackend" if backend is None else type(backend).__name__ + (
            f"(quant={backend.quant!r})" if hasattr(backend, "quant") else "")
        what = "int8 weights, int4 routed experts" if int4 else "int8 weights"
        raise ConvertError(f"{d}: converted for Atlas A2/A3 ({what}); only AscendBackend(quant={experts!r}) "
                           f"runs it, got {got} (the reference backend needs the official checkpoint)")
    nz = qc.get("weight_format", "ND") == "NZ"
    cfg = converted_config(raw, d)
    scan = scan_checkpoint(d, config=cfg)
    n_mtp = cfg.num_nextn_predict_layers if n_mtp is None else n_mtp
    first, end = expert_range or (0, cfg.n_routed_experts)
    model = Transformer(cfg, backend, dtype, WeightFormats(), device="meta", n_mtp=n_mtp, expert_range=expert_range)

    # The int8 holders: name of the stored weight -> (kind, module).
    holders: dict[str, tuple[str, nn.Module]] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, Attention):
            for sub in ("wq_b", "wo_b"):
                holders[f"{mname}.{sub}"] = ("linear", getattr(mod, sub))
        elif isinstance(mod, Indexer):
            holders[f"{mname}.wq_b"] = ("linear", mod.wq_b)
        elif isinstance(mod, Expert):
            holders[mname] = ("shared", mod)
        elif isinstance(mod, RoutedExperts):
            holders[mname] = ("routed", mod)
    int8_params = set()
    for key, (kind, mod) in holders.items():
        if kind == "linear":
            int8_params.add(id(mod.weight))
        else:
            int8_params.update(id(getattr(mod, w) if kind == "routed" else getattr(mod, w).weight)
                               for w in ("w1", "w2", "w3"))
    for mod in model.modules():
        for attr, p in list(mod._parameters.items()):
            if p is not None and id(p) not in int8_params:
                mod._parameters[attr] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=device),
                                                     requires_grad=False)
    targets = {n: t for n, t in model.checkpoint_tensors() if not t.is_meta}

    # Check names, dtypes and shapes from the headers before reading anything.
    def holder_of(name: str):
        m = ROUTED_RE.match(name)
        if m:
            return m.group(1)[:-1] + ".routed", int(m.group(2)), m.group(3), m.group(4)
        m = _SHARED_RE.match(name)
        if m:
            return m.group(1), 0, m.group(2), m.group(3)
        stem, _, leaf = name.rpartition(".")
        return stem, 0, "", leaf

    expected_int8: set[str] = set()
    for key, (kind, mod) in holders.items():
        if kind == "linear":
            expected_int8.update({f"{key}.weight", f"{key}.scale"})
        elif kind == "shared":
            expected_int8.update(f"{key}.{w}.{leaf}" for w in ("w1", "w2", "w3") for leaf in ("weight", "scale"))
        else:
            pre = key[: -len("routed")]
            expected_int8.update(f"{pre}experts.{e}.{w}.{leaf}" for e in range(mod.first, mod.first + mod.count)
                                 for w in ("w1", "w2", "w3")
                                 for leaf in (("weight", "scale", "bias") if int4 else ("weight", "scale")))
    jobs, skipped = [], 0
    for name, info in scan.tensors.items():
        blk = re.match(r"^(layers|mtp)\.(\d+)\.", name)
        ex = re.search(r"\.experts\.(\d+)\.", name)
        if (blk and blk.group(1) == "mtp" and int(blk.group(2)) >= n_mtp) or \
                (ex and not first <= int(ex.group(1)) < end):
            skipped += 1
            continue
        if name not in targets and name not in expected_int8:
            raise CheckpointError(f"{info.file}: tensor '{info.key}' is unexpected in a converted a3 checkpoint "
                                  f"for the model {d / 'config.json'} describes")
        if name in expected_int8:
            packed = int4 and ROUTED_RE.match(name) is not None  # int32 [K, N/8] + fp32 scale [N, 1] + bias [N]
            if name.endswith(".weight"):
                n_out = _meta_shape(holders, holder_of(name))
                if packed:
                    n_out = (n_out[1], n_out[0] // 8)
                ok = info.dtype == ("I32" if packed else "I8") and info.shape == n_out
                want = f"{'I32' if packed else 'I8'} {list(n_out)}"
            elif name.endswith(".bias"):
                wshape = _meta_shape(holders, holder_of(name[: -len("bias")] + "weight"))
                ok = info.dtype == "F32" and info.shape == (wshape[0],)
                want = f"F32 [{wshape[0]}]"
            else:
                wshape = _meta_shape(holders, holder_of(name[: -len("scale")] + "weight"))
                ok = info.dtype == "F32" and info.shape in ((wshape[0], 1), (wshape[0],))
                want = f"F32 [{wshape[0]}, 1]"
            if not ok:
                raise CheckpointError(f"{info.file}: tensor '{info.key}' is {info.dtype} {list(info.shape)}, "
                                      f"expected {want} (dsv4 convert --target a3 layout)")
        jobs.append((name, info))
    missing = sorted((set(targets) | expected_int8) - {n for n, _ in jobs})
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{scan.source}: missing {len(missing)} tensors: {', '.join(missing[:5])}{more}")
    jobs.sort(key=lambda j: (str(j[1].file), j[1].start))

    report = LoadReport(scan.model_dir, scan.layout, scan.spelling, scan.renamed, f"{experts} (converted a3)", 0,
                        skipped, 0)
    pending: dict[str, dict] = {}
    desc = f"loading {scan.model_dir.name} (a3 int8{', int4 experts' if int4 else ''})"
    stream = stream_tensors([(info, None) for _, info in jobs], desc, progress)
    with closing(stream):  # on an error, the bar ends (and shards close) before the error propagates
        for k, t, _ in stream:
            name, info = jobs[k]
            if name.endswith((".scale", ".bias")):
                check_values(info.key, t, str(info.file), CheckpointError, raw_e8m0=True)
            if name in expected_int8:
                key, e, w, leaf = holder_of(name)
                if int4 and holders[key][0] == "routed":
                    mod = holders[key][1]
                    _absorb_routed_int4(pending, key, mod, e - mod.first, w, leaf, t.to(device), backend, nz,
                                        device)
                else:
                    first_expert = holders[key][1].first if holders[key][0] == "routed" else 0
                    _absorb(pending, holders, key, e - first_expert, w, leaf, t.to(device), backend, nz, device)
            else:
                if put_tensor(model, targets, name, t, source=str(info.file), error=CheckpointError):
                    targets = {n: x for n, x in model.checkpoint_tensors() if not x.is_meta}
            report.loaded += 1
            report.bytes_read += info.nbytes
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{d}: incomplete int8 tensors for {left[:3]}")
    model.eval()
    model.load_report = report
    if progress:
        print(report.summary(), file=sys.stderr)
    return model


def _meta_shape(holders, where) -> tuple[int, ...]:
    """Shape [N, K] of one int8 weight from the (meta) model: where = (holder key, expert, w1/w2/w3, leaf)."""
    key, _, w, _ = where
    kind, mod = holders[key]
    if kind == "linear":
        return tuple(mod.weight.shape)
    if kind == "shared":
        return tuple(getattr(mod, w).weight.shape)
    return tuple(getattr(mod, w).shape[1:])


def _absorb(pending: dict, holders: dict, key: str, e: int, w: str, leaf: str, t: Tensor, backend, nz: bool,
            device) -> None:
    """Collect one stored int8 tensor; register the holder with the backend once all of its tensors arrived."""
    kind, mod = holders[key]
    if kind == "linear":
        st = pending.setdefault(key, {})
        st[leaf] = t
        if len(st) == 2:
            kn = st["weight"].t().contiguous()
            mod.weight = nn.Parameter(_placeholder((kn.shape[1], kn.shape[0]), device) if nz else kn.t(),
                                      requires_grad=False)
            backend.register_linear(mod.weight, kn, st["scale"].reshape(-1), nz=nz)
            del pending[key]
        return
    if kind == "shared":
        n_inter, dim = mod.w1.weight.shape
        lead: tuple[int, ...] = ()
    else:
        n_inter, dim = mod.w1.shape[1:]
        lead = (mod.count,)
    st = pending.get(key)
    if st is None:
        st = pending[key] = {
            "w13": torch.empty(*lead, dim, 2 * n_inter, dtype=torch.int8, device=device),
            "w2": torch.empty(*lead, n_inter, dim, dtype=torch.int8, device=device),
            "s13": torch.empty(*lead, 2 * n_inter, dtype=torch.float32, device=device),
            "s2": torch.empty(*lead, dim, dtype=torch.float32, device=device), "n": 0}
    ix = (e,) if lead else ()
    cols = {"w1": slice(0, n_inter), "w3": slice(n_inter, 2 * n_inter)}
    if leaf == "weight":
        if w == "w2":
            st["w2"][ix] = t.t()
        else:
            st["w13"][ix][:, cols[w]] = t.t()
    elif w == "w2":
        st["s2"][ix] = t.reshape(-1)
    else:
        st["s13"][ix][cols[w]] = t.reshape(-1)
    st["n"] += 1
    if st["n"] < 6 * (lead[0] if lead else 1):
        return
    w13, w2 = st["w13"], st["w2"]
    if kind == "shared":
        views = {"w1": w13[:, : n_inter].t(), "w3": w13[:, n_inter:].t(), "w2": w2.t()}
        for name, v in views.items():
            lin = getattr(mod, name)
            lin.weight = nn.Parameter(_placeholder(v.shape, device) if nz else v, requires_grad=False)
        backend.register_shared(mod.w1.weight, w13, st["s13"], w2, st["s2"], nz=nz)
    else:
        views = {"w1": w13[:, :, : n_inter].transpose(1, 2), "w3": w13[:, :, n_inter:].transpose(1, 2),
                 "w2": w2.transpose(1, 2)}
        for name, v in views.items():
            setattr(mod, name, nn.Parameter(_placeholder(v.shape, device) if nz else v, requires_grad=False))
        backend.register_routed(mod.w1, w13, st["s13"], w2, st["s2"], nz=nz)
    del pending[key]


def _absorb_routed_int4(pending: dict, key: str, mod: nn.Module, e: int, w: str, leaf: str, t: Tensor, backend,
                        nz: bool, device) -> None:
    """Collect one stored W4A8 expert tensor (int32 [K, N/8] packed along N, fp32 scale [N, 1], fp32 assistance
    bias [N]); once the layer's 9 * count tensors arrived, hand them to backend.register_routed_int4 unchanged (w1
    and w3 side by side along N, as the GMM1 weight wants) and give the model zero-byte placeholders."""
    n_inter, dim = mod.w1.shape[1:]
    st = pending.get(key)
    if st is None:
        if n_inter % 8 or dim % 8:
            raise CheckpointError(f"{key}: int4 experts need intermediate ({n_inter}) and hidden ({dim}) sizes that "
                                  "are multiples of 8 (eight int4 per int32 along N)")
        c = mod.count
        st = pending[key] = {
            "w13": torch.empty(c, dim, 2 * n_inter // 8, dtype=torch.int32, device=device),
            "w2": torch.empty(c, n_inter, dim // 8, dtype=torch.int32, device=device),
            "s13": torch.empty(c, 2 * n_inter, dtype=torch.float32, device=device),
            "b13": torch.empty(c, 2 * n_inter, dtype=torch.float32, device=device),
            "s2": torch.empty(c, dim, dtype=torch.float32, device=device),
            "b2": torch.empty(c, dim, dtype=torch.float32, device=device), "n": 0}
    half = {"w1": 0, "w3": 1}.get(w)
    if leaf == "weight":
        dst = st["w2"][e] if w == "w2" else st["w13"][e][:, half * n_inter // 8:(half + 1) * n_inter // 8]
    else:
        tab = st[("s" if leaf == "scale" else "b") + ("2" if w == "w2" else "13")][e]
        dst = tab if w == "w2" else tab[half * n_inter:(half + 1) * n_inter]
    dst.copy_(t.reshape(dst.shape))
    st["n"] += 1
    if st["n"] < 9 * mod.count:
        return
    for name in ("w1", "w2", "w3"):
        setattr(mod, name, nn.Parameter(_placeholder(getattr(mod, name).shape, device), requires_grad=False))
    backend.register_routed_int4(mod.w1, st["w13"], st["s13"], st["b13"], st["w2"], st["s2"], st["b2"], nz=nz)
    del pending[key]
