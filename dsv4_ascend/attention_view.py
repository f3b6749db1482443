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

__all__ = ["KVView", "PagedRows"]


@dataclass
class PagedRows:
    """Rows 0..n-1 of every sequence in a paged store: row w of row b of `table` [B,P] lives in page
    table[b, w // per_page] (P * per_page >= n). A backend reads them block by block (`read(lo, hi)`) instead of
    copying all n into one tensor (the indexer keys in decode: n = context/4)."""

    store: RowStore
    table: Tensor
    n: int

    @property
    def per_page(self) -> int:
        """Rows per page."""
        return self.store.tensors()[0].shape[1]

    def read(self, lo: int = 0, hi: int | None = None) -> Tensor:
        """Rows lo..hi-1 [B, hi-lo, c] (a copy); lo a multiple of per_page."""
        hi, per = self.n if hi is None else hi, self.per_page
        if lo % per or not 0 <= lo <= hi <= self.n:
            raise ValueError(f"PagedRows.read: need 0 <= lo <= hi <= n={self.n}, lo a multiple of {per}; "
                             f"found lo={lo}, hi={hi}")
        return self.store.read_pages(self.table[:, lo // per:-(-hi // per)])[:, :hi - lo]


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
    start: int | Tensor | None  # prefill: host-known first position of the chunk (ragged: per row [B]); decode: None
    max_len: int                # host-known bound: every position < max_len (sizes tables without host reads)
    ratio: int = 0              # compression ratio m (0: window only)
    entries: RowStore | None = None      # paged compressed entries [pages, block_size/m, d]
    block_table: Tensor | None = None    # [B,P] pages of each sequence (entry w in page w // (block_size/m))
    picks: Tensor | None = None          # CSA: [B,S,K] entry indices (-1 = none); None: every visible entry
    entry_rows: Tensor | None = None     # entries already gathered [B,N,d] (prefill); None: read the pages
    entries_in_store: bool = True        # False: entry_rows holds entries not written yet (deferred prefill)
    shared: dict | None = None           # one dict per model step, shared by every layer: a backend's per-step
                                         # tensors (block tables, index maps, kernel metadata) built once

    @property
    def win(self) -> int:
        """Sliding window (the ring's length)."""
        return self.window.size

    def entry_pool(self) -> Tensor:
        """Entries 0..N-1 [B,N,d] of every sequence (N = all pages of the block table rows, or entry_rows), as
        the store holds them (a C8 store's rounding applied to entries not written yet)."""
        if self.entry_rows is not None:
            return self.entry_rows if self.entries_in_store else self.entries.stored(self.entry_rows)
        return self.entries.read_pages(self.block_table)

    def chunk_keys(self) -> Tensor:
        """Prefill: the chunk's rows [B,S,d] as the ring will store them (C8: quantised), so a key reads the
        same whether the chunk is in flight or already written (decode reads it back from the ring)."""
        return self.window.stored(self.chunk)

    @property
    def per_page(self) -> int:
        """Entries per page (block_size / ratio)."""
        return self.entries.tensors()[0].shape[1]

    def gathered(self) -> tuple[Tensor, Tensor]:
        """(pool [B,N,d], idx [B,S,K]): ring (+ chunk) rows then entries, with per-query indices (-1 = masked)."""
        return self.block(self.pool(), 0, self.positions.shape[1])

    @property
    def picks_from_store(self) -> bool:
        """CSA with every entry in the pages: only the picked entries are gathered, per query block (`block`), so
        no copy of all N entries is made (N = 262,144 at 1M tokens)."""
        return self.ratio > 0 and self.picks is not None and self.entry_rows is None

    def pool(self) -> Tensor:
        """Keys shared by every query block [B,N,d]: ring rows (+ the prefill chunk's rows), then entries 0..
        (HCA, or CSA entries not in the pages)."""
        pool = self.window.read(self.slots)
        if self.chunk is not None:
            pool = torch.cat([pool, self.chunk_keys()], dim=1)  # ring (positions < start) then chunk
        if not self.ratio or self.picks_from_store:
            return pool
        return torch.cat([pool, self.entry_pool().to(pool.dtype)], dim=1)

    def block(self, pool: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """(keys, idx [B, hi-lo, K]) for queries lo..hi-1: `pool()` plus, for picks read from the pages, the
        block's picked entries (gathered through the block table) appended to it."""
        idx = self.indices(lo, hi)
        if not self.picks_from_store:
            return pool, idx
        picks = self.picks[:, lo:hi]  # [B,q,K]
        w = picks.clamp(min=0)
        page = self.block_table.gather(1, (w // self.per_page).flatten(1)).view_as(w)
        rows = self.entries.read(page, w % self.per_page)  # [B,q,K,d]
        b, q, k = picks.shape
        j = pool.shape[1] + torch.arange(q * k, device=picks.device).view(1, q, k)
        keys = torch.cat([pool, rows.flatten(1, 2).to(pool.dtype)], dim=1)
        return keys, torch.cat([idx, torch.where(picks >= 0, j, -1)], dim=-1)

    def window_slab(self) -> Tensor:
        """Prefill: the window keys of the whole chunk in position order, [B, win-1+S, d]: positions start-win+1
        .. start+S-1 (the ring's last win-1 positions, then the chunk). Query s sees slab rows s .. s+win-1 (a
        band); rows of positions < 0 are zeros."""
        if self.chunk is None:
            raise ValueError("window_slab: prefill views only (decode reads the ring through `indices`)")
        before = self.start - (self.win - 1) + torch.arange(self.win - 1, device=self.chunk.device)
        ring = self.window.read(self.slots)[:, self.window.row(before.clamp(min=0))]  # [B, win-1, d]
        ring = torch.where((before >= 0).view(1, -1, 1), ring, 0)
        return torch.cat([ring.to(self.chunk.dtype), self.chunk], dim=1)

    def picked_entries(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """CSA: (keys [B, hi-lo, K, d], valid [B, hi-lo, K]) of the entries queries lo..hi-1 picked, read from
        the pages (or from entry_rows when they are not stored yet); invalid picks read entry 0."""
        picks = self.picks[:, lo:hi]
        w = picks.clamp(min=0)
        if self.picks_from_store:
            page = self.block_table.gather(1, (w // self.per_page).flatten(1)).view_as(w)
            rows = self.entries.read(page, w % self.per_page)
        else:
            b, q, k = w.shape
            rows = self.entry_rows.gather(1, w.reshape(b, q * k, 1).expand(-1, -1, self.entry_rows.shape[-1]))
            rows = rows.view(b, q, k, -1)
        return rows, picks >= 0

    def keys_per_query(self) -> int:
        """K of `indices`: window slots plus picked (CSA) or all (HCA) entries; host-known from shapes."""
        if not self.ratio:
            return self.win
        if self.picks is not None:
            return self.win + self.picks.shape[-1]
        n = self.entry_rows.shape[1] if self.entry_rows is not None else self.block_table.shape[1] * self.per_page
        return self.win + n

    def indices(self, lo: int, hi: int) -> Tensor:
        """idx [B, hi-lo, K] into `pool()` for queries lo..hi-1 (-1 = masked): O(block), not O(S), memory
        (without the picks when they are read from the pages: `block` adds those)."""
        ring, win, dev = self.window, self.win, self.positions.device
        pos = self.positions[:, lo:hi]
        b = pos.shape[0]
        if self.chunk is None:  # decode: ring rows only, this step's row already written
            idx = ring.window_rows(pos[:, 0]).unsqueeze(1)  # [B, 1, win]
            n_pool = win
        else:
            idx = ring.chunk_window_rows(self.start, hi - lo, dev, first=lo).expand(b, hi - lo, win)
            n_pool = win + self.chunk.shape[1]
        if not self.ratio or self.picks_from_store:
            return idx
        picks = None if self.picks is None else self.picks[:, lo:hi]
        if picks is None:  # HCA: entry w is visible to query t iff w < (t+1)//m
            w = torch.arange(self.keys_per_query() - win, device=dev)
            picks = torch.where(w < ((pos + 1) // self.ratio).unsqueeze(-1), w, -1)
        picks = torch.where(picks >= 0, picks + n_pool, -1)
        return torch.cat([idx, picks], dim=-1)
