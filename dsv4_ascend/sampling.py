"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs — batched and sync-free.

What a request asks (`SamplingParams`) also names the logit adjustments applied before sampling (penalties,
logit_bias, min_p, min_tokens, bad words, a grammar); `logits_process` applies them on the device.

Each row carries its own parameters as tensors, so one call serves a batch of requests with different settings
and can sit inside a captured decode graph. Randomness is counter-based (hash of seed, step, token id) rather
than a stateful generator: a request's samples depend only on its seed and position, never on its batch-mates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .constraints import GuidedSpec

__all__ = ["SamplingParams", "SamplingBatch", "sample", "greedy", "probabilities"]

INT32_MAX = 2**31 - 1


@dataclass
class SamplingParams:
    """What a user asks of one request's sampling and stopping."""

    temperature: float = 1.0     # 0 = greedy
    top_k: int = 0               # 0 = whole vocabulary
    top_p: float = 1.0
    seed: int | None = None      # None: a random seed is drawn for the request
    max_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()   # stop strings (matched on the detokenized text)
    ignore_eos: bool = False
    logprobs: int | None = None  # also return the top-N logprobs per generated token
    prompt_logprobs: int | None = None  # also return the prompt tokens' logprobs (+ top-N), from the prefill
    # Logit adjustments (vLLM's definitions; applied by logits_process.adjust_logits):
    presence_penalty: float = 0.0    # minus this on every token already generated
    frequency_penalty: float = 0.0   # minus this times the token's count in the output
    repetition_penalty: float = 1.0  # prompt + output tokens: positive logits / r, others * r
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_p: float = 0.0               # drop tokens with probability < min_p * the top probability
    min_tokens: int = 0              # EOS and stop_token_ids are impossible before this many tokens
    bad_words: tuple[tuple[int, ...], ...] = ()  # token-id sequences never completed
    guided: GuidedSpec | None = None  # constrained decoding (constraints.GuidedSpec)

    def __post_init__(self) -> None:
        """Check every field's type and both of its bounds: a request the sampler cannot run fails here, alone."""
        def number(name: str, v: object) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number, found {type(v).__name__}")
            try:
                f = float(v)
            except OverflowError:
                raise ValueError(f"{name} must be a finite number, found an integer out of float range") from None
            if not math.isfinite(f):
                raise ValueError(f"{name} must be finite, found {v}")
            return f

        def integer(name: str, v: object, lo: int, hi: int) -> int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, found {type(v).__name__}")
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], found {v if abs(v) < 10**30 else 'a huge integer'}")
            return v

        self.temperature = number("temperature", self.temperature)
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, found {self.temperature}")
        integer("top_k", self.top_k, 0, INT32_MAX)  # 0 = off; the engine also bounds it by the vocabulary
        self.top_p = number("top_p", self.top_p)
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], found {self.top_p}")
        integer("max_tokens", self.max_tokens, 1, INT32_MAX)
        if self.logprobs is not None:
            integer("logprobs", self.logprobs, 0, 20)
        if self.prompt_logprobs is not None:
            integer("prompt_logprobs", self.prompt_logprobs, 0, 20)
        if self.seed is None:
            self.seed = int(torch.randint(0, 2**31 - 1, ()).item())
        integer("seed", self.seed, -(2**63), 2**63 - 1)  # held in an int64 tensor
        self.stop_token_ids = tuple(self.stop_token_ids)
        for t in self.stop_token_ids:
            integer("stop_token_ids", t, 0, INT32_MAX)
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, number(name, getattr(self, name)))
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], found {getattr(self, name)}")
        self.repetition_penalty = number("repetition_penalty", self.repetition_penalty)
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], found {self.repetition_penalty}")
        self.min_p = number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], found {self.min_p}")
        integer("min_tokens", self.min_tokens, 0, self.max_tokens)
        bias = dict(self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias)
        for t, b in bias.items():
            integer("logit_bias token id", t, 0, INT32_MAX)
            if not -100 <= number("logit_bias value", b) <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], found {b} for token {t}")
        self.logit_bias = tuple(sorted((t, float(b)) for t, b in bias.items()))
        self.bad_words = tuple(tuple(w) for w in self.bad_words)
        for w in self.bad_words:
            if not w:
                raise ValueError("bad_words entries must be non-empty token-id sequences")
            for t in w:
                integer("bad_words token id", t, 0, INT32_MAX)
        if self.guided is not None and not isinstance(self.guided, GuidedSpec):
            raise ValueError(f"guided must be a GuidedSpec, found {type(self.guided).__name__}")

    @property
    def penalized(self) -> bool:
        """Host-known: the request needs per-slot token counts (a presence, frequency or repetition penalty)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def adjusted(self) -> bool:
        """Host-known: some logit adjustment applies (a penalty, logit_bias, min_p, min_tokens, bad words or a
        grammar); False means the plain sampler alone serves this request."""
        return (self.penalized or bool(self.logit_bias) or self.min_p > 0 or self.min_tokens > 0
                or bool(self.bad_words) or self.guided is not None)

    def check_vocab(self, vocab: int) -> None:
        """Raise ValueError for a setting this vocabulary cannot serve (top_k, logprobs, stop ids)."""
        if self.top_k > vocab:
            raise ValueError(f"top_k must be <= the vocabulary size {vocab} (0 = off), found {self.top_k}")
        if (self.logprobs or 0) > vocab:
            raise ValueError(f"logprobs must be <= the vocabulary size {vocab}, found {self.logprobs}")
        if (self.prompt_logprobs or 0) > vocab:
            raise ValueError(f"prompt_logprobs must be <= the vocabulary size {vocab}, found {self.prompt_logprobs}")
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", [t for t, _ in self.logit_bias]),
                          ("bad_words", [t for w in self.bad_words for t in w])):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"{name} token ids must be in [0, {vocab}), found {bad[:5]}")


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as device tensors."""

    temperature: Tensor  # [B] fp32
    top_k: Tensor        # [B] int64, 0 = off
    top_p: Tensor        # [B] fp32
    seed: Tensor         # [B] int64

    @classmethod
    def of(cls, params: list[SamplingParams], device: torch.device | str = "cpu") -> "SamplingBatch":
        return cls(torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
                   torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
                   torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
                   torch.tensor([p.seed for p in params], dtype=torch.int64, device=device))


_M32 = 0xFFFFFFFF


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2^32; no overflow."""
    for mul in (0x7FEB352D, 0x446F1A4B):  # odd multipliers < 2^31 keep products < 2^63
        x = (x ^ (x >> 16)) & _M32
        x = (x * mul) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed: Tensor, step: Tensor, vocab: int) -> Tensor:
    """U(0,1) [B,V] determined by (seed, step, token id) only."""
    v = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    h = _mix((seed.unsqueeze(1) & _M32) ^ _mix(step.unsqueeze(1) & _M32))
    h = _mix(h ^ _mix(v + 0x9E3779B9 & _M32))
    return (h.to(torch.float64) + 0.5) / 2**32


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution one request samples from: softmax(logits / T) restricted to top-k and top-p, [V] fp32."""
    scaled = logits.float() / max(params.temperature, 1e-5)
    sorted_l, order = torch.sort(scaled, descending=True, stable=True)
    probs = torch.softmax(sorted_l, -1)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)
    drop = (probs.cumsum(-1) - probs) >= params.top_p
    if params.top_k:
        drop |= rank >= params.top_k
    probs = probs.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, order, probs)
    return out / out.sum(-1, keepdim=True)


def sample(logits: Tensor, sb: SamplingBatch, step: Tensor) -> tuple[Tensor, Tensor]:
    """Next tokens [B] and their logprobs [B] (log-softmax of the raw logits) from fp32 logits [B,V]."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = logits.argmax(-1)
    t = sb.temperature.clamp(min=1e-5).unsqueeze(1)
    scaled = logits / t
    vocab = logits.shape[-1]
    sorted_l, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(sb.top_k > 0, sb.top_k, vocab).unsqueeze(1)
    probs = torch.softmax(sorted_l, dim=-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each candidate
    drop = (rank >= k) | (before >= sb.top_p.unsqueeze(1))  # the top candidate is always kept
    sorted_l = sorted_l.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(sb.seed, step, vocab))).float()
    pick = (sorted_l + gumbel).argmax(-1, keepdim=True)
    sampled = order.gather(-1, pick).squeeze(1)
    tokens = torch.where(sb.temperature > 0, sampled, greedy)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(1)).squeeze(1)


def greedy(logits: Tensor) -> tuple[Tensor, Tensor]:
    """What `sample` returns when every row has temperature 0, without its full-vocabulary sort and noise:
    (argmax tokens [B], their logprobs [B]); bit-identical to `sample` on such rows."""
    logits = logits.float()
    tokens = logits.argmax(-1)
    return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(1)).squeeze(1)
