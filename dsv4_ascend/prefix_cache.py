"""Automatic prefix caching, exact on V4's hybrid cache (docs/design.md, "Prefix caching").

A cached unit is one full cache page (`block_size` tokens, a multiple of every compress ratio), addressed by a hash
chain over the token ids: h_i = blake2b(h_{i-1} | ids of page i). Its paged parts (CSA entries, indexer keys, HCA
entries) are final once a sequence has passed the page's end, and are shared read-only through the block table.
The per-slot parts (every layer's sliding-window ring, MTP block included, and the compressors' open-window rows)
are not paged: a `BoundaryStore` record keeps a copy of them as they were when a sequence's cache held exactly
the tokens up to a cached page's end. A hit at L shares the pages before L and copies the record of the boundary
L into the new slot: the slot is then bit for bit what computing tokens 0..L-1 would have left. Records are few
next to pages (V4's window rows outweigh its compressed entries several times): they have their own pool, a
`RECORD_SHARE` of the cache memory by default, evicted least recently used; a cached page whose record is gone
still serves as a middle page of a longer hit.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch
from torch import Tensor

from .cache import KVCache

__all__ = ["BoundaryStore", "PrefixCache", "page_hashes", "RECORD_SHARE", "default_records"]

RECORD_SHARE = 0.2  # fraction of the KV-cache memory given to boundary records by default


def _chain(parent: bytes, ids: list[int]) -> bytes:
    """Hash of a page: its parent page's hash and its own token ids."""
    return hashlib.blake2b(parent + array("q", ids).tobytes(), digest_size=16).digest()


def page_hashes(tokens: list[int], block_size: int, pages: int) -> list[bytes]:
    """Chain hashes of the first `pages` full pages of `tokens` (each covers every token before its page's end)."""
    out, h = [], b""
    for i in range(pages):
        h = _chain(h, tokens[i * block_size:(i + 1) * block_size])
        out.append(h)
    return out


def default_records(cache: KVCache, budget_bytes: int | None) -> int:
    """Boundary records in `RECORD_SHARE` of the cache memory: of `budget_bytes` (the pages then get the rest),
    or next to the cache's pages (they are the rest)."""
    per = BoundaryStore.bytes_per_page(cache)
    if budget_bytes is None:
        paged = sum(t.numel() * t.element_size() for lc in cache.layers for s in (lc.entries, lc.index_keys)
                    if s is not None for t in s.tensors())
        budget_bytes = paged / (1 - RECORD_SHARE)
    return max(1, int(budget_bytes * RECORD_SHARE // per))


class BoundaryStore:
    """Records of the per-slot state at a page's end boundary L (a multiple of every ratio, so no compression
    window is open): each layer's window ring (positions L-window..L-1, raw rows as stored, C8 included) and, for
    the compressors with overlapping windows (CSA and its indexer), the `ratio` rows of the last closed window
    (positions L-ratio..L-1), which the next window's entry still reads. HCA (no overlap) has nothing live."""

    def __init__(self, cache: KVCache, records: int) -> None:
        n = records
        self.cache = cache
        self.window: list[Tensor] = []
        self.comp: list[list[tuple[object, Tensor]]] = []  # per layer: (CompressorState, rows [n, ratio, 2c])
        for lc in cache.layers:
            w = lc.window.data
            self.window.append(torch.zeros(n, *w.shape[1:], dtype=w.dtype, device=w.device))
            parts = []
            for st in (lc.comp, lc.index_comp):
                if st is not None and st.state.shape[1] == 2 * st.ratio:  # overlapping windows
                    parts.append((st, st.state.new_zeros(n, st.ratio, st.state.shape[-1])))
            self.comp.append(parts)

    @staticmethod
    def bytes_per_page(cache: KVCache) -> int:
        """Bytes of one record (one boundary's state)."""
        total = 0
        for lc in cache.layers:
            w = lc.window.data
            total += w[0].numel() * w.element_size()
            for st in (lc.comp, lc.index_comp):
                if st is not None and st.state.shape[1] == 2 * st.ratio:
                    total += st.ratio * st.state.shape[-1] * st.state.element_size()
        return total

    def tensors(self) -> list[Tensor]:
        return self.window + [rows for parts in self.comp for _, rows in parts]

    def _comp_rows(self, st, boundary: int) -> Tensor:
        """Ring rows of positions boundary-ratio .. boundary-1 in a compressor state."""
        r = st.ratio
        return (boundary - r + torch.arange(r, device=st.state.device)) % st.state.shape[1]

    def save(self, slot: int, rec: int, boundary: int) -> None:
        """Copy `slot`'s per-slot state (its cache holds exactly tokens 0..boundary-1) into record `rec`."""
        for lc, win, parts in zip(self.cache.layers, self.window, self.comp):
            win[rec].copy_(lc.window.data[slot])
            for st, rows in parts:
                rows[rec].copy_(st.state[slot + 1].index_select(0, self._comp_rows(st, boundary)))

    def load(self, rec: int, slot: int, boundary: int) -> None:
        """Put record `rec` into `slot`: its per-slot state becomes that of tokens 0..boundary-1."""
        for lc, win, parts in zip(self.cache.layers, self.window, self.comp):
            lc.window.data[slot].copy_(win[rec])
            for st, rows in parts:
                st.state[slot + 1].index_copy_(0, self._comp_rows(st, boundary), rows[rec])


class PrefixCache:
    """Registry of cached pages (hash -> page; LRU eviction of pages through the cache) and of boundary records
    (page -> record of the boundary at its end; own LRU pool of `records`).

    `check_next`: with MTP drafting, the MTP block's ring row of position L-1 was computed from token L (the MTP
    block reads the embedding of the next token), so a record is valid only for sequences whose token L equals the
    one it was made with.
    """

    def __init__(self, cache: KVCache, records: int, check_next: bool = False) -> None:
        if records < 1:
            raise ValueError(f"prefix cache records must be >= 1, found {records}")
        self.cache = cache
        self.block_size = cache.block_size
        self.store = BoundaryStore(cache, records)
        self.check_next = check_next
        self.page_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.rec_of: dict[int, int] = {}          # page -> its boundary record
        self.recs: OrderedDict[int, int] = OrderedDict()  # record -> page, least recently used first
        self.next_of: dict[int, int | None] = {}  # record -> token after its boundary
        self.free_recs = list(range(records - 1, -1, -1))
        cache.retain = self.hash_of.__contains__
        cache.on_evict = self._forget
        self.stats = {"query_tokens": 0, "hit_tokens": 0, "registered_pages": 0, "evicted_pages": 0,
                      "evicted_records": 0}

    def _forget(self, page: int) -> None:
        del self.page_of[self.hash_of.pop(page)]
        rec = self.rec_of.pop(page, None)
        if rec is not None:
            del self.recs[rec]
            self.free_recs.append(rec)
        self.stats["evicted_pages"] += 1

    def _usable(self, page: int, tokens: list[int], boundary: int) -> bool:
        rec = self.rec_of.get(page)
        return rec is not None and (not self.check_next or self.next_of[rec] == tokens[boundary])

    def lookup(self, tokens: list[int]) -> list[int]:
        """Pages of the longest cached prefix of `tokens` that has a boundary record and leaves at least the last
        token to compute."""
        pages = []
        for h in page_hashes(tokens, self.block_size, (len(tokens) - 1) // self.block_size):
            page = self.page_of.get(h)
            if page is None:
                break
            pages.append(page)
        while pages and not self._usable(pages[-1], tokens, len(pages) * self.block_size):
            pages.pop()
        return pages

    def count(self, query: int, hit: int) -> None:
        """Hit/miss counters: `query` tokens looked up at an admission, `hit` of them served from the cache."""
        self.stats["query_tokens"] += query
        self.stats["hit_tokens"] += hit

    def attach(self, slot: int, pages: list[int]) -> int:
        """Give the empty `slot` the cached `pages` and the boundary state after them; returns the tokens covered."""
        self.cache.share(slot, pages)
        boundary = len(pages) * self.block_size
        if pages:
            rec = self.rec_of[pages[-1]]
            self.recs.move_to_end(rec)
            self.store.load(rec, slot, boundary)
        return boundary

    def register(self, slot: int, tokens: list[int], boundary: int, next_token: int | None = None) -> None:
        """`slot`'s cache holds exactly `tokens[:boundary]` (boundary a page end): cache its page before the
        boundary, with a record of the slot's state now. A cached prefix keeps its page (this slot hit it, or
        another slot computed it first); it gets a record again if it had lost its own."""
        i, bs = boundary // self.block_size - 1, self.block_size
        # The parent is this slot's previous page, registered when the slot passed it or shared by a hit: extend
        # its hash (re-hashing the whole prefix at every page end would be quadratic in a long sequence).
        parent = self.hash_of.get(self.cache.pages_of(slot)[i - 1]) if i else b""
        h = (_chain(parent, tokens[i * bs:boundary]) if parent is not None
             else page_hashes(tokens, bs, i + 1)[-1])
        page = self.page_of.get(h)
        if page is None:
            page = self.cache.pages_of(slot)[i]
            if page in self.hash_of:  # cannot happen: a slot's unshared pages hold no cached content
                return
            self.page_of[h], self.hash_of[page] = page, h
            self.stats["registered_pages"] += 1
        rec = self.rec_of.get(page)
        if rec is not None:
            if not self.check_next or self.next_of[rec] == next_token:
                self.recs.move_to_end(rec)
                return
        elif self.free_recs:
            rec = self.free_recs.pop()
        else:  # take the least recently used record from its page
            rec, old = self.recs.popitem(last=False)
            del self.rec_of[old]
            self.stats["evicted_records"] += 1
        self.store.save(slot, rec, boundary)
        self.rec_of[page] = rec
        self.recs[rec] = page
        self.recs.move_to_end(rec)
        self.next_of[rec] = next_token

    @property
    def cached_pages(self) -> int:
        return len(self.hash_of)

    @property
    def records(self) -> int:
        """Boundary records in use."""
        return len(self.recs)
