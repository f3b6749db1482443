"""The V4 KV cache: one design for every layer type, allocated once as static buffers (graph capture needs fixed
addresses), paged for the parts that grow with the sequence.

Per layer (docs/design.md): a sliding-window ring of raw kv (fixed size per sequence slot), the compressed
entries (CSA, HCA) and the indexer's compressed keys (CSA) in fixed-size pages shared by all sequences through a
block table, and the unfinished-window state of each compressor (per slot). One page covers `block_size` tokens
in every layer (block_size/ratio entries). Nothing is reset when a slot or page is reused: every read is masked by
the sequence's position. Optional FP8 storage (C8) keeps the nope dims as e4m3 with a power-of-two scale per 64
values and the rope dims in the model dtype, packed per row in the byte layout of cann-recipes-infer's
`kv_compress_epilog` (quant_mode 2), which `npu_kv_quant_sparse_attn_sharedkv` reads (`c8_pack` / `c8_unpack`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import quant
from .config import ModelConfig

__all__ = ["CompressorState", "RowStore", "WindowRing", "LayerCache", "KVCache", "CacheFullError", "c8_row_bytes",
           "c8_pack", "c8_unpack"]

_C8_BLOCK = 64
_C8_ALIGN = 128  # row bytes rounded up to a multiple of 128 (kv_compress_epilog's d')
ScatterRows = Callable[[Tensor, Tensor, Tensor], None]  # Backend.scatter_rows(dst [R, s], rows [u], src [u, s])
# (dst uint8 [R, row_bytes], rows [u] (-1 skipped), values [u, width], rope_dim, dtype): quantise + pack + scatter
C8Write = Callable[[Tensor, Tensor, Tensor, int, torch.dtype], None]


def c8_row_bytes(width: int, rope_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one C8 row: rope (model dtype) + e4m3 nope + one e8m0 scale per 64 nope values, 128-aligned
    (width 512, rope 64, bf16: 128 + 448 + 7 -> 640, the documented row of `kv_compress_epilog`). fp32 rows
    (test models; no kernel reads them) are not padded."""
    nope = width - rope_dim
    size = torch.empty(0, dtype=dtype).element_size()
    used = rope_dim * size + nope + nope // _C8_BLOCK
    return used if size > 2 else -(-used // _C8_ALIGN) * _C8_ALIGN


def c8_pack(values: Tensor, rope_dim: int, dtype: torch.dtype) -> Tensor:
    """Rows [..., width] -> C8 bytes uint8 [..., c8_row_bytes]: [rope as `dtype` bytes | e4m3 nope | e8m0 scales |
    zero padding] (cann-recipes-infer `kv_compress_epilog` quant_mode 2 golden). The nope dims are quantised per
    64 values with DeepSeek's act_quant rule (s = 2^ceil(log2(max(amax, 1e-4) / 448))), the epilogue's
    round_scale rule; s is a power of two, so its e8m0 byte (exponent + 127) is exact."""
    nope = values.shape[-1] - rope_dim
    q, s = quant.act_quant(values[..., :nope].float(), _C8_BLOCK)
    e8m0 = (torch.frexp(s)[1] + 126).to(torch.uint8)  # s = 0.5 * 2^e  ->  log2 s + 127 = e + 126
    rope = values[..., nope:].to(dtype).contiguous().view(torch.uint8)
    parts = [rope, q.view(torch.uint8), e8m0]
    used = sum(p.shape[-1] for p in parts)
    pad = c8_row_bytes(values.shape[-1], rope_dim, dtype) - used
    return torch.cat(parts + [rope.new_zeros(*rope.shape[:-1], pad)], -1)


def c8_unpack(rows: Tensor, width: int, rope_dim: int, dtype: torch.dtype, tile: int = _C8_BLOCK) -> Tensor:
    """C8 bytes [..., row_bytes] -> rows [..., width] in `dtype`: e4m3 * 2^(e8m0 - 127) (exact in bf16), rope.
    `tile`: values per e8m0 scale (the FP8-KV kernel's tile_size; the cache writes 64)."""
    nope = width - rope_dim
    rb = rope_dim * torch.empty(0, dtype=dtype).element_size()
    rope = rows[..., :rb].contiguous().view(dtype)
    q = rows[..., rb:rb + nope].contiguous().view(torch.float8_e4m3fn).float()
    s = torch.exp2(rows[..., rb + nope:rb + nope + nope // tile].float() - 127)
    deq = (q.unflatten(-1, (-1, tile)) * s.unsqueeze(-1)).flatten(-2)
    return torch.cat([deq.to(dtype), rope], -1)


class CacheFullError(RuntimeError):
    """No free pages left for a sequence."""


@dataclass
class CompressorState:
    """The compressor's raw (kv | score) rows as one fp32 ring per slot, in the layout of the `compressor` op.

    `state` [1 + slots, R, 2c]: block s + 1 belongs to slot s (block 0 is never a slot's: the op reads a 0 in its
    block table as "do not touch"); position p of that slot sits in row p % R as [kv (c) | score (c)]
    (score = gate logits + position bias). R = 2*ratio with overlap (CSA: the previous window is read too),
    else ratio. The rows still needed are those of positions (p // ratio - overlap) * ratio .. p, so nothing
    is counted or reset.
    """

    state: Tensor  # [1 + slots, R, 2c] fp32
    ratio: int

    @classmethod
    def allocate(cls, slots: int, ratio: int, width: int, overlap: bool, device) -> "CompressorState":
        c = 2 * width if overlap else width
        ring = 2 * ratio if overlap else ratio
        return cls(torch.zeros(1 + slots, ring, 2 * c, dtype=torch.float32, device=device), ratio)

    def blocks(self, slots: Tensor) -> Tensor:
        """State block of each slot in `slots` [B]."""
        return slots + 1

    def scratch(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """(copy of the slots' blocks behind a null block 0, their blocks 1..B in it): a state to run on and
        throw away (deferred prefill)."""
        blocks = torch.cat([torch.zeros(1, dtype=slots.dtype, device=slots.device), self.blocks(slots)])
        return self.state.index_select(0, blocks), torch.arange(1, slots.shape[0] + 1, device=slots.device)

    def rows(self, slot: int, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(kv, score) rows [N, c] stored for `positions` [N] of `slot` (valid for the live positions only)."""
        r = self.state[slot + 1, positions % self.state.shape[1]]
        c = r.shape[-1] // 2
        return r[:, :c], r[:, c:]

    def tensors(self) -> list[Tensor]:
        return [self.state]


class RowStore:
    """A [*lead, width] buffer of kv rows, stored in the model dtype or as C8 bytes [*lead, c8_row_bytes] (e4m3
    nope + e8m0 scales, rope as is; `c8_pack`)."""

    def __init__(self, lead: tuple[int, ...], width: int, rope_dim: int, dtype: torch.dtype, device,
                 fp8: bool = False, scatter: ScatterRows | None = None, c8_write: C8Write | None = None) -> None:
        self.fp8 = fp8
        self.dtype = dtype
        self.rope_dim = rope_dim
        self.width = width
        self.lead = tuple(lead)
        # Writes go through `scatter(dst [R, s], rows [u], src [u, s])` (a backend's scatter_rows override); None:
        # a plain aten index_put (what Backend.scatter_rows would do, minus its redirect ops: 25-45% of a tiny
        # model's eager decode step, and the model never writes negative rows). C8 rows go through `c8_write`
        # (quantise + pack + scatter in one op, e.g. the 950's kv_compress_epilog) when given, else are packed
        # here and scattered as bytes.
        self.scatter: ScatterRows | None = scatter
        self.c8_write: C8Write | None = c8_write if fp8 else None
        if fp8:
            if (width - rope_dim) % _C8_BLOCK:
                raise ValueError(f"C8 cache needs (head_dim - rope_dim) % {_C8_BLOCK} == 0, found {width - rope_dim}")
            self.data = torch.zeros(*lead, c8_row_bytes(width, rope_dim, dtype), dtype=torch.uint8, device=device)
        else:
            self.data = torch.zeros(*lead, width, dtype=dtype, device=device)

    def tensors(self) -> list[Tensor]:
        return [self.data]

    def snapshot(self, index: tuple) -> list[Tensor]:
        """Copies of the stored rows at `index` (raw storage, so restore is exact)."""
        return [t[index].clone() for t in self.tensors()]

    def restore(self, index: tuple, saved: list[Tensor]) -> None:
        for t, v in zip(self.tensors(), saved):
            t[index] = v

    def read(self, *index) -> Tensor:
        return self.unpack(self.data[index])

    def unpack(self, stored: Tensor) -> Tensor:
        """Stored rows (C8 bytes or model-dtype rows) -> rows [..., width] in the cache dtype."""
        return c8_unpack(stored, self.width, self.rope_dim, self.dtype) if self.fp8 else stored

    def stored(self, values: Tensor) -> Tensor:
        """values [..., width] as this store would give them back (C8: quantised; else cast to the dtype)."""
        return self.unpack(self.pack(values))

    def pack(self, values: Tensor) -> Tensor:
        """values [..., width] -> their stored form (C8 bytes, or the cache dtype)."""
        return c8_pack(values, self.rope_dim, self.dtype) if self.fp8 else values.to(self.dtype)

    def read_pages(self, table: Tensor) -> Tensor:
        """Whole pages `table` [B, P] of a paged store, as rows [B, P*rows_per_page, c]."""
        b = table.shape[0]
        return self.unpack(self.data.index_select(0, table.reshape(-1)).view(b, -1, self.data.shape[-1]))

    def _flat_rows(self, index) -> Tensor | None:
        """Row numbers in the [prod(lead), width] view for a tuple of one integer tensor per lead dim
        (broadcast together; -1 where any part is negative, i.e. skipped), or None for other index forms."""
        if not isinstance(index, tuple) or len(index) != len(self.lead):
            return None
        if not all(isinstance(i, Tensor) and not i.is_floating_point() and i.dtype != torch.bool for i in index):
            return None
        parts = torch.broadcast_tensors(*[i.long() for i in index])
        rows, skip = torch.zeros_like(parts[0]), torch.zeros_like(parts[0], dtype=torch.bool)
        for i, n in zip(parts, self.lead):
            rows, skip = rows * n + i, skip | (i < 0)
        return torch.where(skip, -1, rows)

    def write(self, index: tuple, values: Tensor, keep: Tensor | None = None) -> None:
        """Store rows `values` [..., width] at `index` (one integer tensor per lead dim) through `self.c8_write`
        (C8) or `self.scatter` (a negative part skips the row); without one, or for other index forms, an aten
        index_put (which would wrap a negative index, so the model passes none). `keep` (bool, broadcast with the
        index): rows where it is False are left as they are (ragged prefill batches: padding and tokens that are
        not the row's)."""
        hook = self.c8_write or self.scatter
        rows = None if hook is None else self._flat_rows(index)
        if rows is None:
            return self._write_indexed(index, values, keep)
        if keep is not None:
            rows = torch.where(keep, rows, -1)
        shape, rows, w = rows.shape, rows.reshape(-1), self.data.shape[-1]
        if self.c8_write is not None:
            src = values.expand(*shape, values.shape[-1]).reshape(-1, values.shape[-1])
            self.c8_write(self.data.view(-1, w), rows, src, self.rope_dim, self.dtype)
            return
        self.scatter(self.data.view(-1, w), rows, self.pack(values).expand(*shape, w).reshape(-1, w))

    def _write_indexed(self, index, values: Tensor, keep: Tensor | None = None) -> None:
        """The aten path: no hook, or an index form `write` cannot flatten (slices, python ints). With `keep`, the
        kept rows' old raw storage is written back (exact, also for C8 bytes)."""
        src = self.pack(values)
        if keep is None:
            self.data[index] = src
        else:
            old = self.data[index]
            self.data[index] = torch.where(keep.unsqueeze(-1), src.expand_as(old), old)


class WindowRing(RowStore):
    """The sliding-window ring of one layer: raw kv rows [slots, size, d]; token t of a slot lives in row t % size.

    The one place that knows where a window position lives (model, attention view and speculative rollback ask
    it). A row is overwritten `size` positions later, so row t % size holds token t only while t is in the window.
    """

    def __init__(self, slots: int, size: int, width: int, rope_dim: int, dtype: torch.dtype, device,
                 fp8: bool = False, scatter: ScatterRows | None = None, c8_write: C8Write | None = None) -> None:
        super().__init__((slots, size), width, rope_dim, dtype, device, fp8, scatter, c8_write)
        self.size = size

    def row(self, positions: Tensor) -> Tensor:
        """Ring row of each position (any shape)."""
        return positions % self.size

    def append(self, slots: Tensor, positions: Tensor, kv: Tensor) -> None:
        """Decode: store kv [B, d] of token positions[b] of slot slots[b]."""
        self.write((slots, self.row(positions)), kv)

    def write_chunk(self, slots: Tensor, start: int, kv: Tensor) -> None:
        """Prefill: store a chunk kv [B, S, d] at positions start..start+S-1 (only its last `size` rows survive)."""
        keep = min(kv.shape[1], self.size)
        t = start + torch.arange(kv.shape[1] - keep, kv.shape[1], device=kv.device)
        self.write((slots.unsqueeze(1), self.row(t).unsqueeze(0)), kv[:, -keep:])

    def write_rows(self, slots: Tensor, start: Tensor, used: Tensor, kv: Tensor) -> None:
        """Ragged prefill: row b of kv [B, S, d] holds positions start[b].. of slot slots[b]; store its first
        used[b] rows (only the last `size` survive). Padding rows never touch the ring."""
        s, dev = kv.shape[1], kv.device
        t = (start + used).unsqueeze(1) - self.size + torch.arange(self.size, device=dev)  # last `size` positions
        keep = t >= start.unsqueeze(1)  # the others are older positions, already in the ring: left alone
        src = (t - start.unsqueeze(1)).clamp(0, s - 1)
        vals = kv.gather(1, src.unsqueeze(-1).expand(-1, -1, kv.shape[-1]))
        self.write((slots.unsqueeze(1), self.row(t)), vals, keep)

    def window_rows(self, positions: Tensor) -> Tensor:
        """Decode: ring rows [B, size] of positions t-size+1 .. t for each t in `positions` [B] (-1: before 0)."""
        p = positions.unsqueeze(1) - (self.size - 1) + torch.arange(self.size, device=positions.device)
        return torch.where(p < 0, -1, self.row(p))

    def chunk_source(self, positions: Tensor, start: int | Tensor) -> Tensor:
        """Where positions (>= 0) live in [ring rows, then the rows of a chunk starting at `start`]: ring row
        p % size before the chunk, size + (p - start) inside it (the ring holds nothing of the chunk yet)."""
        return torch.where(positions >= start, self.size + positions - start, self.row(positions))

    def chunk_window_rows(self, start: int | Tensor, length: int, device, first: int = 0) -> Tensor:
        """Prefill of a chunk starting at `start`: for its queries first..first+length-1, rows [length, size] of
        their window positions in [ring, chunk] (-1: < 0); per-row starts [B] (ragged batch): [B, length, size]."""
        if isinstance(start, Tensor):
            start = start.view(-1, 1, 1)
        t = start + first + torch.arange(length, device=device).unsqueeze(-1)
        p = t - (self.size - 1) + torch.arange(self.size, device=device)
        return torch.where(p < 0, -1, self.chunk_source(p, start))


class LayerCache:
    """All decode state of one attention layer."""

    def __init__(self, cfg: ModelConfig, ratio: int, max_slots: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device, fp8: bool, block_table: Tensor,
                 scatter: ScatterRows | None = None, c8_write: C8Write | None = None) -> None:
        d = cfg.head_dim
        di = cfg.index_head_dim
        r = cfg.qk_rope_head_dim
        self.ratio = ratio
        self.block_size = block_size
        self.block_table = block_table
        self.window = WindowRing(max_slots, cfg.sliding_window, d, r, dtype, device, fp8, scatter, c8_write)
        self.entries = None
        self.comp = None
        self.index_keys = None
        self.index_comp = None
        if ratio:
            self.entries = RowStore((num_blocks, block_size // ratio), d, r, dtype, device, fp8, scatter, c8_write)
            self.comp = CompressorState.allocate(max_slots, ratio, d, ratio == 4, device)
        if ratio == 4:
            self.index_keys = RowStore((num_blocks, block_size // 4), di, r, dtype, device, False, scatter)
            self.index_comp = CompressorState.allocate(max_slots, 4, di, True, device)

    def tensors(self) -> list[Tensor]:
        out = self.window.tensors()
        for s in (self.entries, self.index_keys, self.comp, self.index_comp):
            if s is not None:
                out += s.tensors()
        return out

    def _page(self, slots: Tensor, w: Tensor, ratio: int) -> tuple[Tensor, Tensor]:
        """Physical (page, row) of entry indices w [B,N] (or [B]) of sequences in `slots` [B]."""
        per = self.block_size // ratio
        table = self.block_table[slots]  # [B, pages]
        page = table.gather(1, (w // per).view(w.shape[0], -1)).view(w.shape)
        return page, w % per

    def read_entries(self, store: RowStore, slots: Tensor, n: int, ratio: int) -> Tensor:
        """Entries 0..n-1 [B,n,c] of the sequences in `slots`, read page by page (whole-page copies)."""
        per = self.block_size // ratio
        pages = -(-n // per)
        table = self.block_table[slots][:, :pages]  # [B, pages]
        return store.read_pages(table)[:, :n]

    def write_entries(self, store: RowStore, slots: Tensor, w: Tensor, values: Tensor, ratio: int,
                      keep: Tensor | None = None) -> None:
        """values [B,N,c] for entry indices w [B,N] (`keep` [B,N]: False leaves that entry as it is; such rows are
        sent to the null page, so they never alias a kept row)."""
        page, row = self._page(slots, w, ratio)
        if keep is not None:
            page = torch.where(keep, page, 0)
        store.write((page, row), values, keep)


class KVCache:
    """Static cache for `max_slots` sequences of up to `max_seq_len` tokens: main layers then MTP blocks.

    Pages (`num_blocks` of `block_size` tokens) are handed to sequences by `allocate`/`free`; physical page 0
    is never handed out and absorbs writes of unused rows. With `preassign=True` every slot gets pages for
    `max_seq_len` tokens up front (the simple no-engine path). Prefix caching (prefix_cache.py) shares full pages
    read-only between slots (`share`, a count of holders per page) and keeps a page whose last holder left when
    `retain(page)` says so: such pages are free for `allocate`, which takes them last, least recently used first
    (`on_evict(page)` tells the owner of their content).
    """

    def __init__(self, cfg: ModelConfig, max_slots: int, max_seq_len: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", n_mtp: int | None = None, num_blocks: int | None = None,
                 block_size: int | None = None, kv_fp8: bool = False, preassign: bool = True,
                 scatter: ScatterRows | None = None, c8_write: C8Write | None = None) -> None:
        if max_seq_len > cfg.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds config max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        n_mtp = cfg.num_nextn_predict_layers if n_mtp is None else n_mtp
        ratios = cfg.layer_ratios + cfg.mtp_ratios[:n_mtp]
        lcm = math.lcm(*[r for r in ratios if r] or [1])
        # Default page: ~256 tokens (64 CSA entries, 2 HCA entries at ratio 128), never more than one sequence.
        self.block_size = block_size or lcm * min(-(-256 // lcm), -(-max_seq_len // lcm))
        if self.block_size % lcm:
            raise ValueError(f"block_size {self.block_size} must be a multiple of every compress ratio (lcm {lcm})")
        self.max_slots = max_slots
        self.dtype = dtype
        self.kv_fp8 = kv_fp8
        self.pages_per_seq = -(-max_seq_len // self.block_size)
        self.max_seq_len = self.pages_per_seq * self.block_size
        self.num_blocks = num_blocks or max_slots * self.pages_per_seq + 1
        self.block_table = torch.zeros(max_slots, self.pages_per_seq, dtype=torch.int64, device=device)
        self.layers = [LayerCache(cfg, m, max_slots, self.num_blocks, self.block_size, dtype, device, kv_fp8,
                                  self.block_table, scatter, c8_write) for m in ratios]
        self._free = list(range(self.num_blocks - 1, 0, -1))
        self._owned: dict[int, list[int]] = {}
        self._refs: dict[int, int] = {}  # page -> slots holding it (> 1: a shared prefix page)
        self.retained: OrderedDict[int, None] = OrderedDict()  # free pages kept for their content, LRU first
        self.retain: Callable[[int], bool] | None = None
        self.on_evict: Callable[[int], None] | None = None
        if preassign:
            for s in range(max_slots):
                self.allocate(s, self.max_seq_len)

    # -- pages ------------------------------------------------------------------------------------------------
    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def free_pages(self) -> int:
        """Pages `allocate` can hand out: never used or released, plus retained ones (evicted on demand)."""
        return len(self._free) + len(self.retained)

    def pages_of(self, slot: int) -> list[int]:
        """Physical pages `slot` holds, in token order."""
        return list(self._owned.get(slot, ()))

    def owned_tokens(self, slot: int) -> int:
        """Tokens the pages `slot` holds now cover."""
        return len(self._owned.get(slot, ())) * self.block_size

    def allocate(self, slot: int, tokens: int) -> None:
        """Give `slot` pages for `tokens` tokens (keeps the pages it already has)."""
        if tokens > self.max_seq_len:
            raise CacheFullError(f"{tokens} tokens exceed max_seq_len {self.max_seq_len}")
        owned = self._owned.setdefault(slot, [])
        need = self.pages_for(tokens) - len(owned)
        if need > self.free_pages:
            raise CacheFullError(f"need {need} more cache pages for slot {slot}, {self.free_pages} free")
        for _ in range(max(need, 0)):
            if self._free:
                page = self._free.pop()
            else:  # evict the least recently used retained page
                page = self.retained.popitem(last=False)[0]
                if self.on_evict is not None:
                    self.on_evict(page)
            self._refs[page] = 1
            owned.append(page)
        self.block_table[slot, : len(owned)] = torch.tensor(owned, dtype=torch.int64)

    def share(self, slot: int, pages: list[int]) -> None:
        """Give `slot`, which holds no page, the filled pages `pages` as its first ones (read-only: the sequence
        writes only past them)."""
        if self._owned.get(slot):
            raise ValueError(f"slot {slot} already holds pages; shared pages must come first")
        for page in pages:
            self.retained.pop(page, None)
            self._refs[page] = self._refs.get(page, 0) + 1
        self._owned[slot] = list(pages)
        if pages:
            self.block_table[slot, : len(pages)] = torch.tensor(pages, dtype=torch.int64)

    def free(self, slot: int) -> None:
        """Return a finished sequence's pages: a page no other slot holds becomes free, or retained (its last
        page first in eviction order, so a cached prefix loses its tail before its head)."""
        for page in reversed(self._owned.pop(slot, [])):
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            del self._refs[page]
            if self.retain is not None and self.retain(page):
                self.retained[page] = None
            else:
                self._free.append(page)
        self.block_table[slot].zero_()

    # -- size -------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for lc in self.layers for t in lc.tensors())
