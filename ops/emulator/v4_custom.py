"""Emulated V4 custom ops from cann-recipes-infer: mHC pre/post (npu_hc_pre, npu_hc_post) and the KV compressor."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .numerics import _checking_values, hf32


# Precision of npu_hc_pre's mixing matmul. CR's documented golden (examples/test_npu_hc_pre.py) is an fp32
# F.linear checked at 0.5% relative tolerance; the AscendC kernel may run the Cube in HF32 (10-bit mantissa,
# truncation), which that tolerance admits (verify on the device). "fp32" follows the golden; "hf32" models the
# suspected kernel behaviour.
HC_PRE_MATMUL = "fp32"


# ---- mHC (A2/A3 custom ops) --------------------------------------------------------------------------------------
def npu_hc_pre(x: Tensor, hc_fn: Tensor, hc_scale: Tensor, hc_base: Tensor, *, hc_mult=4, hc_sinkhorn_iters=20,
               norm_eps=1e-6, hc_eps=1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """CR custom `npu_hc_pre` (CR op doc; examples/test_npu_hc_pre.py golden).

    x [T, n, d] or [B, S, n, d]; hc_fn fp32 [(2+n)n, n*d]; hc_scale fp32 [3]; hc_base fp32 [(2+n)n].
    xf = x flattened to [.., n*d] in fp32; r = rsqrt(mean(xf^2) + norm_eps); mixes = (xf @ hc_fn^T) * r in fp32
    as CR's golden does (HC_PRE_MATMUL = "hf32" instead truncates both operands to 10 mantissa bits, the
    suspected Cube behaviour (verify));
    pre = sigmoid(mix_pre*s0 + b_pre) + hc_eps; post = 2*sigmoid(mix_post*s1 + b_post);
    comb = softmax(mix_comb*s2 + b_comb, -1) + hc_eps, column-normalised (/(colsum + hc_eps)), then
    (iters-1) x [row-normalise, column-normalise]; y = sum_n pre[n] * x[n] in fp32 -> x.dtype.
    Returns (y [.., d] in x.dtype, post fp32 [.., n], comb fp32 [.., n, n]). The documented dtype of x is bf16
    (d = 4096, hc_mult = 4); the emulator also accepts fp32 and other sizes.
    """
    n = hc_mult
    if x.shape[-2] != n:
        raise ValueError(f"npu_hc_pre: x has {x.shape[-2]} streams, hc_mult is {n}")
    xf = x.flatten(-2).float()
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    fn = hc_fn.float()
    mix = ((hf32(xf) @ hf32(fn).t()) if HC_PRE_MATMUL == "hf32" else (xf @ fn.t())) * r
    s0, s1, s2 = hc_scale.float()
    base = hc_base.float()
    pre = torch.sigmoid(mix[..., :n] * s0 + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mix[..., n:2 * n] * s1 + base[n:2 * n])
    comb = (mix[..., 2 * n:] * s2 + base[2 * n:]).unflatten(-1, (n, n))
    comb = torch.softmax(comb, dim=-1) + hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    for _ in range(hc_sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
    y = (pre.unsqueeze(-1) * x.float()).sum(-2)
    return y.to(x.dtype), post, comb


def npu_hc_post(x: Tensor, residual: Tensor, post: Tensor, comb: Tensor) -> Tensor:
    """CR custom `npu_hc_post` (CR op doc): y[.., j, :] = post[j] * x + sum_m comb[m, j] * residual[.., m, :]
    (first comb index = input stream), fp32 math, output in x.dtype. x [T, d] or [B, S, d]; residual [.., n, d]."""
    out = post.float().unsqueeze(-1) * x.float().unsqueeze(-2)
    out = out + torch.einsum("...mj,...md->...jd", comb.float(), residual.float())
    return out.to(x.dtype)


# ---- KV compressor (custom, ops-transformer kernel) --------------------------------------------------------------
def compressor(x: Tensor, wkv: Tensor, wgate: Tensor, state_cache: Tensor, ape: Tensor, norm_weight: Tensor,
               rope_sin: Tensor, rope_cos: Tensor, rope_head_dim: int, cmp_ratio: int, *, state_block_table=None,
               cu_seqlens=None, seqused=None, start_pos=None, coff=1, norm_eps=1e-6, rotary_mode=1,
               cache_mode=1) -> Tensor:
    """Custom `compressor` (ops-transformer experimental Compressor doc). Mutates state_cache.

    x [B,S,H] (BSND, cu_seqlens None) or [T,H] (TND, cu_seqlens [B+1] prefix sums); batch b's tokens sit at
    positions start_pos[b] (default 0) + i, and only its first seqused[b] (default all) take part. Per token:
    kv = x wkv^T, score = x wgate^T + ape[p % cmp_ratio] (fp32 accumulate), stored in state_cache fp32
    [blocks, block_size, 2*coff*D] as [kv | score] at block state_block_table[b, p // block_size], row
    p % block_size; a 0 block means "do not touch" (not written). Tokens are written in position order; rows of
    positions before start_pos are read from the state as it was before the call. Window w of a batch closes
    when its last position w*r + r - 1 is among the new tokens; its entry softmax-pools per channel over the r
    slots of window w (coff 1) or (coff 2) over 2r slots: window w-1's kv/score channels [0, D) and window w's
    [D, 2D) (w = 0: the previous slots are absent, kv 0 / score -inf). Entry -> x.dtype (DeepSeek's reference
    rounds here before the norm (verify)) -> RMSNorm * norm_weight in fp32 (eps norm_eps) -> x.dtype (verify)
    -> interleaved RoPE on the last rope_head_dim dims, out = e*cos + rot(e)*sin with rot pairs (a, b) ->
    (-b, a), cos/sin taken as given (pair-repeated tables) from the entry's output row -> x.dtype.
    Output: BSND [B, ceil(S/r), D], batch b's closed entries from row 0; TND [min(T, T//r + B), D], every
    batch's closed entries packed in batch order. rope_sin/rope_cos have the output's shape with last dim
    rope_head_dim. Rows no entry fills are garbage on the device; here NaN, so a read of one shows.
    Device limits (not enforced here): x/wkv/wgate bf16 or fp16 (the emulator also takes fp32, for the tiny
    fp32 models); only C4A (D 512, coff 2, r 4), C4 indexer (D 128, coff 2, r 4) and C128A (D 512, coff 1,
    r 128); H 1K-10K, a multiple of 512; rope_head_dim 64; rotary_mode 2 (interleave) only; cache_mode 1 only on
    A3 (2 = ring buffer, 950 only). The emulator takes any D, H, ratio and rope_head_dim <= D. BSND runs as
    tensor code without host reads (graph capture; value checks only in eager calls); TND reads cu_seqlens.
    """
    if cache_mode != 1:
        raise NotImplementedError(f"compressor: cache_mode {cache_mode} not emulated (1 = paged state cache)")
    if rotary_mode != 2:
        raise NotImplementedError(f"compressor: rotary_mode {rotary_mode} not emulated (2 = interleave; the "
                                  "device supports 2 only)")
    if coff not in (1, 2):
        raise ValueError(f"compressor: coff must be 1 or 2, found {coff}")
    if state_block_table is None:
        raise NotImplementedError("compressor: state_block_table is required (paged state cache)")
    d, h, m = norm_weight.shape[0], x.shape[-1], cmp_ratio
    c = coff * d
    for name, w in (("wkv", wkv), ("wgate", wgate)):
        if tuple(w.shape) != (c, h):
            raise ValueError(f"compressor: {name} must be [coff*D, H] = {[c, h]}, found {list(w.shape)}")
    if tuple(ape.shape) != (m, c) or ape.dtype != torch.float32:
        raise ValueError(f"compressor: ape must be fp32 [cmp_ratio, coff*D] = {[m, c]}, found {ape.dtype} "
                         f"{list(ape.shape)}")
    if state_cache.dim() != 3 or state_cache.shape[-1] != 2 * c or state_cache.dtype != torch.float32:
        raise ValueError(f"compressor: state_cache must be fp32 [blocks, block_size, 2*coff*D = {2 * c}], found "
                         f"{state_cache.dtype} {list(state_cache.shape)}")
    if rope_head_dim % 2 or not 0 < rope_head_dim <= d:
        raise ValueError(f"compressor: rope_head_dim must be even and in (0, D = {d}], found {rope_head_dim}")
    if x.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError("compressor: x [B,S,H] (BSND) needs cu_seqlens=None")
        bsz, s = x.shape[0], x.shape[1]
        xb, lens = x, torch.full((bsz,), s, dtype=torch.int64, device=x.device)
        out_lead = (bsz, -(-s // m))
    elif x.dim() == 2:  # TND (prefill, eager): padded to [B, Smax, H] here, packed again at the end
        if cu_seqlens is None:
            raise ValueError("compressor: x [T,H] (TND) needs cu_seqlens [B+1]")
        cu = [int(v) for v in cu_seqlens.tolist()]
        bsz, t = len(cu) - 1, x.shape[0]
        s = max([e - a for a, e in zip(cu[:-1], cu[1:])] + [1])
        xb = torch.stack([F.pad(x[a:e], (0, 0, 0, s - (e - a))) for a, e in zip(cu[:-1], cu[1:])])
        lens = torch.tensor([e - a for a, e in zip(cu[:-1], cu[1:])], dtype=torch.int64, device=x.device)
        out_lead = (min(t, t // m + bsz),)
    else:
        raise ValueError(f"compressor: x must be [B,S,H] or [T,H], found {list(x.shape)}")
    if tuple(rope_sin.shape) != out_lead + (rope_head_dim,) or rope_cos.shape != rope_sin.shape:
        raise ValueError(f"compressor: rope_sin/rope_cos must be {list(out_lead) + [rope_head_dim]}, found "
                         f"{list(rope_sin.shape)} and {list(rope_cos.shape)}")
    dev, bs = x.device, state_cache.shape[1]
    start = torch.zeros(bsz, dtype=torch.int64, device=dev) if start_pos is None else start_pos.long()
    used = lens if seqused is None else seqused.long()
    table = state_block_table.long()
    if _checking_values():
        if bool(((used < 0) | (used > lens)).any()):
            raise ValueError(f"compressor: seqused {used.tolist()} must be in [0, tokens per batch {lens.tolist()}]")
        need = int(((start + used - 1).clamp(min=0) // bs).max()) + 1 if bsz else 0
        if need > table.shape[1]:
            raise ValueError(f"compressor: state_block_table has {table.shape[1]} columns, positions up to "
                             f"{int((start + used).max()) - 1} need {need} (block_size {bs})")
    ar_s = torch.arange(s, device=dev)
    pos = start.unsqueeze(1) + ar_s  # [B,S]
    xf = xb.float()
    new = torch.cat([xf @ wkv.float().t(), xf @ wgate.float().t() + ape[pos % m]], -1)  # [B,S,2c] fp32

    def addr(p: Tensor) -> tuple[Tensor, Tensor]:  # (block, row) of positions p [B,N] (p >= 0)
        return table.gather(1, (p // bs).clamp(max=table.shape[1] - 1)), p % bs

    # Entries: output row j of batch b is window w = start//r + j; it is closed when (w+1)*r <= start + used.
    n_out = -(-s // m)
    vpos = ((start // m - (coff - 1)) * m).unsqueeze(1) + torch.arange((n_out + coff - 1) * m, device=dev)  # [B,L]
    blk, row = addr(vpos.clamp(min=0))
    old = state_cache[blk, row]  # rows of earlier positions, read before this call writes anything
    rows = torch.where((vpos < start.unsqueeze(1)).unsqueeze(-1), old,
                       new.gather(1, (vpos - start.unsqueeze(1)).clamp(0, s - 1).unsqueeze(-1).expand(-1, -1, 2 * c)))
    absent = (vpos < 0).unsqueeze(-1)
    kv = rows[..., :c].masked_fill(absent, 0.0).unflatten(1, (-1, m))  # [B, windows (+1), r, c]
    sc = rows[..., c:].masked_fill(absent, float("-inf")).unflatten(1, (-1, m))
    if coff == 2:  # window w: window w-1's channels [0, D), then its own [D, 2D)
        kv = torch.cat([kv[:, :-1, :, :d], kv[:, 1:, :, d:]], 2)
        sc = torch.cat([sc[:, :-1, :, :d], sc[:, 1:, :, d:]], 2)
    e = (torch.softmax(sc, 2) * kv).sum(2).to(x.dtype).float()  # [B, n_out, D]
    e = (e * torch.rsqrt(e.square().mean(-1, keepdim=True) + norm_eps) * norm_weight.float()).to(x.dtype).float()
    closed = torch.arange(n_out, device=dev) < ((start % m + used) // m).unsqueeze(1)  # [B, n_out]
    if x.dim() == 2:  # TND: batch b's closed entries packed after those of batches < b
        first = torch.cumsum(closed.sum(1), 0) - closed.sum(1)
        dest = torch.where(closed, first.unsqueeze(1) + torch.arange(n_out, device=dev), out_lead[0])
        cos = F.pad(rope_cos.float(), (0, 0, 0, 1))[dest]
        sin = F.pad(rope_sin.float(), (0, 0, 0, 1))[dest]
    else:
        cos, sin = rope_cos.float(), rope_sin.float()
    tail = e[..., d - rope_head_dim:]
    rot = torch.stack([-tail[..., 1::2], tail[..., 0::2]], -1).flatten(-2)
    e = torch.cat([e[..., :d - rope_head_dim], tail * cos + rot * sin], -1).to(x.dtype)
    e = e.masked_fill(~closed.unsqueeze(-1), float("nan"))  # rows no entry fills: NaN (garbage on the device)
    if x.dim() == 2:
        out = torch.full((out_lead[0] + 1, d), float("nan"), dtype=x.dtype, device=dev)
        out[dest] = e  # unclosed rows all go to the dump row out_lead[0]
        out = out[:-1]
    else:
        out = e
    # State: every taking-part token's row at its (block, row) unless the block is 0, in position order (a later
    # position with the same address wins: every writer of an address writes that final value, so the scatter is
    # deterministic whatever order it runs in).
    wblk, wrow = addr(pos)
    writes = (ar_s < used.unsqueeze(1)) & (wblk != 0)  # [B,S]
    key = wblk * bs + wrow
    same = (key.unsqueeze(2) == key.unsqueeze(1)) & writes.unsqueeze(1)  # [B, i, j]: j writes i's address
    last = torch.where(same, ar_s.view(1, 1, -1), -1).amax(-1)  # [B,S] last writer of each address, -1 = none
    final = torch.where((last >= 0).unsqueeze(-1), new.gather(1, last.clamp(min=0).unsqueeze(-1).expand(-1, -1, 2 * c)),
                        state_cache[wblk, wrow])
    state_cache[wblk, wrow] = final
    return out
