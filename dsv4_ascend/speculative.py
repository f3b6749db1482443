"""MTP speculative decoding: draft with the MTP block, verify all drafts in one main-model chunk, keep the
accepted prefix.

One round for a sequence whose cache holds positions [0, L) and whose next token x_L is known but not yet cached:
1. verify: the main model runs [x_L, d_1..d_n] at positions L..L+n with the cache writes deferred;
2. accept: greedy keeps the drafts that equal the main model's argmax; sampling uses the standard rule (accept
   d with probability min(1, p(d)/q(d)), else sample from normalise(max(p - q, 0))); one more token (the bonus)
   comes from the main model at the first rejection (or after the last draft);
3. commit: only the accepted prefix's state is written (window ring, compressed entries, indexer keys, the
   unfinished-window rows): rejected tokens never touch the cache, even inside a compression window;
4. the MTP block absorbs the main model's streams at the accepted positions (its own sliding-window cache), then
   chains n drafts for the next round; the chained steps' ring writes are undone afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cache import KVCache
from .model import Transformer
from .sampling import SamplingParams, probabilities

__all__ = ["Speculator", "SpecState", "accept_drafts"]


@dataclass
class SpecState:
    """Per-sequence speculative state: drafts for the next round and their draft distributions."""

    drafts: list[int] = field(default_factory=list)
    q: list[Tensor | None] = field(default_factory=list)
    generator: torch.Generator | None = None


def accept_drafts(p: Tensor, q: list[Tensor | None], drafts: list[int], greedy: bool,
                  gen: torch.Generator | None) -> tuple[int, int]:
    """(number of drafts accepted, the bonus token) given target distributions p [n+1, V] (or logits when greedy)."""
    if greedy:
        pred = p.argmax(-1).tolist()
        a = 0
        while a < len(drafts) and drafts[a] == pred[a]:
            a += 1
        return a, pred[a]
    for i, d in enumerate(drafts):
        ratio = (p[i, d] / q[i][d].clamp(min=1e-30)).item()
        if torch.rand((), generator=gen).item() < min(1.0, ratio):
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if residual.sum() <= 0:  # p == q: any rejection is impossible in exact arithmetic
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=gen))


class Speculator:
    """Drives MTP drafting and verification for sequences in a shared KV cache (one sequence per call)."""

    def __init__(self, model: Transformer, cache: KVCache, n_tokens: int) -> None:
        if not model.mtp:
            raise ValueError("speculative decoding needs the model's MTP block (num_nextn_predict_layers >= 1 and "
                             "mtp.* weights loaded)")
        if n_tokens < 1:
            raise ValueError(f"speculative tokens must be >= 1, found {n_tokens}")
        self.model = model
        self.cache = cache
        self.n = n_tokens
        self.mtp_layer = cache.layers[model.cfg.num_hidden_layers]
        self.stats = {"rounds": 0, "proposed": 0, "accepted": 0}

    def _slot(self, slot: int) -> Tensor:
        return torch.tensor([slot], device=self.model.embed.weight.device)

    def absorb(self, slot: int, streams: Tensor, next_ids: list[int], start: int) -> tuple[Tensor, Tensor]:
        """MTP over main streams at positions [start, start+S) with the tokens that follow; (last logits, streams)."""
        ids = torch.tensor([next_ids], device=streams.device)
        logits, x = self.model.mtp_prefill(streams, ids, self.cache, self._slot(slot), start)
        return logits[0, -1], x[:, -1:]

    def propose(self, slot: int, logits: Tensor, x: Tensor, pos: int, params: SamplingParams,
                state: SpecState) -> None:
        """Chain n drafts from the MTP row at `pos`; their cache writes are rolled back afterwards."""
        greedy = params.temperature == 0
        s = self._slot(slot)
        ring = self.mtp_layer.window
        rows = ring.row(torch.arange(pos + 1, pos + self.n, device=s.device))
        saved = ring.snapshot((s.view(1, 1), rows.view(1, -1)))
        state.drafts, state.q = [], []
        for i in range(self.n):
            if greedy:
                tok, q = int(logits.argmax()), None
            else:
                q = probabilities(logits, params)
                tok = int(torch.multinomial(q, 1, generator=state.generator))
            state.drafts.append(tok)
            state.q.append(q)
            if i + 1 < self.n:
                lg, x = self.model.mtp_decode(x, torch.tensor([[tok]], device=s.device),
                                              torch.tensor([pos + 1 + i], device=s.device), self.cache, s)
                logits = lg[0, -1]
        ring.restore((s.view(1, 1), rows.view(1, -1)), saved)

    def verify(self, slot: int, pending: int, length: int, params: SamplingParams,
               state: SpecState) -> tuple[list[int], Tensor, Tensor]:
        """Run [pending, drafts] through the main model; commit the accepted prefix.

        Returns the new tokens (accepted drafts + bonus), the main model's logits that produced them [a+1, V] and
        its streams at the committed positions [1, a+1, n, D].
        """
        s = self._slot(slot)
        ids = torch.tensor([[pending] + state.drafts], device=s.device)
        logits, x, commit = self.model.prefill(ids, self.cache, s, length, defer=True)
        greedy = params.temperature == 0
        p = logits[0] if greedy else torch.stack([probabilities(lg, params) for lg in logits[0]])
        a, bonus = accept_drafts(p, state.q, state.drafts, greedy, state.generator)
        commit(a + 1)
        self.stats["rounds"] += 1
        self.stats["proposed"] += len(state.drafts)
        self.stats["accepted"] += a
        return state.drafts[:a] + [bonus], logits[0, : a + 1], x[:, : a + 1]
