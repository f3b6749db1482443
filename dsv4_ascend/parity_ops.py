"""Per-op local differences of two backends: every top-level backend op of a reference run is run again by the
other backend on the same inputs, so each figure is that op's own difference (no error carried in from earlier
ops). `dsv4 parity --per-op`; docs/ascend.md "bf16 parity at real widths" shows what it found."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["OPS", "OpDiff", "op_diffs", "format_op_diffs"]

# The Backend ops the model calls (docs/design.md); cache writes and sampling are left out.
OPS = ("rms_norm", "rope", "linear", "grouped_linear", "hc_pre", "hc_post", "hc_head", "compressor", "indexer_topk",
       "attend", "route", "experts", "swiglu_mlp", "lm_head")
_STATE_ARG = {"compressor": 6}  # ops that update an argument in place: the second run gets a copy


@dataclass
class OpDiff:
    """One (layer, op output): calls, relative RMS difference (fp64 sums), max |diff|, share of differing values."""

    layer: str
    op: str
    calls: int = 0
    sq_diff: float = 0.0
    sq_ref: float = 0.0
    max_abs: float = 0.0
    differ: int = 0
    count: int = 0

    @property
    def rel_rms(self) -> float:
        return math.sqrt(self.sq_diff / self.sq_ref) if self.sq_ref else (0.0 if self.sq_diff == 0 else math.inf)

    def add(self, a: Tensor, b: Tensor) -> None:
        self.calls += 1
        self.count += a.numel()
        if not a.is_floating_point():
            self.differ += int((a != b).sum())
            return
        same_nan = a.isnan() & b.isnan()  # rows a contract leaves unspecified may be NaN on both sides
        self.differ += int(((a != b) & ~same_nan).sum())
        a, b = a.masked_fill(same_nan, 0), b.masked_fill(same_nan, 0)
        if a.numel():
            d = a.double() - b.double()
            self.sq_diff += float(d.square().sum())
            self.sq_ref += float(a.double().square().sum())
            self.max_abs = max(self.max_abs, float(d.abs().max()))


@torch.no_grad()
def op_diffs(model, other, ids: Tensor, decode_steps: int) -> list[OpDiff]:
    """Run `model` (its own backend) on ids [B, S] + `decode_steps` greedy steps; every top-level op call is also
    made on backend `other` with the same arguments and the outputs compared (the compressor's on the rows of
    closed windows: the contract leaves the others unspecified)."""
    be = model.backend
    stats: dict[tuple[str, str], OpDiff] = {}
    where = {"layer": "embed"}
    depth = [0]

    def wrap(name: str):
        mine, theirs = getattr(be, name), getattr(other, name)

        def call(*args, **kw):
            if depth[0]:  # an op called from inside another op: part of that op
                return mine(*args, **kw)
            depth[0] += 1
            try:
                copy = list(args)
                if name in _STATE_ARG:
                    copy[_STATE_ARG[name]] = args[_STATE_ARG[name]].clone()
                out = mine(*args, **kw)
                out2 = theirs(*copy, **kw)
            finally:
                depth[0] -= 1
            outs, outs2 = (out, out2) if isinstance(out, tuple) else ((out,), (out2,))
            if name == "compressor":  # only closed windows' rows are specified (Backend.compressor)
                closed = _closed_windows(args, kw, out.shape[1])
                outs, outs2 = (out[closed],), (out2[closed],)
            for i, (a, b) in enumerate(zip(outs, outs2)):
                key = (where["layer"], f"{name}[{i}]" if len(outs) > 1 else name)
                stats.setdefault(key, OpDiff(*key)).add(a, b)
            return out
        return call

    hooks = [layer.register_forward_pre_hook(lambda *_, i=i: where.update(layer=f"layer {i}"))
             for i, layer in enumerate(model.layers)]
    hooks.append(model.norm.register_forward_pre_hook(lambda *_: where.update(layer="head")))
    for name in OPS:
        setattr(be, name, wrap(name))
    try:
        b, s = ids.shape
        slots = torch.arange(b, device=ids.device)
        cache = model.new_cache(b, s + decode_steps)
        lg = model(ids, cache, slots, 0)
        for t in range(decode_steps):
            lg = model.decode(lg[:, -1].argmax(-1).view(b, 1), torch.full((b,), s + t, device=ids.device), cache,
                              slots, max_len=s + t + 1)
    finally:
        for name in OPS:
            delattr(be, name)  # back to the class's methods
        for h in hooks:
            h.remove()
    return list(stats.values())


def _closed_windows(args: tuple, kw: dict, n_rows: int) -> Tensor:
    """[B, n_rows] bool: entry j of row b (window start[b] // ratio + j) is closed by the chunk's tokens."""
    x, start, ratio = args[0], args[8], args[11]
    used = kw.get("used", args[12] if len(args) > 12 else None)
    end = start + (x.shape[1] if used is None else used)
    w = (start // ratio).unsqueeze(1) + torch.arange(n_rows, device=start.device)
    return (w + 1) * ratio <= end.unsqueeze(1)


def format_op_diffs(diffs: list[OpDiff]) -> str:
    lines = ["per op (each op re-run by the Ascend backend on the reference's inputs; identical ops not listed)",
             f"{'layer':<8} {'op':<16} {'calls':>5} {'rel RMS':>10} {'max|diff|':>10} {'differ':>9}"]
    for d in diffs:
        if d.differ:
            lines.append(f"{d.layer:<8} {d.op:<16} {d.calls:>5} {d.rel_rms:>10.3e} {d.max_abs:>10.3e} "
                         f"{d.differ / d.count:>9.4%}")
    if len(lines) == 2:
        lines.append("every op output identical")
    return "\n".join(lines)
