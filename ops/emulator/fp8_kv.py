"""Emulated FP8 KV-cache ops (cann-recipes-infer custom ops, Ascend 950): the KV / indexer compress epilogues
(quantise + pack + scatter into the cache) and the FP8-KV shared-KV sparse attention that reads those rows.

C8 row (CR `kv_compress_epilog` quant_mode 2 golden, examples/test_npu_kv_compress_epilog.py), d = 512 ->
640 bytes: [64 rope values as raw bf16 (128 B) | 448 nope values as e4m3 (448 B) | 7 e8m0 scales, one per 64 nope
values (7 B) | zero padding to a multiple of 128]. The kernel reads the same bytes (`npu_kv_quant_sparse_attn_sharedkv`
with kv_quant_mode 1, tile_size 64, rope_head_dim 64, as CR's V4 recipe calls it).
"""
from __future__ import annotations

import torch
from torch import Tensor

from dsv4_ascend import quant as _quant
from dsv4_ascend.cache import c8_unpack

from .attention import npu_sparse_attn_sharedkv

_FP8_MAX = 448.0
_AMAX_FLOOR = 1e-4  # the epilogue's round_scale rule floors amax at 1e-4 (CR golden)


def _rows_u8(cache: Tensor, what: str) -> Tensor:
    if cache.dtype not in (torch.uint8, torch.int8, torch.float8_e4m3fn):
        raise TypeError(f"{what}: the C8 cache must be float8_e4m3fn (or its uint8 / int8 bytes), found {cache.dtype}")
    return cache.view(torch.uint8)


def kv_compress_epilog(kv_compress_cache: Tensor, x: Tensor, slot_mapping: Tensor, *, quant_group_size=64,
                       quant_mode=2, round_scale_flag=True, scale=1.0) -> None:
    """CR custom `kv_compress_epilog` (ops/ascendc/docs/custom-npu_kv_compress_epilog.md), quant_mode 2.

    x [T, d] bf16 split into d-64 nope + 64 rope; per 64 nope values s = 2^ceil(log2(max(amax, 1e-4) * fp32(1/448)))
    (the golden multiplies by the fp32 reciprocal, then rounds the exponent up when the mantissa is non-zero:
    round_scale_flag; DeepSeek's act_quant divides by 448, which can differ only when the two land on either side of
    a power of two, ~2^-23 of random groups), q = e4m3(clamp(x / s, +-448))
    nearest-even; row slot_mapping[t] of kv_compress_cache [R, d'] (float8_e4m3fn bytes) <- [rope bf16 bytes |
    q | e8m0(s) | unchanged padding]; slot -1 skipped. Only quant_mode 2, group 64, round_scale_flag True and
    scale 1.0 (the recipe's call) are emulated; d = 512 is documented and not enforced (model width).
    """
    if quant_mode != 2 or quant_group_size != 64 or not round_scale_flag or scale != 1.0:
        raise NotImplementedError("kv_compress_epilog: only quant_mode=2, quant_group_size=64, round_scale_flag=True, "
                                  "scale=1.0 are emulated")
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"kv_compress_epilog: x must be [T, d] bf16, found {list(x.shape)} {x.dtype}")
    cache = _rows_u8(kv_compress_cache, "kv_compress_epilog")
    rope, nope = 64, x.shape[1] - 64
    if nope <= 0 or nope % 64:
        raise ValueError(f"kv_compress_epilog: x's width minus 64 rope values must be a positive multiple of 64, "
                         f"found {x.shape[1]}")
    rb = rope * x.element_size()
    used = rb + nope + nope // 64
    if cache.dim() != 2 or cache.shape[1] < used:
        raise ValueError(f"kv_compress_epilog: cache must be [R, >= {used}] bytes, found {list(cache.shape)}")
    xb = x[:, :nope].float().unflatten(-1, (-1, 64))
    ratio = xb.abs().amax(-1).clamp_min(_AMAX_FLOOR) * torch.tensor(1.0 / _FP8_MAX, dtype=torch.float32)
    mant, exp = torch.frexp(ratio)  # ratio = mant * 2^exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp)  # 2^(e) = ratio rounded up to a power of two
    s = torch.ldexp(torch.ones_like(ratio), e)
    q = _quant.cast_fp8_saturate((xb / s.unsqueeze(-1)).clamp(-_FP8_MAX, _FP8_MAX), torch.float8_e4m3fn)
    packed = torch.cat([x[:, nope:].contiguous().view(torch.uint8), q.flatten(-2).view(torch.uint8),
                        (e + 127).to(torch.uint8)], -1)
    rows = slot_mapping.reshape(-1).long()
    keep = rows >= 0
    cache[rows[keep], :used] = packed[keep]


def indexer_compress_epilog(indexer_compress_cache: Tensor, indexer_compress_scale: Tensor, x: Tensor,
                            slot_mapping: Tensor, *, quant_mode=1, round_scale=True, scale=1.0) -> None:
    """CR custom `indexer_compress_epilog` (custom-npu_indexer_compress_epilog.md), quant_mode 1: per 128 values
    of x [T, d] (bf16 / fp16), s = amax / 448 in fp32 (the DynamicQuant of the doc; an all-zero group keeps s = 0
    and q = 0), q = e4m3(x / s) nearest-even saturating; cache[slot] <- q, scale[slot] <- s (fp32 [R, d/128]);
    slot -1 skipped. quant_mode 0 (MX) is not emulated; d = 4096 (documented) is not enforced."""
    if quant_mode != 1 or scale != 1.0:
        raise NotImplementedError("indexer_compress_epilog: only quant_mode=1 (fp32 scales) with scale=1.0 is "
                                  "emulated")
    if x.dim() != 2 or x.shape[1] % 128:
        raise ValueError(f"indexer_compress_epilog: x must be [T, d] with d a multiple of 128, found {list(x.shape)}")
    if indexer_compress_scale.dtype != torch.float32:
        raise TypeError("indexer_compress_epilog: quant_mode 1 writes fp32 scales, found "
                        f"{indexer_compress_scale.dtype}")
    xb = x.float().unflatten(-1, (-1, 128))
    s = xb.abs().amax(-1) / _FP8_MAX
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = _quant.cast_fp8_saturate((xb / safe.unsqueeze(-1)).clamp(-_FP8_MAX, _FP8_MAX), torch.float8_e4m3fn)
    rows = slot_mapping.reshape(-1).long()
    keep = rows >= 0
    indexer_compress_cache.view(torch.uint8)[rows[keep]] = q.flatten(-2).view(torch.uint8)[keep]
    indexer_compress_scale[rows[keep]] = s[keep]


def _dequant_rows(cache: Tensor, d: int, rope: int, tile: int, dtype: torch.dtype) -> Tensor:
    """C8 paged cache [blocks, bs, 1, row_bytes] -> [blocks, bs, 1, d] in dtype: [nope e4m3 * 2^(e8m0 - 127) |
    rope] (the row's logical order: rope last, as in q); the cache's own decoder (the same byte layout)."""
    return c8_unpack(_rows_u8(cache, "npu_kv_quant_sparse_attn_sharedkv"), d, rope, dtype, tile)


def npu_kv_quant_sparse_attn_sharedkv(q: Tensor, kv_quant_mode: int, *, ori_kv=None, cmp_kv=None,
                                      ori_sparse_indices=None, cmp_sparse_indices=None, ori_block_table=None,
                                      cmp_block_table=None, cu_seqlens_q=None, cu_seqlens_ori_kv=None,
                                      cu_seqlens_cmp_kv=None, seqused_q=None, seqused_kv=None, sinks=None,
                                      metadata=None, tile_size=0, rope_head_dim=0, softmax_scale=0, cmp_ratio=0,
                                      ori_mask_mode=4, cmp_mask_mode=3, ori_win_left=127, ori_win_right=0,
                                      layout_q="BSND", layout_kv="PA_ND",
                                      return_softmax_lse=False) -> tuple[Tensor, Tensor]:
    """CR custom `npu_kv_quant_sparse_attn_sharedkv` (schema: ops_def_registration.cpp; CR's V4 recipe passes
    kv_quant_mode=1, tile_size=64, rope_head_dim=64): `npu_sparse_attn_sharedkv` over caches of C8 rows
    [blocks, block_size, 1, row_bytes] (float8_e4m3fn bytes, module docstring). Each key is read as
    [nope e4m3 * 2^(scale byte - 127) | rope in q's dtype] (exact in bf16), then the same band / compressed masks,
    sink and fp32 softmax as the bf16 kernel; q [T, N1, D] with D = nope + rope. Which dequantised order the
    kernel uses inside (dequantise then one fp32 dot, or per-tile partial dots scaled after) is not documented;
    both are the same math up to fp32 summation order (verify). Only kv_quant_mode 1 is emulated.
    """
    if kv_quant_mode != 1:
        raise NotImplementedError(f"npu_kv_quant_sparse_attn_sharedkv: kv_quant_mode {kv_quant_mode} not emulated "
                                  "(1: FP8 e4m3 nope + e8m0 tile scales + rope)")
    d = q.shape[-1]
    if tile_size <= 0 or rope_head_dim <= 0 or (d - rope_head_dim) % tile_size:
        raise ValueError(f"npu_kv_quant_sparse_attn_sharedkv: tile_size ({tile_size}) must divide D - rope_head_dim "
                         f"({d} - {rope_head_dim}), both positive")
    kw = dict(ori_sparse_indices=ori_sparse_indices, cmp_sparse_indices=cmp_sparse_indices,
              ori_block_table=ori_block_table, cmp_block_table=cmp_block_table, cu_seqlens_q=cu_seqlens_q,
              cu_seqlens_ori_kv=cu_seqlens_ori_kv, cu_seqlens_cmp_kv=cu_seqlens_cmp_kv, seqused_q=seqused_q,
              seqused_kv=seqused_kv, sinks=sinks, metadata=metadata, softmax_scale=softmax_scale, cmp_ratio=cmp_ratio,
              ori_mask_mode=ori_mask_mode, cmp_mask_mode=cmp_mask_mode, ori_win_left=ori_win_left,
              ori_win_right=ori_win_right, layout_q=layout_q, layout_kv=layout_kv,
              return_softmax_lse=return_softmax_lse)
    deq = [None if kv is None else _dequant_rows(kv, d, rope_head_dim, tile_size, q.dtype) for kv in (ori_kv, cmp_kv)]
    return npu_sparse_attn_sharedkv(q, ori_kv=deq[0], cmp_kv=deq[1], **kw)


def npu_kv_quant_sparse_attn_sharedkv_metadata(num_heads_q, num_heads_kv, head_dim, kv_quant_mode, *,
                                               cu_seqlens_q=None, cu_seqlens_ori_kv=None, cu_seqlens_cmp_kv=None,
                                               seqused_q=None, seqused_kv=None, batch_size=0, max_seqlen_q=0,
                                               max_seqlen_kv=0, ori_topk=0, cmp_topk=0, tile_size=0,
                                               rope_head_dim=0, cmp_ratio=-1, ori_mask_mode=4, cmp_mask_mode=3,
                                               ori_win_left=127, ori_win_right=0, layout_q="BSND",
                                               layout_kv="PA_ND", has_ori_kv=True, has_cmp_kv=True,
                                               device="npu:0") -> Tensor:
    """CR custom AICPU tiling op: carries no math, so the emulator returns an int32 [1024] placeholder."""
    return torch.zeros(1024, dtype=torch.int32)
