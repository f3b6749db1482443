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
from typing import Callable, Protocol

import torch
from torch import Tensor

from .cache import KVCache
from .model import Transformer
from .sampling import SamplingParams, probabilities

__all__ = ["Speculator", "SpecState", "CapturedVerify", "accept_drafts"]


class CapturedVerify(Protocol):
    """A verify forward that writes the cache and undoes rejected positions (graph_mode.GraphVerifier)."""

    def verify(self, ids: Tensor, start: Tensor, slots: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], None]]:
        """(logits [B,n+1,V], streams [B,n+1,n_hc,D], rollback(k [B]))."""
        ...


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
    """Drives MTP drafting and verification for a batch of sequences in a shared KV cache: one main-model forward
    verifies every row's drafts (a ragged prefill: each row at its own position), each row commits its own
    accepted prefix."""

    def __init__(self, model: Transformer, cache: KVCache, n_tokens: int, graph: CapturedVerify | None = None
                 ) -> None:
        """`graph`: run the verify forward as a captured graph (graph mode); None: eagerly, writes deferred."""
        if not model.mtp:
            raise ValueError("speculative decoding needs the model's MTP block (num_nextn_predict_layers >= 1 and "
                             "mtp.* weights loaded)")
        if n_tokens < 1:
            raise ValueError(f"speculative tokens must be >= 1, found {n_tokens}")
        self.model = model
        self.cache = cache
        self.n = n_tokens
        self.mtp_layer = cache.layers[model.cfg.num_hidden_layers]
        self.graph = graph
        self.stats = {"rounds": 0, "proposed": 0, "accepted": 0, "verify_steps": 0}

    def _batch(self, rows: list[list[int]]) -> tuple[Tensor, list[int]]:
        """Rows of token ids, right-padded with 0, and their lengths."""
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=self.model.embed.weight.device)
        return ids, [len(r) for r in rows]

    def absorb(self, slots: Tensor, streams: Tensor, next_ids: list[list[int]], starts: list[int]
               ) -> tuple[Tensor, Tensor]:
        """MTP over main streams [B,S,n,D] whose row b sits at positions starts[b].. with the tokens that follow
        each (next_ids[b], its valid length); returns each row's last (logits [B,V], streams [B,1,n,D])."""
        ids, lens = self._batch(next_ids)
        ragged = len(set(lens)) > 1 or len(set(starts)) > 1
        logits, x = self.model.mtp_prefill(streams[:, :ids.shape[1]], ids, self.cache, slots,
                                           starts if ragged else starts[0], lengths=lens if ragged else None)
        last = torch.tensor(lens, device=ids.device) - 1
        rows = torch.arange(len(lens), device=ids.device)
        return logits[rows, last], x[rows, last].unsqueeze(1)

    def propose(self, slots: Tensor, logits: Tensor, x: Tensor, pos: list[int], params: list[SamplingParams],
                states: list[SpecState]) -> None:
        """Chain n drafts per row from the MTP rows at positions `pos` (logits [B,V], streams [B,1,n,D]); their
        cache writes are rolled back afterwards."""
        dev = slots.device
        p0 = torch.tensor(pos, device=dev)
        ring = self.mtp_layer.window
        at = (slots.view(-1, 1), ring.row(p0.unsqueeze(1) + 1 + torch.arange(self.n - 1, device=dev)))
        saved = ring.snapshot(at)
        for st in states:
            st.drafts, st.q = [], []
        for i in range(self.n):
            toks = logits.argmax(-1).tolist()  # greedy rows' drafts; sampled rows replace theirs
            for b, (sp, st) in enumerate(zip(params, states)):
                q = None
                if sp.temperature != 0:
                    q = probabilities(logits[b], sp)
                    toks[b] = int(torch.multinomial(q, 1, generator=st.generator))
                st.drafts.append(toks[b])
                st.q.append(q)
            if i + 1 < self.n:
                lg, x = self.model.mtp_decode(x, torch.tensor(toks, device=dev).view(-1, 1), p0 + 1 + i,
                                              self.cache, slots)
                logits = lg[:, -1]
        ring.restore(at, saved)

    def verify(self, slots: Tensor, pending: list[int], lengths: list[int], params: list[SamplingParams],
               states: list[SpecState]) -> tuple[list[list[int]], Tensor, Tensor]:
        """Run [pending, drafts] of every row (row b's cache holds lengths[b] tokens) through the main model in
        one forward; commit each row's accepted prefix.

        Returns per row the new tokens (accepted drafts + bonus), and the main model's logits [B, n+1, V] and
        streams [B, n+1, n_hc, D] (row b's first len(tokens[b]) positions are the committed ones).
        """
        ids, _ = self._batch([[t] + st.drafts for t, st in zip(pending, states)])
        if self.graph is not None:  # every row has its n drafts (propose made them): a fixed [B, n+1] batch
            logits, x, rollback = self.graph.verify(ids, torch.tensor(lengths, device=ids.device), slots)

            def commit(k: list[int]) -> None:
                rollback(torch.tensor(k, device=ids.device))
        else:
            x, commit = self.model.prefill_streams(ids, self.cache, slots,
                                                   lengths if len(lengths) > 1 else lengths[0], defer=True)
            logits = self.model.logits(x)
        pred = logits.argmax(-1).tolist()  # the one host read of the verify (greedy rows decide from it)
        out = []
        for b, (sp, st) in enumerate(zip(params, states)):
            if sp.temperature == 0:
                a = 0
                while a < len(st.drafts) and st.drafts[a] == pred[b][a]:
                    a += 1
                bonus = pred[b][a]
            else:
                p = torch.stack([probabilities(lg, sp) for lg in logits[b]])
                a, bonus = accept_drafts(p, st.q, st.drafts, False, st.generator)
            out.append(st.drafts[:a] + [bonus])
            self.stats["proposed"] += len(st.drafts)
            self.stats["accepted"] += a
        commit([len(t) for t in out])
        self.stats["rounds"] += len(out)
        self.stats["verify_steps"] += 1
        return out, logits, x
