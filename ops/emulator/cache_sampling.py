"""Emulated cache writes (CR's scatter_nd_update_asc, torch_npu npu_scatter_nd_update_) and the top-k/top-p sampler."""
from __future__ import annotations

import torch
from torch import Tensor

from dsv4_ascend.backend import redirect_skipped_rows

from .numerics import _checking_values


def scatter_nd_update_asc(var: Tensor, indices: Tensor, update: Tensor) -> None:
    """CR custom `scatter_nd_update_asc` (ScatterNdUpdateAsc; CR op doc), in place: var[indices[i, 0]] = update[i].

    var [b, s] bf16 / fp16 / int8, contiguous, s in {1, 128, 512}; indices int32 / int64 [u, 1], u <= b; update
    [u, s] of var's dtype. Negative indices are skipped (documented). The device does no bounds check; the
    emulator raises on an index >= b. Duplicate indices are undocumented: the emulator applies the rows in order,
    so the last one wins (verify).
    """
    if var.dtype not in (torch.bfloat16, torch.float16, torch.int8):
        raise TypeError(f"scatter_nd_update_asc: var must be bfloat16, float16 or int8, found {var.dtype}")
    if var.dim() != 2 or not var.is_contiguous():
        raise ValueError(f"scatter_nd_update_asc: var must be a contiguous [b, s] tensor, found {list(var.shape)} "
                         f"(contiguous={var.is_contiguous()})")
    b, s = var.shape
    if s not in (1, 128, 512):
        raise ValueError(f"scatter_nd_update_asc: var's last dim s must be 1, 128 or 512, found {s}")
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 2 or indices.shape[1] != 1:
        raise ValueError(f"scatter_nd_update_asc: indices must be int32/int64 [u, 1], found {indices.dtype} "
                         f"{list(indices.shape)}")
    u = indices.shape[0]
    if u > b:
        raise ValueError(f"scatter_nd_update_asc: u (indices rows) must be <= b = {b}, found {u}")
    if update.dtype != var.dtype or tuple(update.shape) != (u, s):
        raise ValueError(f"scatter_nd_update_asc: update must be {var.dtype} [{u}, {s}], found {update.dtype} "
                         f"{list(update.shape)}")
    rows = indices[:, 0].long()
    if _checking_values() and bool((rows >= b).any()):  # eager only: no host read inside a captured graph
        i = int((rows >= b).nonzero()[0, 0])
        raise IndexError(f"scatter_nd_update_asc: indices[{i}] = {int(rows[i])} out of range for var rows {b} "
                         "(undefined on the device)")
    # documented: negative indices are skipped (sync-free: they rewrite the last valid row with its own value)
    rows, update = redirect_skipped_rows(var, rows, _last_write_values(rows.unsqueeze(1), update))
    var.index_put_((rows,), update)


def _last_write_values(ix: Tensor, updates: Tensor) -> Tensor:
    """updates [u, ...] with every write replaced by the last write to the same index (ix [u, a]): duplicates are
    undocumented in both scatter ops, the emulator lets the last one win (verify). Every duplicate then carries one
    value, so index_put_'s (unordered on CPU for large rows) application order cannot matter; no host sync."""
    if ix.shape[0] == 0:
        return updates
    same = (ix.unsqueeze(1) == ix.unsqueeze(0)).all(-1)  # [u, u]
    pos = torch.arange(ix.shape[0], device=ix.device)
    return updates.index_select(0, torch.where(same, pos, -1).amax(1))


def npu_scatter_nd_update_(self: Tensor, indices: Tensor, updates: Tensor) -> Tensor:
    """torch_npu built-in `npu_scatter_nd_update_(self, indices, updates)` (TNPU), in place on `self` (called
    `input` below); returns it.

    indices int32 / int64 [..., a] (a <= input.dim()) address the first a dims of input; updates has shape
    indices.shape[:-1] + input.shape[a:] and input's dtype (float32, float16, bfloat16, bool, int64, int8 on
    A2/A3). Out-of-range indices are documented as unsupported and nothing says negative ones are skipped, so the
    emulator raises on both (callers must not pass them). Duplicates are undocumented: applied in order, the last
    one wins (verify).
    """
    input = self  # noqa: A001
    allowed = (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.int64, torch.int8)
    if input.dtype not in allowed:
        raise TypeError(f"npu_scatter_nd_update_: input dtype {input.dtype} is not one of {allowed}")
    if updates.dtype != input.dtype:
        raise TypeError(f"npu_scatter_nd_update_: updates dtype {updates.dtype} must equal input's {input.dtype}")
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() < 2:
        raise ValueError(f"npu_scatter_nd_update_: indices must be int32/int64 with >= 2 dims, found "
                         f"{indices.dtype} {list(indices.shape)}")
    a = indices.shape[-1]
    if a > input.dim():
        raise ValueError(f"npu_scatter_nd_update_: indices' last dim {a} exceeds input dims {input.dim()}")
    want = tuple(indices.shape[:-1]) + tuple(input.shape[a:])
    if tuple(updates.shape) != want:
        raise ValueError(f"npu_scatter_nd_update_: updates must have shape {list(want)}, found "
                         f"{list(updates.shape)}")
    rows = updates.reshape(-1, *input.shape[a:])
    ix = indices.reshape(-1, a).long()
    if _checking_values():  # eager only: a value check would be a host read inside a captured graph
        bad = (ix < 0) | (ix >= torch.tensor(input.shape[:a], dtype=torch.int64))
        if bad.any():
            first = ix[bad.any(-1)][0].tolist()
            raise IndexError(f"npu_scatter_nd_update_: index {first} out of range for input {list(input.shape)} "
                             "(negative / out-of-range indices are not supported by the op)")
    input.index_put_(tuple(ix.unbind(-1)), _last_write_values(ix, rows))  # last duplicate wins (verify)
    return input


def npu_top_k_top_p_sample(logits: Tensor, top_k: Tensor, top_p: Tensor, q=None, eps=1e-8, is_need_logits=False,
                           top_k_guess=32, min_ps=None, ks_max=1024, input_is_logits=True, post_sample="qSample",
                           generator=None) -> tuple[Tensor, Tensor]:
    """torch_npu built-in `npu_top_k_top_p_sample` (TNPU 2.14 docs + op-plugin golden test).

    Per row b of logits [B, V] (fp16 / bf16 / fp32; computed in fp32):
    - top-k if 1 <= top_k[b] <= min(V, ks_max') (ks_max' = ks_max rounded up to 8, at most 1024): keep the
      first top_k[b] of a stable descending sort (ties to the lower index); otherwise the stage is skipped.
    - top-p on the softmax of the kept logits (renormalised after top-k), in sorted order: 0 < top_p[b] < 1
      drops a candidate when (cumsum - own prob) > top_p[b]; top_p[b] <= 0 keeps the top candidate only;
      top_p[b] >= 1 skips the stage.
    - qSample (q float32 [B, V], post_sample="qSample"): probs = softmax over the kept candidates, pick
      argmax(probs / (|q| + eps)). q is read by *sorted position* (q[b, j] goes with the j-th kept candidate)
      when a top-k or top-p stage ran, and by token id when both were skipped (golden test). Without q (or
      post_sample "None"): argmax of probs.
    Returns (logits_select_idx int64 [B], logits_top_kp_select): with is_need_logits the input logits (fp32) at
    kept tokens and -inf elsewhere (docs' defLogit for input_is_logits=True; the golden test fills 0: verify),
    else an empty fp32 tensor. top_k_guess only changes how the device finds the top-p cut, not the result.
    Not emulated: min_ps, input_is_logits=False, post_sample="multiNomial" (NotImplementedError).
    """
    if logits.dim() != 2 or logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"npu_top_k_top_p_sample: logits must be 2-D float16/bfloat16/float32, found "
                         f"{logits.dtype} {list(logits.shape)}")
    bsz, vocab = logits.shape
    if top_k.dtype != torch.int32 or tuple(top_k.shape) != (bsz,):
        raise ValueError(f"npu_top_k_top_p_sample: top_k must be int32 [{bsz}], found {top_k.dtype} "
                         f"{list(top_k.shape)}")
    if top_p.dtype != logits.dtype or tuple(top_p.shape) != (bsz,):
        raise ValueError(f"npu_top_k_top_p_sample: top_p must be {logits.dtype} [{bsz}] (logits' dtype), found "
                         f"{top_p.dtype} {list(top_p.shape)}")
    if min_ps is not None or not input_is_logits or post_sample not in ("qSample", "None", None):
        raise NotImplementedError("npu_top_k_top_p_sample: min_ps, input_is_logits=False and "
                                  "post_sample='multiNomial' are not emulated")
    if ks_max < 1:
        raise ValueError(f"npu_top_k_top_p_sample: ks_max must be >= 1, found {ks_max}")
    use_q = q is not None and post_sample == "qSample"
    if use_q and (q.dtype != torch.float32 or tuple(q.shape) != (bsz, vocab)):
        raise ValueError(f"npu_top_k_top_p_sample: q must be float32 [{bsz}, {vocab}] for qSample, found "
                         f"{q.dtype} {list(q.shape)}")
    ks = min(1024, -(-ks_max // 8) * 8)
    x = logits.float()
    k, p = top_k.long(), top_p.float()
    k_on = (k >= 1) & (k <= min(vocab, ks))
    p_on, p_one = (p > 0) & (p < 1), p <= 0
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=x.device)
    keep = ~k_on.unsqueeze(1) | (rank < k.unsqueeze(1))
    probs = torch.softmax(sorted_x.masked_fill(~keep, float("-inf")), dim=-1)
    above = probs.cumsum(-1) - probs
    keep &= ~(p_on.unsqueeze(1) & (above > p.unsqueeze(1)))
    keep &= ~(p_one.unsqueeze(1) & (rank > 0))
    sel = torch.softmax(sorted_x.masked_fill(~keep, float("-inf")), dim=-1)
    plain = torch.softmax(x, dim=-1)  # rows where no stage ran: token order
    if use_q:
        qa = q.abs() + eps
        sel, plain = sel / qa, plain / qa
    sorted_pick = order.gather(1, sel.argmax(-1, keepdim=True)).squeeze(1)
    idx = torch.where(k_on | p_on | p_one, sorted_pick, plain.argmax(-1))
    if not is_need_logits:  # the doc: "directly output the empty tensor of the corresponding size" (verify)
        return idx, torch.empty(0, dtype=torch.float32, device=x.device)
    kept = torch.zeros_like(keep).scatter(1, order, keep)
    return idx, x.masked_fill(~kept, float("-inf"))
