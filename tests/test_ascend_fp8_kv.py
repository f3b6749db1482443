"""The FP8 KV-cache ops (emulated): the KV / indexer compress epilogues, the FP8-KV shared-KV sparse attention and
the FP8 lightning indexer against float64 / Python loops written from their documented contracts (CR op docs and
goldens), and the cache's C8 rows (dsv4_ascend/cache.py) in the layout those ops read."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsv4_ascend import quant
from dsv4_ascend.cache import c8_pack, c8_row_bytes, c8_unpack
from dsv4_ascend.ops import emulator as E
from test_ascend_attention import _dense_attention, _paged


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _e4m3(v: float) -> float:
    """Round to float8 e4m3fn, nearest-even (3 mantissa bits, subnormal step 2^-9), |v| <= 448 given."""
    if v == 0:
        return 0.0
    m, ex = math.frexp(abs(v))  # |v| = m * 2^ex, m in [0.5, 1)
    step = 2.0 ** (max(ex - 1, -6) - 3)
    return math.copysign(min(round(abs(v) / step) * step, 448.0), v)


def _epilog_row(x: list[float], rope: int) -> tuple[list[float], list[int], list[float]]:
    """One row by the kv_compress_epilog golden: (dequantised nope values, e8m0 bytes, rope values)."""
    nope = len(x) - rope
    vals, scales = [], []
    for g in range(0, nope, 64):
        grp = x[g:g + 64]
        amax = np.float32(max(max(abs(v) for v in grp), 1e-4))
        ratio = float(np.float32(amax * (np.float32(1.0) / np.float32(448.0))))  # the golden's fp32 product
        m, ex = math.frexp(ratio)
        e = ex - 1 if m == 0.5 else ex  # exponent rounded up unless exact
        s = 2.0 ** e
        scales.append(e + 127)
        vals += [_e4m3(max(-448.0, min(448.0, v / s))) * s for v in grp]
    return vals, scales, x[nope:]


# ---- kv_compress_epilog + the cache's C8 rows --------------------------------------------------------------------
def test_kv_compress_epilog_vs_golden_loop_and_cache_rows():
    t, d, rope = 7, 512, 64
    x = (torch.randn(t, d, generator=_g(0)) * torch.logspace(-6, 3, t).unsqueeze(1)).to(torch.bfloat16)
    x[3, :64] = 0  # amax floor
    slots = torch.tensor([4, -1, 0, 6, 2, -1, 5])
    cache = torch.full((8, 640), 0x5A, dtype=torch.uint8).view(torch.float8_e4m3fn)
    E.kv_compress_epilog(cache, x, slots)
    u8 = cache.view(torch.uint8)
    assert c8_row_bytes(d, rope, torch.bfloat16) == 640
    for r, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        vals, scales, rope_vals = _epilog_row(x[r].float().tolist(), rope)
        row = u8[slot]
        assert torch.equal(row[:128].view(torch.bfloat16).float(), torch.tensor(rope_vals))
        deq = row[128:576].view(torch.float8_e4m3fn).float().view(7, 64) * torch.exp2(row[576:583].float() - 127)[:, None]
        assert row[576:583].tolist() == scales
        assert torch.equal(deq.flatten(), torch.tensor(vals, dtype=torch.float32))
        assert (row[583:] == 0x5A).all()  # padding untouched
        # the cache's own packing (DeepSeek's act_quant rule) gives the same bytes here, and reads back the values
        assert torch.equal(c8_pack(x[r], rope, torch.bfloat16)[:583], row[:583])
        back = c8_unpack(row, d, rope, torch.bfloat16).float()
        assert torch.equal(back, torch.tensor(vals + rope_vals).to(torch.bfloat16).float())
    assert (u8[[1, 3, 7]] == 0x5A).all()  # rows no slot names


def test_c8_unpack_equals_deepseek_fp8_simulation():
    x = torch.randn(3, 5, 192, generator=_g(1)) * 3
    for dt in (torch.float32, torch.bfloat16):
        rows = c8_pack(x.to(dt), 64, dt)
        assert rows.dtype == torch.uint8 and rows.shape[-1] == c8_row_bytes(192, 64, dt)
        exp = torch.cat([quant.fp8_sim(x.to(dt).float()[..., :128], 64), x.to(dt).float()[..., 128:]], -1)
        assert torch.equal(c8_unpack(rows, 192, 64, dt).float(), exp.to(dt).float())


def test_epilogues_reject_what_they_do_not_emulate():
    x = torch.randn(2, 512).bfloat16()
    cache = torch.zeros(2, 640, dtype=torch.float8_e4m3fn)
    with pytest.raises(NotImplementedError, match="quant_mode=2"):
        E.kv_compress_epilog(cache, x, torch.tensor([0, 1]), quant_mode=1)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        E.kv_compress_epilog(torch.zeros(2, 640), x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="bytes"):
        E.kv_compress_epilog(torch.zeros(2, 500, dtype=torch.uint8), x, torch.tensor([0, 1]))
    with pytest.raises(NotImplementedError, match="quant_mode=1"):
        E.indexer_compress_epilog(torch.zeros(2, 128, dtype=torch.float8_e4m3fn), torch.zeros(2, 1),
                                  x[:, :128], torch.tensor([0, 1]), quant_mode=0)


# ---- npu_kv_quant_sparse_attn_sharedkv -----------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["swa", "hca", "csa"])
def test_kv_quant_sparse_attn_vs_dense_float64(scenario):
    h, d, rope, ratio, block = 3, 128, 64, 4, 16
    kv_len, q_counts = [9, 30, 17], [4, 1, 6]
    t = sum(q_counts)
    ori = [torch.randn(n, d, generator=_g(10 + i)).bfloat16() for i, n in enumerate(kv_len)]
    cmp = [torch.randn(n // ratio + 1, d, generator=_g(20 + i)).bfloat16() for i, n in enumerate(kv_len)]

    def c8_paged(rows, cols, seed):
        """C8 pages written by the epilogue; the dense reference gets the rows decoded by the golden loop."""
        packed = [torch.zeros(r.shape[0], 640, dtype=torch.uint8) for r in rows]
        for r, p in zip(rows, packed):
            E.kv_compress_epilog(p, r, torch.arange(r.shape[0]))
        cache, table = _paged([p.view(torch.int16) for p in packed], block, cols, seed)  # 2-byte rows: exact moves
        dec = []
        for r in rows:
            out = []
            for row in r.float().tolist():
                vals, _, rv = _epilog_row(row, rope)
                out.append(vals + rv)
            dec.append(torch.tensor(out, dtype=torch.float64))
        return cache.view(torch.uint8).view(torch.float8_e4m3fn), table, dec

    ori_cache, ori_table, ori_dec = c8_paged(ori, 4, 30)
    cmp_cache, cmp_table, cmp_dec = c8_paged(cmp, 1, 31)
    q = torch.randn(t, h, d, generator=_g(32)).bfloat16()
    sinks = torch.randn(h, generator=_g(33))
    cu = torch.tensor([0] + list(torch.tensor(q_counts).cumsum(0)), dtype=torch.int32)
    picks = torch.stack([torch.randperm(9, generator=_g(34 + r))[:5] for r in range(t)]).int()
    kw = dict(ori_kv=ori_cache, ori_block_table=ori_table, cu_seqlens_q=cu, sinks=sinks, softmax_scale=0.1,
              seqused_kv=torch.tensor(kv_len, dtype=torch.int32), ori_win_left=6, layout_q="TND",
              tile_size=64, rope_head_dim=rope, metadata=E.npu_kv_quant_sparse_attn_sharedkv_metadata(h, 1, d, 1))
    if scenario != "swa":
        kw.update(cmp_kv=cmp_cache, cmp_block_table=cmp_table, cmp_ratio=ratio)
    if scenario == "csa":
        kw.update(cmp_sparse_indices=picks.view(t, 1, 5))
    out, _ = E.npu_kv_quant_sparse_attn_sharedkv(q, 1, **kw)
    exp = _dense_attention(q, ori_dec, None if scenario == "swa" else cmp_dec, kv_len, q_counts, 6, 0, ratio,
                           picks if scenario == "csa" else None, sinks, 0.1)
    # The decoded keys are exact in bf16 (e4m3 x 2^k); fp32 softmax / accumulation, then one bf16 rounding of the
    # output: half an ulp (2^-8 relative) plus fp32 summation-order noise.
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.double(), exp, rtol=2 ** -8, atol=1e-5)
    with pytest.raises(NotImplementedError, match="kv_quant_mode"):
        E.npu_kv_quant_sparse_attn_sharedkv(q, 0, **kw)


# ---- FP8 lightning indexer (950) -----------------------------------------------------------------------------------
def test_indexer_compress_epilog_and_fp8_quant_indexer_vs_float64():
    t, h, di, n, k = 5, 3, 128, 40, 8
    keys = torch.randn(n, di, generator=_g(40)).bfloat16()
    cache = torch.zeros(48, di, dtype=torch.float8_e4m3fn)
    scale = torch.zeros(48, 1)
    perm = torch.randperm(48, generator=_g(41))[:n].int()
    E.indexer_compress_epilog(cache, scale, keys, perm)
    for r in range(n):  # DynamicQuant per 128 values: s = amax / 448 (fp32), q = e4m3(x / s)
        row = keys[r].float().tolist()
        s = float(np.float32(np.float32(max(abs(v) for v in row)) / np.float32(448.0)))
        assert scale[perm[r], 0].item() == s
        exp = [_e4m3(float(np.float32(np.float32(v) / np.float32(s)))) for v in row]
        assert cache[perm[r]].float().tolist() == exp
    # the FP8 indexer over that cache, paged through a table (16 rows per block)
    q = torch.randn(t, h, di, generator=_g(42))
    qf, qs = E.npu_dynamic_block_quant(q.view(t * h, di), dst_type=torch.float8_e4m3fn)
    w = torch.randn(t, h, generator=_g(43))
    kv_len = torch.tensor([n - 6, n], dtype=torch.int32)
    paged = torch.zeros(48, di, dtype=torch.float8_e4m3fn)
    pscale = torch.zeros(48, 1)
    paged[:n], pscale[:n] = cache[perm.long()], scale[perm.long()]
    table = torch.tensor([[0, 1, 2], [0, 1, 2]], dtype=torch.int32)
    idx = E.npu_quant_lightning_indexer(qf.view(t, h, di), paged.view(3, 16, 1, di), w, qs.view(t, h),
                                        pscale.view(3, 16, 1), 0, 0, actual_seq_lengths_query=torch.tensor([2, 5]),
                                        actual_seq_lengths_key=kv_len, block_table=table, layout_query="TND",
                                        layout_key="PA_BSND", sparse_count=k, sparse_mode=3)
    assert idx.shape == (t, 1, k) and idx.dtype == torch.int32
    qd = qf.view(t, h, di).double() * qs.view(t, h, 1).double()
    kd = paged[:n].double() * pscale[:n].double()
    for r, (b, i, sq) in enumerate([(0, 0, 2), (0, 1, 2), (1, 0, 3), (1, 1, 3), (1, 2, 3)]):
        pos = kv_len[b].item() - sq + i
        scores = [(sum(w[r, hh].item() * max((qd[r, hh] @ kd[j]).item(), 0.0) for hh in range(h)), j)
                  for j in range(pos + 1)]
        best = sorted(scores, key=lambda sj: (-sj[0], sj[1]))[:k]
        assert set(idx[r, 0].tolist()) == {j for _, j in best}
    with pytest.raises(TypeError, match="int8.*float8_e4m3fn"):
        E.npu_quant_lightning_indexer(qf.view(t, h, di), paged.view(3, 16, 1, di).view(torch.int8), w,
                                      qs.view(t, h), pscale.view(3, 16, 1), 0, 0, actual_seq_lengths_key=kv_len,
                                      block_table=table, layout_key="PA_BSND")
