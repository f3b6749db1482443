"""The keys of one attention call, described as they are stored (the argument of `Backend.attend`).

V4 attention reads a sliding window of raw kv (the per-slot ring) and, in CSA/HCA layers, compressed entries
(paged). A fused kernel such as CR's `npu_sparse_attn_sharedkv` wants exactly that: the stores, block tables
and positions. `KVView.gathered()` builds the other form, one gathered pool plus explicit indices, which is what
`Backend.sparse_attention` (the reference composite) consumes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import RowStore, WindowRing

__all__ = ["KVView"]


@dataclass
class KVView:
    """Window ring + compressed entries of one layer for the sequences of one step, plus what each query sees.

    Query (b, s) at position t = positions[b, s] sees ring positions t-win+1 .. t (>= 0) and compressed entries
    w < (t+1)//ratio: all of them (HCA, picks None) or those listed in picks[b, s] (CSA, -1 = none).
    """

    window: WindowRing          # ring [slots, win, d]; it knows where a position lives
    slots: Tensor               # [B] cache slots of the sequences
    positions: Tensor           # [B,S] absolute positions of the queries
    chunk: Tensor | None        # prefill: this chunk's kv [B,S,d], not in the ring yet; decode: None (written)
    start: int | None           # prefill: host-known first position of the chunk; decode: None
    max_len: int                # host-known bound: every position < max_len (sizes tables without host reads)
    ratio: int = 0              # compression ratio m (0: window only)
    entries: RowStore | None = None      # paged compressed entries [pages, block_size/m, d]
    block_table: Tensor | None = None    # [B,P] pages of each sequence (entry w in page w // (block_size/m))
    picks: Tensor | None = None          # CSA: [B,S,K] entry indices (-1 = none); None: every visible entry
    entry_rows: Tensor | None = None     # entries already gathered [B,N,d] (prefill); None: read the pages
    entries_in_store: bool = True        # False: entry_rows holds entries not written yet (deferred prefill)

    @property
    def win(self) -> int:
        """Sliding window (the ring's length)."""
        return self.window.size

    def entry_pool(self) -> Tensor:
        """Entries 0..N-1 [B,N,d] of every sequence (N = all pages of the block table rows, or entry_rows)."""
        if self.entry_rows is not None:
            return self.entry_rows
        return self.entries.read_pages(self.block_table)

    def gathered(self) -> tuple[Tensor, Tensor]:
        """(pool [B,N,d], idx [B,S,K]): ring (+ chunk) rows then entries, with per-query indices (-1 = masked)."""
        ring, slots, dev = self.window, self.slots, self.positions.device
        if self.chunk is None:  # decode: ring rows only, this step's row already written
            idx = ring.window_rows(self.positions[:, 0]).unsqueeze(1)  # [B, 1, win]
            pool = ring.read(slots)
        else:
            b, s, _ = self.chunk.shape
            pool = torch.cat([ring.read(slots), self.chunk], dim=1)  # ring (positions < start) then chunk
            idx = ring.chunk_window_rows(self.start, s, dev).expand(b, s, ring.size)
        if not self.ratio:
            return pool, idx
        entries = self.entry_pool()
        picks = self.picks
        if picks is None:  # HCA: entry w is visible to query t iff w < (t+1)//m
            w = torch.arange(entries.shape[1], device=dev)
            picks = torch.where(w < ((self.positions + 1) // self.ratio).unsqueeze(-1), w, -1)
        picks = torch.where(picks >= 0, picks + pool.shape[1], -1)
        return torch.cat([pool, entries.to(pool.dtype)], dim=1), torch.cat([idx, picks], dim=-1)
