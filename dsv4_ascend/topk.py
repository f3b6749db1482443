"""Exact top-k with one tie-break everywhere: higher score first, then lower index.

This is what `torch.sort(scores, descending=True, stable=True)[..., :k]` gives, without sorting all N scores:
a stable sort of a [rows, 262,144] CSA score block (1M-token context) costs ~30x a float top-k on a CPU, while
`torch.topk` alone leaves the order of equal scores unspecified.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["stable_topk"]


def stable_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices) [..., k] of the k largest `scores` [..., N] (0 <= k <= N), ties broken by lower index.

    Sync-free (fixed shapes). Every score above the k-th largest value v is in `torch.topk`'s answer; of the
    scores equal to v it may pick any, so those are re-picked by a second top-k over -index (indices are
    distinct, so that one is exact), and the k picks are finally ordered by (score desc, index asc).
    NaN scores are not supported.
    """
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"stable_topk: need 0 <= k <= N, found k={k}, N={n}")
    if k == 0:
        return scores[..., :0], torch.zeros(*scores.shape[:-1], 0, dtype=torch.int64, device=scores.device)
    if n >= 1 << 24:
        raise ValueError(f"stable_topk: N={n} indices are not exact in fp32 (limit 2^24)")
    vals, cand = scores.topk(k, dim=-1)  # sorted: the scores above v come first
    v = vals[..., -1:]
    n_gt = (vals > v).sum(-1, keepdim=True)  # < k: all of them are among the k
    idx = torch.arange(n, device=scores.device, dtype=torch.float32)
    ties = torch.where(scores == v, -idx, float("-inf")).topk(k, dim=-1).indices  # lowest-index ties first
    j = torch.arange(k, device=scores.device)
    picks = torch.where(j < n_gt, cand, ties.gather(-1, (j - n_gt).clamp(min=0)))
    picks = picks.sort(dim=-1).values  # index asc, then a stable sort by score desc
    order = scores.gather(-1, picks).sort(dim=-1, descending=True, stable=True).indices
    picks = picks.gather(-1, order)
    return scores.gather(-1, picks), picks
