"""Per-request logit adjustments before sampling, on the device: token masks (grammar, bad words), logit_bias,
min_tokens, repetition / frequency / presence penalties and min_p, in vLLM's order and definitions (vLLM v1
`Sampler`: masks and logits processors, then penalties, then min_p with the temperature).

`SlotTokens` holds per-slot device state ([slots, vocab]: output-token counts, prompt-token presence, bias, the
ids min_tokens bans), written at admission and after each step by index updates, never read back to the host.
`AdjustBatch` is one step's per-row view: the rows' slot state gathered, their scalar parameters, and the allowed-token
bitmask that grammar matchers (`constraints.Matcher`) and bad words wrote on the host between steps.
`LogitRules` is what the engine calls: `check`, `admit`, `batch` (None when every row is neutral: decided from the
parameters on the host, so a batch without adjustments does no extra work) and `record`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .constraints import Matcher, mask_words
from .sampling import SamplingParams

__all__ = ["SlotTokens", "AdjustBatch", "LogitRules", "adjust_logits", "allowed_tokens", "raw_logprobs"]


class _Req(Protocol):  # what LogitRules reads of an engine request
    prompt: list[int]
    output: list[int]
    params: SamplingParams
    slot: int | None


class SlotTokens:
    """Device state per cache slot: output counts (int32), prompt presence (bool), logit bias (fp32) and the ids
    that min_tokens bans (bool), each [slots, vocab] (10 bytes per slot and vocabulary id)."""

    def __init__(self, slots: int, vocab: int, device: torch.device | str = "cpu") -> None:
        self.vocab = vocab
        self.counts = torch.zeros(slots, vocab, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.bias = torch.zeros(slots, vocab, dtype=torch.float32, device=device)
        self.stops = torch.zeros(slots, vocab, dtype=torch.bool, device=device)


@dataclass
class AdjustBatch:
    """One step's adjustments for B rows, as device tensors (the slots' state rows already gathered)."""

    counts: Tensor      # [B, V] int32: output-token counts
    prompt: Tensor      # [B, V] bool: token occurs in the prompt
    bias: Tensor        # [B, V] fp32: logit_bias
    stops: Tensor       # [B, V] bool: ids that min_tokens bans (EOS, stop_token_ids)
    presence: Tensor    # [B] fp32
    frequency: Tensor   # [B] fp32
    repetition: Tensor  # [B] fp32
    min_p: Tensor       # [B] fp32
    ban_stops: Tensor   # [B] bool: fewer than min_tokens generated
    mask: Tensor        # [B, ceil(V/32)] int32 allowed-token bitmask (-1 words: everything allowed)
    active: Tensor      # [] bool: some row is not neutral (a compiled step branches on it)

    def tensors(self) -> tuple[Tensor, ...]:
        """Every field, in order (graph inputs; `AdjustBatch(*tensors)` rebuilds it)."""
        return (self.counts, self.prompt, self.bias, self.stops, self.presence, self.frequency, self.repetition,
                self.min_p, self.ban_stops, self.mask, self.active)

    @classmethod
    def neutral(cls, rows: int, vocab: int, device: torch.device | str = "cpu") -> "AdjustBatch":
        """Rows that change nothing (compiled steps without adjustments, padding rows)."""
        def z(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(z(rows, vocab, dtype=torch.int32), z(rows, vocab, dtype=torch.bool), z(rows, vocab),
                   z(rows, vocab, dtype=torch.bool), z(rows), z(rows), torch.ones(rows, device=device), z(rows),
                   z(rows, dtype=torch.bool), torch.full((rows, mask_words(vocab)), -1, dtype=torch.int32,
                                                         device=device), z(dtype=torch.bool))

    def padded(self, n: int) -> "AdjustBatch":
        """The batch with neutral rows appended up to n rows."""
        extra = AdjustBatch.neutral(n - self.presence.shape[0], self.counts.shape[1], self.counts.device)
        return AdjustBatch(*(torch.cat([a, b]) for a, b in zip(self.tensors()[:-1], extra.tensors()[:-1])),
                           self.active)


def _bit(k: int) -> int:
    """Bit k of an int32 word as a Python int in int32 range (bit 31 is the sign)."""
    return (1 << k) - (1 << 32 if k == 31 else 0)


def allowed_tokens(mask: Tensor, vocab: int) -> Tensor:
    """[B, V] bool from an int32 bitmask [B, ceil(V/32)] (bit t % 32 of word t // 32)."""
    bits = torch.arange(32, dtype=torch.int32, device=mask.device)
    return ((mask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :vocab]


def adjust_logits(logits: Tensor, ab: AdjustBatch, temperature: Tensor) -> Tensor:
    """fp32 logits [B, V] with the rows' adjustments applied (sync-free; neutral rows come back unchanged).

    Order (vLLM v1): disallowed tokens (bitmask) and min_tokens' banned ids to -inf, + logit_bias; repetition
    penalty on tokens of the prompt or the output (positive logits divided by r, others multiplied); minus
    frequency x count and presence x [count > 0] over the output; then min_p: drop tokens whose probability at
    the row's temperature is below min_p x the top one, i.e. logit < max + T * ln(min_p).
    """
    logits = logits.float()
    drop = ~allowed_tokens(ab.mask, logits.shape[-1]) | (ab.stops & ab.ban_stops.unsqueeze(1))
    logits = logits.masked_fill(drop, float("-inf")) + ab.bias
    counts = ab.counts
    generated = counts > 0
    rep = ab.repetition.unsqueeze(1)
    logits = torch.where(generated | ab.prompt, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - ab.frequency.unsqueeze(1) * counts - ab.presence.unsqueeze(1) * generated
    t = temperature.clamp(min=1e-5).unsqueeze(1)
    log_min_p = torch.where(ab.min_p > 0, ab.min_p, 1.0).log().unsqueeze(1)
    cut = torch.where(ab.min_p.unsqueeze(1) > 0, logits.amax(-1, keepdim=True) + t * log_min_p, float("-inf"))
    return logits.masked_fill(logits < cut, float("-inf"))


def raw_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log-softmax of the unadjusted logits at `tokens` [B] (what logprobs report, as vLLM's default)."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(1)).squeeze(1)


class LogitRules:
    """The engine's side: per-slot device state, one grammar matcher per constrained slot, per-step batches."""

    def __init__(self, slots: int, vocab: int, eos: list[int], device: torch.device | str = "cpu") -> None:
        """`eos`: the ids that end a sequence (banned with the stop ids while min_tokens are not out)."""
        self.state = SlotTokens(slots, vocab, device)
        self.vocab, self.eos, self.device = vocab, [t for t in eos if 0 <= t < vocab], torch.device(device)
        self.matchers: dict[int, Matcher] = {}

    def check(self, params: SamplingParams, speculative: bool) -> None:
        """Refuse (ValueError) what this engine cannot apply: adjustments under MTP drafting (its verify step
        samples without them) and a grammar that does not compile."""
        if params.adjusted and speculative:
            raise ValueError("penalties, logit_bias, min_p, min_tokens, bad_words and guided decoding are not "
                             "supported with speculative decoding")
        if params.guided is not None:
            params.guided.check(self.vocab)

    def admit(self, req: _Req) -> None:
        """Set the request's slot state (after it got a slot, before its next token is chosen; a preempted request
        gets its output tokens replayed)."""
        p, slot, s = req.params, req.slot, self.state
        self.matchers.pop(slot, None)
        if p.guided is not None:
            self.matchers[slot] = Matcher(p.guided, self.vocab)
        s.counts[slot].zero_()
        if p.penalized:
            s.prompt[slot].zero_()
            s.prompt[slot, torch.tensor(req.prompt, device=self.device)] = True
        s.bias[slot].zero_()
        if p.logit_bias:
            ids, values = zip(*p.logit_bias)
            s.bias[slot, torch.tensor(ids, device=self.device)] = torch.tensor(values, device=self.device)
        s.stops[slot].zero_()
        if p.min_tokens:
            ids = ([] if p.ignore_eos else self.eos) + list(p.stop_token_ids)
            if ids:
                s.stops[slot, torch.tensor(ids, device=self.device)] = True
        if req.output:  # re-admitted after a preemption: the tokens already generated count again
            out = torch.tensor(req.output, device=self.device)
            if p.penalized:
                s.counts[slot].index_put_((out,), torch.ones_like(out, dtype=s.counts.dtype), accumulate=True)
            if slot in self.matchers:
                for tok in req.output:
                    self.matchers[slot].advance(tok)

    def batch(self, reqs: list[_Req]) -> AdjustBatch | None:
        """The rows' adjustments for the next token, or None when every row is neutral (host-decided)."""
        ps = [r.params for r in reqs]
        if not any(p.adjusted for p in ps):
            return None
        dev = self.device

        def f32(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=dev)

        mask = torch.full((len(reqs), mask_words(self.vocab)), -1, dtype=torch.int32)
        for i, r in enumerate(reqs):
            if r.slot in self.matchers and r.params.guided is not None:
                self.matchers[r.slot].fill(mask[i])
            for word in r.params.bad_words:  # the last id of a word whose prefix the output just wrote
                if len(word) == 1 or r.output[-(len(word) - 1):] == list(word[:-1]):
                    mask[i, word[-1] // 32] &= ~_bit(word[-1] % 32)
        rows, s = torch.tensor([r.slot for r in reqs], device=dev), self.state
        return AdjustBatch(s.counts[rows], s.prompt[rows], s.bias[rows], s.stops[rows],
                           f32([p.presence_penalty for p in ps]), f32([p.frequency_penalty for p in ps]),
                           f32([p.repetition_penalty for p in ps]), f32([p.min_p for p in ps]),
                           torch.tensor([len(r.output) < p.min_tokens for r, p in zip(reqs, ps)], device=dev),
                           mask.to(dev), torch.ones((), dtype=torch.bool, device=dev))

    def record(self, reqs: list[_Req], tokens: Tensor, tokens_host: list[int]) -> None:
        """After a step chose `tokens` (device [B]; the same values on the host): count them for the penalised
        rows (an index update on the device) and advance the grammar matchers."""
        pen = [i for i, r in enumerate(reqs) if r.params.penalized]
        if pen:
            idx = torch.tensor(pen, device=tokens.device)
            slots = torch.tensor([reqs[i].slot for i in pen], device=tokens.device)
            self.state.counts.index_put_((slots, tokens[idx]), torch.ones(len(pen), dtype=torch.int32,
                                                                          device=tokens.device), accumulate=True)
        for r, tok in zip(reqs, tokens_host):
            m = self.matchers.get(r.slot) if r.params.guided is not None else None
            if m is not None:
                m.advance(tok)
