"""Emulated attention ops: the lightning indexers (bf16, int8) and CR's shared-KV sparse attention."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .numerics import _checking_values

_NO_WINDOW = 2**63 - 1  # the schemas' pre_tokens / next_tokens default: no band limit
_SAS_ELEMENTS = 1 << 24  # emulator only: query rows go in blocks whose [rows, keys, D] gathers stay this small


# ---- lightning indexer -------------------------------------------------------------------------------------------
def _li_rows(layout_query: str, q_shape, actual_seq_lengths_query, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per flat query row (BSND rows are b*S1 + s): its batch b, whether it belongs to one, its index i among the
    batch's queries and the batch's query count sq; int64 / bool [T]. TND: actual_seq_lengths_query = prefix sums
    (B entries); BSND: per-batch query counts (default S1). Tensor ops only, no host read."""
    if layout_query == "TND":
        if actual_seq_lengths_query is None:
            raise ValueError("layout TND needs actual_seq_lengths_query (prefix sums, B entries)")
        ends = torch.as_tensor(actual_seq_lengths_query, device=device).long()
        t = torch.arange(q_shape[0], device=device)
        b = torch.searchsorted(ends, t, right=True)  # the batch whose [start, end) holds row t; B past the end
        valid = b < ends.shape[0]
        bc = b.clamp(max=ends.shape[0] - 1)
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        return bc, valid, t - starts[bc], ends[bc] - starts[bc]
    if layout_query == "BSND":
        bsz, s1 = q_shape[0], q_shape[1]
        t = torch.arange(bsz * s1, device=device)
        b, i = t // s1, t % s1
        lens = (torch.full((bsz,), s1, dtype=torch.int64, device=device) if actual_seq_lengths_query is None
                else torch.as_tensor(actual_seq_lengths_query, device=device).long())
        return b, i < lens[b], i, lens[b]
    raise NotImplementedError(f"layout_query {layout_query!r} not emulated (BSND, TND)")


def _paged_all(cache: Tensor, block_table: Tensor, b_rows: Tensor) -> Tensor:
    """Every row a block table can address, for each query row's batch: cache [blocks, block_size, ...] read
    through block_table[b_rows] -> [T, max_blocks * block_size, ...]."""
    bs = cache.shape[1]
    pos = torch.arange(block_table.shape[1] * bs, device=cache.device)
    blk = block_table.long()[b_rows][:, pos // bs]  # [T, nmax]
    return cache[blk, pos % bs]


def _li_select(layout_query, q_shape, actual_seq_lengths_query, actual_seq_lengths_key, score_fn, n_max,
               sparse_count, sparse_mode, cmp_ratio, device) -> tuple[Tensor, Tensor]:
    """Shared LI top-k: per query, scores over its batch's visible compressed keys, top sparse_count, -1 padded
    (indices int32 [T, K], and their fp32 scores, -inf at -1).

    score_fn(b_rows [R], lo, hi) gives fp32 [R, n_max] over every addressable key for query rows lo..hi-1 (blocks
    of rows keep the emulator's [R, n_max, D] gathers bounded); keys past the batch's n_keys =
    kv_len // cmp_ratio (and, sparse_mode 3, not yet visible to the query) are masked before a stable descending
    sort (score desc, index asc). Static shapes, no host read, so it traces (graph mode)."""
    if sparse_mode not in (0, 3):
        raise ValueError(f"sparse_mode must be 0 or 3, found {sparse_mode}")
    b, in_batch, i, sq = _li_rows(layout_query, q_shape, actual_seq_lengths_query, device)
    kv_len = torch.as_tensor(actual_seq_lengths_key, device=device).long()[b]
    n_keys = kv_len // cmp_ratio
    if _checking_values() and bool((in_batch & (n_keys > n_max)).any()):
        raise ValueError(f"lightning indexer: actual_seq_lengths_key / cmp_ratio exceeds the {n_max} keys the "
                         "block_table addresses")
    j = torch.arange(n_max, device=device)
    visible = (j < n_keys.unsqueeze(-1)) & in_batch.unsqueeze(-1)
    if sparse_mode == 3:  # right-down causal in compressed units; the last query sits at kv_len - 1
        pos = kv_len - sq + i
        visible = visible & (j < ((pos + 1) // cmp_ratio).unsqueeze(-1))
    kk = min(sparse_count, n_max)
    blk = max(1, _SAS_ELEMENTS // (n_max * 256))
    vals, order = [], []
    for lo in range(0, b.shape[0], blk):
        hi = min(lo + blk, b.shape[0])
        v, o = torch.sort(score_fn(b[lo:hi], lo, hi).masked_fill(~visible[lo:hi], float("-inf")), dim=-1,
                          descending=True, stable=True)
        vals.append(v[:, :kk])
        order.append(o[:, :kk])
    vals, order = torch.cat(vals), torch.cat(order)
    picks = torch.where(vals[:, :kk] == float("-inf"), torch.full_like(order[:, :kk], -1), order[:, :kk])
    return (F.pad(picks.to(torch.int32), (0, sparse_count - kk), value=-1),
            F.pad(vals[:, :kk], (0, sparse_count - kk), value=float("-inf")))


def _li_check(what: str, layout_key: str, block_table, actual_seq_lengths_key, pre_tokens: int,
              next_tokens: int) -> None:
    if layout_key != "PA_BSND" or block_table is None or actual_seq_lengths_key is None:
        raise NotImplementedError(f"{what}: only PA_BSND keys with block_table and actual_seq_lengths_key are "
                                  f"emulated, found layout_key={layout_key!r}")
    if pre_tokens != _NO_WINDOW or next_tokens != _NO_WINDOW:
        raise NotImplementedError(f"{what}: pre_tokens / next_tokens other than the default (no band) are not "
                                  "emulated")


def _li_out(layout_query: str, q_shape, key: Tensor, flat: Tensor) -> Tensor:
    """[T, K] -> the op's [B, S1, N2, K] (BSND) or [T, N2, K] (TND) with N2 = key heads (1 in V4)."""
    n2 = key.shape[2]
    shape = (q_shape[0], q_shape[1], n2, flat.shape[-1]) if layout_query == "BSND" else (q_shape[0], n2,
                                                                                          flat.shape[-1])
    return flat.view(shape)


def npu_lightning_indexer(query: Tensor, key: Tensor, weights: Tensor, *, actual_seq_lengths_query=None,
                          actual_seq_lengths_key=None, block_table=None, layout_query="BSND", layout_key="BSND",
                          sparse_count=2048, sparse_mode=3, pre_tokens=_NO_WINDOW, next_tokens=_NO_WINDOW,
                          return_value=False) -> tuple[Tensor, Tensor]:
    """TNPU built-in `npu_lightning_indexer -> (sparse_indices, sparse_values)` (torch_npu 2.13 / 2.14 schema and
    meta function; the V3.2-era docstring's `-> Tensor` is stale).

    query [B, S1, N1, D] (BSND) or [T, N1, D] (TND, actual_seq_lengths_query = prefix sums, B entries); key
    paged [blocks, block_size, N2 = 1, D] (layout_key "PA_BSND", the only one emulated) read through block_table;
    weights [B, S1, N1, 1] or [T, N1, 1]. score[t, j] = sum_h w[t,h] * ReLU(q[t,h] . k[j]) in fp32
    (accumulation precision (verify)). sparse_mode 3: key j visible to the query at absolute position P
    (right-aligned: last query at kv_len-1) iff j <= P; top sparse_count indices by score (order within the
    top-k is implementation-defined; here score desc, index asc), -1 padded. Returns int32 indices [B, S1, N2, K]
    / [T, N2, K] and, with return_value, their scores in query.dtype (-inf at -1 slots (verify)); else an
    empty [0] tensor. The device takes bf16 / fp16; the emulator also accepts fp32 operands.
    """
    _li_check("npu_lightning_indexer", layout_key, block_table, actual_seq_lengths_key, pre_tokens, next_tokens)
    qf = query.float().reshape(-1, query.shape[-2], query.shape[-1])
    wf = weights.float().reshape(qf.shape[0], -1)

    def score_fn(b_rows, lo, hi):
        keys = _paged_all(key, block_table, b_rows)[:, :, 0].float()  # [R, n_max, D]
        dots = torch.einsum("thd,tnd->thn", qf[lo:hi], keys).relu()
        return (dots * wf[lo:hi].unsqueeze(-1)).sum(1)

    idx, vals = _li_select(layout_query, query.shape, actual_seq_lengths_query, actual_seq_lengths_key, score_fn,
                           block_table.shape[1] * key.shape[1], sparse_count, sparse_mode, 1, query.device)
    values = (_li_out(layout_query, query.shape, key, vals.to(query.dtype)) if return_value
              else torch.empty(0, dtype=query.dtype, device=query.device))
    return _li_out(layout_query, query.shape, key, idx), values


def npu_quant_lightning_indexer(query: Tensor, key: Tensor, weights: Tensor, query_dequant_scale: Tensor,
                                key_dequant_scale: Tensor, query_quant_mode: int, key_quant_mode: int, *,
                                actual_seq_lengths_query=None, actual_seq_lengths_key=None, block_table=None,
                                layout_query="BSND", layout_key="BSND", sparse_count=2048, sparse_mode=3,
                                pre_tokens=_NO_WINDOW, next_tokens=_NO_WINDOW, query_dtype=None,
                                key_dtype=None) -> Tensor:
    """TNPU built-in `npu_quant_lightning_indexer -> Tensor` (torch_npu 2.13 / 2.14 schema and meta: ONE output,
    the indices). CR's custom op of the same name returns (indices, values) and adds metadata / cmp_ratio /
    return_value; AscendBackend calls the built-in's arguments only, which are valid for both, and takes the
    first output when it gets two (docs/ascend.md).

    query int8 [B,S1,N1,D] / [T,N1,D]; key int8 paged [blocks, block_size, 1, D] (PA_BSND); weights and
    query_dequant_scale fp16 [B,S1,N1] / [T,N1]; key_dequant_scale fp16 [blocks, block_size, 1].
    score[t,j] = ks[j] * sum_h fp16(w[t,h] * qs[t,h]) * ReLU(int32 q[t,h] . k[j]) (the doc requires w*qs to
    fit fp16, so the product is formed in fp16; the order of the fp32 multiplies is (verify)). Ascend 950 (CR's
    V4 recipe, FP8 indexer cache): query / key float8_e4m3fn with fp32 weights and scales; the dots are fp32 sums
    of exact e4m3 products and w * qs stays fp32. Only query_quant_mode = key_quant_mode = 0 (per token-head /
    per key) and default query_dtype / key_dtype.
    sparse_mode 3: key j visible to the query at absolute position P iff j <= P (P right-aligned). Top
    sparse_count, -1 padded (verify: -1 tail when fewer keys are valid). Returns int32 [B,S1,1,K] or [T,1,K].
    """
    if query_quant_mode != 0 or key_quant_mode != 0 or query_dtype is not None or key_dtype is not None:
        raise NotImplementedError("npu_quant_lightning_indexer: only query_quant_mode = key_quant_mode = 0 with "
                                  "int8 / float8_e4m3fn query and key (query_dtype / key_dtype None) is emulated")
    _li_check("npu_quant_lightning_indexer", layout_key, block_table, actual_seq_lengths_key, pre_tokens,
              next_tokens)
    fp8 = query.dtype == torch.float8_e4m3fn
    if query.dtype != key.dtype or query.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise TypeError(f"npu_quant_lightning_indexer: query and key must both be int8 (A2/A3) or float8_e4m3fn "
                        f"(950), found {query.dtype} / {key.dtype}")
    qi = query.reshape(-1, query.shape[-2], query.shape[-1]).double()
    wq = weights.float() * query_dequant_scale.float()
    wq = (wq if fp8 else wq.to(torch.float16).float()).reshape(qi.shape[0], -1)

    def score_fn(b_rows, lo, hi):
        keys = _paged_all(key, block_table, b_rows)[:, :, 0].double()  # [R, n_max, D]
        ks = _paged_all(key_dequant_scale, block_table, b_rows)[:, :, 0].float()  # [R, n_max]
        dots = torch.einsum("thd,tnd->thn", qi[lo:hi], keys).float().relu()  # int8: exact int32 values
        return (dots * wq[lo:hi].unsqueeze(-1)).sum(1) * ks

    idx, _ = _li_select(layout_query, query.shape, actual_seq_lengths_query, actual_seq_lengths_key, score_fn,
                        block_table.shape[1] * key.shape[1], sparse_count, sparse_mode, 1, query.device)
    return _li_out(layout_query, query.shape, key, idx)


def npu_quant_lightning_indexer_metadata(num_heads_q, num_heads_k, head_dim, query_quant_mode, key_quant_mode, *,
                                         actual_seq_lengths_query=None, actual_seq_lengths_key=None, batch_size=0,
                                         max_seqlen_q=0, max_seqlen_k=0, layout_query="BSND", layout_key="BSND",
                                         sparse_count=2048, sparse_mode=3, pre_tokens=2**63 - 1,
                                         next_tokens=2**63 - 1, cmp_ratio=1, device="npu:0") -> Tensor:
    """CR custom AICPU tiling op: carries no math, so the emulator returns an int32 [1024] placeholder."""
    return torch.zeros(1024, dtype=torch.int32)


# ---- shared-KV sparse attention ----------------------------------------------------------------------------------
def _sas_query_rows(q: Tensor, layout_q: str, cu_seqlens_q) -> tuple[Tensor, Tensor, Tensor]:
    """Per flat query row r: (batch b [R], rows of b from r to its end >= 1 [R], row belongs to a batch [R]).

    TND: batch b owns rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]-1; BSND: b owns b*S1 .. (b+1)*S1-1. Tensor ops
    only (no host reads), so the op stays capturable."""
    dev = q.device
    if layout_q == "BSND":
        bsz, s1 = q.shape[:2]
        r = torch.arange(bsz * s1, device=dev)
        b = r // s1
        return b, (b + 1) * s1 - r, torch.ones_like(r, dtype=torch.bool)
    if layout_q != "TND":
        raise NotImplementedError(f"npu_sparse_attn_sharedkv: layout_q {layout_q!r} not emulated (BSND, TND)")
    if cu_seqlens_q is None or cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 2:
        raise ValueError("npu_sparse_attn_sharedkv: layout_q 'TND' needs cu_seqlens_q int32 [B+1] (prefix sums)")
    cu = cu_seqlens_q.to(dev).long()
    r = torch.arange(q.shape[0], device=dev)
    b = torch.searchsorted(cu[1:], r, right=True)  # first batch whose end is past r
    inside = (r >= cu[0]) & (b < cu.numel() - 1)
    b = b.clamp(max=cu.numel() - 2)
    return b, cu[1:][b] - r, inside


def _sas_paged(cache: Tensor, table: Tensor, b: Tensor, pos: Tensor) -> Tensor:
    """Rows at logical positions pos [R, K] (clamped in range) of batches b [R] from a paged [blocks, bs, 1, D]."""
    bs = cache.shape[1]
    col = (pos // bs).clamp(max=table.shape[1] - 1)
    blk = table.long()[b].gather(1, col)
    return cache[blk, pos % bs, 0]


def _sas_rows(qf, pos, kv_len, b, inside, picks, ori_kv, ori_table, cmp_kv, cmp_table, cmp_ratio, win_left,
              win_right, sinks, scale) -> Tensor:
    """The kernel's math for a block of query rows: qf [R, H, D] fp32 at positions pos [R] -> fp32 [R, H, D]."""
    dev = qf.device
    p = pos.unsqueeze(1) - win_left + torch.arange(win_left + 1 + win_right, device=dev)
    masks = [(p >= 0) & (p < kv_len.unsqueeze(1))]
    pools = [_sas_paged(ori_kv, ori_table, b, p.clamp(min=0))]
    if cmp_kv is not None:
        if picks is None:  # every entry the block table can hold; the causal rule masks the rest
            j = torch.arange(cmp_table.shape[1] * cmp_kv.shape[1], device=dev).expand(qf.shape[0], -1)
        else:
            j = picks.long()
        masks.append((j >= 0) & (j < ((pos + 1) // cmp_ratio).unsqueeze(1)))
        pools.append(_sas_paged(cmp_kv, cmp_table, b, j.clamp(min=0)))
    kk = torch.cat(pools, 1).float()  # [R, K, D]
    mask = torch.cat(masks, 1) & inside.unsqueeze(1)  # [R, K]
    logits = torch.einsum("rhd,rkd->rhk", qf, kk) * scale
    logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks.float().view(1, -1, 1).expand(qf.shape[0], -1, 1)], -1)
    m = logits.amax(-1, keepdim=True).clamp(min=-1e30)  # all-masked rows without sink stay finite
    e = torch.exp(logits - m)
    denom = e.sum(-1, keepdim=True)
    return torch.einsum("rhk,rkd->rhd", e[..., :kk.shape[1]], kk) / denom.clamp(min=1e-30)


def npu_sparse_attn_sharedkv(q: Tensor, *, ori_kv=None, cmp_kv=None, ori_sparse_indices=None,
                             cmp_sparse_indices=None, ori_block_table=None, cmp_block_table=None, cu_seqlens_q=None,
                             cu_seqlens_ori_kv=None, cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None,
                             sinks=None, metadata=None, softmax_scale=0, cmp_ratio=0, ori_mask_mode=4,
                             cmp_mask_mode=3, ori_win_left=127, ori_win_right=0, layout_q="BSND",
                             layout_kv="PA_ND", return_softmax_lse=False) -> tuple[Tensor, Tensor]:
    """CR custom `npu_sparse_attn_sharedkv` (CR ops/ascendc/docs/custom-npu_sparse_attn_sharedkv.md).

    q [B, S1, N1, D] (BSND) or [T, N1, D] (TND with cu_seqlens_q, B+1 prefix sums). ori_kv / cmp_kv paged
    [blocks, block_size, 1, D] (PA_ND), same dtype as q, through ori_block_table / cmp_block_table [B, cols]:
    logical row p of batch b is cache[table[b, p // block_size], p % block_size]. seqused_kv int32 [B] =
    per-batch *uncompressed* kv length; the query s of a batch with S queries sits at P = seqused_kv - S + s.
    Keys of that query, one softmax, K = V (shared):
      ori (band, mode 4): positions p with P - ori_win_left <= p <= P + ori_win_right and 0 <= p < seqused_kv;
      cmp (mode 3, right-down causal in compressed units): entries j < (P + 1) // cmp_ratio, all of them
      (scenario 2) or only those listed in cmp_sparse_indices [T|B*S1, 1, K2] (scenario 3; -1 and entries
      violating the causal rule are skipped; a repeated index counts once per listing (verify: the lightning
      indexer never emits repeats, so V4 never depends on it)).
    logits = softmax_scale * q.k (0 -> 1/sqrt(D)); out = sum exp(l - m) v / (sum exp(l - m) + exp(sink_h - m)):
    the sink adds mass but no value. fp32 softmax and accumulation, output q.dtype, shape of q; rows outside
    every batch (TND tail) are 0. The lse output is documented as invalid: an empty tensor is returned.
    ori_sparse_indices is ignored (documented). Tensor ops only: no host reads (capturable like the kernel).
    Documented constraints: block sizes of ori_kv / cmp_kv a multiple of 16 and at most 1024 (enforced: a layout
    the kernel rejects fails here too); D = 512, N1 = 64, K2 = 512 (not enforced: they are model widths, and the
    test models are smaller).
    """
    if layout_kv != "PA_ND":
        raise NotImplementedError("npu_sparse_attn_sharedkv: only PA_ND kv is emulated")
    if ori_kv is None or ori_block_table is None:
        raise ValueError("npu_sparse_attn_sharedkv: ori_kv and ori_block_table are required in every documented "
                         "scenario")
    if ori_mask_mode != 4 or (cmp_kv is not None and cmp_mask_mode != 3):
        raise NotImplementedError("npu_sparse_attn_sharedkv: only ori_mask_mode 4 / cmp_mask_mode 3 emulated")
    if cmp_kv is not None and (cmp_block_table is None or cmp_ratio <= 0):
        raise ValueError(f"npu_sparse_attn_sharedkv: cmp_kv needs cmp_block_table and cmp_ratio > 0, found "
                         f"table {'None' if cmp_block_table is None else 'given'}, cmp_ratio={cmp_ratio}")
    for name, kv in (("ori_kv", ori_kv), ("cmp_kv", cmp_kv)):
        if kv is not None and kv.dim() == 4 and (kv.shape[1] % 16 or not 0 < kv.shape[1] <= 1024):
            raise ValueError(f"npu_sparse_attn_sharedkv: {name} block size {kv.shape[1]} must be a multiple of 16 "
                             "and at most 1024 (documented constraint)")
        if kv is not None and (kv.dim() != 4 or kv.shape[2] != 1 or kv.shape[3] != q.shape[-1]
                               or kv.dtype != q.dtype):
            raise ValueError(f"npu_sparse_attn_sharedkv: {name} must be [blocks, block_size, 1, {q.shape[-1]}] "
                             f"{q.dtype} (q's dtype), found {list(kv.shape)} {kv.dtype}")
    if cmp_sparse_indices is not None and cmp_sparse_indices.dtype != torch.int32:
        raise TypeError(f"npu_sparse_attn_sharedkv: cmp_sparse_indices must be int32, found "
                        f"{cmp_sparse_indices.dtype}")
    d = q.shape[-1]
    dev = q.device
    scale = softmax_scale if softmax_scale else 1.0 / math.sqrt(d)
    b, left, inside = _sas_query_rows(q, layout_q, cu_seqlens_q)
    if seqused_kv is not None:
        kv_len = seqused_kv.to(dev).long()[b]
    else:
        kv_len = torch.full_like(b, ori_block_table.shape[1] * ori_kv.shape[1])
    pos = kv_len - left  # absolute position of each query row [R]
    qf = q.float().reshape(-1, q.shape[-2], d)  # [R, H, D]
    n_keys = ori_win_left + 1 + ori_win_right
    if cmp_kv is not None:
        n_keys += (cmp_block_table.shape[1] * cmp_kv.shape[1] if cmp_sparse_indices is None
                   else cmp_sparse_indices.shape[-1])
    blk = max(1, _SAS_ELEMENTS // (n_keys * (d + qf.shape[1])))  # rows per block: bounded temporaries
    out = torch.cat([_sas_rows(qf[i:i + blk], pos[i:i + blk], kv_len[i:i + blk], b[i:i + blk],
                               inside[i:i + blk], None if cmp_sparse_indices is None
                               else cmp_sparse_indices.reshape(qf.shape[0], -1)[i:i + blk], ori_kv, ori_block_table,
                               cmp_kv, cmp_block_table, cmp_ratio, ori_win_left, ori_win_right, sinks, scale)
                     for i in range(0, qf.shape[0], blk)])
    return out.view(q.shape).to(q.dtype), torch.empty(0, device=dev)


def npu_sparse_attn_sharedkv_metadata(num_heads_q, num_heads_kv, head_dim, *, cu_seqlens_q=None,
                                      cu_seqlens_ori_kv=None, cu_seqlens_cmp_kv=None, seqused_q=None,
                                      seqused_kv=None, batch_size=0, max_seqlen_q=0, max_seqlen_kv=0, ori_topk=0,
                                      cmp_topk=0, cmp_ratio=-1, ori_mask_mode=4, cmp_mask_mode=3,
                                      ori_win_left=127, ori_win_right=0, layout_q="BSND", layout_kv="PA_ND",
                                      has_ori_kv=True, has_cmp_kv=True, device="npu:0") -> Tensor:
    """CR custom AICPU tiling op: carries no math, so the emulator returns an int32 [1024] placeholder."""
    return torch.zeros(1024, dtype=torch.int32)
