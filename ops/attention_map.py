"""How AscendBackend hands V4 attention to the device: the lightning indexer, the KV compressor and
npu_sparse_attn_sharedkv, each fed from the model's layouts (KVView, paged entry stores, the state ring).

A mixin of AscendBackend (ops/backend.py): it reads `self.npu`, `self.custom` and `self.scheme`, and falls back to
the plain composites (ReferenceBackend / Backend) through `super()` where the kernels cannot take the input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsv4_ascend.attention_view import KVView

__all__ = ["AttentionMapping", "LI_BLOCK", "SAS_TOPK", "SAS_TOPK_MAX", "C8_TILE"]

LI_BLOCK = 16  # paged-key block size handed to the lightning indexer (device: multiple of 16, <= 1024)
SAS_BLOCK = 16  # block size of the temporary paged caches below (npu_sparse_attn_sharedkv: multiple of 16, <= 1024)
SAS_TOPK = 512  # npu_sparse_attn_sharedkv's documented cmp_sparse_indices width (K2)
SAS_TOPK_MAX = 1024  # V4-Pro's index_topk: CR's V4 recipe passes cmp_topk = index_topk (K2 = 1024 (verify))
C8_TILE = 64  # npu_kv_quant_sparse_attn_sharedkv tile_size: one e8m0 scale per 64 nope values (CR's V4 recipe)


class AttentionMapping:
    """indexer_topk, compressor and attend through the torch_npu / CR kernels (mixin; see module docstring)."""

    def indexer_topk(self, q: Tensor, weights: Tensor, keys: Tensor, n_visible: Tensor, k: int) -> Tensor:
        # Every query becomes its own batch of one token (TND, actual_seq_lengths_query = 1..T) whose key length
        # is its n_visible compressed entries: with cmp_ratio 1 and sparse_mode 3 the op's right-down causal
        # mask is then exactly "entry w < n_visible[t]", for any n_visible (prefill or decode), without host syncs.
        b, s, h, di = q.shape
        n = keys.shape[1]
        kk = min(k, n)
        if n == 0:
            return torch.full((b, s, 0), -1, dtype=torch.long, device=q.device)
        nblk = -(-n // LI_BLOCK)
        t = b * s
        dev = q.device
        table = (torch.arange(b, device=dev) * nblk).unsqueeze(1) + torch.arange(nblk, device=dev)
        table = table.repeat_interleave(s, 0).to(torch.int32)  # [T, nblk]
        asl_q = torch.arange(1, t + 1, device=dev, dtype=torch.int32)
        asl_k = n_visible.reshape(t).clamp(0, n).to(torch.int32)
        pad = nblk * LI_BLOCK - n
        if self.scheme is not None and self.scheme.int8_indexer:
            qi, qs = self.npu.npu_dynamic_quant(q.reshape(t, h, di))  # per token-head
            ki, ks = self.npu.npu_dynamic_quant(keys)  # per key
            kcache = F.pad(ki, (0, 0, 0, pad)).view(b * nblk, LI_BLOCK, 1, di)
            kscale = F.pad(ks, (0, pad)).view(b * nblk, LI_BLOCK, 1).to(torch.float16)
            # The built-in's arguments only (valid for CR's custom op of the same name too); the built-in returns
            # the indices, the custom op (indices, values): a type check at trace time, not a value read.
            out = self.npu.npu_quant_lightning_indexer(
                qi, kcache, weights.reshape(t, h).to(torch.float16), qs.to(torch.float16), kscale,
                query_quant_mode=0, key_quant_mode=0, actual_seq_lengths_query=asl_q, actual_seq_lengths_key=asl_k,
                block_table=table, layout_query="TND", layout_key="PA_BSND", sparse_count=kk, sparse_mode=3)
            idx = out[0] if isinstance(out, (tuple, list)) else out
        elif self._fp8_indexer(di):
            # The 950 recipe's FP8 indexer: q per token-head by npu_dynamic_block_quant (1 x 128 blocks), keys by
            # CR's indexer_compress_epilog (FP8 + fp32 scale per 128 values) into a paged FP8 cache, fp32 weights.
            qf, qs = self.npu.npu_dynamic_block_quant(q.reshape(t * h, di), dst_type=torch.float8_e4m3fn)
            kc = torch.zeros(b * nblk * LI_BLOCK, di, dtype=torch.float8_e4m3fn, device=q.device)
            ksc = torch.zeros(b * nblk * LI_BLOCK, 1, dtype=torch.float32, device=q.device)
            slot = (torch.arange(b, device=dev) * nblk * LI_BLOCK).unsqueeze(1) + torch.arange(n, device=dev)
            self.custom.indexer_compress_epilog(kc, ksc, keys.reshape(b * n, di).to(torch.bfloat16),
                                                slot.reshape(-1).to(torch.int32), quant_mode=1)
            li = getattr(self.custom, "npu_quant_lightning_indexer", self.npu.npu_quant_lightning_indexer)
            out = li(qf.view(t, h, di), kc.view(b * nblk, LI_BLOCK, 1, di), weights.reshape(t, h).float(),
                     qs.view(t, h), ksc.view(b * nblk, LI_BLOCK, 1), query_quant_mode=0, key_quant_mode=0,
                     actual_seq_lengths_query=asl_q, actual_seq_lengths_key=asl_k, block_table=table,
                     layout_query="TND", layout_key="PA_BSND", sparse_count=kk, sparse_mode=3)
            idx = out[0] if isinstance(out, (tuple, list)) else out
        else:
            kcache = F.pad(keys.to(q.dtype), (0, 0, 0, pad)).view(b * nblk, LI_BLOCK, 1, di)
            idx, _ = self.npu.npu_lightning_indexer(  # -> (sparse_indices, sparse_values)
                q.reshape(t, h, di), kcache, weights.reshape(t, h).to(q.dtype),
                actual_seq_lengths_query=asl_q, actual_seq_lengths_key=asl_k, block_table=table,
                layout_query="TND", layout_key="PA_BSND", sparse_count=kk, sparse_mode=3)
        return idx.view(b, s, kk).long()

    def _fp8_indexer(self, di: int) -> bool:
        """The 950 schemes' FP8 lightning indexer applies: a custom provider with indexer_compress_epilog and
        index_head_dim 128 (the epilogue's and the block quant's group; V4's width)."""
        return (getattr(self.scheme, "fp8_indexer", False) and di == 128 and self.custom is not None
                and hasattr(self.custom, "indexer_compress_epilog"))

    # ---- KV compressor: the custom `compressor` ----------------------------------------------------------------
    def compressor(self, x: Tensor, wkv: Tensor, wgate: Tensor, ape: Tensor, norm_weight: Tensor, norm_eps: float,
                   state: Tensor, blocks: Tensor, start: Tensor, cos: Tensor, sin: Tensor, ratio: int,
                   used: int | Tensor | None = None) -> Tensor:
        # CR's fused op (custom `compressor`), BSND for decode and prefill alike (every row of a chunk shares S).
        # The state ring [N, R, 2c] is the op's paged state cache with block_size R: a table repeating each row's
        # block sends position p to row p % R. start_pos goes in shifted down by a multiple of R (to start % R + R
        # once start >= R): the op uses it only for the window phase, the ape row, the w = 0 rule and the state
        # address, all unchanged by the shift (R is a multiple of the ratio, and >= 2*ratio with overlap, so no
        # window becomes the first), while RoPE comes in per entry; so the table needs only a few columns, fixed
        # by S, instead of max_seq_len / R (verify on the device that nothing else reads start_pos).
        if self.custom is None or not hasattr(self.custom, "compressor"):
            return super().compressor(x, wkv, wgate, ape, norm_weight, norm_eps, state, blocks, start, cos, sin,
                                      ratio, used)
        b, s, _ = x.shape
        ring = state.shape[1]
        coff = wkv.shape[0] // norm_weight.shape[0]
        shifted = torch.where(start >= ring, start % ring + ring, start)
        table = blocks.to(torch.int32).unsqueeze(1).expand(b, (2 * ring + s - 2) // ring + 1).contiguous()
        seqused = (None if used is None else used.to(torch.int32) if isinstance(used, Tensor)
                   else torch.full((b,), used, dtype=torch.int32, device=x.device))
        return self.custom.compressor(
            x, wkv.to(x.dtype), wgate.to(x.dtype), state, ape.float(), norm_weight.float(),
            sin.repeat_interleave(2, -1).float(), cos.repeat_interleave(2, -1).float(), 2 * cos.shape[-1], ratio,
            state_block_table=table, seqused=seqused, start_pos=shifted.to(torch.int32), coff=coff,
            norm_eps=norm_eps, rotary_mode=2, cache_mode=1)

    # ---- V4 attention: npu_sparse_attn_sharedkv / npu_kv_quant_sparse_attn_sharedkv ---------------------------
    def attend(self, q: Tensor, view: KVView, sink: Tensor, scale: float) -> Tensor:
        """CR's fused shared-KV attention over the stores `view` describes, when a custom provider is installed
        and the kernel can read them; otherwise the composite (`view.gathered()` + sparse_attention).

        TND q (one batch per sequence, cu_seqlens_q); ori_kv = the window ring [slots, win, 1, d] as a paged
        cache of block size win whose block table repeats the row's slot (position p -> block slot, row p % win);
        cmp_kv = the entry pages [pages, block_size/m, 1, d] through the sequence's block table row (entry j in
        page j // (block_size/m)); CSA picks as cmp_sparse_indices, -1 padded to K2 = 512, or 1024 for V4-Pro's
        index_topk (one call: the kernel's lse output is documented as invalid, so two 512-pick calls cannot be
        merged by their softmax statistics; CR's V4 recipe passes cmp_topk = index_topk); seqused_kv = last
        position + 1. Prefill chunks are not in the ring yet: a temporary paged window (`_sas_prefill_window`)
        stands in for it; a deferred prefill's entries (not in the pages yet) go as a temporary paged copy of
        `view.entry_rows` (`_sas_pending_entries`). The kernel's paged caches take block sizes that are multiples
        of 16 and at most 1024 (CR custom-npu_sparse_attn_sharedkv doc): a ring (win) or a page (block_size/m
        entries, e.g. 256/128 = 2 for HCA) that is not one is handed over as a temporary copy with blocks of 16
        (`_sas_window_blocks`, `_sas_entry_blocks`). C8 stores (their rows are already the FP8 kernel's 640-byte
        layout, dsv4_ascend/cache.py) go to `npu_kv_quant_sparse_attn_sharedkv` (kv_quant_mode 1, tile 64) the same
        way. Index tensors, block tables and the kernel metadata depend only on the step, so they are built by
        the first layer that needs them and reused by the others (`view.shared`, one dict per model step). No host
        reads: decode stays capturable.
        """
        if self._sas_unsupported(q, view):
            return super().attend(q, view, sink, scale)
        memo = view.shared if view.shared is not None else {}
        b, s, h, d = q.shape
        win, dev, i32 = view.win, q.device, torch.int32
        c8 = view.window.fp8
        if view.chunk is None and _kernel_block(win):  # decode: this step's row is already in the ring
            ori_kv = _kv4(view.window.data)
            ori_table = _memo(memo, ("ring_table", win, view.max_len), lambda: view.slots.to(i32).view(b, 1).expand(
                b, -(-view.max_len // win)).contiguous())
        elif view.chunk is None:
            ori_kv, ori_table = self._sas_window_blocks(view, memo)
        else:
            ori_kv, ori_table = self._sas_prefill_window(view, memo)
        kw = dict(cu_seqlens_q=_memo(memo, ("cu",), lambda: torch.arange(0, (b + 1) * s, s, device=dev, dtype=i32)),
                  seqused_kv=_memo(memo, ("seqused",), lambda: (view.positions[:, -1] + 1).to(i32)),
                  cmp_ratio=view.ratio or 1, ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=win - 1,
                  ori_win_right=0, layout_q="TND", layout_kv="PA_ND")
        cmp, cmp_topk = {}, 0
        if view.ratio:
            if not view.entries_in_store:
                cmp_kv, cmp_table = self._sas_pending_entries(view, memo)
            elif _kernel_block(view.per_page):
                cmp_kv, cmp_table = _kv4(view.entries.data), view.block_table.to(i32)
            else:
                cmp_kv, cmp_table = self._sas_entry_blocks(view, memo)
            cmp = dict(cmp_kv=cmp_kv, cmp_block_table=cmp_table)
            if view.picks is not None:
                cmp_topk = SAS_TOPK if view.picks.shape[-1] <= SAS_TOPK else SAS_TOPK_MAX
                picks = F.pad(view.picks, (0, cmp_topk - view.picks.shape[-1]), value=-1)
                cmp["cmp_sparse_indices"] = picks.reshape(b * s, 1, cmp_topk).to(i32)
        quant = dict(tile_size=C8_TILE, rope_head_dim=view.window.rope_dim) if c8 else {}
        mode = (1,) if c8 else ()  # kv_quant_mode, positional in the FP8 ops' schemas

        def metadata() -> Tensor:
            op = (self.custom.npu_kv_quant_sparse_attn_sharedkv_metadata if c8
                  else self.custom.npu_sparse_attn_sharedkv_metadata)
            return op(h, 1, d, *mode, batch_size=b, max_seqlen_q=s, max_seqlen_kv=view.max_len, ori_topk=0,
                      cmp_topk=cmp_topk, has_ori_kv=True, has_cmp_kv=bool(view.ratio), device=str(dev), **quant,
                      **kw)

        meta = _memo(memo, ("metadata", view.ratio, cmp_topk, c8, h, d, view.max_len), metadata)
        op = self.custom.npu_kv_quant_sparse_attn_sharedkv if c8 else self.custom.npu_sparse_attn_sharedkv
        out, _ = op(q.reshape(b * s, h, d), *mode, ori_kv=ori_kv, ori_block_table=ori_table, sinks=sink.float(),
                    metadata=meta, softmax_scale=scale, **quant, **cmp, **kw)
        return out.view(b, s, h, d)

    def _sas_unsupported(self, q: Tensor, view: KVView) -> str:
        """Why the shared-KV kernels cannot run this view ('' when they can); decided from host-known facts."""
        stores = [view.window] + ([view.entries] if view.ratio else [])
        c8 = view.window.fp8
        need = "npu_kv_quant_sparse_attn_sharedkv" if c8 else "npu_sparse_attn_sharedkv"
        if self.custom is None or not hasattr(self.custom, need):
            return f"no custom-op provider of {need}"
        if any(st.fp8 != c8 for st in stores):
            return "window and entry stores differ in format (C8 vs plain)"
        if any(st.dtype != q.dtype for st in stores):
            return "cache dtype differs from q's (the kernel takes one dtype)"
        if c8 and (view.window.width - view.window.rope_dim) % C8_TILE:
            return f"C8 nope width not a multiple of the kernel's tile {C8_TILE}"
        if view.chunk is not None and not isinstance(view.start, int):
            return "ragged prefill batch (per-row starts): the temporary window is built for one start"
        if view.picks is not None and view.picks.shape[-1] > SAS_TOPK_MAX:
            return f"more than {SAS_TOPK_MAX} picks per query"
        return ""

    def _sas_prefill_window(self, view: KVView, memo: dict) -> tuple[Tensor, Tensor]:
        """A temporary paged window for a prefill chunk: ring rows of positions [start-win, start) then the chunk
        (in the ring's stored form: C8 bytes for a C8 ring), in position order, front-aligned to the block size
        (win, or 16 when win is not a kernel block size). Returns (cache [B*nblk, bs, 1, w], table)."""
        b, s, _ = view.chunk.shape
        win, s0, dev = view.win, view.start, view.chunk.device
        bs = win if _kernel_block(win) else SAS_BLOCK
        first = max(s0 - win, 0) // bs  # first block held; earlier columns are never read unmasked
        nblk = -(-(s0 + s) // bs) - first

        def index() -> tuple[Tensor, Tensor]:
            p = first * bs + torch.arange(nblk * bs, device=dev)  # positions held
            src = torch.where(p < s0 + s, view.window.chunk_source(p, s0), win + s)  # ring | chunk | zero row
            col = (torch.arange(first + nblk, device=dev) - first).clamp(min=0)
            return src, (torch.arange(b, device=dev).unsqueeze(1) * nblk + col).to(torch.int32)

        src, table = _memo(memo, ("prefill_window", win, s0, s, b), index)
        ring = view.window.data.index_select(0, view.slots)
        rows = torch.cat([ring, view.window.pack(view.chunk), ring.new_zeros(b, 1, ring.shape[-1])], 1)
        return _kv4(rows.index_select(1, src).view(b * nblk, bs, -1)), table

    def _sas_window_blocks(self, view: KVView, memo: dict) -> tuple[Tensor, Tensor]:
        """Decode with a ring whose length is not a kernel block size: each sequence's ring rows of positions
        [base, base + nb*16) (base = the block of 16 holding position P - win + 1) copied in position order.
        Rows past P or before P - win + 1 hold other positions; the band mask (seqused_kv, ori_win_left) never
        reads them. Returns (cache [B*nb, 16, 1, w], table [B, ceil(max_len/16)])."""
        win, dev, bs = view.win, view.slots.device, SAS_BLOCK
        b = view.slots.shape[0]
        nb = -(-win // bs) + 1  # blocks of 16 that cover any win consecutive positions

        def index() -> tuple[Tensor, Tensor]:
            last = view.positions[:, -1].long()
            base = (last - win + 1).clamp(min=0) // bs * bs
            p = base.unsqueeze(1) + torch.arange(nb * bs, device=dev)  # [B, nb*16] positions held
            col = (torch.arange(-(-view.max_len // bs), device=dev) - (base // bs).unsqueeze(1)).clamp(0, nb - 1)
            return view.window.row(p), (torch.arange(b, device=dev).unsqueeze(1) * nb + col).to(torch.int32)

        ring_rows, table = _memo(memo, ("window_blocks", win, view.max_len), index)
        rows = view.window.data.index_select(0, view.slots)  # [B, win, w] as stored
        cache = rows.gather(1, ring_rows.unsqueeze(-1).expand(-1, -1, rows.shape[-1]))
        return _kv4(cache.reshape(b * nb, bs, -1)), table

    def _sas_entry_blocks(self, view: KVView, memo: dict) -> tuple[Tensor, Tensor]:
        """Entry pages whose size (block_size/m) is not a kernel block size: every entry each sequence's block table
        addresses, copied in entry order into blocks of 16 (entry j of sequence b in block b*nb + j // 16).
        Returns (cache [B*nb, 16, 1, w], table [B, nb])."""
        data, bs = view.entries.data, SAS_BLOCK
        b, cols = view.block_table.shape
        per_page = data.shape[1]
        nb = -(-(cols * per_page) // bs)

        def index() -> tuple[Tensor, Tensor, Tensor]:
            j = torch.arange(nb * bs, device=data.device).clamp(max=cols * per_page - 1)  # padding repeats the last
            page = view.block_table.long()[:, j // per_page]  # [B, nb*16]
            blocks = torch.arange(b * nb, device=data.device, dtype=torch.int32).view(b, nb)
            return page, j % per_page, blocks

        page, row, blocks = _memo(memo, ("entry_blocks", per_page, cols), index)
        return _kv4(data[page, row].reshape(b * nb, bs, -1)), blocks

    def _sas_pending_entries(self, view: KVView, memo: dict) -> tuple[Tensor, Tensor]:
        """Deferred prefill (speculative verify): the entries are in `view.entry_rows` [B, N, d] (the committed
        ones read back from the pages plus the chunk's own, not written yet), so they go to the kernel as a
        temporary paged cache in the store's form (C8 bytes for a C8 store), blocks of 16, zero rows after N
        (the causal rule never reads them). Returns (cache [B*nb, 16, 1, w], table [B, nb])."""
        rows = view.entries.pack(view.entry_rows)
        b, n, _ = rows.shape
        nb = max(-(-n // SAS_BLOCK), 1)
        rows = F.pad(rows, (0, 0, 0, nb * SAS_BLOCK - n))
        table = _memo(memo, ("pending_entries", view.ratio, n), lambda: torch.arange(
            b * nb, device=rows.device, dtype=torch.int32).view(b, nb))
        return _kv4(rows.reshape(b * nb, SAS_BLOCK, -1)), table


def _memo(memo: dict, key: tuple, build):
    """memo[key], built once (the per-step dict shared by every layer's `attend`)."""
    if key not in memo:
        memo[key] = build()
    return memo[key]


def _kv4(rows: Tensor) -> Tensor:
    """Stored rows [blocks, block_size, w] -> the kernels' paged [blocks, block_size, 1, w] (C8 bytes viewed as
    float8_e4m3fn, the dtype CR passes the FP8 caches in)."""
    rows = rows.unsqueeze(2)
    return rows.view(torch.float8_e4m3fn) if rows.dtype == torch.uint8 else rows


def _kernel_block(rows: int) -> bool:
    """A paged-cache block size npu_sparse_attn_sharedkv takes: a multiple of 16, at most 1024 (CR's op doc)."""
    return rows % 16 == 0 and 0 < rows <= 1024
