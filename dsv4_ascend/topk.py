"""Exact top-k with one tie-break everywhere: higher score first, then lower index.

This is what `torch.sort(scores, descending=True, stable=True)[..., :k]` gives, without sorting all N scores:
a stable sort of a [rows, 262,144] CSA score block (1M-token context) costs ~30x a float top-k on a CPU, while
`torch.topk` alone leaves the order of equal scores unspecified. Here each score and its index are packed into
one int64 key that orders exactly as (score desc, index asc) and has no ties, so one `torch.topk` over the keys
has a unique answer.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["stable_topk", "stable_topk_masked", "stable_topk_visible", "order_keys"]

# stable_topk_visible's threshold sample: the first N // _SAMPLE_SHARE entries of each row.
_SAMPLE_SHARE = 8

_EXACT = (torch.float32, torch.bfloat16, torch.float16)  # exactly representable in fp32
# order_keys' high word of -inf: the fp32 bits 0xFF800000 with the magnitude bits flipped, as an int32.
_NEG_INF_HIGH = (0xFF800000 ^ 0x7FFFFFFF) - (1 << 32)
_NEG_INF_HIGH_CPU = torch.tensor(_NEG_INF_HIGH, dtype=torch.int32)


def order_keys(scores: Tensor, index: Tensor | None = None) -> Tensor:
    """int64 keys [..., N] of float scores [..., N]: key i > key j iff score i > score j, or they are equal
    (+0 == -0) and i < j. NaN is not supported. i is the position in the last dim, or `index` [..., N] (int,
    0 <= index < 2^31, distinct within a row) when given.

    The fp32 bit pattern (sign-magnitude) becomes a two's-complement integer of the same order (negative
    values: magnitude bits flipped; the IEEE 754 total order on non-NaN values), in the high 32 bits; the
    low 32 bits hold N-1-i (2^31-1-index with `index`).
    """
    if scores.dtype not in _EXACT:
        raise ValueError(f"order_keys: scores must be float32/bfloat16/float16, found {scores.dtype}")
    n = scores.shape[-1]
    if n > 1 << 31:
        raise ValueError(f"order_keys: N={n} indices do not fit the key's low 31 bits")
    if index is None:
        rev = torch.arange(n - 1, -1, -1, device=scores.device, dtype=torch.int32)
    elif index.shape != scores.shape:
        raise ValueError(f"order_keys: index must have the scores' shape {tuple(scores.shape)}, "
                         f"found {tuple(index.shape)}")
    else:
        rev = ((1 << 31) - 1 - index).to(torch.int32)
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0: -0 -> +0 (round to nearest), so they compare equal
    flip = (bits >> 31).bitwise_and_(0x7FFFFFFF)  # negative: -1 - magnitude (monotone); non-negative: unchanged
    if sys.byteorder != "little" or torch.compiler.is_compiling():  # compiled: one fused kernel either way
        return (bits ^ flip).to(torch.int64).mul_(1 << 32).add_(rev)
    # Eager, little-endian: an int64 is (low int32, high int32) in memory, so the two words are written in place
    # (two strided passes instead of widening, shifting and adding over int64).
    keys = torch.empty(*scores.shape, 2, device=scores.device, dtype=torch.int32)
    torch.bitwise_xor(bits, flip, out=keys[..., 1])
    keys[..., 0].copy_(rev)
    return keys.view(torch.int64).squeeze(-1)


def stable_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [..., k] of the k largest `scores` [..., N] (0 <= k <= N), ties broken by lower index.

    Sync-free (fixed shapes): one `torch.topk` over `order_keys` (distinct keys: its answer and order are
    unique). Scores: float32/bfloat16/float16 (exact in fp32); NaN is not supported.
    """
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"stable_topk: need 0 <= k <= N, found k={k}, N={n}")
    if k == 0:
        return scores[..., :0], torch.zeros(*scores.shape[:-1], 0, dtype=torch.int64, device=scores.device)
    picks = order_keys(scores).topk(k, dim=-1).indices
    return scores.gather(-1, picks), picks


def stable_topk_masked(scores: Tensor, n_visible: Tensor, k: int) -> Tensor:
    """Indices [..., min(k, N)] of `stable_topk(scores masked to -inf at w >= n_visible, min(k, N))` (scores
    [..., N] float32, n_visible [...]), -1 where the pick's score is -inf. Sync-free; `scores` is modified.

    Eager, little-endian: the keys `order_keys` builds from the masked scores, in fewer passes over N. The mask
    compares the keys' index word (w >= n_visible iff N-1-w < N-n_visible), masked entries get -inf's high word
    as the high words are written, and a pick is -inf iff its key's high word is. Compiled or big-endian: mask,
    then `stable_topk`.
    """
    n = scores.shape[-1]
    k = min(k, n)
    if scores.dtype != torch.float32:
        raise ValueError(f"stable_topk_masked: scores must be float32, found {scores.dtype}")
    if sys.byteorder != "little" or torch.compiler.is_compiling():
        scores.masked_fill_(torch.arange(n, device=scores.device) >= n_visible.unsqueeze(-1), float("-inf"))
        vals, order = stable_topk(scores, k)
        return torch.where(vals == float("-inf"), torch.full_like(order, -1), order)
    if n > 1 << 31:
        raise ValueError(f"stable_topk_masked: N={n} indices do not fit the key's low 31 bits")
    rev = torch.arange(n - 1, -1, -1, device=scores.device, dtype=torch.int32)
    hidden = rev < (n - n_visible).to(torch.int32).unsqueeze(-1)  # w >= n_visible
    bits = scores.add_(0.0).view(torch.int32)  # + 0.0: -0 -> +0, as in order_keys
    bits.bitwise_xor_((bits >> 31).bitwise_and_(0x7FFFFFFF))  # order_keys' high word, in place
    keys = torch.empty(*scores.shape, 2, device=scores.device, dtype=torch.int32)  # (low, high) int32 words
    torch.where(hidden, _NEG_INF_HIGH_CPU, bits, out=keys[..., 1])  # a CPU scalar: no copy to the device
    keys[..., 0].copy_(rev)
    top = keys.view(torch.int64).squeeze(-1).topk(k, dim=-1)
    return torch.where(top.values < (_NEG_INF_HIGH + 1) << 32, -1, top.indices)


def stable_topk_visible(scores: Tensor, n_visible: Tensor, k: int) -> Tensor | None:
    """Indices [..., k] of `stable_topk(scores[..., :n_visible], k)` per row (scores [..., N], n_visible [...]),
    found through an exact threshold with host reads and a loop over rows (eager use where host reads are free,
    e.g. CPU prefill); None where it does not apply: some row sees fewer than k of its first N // _SAMPLE_SHARE
    entries.

    The k-th largest score of a subset of a row is a lower bound on the row's k-th largest, so every entry of
    the row's top k scores at least tau, the k-th largest of its first min(min(n_visible), N // _SAMPLE_SHARE)
    entries (visible to every row). The candidates are the entries > tau and, when those are fewer than k,
    the first k - (their count) entries equal to tau (ties go to the lower index); only they are packed into
    `order_keys` (the same keys as `stable_topk`) and go through `torch.topk`: a compare and a `nonzero` over
    [R, N] instead of the mask, the key passes and a top-k over N.
    """
    n = scores.shape[-1]
    if k == 0 or scores.numel() == 0:
        return None
    flat, nv = scores.reshape(-1, n), n_visible.reshape(-1)
    lo = min(int(nv.min()), n // _SAMPLE_SHARE)  # host read
    if lo < k:
        return None
    tau = flat[:, :lo].topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # [R, 1]
    row, col = (flat > tau).nonzero(as_tuple=True)  # row-major: each row's entries > tau in column order
    visible = nv.tolist()  # host read
    if col.numel() and min(visible) < n:
        keep = col < nv[row]
        row, col = row[keep], col[keep]
    out = []
    for r, cols in enumerate(col.split(torch.bincount(row, minlength=flat.shape[0]).tolist())):  # host read
        need = k - cols.numel()
        if need > 0:  # the first `need` entries equal to tau (there are enough: the sample's top k are >= tau)
            m = min(visible[r], 8 * k)
            while True:  # a prefix first: in a row whose top k is one tied value they come early
                ties = (flat[r, :m] == tau[r]).nonzero().view(-1)
                if ties.numel() >= need or m == visible[r]:
                    break
                m = min(visible[r], 8 * m)
            cols = torch.cat([cols, ties[:need]])
        out.append(cols[order_keys(flat[r, cols], cols).topk(k).indices])
    return torch.stack(out).view(*scores.shape[:-1], k)
