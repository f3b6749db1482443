"""ReferenceBackend: the readable truth every other backend is checked against.

Plain torch only, so it runs on CPU, CUDA or any torch device. Quantised weights stay packed in memory and are
dequantised per call (per block), so FP4 experts cost 4.25 bits per weight at rest.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.compiler import is_compiling  # bound once: `torch.compiler` is a lazy attribute, ~1.4 us a lookup

from dsv4_ascend import quant
from dsv4_ascend.attention_view import KVView, PagedRows
from dsv4_ascend.backend import Backend, RunOptions
from dsv4_ascend.scalar_consts import cast, scalar
from dsv4_ascend.topk import stable_topk_masked, stable_topk_visible

__all__ = ["ReferenceBackend", "dequantize_weight"]

# Queries per attention block: bounds the gathered [B, S_blk, K, d] key tensor.
_ATTN_QUERY_BLOCK = 256
# Elements of one prefill query block's attention temporaries (logits + gathered CSA picks): 64 MiB in fp32.
_ATTN_PREFILL_ELEMENTS = 1 << 24
# CSA prefill attention: a query block that can see at most this many entries per pick (its causal bound over
# the top-k) multiplies every visible entry by GEMM and masks all but its picks, instead of gathering [n, k, d]
# picked keys per query (a copy, then a batch of tiny per-query products): small preset, 512 tokens (128 entries,
# top 32), see docs/design.md "Performance".
_CSA_DENSE_ENTRIES_PER_PICK = 4
# Key elements read per block by `indexer_topk_paged` (4 MiB in fp32): bounded, cache-sized copies.
_INDEXER_KEY_ELEMENTS = 1 << 20
# Indexer entries scored per GEMM (columns of one tile): a 1M-context prefill block's [8 queries, 2 heads, tile]
# fp32 GEMM output is then 1 MiB, still in cache for relu, head weights and the head sum. Fewer query rows (decode:
# 1 query x 2 heads) take wider tiles, up to _INDEXER_TILE_ELEMENTS outputs: 16 tiles of 2 x 16,384 cost 0.25 ms
# more than 4 of 2 x 65,536 per decode step at 1M tokens (per-op overhead; CPU time, 1 thread).
_INDEXER_TILE = 1 << 14
_INDEXER_TILE_ELEMENTS = 1 << 17
# Entries from which eager CPU prefill picks through `stable_topk_visible` (its loop over query rows costs more
# than it saves on short rows: small preset at 32K, 8,192 entries, top 32: 28 vs 22 ms per 128-query block; the
# `long` preset at 32,768 entries, top 512: 19 vs 34 ms per 64-query block, CPU time).
_INDEXER_PREFILTER_ENTRIES = 1 << 14


# rope: the sign of the sine term per pair element ((a, b) -> (a cos - b sin, b cos + a sin)), per device.
_PAIR_SIGN = {torch.device("cpu"): torch.tensor([-1.0, 1.0])}


def _window_keys(view: KVView) -> tuple[Tensor, Tensor]:
    """A decode step's window keys [B, win, d] in position order, gathered from each row's ring, and their ring rows
    [B, win] (-1 before position 0: the gathered key there is row 0, to be masked)."""
    rows = view.window.window_rows(view.positions[:, 0])
    ring = view.window.read(view.slots)  # [B, ring, d]
    return ring.gather(1, rows.clamp(min=0).unsqueeze(-1).expand(-1, -1, ring.shape[-1])), rows


def _pair_sign(device: torch.device) -> Tensor:
    if device not in _PAIR_SIGN:
        _PAIR_SIGN[device] = _PAIR_SIGN[torch.device("cpu")].to(device)
    return _PAIR_SIGN[device]

dequantize_weight = quant.dequantize  # one home for the formats: dsv4_ascend.quant
# Sync-free experts run every expert on every token (`_experts_dense`) when the batch has at least one pick per
# expert and there are at most this many experts per pick: the extra multiply-adds (E/k per useful one) cost less
# on CPU than copying each pick's weights (tiny: 8 experts, 2 per token). V4 (256 experts, 6 per token) gathers.
_DENSE_EXPERTS_PER_PICK = 16


class ReferenceBackend(Backend):
    """Every op in plain torch; fp32 where DeepSeek's reference computes in fp32."""

    name = "reference"

    def __init__(self, options: RunOptions | None = None) -> None:
        super().__init__(options)

    # ---- elementwise -----------------------------------------------------------------------------------------
    def rms_norm(self, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + scalar(eps))
        if weight is not None:
            y = weight.float() * y
        return cast(y, x.dtype)

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # (a, b) -> (a cos - b sin, b cos + a sin) as x * cos + swap(x) * (-sin, sin): the same products and one
        # rounded sum each (a + (-p) == a - p exactly), in 6 kernels instead of the pairwise form's 12.
        xf = x.float().unflatten(-1, (-1, 2))
        if is_compiling():
            # Compiled (prefill): the pairwise form, one fused kernel; inductor's flip kernel measured ~10x slower
            # than this one at [1, 512, 8, 64]. The same products and sums, so bit-equal to the eager form.
            a, b = xf[..., 0], xf[..., 1]
            return torch.stack((a * cos - b * sin, b * cos + a * sin), -1).flatten(-2).to(x.dtype)
        sin2 = sin.unsqueeze(-1) * _pair_sign(sin.device)  # [..., r/2, 2] = (-sin, sin)
        y = (xf * cos.unsqueeze(-1)).add_(xf.flip(-1) * sin2)
        return cast(y.flatten(-2), x.dtype)

    # ---- GEMMs -----------------------------------------------------------------------------------------------
    def linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        if scale is None:
            return F.linear(x, cast(weight, x.dtype))
        w = dequantize_weight(weight, scale, torch.float32 if self.options.deepseek else x.dtype)
        if self.options.deepseek:
            # DeepSeek's FP8 GEMM: activations quantised per 1x128 block, fp32 accumulation, output in x.dtype.
            return F.linear(self._act_quant_dequant(x), w).to(x.dtype)
        return F.linear(x, w)

    def grouped_linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        """Per-group projection: x [..., G, Kg] with weight [G*N, Kg] -> [..., G, N]."""
        g, k = x.shape[-2], x.shape[-1]
        w = (cast(weight, x.dtype) if scale is None else dequantize_weight(weight, scale, x.dtype)).view(g, -1, k)
        # one bmm over the groups (what einsum does, without its per-call path planning)
        y = torch.bmm(x.reshape(-1, g, k).transpose(0, 1), w.transpose(1, 2))  # [G, M, N]
        return y.transpose(0, 1).reshape(*x.shape[:-1], w.shape[1])

    def _act_quant_dequant(self, x: Tensor) -> Tensor:
        return quant.act_quant_dequant(x, 128)

    # ---- mHC -------------------------------------------------------------------------------------------------
    def _hc_mix(self, x: Tensor, fn: Tensor, norm_eps: float) -> Tensor:
        xf = x.flatten(-2).float()  # callers pass x already in fp32: no copy
        rinv = torch.rsqrt(xf.square().mean(-1, keepdim=True) + scalar(norm_eps))
        return (xf @ fn.float().t()) * rinv  # DeepSeek's order (project, then scale); HF normalises first

    def hc_pre(self, x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, iters: int, norm_eps: float,
               hc_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        n = x.shape[-2]
        xf = x.float()  # once: the mix and the pre-weighted sum both read it (bf16: one [B,S,n,D] upcast, not two)
        mix = self._hc_mix(xf, fn, norm_eps)
        if is_compiling():
            # The gates as three separate contiguous ops: one fused sigmoid over a strided [.., 2n] view rounds
            # some values one fp32 ulp differently (vectorised vs scalar kernels), and the per-op parity check
            # (`dsv4 parity --per-op`) compares these outputs bit for bit with the emulated npu_hc_pre.
            pre = torch.sigmoid(mix[..., :n] * scale[0] + base[:n]) + hc_eps
            post = 2 * torch.sigmoid(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
            comb = torch.softmax((mix[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n)),
                                 dim=-1).add_(hc_eps)
            # Sinkhorn under a fusing compiler: each sum as a chain of n - 1 adds (the order torch.sum takes for
            # n = 4 here), so every sweep is pointwise per token and the whole loop fuses into one kernel (a
            # reduction per sweep measured 5x slower under inductor on CPU; baddbmm would not fuse at all).
            comb = _col_normalise(comb, hc_eps)
            for _ in range(iters - 1):
                comb = _col_normalise(_row_normalise(comb, hc_eps), hc_eps)
            return (pre.unsqueeze(-1) * xf).sum(-2).to(x.dtype), post, comb
        # Eager (decode: 8 calls per step of tiny ops, where dispatch dominates, docs/design.md "Performance"):
        # the three gates' scale and bias as one multiply and one add over all (2+n)n mixes (elementwise, so the
        # same roundings as per gate), then each gate's slice made contiguous before its sigmoid: the kernel
        # sees the same contiguous operand as the per-gate form (a strided view would round some values one ulp
        # differently, vectorised vs scalar loops; the per-op parity check compares these outputs bit for bit
        # with the emulated npu_hc_pre).
        sv, e, ones_col, ones_row = _hc_consts(scale, n, comb_rows=mix.numel() // mix.shape[-1], eps=hc_eps)
        z = (mix * scale.index_select(0, sv)).add_(base)
        pre = torch.sigmoid(z[..., :n].contiguous()).add_(scalar(hc_eps))
        post = torch.sigmoid(z[..., n:2 * n].contiguous()).mul_(scalar(2.0))
        comb = torch.softmax(z[..., 2 * n:].unflatten(-1, (n, n)), dim=-1).add_(scalar(hc_eps))
        # Sinkhorn: alternate row / column normalisation, comb / (sum + eps), for iters - 1 more sweeps after the
        # first column sweep. Each (sum + eps) is one baddbmm against a ones vector (eps + comb @ 1: sums of n
        # exact products; they matched torch.sum's bit for bit on the machine measured, docs/design.md
        # "Performance") and the normalisation one in-place div: 2 kernels per sweep instead of 3.
        t = ones_col.shape[0]
        c = comb.view(t, n, n)
        rows, cols = c.new_empty((t, n, 1)), c.new_empty((t, 1, n))
        c.div_(torch.baddbmm(e, ones_row, c, out=cols))
        for _ in range(iters - 1):
            c.div_(torch.baddbmm(e, c, ones_col, out=rows))
            c.div_(torch.baddbmm(e, ones_row, c, out=cols))
        h = (pre.unsqueeze(-1) * xf).sum(-2)
        return cast(h, x.dtype), post, comb

    def hc_post(self, f: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        xf = x.float()
        if is_compiling():  # the n-term sum as one fused pointwise kernel, not a bmm of n x n
            mixed = comb[..., 0, :, None] * xf[..., 0, None, :]
            for i in range(1, comb.shape[-2]):
                mixed = mixed + comb[..., i, :, None] * xf[..., i, None, :]
        else:  # [..., j, d] = sum_i comb[i, j] x[i]: one bmm (einsum's result bit for bit, fewer permutes)
            mixed = torch.matmul(comb.transpose(-1, -2), xf)
        return cast(mixed.add_(post.unsqueeze(-1) * f.float().unsqueeze(-2)), f.dtype)

    def hc_head(self, x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, norm_eps: float,
                hc_eps: float) -> Tensor:
        xf = x.float()
        mix = self._hc_mix(xf, fn, norm_eps)
        pre = torch.sigmoid(mix * scale[0] + base) + hc_eps
        return (pre.unsqueeze(-1) * xf).sum(-2).to(x.dtype)

    # ---- compression and sparse attention --------------------------------------------------------------------
    def compress(self, kv: Tensor, score: Tensor, ratio: int, overlap: bool) -> Tensor:
        b, length, c = kv.shape
        kv = kv.float().view(b, length // ratio, ratio, c)
        score = score.float().view(b, length // ratio, ratio, c)
        if overlap:
            d = c // 2
            kv = torch.cat([kv[:, :-1, :, :d], kv[:, 1:, :, d:]], dim=2)
            score = torch.cat([score[:, :-1, :, :d], score[:, 1:, :, d:]], dim=2)
        return (torch.softmax(score, dim=2) * kv).sum(2)

    def compressor(self, x: Tensor, wkv: Tensor, wgate: Tensor, ape: Tensor, norm_weight: Tensor, norm_eps: float,
                   state: Tensor, blocks: Tensor, start: Tensor, cos: Tensor, sin: Tensor, ratio: int,
                   used: int | Tensor | None = None) -> Tensor:
        """Decode (one token per row, state ring = the window(s) one entry reads): the composite's values with
        fewer ops (write the token's row first, then read the ring rows of its window: the rows of positions
        after the token are stale there, but the composite masks them too, kv 0 and score -inf, exactly).
        Anything else: the composite (`Backend.compressor`)."""
        m, ring, c = ratio, state.shape[1], wkv.shape[0]
        overlap = c == 2 * norm_weight.shape[0]
        if x.shape[1] != 1 or used is not None or ring != (1 + overlap) * m:
            return super().compressor(x, wkv, wgate, ape, norm_weight, norm_eps, state, blocks, start, cos, sin,
                                      ratio, used)
        self.compressor_state(x, wkv, wgate, ape, state, blocks, start, m)  # the composite's GEMMs on [B,1,D]
        vpos = ((start // m - int(overlap)) * m).unsqueeze(1) + torch.arange(ring, device=x.device)  # [B, ring]
        rows = state[blocks.unsqueeze(1), vpos % ring]  # [B, ring, 2c]: the ring in position order
        drop = ((vpos < 0) | (vpos > start.unsqueeze(1))).unsqueeze(-1)
        kv, score = rows[..., :c].masked_fill(drop, 0.0), rows[..., c:].masked_fill(drop, float("-inf"))
        e = self.rms_norm(self.compress(kv, score, m, overlap).to(x.dtype), norm_weight, norm_eps)
        r = 2 * cos.shape[-1]
        return torch.cat([e[..., :-r], self.rope(e[..., -r:], cos, sin)], dim=-1)

    def indexer_topk(self, q: Tensor, weights: Tensor, keys: Tensor, n_visible: Tensor, k: int) -> Tensor:
        n = keys.shape[1]
        eager_cpu = keys.device.type == "cpu" and not is_compiling()
        if eager_cpu and q.shape[1] > 1 and n > k and n_visible.numel():  # a decode step (one query) keeps N
            # Causal (eager CPU prefill, host reads free): no query of this block sees an entry past the largest
            # n_visible, so those are not scored (a prefill's upper triangle: half of the [S, S/4] pairs). Each
            # score is the same dot product (column tiles do not change it, `_indexer_scores`), so the picks are
            # the same (tests/test_prefill_attention.py); at least min(k, N) columns keep the output's width.
            keys = keys[:, :max(k, min(n, int(n_visible.max())))]  # host read
        scores = self._indexer_scores(q, weights, keys)
        # Prefill chunks in eager mode on CPU (host reads are free there): the exact threshold pre-filter, no mask
        # pass (`topk.stable_topk_visible`); decode (`indexer_topk_paged`), compiled graphs and accelerators: the
        # sync-free masked top-k below. Both give the same picks.
        if eager_cpu and scores.shape[-1] >= _INDEXER_PREFILTER_ENTRIES:
            picks = stable_topk_visible(scores, n_visible, min(k, scores.shape[-1]))
            if picks is not None:
                return picks
        return self._indexer_pick(scores, n_visible, k)

    def indexer_topk_paged(self, q: Tensor, weights: Tensor, keys: PagedRows, n_visible: Tensor, k: int) -> Tensor:
        """No copy of all N keys (decode at 1M tokens: N = 262,144). When a row's page table spans at least half
        of the store's pages (a long sequence): one GEMM over every stored key, then each row's N scores
        gathered through its table, whole pages at a time; else page block by page block (_INDEXER_KEY_ELEMENTS
        per block read). Each score is the dot product `indexer_topk` computes. An `indexer_topk` replaced by a
        subclass or on the instance: the default (reads all keys, calls it)."""
        if getattr(self.indexer_topk, "__func__", None) is not ReferenceBackend.indexer_topk:
            return super().indexer_topk_paged(q, weights, keys, n_visible, k)
        per, data = keys.per_page, keys.store.tensors()[0]
        b, s, h, d = q.shape
        if not keys.store.fp8 and data.shape[0] <= 2 * keys.table.shape[1]:  # work B*R <= 2*B*N
            every = self._indexer_scores(q.reshape(1, b * s, h, d), weights.reshape(1, b * s, h),
                                         data.view(1, -1, data.shape[-1])).view(b, s, -1)
            # Each row's pages in table order: whole pages of `per` scores (one index per page, not per entry).
            n_pages = data.shape[0]
            page = (torch.arange(b * s, device=q.device).view(b, s, 1) * n_pages + keys.table.unsqueeze(1))
            scores = every.view(b * s * n_pages, per).index_select(0, page.flatten()).view(b, s, -1)[..., :keys.n]
        else:
            step = max(per, _INDEXER_KEY_ELEMENTS // keys.store.width // per * per)
            scores = torch.cat([self._indexer_scores(q, weights, keys.read(lo, min(lo + step, keys.n)))
                                for lo in range(0, keys.n, step)], dim=-1)
        return self._indexer_pick(scores, n_visible, k)

    def _indexer_scores(self, q: Tensor, weights: Tensor, keys: Tensor) -> Tensor:
        """fp32 scores [B,S,N] = sum_h weights[h] relu(q[h].keys[w]): GEMMs [S*H, d] x [d, tile] per batch row
        (bmm); relu and the head weights in place (the [S,H,N] fp32 scores are the bulk of the memory traffic:
        N = 262,144 CSA entries at 1M tokens)."""
        if self.options.deepseek:  # DeepSeek's rounding: q.k, relu, * weights and the head sum each in q.dtype
            dt = q.dtype
            scores = _scores(q, keys.to(dt)).relu_()
            return scores.mul_(weights.to(dt).unsqueeze(-1)).sum(2).float()
        # Entries in tiles of _INDEXER_TILE: each [B,S,H,tile] GEMM output is relu'd, weighted and summed over
        # the heads while it is still in cache (the same values: column tiles do not change a GEMM's dot products
        # on this CPU, `tests/test_long_context.py::test_indexer_score_tiles_equal_whole`).
        q, keys, w = q.float(), keys.float(), weights.float().unsqueeze(-1)
        n = keys.shape[1]
        tile = max(_INDEXER_TILE, _INDEXER_TILE_ELEMENTS // (q.shape[0] * q.shape[1] * q.shape[2]))
        if n <= tile or is_compiling():  # compiled: no strided `out=` (dynamo)
            return _scores(q, keys).relu_().mul_(w).sum(2)
        out = q.new_empty(q.shape[0], q.shape[1], n)
        for lo in range(0, n, tile):
            hi = min(lo + tile, n)
            torch.sum(_scores(q, keys[:, lo:hi]).relu_().mul_(w), 2, out=out[..., lo:hi])
        return out

    def _indexer_pick(self, scores: Tensor, n_visible: Tensor, k: int) -> Tensor:
        """Top-k entries of fp32 scores [B,S,N] among w < n_visible [B,S] (modified in place); -1 past them."""
        # Higher score first, then lower index: one tie-break everywhere (= a stable descending sort's first k).
        return stable_topk_masked(scores, n_visible, k)

    def sparse_attention(self, q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float) -> Tensor:
        s = q.shape[1]
        if s > _ATTN_QUERY_BLOCK:
            return torch.cat([self.sparse_attention(q[:, i:i + _ATTN_QUERY_BLOCK], kv,
                                                    idx[:, i:i + _ATTN_QUERY_BLOCK], sink, scale)
                              for i in range(0, s, _ATTN_QUERY_BLOCK)], dim=1)
        b = q.shape[0]
        n, d = kv.shape[1], kv.shape[2]
        flat = (idx.clamp(min=0) + torch.arange(0, b * n, n, device=kv.device).view(b, 1, 1)).reshape(-1)
        keys = kv.reshape(b * n, d).index_select(0, flat).view(*idx.shape, d).float()  # [B,S,K,d] (row copies)
        logits = torch.matmul(q.float(), keys.transpose(-1, -2)).mul_(scalar(scale))  # [B,S,H,K]
        logits = logits.masked_fill((idx < 0).unsqueeze(2), float("-inf"))
        sink_col = sink.float().view(1, 1, -1, 1).expand(*logits.shape[:3], 1)
        probs = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1]
        return cast(torch.matmul(probs, keys), q.dtype)

    def attend(self, q: Tensor, view: KVView, sink: Tensor, scale: float) -> Tensor:
        """Prefill: per block of queries, one GEMM against the block's contiguous window band (`window_slab`),
        one against every HCA entry (masked by visibility) or, CSA, against every entry masked to the block's picks
        while the block sees few entries (`_CSA_DENSE_ENTRIES_PER_PICK`), else a gather of its picks; one softmax with
        the sink. No per-query copy of window keys (the gathered form copies [S, K, d]). Decode, a view without
        one host-known start for every row, or a `sparse_attention` replaced by a subclass or on the instance (it
        is what the default calls): the default."""
        own = getattr(self.sparse_attention, "__func__", None) is ReferenceBackend.sparse_attention
        if view.chunk is None and own and view.ratio and view.picks is None and q.shape[1] == 1:
            return self._hca_decode(q, view, sink, scale)
        if view.chunk is None and own and q.shape[1] == 1 and (not view.ratio or view.picks_from_store):
            return self._window_picks_decode(q, view, sink, scale)
        if view.chunk is None or not isinstance(view.start, int) or not own:
            return super().attend(q, view, sink, scale)
        b, s, h, d = q.shape
        win, dev, m = view.win, q.device, view.ratio
        slab = view.window_slab()
        hca = m > 0 and view.picks is None
        ent = view.entry_pool().float() if hca else None
        n_ent = ent.shape[1] if hca else 0
        n_pick = view.picks.shape[-1] if m and not hca else 0
        # CSA blocks that see at most n_dense entries (their causal bound) take every one of them by GEMM, masked
        # to their picks (`_CSA_DENSE_ENTRIES_PER_PICK`): entries 0..n_dense-1, read once, as the picks read them.
        n_dense = min((view.start + s) // m, _CSA_DENSE_ENTRIES_PER_PICK * n_pick) if n_pick else 0
        if n_dense and (view.start + min(s, max(win, 16))) // m <= n_dense:  # the first block is dense
            dense = (view.entry_rows[:, :n_dense] if view.entry_rows is not None
                     else PagedRows(view.entries, view.block_table, n_dense).read())
            ent, n_ent = dense.float(), n_dense
        # Query block ~ the window: the band holds blk+win-1 keys per query (<= 2x the win it needs, as GEMMs);
        # halved until the block's logits and gathered picks fit _ATTN_PREFILL_ELEMENTS.
        blk = min(s, max(win, 16))
        while blk > 1 and blk * b * (h * (blk + win + n_ent + n_pick) + n_pick * d) > _ATTN_PREFILL_ELEMENTS:
            blk //= 2
        out = []
        qf = q.float()  # once: the blocks' bands overlap by win-1 rows
        # The slab in fp32 with one zero row after it: each band takes n + win rows (its last one masked), so a
        # block of 64 queries over a 64-window has 128 key columns, not 127 (an even width: the logits GEMM
        # measured ~25% faster, docs/design.md "Performance").
        slab = torch.cat([slab.float(), slab.new_zeros(b, 1, d, dtype=torch.float32)], 1)
        for lo in range(0, s, blk):
            hi = min(lo + blk, s)
            n = hi - lo
            nw = n + win
            qb = qf[:, lo:hi].reshape(b, n * h, d)
            kw = slab[:, lo:hi + win]  # positions start+lo-win+1 .. start+hi (the last one: a masked zero row)
            # HCA, causal: query t sees entries w < (t+1)//m; the block's queries (t = start+lo .. start+hi-1) see
            # at most n_all, each at least n_some. Entries past n_all are skipped (not computed and masked); only
            # columns n_some..n_all-1 need a mask.
            # CSA: a block whose picks all lie below n_dense takes the dense form (entries masked to its picks).
            picked = n_pick and ent is not None and (view.start + hi) // m <= n_ent
            n_all = min(n_ent, (view.start + hi) // m) if hca or picked else 0
            n_some = min(n_all, (view.start + lo + 1) // m) if hca else 0
            n_gather = 0 if picked else n_pick
            # One logits buffer [window band | entries or picks | sink]: the GEMMs write their columns in place
            # (no concatenation copy), one softmax reads it.
            lg = qb.new_empty(b, n * h, nw + n_all + n_gather + 1)
            torch.bmm(qb, kw.transpose(1, 2), out=lg[..., :nw])
            if n_all:
                torch.bmm(qb, ent[:, :n_all].transpose(1, 2), out=lg[..., nw:nw + n_all])
            elif n_gather:
                keys, valid = view.picked_entries(lo, hi)
                keys = keys.float()
                torch.bmm(qb.reshape(b * n, h, d), keys.reshape(b * n, n_pick, d).transpose(1, 2),
                          out=lg.view(b * n, h, -1)[..., nw:nw + n_pick])
            lg4 = lg.view(b, n, h, -1)
            lg4[..., :-1].mul_(scale)
            rel = torch.arange(nw, device=dev) - torch.arange(n, device=dev).view(-1, 1)
            first = view.start + lo - win + 1  # position of band row 0
            band = (rel >= 0) & (rel < win) & (first + torch.arange(nw, device=dev) >= 0)
            lg4[..., :nw].masked_fill_(~band.view(1, n, 1, -1), float("-inf"))
            if hca and n_some < n_all:
                vis = (torch.arange(n_some, n_all, device=dev)
                       < ((view.positions[:, lo:hi] + 1) // m).unsqueeze(-1))  # [B, n, n_all - n_some]
                lg4[..., nw + n_some:nw + n_all].masked_fill_(~vis.unsqueeze(2), float("-inf"))
            elif picked:  # every column but the block's valid picks (distinct top-k entries; -1 = none)
                p = view.picks[:, lo:hi]
                sel = torch.zeros(b, n, n_all + 1, dtype=torch.bool, device=dev)
                sel.scatter_(2, torch.where(p >= 0, p, n_all), True)
                lg4[..., nw:nw + n_all].masked_fill_(~sel[..., :n_all].unsqueeze(2), float("-inf"))
            elif n_gather:
                lg4[..., nw:nw + n_pick].masked_fill_(~valid.unsqueeze(2), float("-inf"))
            lg4[..., -1] = sink.float().view(1, 1, h)
            probs = torch.softmax(lg, dim=-1)
            o = probs[..., :nw] @ kw
            if n_all:
                o += probs[..., nw:nw + n_all] @ ent[:, :n_all]
            elif n_gather:
                o += torch.bmm(probs.view(b * n, h, -1)[..., nw:nw + n_pick], keys.reshape(b * n, n_pick, d)).view(
                    b, n * h, d)
            out.append(o.view(b, n, h, d))
        return torch.cat(out, dim=1).to(q.dtype)

    @staticmethod
    def _window_picks_decode(q: Tensor, view: KVView, sink: Tensor, scale: float) -> Tensor:
        """Decode step over a window layer (+ CSA picks read from the pages): the keys the default gathers
        through `view.block` and `sparse_attention`, in the same order ([window rows in position order | picks])
        and layout, taken directly (no pool copy, no index arithmetic); then `sparse_attention`'s ops."""
        b, _, h, d = q.shape
        keys, rows = _window_keys(view)
        masked = rows < 0
        if view.picks is not None:
            picked, valid = view.picked_entries(0, 1)  # [B,1,K,d], [B,1,K]
            keys = torch.cat([keys, picked[:, 0].to(keys.dtype)], 1)
            masked = torch.cat([masked, ~valid[:, 0]], 1)
        keys = keys.unsqueeze(1).float()  # [B,1,K',d]
        logits = torch.matmul(q.float(), keys.transpose(-1, -2)).mul_(scalar(scale))  # [B,1,H,K']
        logits = logits.masked_fill(masked.view(b, 1, 1, -1), float("-inf"))
        sink_col = sink.float().view(1, 1, -1, 1).expand(b, 1, h, 1)
        probs = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1]
        return cast(torch.matmul(probs, keys), q.dtype)

    @staticmethod
    def _hca_decode(q: Tensor, view: KVView, sink: Tensor, scale: float) -> Tensor:
        """Decode step over an HCA layer: the ring's window rows gathered by index, every entry by one GEMM masked
        by visibility, one softmax with the sink. The default gathers a [K, d] copy of all context/128 entries."""
        b, _, h, d = q.shape
        pos = view.positions[:, 0]
        kw, rows = _window_keys(view)
        kw = kw.float()
        ent = view.entry_pool().float()  # [B, N, d]
        qf = q.float().view(b, h, d)
        vis = torch.arange(ent.shape[1], device=q.device) < ((pos + 1) // view.ratio).unsqueeze(-1)  # [B, N]
        sc = scalar(scale)
        logits = [(qf @ kw.transpose(1, 2)).mul_(sc).masked_fill_((rows < 0).unsqueeze(1), float("-inf")),
                  (qf @ ent.transpose(1, 2)).mul_(sc).masked_fill_(~vis.unsqueeze(1), float("-inf")),
                  sink.float().view(1, h, 1).expand(b, h, 1)]
        probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
        win = rows.shape[1]
        out = probs[..., :win] @ kw + probs[..., win:-1] @ ent
        return cast(out.view(b, 1, h, d), q.dtype)

    # ---- MoE -------------------------------------------------------------------------------------------------
    def route(self, logits: Tensor, bias: Tensor | None, hash_ids: Tensor | None, k: int,
              route_scale: float) -> tuple[Tensor, Tensor]:
        scores = F.softplus(logits.float()).sqrt()
        if hash_ids is not None:
            ids = hash_ids.long()
        else:
            biased = scores if bias is None else scores + bias.float()
            ids = biased.topk(k, dim=-1).indices
        w = scores.gather(-1, ids)
        w = w / w.sum(-1, keepdim=True)
        return w * scalar(route_scale), ids

    def _swiglu(self, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, s1, s2, s3, limit: float,
                weight: Tensor | None = None, mm=None) -> Tensor:
        """Clamped SwiGLU; `mm(x, w, s)` (default `self.linear`) is the matmul, e.g. the grouped experts'."""
        mm = self.linear if mm is None else mm
        g = mm(x, w1, s1).float().clamp(max=limit)
        u = mm(x, w3, s3).float().clamp(-limit, limit)
        h = F.silu(g) * u
        if weight is not None:  # routing weight before the down projection, in fp32 (DeepSeek's order)
            h = h * weight.unsqueeze(-1)
        return mm(h.to(x.dtype), w2, s2)

    def swiglu_mlp(self, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, s1: Tensor | None, s2: Tensor | None,
                   s3: Tensor | None, limit: float) -> Tensor:
        return self._swiglu(x, w1, w2, w3, s1, s2, s3, limit)

    def experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                s1: Tensor | None, s2: Tensor | None, s3: Tensor | None, limit: float,
                sync_free: bool = False, shared: Tensor | None = None) -> Tensor:
        t, k = ids.shape
        n_exp = w1.shape[0]
        if sync_free and t * k >= n_exp and n_exp <= _DENSE_EXPERTS_PER_PICK * k:
            return self._experts_dense(x, weights, ids, w1, w2, w3, s1, s2, s3, limit, shared)
        if sync_free or t * k < n_exp:
            return self._experts_gathered(x, weights, ids, w1, w2, w3, s1, s2, s3, limit, shared)
        # Many tokens: group the (token, slot) pairs by expert. Reads the per-expert counts on the host, which
        # is fine for prefill; decode takes the gathered path above (no host sync).
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n_exp).tolist()
        tok = order // k
        xs, ws = x[tok], weights.flatten()[order]
        groups, lo = [], 0  # (expert, its rows of xs)
        for e, c in enumerate(counts):
            if c:
                groups.append((e, slice(lo, lo + c)))
            lo += c

        def per_expert(inp: Tensor, w: Tensor, s: Tensor | None) -> Tensor:  # each group through its expert
            return torch.cat([self.linear(inp[sl], w[e], None if s is None else s[e]) for e, sl in groups])

        # `_swiglu`'s elementwise ops once over every row (one chain of ~8 kernels instead of one per expert),
        # then one fp32 index_add_ in expert order: each token's sum is accumulated in the same order as one
        # index_add_ per expert did (tests/test_reference_ops.py).
        out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, self._swiglu(xs, w1, w2, w3, s1, s2, s3, limit, ws, mm=per_expert).float())
        if shared is not None:  # DeepSeek's order: the routed experts, then the shared one, on the fp32 sum
            out += shared.float()
        return out.to(x.dtype)

    def _experts_dense(self, x, weights, ids, w1, w2, w3, s1, s2, s3, limit, shared=None) -> Tensor:
        """Decode path for a batch that picks about every expert: every expert on every token (bmm over the
        stacked experts, weights dequantised once), each token's output the routing-weighted sum, unpicked
        experts weighted by an exact 0. No data-dependent shapes, and no per-(token, expert) copy of the weights
        (the gathered path's index_select: tiny, 32 decode rows: 33 of a 90 ms step)."""
        dt, t, n_exp = x.dtype, ids.shape[0], w1.shape[0]
        every = torch.arange(n_exp, device=ids.device)
        dense = torch.zeros(t, n_exp, dtype=torch.float32, device=x.device).scatter_add_(1, ids, weights.float())

        def all_of(w: Tensor, s: Tensor | None) -> Tensor:  # [E, out, in] in dt
            return dequantize_weight(w, None if s is None else _select_rows(s, every), dt)

        xin = x
        if self.options.deepseek and s1 is not None:
            xin = self._act_quant_dequant(x).to(dt)
        xe = xin.unsqueeze(0).expand(n_exp, t, xin.shape[-1])  # [E, T, D]
        g = torch.bmm(xe, all_of(w1, s1).transpose(1, 2)).float().clamp(max=limit)  # [E, T, I]
        u = torch.bmm(xe, all_of(w3, s3).transpose(1, 2)).float().clamp(-limit, limit)
        h = (F.silu(g) * u * dense.t().unsqueeze(-1)).to(dt)
        if self.options.deepseek and s2 is not None:
            h = self._act_quant_dequant(h).to(dt)
        y = torch.bmm(h, all_of(w2, s2).transpose(1, 2)).float().sum(0)  # [T, D]
        if shared is not None:
            y = y + shared.float()
        return y.to(dt)

    def _experts_gathered(self, x, weights, ids, w1, w2, w3, s1, s2, s3, limit, shared=None) -> Tensor:
        """Decode path: gather the selected experts' weights per token; no data-dependent shapes.

        On CPU the orientation matters: index_select copies whole expert slices (advanced indexing is ~7x
        slower) and a row-vector times transposed-weight bmm is ~7x faster than weight times column vector.
        """
        dt = x.dtype
        t, k = ids.shape
        flat = ids.reshape(-1)

        def pick(w: Tensor, s: Tensor | None) -> Tensor:  # [T*k, out, in] in dt
            if s is not None and flat.shape[0] > w.shape[0]:
                # More (token, expert) pairs than experts (a batched decode step): dequantise each expert once,
                # then gather (the same values: dequantisation is per weight block). Shape-only choice.
                every = torch.arange(w.shape[0], device=flat.device)
                return dequantize_weight(w, _select_rows(s, every), dt).index_select(0, flat)
            if s is None:
                return cast(w.index_select(0, flat), dt)
            return dequantize_weight(w.index_select(0, flat), _select_rows(s, flat), dt)

        xin = x
        if self.options.deepseek and s1 is not None:
            xin = self._act_quant_dequant(x).to(dt)
        xr = xin.repeat_interleave(k, 0).unsqueeze(1)  # [T*k, 1, D]
        g = torch.bmm(xr, pick(w1, s1).transpose(1, 2)).float().clamp(max=limit)  # [T*k, 1, I]
        u = torch.bmm(xr, pick(w3, s3).transpose(1, 2)).float().clamp(-limit, limit)
        h = (F.silu(g) * u * weights.reshape(-1, 1, 1)).to(dt)
        if self.options.deepseek and s2 is not None:
            h = self._act_quant_dequant(h).to(dt)
        y = torch.bmm(h, pick(w2, s2).transpose(1, 2)).float().view(t, k, -1).sum(1)
        if shared is not None:
            y = y + shared.float()
        return y.to(dt)


def _row_normalise(c: Tensor, eps: float) -> Tensor:
    """c / (row sum + eps) for c [..., n, n], the sum as n - 1 pointwise adds."""
    s = c[..., 0]
    for j in range(1, c.shape[-1]):
        s = s + c[..., j]
    return c / (s.unsqueeze(-1) + eps)


def _col_normalise(c: Tensor, eps: float) -> Tensor:
    """c / (column sum + eps) for c [..., n, n], the sum as n - 1 pointwise adds."""
    s = c[..., 0, :]
    for i in range(1, c.shape[-2]):
        s = s + c[..., i, :]
    return c / (s.unsqueeze(-2) + eps)


def _scores(q: Tensor, keys: Tensor) -> Tensor:
    """q [B,S,H,d] . keys [B,N,d] -> [B,S,H,N] as one bmm."""
    b, s, h, d = q.shape
    return torch.bmm(q.reshape(b, s * h, d), keys.transpose(1, 2)).view(b, s, h, -1)


def _select_rows(t: Tensor, rows: Tensor) -> Tensor:
    """t.index_select(0, rows); e8m0 scales are selected as their uint8 bytes and decoded to fp32 (exact powers
    of two, so the dequantised weight is the same): inductor's C++ code generation has no e8m0 type, so a
    compiled decode step must not compute an e8m0 tensor."""
    if t.dtype == torch.float8_e8m0fnu:
        return quant.e8m0_to_float(t.view(torch.uint8).index_select(0, rows))
    return t.index_select(0, rows)



# Eager hc_pre's constant operands per (n, rows, device, eps): the gate-scale index and the Sinkhorn sums' eps and
# ones vectors. Read-only, so sharing them is safe; only small row counts (decode batches) are kept.
_HC_CONSTS: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
_HC_CONSTS_MAX_ROWS = 256


def _hc_consts(scale: Tensor, n: int, comb_rows: int, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(gate-scale index [(2+n)n]: 0 for the n pre mixes, 1 for the n post, 2 for the n*n comb; eps [1,1,1];
    ones [rows,n,1]; ones [rows,1,n]), fp32 on scale's device. Normal tensors (not inference tensors), so
    prefill outside inference mode may read them too."""
    key = (n, comb_rows, scale.device, eps)
    got = _HC_CONSTS.get(key)
    if got is None:
        with torch.inference_mode(False):
            dev = scale.device
            sv = torch.tensor([0] * n + [1] * n + [2] * n * n, device=dev)
            one = torch.ones((), device=dev)
            got = (sv, torch.full((1, 1, 1), eps, device=dev), one.expand(comb_rows, n, 1),
                   one.expand(comb_rows, 1, n))
        if comb_rows <= _HC_CONSTS_MAX_ROWS:
            _HC_CONSTS[key] = got
    return got
