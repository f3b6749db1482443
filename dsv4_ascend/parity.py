"""`dsv4 parity`: the Ascend backend against the reference backend on one checkpoint and one prompt.

Both models are loaded from the same directory (the Ascend one may instead come from a `dsv4 convert --target a3`
directory). The prompt is prefilled, then `decode_steps` greedy steps are decoded with the KV cache; the Ascend
model is fed the *reference's* tokens (teacher forcing), so the two stay on the same sequence and one flipped
near-tie cannot snowball into a different continuation. Forward hooks on `model.layers[i]` capture each
layer's output streams [B, S, n, D] and each router's expert choices; the two runs are interleaved step by step
and every per-layer figure is accumulated on the fly.

Figures: per layer max |ref - ascend|, cosine and the tokens whose routed experts differ; for the logits the
cosine, the worst single-position cosine, the relative RMS error and top-1 agreement (prompt, decode, both).

Bounds. Fixed per --quant for the integer / FP8 paths (DEFAULT_TOLERANCE). For --quant bf16 with bf16 activations
they are derived from the format on this very model and prompt (FLOOR_FACTOR, FLIP_FACTOR): the reference is run a third
time in fp32 on the same tokens, and its bf16 error against that run (the "floor") bounds what two bf16
implementations that round at the same points may differ by. The run fails (exit 1) past any bound.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DEFAULT_TOLERANCE", "ParityResult", "run_parity", "format_report", "add_parity_args", "parity_main"]

# (min logit cosine, min top-1 agreement) per Ascend quant mode, from the formats and measured on the tiny
# default model (32 random prompt tokens + 32 decode steps, seeds 0-7, bf16 activations):
# - bf16 with --dtype float32: the emulated ops compute where the reference computes, in fp32; only fp32
#   summation order differs (2^-24 relative per sum). Bounds 0.9999 / 0.99. With bf16 activations the bounds
#   are derived per run from the bf16 format instead (FLOOR_FACTOR below): at V4's real widths (K = 4096 sums) the
#   two backends' fp32 sums round to neighbouring bf16 values in ~0.01-0.1% of the elements of an op's output,
#   and a random model amplifies that layer by layer and flips routing near-ties, so no fixed bar fits every
#   model, width and prompt.
# - w8a8: one int8 operand rounds with error step/sqrt(12), step = amax/127, i.e. ~0.8% of a Gaussian row's
#   RMS, ~1.1% per GEMM with both operands quantised (~4x bf16's 2^-9); int8 indexer scores also flip some
#   top-k picks, and the model amplifies this to 6-14% RMS on the logits. Measured: cosine 0.990-0.998,
#   top-1 92-95%. Bounds 0.98 / 0.80 (as tests/test_ascend_parity.py); a broken int8 path (wrong scale axis,
#   transposed weight) gives O(1) error and chance-level top-1.
DEFAULT_TOLERANCE = {"bf16": (0.9999, 0.99), "w8a8": (0.98, 0.80)}
# - fp8 / mxfp8 (Ascend 950 native paths): every FP8 GEMM input gets one e4m3 rounding (3 mantissa bits: ~2.5%
#   RMS per element and per GEMM, ~30x bf16) that the exact reference lacks, or a different one than DeepSeek's
#   power-of-two act-quant; the tiny model amplifies that like DeepSeek's own FP8 simulation (deepseek vs exact
#   reference: cosine ~0.99). Measured (seeds 0-2, exact and deepseek numerics): cosine 0.982-0.989, top-1
#   66-92%. Bounds 0.97 / 0.60; a broken scale layout gives cosine ~0.75 and top-1 ~12% (tests/test_ascend_950.py).
DEFAULT_TOLERANCE.update({"fp8": (0.97, 0.60), "mxfp8": (0.97, 0.60)})
# - w4a8 (A3, int4 routed experts): w8a8 plus int4 per-channel expert weights (qmax 7: step amax/7, ~9.6% RMS
#   weight error measured, vs ~0.55% for int8), so every routed expert output is ~17% off (sqrt(3) GEMM-chained
#   roundings, measured 18%); that is the format, not the runtime (against the reference on the same int4 weights
#   cosine 0.9985, tests/test_ascend_w4a8.py). Measured (seeds 0-3): cosine 0.970-0.979, top-1 69-75%.
#   Bounds 0.95 / 0.55.
DEFAULT_TOLERANCE["w4a8"] = (0.95, 0.55)


# Derived bf16 bounds. x = the reference in fp32 on the same tokens (weights as stored: their
# FP8 / FP4 values are exact in bf16 and fp32), r = the reference in bf16, a = the Ascend side in bf16. Both bf16
# runs round every op's output to bf16 once, at the same points (the emulated kernels accumulate in fp32 like the
# reference; docs/ascend.md), so a's bf16 error is distributed like r's: |a - x| ~ |r - x|. Hence
#   |a - r| <= |a - x| + |r - x| ~ 2 |r - x|:
# - cosine: 1 - cos ~ rel_rms^2 / 2 for small errors, so 1 - cos(a, r) <= FLOOR_FACTOR^2 * (1 - cos(r, x));
# - top-1: if a's argmax j differs from r's argmax i at a position, r_i - r_j <= |a_i - r_i| + |a_j - r_j|
#   <= 2 max|a - r| ~ 4 F, F = max_v |r_v - x_v| at that position. A flip whose reference margin r_i - r_j
#   exceeds FLIP_FACTOR * F is more than bf16 can explain and fails; smaller margins are near-ties bf16 cannot
#   decide, reported but allowed.
FLOOR_FACTOR = 2.0
FLIP_FACTOR = 4.0


class _Stat:
    """Running max |a - b| and cosine of two tensor streams (fp64 sums of the small captured tensors)."""

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.dot = self.na = self.nb = self.nd = 0.0
        self.count = 0

    def add(self, a: Tensor, b: Tensor) -> None:
        a, b = a.double().flatten(), b.double().flatten()
        d = a - b
        self.max_abs = max(self.max_abs, d.abs().max().item() if d.numel() else 0.0)
        if torch.isnan(d).any():
            self.max_abs = math.nan
        self.dot += (a * b).sum().item()
        self.na += a.square().sum().item()
        self.nb += b.square().sum().item()
        self.nd += d.square().sum().item()
        self.count += a.numel()

    @property
    def cosine(self) -> float:
        den = math.sqrt(self.na * self.nb)
        return self.dot / den if den > 0 else (1.0 if self.na == self.nb == 0 else 0.0)

    @property
    def rel_rms(self) -> float:
        return math.sqrt(self.nd / self.na) if self.na > 0 else math.inf


def _logit_figures(ref: Tensor, got: Tensor) -> dict:
    """Cosine (all positions), worst position cosine, rel RMS and max |diff| of logits [P, V] (fp64 sums)."""
    st = _Stat()
    st.add(ref, got)
    pos = torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=-1)
    return {"cosine": st.cosine, "min_pos_cosine": pos.min().item(), "rel_rms": st.rel_rms, "max_abs": st.max_abs,
            "top1": (ref.argmax(-1) == got.argmax(-1)).sum().item()}


@dataclass
class Flip:
    """A position where the two argmaxes differ: the reference's margin over the Ascend pick, and the bound."""

    position: int
    margin: float  # ref[ref argmax] - ref[ascend argmax]
    allowed: float  # FLIP_FACTOR * max |ref - fp32 ref| at this position (inf without a floor run)


@dataclass
class ParityResult:
    """Everything `dsv4 parity` prints; `passed` compares against the bounds it was run with."""

    model_dir: Path
    ascend_dir: Path
    quant: str
    dtype: str
    weights: str
    provider: str  # which npu module the Ascend backend used (be.provider)
    emulated: bool
    custom: str
    prompt_desc: str
    prompt_len: int
    decode_steps: int
    layers: list[tuple[str, float, float, int, int]]  # (label, max_abs, cosine, tokens routed differently, tokens)
    logits_max_abs: float
    logits_cosine: float
    logits_min_pos_cosine: float
    logits_rel_rms: float
    top1_prompt: tuple[int, int]  # (agreeing, total)
    top1_decode: tuple[int, int]
    min_cosine: float
    min_top1: float | None  # None: top-1 judged by the flips' margins (derived bf16 bounds)
    flips: list[Flip] = field(default_factory=list)
    floor: dict | None = None  # reference bf16 vs fp32 figures (derived bounds)
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_gib: float = 0.0
    kv_fp8: bool = False  # both models ran with C8 (FP8) KV caches
    op_diffs: list | None = None  # parity_ops.OpDiff per (layer, op) with --per-op

    @property
    def top1(self) -> float:
        n = self.top1_prompt[1] + self.top1_decode[1]
        return (self.top1_prompt[0] + self.top1_decode[0]) / n if n else 1.0

    @property
    def failures(self) -> list[str]:
        out = []
        if not self.logits_cosine >= self.min_cosine:  # NaN fails
            out.append(f"logit cosine {self.logits_cosine:.6f} < --min-cosine {self.min_cosine:.6g}")
        if self.min_top1 is not None and not self.top1 >= self.min_top1:
            out.append(f"top-1 agreement {self.top1:.2%} < --min-top1 {self.min_top1:.2%}")
        for f in self.flips:
            if not f.margin <= f.allowed:
                out.append(f"top-1 flip at position {f.position} with reference margin {f.margin:.4g} > "
                           f"{FLIP_FACTOR:g} x its bf16 error ({f.allowed:.4g})")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures


def _layer_label(cfg, i: int) -> str:
    r = cfg.layer_ratios[i]
    kind = "SWA" if r == 0 else ("CSA" if r == 4 else f"HCA/{r}")
    return f"{i:>3} {kind:<7} {'hash' if i < cfg.num_hash_layers else 'score'}"


def _describe_npu(be) -> tuple[str, bool, str]:
    emulated = bool(getattr(be, "emulated", False))
    if emulated:
        why = be.provider.partition("(")[2].rstrip(")")
        npu = "emulated (dsv4_ascend.ops.emulator" + (f"; {why})" if why else ")")
    else:
        ver = getattr(be.npu, "__version__", "")
        npu = f"{getattr(be.npu, '__name__', be.provider)} {ver}".strip()
    custom = be.custom
    if custom is None:
        cdesc = "none (composites of built-in ops)"
    elif getattr(custom, "IS_EMULATOR", False):
        cdesc = "emulated"
    else:
        cdesc = "torch.ops.custom"
    return npu, emulated, cdesc


def _prompt_ids(path: Path, vocab: int, prompt: str | None, tokens: int, seed: int) -> tuple[Tensor, str]:
    if prompt is not None:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(path)
        ids = [tok.bos_id] + tok.encode(prompt)
        return torch.tensor([ids], dtype=torch.long), f"text {prompt!r} ({len(ids)} tokens with BOS)"
    if tokens < 1:
        raise ValueError(f"--tokens must be >= 1, found {tokens}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, tokens), generator=g), f"{tokens} random token ids (seed {seed})"


def _resolve_weights(weights: str, quant: str, numerics: str) -> str:
    """"auto" -> "bf16" (dequantise once at load) where that gives the per-call values bit for bit, else "native".

    FP8 x 2^k and FP4 x 2^k are exact in bf16 and fp32, so in exact numerics a bf16-path GEMM sees the same
    numbers either way; deepseek numerics act-quantise only in front of quantised weights, and the integer / 950
    schemes read the stored formats, so those keep "native"."""
    if weights not in ("auto", "native", "bf16"):
        raise ValueError(f"weights must be 'auto', 'native' or 'bf16', found {weights!r}")
    dense_ok = quant == "bf16" and numerics == "exact"
    if weights == "bf16" and not dense_ok:
        raise ValueError(f"--weights bf16 needs --quant bf16 and --numerics exact (found {quant} / {numerics}): "
                         "deepseek numerics act-quantise only in front of quantised weights, and the integer / "
                         "FP8 schemes read the stored formats")
    return ("bf16" if dense_ok else "native") if weights == "auto" else weights


def _teacher_forced(model, ids: Tensor, steps: int, tokens: Tensor | None = None, kv_fp8: bool = False):
    """Prefill ids [B, S], then `steps` decode steps fed `tokens` [B, steps] (None: the model's own argmax).
    Yields ("prompt" | "decode", logits [B, n, V]) per call."""
    b, s = ids.shape
    slots = torch.arange(b, device=ids.device)
    cache = model.new_cache(b, s + steps, kv_fp8=kv_fp8)
    lg = model(ids, cache, slots, 0)
    yield "prompt", lg
    for t in range(steps):
        nxt = lg[:, -1].argmax(-1) if tokens is None else tokens[:, t]
        pos = torch.full((b,), s + t, device=ids.device)
        lg = model.decode(nxt.view(b, 1), pos, cache, slots, max_len=s + t + 1)
        yield "decode", lg


def _same_weights(src, backend, dtype: torch.dtype):
    """Another Transformer over `src`'s weight tensors (no copies) with `backend` and activation `dtype`.

    Every op casts its weights to the activation dtype per call (`weight.to(x.dtype)`, `dequantize(..., dtype)`),
    so bf16 or packed weights serve an fp32 run unchanged; only the embedding table is read without one and gets
    a `dtype` copy (tests/test_parity_convert.py checks the result against a model loaded in `dtype`)."""
    from .model import Transformer

    # Built on the meta device (no allocation: torch.zeros would write the whole model once more), then given
    # src's tensors; the model has no tensors outside its state dict.
    m = Transformer(src.cfg, backend, dtype, src.formats, device="meta", n_mtp=len(src.mtp),
                    expert_range=src.expert_range)
    sd = src.state_dict()
    sd["embed.weight"] = sd["embed.weight"].to(dtype)
    m.load_state_dict(sd, assign=True)
    return m.eval()


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


@torch.no_grad()
def run_parity(model_dir: str | Path | None = None, *, ascend_model: str | Path | None = None, quant: str = "bf16",
               dtype: str = "bfloat16", prompt: str | None = None, tokens: int = 16, seed: int = 0,
               decode_steps: int = 16, numerics: str = "exact", device: str = "cpu", weights: str = "auto",
               min_cosine: float | None = None, min_top1: float | None = None, npu=None,
               progress: bool = False, kv_fp8: bool = False, per_op: bool = False) -> ParityResult:
    """Load both models, run the prompt and the teacher-forced greedy decode, return the figures.

    `ascend_model`: load the Ascend side from this directory instead (e.g. a `dsv4 convert --target a3` output;
    such a checkpoint implies quant="w8a8"). `npu`: the Ascend backend's operator module (default: torch_npu
    when usable, else the emulator). `kv_fp8`: both models keep C8 (FP8) KV caches (the same stored rows).
    `weights`: see `_resolve_weights`. `per_op`: also each op's own difference (`parity_ops.op_diffs`: the
    reference run once more, every op repeated by the Ascend backend). Bounds not given are the quant's
    defaults, or for bf16 with bf16 activations derived from the fp32 floor run (FLOOR_FACTOR).
    """
    import gc

    from .backend import RunOptions
    from .converted import converted_quant
    from .loading import load_checkpoint, resolve_model_dir
    from .ops import AscendBackend
    from .reference import ReferenceBackend

    if quant not in DEFAULT_TOLERANCE:
        raise ValueError(f"quant must be one of {sorted(DEFAULT_TOLERANCE)}, found {quant!r}")
    _check_args(tokens if prompt is None else 1, seed, decode_steps, min_cosine, min_top1, device)
    path = resolve_model_dir(model_dir)
    asc_path = resolve_model_dir(ascend_model) if ascend_model else path
    if converted_quant(path) is not None:
        raise ValueError(f"{path} is a checkpoint converted for Atlas A2/A3 (int8); the reference backend needs "
                         "the official checkpoint: pass that as --model and this one as --ascend-model")
    # The int8/int4 weights of a converted directory are the checkpoint's; only the matching integer path runs them.
    quant = converted_quant(asc_path) or quant
    weights = _resolve_weights(weights, quant, numerics)
    if per_op and kv_fp8:
        raise ValueError("--per-op compares the ops over plain KV caches; it does not take --kv-fp8")
    derive = quant == "bf16" and dtype == "bfloat16" and (min_cosine is None or min_top1 is None)
    d_min_cos, d_min_top1 = DEFAULT_TOLERANCE[quant]
    tdtype = getattr(torch, dtype)
    opts = RunOptions(numerics)
    secs: dict[str, float] = {}

    t0 = time.perf_counter()
    ref = load_checkpoint(path, backend=ReferenceBackend(opts), dtype=tdtype, weights=weights, device=device,
                          progress=progress)
    be = AscendBackend(npu=npu, options=opts, quant=quant)
    # Same directory: the Ascend model runs on the reference's weight tensors (one copy in memory).
    asc = (load_checkpoint(asc_path, backend=be, dtype=tdtype, device=device, progress=progress) if ascend_model
           else _same_weights(ref, be, tdtype))
    if quant in ("w8a8", "w4a8") and not be.scheme.n_prepared:
        be.prepare(asc)  # official checkpoint: quantise at load (a converted one arrives registered)
    secs["load"] = time.perf_counter() - t0

    cfg = ref.cfg
    ids, desc = _prompt_ids(path, cfg.vocab_size, prompt, tokens, seed)
    ids = ids.to(device)
    b, s = ids.shape
    n_layers = len(ref.layers)
    layer_stats = [_Stat() for _ in range(n_layers)]
    routed = [[0, 0] for _ in range(n_layers)]  # tokens whose expert sets differ, tokens
    captured: dict[str, list] = {"ref": [None] * n_layers, "asc": [None] * n_layers,
                                 "ref_ids": [None] * n_layers, "asc_ids": [None] * n_layers}

    def hook(key: str, i: int, item: int | None = None):
        def fn(_mod, _inp, out):
            captured[key][i] = (out if item is None else out[item]).detach()
        return fn

    handles = []
    for side, model in (("ref", ref), ("asc", asc)):
        for i, layer in enumerate(model.layers):
            handles.append(layer.register_forward_hook(hook(side, i)))
            gate = getattr(layer.ffn, "gate", None)
            if gate is not None:
                handles.append(gate.register_forward_hook(hook(f"{side}_ids", i, 1)))

    ref_logits, asc_logits, phases, chosen = [], [], [], []
    slots = torch.arange(b, device=ids.device)
    cache_a = asc.new_cache(b, s + decode_steps, kv_fp8=kv_fp8)
    t0 = time.perf_counter()
    try:
        for step, (phase, lr) in enumerate(_teacher_forced(ref, ids, decode_steps, kv_fp8=kv_fp8)):
            if step == 0:
                la = asc(ids, cache_a, slots, 0)
            else:  # teacher forcing: the Ascend side continues with the reference's token
                pos = torch.full((b,), s + step - 1, device=ids.device)
                la = asc.decode(chosen[-1].view(b, 1), pos, cache_a, slots, max_len=s + step)
            for i, st in enumerate(layer_stats):
                st.add(captured["ref"][i], captured["asc"][i])
                ri, ai = captured["ref_ids"][i], captured["asc_ids"][i]
                if ri is not None:
                    routed[i][0] += (ri.sort(-1).values != ai.sort(-1).values).any(-1).sum().item()
                    routed[i][1] += ri.shape[0]
            ref_logits.append(lr.float())
            asc_logits.append(la.float())
            phases += [phase] * lr.shape[1]
            chosen.append(lr[:, -1].argmax(-1))
    finally:
        for h in handles:
            h.remove()
    secs["run"] = time.perf_counter() - t0
    ops = None
    if per_op:
        from .parity_ops import op_diffs

        t0 = time.perf_counter()
        ops = op_diffs(ref, be, ids, decode_steps)
        secs["per-op"] = time.perf_counter() - t0
    npu_desc, emulated, custom_desc = _describe_npu(be)
    del asc, be, cache_a
    captured.clear()
    gc.collect()
    ref_l = torch.cat(ref_logits, 1).flatten(0, 1)  # [P, V], positions of every batch row
    asc_l = torch.cat(asc_logits, 1).flatten(0, 1)
    is_prompt = torch.tensor([p == "prompt" for p in phases] * b)

    floor = None
    allowed = torch.full((ref_l.shape[0],), math.inf)
    if derive:  # the fp32 floor: the same reference, same tokens, fp32 activations
        t0 = time.perf_counter()
        x32 = _same_weights(ref, ReferenceBackend(opts), torch.float32)
        forced = torch.stack(chosen[:-1], 1) if decode_steps else None
        fl = torch.cat([lg.float() for _, lg in _teacher_forced(x32, ids, decode_steps, forced, kv_fp8=kv_fp8)], 1).flatten(0, 1)
        del x32
        secs["floor"] = time.perf_counter() - t0
        floor = _logit_figures(fl, ref_l)
        floor["positions"] = ref_l.shape[0]
        allowed = FLIP_FACTOR * (ref_l - fl).abs().amax(-1)
        d_min_cos = 1.0 - FLOOR_FACTOR**2 * (1.0 - floor["cosine"])
        d_min_top1 = None
    min_cosine = d_min_cos if min_cosine is None else min_cosine
    min_top1 = d_min_top1 if min_top1 is None else min_top1

    fig = _logit_figures(ref_l, asc_l)
    ra, aa = ref_l.argmax(-1), asc_l.argmax(-1)
    same = ra == aa
    flips = []
    if min_top1 is None:
        margin = ref_l.gather(-1, ra[:, None]) - ref_l.gather(-1, aa[:, None])
        flips = [Flip(int(p), margin[p].item(), allowed[p].item()) for p in (~same).nonzero().flatten()]
    n_prompt = int(is_prompt.sum())
    return ParityResult(
        model_dir=path, ascend_dir=asc_path, quant=quant, dtype=dtype, weights=weights, provider=npu_desc,
        emulated=emulated, custom=custom_desc, prompt_desc=desc, prompt_len=s, decode_steps=decode_steps,
        layers=[(_layer_label(cfg, i), st.max_abs, st.cosine, *routed[i]) for i, st in enumerate(layer_stats)],
        logits_max_abs=fig["max_abs"], logits_cosine=fig["cosine"], logits_min_pos_cosine=fig["min_pos_cosine"],
        logits_rel_rms=fig["rel_rms"], top1_prompt=(int(same[is_prompt].sum()), n_prompt),
        top1_decode=(int(same[~is_prompt].sum()), len(same) - n_prompt), min_cosine=min_cosine,
        min_top1=min_top1, flips=flips, floor=floor, seconds=secs, peak_rss_gib=_peak_rss_gib(),
        kv_fp8=kv_fp8, op_diffs=ops)


def _pct(a: int, n: int) -> str:
    return f"{a}/{n} ({a / n:.1%})" if n else "0/0"


def format_report(r: ParityResult) -> str:
    lines = [
        f"model:     {r.model_dir}" + (f"  (ascend side: {r.ascend_dir})" if r.ascend_dir != r.model_dir else ""),
        f"weights:   {r.weights}" + (" (FP8/FP4 dequantised once at load: the same values the GEMMs would see)"
                                     if r.weights == "bf16" else " (as stored, dequantised per GEMM)"),
        f"reference: ReferenceBackend (plain torch), {r.dtype}" + ("; C8 (FP8) KV caches on both sides" if r.kv_fp8
                                                                    else ""),
        f"ascend:    AscendBackend quant={r.quant}, {r.dtype}; npu ops: {r.provider}; custom ops: {r.custom}",
        f"prompt:    {r.prompt_desc}; then {r.decode_steps} greedy decode steps (teacher-forced with the "
        "reference's tokens)",
        "",
        "layer output streams (all positions)",
        f"{'layer':<17} {'max|diff|':>10} {'cosine':>10} {'routed differently':>19}",
    ]
    for label, mx, cos, nr, nt in r.layers:
        lines.append(f"{label:<17} {mx:>10.3e} {cos:>10.6f} {f'{nr}/{nt} tokens' if nt else '-':>19}")
    lines += [
        "",
        f"logits: max|diff| {r.logits_max_abs:.3e}  cosine {r.logits_cosine:.6f}  worst position "
        f"{r.logits_min_pos_cosine:.6f}  rel RMS {r.logits_rel_rms:.2%}",
        f"top-1 agreement: prompt {_pct(*r.top1_prompt)}, decode {_pct(*r.top1_decode)}, all {r.top1:.2%}",
    ]
    if r.floor is not None:
        f = r.floor
        lines.append(f"bf16 floor (reference bf16 vs fp32, same tokens): cosine {f['cosine']:.6f}  worst position "
                     f"{f['min_pos_cosine']:.6f}  rel RMS {f['rel_rms']:.2%}  top-1 {_pct(f['top1'], f['positions'])}")
        lines.append(f"derived bounds: cosine >= 1 - {FLOOR_FACTOR:g}^2 x (1 - floor cosine) = {r.min_cosine:.6g}; a "
                     f"top-1 flip only where the reference margin <= {FLIP_FACTOR:g} x its bf16 error there")
    for fl in r.flips:
        lines.append(f"  top-1 flip at position {fl.position}: reference margin {fl.margin:.4g}, allowed "
                     f"{fl.allowed:.4g} ({'near-tie' if fl.margin <= fl.allowed else 'PAST THE BOUND'})")
    if r.op_diffs is not None:
        from .parity_ops import format_op_diffs

        lines += ["", format_op_diffs(r.op_diffs), ""]
    t = r.seconds
    lines.append(f"time: load {t.get('load', 0):.1f} s, run {t.get('run', 0):.1f} s"
                 + (f", per-op {t['per-op']:.1f} s" if "per-op" in t else "")
                 + (f", fp32 floor {t['floor']:.1f} s" if "floor" in t else "") + f"; peak RSS {r.peak_rss_gib:.2f} GiB")
    if r.passed:
        top = "top-1 flips at near-ties only" if r.min_top1 is None else f"top-1 >= {r.min_top1:.2%}"
        lines.append(f"PASS (cosine >= {r.min_cosine:.6g}, {top})")
    else:
        lines.append("FAIL: " + "; ".join(r.failures))
    return "\n".join(lines)


def _check_args(tokens: int, seed: int, decode_steps: int, min_cosine: float | None, min_top1: float | None,
                device: str) -> None:
    """Values that can never work, refused before any weight is read (ValueError naming the flag)."""
    from .loading import check_device

    if tokens < 1:
        raise ValueError(f"--tokens must be >= 1, found {tokens}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63 - 1], found {seed}")
    if decode_steps < 0:
        raise ValueError(f"--decode-steps must be >= 0, found {decode_steps}")
    for flag, v in (("--min-cosine", min_cosine), ("--min-top1", min_top1)):
        if v is not None and not math.isfinite(v):  # a bound above 1 is allowed: it forces a FAIL
            raise ValueError(f"{flag} must be a finite number, found {v}")
    check_device(device)


def add_parity_args(p: argparse.ArgumentParser) -> None:
    w8 = DEFAULT_TOLERANCE["w8a8"]
    p.add_argument("--model", default=None, help="official-format checkpoint directory (default: the tiny "
                   "random default model)")
    p.add_argument("--ascend-model", default=None, metavar="DIR",
                   help="load the Ascend side from DIR instead, e.g. the output of `dsv4 convert --target a3` "
                        "(implies --quant w8a8); --model stays the reference's checkpoint")
    p.add_argument("--quant", default="bf16", choices=sorted(DEFAULT_TOLERANCE),
                   help="Ascend-side quantisation: bf16 (plain GEMMs); w8a8 (Atlas A2/A3 int8 scheme: "
                        "per-channel int8 weights, per-token int8 activations); w4a8 (as w8a8 with int4 routed "
                        "experts); fp8 / mxfp8 (Ascend 950: FP8-block or MXFP8 linears, MXFP4 experts)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="activation dtype of "
                   "both models")
    p.add_argument("--kv-fp8", action="store_true", help="C8 (FP8) KV caches on both sides (the Ascend side "
                   "reads them with npu_kv_quant_sparse_attn_sharedkv)")
    p.add_argument("--numerics", default="exact", choices=["exact", "deepseek"], help="RunOptions.numerics "
                   "for both backends")
    p.add_argument("--weights", default="auto", choices=["auto", "native", "bf16"],
                   help="native: FP8/FP4 as stored, dequantised per GEMM; bf16: dequantised once at load (the "
                        "same values; needs --quant bf16 and --numerics exact); auto (default): bf16 where "
                        "allowed, else native")
    p.add_argument("--device", default="cpu", help="torch device of both models (npu on an Ascend machine)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=None, help="prompt text (tokenised with the model's tokenizer, BOS "
                   "prepended)")
    g.add_argument("--tokens", type=int, default=16, help="or: N random token ids as the prompt (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt (default 0)")
    p.add_argument("--decode-steps", type=int, default=16,
                   help="greedy decode steps after the prompt, teacher-forced with the reference's tokens "
                        "(default 16)")
    p.add_argument("--min-cosine", type=float, default=None,
                   help="fail below this cosine of the logits over all positions. Default: --quant bf16 with "
                        f"bf16 activations: derived from the reference's own bf16 error on this model and prompt "
                        f"(1 - {FLOOR_FACTOR:g}^2 x (1 - its cosine to an fp32 run); costs one fp32 run); "
                        f"otherwise per --quant, e.g. w8a8 {w8[0]} (int8 rounding, ~1%% RMS per GEMM)")
    p.add_argument("--min-top1", type=float, default=None,
                   help="fail below this top-1 agreement (fraction) over prompt + decode positions. Default: "
                        f"--quant bf16 with bf16 activations: no fraction; a flip fails where the reference's "
                        f"margin exceeds {FLIP_FACTOR:g} x its bf16 error at that position; otherwise per --quant, "
                        f"e.g. w8a8 {w8[1]} (int8 noise flips close calls)")
    p.add_argument("--per-op", action="store_true", help="also list each backend op whose output differs when "
                   "the Ascend backend re-runs it on the reference's inputs (its own difference, per layer)")
    p.add_argument("--progress", action="store_true", help="show the checkpoint loading bars")


def parity_main(args: argparse.Namespace) -> int:
    try:
        r = run_parity(args.model, ascend_model=args.ascend_model, quant=args.quant, dtype=args.dtype,
                       prompt=args.prompt, tokens=args.tokens, seed=args.seed, decode_steps=args.decode_steps,
                       numerics=args.numerics, device=args.device, weights=args.weights,
                       min_cosine=args.min_cosine, min_top1=args.min_top1, progress=args.progress,
                       kv_fp8=args.kv_fp8, per_op=args.per_op)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"dsv4 parity: error: {e}", file=sys.stderr)
        return 2
    print(format_report(r))
    return 0 if r.passed else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsv4 parity", description=__doc__.split("\n")[0])
    add_parity_args(ap)
    return parity_main(ap.parse_args(argv))
