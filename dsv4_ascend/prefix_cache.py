"""Automatic prefix caching, exact on V4's hybrid cache (docs/design.md, "Prefix caching").

A cached unit is one full cache page (`block_size` tokens, a multiple of every compress ratio), addressed by a hash
chain over the token ids: h_i = blake2b(h_{i-1} | ids of page i). Its paged parts (CSA entries, indexer keys, HCA
entries) are final once a sequence has passed the page's end, and are shared read-only through the block table.
The per-slot parts (every layer's sliding-window ring, MTP block included, and the compressors' open-window rows)
are not paged: a `BoundaryStore` keeps, per cached page, a copy of them as they were when the sequence's cache
held exactly the tokens up to the page's end. A hit at L shares the pages before L and copies the boundary state
at L into the new slot: the slot is then bit for bit what computing tokens 0..L-1 would have left.
"""
from __future__ import annotations

import hashlib
from array import array

import torch
from torch import Tensor

from .cache import KVCache

__all__ = ["BoundaryStore", "PrefixCache", "page_hashes"]


def page_hashes(tokens: list[int], block_size: int, pages: int) -> list[bytes]:
    """Chain hashes of the first `pages` full pages of `tokens` (each covers every token before its page's end)."""
    out, h = [], b""
    for i in range(pages):
        ids = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        h = hashlib.blake2b(h + ids, digest_size=16).digest()
        out.append(h)
    return out


class BoundaryStore:
    """Per page, the per-slot state at the page's end boundary L (a multiple of every ratio, so no compression
    window is open): each layer's window ring (positions L-window..L-1, raw rows as stored, C8 included) and, for
    the compressors with overlapping windows (CSA and its indexer), the `ratio` rows of the last closed window
    (positions L-ratio..L-1), which the next window's entry still reads. HCA (no overlap) has nothing live."""

    def __init__(self, cache: KVCache) -> None:
        n = cache.num_blocks
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
        """Bytes one page's boundary state takes (the same for every page)."""
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

    def save(self, slot: int, page: int, boundary: int) -> None:
        """Copy `slot`'s per-slot state (its cache holds exactly tokens 0..boundary-1) into `page`'s record."""
        for lc, win, parts in zip(self.cache.layers, self.window, self.comp):
            win[page].copy_(lc.window.data[slot])
            for st, rows in parts:
                rows[page].copy_(st.state[slot + 1].index_select(0, self._comp_rows(st, boundary)))

    def load(self, page: int, slot: int, boundary: int) -> None:
        """Put `page`'s record into `slot`: its per-slot state becomes that of tokens 0..boundary-1."""
        for lc, win, parts in zip(self.cache.layers, self.window, self.comp):
            lc.window.data[slot].copy_(win[page])
            for st, rows in parts:
                st.state[slot + 1].index_copy_(0, self._comp_rows(st, boundary), rows[page])


class PrefixCache:
    """Registry of cached pages: hash -> page, with each page's boundary state; LRU eviction through the cache.

    `check_next`: with MTP drafting, the MTP block's ring row of position L-1 was computed from token L (the MTP
    block reads the embedding of the next token), so a page's record is valid only for sequences whose token L
    equals the one it was made with.
    """

    def __init__(self, cache: KVCache, check_next: bool = False) -> None:
        self.cache = cache
        self.block_size = cache.block_size
        self.store = BoundaryStore(cache)
        self.check_next = check_next
        self.page_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.next_of: dict[int, int | None] = {}
        cache.retain = self.hash_of.__contains__
        cache.on_evict = self._forget
        self.stats = {"query_tokens": 0, "hit_tokens": 0, "registered_pages": 0, "evicted_pages": 0}

    def _forget(self, page: int) -> None:
        del self.page_of[self.hash_of.pop(page)]
        del self.next_of[page]
        self.stats["evicted_pages"] += 1

    def lookup(self, tokens: list[int]) -> list[int]:
        """Pages of the longest cached prefix of `tokens` that leaves at least the last token to compute."""
        pages = []
        for h in page_hashes(tokens, self.block_size, (len(tokens) - 1) // self.block_size):
            page = self.page_of.get(h)
            if page is None:
                break
            pages.append(page)
        while self.check_next and pages and self.next_of[pages[-1]] != tokens[len(pages) * self.block_size]:
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
            self.store.load(pages[-1], slot, boundary)
        return boundary

    def register(self, slot: int, tokens: list[int], boundary: int, next_token: int | None = None) -> None:
        """`slot`'s cache holds exactly `tokens[:boundary]` (boundary a page end): cache its page before the
        boundary with the slot's state now. A prefix that is cached already (this slot hit it, or another slot
        computed it first) is left as it is."""
        i = boundary // self.block_size - 1
        h = page_hashes(tokens, self.block_size, i + 1)[-1]
        page = self.cache.pages_of(slot)[i]
        if h in self.page_of or page in self.hash_of:
            return
        self.store.save(slot, page, boundary)
        self.page_of[h] = page
        self.hash_of[page] = h
        self.next_of[page] = next_token
        self.stats["registered_pages"] += 1

    @property
    def cached_pages(self) -> int:
        return len(self.hash_of)
