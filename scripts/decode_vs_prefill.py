"""Where teacher-forced decode and a full prefill of the same tokens round differently, module by module.

Runs one random model (reference backend) twice over the same token ids: a full prefill of all S tokens, and
a prefill of the first P tokens followed by S-P one-token decode steps (teacher forcing). Every module's input
and output at the decode positions are captured in both runs. A module whose input is bit-identical in both runs
but whose output is not rounds differently itself; a module whose input already differs inherits the difference.

    python scripts/decode_vs_prefill.py --preset small --dtype bf16 --tokens 96 --prefill 32
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch import Tensor, nn

from dsv4_ascend.backend import RunOptions
from dsv4_ascend.config import preset
from dsv4_ascend.model import Attention, Block, Expert, Linear, MoE, RMSNorm, Transformer, WeightFormats
from dsv4_ascend.reference import ReferenceBackend
from dsv4_ascend.tiny import official_tensors, random_weights
from dsv4_ascend.weights import assign_tensors

_KINDS = (Linear, RMSNorm, Attention, MoE, Expert, Block)


def _capture(model: nn.Module, store: dict[str, list[tuple[Tensor, Tensor]]]) -> list:
    """Forward hooks recording (first tensor input, output) of every module of _KINDS, per call, by name."""
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, _KINDS) and not name.startswith("mtp"):
            def hook(m, args, out, name=name):
                store[name].append((args[0].detach().clone(), out.detach().clone()))
            handles.append(mod.register_forward_hook(hook))
    return handles


def _rows(t: Tensor, s: int) -> Tensor:
    """t with its token dim (size s: dim 1 of [1,S,...] or dim 0 of [S,...]) moved first, flattened per token."""
    d = 1 if t.dim() > 2 and t.shape[0] == 1 and t.shape[1] == s else 0
    return t.movedim(d, 0).reshape(s, -1)


def compare(model: Transformer, ids: Tensor, prefill: int) -> list[tuple[str, float, float, float]]:
    """(module, input rel-RMS diff, output rel-RMS diff, share of output values that differ) at decode positions."""
    s = ids.shape[1]
    full: dict = defaultdict(list)
    hs = _capture(model, full)
    model(ids)
    for h in hs:
        h.remove()
    inc: dict = defaultdict(list)
    cache = model.new_cache(1, s)
    slots = torch.arange(1)
    model(ids[:, :prefill], cache, slots, 0)
    inc.clear()  # only the decode steps
    hs = _capture(model, inc)
    for t in range(prefill, s):
        model.decode(ids[:, t:t + 1], torch.tensor([t]), cache, slots)
    for h in hs:
        h.remove()
    rows = []
    for name, calls in full.items():
        (xin, xout), = calls  # one call per forward
        fin, fout = _rows(xin, s)[prefill:].float(), _rows(xout, s)[prefill:].float()
        din = torch.cat([_rows(a, 1) for a, _ in inc[name]]).float()
        dout = torch.cat([_rows(b, 1) for _, b in inc[name]]).float()

        def rel(a: Tensor, b: Tensor) -> float:
            return ((a - b).square().mean().sqrt() / b.square().mean().sqrt().clamp_min(1e-30)).item()

        rows.append((name, rel(din, fin), rel(dout, fout), (dout != fout).float().mean().item()))
    return rows


def build(name: str, dtype: torch.dtype, numerics: str, quantized: bool, seed: int) -> Transformer:
    cfg = preset(name)
    fmt = WeightFormats.from_config(cfg) if quantized else WeightFormats()
    model = Transformer(cfg, ReferenceBackend(RunOptions(numerics)), dtype, fmt)
    assign_tensors(model, (official_tensors(cfg, seed) if quantized else random_weights(cfg, seed)).items())
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", choices=("tiny", "small"))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--numerics", default="exact", choices=("exact", "deepseek"))
    ap.add_argument("--quantized", action="store_true", help="official FP8/FP4 weight formats (default: plain)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all", action="store_true", help="every module (default: only those that add a difference "
                                                       "and each layer's attn / ffn / block output)")
    ap.add_argument("--router-fp64", action="store_true",
                    help="router logits accumulated in fp64 (what-if: the fp32 router GEMM is the last op that "
                         "rounds differently for one row and many)")
    args = ap.parse_args()
    if args.router_fp64:
        import dsv4_ascend.model as model_module

        model_module.fp32_linear = lambda x, w: (x.double() @ w.double().t()).float()  # only Gate uses it there
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build(args.preset, dtype, args.numerics, args.quantized, args.seed)
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    rows = compare(model, ids, args.prefill)
    print(f"{'module':34s} {'in rel':>9s} {'out rel':>9s} {'out differ':>10s}")
    for name, rin, rout, share in rows:
        own = rin == 0 and rout > 0
        summary = name.count(".") <= 2 and name.split(".")[-1] in ("attn", "ffn") or name.count(".") == 1
        if args.all or own or summary:
            print(f"{name:34s} {rin:9.2e} {rout:9.2e} {share:10.2%}{'  <- rounds differently' if own else ''}")
    # logits: the end-to-end figure
    full = model(ids)[0, args.prefill:]
    cache = model.new_cache(1, args.tokens)
    model(ids[:, :args.prefill], cache, torch.arange(1), 0)
    dec = torch.cat([model.decode(ids[:, t:t + 1], torch.tensor([t]), cache, torch.arange(1))[0]
                     for t in range(args.prefill, args.tokens)])
    rel = ((dec - full).square().mean().sqrt() / full.square().mean().sqrt()).item()
    top1 = (dec.argmax(-1) == full.argmax(-1)).float().mean().item()
    print(f"logits: relative RMS {rel:.2e}, top-1 agreement {top1:.1%} over {args.tokens - args.prefill} "
          "decode positions")


if __name__ == "__main__":
    main()
