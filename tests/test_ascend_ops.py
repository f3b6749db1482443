"""Each emulated torch_npu / custom op against an independent plain-torch (or plain-Python) computation.

The expected values are written from the documented formulas in a different form than the emulator uses
(complex multiplication for RoPE, per-row Python loops for routing and quantisation, dense float64 math,
brute-force key lists for the indexer and attention), so a shared misunderstanding would have to be made twice.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

from dsv4_ascend.ops import emulator as E


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- import hygiene -------------------------------------------------------------------------------------------------
def test_import_does_not_load_torch_npu():
    import dsv4_ascend.ops as ops

    assert "torch_npu" not in sys.modules
    ok, why = ops.npu_available()
    assert not ok and why  # no NPU on CI: a reason, never an exception


# ---- norm and rope --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(dtype):
    x = torch.randn(3, 5, 64, generator=_g(0)).to(dtype)
    gamma = (1 + 0.1 * torch.randn(64, generator=_g(1))).to(dtype)
    y, rstd = E.npu_rms_norm(x, gamma, 1e-6)
    xd = x.double()
    exp_rstd = 1 / torch.sqrt((xd * xd).sum(-1, keepdim=True) / 64 + 1e-6)
    exp = (xd * exp_rstd * gamma.double()).to(dtype)
    assert y.dtype == dtype and rstd.dtype == torch.float32 and rstd.shape == (3, 5, 1)
    assert torch.allclose(rstd.double(), exp_rstd, rtol=1e-6)
    # one rounding of an fp32 value: at most one ulp of the output dtype apart from the fp64 truth's rounding
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -22
    assert ((y.double() - exp.double()).abs() <= ulp * exp.double().abs() + 1e-30).all()
    with pytest.raises(TypeError):
        E.npu_rms_norm(x, gamma.float() if dtype != torch.float32 else gamma.double(), 1e-6)


def test_rotary_mul_interleave_is_complex_multiplication():
    x = torch.randn(2, 3, 4, 16, generator=_g(2))
    ang = torch.randn(1, 3, 1, 8, generator=_g(3))
    c = ang.cos().repeat_interleave(2, -1)
    s = ang.sin().repeat_interleave(2, -1)
    y = E.npu_rotary_mul(x, c, s, rotary_mode="interleave")
    z = torch.view_as_complex(x.double().reshape(2, 3, 4, 8, 2).contiguous()) * torch.polar(
        torch.ones_like(ang.double()), ang.double())
    assert torch.allclose(y.double(), torch.view_as_real(z).flatten(-2), atol=1e-6)


def test_rotary_mul_half():
    x = torch.randn(1, 2, 3, 8, generator=_g(4))
    r1, r2 = torch.randn(1, 2, 1, 8, generator=_g(5)), torch.randn(1, 2, 1, 8, generator=_g(6))
    y = E.npu_rotary_mul(x, r1, r2)
    for i in range(8):
        rot = -x[..., i + 4] if i < 4 else x[..., i - 4]
        assert torch.allclose(y[..., i], r1[..., i] * x[..., i] + r2[..., i] * rot, atol=1e-6)


def test_inplace_partial_rotary_mul_touches_only_the_slice():
    x = torch.randn(2, 3, 1, 24, generator=_g(7)).to(torch.bfloat16)
    x0 = x.clone()
    ang = torch.randn(2, 3, 1, 4, generator=_g(8))  # fp32 tables with bf16 x: documented mixed precision
    c, s = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
    assert E.inplace_partial_rotary_mul(x, c, s, rotary_mode="interleave", partial_slice=[16, 24]) is None
    assert torch.equal(x[..., :16], x0[..., :16])
    z = torch.view_as_complex(x0[..., 16:].double().reshape(2, 3, 1, 4, 2).contiguous()) * torch.polar(
        torch.ones_like(ang.double()), ang.double())
    assert torch.equal(x[..., 16:], torch.view_as_real(z).flatten(-2).to(torch.bfloat16))


# ---- dense GEMMs ------------------------------------------------------------------------------------------------------
def test_transpose_batchmatmul_perms():
    t, g, k, n = 5, 3, 4, 6
    x = torch.randn(t, g, k, generator=_g(9))
    w = torch.randn(g, n, k, generator=_g(10))  # stored [G, N, K]; perm_x2 (0, 2, 1) reads it as [G, K, N]
    y = E.npu_transpose_batchmatmul(x, w, perm_x1=(1, 0, 2), perm_x2=(0, 2, 1), perm_y=(1, 0, 2))
    exp = torch.empty(t, g, n, dtype=torch.float64)
    for i in range(t):
        for j in range(g):
            exp[i, j] = w[j].double() @ x[i, j].double()
    assert y.shape == (t, g, n) and torch.allclose(y.double(), exp, atol=1e-5)


def test_dynamic_quant_rounding_saturation_and_zero_rows():
    # amax 127 -> scale exactly 1, so x/scale = x: ties must go to even.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.49, -127.0],
                      [0.0] * 8])
    y, s = E.npu_dynamic_quant(x)
    assert y.dtype == torch.int8 and s.dtype == torch.float32
    assert y[0].tolist() == [127, 0, 2, 2, -2, 0, 3, -127]
    assert s.tolist() == [1.0, 0.0] and y[1].tolist() == [0] * 8
    r = torch.randn(6, 33, generator=_g(11)).to(torch.bfloat16)
    y, s = E.npu_dynamic_quant(r)
    for i in range(6):
        row = [float(v) for v in r[i].float()]
        amax = max(abs(v) for v in row)
        si = torch.tensor(amax, dtype=torch.float32) / 127  # the fp32 scale the doc defines
        assert s[i].item() == si.item()
        exp = [max(-128, min(127, round(float(torch.tensor(v) / si)))) for v in row]  # Python round = half-even
        assert y[i].tolist() == exp


def test_quant_matmul_int32_exact_and_dequant():
    m, k, n = 3, 4096, 5
    a = torch.randint(-128, 128, (m, k), generator=_g(12), dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=_g(13), dtype=torch.int8)
    b[:, 0] = -128
    a[0] = -128  # 4096 * 16384 = 2^26: beyond fp32's exact range, exact in int32
    acc = E.npu_quant_matmul(a, b, torch.ones(n), output_dtype=torch.int32)
    exp = (a.long().unsqueeze(-1) * b.long().unsqueeze(0)).sum(1)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), exp)
    ws, ts = torch.rand(n, generator=_g(14)) + 0.5, torch.rand(m, generator=_g(15)) + 0.5
    y = E.npu_quant_matmul(a, b, ws, pertoken_scale=ts, output_dtype=torch.bfloat16)
    exp_y = (exp.double() * ws.double() * ts.double().unsqueeze(-1))
    assert y.dtype == torch.bfloat16
    assert ((y.double() - exp_y).abs() <= 2 ** -8 * exp_y.abs() + 1e-6).all()


# ---- grouped matmul and routing -------------------------------------------------------------------------------------
def test_grouped_matmul_counts_cumsum_and_tail():
    counts = torch.tensor([2, 0, 3, 1])
    m = 8  # two tail rows past sum(counts) = 6
    x = torch.randn(m, 5, generator=_g(16))
    w = torch.randn(4, 5, 7, generator=_g(17))
    out_c = E.npu_grouped_matmul([x], [w], group_list=counts, group_list_type=1, split_item=3, group_type=0)[0]
    out_s = E.npu_grouped_matmul([x], [w], group_list=counts.cumsum(0), group_list_type=0, split_item=3,
                                 group_type=0)[0]
    owner = [0, 0, 2, 2, 2, 3]
    for r, e in enumerate(owner):
        assert torch.allclose(out_c[r].double(), x[r].double() @ w[e].double(), atol=1e-5)
    assert torch.equal(out_c[:6], out_s[:6])
    assert torch.isnan(out_c[6:]).all()  # untouched tail is flagged, never silently zero
    with pytest.raises(ValueError):
        E.npu_grouped_matmul([x], [w], group_list=torch.tensor([2, 1, 3, 4]), group_list_type=0, split_item=3)


def test_grouped_matmul_int8():
    counts = torch.tensor([3, 2])
    x = torch.randint(-128, 128, (5, 64), generator=_g(18), dtype=torch.int8)
    w = torch.randint(-127, 128, (2, 64, 6), generator=_g(19), dtype=torch.int8)
    acc = E.npu_grouped_matmul([x], [w], group_list=counts, group_list_type=1, split_item=3,
                               output_dtype=torch.int32)[0]
    ws = torch.rand(2, 6, generator=_g(20)) + 0.5
    pts = torch.rand(5, generator=_g(21)) + 0.5
    y = E.npu_grouped_matmul([x], [w], scale=[ws], per_token_scale=[pts], group_list=counts, group_list_type=1,
                             split_item=3, output_dtype=torch.bfloat16)[0]
    for r in range(5):
        e = 0 if r < 3 else 1
        exact = (x[r].long().unsqueeze(-1) * w[e].long()).sum(0)
        assert torch.equal(acc[r].long(), exact)
        ref = exact.double() * ws[e].double() * pts[r].double()
        assert ((y[r].double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-6).all()


def test_init_routing_v2_and_finalize_roundtrip():
    t, k, e, h = 7, 3, 5, 4
    x = torch.randn(t, h, generator=_g(22))
    ids = torch.stack([torch.randperm(e, generator=_g(100 + i))[:k] for i in range(t)]).int()
    ex, row_idx, counts, _ = E.npu_moe_init_routing_v2(x, ids, active_num=t * k, expert_num=e,
                                                       expert_tokens_num_type=1, expert_tokens_num_flag=True)
    assert ex.shape == (t * k, h) and row_idx.dtype == torch.int32 and counts.dtype == torch.int64
    assert counts.tolist() == [int((ids == j).sum()) for j in range(e)]
    # scatter form: source copy (i, j) flattened token-major lands on row row_idx[i*k + j]
    for i in range(t):
        for j in range(k):
            assert torch.equal(ex[row_idx[i * k + j]], x[i])
    # rows are grouped by expert in ascending order, and within an expert by source order (stable)
    dst_expert = torch.empty(t * k, dtype=torch.long)
    dst_expert[row_idx.long()] = ids.reshape(-1).long()
    assert (dst_expert[1:] >= dst_expert[:-1]).all()
    _, _, cums, _ = E.npu_moe_init_routing_v2(x, ids, expert_num=e, expert_tokens_num_type=0,
                                              expert_tokens_num_flag=True)
    assert cums.tolist() == counts.cumsum(0).tolist()
    # finalize undoes it: a per-expert transform then a weighted sum per token
    scale_e = torch.arange(1, e + 1, dtype=torch.float32)
    rows = ex * scale_e[dst_expert].unsqueeze(-1)
    w = torch.rand(t, k, generator=_g(23))
    skip = torch.randn(t, h, generator=_g(24))
    out = E.npu_moe_finalize_routing(rows, skip, None, None, w, row_idx, ids, drop_pad_mode=2)
    for i in range(t):
        exp = skip[i] + sum(w[i, j] * scale_e[ids[i, j]] * x[i] for j in range(k))
        assert torch.allclose(out[i], exp, atol=1e-5)
    # drop_pad_mode 0 reads the documented column-major index i + j*t
    col = torch.empty_like(row_idx)
    for i in range(t):
        for j in range(k):
            col[i + j * t] = row_idx[i * k + j]
    assert torch.allclose(E.npu_moe_finalize_routing(rows, skip, None, None, w, col, ids, drop_pad_mode=0), out)


def test_init_routing_dynamic_int8():
    x = torch.randn(4, 16, generator=_g(25)).to(torch.bfloat16)
    ids = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=torch.int32)
    ex, row_idx, _, sc = E.npu_moe_init_routing_v2(x, ids, expert_num=2, expert_tokens_num_type=1,
                                                   expert_tokens_num_flag=True, quant_mode=1)
    assert ex.dtype == torch.int8 and sc.shape == (8,)
    for i in range(4):
        for j in range(2):
            r = int(row_idx[i * 2 + j])
            amax = x[i].float().abs().max()
            assert sc[r].item() == (amax / 127).item()
            assert torch.equal(ex[r], torch.round(x[i].float() / (amax / 127)).clamp(-128, 127).to(torch.int8))


def test_gating_top_k_sqrtsoftplus_and_hash():
    t, e, k = 6, 8, 2
    x = torch.randn(t, e, generator=_g(26))
    bias = 0.1 * torch.randn(e, generator=_g(27))
    y, idx, _ = E.npu_moe_gating_top_k(x, k, bias=bias, norm_type=2, routed_scaling_factor=1.5)
    assert idx.dtype == torch.int32 and y.dtype == torch.float32
    for i in range(t):
        s = [math.sqrt(math.log1p(math.exp(v))) for v in x[i].tolist()]
        order = sorted(range(e), key=lambda j: (-(s[j] + bias[j].item()), j))[:k]
        assert idx[i].tolist() == order
        tot = sum(s[j] for j in order)
        assert y[i].tolist() == pytest.approx([1.5 * s[j] / tot for j in order], rel=1e-6)
    tid2eid = torch.randint(0, e, (20, k), generator=_g(28), dtype=torch.int32)
    input_ids = torch.tensor([3, 19, 0, 7, 7, 11])
    y, idx, _ = E.npu_moe_gating_top_k(x, k, input_ids=input_ids, tid2eid=tid2eid, norm_type=2)
    assert torch.equal(idx, tid2eid[input_ids])
    y, idx, _ = E.npu_moe_gating_top_k(x, k, norm_type=1)  # sigmoid, normalised
    s = torch.sigmoid(x.double())
    top = s.topk(k, -1)
    assert torch.equal(idx.long(), top.indices)
    assert torch.allclose(y.double(), top.values / top.values.sum(-1, keepdim=True), atol=1e-6)


def test_dequant_swiglu_clamp_quant():
    m, i_dim, lim = 5, 6, 3.0
    acc = torch.randint(-3000, 3000, (m, 2 * i_dim), generator=_g(29), dtype=torch.int32)
    counts = torch.tensor([2, 3])
    ws = torch.rand(2, 2 * i_dim, generator=_g(30)) * 2e-3
    act = torch.rand(m, generator=_g(31)) + 0.5
    q, s = E.npu_dequant_swiglu_clamp_quant(acc, weight_scale=ws, activation_scale=act, group_index=counts,
                                            activate_left=True, quant_mode=1, swiglu_mode=1, clamp_limit=lim,
                                            glu_alpha=1.0, glu_bias=0.0)
    for r in range(m):
        e = 0 if r < 2 else 1
        d = [acc[r, c].item() * ws[e, c].item() * act[r].item() for c in range(2 * i_dim)]
        out = []
        for c in range(i_dim):
            a = min(d[c], lim)
            b = max(-lim, min(lim, d[c + i_dim]))
            out.append(a / (1 + math.exp(-a)) * b)
        amax = max(abs(v) for v in out)
        assert s[r].item() == pytest.approx(amax / 127, rel=1e-5)
        exp = [max(-128, min(127, round(v / (amax / 127)))) for v in out]
        assert max(abs(a - b) for a, b in zip(q[r].tolist(), exp)) <= 1  # rounding ties in fp32 vs fp64


# ---- mHC ---------------------------------------------------------------------------------------------------------------
def test_hf32_truncates_low_mantissa_bits():
    x = torch.tensor([1.0 + 2 ** -10 + 2 ** -11, -(1.0 + 2 ** -10 + 2 ** -11), 3.0])
    assert E.hf32(x).tolist() == [1.0 + 2 ** -10, -(1.0 + 2 ** -10), 3.0]  # toward zero, 10 mantissa bits kept


def test_hc_pre_and_post():
    b, s, n, d = 2, 3, 4, 16
    x = torch.randn(b, s, n, d, generator=_g(32)).to(torch.bfloat16)
    fn = torch.randn((2 + n) * n, n * d, generator=_g(33)) / math.sqrt(n * d)
    base = 0.5 * torch.randn((2 + n) * n, generator=_g(34))
    scale = torch.rand(3, generator=_g(35)) + 0.5
    y, post, comb = E.npu_hc_pre(x, fn, scale, base, hc_mult=n, hc_sinkhorn_iters=20, norm_eps=1e-6, hc_eps=1e-6)
    assert y.dtype == torch.bfloat16 and post.dtype == comb.dtype == torch.float32
    # independent: float64, rms folded into the input, plain loops for the Sinkhorn iterations
    for bi in range(b):
        for si in range(s):
            xv = x[bi, si].double().reshape(-1)
            xv = xv / torch.sqrt((xv * xv).mean() + 1e-6)
            mix = fn.double() @ xv
            pre = torch.sigmoid(mix[:n] * scale[0] + base[:n]) + 1e-6
            pst = 2 * torch.sigmoid(mix[n:2 * n] * scale[1] + base[n:2 * n])
            c = torch.softmax((mix[2 * n:] * scale[2] + base[2 * n:]).view(n, n), -1) + 1e-6
            c = c / (c.sum(0) + 1e-6)
            for _ in range(19):
                c = c / (c.sum(1, keepdim=True) + 1e-6)
                c = c / (c.sum(0) + 1e-6)
            yy = sum(pre[j] * x[bi, si, j].double() for j in range(n))
            assert torch.allclose(post[bi, si].double(), pst, atol=1e-5)
            assert torch.allclose(comb[bi, si].double(), c, atol=1e-5)
            assert torch.allclose(y[bi, si].double(), yy, rtol=2 ** -7, atol=1e-3)
    f = torch.randn(b, s, d, generator=_g(36)).to(torch.bfloat16)
    out = E.npu_hc_post(f, x, post, comb)
    for j in range(n):
        exp = post[..., j:j + 1].double() * f.double() + sum(
            comb[..., m, j:j + 1].double() * x[..., m, :].double() for m in range(n))
        assert torch.allclose(out[..., j, :].double(), exp, rtol=2 ** -7, atol=1e-3)


# ---- lightning indexer ----------------------------------------------------------------------------------------------
def _paged(dense: torch.Tensor, block: int, seed: int):
    """dense [B, N, ...] -> (cache [blocks, block, 1, ...], block_table [B, nblk]) with shuffled physical blocks."""
    b, n = dense.shape[:2]
    nblk = -(-n // block)
    perm = torch.randperm(b * nblk, generator=_g(seed))
    cache = torch.zeros(b * nblk, block, 1, *dense.shape[2:], dtype=dense.dtype)
    table = perm.view(b, nblk).int()
    for bi in range(b):
        for p in range(n):
            cache[table[bi, p // block], p % block, 0] = dense[bi, p]
    return cache, table


def _topk_set(scores: list[float], visible: int, k: int) -> set[int]:
    order = sorted(range(visible), key=lambda j: (-scores[j], j))[:k]
    return set(order)


def test_lightning_indexer_bsnd_and_tnd():
    b, s, h, d, n, k = 2, 3, 2, 8, 21, 4
    q = torch.randn(b, s, h, d, generator=_g(37))
    keys = torch.randn(b, n, d, generator=_g(38))
    w = torch.randn(b, s, h, 1, generator=_g(39))
    cache, table = _paged(keys, 16, 40)
    kv_len = torch.tensor([5, 21], dtype=torch.int32)
    out, _ = E.npu_lightning_indexer(q, cache, w, actual_seq_lengths_key=kv_len, block_table=table,
                                     layout_key="PA_BSND", sparse_count=k, sparse_mode=3)
    assert out.shape == (b, s, 1, k) and out.dtype == torch.int32
    for bi in range(b):
        for si in range(s):
            pos = int(kv_len[bi]) - s + si
            scores = [sum(w[bi, si, hh, 0].item() * max(0.0, float(q[bi, si, hh] @ keys[bi, j])) for hh in range(h))
                      for j in range(n)]
            picks = out[bi, si, 0].tolist()
            valid = [p for p in picks if p >= 0]
            assert picks[len(valid):] == [-1] * (k - len(valid))  # valid first, -1 padding after
            assert set(valid) == _topk_set(scores, pos + 1, k)
    # TND: one token per batch, key lengths arbitrary (how the backend expresses n_visible)
    qt = q.reshape(b * s, h, d)
    lens = torch.tensor([0, 1, 2, 7, 21, 3], dtype=torch.int32)
    tab = table.repeat_interleave(s, 0)
    out, _ = E.npu_lightning_indexer(qt, cache, w.reshape(b * s, h), actual_seq_lengths_query=torch.arange(1, 7),
                                     actual_seq_lengths_key=lens, block_table=tab, layout_query="TND",
                                     layout_key="PA_BSND", sparse_count=k)
    assert out.shape == (b * s, 1, k)
    for t in range(b * s):
        bi = t // s
        scores = [sum(w.reshape(b * s, h)[t, hh].item() * max(0.0, float(qt[t, hh] @ keys[bi, j])) for hh in range(h))
                  for j in range(n)]
        valid = [p for p in out[t, 0].tolist() if p >= 0]
        assert set(valid) == _topk_set(scores, int(lens[t]), k)


def test_quant_lightning_indexer_causal():
    # the built-in contract (no cmp_ratio: every key is one position; CR's custom op adds cmp_ratio)
    b, s, h, d, n, k, ratio = 1, 4, 2, 8, 12, 3, 1
    q = torch.randint(-127, 128, (b, s, h, d), generator=_g(41), dtype=torch.int8)
    keys = torch.randint(-127, 128, (b, n, d), generator=_g(42), dtype=torch.int8)
    qs = (torch.rand(b, s, h, generator=_g(43)) + 0.5).half()
    ks = (torch.rand(b, n, generator=_g(44)) + 0.5).half()
    w = torch.randn(b, s, h, generator=_g(45)).half()
    kcache, table = _paged(keys, 16, 46)
    scache, _ = _paged(ks, 16, 46)
    kv_len = torch.tensor([10], dtype=torch.int32)  # queries at positions 6..9: 7..10 visible keys
    idx = E.npu_quant_lightning_indexer(q, kcache, w, qs, scache.squeeze(-1).unsqueeze(-1).view(-1, 16, 1), 0, 0,
                                        actual_seq_lengths_key=kv_len, block_table=table,
                                        layout_key="PA_BSND", sparse_count=k, sparse_mode=3)
    for si in range(s):
        pos = 10 - s + si
        vis = (pos + 1) // ratio
        scores = []
        for j in range(n):
            tot = 0.0
            for hh in range(h):
                dot = int((q[0, si, hh].long() * keys[0, j].long()).sum())
                wq = float(torch.tensor(w[0, si, hh].item() * qs[0, si, hh].item()).half())
                tot += wq * max(0, dot) * ks[0, j].item()
            scores.append(tot)
        valid = [p for p in idx[0, si, 0].tolist() if p >= 0]
        assert set(valid) == _topk_set(scores, vis, k)
        assert all(p < vis for p in valid)


# ---- shared-KV sparse attention -------------------------------------------------------------------------------------
def _attend(qv: torch.Tensor, keys: list[torch.Tensor], sink: float, scale: float) -> torch.Tensor:
    """softmax over the listed keys plus a value-less sink logit, one head, float64."""
    if not keys:
        return torch.zeros_like(qv)
    kk = torch.stack(keys)
    logits = (kk @ qv) * scale
    m = max(logits.max().item(), sink)
    e = torch.exp(logits - m)
    return (e.unsqueeze(-1) * kk).sum(0) / (e.sum() + math.exp(sink - m))


@pytest.mark.parametrize("scenario", ["swa", "hca", "csa"])
def test_sparse_attn_sharedkv(scenario):
    b, s, h, d, ratio, win_left = 2, 3, 2, 8, 4, 5
    kv_len = [11, 16]
    q = torch.randn(b, s, h, d, generator=_g(47)).to(torch.bfloat16)
    ori = torch.randn(b, 16, d, generator=_g(48)).to(torch.bfloat16)
    cmp = torch.randn(b, 4, d, generator=_g(49)).to(torch.bfloat16)
    ori_cache, ori_table = _paged(ori, 16, 50)
    cmp_cache, cmp_table = _paged(cmp, 16, 51)
    sinks = torch.randn(h, generator=_g(52))
    kw = dict(ori_kv=ori_cache, ori_block_table=ori_table, seqused_kv=torch.tensor(kv_len, dtype=torch.int32),
              sinks=sinks, softmax_scale=0.3, ori_win_left=win_left, layout_q="BSND")
    picks = torch.tensor([[[0, -1, 2], [1, 0, -1], [2, 1, 0]], [[3, 0, -1], [-1, -1, -1], [1, 2, 3]]])
    if scenario != "swa":
        kw.update(cmp_kv=cmp_cache, cmp_block_table=cmp_table, cmp_ratio=ratio)
    if scenario == "csa":
        kw.update(cmp_sparse_indices=picks.view(b * s, 1, 3).int())
    out, _ = E.npu_sparse_attn_sharedkv(q, **kw)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    for bi in range(b):
        for si in range(s):
            pos = kv_len[bi] - s + si
            keys = [ori[bi, p].double() for p in range(max(0, pos - win_left), pos + 1)]
            if scenario == "hca":
                keys += [cmp[bi, j].double() for j in range((pos + 1) // ratio)]
            if scenario == "csa":
                keys += [cmp[bi, j].double() for j in picks[bi, si].tolist() if 0 <= j < (pos + 1) // ratio]
            for hh in range(h):
                exp = _attend(q[bi, si, hh].double(), keys, sinks[hh].item(), 0.3)
                assert torch.allclose(out[bi, si, hh].double(), exp, rtol=2 ** -7, atol=2e-3)


def test_metadata_ops_are_placeholders():
    assert E.npu_sparse_attn_sharedkv_metadata(64, 1, 512).shape == (1024,)
    assert E.npu_quant_lightning_indexer_metadata(64, 1, 128, 0, 0).dtype == torch.int32


def test_grouped_matmul_one_gemm_per_expert_without_row_copies():
    """Issue #26.3: rows grouped by expert, one GEMM per expert; no [M, K, N] per-row weight (int8 -> fp64 would be
    M*K*N*8 bytes = 8 GiB here), and the same exact int32 sums as a per-row loop."""
    import resource

    m, k, n, e = 1024, 1024, 1024, 2
    x = torch.randint(-127, 128, (m, k), generator=_g(120), dtype=torch.int8)
    w = torch.randint(-127, 128, (e, k, n), generator=_g(121), dtype=torch.int8)
    counts = torch.tensor([600, 424])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    y = E.npu_grouped_matmul([x], [w], group_list=counts, group_list_type=1, split_item=3, group_type=0,
                             output_dtype=torch.int32)[0]
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 1 << 20, f"peak RSS grew by {grown} KiB (> 1 GiB): per-row weight copies?"
    for rows, j in ((slice(0, 600), 0), (slice(600, 1024), 1)):
        assert torch.equal(y[rows], (x[rows].long() @ w[j].long()).to(torch.int32))  # exact (int64 sums)
