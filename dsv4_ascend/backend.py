"""The device seam: the short list of ops whose best implementation differs per device.

The model calls only these (plus plain torch glue). `reference.ReferenceBackend` is the plain-torch truth;
`ops.AscendBackend` maps them onto torch_npu fused operators. Shapes are documented in docs/design.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import sampling as _sampling

if TYPE_CHECKING:
    from .attention_view import KVView, PagedRows

__all__ = ["Backend", "RunOptions", "fp32_linear"]

# Elements of one query block's attention temporaries in `Backend.attend` (all batch rows): 64 MiB in fp32.
_ATTN_ELEMENTS = 1 << 24
# Weight elements upcast at a time by `fp32_linear` (2 MiB in fp32: the block stays in cache for its GEMM).
_UPCAST_ELEMENTS = 1 << 19


def fp32_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T in fp32 (fp32 products and sums) for weights of any float dtype: logits and router scores.

    A weight in another dtype is upcast in blocks of rows (`_UPCAST_ELEMENTS`), each multiplied into its slice of
    the output while it is still in cache: no fp32 copy of the whole weight is written and re-read per call (the
    vocabulary head: 4 bytes x V x D per decode step). Each output is the same fp32 dot product as in the
    whole-weight GEMM, but the BLAS may order its sums differently for a narrower N, so the two can differ in the
    last fp32 bit (measured for a [2048, 7168] weight; equal for [4096, 512]).
    Compiled on CPU with one row (the batch-1 decode step), the same dot products are written as a multiply + sum,
    which inductor fuses into one reduction that reads the weight in its stored dtype.
    """
    if weight.dtype == torch.float32:
        return torch.nn.functional.linear(x.float(), weight)
    if torch.compiler.is_compiling():
        if weight.device.type == "cpu" and x.numel() == x.shape[-1]:
            return (x.float().unsqueeze(-2) * weight).sum(-1)
        return torch.nn.functional.linear(x.float(), weight.float())
    rows = max(1, _UPCAST_ELEMENTS // weight.shape[-1])
    if weight.shape[0] <= rows:
        return torch.nn.functional.linear(x.float(), weight.float())
    xf = x.float().reshape(-1, x.shape[-1])
    out = xf.new_empty(xf.shape[0], weight.shape[0])
    for i in range(0, weight.shape[0], rows):
        torch.mm(xf, weight[i:i + rows].float().t(), out=out[:, i:i + rows])
    return out.view(*x.shape[:-1], weight.shape[0])


@dataclass(frozen=True)
class RunOptions:
    """Numerics switches shared by every backend.

    numerics="exact": no quantisation simulation (matches transformers in fp32).
    numerics="deepseek": DeepSeek's reference numerics: FP8 act-quant before FP8/FP4 GEMMs, FP8 simulation of
    the kv nope dims, Hadamard + FP4 simulation in the indexer.
    """

    numerics: str = "exact"

    def __post_init__(self) -> None:
        if self.numerics not in ("exact", "deepseek"):
            raise ValueError(f"numerics must be 'exact' or 'deepseek', found {self.numerics!r}")

    @property
    def deepseek(self) -> bool:
        return self.numerics == "deepseek"


class Backend:
    """Abstract op set. Every method documents its contract; subclasses implement all of them."""

    name = "abstract"

    def __init__(self, options: RunOptions | None = None) -> None:
        self.options = options or RunOptions()

    def rms_norm(self, x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
        """RMSNorm over the last dim in fp32, optional weight, result in x.dtype."""
        raise NotImplementedError

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate interleaved pairs (x[2k], x[2k+1]) by the angle with cos/sin [..., r/2] (broadcast)."""
        raise NotImplementedError

    def linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        """x @ W^T for a plain, FP8-block-scaled or packed-MXFP4 weight; output in x.dtype."""
        raise NotImplementedError

    def grouped_linear(self, x: Tensor, weight: Tensor, scale: Tensor | None = None) -> Tensor:
        """Per-group projection (the grouped output projection wo_a): x [..., G, Kg], weight [G*N, Kg] -> [..., G, N]."""
        raise NotImplementedError

    def hc_pre(self, x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, iters: int, norm_eps: float,
               hc_eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """mHC pre: collapse [B,S,n,D] streams to [B,S,D]; also return post [B,S,n] and comb [B,S,n,n]."""
        raise NotImplementedError

    def hc_post(self, f: Tensor, x: Tensor, post: Tensor, comb: Tensor) -> Tensor:
        """mHC post: out[...,j,:] = post_j * f + sum_i comb[i, j] * x[..., i, :]."""
        raise NotImplementedError

    def hc_head(self, x: Tensor, fn: Tensor, base: Tensor, scale: Tensor, norm_eps: float,
                hc_eps: float) -> Tensor:
        """Final mHC collapse of [B,S,n,D] streams with sigmoid weights only."""
        raise NotImplementedError

    def compress(self, kv: Tensor, score: Tensor, ratio: int, overlap: bool) -> Tensor:
        """Softmax-pool complete windows of rows [B,L,c] (score already includes the position bias).

        Plain: L = W*ratio, c = d. Overlap (CSA): L = (W+1)*ratio, c = 2d; the first `ratio` rows belong to the
        window before the first one; entry w pools the first-half channels of window w-1 with the second-half
        channels of window w (one joint softmax over 2*ratio slots). Returns [B,W,d] in fp32.
        """
        raise NotImplementedError

    def compressor(self, x: Tensor, wkv: Tensor, wgate: Tensor, ape: Tensor, norm_weight: Tensor, norm_eps: float,
                   state: Tensor, blocks: Tensor, start: Tensor, cos: Tensor, sin: Tensor, ratio: int,
                   used: int | Tensor | None = None) -> Tensor:
        """The KV compressor over a chunk x [B,S,D] at positions start[b] + s, state updated in place.

        Rows: kv = x wkv^T, score = x wgate^T + ape[p % ratio] (fp32, [coff*d] each; coff = 2 overlaps, CSA).
        state fp32 [N, R, 2*coff*d] (cache.CompressorState): row p % R of block blocks[b] holds position p's
        [kv | score]; rows of earlier positions are read from it, this chunk's rows written to it. Entry j of
        row b is window w = start[b]//ratio + j, pooled by `compress` (w = 0 has no previous window), cast to
        x.dtype, RMS-normed (norm_weight) and RoPE'd on the last 2*cos.shape[-1] dims with cos/sin [B,W,r/2]
        (its position w*ratio). Returns [B, ceil(S/ratio), d] in x.dtype; rows of windows the chunk does not
        close are unspecified. `used` < S: only the first `used` tokens take part (commit of a verified prefix;
        the rows are projected for all S, so they equal the verify pass's bit for bit); a tensor [B]: per row
        (ragged prefill batches; the rows after used[b] are padding and never written). This default is the
        composite of the fine-grained ops.
        """
        b, s, _ = x.shape
        m, ring = ratio, state.shape[1]
        c = wkv.shape[0]
        overlap = c == 2 * norm_weight.shape[0]
        xf = x.float()
        pos = start.unsqueeze(1) + torch.arange(s, device=x.device)  # [B,S]
        new = torch.cat([self.linear(xf, wkv), self.linear(xf, wgate) + ape[pos % m]], -1)  # [B,S,2c]
        n_win = -(-s // m)
        first = (start // m - int(overlap)) * m  # first position any entry reads
        vpos = first.unsqueeze(1) + torch.arange((n_win + int(overlap)) * m, device=x.device)  # [B,L]
        old = state[blocks.unsqueeze(1), vpos % ring]  # rows of positions before the chunk (read before writing)
        at = (vpos - start.unsqueeze(1)).clamp(0, s - 1).unsqueeze(-1).expand(-1, -1, 2 * c)  # chunk row of vpos
        rows = torch.where((vpos < start.unsqueeze(1)).unsqueeze(-1), old, new.gather(1, at))
        n = s if used is None else used
        valid = ((vpos >= 0) & (vpos < (start + n).unsqueeze(1))).unsqueeze(-1)
        kv = rows[..., :c].masked_fill(~valid, 0.0)
        score = rows[..., c:].masked_fill(~valid, float("-inf"))
        if isinstance(n, Tensor):  # per row: the last R positions before start + n that are the row's own
            t = (start + n).unsqueeze(1) - ring + torch.arange(ring, device=x.device)  # [B,R], distinct rows
            mine = (t >= start.unsqueeze(1)).unsqueeze(-1)
            src = new.gather(1, (t - start.unsqueeze(1)).clamp(0, s - 1).unsqueeze(-1).expand(-1, -1, 2 * c))
            at = (blocks.unsqueeze(1), t % ring)
            state[at] = torch.where(mine, src, state[at])
        else:
            keep = min(n, ring)  # later rows of a long chunk overwrite earlier ones: write only the last R
            state[blocks.unsqueeze(1), pos[:, n - keep:n] % ring] = new[:, n - keep:n]
        e = self.rms_norm(self.compress(kv, score, m, overlap).to(x.dtype), norm_weight, norm_eps)
        r = 2 * cos.shape[-1]
        return torch.cat([e[..., :-r], self.rope(e[..., -r:], cos, sin)], dim=-1)

    def compressor_state(self, x: Tensor, wkv: Tensor, wgate: Tensor, ape: Tensor, state: Tensor, blocks: Tensor,
                         start: Tensor, ratio: int) -> None:
        """The state half of `compressor` for one token per row (x [B,1,D] at positions start [B]): write its
        [kv | score] row (the same GEMMs as `compressor`) into row start % R of block blocks[b]; no entry.

        Eager decode calls it on the steps where no row closes a window of this ratio, when the engine passes
        the rows' host-known lengths (`Transformer.decode`). This default is the composite's GEMMs; a backend
        whose fused `compressor` computes the rows with other roundings should override it with those."""
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"compressor_state: x must be one token per row [B,1,D], found {list(x.shape)}")
        xf = x.float()
        new = torch.cat([self.linear(xf, wkv), self.linear(xf, wgate) + ape[start % ratio].unsqueeze(1)], -1)
        state[blocks, start % state.shape[1]] = new[:, 0]

    def indexer_topk(self, q: Tensor, weights: Tensor, keys: Tensor, n_visible: Tensor, k: int) -> Tensor:
        """Lightning indexer: score[t,w] = sum_h weights[t,h] relu(q[t,h].keys[w]); top-k over w < n_visible[t].

        Ties break by lower entry index; picks past n_visible are -1. Returns int64 [B,S,k].
        """
        raise NotImplementedError

    def indexer_topk_paged(self, q: Tensor, weights: Tensor, keys: "PagedRows", n_visible: Tensor, k: int) -> Tensor:
        """`indexer_topk` over keys still in their pages (entries 0..keys.n-1 of every row). Default: read them
        into one tensor; a backend may score them block by block instead (no copy of all N keys)."""
        return self.indexer_topk(q, weights, keys.read(), n_visible, k)

    def sparse_attention(self, q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float) -> Tensor:
        """Shared-KV attention of q [B,S,H,d] over kv[b, idx[b,s,:]] (K = V; -1 = masked), sink logits [H]."""
        raise NotImplementedError

    def attend(self, q: Tensor, view: "KVView", sink: Tensor, scale: float) -> Tensor:
        """V4 attention of q [B,S,H,d] over the stored keys `view` describes (window ring + compressed entries).

        Default: gather the keys (`view.pool()`) and run `sparse_attention` per block of queries, with indices
        (and CSA's picked entries) gathered per block (`view.block`), so that the [block, K] temporaries stay
        under _ATTN_ELEMENTS elements whatever K (HCA: K grows as context/128); a backend with a fused kernel
        that reads the stores and positions directly overrides this.
        """
        s, k = q.shape[1], view.keys_per_query()
        blk = max(1, _ATTN_ELEMENTS // (q.shape[0] * k * (q.shape[-1] + 2 * q.shape[-2])))  # keys + logits/probs
        pool = view.pool()
        return torch.cat([self.sparse_attention(q[:, i:i + blk], *view.block(pool, i, min(i + blk, s)), sink, scale)
                          for i in range(0, s, blk)], dim=1)

    def route(self, logits: Tensor, bias: Tensor | None, hash_ids: Tensor | None, k: int,
              route_scale: float) -> tuple[Tensor, Tensor]:
        """sqrt-softplus routing: (weights [T,k] fp32, expert ids [T,k] int64)."""
        raise NotImplementedError

    def experts(self, x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w2: Tensor, w3: Tensor,
                s1: Tensor | None, s2: Tensor | None, s3: Tensor | None, limit: float,
                sync_free: bool = False, shared: Tensor | None = None) -> Tensor:
        """sum_j weights[t,j] * SwiGLU_{ids[t,j]}(x[t]) with stacked expert weights [E, ...], in x.dtype.

        The sum is accumulated in fp32; `shared` [T, D] (the shared expert's output) is added to that fp32 sum
        before the one cast (DeepSeek's MoE: `y += shared_experts(x)` on the fp32 buffer, then `type_as(x)`).
        sync_free=True (decode) forbids host reads of routing results, so the step stays capturable.
        """
        raise NotImplementedError

    def swiglu_mlp(self, x: Tensor, w1: Tensor, w2: Tensor, w3: Tensor, s1: Tensor | None, s2: Tensor | None,
                   s3: Tensor | None, limit: float) -> Tensor:
        """One clamped SwiGLU MLP (the shared expert)."""
        raise NotImplementedError

    def lm_head(self, x: Tensor, weight: Tensor) -> Tensor:
        """Vocabulary logits in fp32."""
        return fp32_linear(x, weight)

    def scatter_rows(self, dst: Tensor, rows: Tensor, src: Tensor) -> None:
        """In place: dst[rows[i]] = src[i] for dst [R, s], rows [u] int64, src [u, s]; negative rows are skipped.

        The cache-write primitive (every RowStore write). Sync-free. Among valid duplicate rows one write wins
        (which one is unspecified, as on the device); callers only duplicate padding rows nobody reads.
        """
        plain_scatter_rows(dst, rows, src)

    def sample(self, logits: Tensor, sb: "_sampling.SamplingBatch", step: Tensor) -> tuple[Tensor, Tensor]:
        """Next tokens [B] and their logprobs [B] from fp32 logits [B, V] (rules: sampling.sample); sync-free."""
        return _sampling.sample(logits, sb, step)


def plain_scatter_rows(dst: Tensor, rows: Tensor, src: Tensor) -> None:
    """`Backend.scatter_rows` in plain torch (also what a cache without a backend hook uses)."""
    idx, upd = redirect_skipped_rows(dst, rows, src.to(dst.dtype))
    dst.index_copy_(0, idx, upd)


def redirect_skipped_rows(dst: Tensor, rows: Tensor, src: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, src) with every negative row replaced by a copy of the last valid write, so that a plain scatter
    that cannot skip rows gives the skipping result, with no host sync.

    The copies write the same value to the same row as that last valid write, so they change nothing, whatever
    the order; when no row is valid they all rewrite row 0 with its current value.
    """
    if rows.dim() != 1 or src.shape[0] != rows.shape[0] or dst.dim() != 2:
        raise ValueError(f"scatter rows: need dst [R, s], rows [u], src [u, s]; found dst {list(dst.shape)}, "
                         f"rows {list(rows.shape)}, src {list(src.shape)}")
    rows = rows.long()
    if rows.shape[0] == 0:
        return rows, src
    keep = rows >= 0
    pos = torch.arange(rows.shape[0], device=rows.device)
    last = torch.where(keep, pos, -1).amax().reshape(1)  # last valid position, -1 when none
    some = last >= 0
    j = last.clamp(min=0)
    fill_row = torch.where(some, rows.index_select(0, j), torch.zeros_like(j))
    fill_val = torch.where(some.unsqueeze(1), src.index_select(0, j), dst[:1])
    return torch.where(keep, rows, fill_row), torch.where(keep.unsqueeze(1), src, fill_val)
