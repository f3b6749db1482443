"""One decode-step interface: `step(ids, positions, slots, params) -> StepResult`, whether the step runs eagerly
(`EagerDecoder`, here) or as a compiled graph per batch bucket (`graph_mode.GraphDecoder`); the engine calls it
without knowing which (nano-vllm's `ModelRunner.run_model` hides eager vs captured graph behind one call the
same way). `next_tokens` is the one place that decides between argmax and sampling, and applies the rows' logit
adjustments (`logits_process.AdjustBatch`) first when there are any.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from .cache import KVCache
from .logits_process import AdjustBatch, adjust_logits, raw_logprobs
from .model import Transformer
from .sampling import SamplingBatch, SamplingParams, greedy

__all__ = ["StepResult", "Decoder", "EagerDecoder", "next_tokens", "all_greedy"]

SampleFn = Callable[[Tensor, SamplingBatch, Tensor], tuple[Tensor, Tensor]]  # Backend.sample's signature


@dataclass
class StepResult:
    """What one decode step produced for its rows."""

    tokens: Tensor    # [B] int64
    logprobs: Tensor  # [B] fp32, log-softmax of the raw logits at the chosen tokens
    logits: Tensor    # [B, V] fp32


class Decoder(Protocol):
    """Anything that runs a decode step for the engine."""

    cache: KVCache

    def step(self, ids: Tensor, positions: Tensor, slots: Tensor, params: list[SamplingParams],
             max_len: int | None = None, adjust: AdjustBatch | None = None,
             lengths: list[int] | None = None) -> StepResult:
        """Decode one token for each row: ids [B,1] at `positions` [B] of cache `slots` [B]; `adjust`: the rows'
        logit adjustments (None: none); `max_len` / `lengths`: host-known bound / per-row lengths after this
        token (hints a decoder may use: the values are those of the positions)."""
        ...


def all_greedy(params: list[SamplingParams]) -> bool:
    """Host-known: every row is greedy (temperature 0)."""
    return all(p.temperature == 0 for p in params)


def _choose(logits: Tensor, sb: SamplingBatch, step: Tensor, sample: SampleFn,
            greedy_rows: bool | None) -> tuple[Tensor, Tensor]:
    """Argmax when every row is greedy, else `sample` (see next_tokens)."""
    if greedy_rows is None:
        operands = (logits, sb.temperature, sb.top_k, sb.top_p, sb.seed, step)

        def sampled(lg: Tensor, t: Tensor, k: Tensor, p: Tensor, seed: Tensor, st: Tensor) -> tuple[Tensor, Tensor]:
            return sample(lg, SamplingBatch(t, k, p, seed), st)

        def argmax(lg: Tensor, *_: Tensor) -> tuple[Tensor, Tensor]:
            return greedy(lg)

        return torch.cond((sb.temperature > 0).any(), sampled, argmax, operands)
    if greedy_rows:
        return greedy(logits)
    return sample(logits, sb, step)


def next_tokens(logits: Tensor, sb: SamplingBatch, step: Tensor, sample: SampleFn,
                greedy_rows: bool | None, adjust: AdjustBatch | None = None) -> tuple[Tensor, Tensor]:
    """(tokens [B], logprobs [B]) from fp32 logits [B,V]: argmax when every row is greedy, else `sample`.

    `greedy_rows`: host-known answer (eager: skip sampling's full-vocabulary sort and noise), or None inside a
    compiled step, where the branch is taken from the temperatures by `torch.cond` (no host sync). `greedy` is
    bit-identical to `sample` on greedy rows, so the choice never changes a token.
    `adjust`: the rows' logit adjustments, applied before the choice; logprobs stay those of the raw logits
    (vLLM's default). Inside a compiled step (`greedy_rows` None) `torch.cond` on `adjust.active` skips them for
    a batch without any; elsewhere a given `adjust` is applied (neutral rows come back unchanged).
    """
    if adjust is None:
        return _choose(logits, sb, step, sample, greedy_rows)
    if greedy_rows is None:
        operands = (logits, sb.temperature, sb.top_k, sb.top_p, sb.seed, step, *adjust.tensors())

        def adjusted(lg: Tensor, t: Tensor, k: Tensor, p: Tensor, seed: Tensor, st: Tensor,
                     *adj: Tensor) -> tuple[Tensor, Tensor]:
            b = SamplingBatch(t, k, p, seed)
            tokens, _ = _choose(adjust_logits(lg, AdjustBatch(*adj), t), b, st, sample, None)
            return tokens, raw_logprobs(lg, tokens)

        def plain(lg: Tensor, t: Tensor, k: Tensor, p: Tensor, seed: Tensor, st: Tensor,
                  *_: Tensor) -> tuple[Tensor, Tensor]:
            return _choose(lg, SamplingBatch(t, k, p, seed), st, sample, None)

        return torch.cond(adjust.active, adjusted, plain, operands)
    tokens, _ = _choose(adjust_logits(logits, adjust, sb.temperature), sb, step, sample, greedy_rows)
    return tokens, raw_logprobs(logits, tokens)


class EagerDecoder:
    """The decode step run op by op (`model.decode` + `next_tokens`)."""

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        self.model = model
        self.cache = cache

    def step(self, ids: Tensor, positions: Tensor, slots: Tensor, params: list[SamplingParams],
             max_len: int | None = None, adjust: AdjustBatch | None = None,
             lengths: list[int] | None = None) -> StepResult:
        """`max_len` (host-known, optional): every row's length after this token is at most this; compressed
        entries are read only up to it (whole pages), so a few distinct shapes occur. `lengths` (host-known,
        optional): each row's length after this token; a compressor emits its entry only on steps where a row
        closes a window (`Transformer.decode`).

        The whole step (model, logit rules, sampling) runs under `torch.inference_mode`: no autograd or view
        tracking per op (the batch-1 step is ~2,900 tiny ops, docs/design.md "Performance"). Cache and rule state
        are normal tensors updated in place, which inference mode allows; the returned tensors are inference
        tensors, read (not updated in place) by the engine."""
        with torch.inference_mode():
            logits = self.model.decode(ids, positions, self.cache, slots, max_len=max_len, lengths=lengths)[:, -1]
            greedy_rows = all_greedy(params)
            if greedy_rows and adjust is None:  # what next_tokens returns here, without building the batch's tensors
                tokens, logprobs = greedy(logits)
            else:
                sb = SamplingBatch.of(params, logits.device)
                tokens, logprobs = next_tokens(logits, sb, positions + 1, self.model.backend.sample, greedy_rows,
                                               adjust)
        return StepResult(tokens, logprobs, logits)
