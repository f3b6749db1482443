"""Lockstep over ranks for an engine that decides its own steps: every rank's model calls are paired so that the
collectives inside them (expert-parallel MoE layers, the vocab-parallel head) meet.

Each rank runs its own `Engine.step()`, which makes some sequence of model calls (prefill chunks, decode steps,
MTP drafts and verifies) that differs from rank to rank. A call's collectives depend only on its kind: which
blocks it runs (the main layers, or MTP block j; both end with the lm head) and which EP path it takes (static or
exact, `ExpertParallel.takes_static`). Before each call a rank announces its kind to every rank (one small
object all-gather on a host-side group); the smallest announced kind runs: the ranks that announced it make
their call, every other rank joins it with an empty batch (`parallel.idle_forward`) and announces again. At the
end of its step a rank announces "done" and keeps joining until every rank is done. Each round some rank makes
progress, so the step always ends; the announcements are host objects exchanged outside any captured graph.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch.distributed as dist
from torch import nn

from .parallel import idle_forward

__all__ = ["Lockstep"]

Kind = tuple[int, int, bool, bool]  # (0 main layers | 1 MTP block | 2 head only, block index, static EP path, head)


class Lockstep:
    """Pairs the model calls of every rank (see the module docstring); `install(engine)` wraps its entry points."""

    def __init__(self, model: nn.Module, group: Any = None) -> None:
        self.model, self.group = model, group
        self.world = dist.get_world_size(group)
        self.ep = getattr(model, "expert_parallel", None)
        self.rounds = 0       # announcement rounds
        self.idle_calls = 0   # calls joined with an empty batch
        self._inside = False

    def kind(self, mtp: int | None, rows: int, decode: bool, head: bool = True) -> Kind:
        static = self.ep is not None and self.ep.takes_static(rows, decode)
        return (0, 0, static, head) if mtp is None else (1, mtp, static, head)

    def _agree(self, kind: Kind | None) -> Kind | None:
        kinds: list[Kind | None] = [None] * self.world
        dist.all_gather_object(kinds, kind, group=self.group)
        self.rounds += 1
        live = [tuple(k) for k in kinds if k is not None]
        return min(live) if live else None

    @property
    def inside(self) -> bool:
        """Whether a paired call (or an idle join) is running: the only time EP collectives may run."""
        return self._inside

    def _idle(self, kind: Kind) -> None:
        block, j, static, head = kind
        self.idle_calls += 1
        self._inside = True
        try:
            blocks = None if block == 0 else self.model.mtp[j:j + 1] if block == 1 else []
            idle_forward(self.model, blocks, head=head, static=static)
        finally:
            self._inside = False

    def run(self, kind: Kind, fn: Callable, *args, **kwargs):
        """Make the call `fn(*args, **kwargs)` of `kind` once every rank with a call of that kind is ready."""
        if self._inside:  # a call made from inside a paired call (e.g. decode inside a decoder step)
            return fn(*args, **kwargs)
        while True:
            chosen = self._agree(kind)
            if chosen == kind:
                self._inside = True
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._inside = False
            self._idle(chosen)

    def finish(self) -> None:
        """End of this rank's step: join the other ranks' calls until every rank is done."""
        while (chosen := self._agree(None)) is not None:
            self._idle(chosen)

    def install(self, engine) -> None:
        """Route the engine's model calls through `run`: the model's forward, prefill, mtp_prefill and mtp_decode
        and the engine's decode step (`engine.decoder.step`, which may be a compiled graph)."""
        m = self.model

        def wrap(fn: Callable, kind_of: Callable[[inspect.BoundArguments], Kind]) -> Callable:
            sig = inspect.signature(fn)

            def call(*args, **kwargs):
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                return self.run(kind_of(bound), fn, *args, **kwargs)

            return call

        a = lambda b, name: b.arguments[name]  # noqa: E731
        m.forward = wrap(m.forward, lambda b: self.kind(None, a(b, "input_ids").numel(), False))
        m.prefill = wrap(m.prefill, lambda b: self.kind(None, a(b, "input_ids").numel(), False))
        # the scheduler's ragged prefill: the main layers without the head, then the head on the rows it needs
        m.prefill_streams = wrap(m.prefill_streams,
                                 lambda b: self.kind(None, a(b, "input_ids").numel(), False, head=False))
        m.logits = wrap(m.logits, lambda b: (2, 0, False, True))
        m.mtp_prefill = wrap(m.mtp_prefill, lambda b: self.kind(a(b, "j"), a(b, "next_ids").numel(), False))
        m.mtp_decode = wrap(m.mtp_decode, lambda b: self.kind(a(b, "j"), a(b, "next_ids").numel(), True))
        dec = engine.decoder
        dec.step = wrap(dec.step, lambda b: self.kind(None, a(b, "ids").shape[0], True))
        if self.ep is not None:
            self.ep.lockstep = self  # an EP call outside a paired call is refused (it would never be matched)
