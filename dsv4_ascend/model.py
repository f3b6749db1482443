"""DeepSeek-V4, written once against the Backend seam.

Module and parameter names are the official checkpoint's (`layers.3.attn.wq_a.weight`, `hc_head_fn`, ...), so
loading needs no renaming. The one exception is storage of routed experts: they are stacked per layer
(`ffn.routed.w1` = [E, I, D]) so a grouped matmul can use them; `Transformer.checkpoint_tensors()` exposes them
under their official per-expert names (`ffn.experts.5.w1.weight`, `.scale`).

Every forward takes a `Step`: the positions, the cache and the cache slots of the sequences in the batch.
Prefill chunks know their start on the host; decode steps (one token per sequence) carry positions only as
tensors and do no host syncs, so they can be captured as a graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from . import quant
from .attention_view import KVView, PagedRows
from .backend import Backend
from .cache import CompressorState, KVCache, LayerCache
from .config import ModelConfig
from .layers import Linear, RMSNorm, WeightFormats, param as _param
from .moe import Expert, Gate, MoE, RoutedExperts
from .rope import RopeTable, apply_rope_tail
from .scalar_consts import scalar

# The layers (layers.py) and the MoE (moe.py) are re-exported: the model's public names live here.
__all__ = ["WeightFormats", "Linear", "RMSNorm", "Step", "Gate", "Expert", "RoutedExperts", "MoE", "Transformer"]


@dataclass
class Step:
    """One forward's bookkeeping: which sequences (cache slots), which positions, prefill or decode.

    Prefill: `start` is the host-known first position of the chunk (same for every row), or for a ragged batch
    the per-row starts [B] (a tensor) with `used` [B] the valid tokens of each row (the rest of the row is padding:
    computed, never written to the cache) and `end` a host bound on every position. Decode: `start` is None, the
    chunk is one token per row and `positions` [B,1] may differ per row.
    """

    input_ids: Tensor
    positions: Tensor
    slots: Tensor
    cache: KVCache
    start: int | Tensor | None
    span_pages: int | None = None  # decode: pages that cover every row's context (host hint; None = all)
    defer: list | None = None      # prefill: leave the cache untouched, collect commit(k) callbacks instead
    used: Tensor | None = None     # ragged prefill: valid tokens per row [B]
    end: int | None = None         # prefill: host bound, every position < end
    sync_free: bool = False        # prefill without host reads (a captured MTP verify): the decode-path MoE
    lengths: tuple[int, ...] | None = None  # eager decode: each row's host-known length after this token
    _rope: dict = field(default_factory=dict)
    attn_shared: dict = field(default_factory=dict)  # KVView.shared: the backend's per-step attention tensors

    @property
    def decode(self) -> bool:
        return self.start is None

    @property
    def ragged(self) -> bool:
        """A prefill batch whose rows have their own starts and lengths."""
        return isinstance(self.start, Tensor)

    def closes(self, ratio: int) -> bool:
        """Decode: may a row's token close a window of `ratio` this step (its length a multiple of `ratio`)?
        True without host lengths (graph mode: the step's ops must not depend on the positions)."""
        return self.lengths is None or any(n % ratio == 0 for n in self.lengths)

    def starts(self) -> Tensor:
        """Per-row first positions [B] of a prefill chunk."""
        if self.ragged:
            return self.start
        return torch.full((self.input_ids.shape[0],), self.start, dtype=torch.int64, device=self.input_ids.device)

    def cos_sin(self, table: RopeTable) -> tuple[Tensor, Tensor]:
        """cos/sin of this step's positions for one table, computed once per step."""
        if table.name not in self._rope:
            self._rope[table.name] = table.cos_sin(self.positions)
        return self._rope[table.name]

    def head_cos_sin(self, table: RopeTable) -> tuple[Tensor, Tensor, Tensor]:
        """(cos, sin, -sin) with a heads axis ([B,S,1,r/2]) for q and the output's inverse rotation, computed once
        per step (not per layer)."""
        key = (table.name, "heads")
        if key not in self._rope:
            cos, sin = self.cos_sin(table)
            self._rope[key] = (cos.unsqueeze(2), sin.unsqueeze(2), -sin.unsqueeze(2))
        return self._rope[key]


class Compressor(nn.Module):
    """Softmax-pools kv of every `ratio` tokens into one entry (CSA: overlapping windows of 2*ratio), through the
    Backend's `compressor` op (the custom fused op on Ascend); its raw-row state is a `CompressorState` ring."""

    def __init__(self, backend: Backend, cfg: ModelConfig, ratio: int, width: int, dtype: torch.dtype,
                 rotate: bool, device=None):
        super().__init__()
        self.backend = backend
        self.ratio = ratio
        self.width = width
        self.overlap = ratio == 4
        # QAT simulation (deepseek numerics): indexer keys (rotate) Hadamard + FP4, kv entries FP8 on the nope dims.
        self.rotate = rotate
        self.rope_dim = cfg.qk_rope_head_dim
        coff = 2 if self.overlap else 1
        self.wkv = Linear(backend, cfg.hidden_size, coff * width, "plain", dtype, device)
        self.wgate = Linear(backend, cfg.hidden_size, coff * width, "plain", dtype, device)
        self.ape = _param(ratio, coff * width, dtype=torch.float32, device=device)
        self.norm = RMSNorm(backend, width, cfg.rms_norm_eps, device)

    def forward(self, x: Tensor, start: Tensor, st: CompressorState, slots: Tensor, table: RopeTable,
                write: bool = True, used: int | Tensor | None = None) -> Tensor:
        """Entries [B, ceil(S/ratio), d] of the windows that x [B,S,D] (positions start[b] + s) closes, as stored
        in the cache; later rows (windows still open) are unspecified. The state of `slots` is updated, or with
        write=False left untouched (a scratch copy runs instead: speculative verify before commit). `used`: only
        the first `used` tokens take part (commit of a verified prefix; per row [B] in a ragged batch)."""
        m = self.ratio
        n = -(-x.shape[1] // m)
        if n == 1:  # one window (decode): the same integer positions with fewer ops
            cos, sin = table.cos_sin((start // m * m).unsqueeze(1))
        else:
            cos, sin = table.cos_sin(((start // m).unsqueeze(1) + torch.arange(n, device=x.device)) * m)
        state, blocks = (st.state, st.blocks(slots)) if write else st.scratch(slots)
        e = self.backend.compressor(x, self.wkv.weight, self.wgate.weight, self.ape, self.norm.weight, self.norm.eps,
                                    state, blocks, start, cos, sin, m, used)
        e = simulate_indexer_qat(self.backend, e) if self.rotate else simulate_kv_qat(self.backend, e, self.rope_dim)
        # Rows of windows still open are garbage (NaN in the emulator); decode stores its row anyway, and attention
        # kernels weigh masked rows by 0, so store zeros there (0 * NaN would poison the output).
        closed = (start % m + (x.shape[1] if used is None else used)) // m  # [B] windows closed
        if n == 1:
            return torch.where((closed > 0).view(-1, 1, 1), e, scalar(0.0))
        return torch.where((torch.arange(n, device=x.device) < closed.unsqueeze(1)).unsqueeze(-1), e, 0.0)

    def advance(self, x: Tensor, start: Tensor, st: CompressorState, slots: Tensor) -> None:
        """Decode step whose token closes no window in any row: only the state rows of x [B,1,D] are written
        (`Backend.compressor_state`), no entry (entry start//ratio becomes visible only once it is closed)."""
        self.backend.compressor_state(x, self.wkv.weight, self.wgate.weight, self.ape, st.state, st.blocks(slots),
                                      start, self.ratio)


def simulate_kv_qat(backend: Backend, kv: Tensor, rope_dim: int) -> Tensor:
    """DeepSeek numerics' QAT simulation of kv rows and entries: the nope dims through FP8 (1x64 blocks), the
    last `rope_dim` dims as they are (docs/numerics.md row 3). Identity in exact numerics."""
    if not backend.options.deepseek:
        return kv
    return torch.cat([quant.fp8_sim(kv[..., :-rope_dim], 64), kv[..., -rope_dim:]], -1)


def simulate_indexer_qat(backend: Backend, x: Tensor) -> Tensor:
    """DeepSeek numerics' QAT simulation of indexer queries and keys: Hadamard rotation (fp32, one rounding),
    then FP4 (1x32 blocks) (docs/numerics.md rows 4 and 4a). Identity in exact numerics."""
    if not backend.options.deepseek:
        return x
    return quant.fp4_sim(quant.hadamard_rotate(x), 32)


def _span(w0: int, e: Tensor) -> Tensor:
    """Entry indices [B,N] of N consecutive new entries starting at w0."""
    return (w0 + torch.arange(e.shape[1], device=e.device)).expand(e.shape[0], e.shape[1])


# Indexer scores per query block (fp32 elements, [blk, heads, N]): 16 MiB, a bound independent of the context.
_INDEXER_SCORES = 1 << 22


class Indexer(nn.Module):
    """Lightning indexer: scores compressed entries per query and keeps the top `index_topk`."""

    def __init__(self, backend: Backend, cfg: ModelConfig, fmt: WeightFormats, dtype: torch.dtype, device=None):
        super().__init__()
        self.backend = backend
        self.n_heads = cfg.index_n_heads
        self.head_dim = cfg.index_head_dim
        self.topk = cfg.index_topk
        self.wq_b = Linear(backend, cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, fmt.dense, dtype, device)
        self.weights_proj = Linear(backend, cfg.hidden_size, cfg.index_n_heads, "plain", dtype, device)
        self.compressor = Compressor(backend, cfg, 4, cfg.index_head_dim, dtype, rotate=True, device=device)
        self.weight_scale = cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5

    def select(self, x: Tensor, qr: Tensor, keys: Tensor | PagedRows, n_visible: Tensor, cos: Tensor,
               sin: Tensor) -> Tensor:
        """Picks [B,S,index_topk] over keys [B,N,d], or keys still in their pages (decode: no copy of all N)."""
        b, s, _ = x.shape
        q = self.wq_b(qr).view(b, s, self.n_heads, self.head_dim)
        q = simulate_indexer_qat(self.backend, apply_rope_tail(self.backend, q, cos.unsqueeze(2), sin.unsqueeze(2)))
        if self.backend.options.deepseek:  # DeepSeek scales in the activation dtype (docs/numerics.md row 6)
            w = (self.weights_proj(x) * self.weight_scale).float()
        else:
            w = self.weights_proj(x).float() * self.weight_scale
        # Queries in blocks: the [blk, heads, N] score temporaries stay under _INDEXER_SCORES elements whatever
        # the context (N = 262,144 CSA entries at 1M tokens). Decode (s = 1) is one block.
        paged = isinstance(keys, PagedRows)
        blk = max(1, _INDEXER_SCORES // (b * self.n_heads * max(keys.n if paged else keys.shape[1], 1)))
        topk = self.backend.indexer_topk_paged if paged else self.backend.indexer_topk
        return torch.cat([topk(q[:, i:i + blk], w[:, i:i + blk], keys, n_visible[:, i:i + blk], self.topk)
                          for i in range(0, s, blk)], 1)


class Attention(nn.Module):
    """Shared-KV MQA over a sliding window plus (CSA) selected or (HCA) all compressed entries, with sinks."""

    def __init__(self, backend: Backend, cfg: ModelConfig, layer_id: int, ratio: int, fmt: WeightFormats,
                 dtype: torch.dtype, tables: dict[str, RopeTable], device=None):
        super().__init__()
        self.backend = backend
        self.layer_id = layer_id
        self.ratio = ratio
        self.n_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.groups = cfg.o_groups
        self.eps = cfg.rms_norm_eps
        self.table = tables["compress" if ratio else "main"]
        d, h = cfg.head_dim, cfg.num_attention_heads
        self.attn_sink = _param(h, dtype=torch.float32, device=device)
        self.wq_a = Linear(backend, cfg.hidden_size, cfg.q_lora_rank, fmt.dense, dtype, device)
        self.q_norm = RMSNorm(backend, cfg.q_lora_rank, cfg.rms_norm_eps, device)
        self.wq_b = Linear(backend, cfg.q_lora_rank, h * d, fmt.dense, dtype, device)
        self.wkv = Linear(backend, cfg.hidden_size, d, fmt.dense, dtype, device)
        self.kv_norm = RMSNorm(backend, d, cfg.rms_norm_eps, device)
        self.wo_a = Linear(backend, h * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, fmt.dense, dtype, device)
        self.wo_b = Linear(backend, cfg.o_groups * cfg.o_lora_rank, cfg.hidden_size, fmt.dense, dtype, device)
        self.compressor = Compressor(backend, cfg, ratio, d, dtype, False, device) if ratio else None
        self.indexer = Indexer(backend, cfg, fmt, dtype, device) if ratio == 4 else None
        self.rope_dim = cfg.qk_rope_head_dim

    # -- window keys ------------------------------------------------------------------------------------------
    def _window_prefill(self, kv: Tensor, step: Step, lc: LayerCache) -> KVView:
        """The window part of a prefill chunk's view: the ring (positions < start) plus the chunk's own rows.

        The ring is written after attention (`forward`), so the view reads it as it was before the chunk; a
        deferred chunk only registers the write of its accepted prefix."""
        s0 = step.start
        if step.defer is not None and step.ragged:
            step.defer.append(lambda k: lc.window.write_rows(step.slots, s0, k, kv))
        elif step.defer is not None:
            step.defer.append(lambda k: k and lc.window.write_chunk(step.slots, s0, kv[:, :k]))
        return KVView(lc.window, step.slots, step.positions, kv, s0, step.end)

    def _window_decode(self, kv: Tensor, step: Step, lc: LayerCache) -> KVView:
        """Write this step's row into the ring; return the window part of the step's view."""
        lc.window.append(step.slots, step.positions[:, 0], kv[:, 0])
        max_len = (step.span_pages or lc.block_table.shape[1]) * lc.block_size  # host bound on every position
        return KVView(lc.window, step.slots, step.positions, None, None, max_len)

    # -- compressed keys ----------------------------------------------------------------------------------------
    def _prefill_entries(self, comp: Compressor, store, st: CompressorState, x: Tensor, step: Step, write: bool,
                         used: int | Tensor | None = None, pool: bool = True) -> Tensor | None:
        """Run a prefill chunk x (its first `used` tokens) through the compressor; return the entry pool
        [B, (start+used)//m, c] (pool=False with write: None, the attention view reads the pages)."""
        if step.ragged:
            return self._ragged_entries(comp, store, st, x, step, write, step.used if used is None else used, pool)
        m, slots, s = comp.ratio, step.slots, x.shape[1] if used is None else used
        w0, n_win = step.start // m, (step.start % m + s) // m  # first window the chunk touches, windows it closes
        start = torch.full((x.shape[0],), step.start, dtype=torch.int64, device=x.device)
        e = comp(x, start, st, slots, self.table, write, used)[:, :n_win]
        lc = step.cache.layers[self.layer_id]
        n_total = (step.start + s) // m
        if n_win and write:
            lc.write_entries(store, slots, _span(w0, e), e, m)
        if write and not pool:
            return None
        if not n_win or write:
            return lc.read_entries(store, slots, n_total, m)
        return torch.cat([lc.read_entries(store, slots, w0, m), e.to(store.dtype)], 1)

    def _ragged_entries(self, comp: Compressor, store, st: CompressorState, x: Tensor, step: Step, write: bool,
                        used: Tensor, pool: bool) -> Tensor | None:
        """`_prefill_entries` for a ragged batch: row b's first used[b] tokens start at start[b]; the pool holds
        entries 0..end//m - 1 (later ones are stale or unwritten: the views mask them by position)."""
        m, slots, start = comp.ratio, step.slots, step.start
        e = comp(x, start, st, slots, self.table, write, used)
        w0, n_win = start // m, (start % m + used) // m  # per row: first window touched, windows closed
        j = torch.arange(e.shape[1], device=x.device)
        lc = step.cache.layers[self.layer_id]
        n_total = step.end // m
        if write:
            keep = j < n_win.unsqueeze(1)  # unmasked indices stay inside the block table (padding may lie past it)
            lc.write_entries(store, slots, torch.where(keep, w0.unsqueeze(1) + j, 0), e, m, keep=keep)
            return lc.read_entries(store, slots, n_total, m) if pool else None
        old = lc.read_entries(store, slots, n_total, m)
        w = torch.arange(n_total, device=x.device) - w0.unsqueeze(1)  # [B, N] index into e
        new = (w >= 0) & (w < n_win.unsqueeze(1))
        picked = e.to(old.dtype).gather(1, w.clamp(0, e.shape[1] - 1).unsqueeze(-1).expand(-1, -1, e.shape[-1]))
        return torch.where(new.unsqueeze(-1), picked, old)

    def _compressed(self, x: Tensor, qr: Tensor, step: Step, lc: LayerCache, cos: Tensor,
                    sin: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Write this step's new entries; return (the prefill entry pool [B,N,d], decode: None = read from the
        pages by the view; CSA picks [B,S,K] (-1 = none), HCA: None = every visible entry)."""
        m, slots, pos = self.ratio, step.slots, step.positions
        comp = self.compressor
        idx_comp = self.indexer.compressor if self.indexer is not None else None
        if step.decode:
            # Entry p//m is read only once a token closes it (n_visible below), so a step where no row closes one
            # (host-known lengths, eager) just advances the state; its page row keeps an older finite value,
            # weighed by an exact 0 like the zeros written otherwise (tests/test_decode_fast_paths.py).
            p = pos[:, 0]
            for c, store, st in ((comp, lc.entries, lc.comp), (idx_comp, lc.index_keys, lc.index_comp)):
                if c is None:
                    continue
                if step.closes(c.ratio):
                    lc.write_entries(store, slots, (p // c.ratio).unsqueeze(1), c(x, p, st, slots, self.table),
                                     c.ratio)
                else:
                    c.advance(x, p, st, slots)
            pages = step.span_pages or lc.block_table.shape[1]  # static per bucket: shapes never depend on data
            n_total = pages * lc.block_size // m
            entries = None  # the attention view reads the pages (only if the backend needs them gathered)
            if idx_comp is not None:
                keys = PagedRows(lc.index_keys, lc.block_table[slots][:, :pages], n_total)  # read by the backend
        else:
            write = step.defer is None
            # CSA reads only its picks from the pages (KVView.block): no copy of all entries.
            entries = self._prefill_entries(comp, lc.entries, lc.comp, x, step, write, pool=idx_comp is None)
            if idx_comp is not None:
                keys = self._prefill_entries(idx_comp, lc.index_keys, lc.index_comp, x, step, write)
            if not write:
                step.defer.append(lambda k: self._commit_compressed(step, x, k))
        if self.indexer is None:  # HCA: every visible entry (KVView masks by position)
            return entries, None
        n_visible = (pos + 1) // m  # entry w is visible to query t iff w < (t+1)//m
        return entries, self.indexer.select(x, qr, keys, n_visible, cos, sin)

    def _commit_compressed(self, step: Step, x: Tensor, k: int | Tensor) -> None:
        """Run the first k tokens of a deferred chunk (x [B,S,D]) through the compressors for real: state and
        entry pages as if the chunk had been those k tokens (ragged batch: k [B] per row)."""
        if isinstance(k, int) and k == 0:
            return
        lc = step.cache.layers[self.layer_id]
        self._prefill_entries(self.compressor, lc.entries, lc.comp, x, step, True, k)
        if self.indexer is not None:
            self._prefill_entries(self.indexer.compressor, lc.index_keys, lc.index_comp, x, step, True, k)

    def forward(self, x: Tensor, step: Step) -> Tensor:
        b, s, _ = x.shape
        be = self.backend
        cos, sin = step.cos_sin(self.table)
        # q
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).view(b, s, self.n_heads, self.head_dim)
        q = be.rms_norm(q, None, self.eps)
        cos_h, sin_h, neg_sin_h = step.head_cos_sin(self.table)
        q = apply_rope_tail(be, q, cos_h, sin_h)
        # win kv
        kv = self.kv_norm(self.wkv(x))
        kv = simulate_kv_qat(be, apply_rope_tail(be, kv, cos, sin), self.rope_dim)
        lc = step.cache.layers[self.layer_id]
        view = self._window_decode(kv, step, lc) if step.decode else self._window_prefill(kv, step, lc)
        view.shared = step.attn_shared
        # compress kv (and the indexer's picks, CSA)
        if self.ratio:
            view.entry_rows, view.picks = self._compressed(x, qr, step, lc, cos, sin)
            view.ratio, view.entries, view.entries_in_store = self.ratio, lc.entries, step.defer is None
            table = lc.block_table[step.slots]
            view.block_table = table[:, :step.span_pages or table.shape[1]] if step.decode else table
        # attention
        o = be.attend(q, view, self.attn_sink, self.head_dim ** -0.5)
        if not step.decode and step.defer is None:  # after attention: the view read the ring before this chunk
            if step.ragged:
                lc.window.write_rows(step.slots, step.start, step.used, kv)
            else:
                lc.window.write_chunk(step.slots, step.start, kv)
        # o
        o = apply_rope_tail(be, o, cos_h, neg_sin_h)  # inverse RoPE at the query position
        z = be.grouped_linear(o.reshape(b, s, self.groups, -1), self.wo_a.weight, self.wo_a.scale)
        return self.wo_b(z.flatten(2))


class Block(nn.Module):
    """One layer: attention then MoE, each wrapped by mHC pre/post over the 4 residual streams."""

    def __init__(self, backend: Backend, cfg: ModelConfig, layer_id: int, ratio: int, hashed: bool,
                 fmt: WeightFormats, dtype: torch.dtype, tables: dict[str, RopeTable], device=None,
                 expert_range: tuple[int, int] | None = None):
        super().__init__()
        self.backend = backend
        self.cfg = cfg
        n, dim = cfg.hc_mult, cfg.hidden_size
        for sub in ("attn", "ffn"):
            setattr(self, f"hc_{sub}_fn", _param((2 + n) * n, n * dim, dtype=torch.float32, device=device))
            setattr(self, f"hc_{sub}_base", _param((2 + n) * n, dtype=torch.float32, device=device))
            setattr(self, f"hc_{sub}_scale", _param(3, dtype=torch.float32, device=device))
        self.attn_norm = RMSNorm(backend, dim, cfg.rms_norm_eps, device)
        self.ffn_norm = RMSNorm(backend, dim, cfg.rms_norm_eps, device)
        self.attn = Attention(backend, cfg, layer_id, ratio, fmt, dtype, tables, device)
        self.ffn = MoE(backend, cfg, hashed, fmt, dtype, expert_range, device)

    def _hc(self, sub: str, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.cfg
        return self.backend.hc_pre(x, getattr(self, f"hc_{sub}_fn"), getattr(self, f"hc_{sub}_base"),
                                   getattr(self, f"hc_{sub}_scale"), c.hc_sinkhorn_iters, c.rms_norm_eps, c.hc_eps)

    def forward(self, x: Tensor, step: Step) -> Tensor:
        h, post, comb = self._hc("attn", x)
        x = self.backend.hc_post(self.attn(self.attn_norm(h), step), x, post, comb)
        h, post, comb = self._hc("ffn", x)
        return self.backend.hc_post(self.ffn(self.ffn_norm(h), step.input_ids, step.decode or step.sync_free), x,
                                    post, comb)


class HcHead:
    """Collapses the residual streams to one hidden state (sigmoid weights only)."""

    def hc_head(self, x: Tensor) -> Tensor:
        c = self.cfg
        return self.backend.hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, c.rms_norm_eps,
                                    c.hc_eps)


def _add_hc_head(mod: nn.Module, cfg: ModelConfig, device) -> None:
    n, dim = cfg.hc_mult, cfg.hidden_size
    mod.hc_head_fn = _param(n, n * dim, dtype=torch.float32, device=device)
    mod.hc_head_base = _param(n, dtype=torch.float32, device=device)
    mod.hc_head_scale = _param(1, dtype=torch.float32, device=device)


class MTPBlock(Block, HcHead):
    """Multi-token prediction block: embeds token t+1, mixes it with the main streams at t, one SWA layer."""

    def __init__(self, backend: Backend, cfg: ModelConfig, layer_id: int, fmt: WeightFormats, dtype: torch.dtype,
                 tables: dict[str, RopeTable], device=None, expert_range: tuple[int, int] | None = None):
        super().__init__(backend, cfg, layer_id, cfg.compress_ratios[layer_id], False, fmt, dtype, tables, device,
                         expert_range)
        dim = cfg.hidden_size
        self.e_proj = Linear(backend, dim, dim, fmt.dense, dtype, device)
        self.h_proj = Linear(backend, dim, dim, fmt.dense, dtype, device)
        self.enorm = RMSNorm(backend, dim, cfg.rms_norm_eps, device)
        self.hnorm = RMSNorm(backend, dim, cfg.rms_norm_eps, device)
        self.norm = RMSNorm(backend, dim, cfg.rms_norm_eps, device)
        _add_hc_head(self, cfg, device)

    def forward_mtp(self, streams: Tensor, next_embed: Tensor, step: Step) -> tuple[Tensor, Tensor]:
        """(hidden for the shared head [B,S,D], this block's streams [B,S,n,D] for chained drafts)."""
        x = self.h_proj(self.hnorm(streams)) + self.e_proj(self.enorm(next_embed)).unsqueeze(2)
        x = Block.forward(self, x, step)
        return self.norm(self.hc_head(x)), x


def _refuse_partial_act_quant_blocks(model: nn.Module) -> None:
    """DeepSeek numerics quantise the activations of every FP8/FP4 GEMM per 1x128 block, and DeepSeek's
    `act_quant` kernel asserts K % 128 == 0: refuse such a layer by name instead of computing what DeepSeek cannot."""
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and mod.scale is not None and not name.endswith(".wo_a"):
            ks = {"": mod.in_features}  # wo_a: a grouped einsum in the activation dtype, no act-quant
        elif isinstance(mod, RoutedExperts) and mod.w1_scale is not None:
            ks = {".w1/.w3": mod.w1.shape[-1] * (2 if mod.w1.dtype == torch.int8 else 1),
                  ".w2": mod.w2.shape[-1] * (2 if mod.w2.dtype == torch.int8 else 1)}
        else:
            continue
        for part, k in ks.items():
            if k % 128:
                raise ValueError(f"{name}{part}: numerics='deepseek' quantises its activations per 1x128 block "
                                 f"(DeepSeek's act_quant asserts K % 128 == 0), but K = {k}; use numerics='exact' "
                                 "or dequantised weights")


class Transformer(HcHead, nn.Module):
    """The whole model: embedding, 4-stream mHC layers, head collapse, final norm, lm head (+ MTP blocks)."""

    def __init__(self, cfg: ModelConfig, backend: Backend, dtype: torch.dtype = torch.bfloat16,
                 formats: WeightFormats | None = None, device=None, n_mtp: int | None = None,
                 expert_range: tuple[int, int] | None = None):
        """`expert_range` = (first, end): the routed experts this rank holds (expert parallelism); all by default."""
        super().__init__()
        if expert_range is not None and not 0 <= expert_range[0] < expert_range[1] <= cfg.n_routed_experts:
            raise ValueError(f"expert_range {expert_range} must satisfy 0 <= first < end <= n_routed_experts="
                             f"{cfg.n_routed_experts}")
        self.expert_range = expert_range
        self.cfg = cfg
        self.backend = backend
        self.dtype = dtype
        fmt = formats or WeightFormats()
        self.formats = fmt
        tables = {"main": RopeTable.main(cfg), "compress": RopeTable.compress(cfg)}
        dim = cfg.hidden_size
        self.embed = nn.Module()
        self.embed.weight = _param(cfg.vocab_size, dim, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            Block(backend, cfg, i, r, i < cfg.num_hash_layers, fmt, dtype, tables, device, expert_range)
            for i, r in enumerate(cfg.layer_ratios))
        self.norm = RMSNorm(backend, dim, cfg.rms_norm_eps, device)
        self.head = nn.Module()
        self.head.weight = _param(cfg.vocab_size, dim, dtype=dtype, device=device)
        _add_hc_head(self, cfg, device)
        n_mtp = cfg.num_nextn_predict_layers if n_mtp is None else n_mtp
        self.mtp = nn.ModuleList(MTPBlock(backend, cfg, cfg.num_hidden_layers + j, fmt, dtype, tables, device,
                                          expert_range) for j in range(n_mtp))
        if backend.options.deepseek:
            _refuse_partial_act_quant_blocks(self)

    # -- names ------------------------------------------------------------------------------------------------
    def checkpoint_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Every tensor under its official checkpoint name (stacked experts expanded per expert)."""
        for name, p in self.named_parameters():
            if ".routed." in name:
                continue
            yield name, p
        for name, mod in self.named_modules():
            if isinstance(mod, RoutedExperts):
                yield from mod.checkpoint_tensors(name[: -len("routed")])

    # -- forward ----------------------------------------------------------------------------------------------
    def new_cache(self, max_slots: int, max_seq_len: int, **kw) -> KVCache:
        """A cache for this model (see KVCache for paging and C8 options); its writes go through the backend's
        `scatter_rows` when the backend overrides it (the base default is what the cache does anyway)."""
        scatter = getattr(self.backend, "scatter_rows", None)  # wrappers (parallel.py) forward the attribute
        if scatter is not None and getattr(scatter, "__func__", None) is not Backend.scatter_rows:
            kw.setdefault("scatter", scatter)
        c8_write = getattr(self.backend, "c8_write", None)  # e.g. the 950's kv_compress_epilog (quantise + pack)
        if c8_write is not None:
            kw.setdefault("c8_write", c8_write)
        return KVCache(self.cfg, max_slots, max_seq_len, self.dtype, self.embed.weight.device, len(self.mtp), **kw)

    def _check_ids(self, input_ids: Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], found {input_ids.dtype} "
                             f"{list(input_ids.shape)}")

    def hidden_streams(self, input_ids: Tensor, step: Step) -> Tensor:
        """Residual streams [B,S,n,D] after the last layer (what the MTP block consumes)."""
        e = self.embed.weight[input_ids]
        x = e.unsqueeze(2).expand(*e.shape[:2], self.cfg.hc_mult, e.shape[-1]).contiguous()
        for layer in self.layers:
            x = layer(x, step)
        return x

    def logits(self, streams: Tensor) -> Tensor:
        return self.backend.lm_head(self.norm(self.hc_head(streams)), self.head.weight)

    def _prefill_step(self, input_ids: Tensor, cache: KVCache | None, slots: Tensor | None,
                      start_pos: int | Sequence[int], defer: bool = False,
                      lengths: Sequence[int] | None = None) -> Step:
        self._check_ids(input_ids)
        b, s = input_ids.shape
        dev = self.embed.weight.device
        ragged = not isinstance(start_pos, int) or lengths is not None
        starts = [start_pos] * b if isinstance(start_pos, int) else [int(x) for x in start_pos]
        used = [s] * b if lengths is None else [int(x) for x in lengths]
        if len(starts) != b or len(used) != b:
            raise ValueError(f"ragged prefill: {len(starts)} start positions and {len(used)} lengths for a batch "
                             f"of {b} rows")
        if any(x < 0 for x in starts) or any(not 0 <= n <= s for n in used):
            raise ValueError(f"ragged prefill: starts must be >= 0 and lengths in [0, {s}]; found starts {starts}, "
                             f"lengths {used}")
        if cache is None:
            if any(starts):
                raise ValueError("start_pos > 0 needs the cache that holds the earlier tokens")
            cache = self.new_cache(b, s)
        if slots is None:
            slots = torch.arange(b, device=dev)
        # Bound of every real token's position (padding may lie past it, even past max_seq_len: never stored).
        end = max(st + n for st, n in zip(starts, used))
        if end > cache.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache's max_seq_len {cache.max_seq_len}")
        if not ragged:
            positions = (start_pos + torch.arange(s, device=dev)).expand(b, s)
            return Step(input_ids, positions, slots, cache, start_pos, defer=[] if defer else None, end=end)
        start = torch.tensor(starts, dtype=torch.int64, device=dev)
        positions = start.unsqueeze(1) + torch.arange(s, device=dev)
        return Step(input_ids, positions, slots, cache, start, defer=[] if defer else None,
                    used=torch.tensor(used, dtype=torch.int64, device=dev), end=end)

    @torch.no_grad()
    def forward(self, input_ids: Tensor, cache: KVCache | None = None, slots: Tensor | None = None,
                start_pos: int = 0, last_only: bool = False) -> Tensor:
        """Prefill (a chunk starting at host-known `start_pos` for every row): fp32 logits [B,S,V] (or [B,1,V])."""
        step = self._prefill_step(input_ids, cache, slots, start_pos)
        x = self.hidden_streams(input_ids, step)
        if last_only:
            x = x[:, -1:]
        return self.logits(x)

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, cache: KVCache, slots: Tensor, start_pos: int | Sequence[int],
                defer: bool = False, lengths: Sequence[int] | None = None
                ) -> tuple[Tensor, Tensor, Callable[[int | Sequence[int]], None]]:
        """Prefill returning (logits [B,S,V], final streams [B,S,n,D], commit); see `prefill_streams`."""
        x, commit = self.prefill_streams(input_ids, cache, slots, start_pos, defer, lengths)
        return self.logits(x), x, commit

    @torch.no_grad()
    def prefill_streams(self, input_ids: Tensor, cache: KVCache, slots: Tensor, start_pos: int | Sequence[int],
                        defer: bool = False, lengths: Sequence[int] | None = None
                        ) -> tuple[Tensor, Callable[[int | Sequence[int]], None]]:
        """Prefill returning (final streams [B,S,n,D], commit); `logits(streams[...])` gives the logits wanted.

        `start_pos`: one host int for every row, or one per row (a ragged batch: several sequences' chunks at
        their own positions); `lengths`: valid tokens per row, the rest of the row is padding (computed, never
        written to the cache). defer=True leaves the cache untouched; `commit(k)` then writes the state of the
        first k tokens only (the accepted prefix of a speculative verify; per row in a ragged batch). Without
        defer, commit is a no-op.
        """
        step = self._prefill_step(input_ids, cache, slots, start_pos, defer, lengths)
        x = self.hidden_streams(input_ids, step)

        def commit(k: int | Sequence[int]) -> None:
            if step.ragged:
                k = torch.tensor([k] * input_ids.shape[0] if isinstance(k, int) else list(k), dtype=torch.int64,
                                 device=input_ids.device)
            elif not isinstance(k, int):
                if len(set(k)) != 1:
                    raise ValueError("per-row commit lengths need a ragged prefill (per-row start_pos)")
                k = int(k[0])
            for f in step.defer or ():
                f(k)

        return x, commit

    @torch.no_grad()
    def mtp_prefill(self, streams: Tensor, next_ids: Tensor, cache: KVCache, slots: Tensor,
                    start_pos: int | Sequence[int], j: int = 0, lengths: Sequence[int] | None = None
                    ) -> tuple[Tensor, Tensor]:
        """MTP block j over a chunk: main streams at positions [start, start+S) and the tokens that follow each
        (per-row starts and lengths: a ragged batch, as in `prefill_streams`).

        Returns (logits [B,S,V] for the token after next, the block's streams for chained drafts).
        """
        step = self._prefill_step(next_ids, cache, slots, start_pos, lengths=lengths)
        h, x = self.mtp[j].forward_mtp(streams, self.embed.weight[next_ids], step)
        return self.backend.lm_head(h, self.head.weight), x

    @torch.no_grad()
    def mtp_decode(self, streams: Tensor, next_ids: Tensor, positions: Tensor, cache: KVCache, slots: Tensor,
                   j: int = 0) -> tuple[Tensor, Tensor]:
        """One chained MTP draft step per row at `positions` [B] (see mtp_prefill)."""
        step = Step(next_ids, positions.view(-1, 1), slots, cache, None)
        h, x = self.mtp[j].forward_mtp(streams, self.embed.weight[next_ids], step)
        return self.backend.lm_head(h, self.head.weight), x

    @torch.no_grad()
    def decode(self, input_ids: Tensor, positions: Tensor, cache: KVCache, slots: Tensor,
               max_len: int | None = None, lengths: Sequence[int] | None = None) -> Tensor:
        """One token per sequence at per-row `positions` [B]: fp32 logits [B,1,V]. No host syncs.

        `max_len` (host-known, optional): an upper bound on every row's length after this token; compressed
        entries are read only up to it (rounded up to whole pages) instead of the slot's full capacity.
        `lengths` (host-known, optional; eager only, the step's ops then depend on them): each row's length
        after this token (positions + 1); a compressor whose window no row closes then only advances its state.
        """
        if lengths is not None:
            lengths = tuple(int(n) for n in lengths)
            if len(lengths) != input_ids.shape[0] or min(lengths) < 1:
                raise ValueError(f"decode: lengths must be one positive length per row ({input_ids.shape[0]} "
                                 f"rows), found {list(lengths)}")
        pages = None if max_len is None else min(cache.pages_for(max_len), cache.pages_per_seq)
        step = Step(input_ids, positions.view(-1, 1), slots, cache, None, pages, lengths=lengths)
        return self.logits(self.hidden_streams(input_ids, step))
