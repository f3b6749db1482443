"""Unit tests of every ReferenceBackend op against an independent formula.

Each expected value is computed here plainly (explicit Python loops in float64, complex multiplication,
scaled_dot_product_attention, hand-written dequantisation), never by calling the op under test. Sizes are tiny
and seeds fixed. The formulas are DeepSeek's (DeepSeek-V4 technical report; DeepSeek's inference/model.py),
as docs/numerics.md describes them.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv4_ascend import quant
from dsv4_ascend.reference import ReferenceBackend
from dsv4_ascend.rope import rope_inv_freq

BE = ReferenceBackend()
EPS = 1e-6
HC_EPS = 1e-6

FP4_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def silu(z: float) -> float:
    return z * sigmoid(z)


def e8m0_bytes_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Hand-written UE8M0 decode: byte b -> 2^(b-127) in float64 (normal range only, enough for these tests)."""
    b = scale.view(torch.uint8).to(torch.float64)
    return torch.pow(2.0, b - 127.0)


def fp4_dequant_by_hand(packed: torch.Tensor, scale: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Packed e2m1 bytes [..., K/2] (low nibble first) x e8m0 scales [..., K/block] -> float64 [..., K]."""
    table = torch.tensor(FP4_TABLE, dtype=torch.float64)
    lo, hi = (packed & 0xF).long(), (packed >> 4).long()
    vals = torch.stack([table[lo], table[hi]], dim=-1).flatten(-2)
    return vals * e8m0_bytes_to_float(scale).repeat_interleave(block, dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# rms_norm
# ---------------------------------------------------------------------------------------------------------------
def _rms_loop(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    xd = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(xd)
    for r in range(xd.shape[0]):
        row = xd[r].tolist()
        inv = 1.0 / math.sqrt(sum(v * v for v in row) / len(row) + EPS)
        for c, v in enumerate(row):
            out[r, c] = v * inv * (1.0 if w is None else float(w[c]))
    return out.reshape(x.shape)


@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_fp32(weighted):
    x = randn(2, 3, 16, seed=1, scale=3.0)
    w = randn(16, seed=2) if weighted else None
    y = BE.rms_norm(x, w, EPS)
    assert y.dtype == torch.float32
    # fp32 rsqrt/mean over 16 terms: a few ulp (~1e-7 relative) from the float64 loop.
    torch.testing.assert_close(y.double(), _rms_loop(x, w), rtol=1e-5, atol=1e-6)


def test_rms_norm_bf16_keeps_dtype():
    x = randn(4, 32, seed=3, scale=2.0, dtype=torch.bfloat16)
    w = randn(32, seed=4, dtype=torch.bfloat16)
    y = BE.rms_norm(x, w, EPS)
    assert y.dtype == torch.bfloat16
    # One final bf16 rounding (<= 2^-9 relative) plus at most one ulp flip at a rounding boundary: 2^-7.
    torch.testing.assert_close(y.double(), _rms_loop(x, w.double()), rtol=2**-7, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# rope
# ---------------------------------------------------------------------------------------------------------------
def _angles(n_pos: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float64) * 2 / (2 * half)))
    ang = torch.arange(n_pos, dtype=torch.float64).unsqueeze(-1) * 3.7 * inv  # [S, r/2]
    return ang.cos().float(), ang.sin().float()


def test_rope_matches_complex_multiplication():
    b, s, h, r = 2, 5, 3, 8
    x = randn(b, s, h, r, seed=5)
    cos, sin = _angles(s, r // 2)
    cos_b, sin_b = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    y = BE.rope(x, cos_b, sin_b)
    # Interleaved pairs (2k, 2k+1) are the complex number x[2k] + i x[2k+1], multiplied by e^{i angle}.
    z = torch.view_as_complex(x.double().reshape(b, s, h, r // 2, 2).contiguous())
    rot = torch.complex(cos_b.double(), sin_b.double())
    expected = torch.view_as_real(z * rot).reshape(b, s, h, r)
    # fp32 products of O(1) values: ~1e-7 absolute error.
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)


def test_rope_inverse_is_minus_sin():
    x = randn(2, 4, 2, 16, seed=6)
    cos, sin = _angles(4, 8)
    cos, sin = cos[:, None, :], sin[:, None, :]
    back = BE.rope(BE.rope(x, cos, sin), cos, -sin)
    # Rotation by -angle after +angle is the identity; two fp32 rotations leave ~1e-7 absolute error.
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-6)
    # The rope slice of a bf16 tensor stays bf16.
    assert BE.rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


def test_rope_pair_layout_explicit():
    # One pair rotated by 90 degrees: (a, b) -> (-b, a); the next pair by 0 degrees is unchanged.
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    cos = torch.tensor([[0.0, 1.0]])
    sin = torch.tensor([[1.0, 0.0]])
    assert BE.rope(x, cos, sin).tolist() == [[-2.0, 1.0, 3.0, 4.0]]


# ---------------------------------------------------------------------------------------------------------------
# YaRN tables (values of the released Flash config: theta 160000, factor 16, original 65536, beta 32/1)
# ---------------------------------------------------------------------------------------------------------------
# Check values carry 6 significant digits (<= 5e-6 relative rounding); fp32 pow/divide adds ~1e-7: rtol 1e-5.
@pytest.mark.parametrize("k,value", [(0, 1.0), (1, 0.687656), (15, 0.00363554), (20, 2.96978e-4),
                                     (25, 5.37231e-6), (31, 5.68053e-7)])
def test_yarn_compress_table_check_values(k, value):
    inv = rope_inv_freq(64, 160000.0, 16.0, 65536, 32.0, 1.0)
    assert inv.shape == (32,) and inv.dtype == torch.float32
    assert float(inv[k]) == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize("k,value", [(0, 1.0), (1, 0.749894), (31, 1.333522e-4)])
def test_main_table_check_values(k, value):
    inv = rope_inv_freq(64, 10000.0)
    assert float(inv[k]) == pytest.approx(value, rel=1e-5)  # same justification as above


def test_yarn_compress_table_full_formula():
    """All 32 entries vs the YaRN formula in float64: low = 15, high = 25, unchanged below, divided by 16 above."""
    inv = rope_inv_freq(64, 160000.0, 16.0, 65536, 32.0, 1.0)
    for k in range(32):
        base = 160000.0 ** (-2 * k / 64)
        ramp = min(max((k - 15) / (25 - 15), 0.0), 1.0)
        expected = base / 16 * ramp + base * (1 - ramp)
        # fp32 table vs float64 formula: a few fp32 ulp (< 1e-6 relative).
        assert float(inv[k]) == pytest.approx(expected, rel=1e-5), k
    # the ramp ends are exactly at low = 15 and high = 25
    assert float(inv[14]) == pytest.approx(160000.0 ** (-28 / 64), rel=1e-6)
    assert float(inv[26]) == pytest.approx(160000.0 ** (-52 / 64) / 16, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# mHC (DeepSeek's hc_pre / hc_post: Sinkhorn-normalised mixing, docs/numerics.md section 2)
# ---------------------------------------------------------------------------------------------------------------
def _hc_inputs(seed: int, b=2, s=3, n=4, d=8):
    x = randn(b, s, n, d, seed=seed, scale=2.0)
    fn = randn((2 + n) * n, n * d, seed=seed + 1, scale=0.3)
    base = randn((2 + n) * n, seed=seed + 2, scale=0.5)
    scale = torch.tensor([0.7, 1.3, 2.0])
    return x, fn, base, scale


def _hc_pre_loop(x, fn, base, scale, iters):
    """mHC pre (DeepSeek's hc_split_sinkhorn) with explicit float64 loops. Returns h, post, comb as float64 tensors and the row sums."""
    b, s, n, d = x.shape
    h = torch.empty(b, s, d, dtype=torch.float64)
    post = torch.empty(b, s, n, dtype=torch.float64)
    comb = torch.empty(b, s, n, n, dtype=torch.float64)
    fnl = fn.double().tolist()
    for bi in range(b):
        for si in range(s):
            X = x[bi, si].double().tolist()  # [n][d]
            flat = [v for row in X for v in row]
            rinv = 1.0 / math.sqrt(sum(v * v for v in flat) / len(flat) + EPS)
            mix = [sum(a * w for a, w in zip(flat, fnl[o])) * rinv for o in range((2 + n) * n)]
            pre = [sigmoid(mix[i] * float(scale[0]) + float(base[i])) + HC_EPS for i in range(n)]
            for i in range(n):
                post[bi, si, i] = 2 * sigmoid(mix[n + i] * float(scale[1]) + float(base[n + i]))
            logits = [[mix[2 * n + n * i + j] * float(scale[2]) + float(base[2 * n + n * i + j])
                       for j in range(n)] for i in range(n)]
            C = []
            for i in range(n):  # row softmax (over j) + eps
                m = max(logits[i])
                e = [math.exp(v - m) for v in logits[i]]
                C.append([v / sum(e) + HC_EPS for v in e])

            def cols(C):
                sums = [sum(C[i][j] for i in range(n)) for j in range(n)]
                return [[C[i][j] / (sums[j] + HC_EPS) for j in range(n)] for i in range(n)]

            def rows(C):
                return [[C[i][j] / (sum(C[i]) + HC_EPS) for j in range(n)] for i in range(n)]

            C = cols(C)
            for _ in range(iters - 1):
                C = cols(rows(C))
            comb[bi, si] = torch.tensor(C, dtype=torch.float64)
            for dd in range(d):
                h[bi, si, dd] = sum(pre[i] * X[i][dd] for i in range(n))
    return h, post, comb


def test_hc_pre_vs_loop():
    x, fn, base, scale = _hc_inputs(10)
    h, post, comb = BE.hc_pre(x, fn, base, scale, 20, EPS, HC_EPS)
    eh, epost, ecomb = _hc_pre_loop(x, fn, base, scale, 20)
    assert h.dtype == torch.float32 and post.dtype == torch.float32 and comb.dtype == torch.float32
    # fp32 dot products of 32 terms + 20 Sinkhorn sweeps of 4x4 divides: errors ~1e-7..1e-6 relative.
    torch.testing.assert_close(post.double(), epost, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comb.double(), ecomb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.double(), eh, rtol=1e-5, atol=1e-5)


def test_hc_pre_sinkhorn_properties():
    x, fn, base, scale = _hc_inputs(20, b=3, s=5)
    _, post, comb = BE.hc_pre(x, fn, base, scale, 20, EPS, HC_EPS)
    assert (comb > 0).all()
    assert ((post > 0) & (post < 2)).all()
    # The last step is a column normalisation C/(colsum + eps): columns sum to colsum/(colsum+eps) = 1 - ~1e-6
    # (colsum ~ 1 there), plus fp32 rounding of a 4-term sum (~2e-7): 1e-5 covers both, 1e-7 would not.
    col = comb.double().sum(-2)
    assert (col - 1).abs().max() < 1e-5
    assert (col < 1).all()  # the eps in the denominator biases every column sum strictly below 1
    # Rows are only approximately normalised: the last step is a column sweep and Sinkhorn converges linearly,
    # at a rate set by how skewed the matrix is. These inputs have comb logits spanning ~15 within a matrix (a
    # hard case); the row error after 20 sweeps is then intrinsic to the algorithm (the float64 loop measures
    # ~1.1e-2), so the fp32 op must reproduce it to fp32 accuracy (1e-5) rather than meet a fixed bound.
    mix = BE._hc_mix(x, fn, EPS)[..., 8:] * scale[2] + base[8:]
    assert (mix.amax(-1) - mix.amin(-1)).max() > 10
    row_err = (comb.double().sum(-1) - 1).abs().amax(-1)
    _, _, ecomb = _hc_pre_loop(x, fn, base, scale, 20)
    torch.testing.assert_close(row_err, (ecomb.sum(-1) - 1).abs().amax(-1), rtol=0, atol=1e-5)
    # more sweeps tighten the rows monotonically towards a doubly stochastic matrix (up to eps)
    errs = [(BE.hc_pre(x, fn, base, scale, it, EPS, HC_EPS)[2].double().sum(-1) - 1).abs().max().item()
            for it in (10, 20, 50, 100)]
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-4


def test_hc_pre_sinkhorn_rows_moderate_logits():
    # Logits spanning a few units (comb gain 1 instead of 2, half the bias): 20 sweeps bring every row sum within
    # 1e-4 of 1 (measured ~4e-6; 1e-4 leaves margin for fp32 and is still 100x tighter than the 1e-2 of the hard
    # case above, so it would catch a missing row sweep or a transposed normalisation).
    x, fn, base, scale = _hc_inputs(20, b=3, s=5)
    scale = torch.tensor([0.7, 1.3, 1.0])
    _, _, comb = BE.hc_pre(x, fn, base * 0.5, scale, 20, EPS, HC_EPS)
    assert (comb > 0).all()
    assert (comb.double().sum(-1) - 1).abs().max() < 1e-4
    assert (comb.double().sum(-2) - 1).abs().max() < 1e-5  # eps-limited columns, as above
    # one sweep is far from row-stochastic: the bound above is meaningful
    _, _, comb1 = BE.hc_pre(x, fn, base * 0.5, scale, 1, EPS, HC_EPS)
    assert (comb1.double().sum(-1) - 1).abs().max() > 1e-2


def test_hc_pre_bf16_input_gives_bf16_h():
    x, fn, base, scale = _hc_inputs(30)
    h, post, comb = BE.hc_pre(x.bfloat16(), fn, base, scale, 20, EPS, HC_EPS)
    assert h.dtype == torch.bfloat16 and post.dtype == torch.float32 and comb.dtype == torch.float32
    eh, _, _ = _hc_pre_loop(x.bfloat16().float(), fn, base, scale, 20)
    # one bf16 rounding of the fp32 result (2^-9 relative) plus a possible boundary flip: 2^-7.
    torch.testing.assert_close(h.double(), eh, rtol=2**-7, atol=1e-3)


def test_hc_post_vs_loop_orientation():
    b, s, n, d = 2, 3, 4, 5
    f = randn(b, s, d, seed=40)
    x = randn(b, s, n, d, seed=41)
    post = torch.rand(b, s, n, generator=gen(42)) * 2
    comb = torch.rand(b, s, n, n, generator=gen(43))
    assert not torch.allclose(comb, comb.transpose(-1, -2))
    out = BE.hc_post(f, x, post, comb)
    expected = torch.empty(b, s, n, d, dtype=torch.float64)
    for bi in range(b):
        for si in range(s):
            for j in range(n):
                for dd in range(d):
                    v = float(post[bi, si, j]) * float(f[bi, si, dd])
                    for i in range(n):
                        v += float(comb[bi, si, i, j]) * float(x[bi, si, i, dd])
                    expected[bi, si, j, dd] = v
    # 5-term fp32 sums of O(1) values: ~1e-7 relative.
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_hc_post_permutation_orientation():
    # C[i][j] = 1 for j = i+1 (mod n): input stream i feeds output stream i+1 (first index = input stream).
    n, d = 4, 3
    x = torch.arange(n * d, dtype=torch.float32).view(1, 1, n, d)
    comb = torch.zeros(1, 1, n, n)
    for i in range(n):
        comb[0, 0, i, (i + 1) % n] = 1.0
    out = BE.hc_post(torch.zeros(1, 1, d), x, torch.zeros(1, 1, n), comb)
    for j in range(n):
        assert torch.equal(out[0, 0, j], x[0, 0, (j - 1) % n])


def test_hc_head_vs_loop():
    b, s, n, d = 2, 3, 4, 8
    x = randn(b, s, n, d, seed=50, scale=2.0)
    fn = randn(n, n * d, seed=51, scale=0.3)
    base = randn(n, seed=52, scale=0.5)
    scale = torch.tensor([0.9])
    y = BE.hc_head(x, fn, base, scale, EPS, HC_EPS)
    expected = torch.empty(b, s, d, dtype=torch.float64)
    for bi in range(b):
        for si in range(s):
            flat = x[bi, si].double().flatten().tolist()
            rinv = 1.0 / math.sqrt(sum(v * v for v in flat) / len(flat) + EPS)
            pre = [sigmoid(sum(a * float(w) for a, w in zip(flat, fn[i])) * rinv * 0.9 + float(base[i])) + HC_EPS
                   for i in range(n)]
            for dd in range(d):
                expected[bi, si, dd] = sum(pre[i] * float(x[bi, si, i, dd]) for i in range(n))
    # fp32 32-term dot products and a 4-term weighted sum of O(2) values: ~1e-6 absolute.
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# compress (softmax pooling of windows; CSA overlap: docs/numerics.md section 2)
# ---------------------------------------------------------------------------------------------------------------
def _softmax_pool(scores: list[float], values: list[float]) -> float:
    m = max(scores)
    e = [math.exp(z - m) for z in scores]
    return sum(w * v for w, v in zip(e, values)) / sum(e)


def test_compress_plain_vs_loop():
    b, m, n_win, c = 2, 4, 3, 5
    kv = randn(b, n_win * m, c, seed=60)
    score = randn(b, n_win * m, c, seed=61, scale=2.0)
    out = BE.compress(kv, score, m, False)
    assert out.shape == (b, n_win, c) and out.dtype == torch.float32
    expected = torch.empty(b, n_win, c, dtype=torch.float64)
    for bi in range(b):
        for w in range(n_win):
            for ch in range(c):
                rows = range(w * m, (w + 1) * m)
                expected[bi, w, ch] = _softmax_pool([float(score[bi, r, ch]) for r in rows],
                                                    [float(kv[bi, r, ch]) for r in rows])
    # fp32 softmax over 4 slots: ~1e-7 relative.
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_compress_overlap_vs_loop():
    """CSA: entry w pools first-half channels of window w-1 and second-half channels of window w (8 slots)."""
    b, m, n_win, d = 2, 4, 3, 3
    tok_kv = randn(b, n_win * m, 2 * d, seed=62)  # the real tokens, windows 0..n_win-1
    tok_sc = randn(b, n_win * m, 2 * d, seed=63, scale=2.0)
    # The backend's first `m` rows are the window before window 0: absent, so logit -inf. Their kv is junk that
    # must contribute nothing.
    prev_kv = randn(b, m, 2 * d, seed=64, scale=100.0)
    prev_sc = torch.full((b, m, 2 * d), float("-inf"))
    out = BE.compress(torch.cat([prev_kv, tok_kv], 1), torch.cat([prev_sc, tok_sc], 1), m, True)
    assert out.shape == (b, n_win, d)
    expected = torch.empty(b, n_win, d, dtype=torch.float64)
    for bi in range(b):
        for w in range(n_win):
            for ch in range(d):
                sc, val = [], []
                if w > 0:  # previous window's tokens, first half of the channels
                    for r in range((w - 1) * m, w * m):
                        sc.append(float(tok_sc[bi, r, ch]))
                        val.append(float(tok_kv[bi, r, ch]))
                for r in range(w * m, (w + 1) * m):  # this window's tokens, second half
                    sc.append(float(tok_sc[bi, r, d + ch]))
                    val.append(float(tok_kv[bi, r, d + ch]))
                expected[bi, w, ch] = _softmax_pool(sc, val)
    # fp32 softmax over <= 8 slots: ~1e-7 relative.
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# indexer_topk (lightning indexer scores and causal top-k)
# ---------------------------------------------------------------------------------------------------------------
def _index_scores_loop(q, w, keys):
    b, s, h, di = q.shape
    n = keys.shape[1]
    out = [[[0.0] * n for _ in range(s)] for _ in range(b)]
    for bi in range(b):
        for t in range(s):
            for e in range(n):
                tot = 0.0
                for hh in range(h):
                    dot = sum(float(q[bi, t, hh, k]) * float(keys[bi, e, k]) for k in range(di))
                    tot += float(w[bi, t, hh]) * max(dot, 0.0)
                out[bi][t][e] = tot
    return out


def _expected_topk(scores, n_visible, k):
    n = len(scores)
    k = min(k, n)
    order = sorted(range(int(n_visible)), key=lambda e: (-scores[e], e))
    return order[:k] + [-1] * (k - min(k, len(order)))


def test_indexer_topk_integer_scores_exact_ties():
    """Small-integer inputs make every score exact in fp32, so ties are exact and the result is exact."""
    b, s, h, di, n, k = 2, 4, 3, 4, 10, 5
    g = gen(70)
    q = torch.randint(-2, 3, (b, s, h, di), generator=g).float()
    keys = torch.randint(-2, 3, (b, n, di), generator=g).float()
    w = torch.randint(-1, 3, (b, s, h), generator=g).float()
    n_visible = torch.tensor([[10, 7, 3, 0], [2, 9, 10, 5]])
    idx = BE.indexer_topk(q, w, keys, n_visible, k)
    assert idx.dtype == torch.int64 and idx.shape == (b, s, k)
    scores = _index_scores_loop(q, w, keys)
    flat = [v for bb in scores for row in bb for v in row]
    assert len(flat) - len(set(flat)) > 10  # plenty of exact ties (ReLU zeros among them)
    for bi in range(b):
        for t in range(s):
            assert idx[bi, t].tolist() == _expected_topk(scores[bi][t], n_visible[bi, t], k), (bi, t)


def test_indexer_topk_relu_zero_ties_lower_index_first():
    # Keys anti-aligned with the query give negative dots -> ReLU 0: entries 1, 3, 4, 6 all score exactly 0.
    di = 2
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, di)
    w = torch.ones(1, 1, 1)
    keys = torch.tensor([[2.0, 0], [-1, 0], [1, 0], [-3, 0], [-1, 5], [3, 0], [-2, 0]]).view(1, 7, di)
    idx = BE.indexer_topk(q, w, keys, torch.tensor([[7]]), 5)
    # scores: [2, 0, 1, 0, 0, 3, 0] -> 5, 0, 2, then the zero ties in index order 1, 3
    assert idx.tolist() == [[[5, 0, 2, 1, 3]]]
    # Negative head weight: the positive dots become negative scores and rank below the zero ties.
    idx = BE.indexer_topk(q, -w, keys, torch.tensor([[7]]), 6)
    assert idx.tolist() == [[[1, 3, 4, 6, 2, 0]]]


def test_indexer_topk_visibility_and_empty_slots():
    g = gen(71)
    b, s, h, di, n, k = 1, 3, 2, 4, 6, 4
    q = torch.randn(b, s, h, di, generator=g)
    w = torch.rand(b, s, h, generator=g) + 0.1
    # Make the invisible entries the strongest ones: they must still never be picked.
    keys = torch.randn(b, n, di, generator=g)
    keys[:, 3:] = q[0, :, 0].mean(0) * 50
    n_visible = torch.tensor([[3, 1, 0]])
    idx = BE.indexer_topk(q, w, keys, n_visible, k)
    for t in range(s):
        row = idx[0, t].tolist()
        nv = int(n_visible[0, t])
        picks = [e for e in row if e >= 0]
        assert len(picks) == min(nv, k) and sorted(picks) == list(range(nv))  # all visible ones, nothing else
        assert row[len(picks):] == [-1] * (k - len(picks))


def test_indexer_topk_float_scores_vs_loop():
    g = gen(72)
    b, s, h, di, n, k = 2, 3, 4, 8, 9, 4
    q = torch.randn(b, s, h, di, generator=g)
    w = torch.randn(b, s, h, generator=g)
    keys = torch.randn(b, n, di, generator=g)
    n_visible = torch.full((b, s), n)
    idx = BE.indexer_topk(q, w, keys, n_visible, k)
    scores = _index_scores_loop(q, w, keys)
    for bi in range(b):
        for t in range(s):
            exp_order = _expected_topk(scores[bi][t], n, k)
            got_vals = [scores[bi][t][e] for e in idx[bi, t].tolist()]
            exp_vals = [scores[bi][t][e] for e in exp_order]
            # fp32 vs float64 scores can only swap picks whose scores agree to ~1e-6 (fp32 sums of 32 products).
            assert got_vals == pytest.approx(exp_vals, rel=1e-5, abs=1e-5)


def test_indexer_topk_k_larger_than_entries():
    q = torch.ones(1, 1, 1, 2)
    keys = torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    idx = BE.indexer_topk(q, torch.ones(1, 1, 1), keys, torch.tensor([[1]]), 8)
    # k = min(index_topk, number of entries); the invisible entry 1 is an empty slot
    assert idx.tolist() == [[[0, -1]]]


# ---------------------------------------------------------------------------------------------------------------
# sparse_attention (shared-KV attention with sinks)
# ---------------------------------------------------------------------------------------------------------------
def _dense_sink_attention(q, kv, idx, sink, scale):
    """Dense masked SDPA in float64 over all N keys (mask = membership in idx), then the sink: the sink is a
    zero-value key, so it only rescales the softmax by sum_exp / (sum_exp + exp(sink)) = sigmoid(lse - sink)."""
    b, s, h, d = q.shape
    n = kv.shape[1]
    mask = torch.zeros(b, s, n, dtype=torch.bool)
    for bi in range(b):
        for si in range(s):
            for e in idx[bi, si].tolist():
                if e >= 0:
                    mask[bi, si, e] = True
    qd = q.double().permute(0, 2, 1, 3)  # [B,H,S,d]
    kd = kv.double().unsqueeze(1).expand(b, h, n, d)
    o = F.scaled_dot_product_attention(qd, kd, kd, attn_mask=mask.unsqueeze(1), scale=scale)
    logits = (qd @ kd.transpose(-1, -2)) * scale
    lse = logits.masked_fill(~mask.unsqueeze(1), float("-inf")).logsumexp(-1, keepdim=True)  # [B,H,S,1]
    factor = torch.sigmoid(lse - sink.double().view(1, h, 1, 1))
    o = torch.where(mask.any(-1).unsqueeze(1).unsqueeze(-1), o * factor, torch.zeros_like(o))
    return o.permute(0, 2, 1, 3)


def _attn_inputs(seed):
    g = gen(seed)
    b, s, h, d, n, k = 2, 3, 4, 8, 12, 6
    q = torch.randn(b, s, h, d, generator=g)
    kv = torch.randn(b, n, d, generator=g)
    # duplicate-free index rows in scrambled order, with -1 holes
    idx = torch.stack([torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(s)]) for _ in range(b)])
    idx[0, 1, 2] = -1
    idx[1, 0, 0] = -1
    idx[1, 2, 3:] = -1
    idx[0, 2, :] = -1  # a query with no keys at all: only the sink, output 0
    sink = torch.randn(h, generator=g)
    return q, kv, idx, sink, d ** -0.5


def test_sparse_attention_vs_dense_sdpa_with_sink():
    q, kv, idx, sink, scale = _attn_inputs(80)
    out = BE.sparse_attention(q, kv, idx, sink, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = _dense_sink_attention(q, kv, idx, sink, scale)
    # fp32 softmax over <= 7 logits and an 8-term weighted sum of O(1) values: ~1e-7 relative.
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert out[0, 2].abs().max() == 0  # all keys masked: the sink takes all the mass


def test_sparse_attention_sink_as_extra_logit_column():
    """Second independent form: append the sink as a logit column with a zero value row, plain softmax."""
    q, kv, idx, sink, scale = _attn_inputs(81)
    idx[0, 2, 0] = 3  # give every query at least one key here
    out = BE.sparse_attention(q, kv, idx, sink, scale)
    b, s, h, d = q.shape
    for bi in range(b):
        for si in range(s):
            keys = [e for e in idx[bi, si].tolist() if e >= 0]
            kmat = kv[bi, keys].double()  # [K,d]
            for hh in range(h):
                logits = torch.cat([kmat @ q[bi, si, hh].double() * scale, sink[hh].double().view(1)])
                vals = torch.cat([kmat, torch.zeros(1, d, dtype=torch.float64)])
                o = torch.softmax(logits, 0) @ vals
                # same fp32 justification as the SDPA comparison
                torch.testing.assert_close(out[bi, si, hh].double(), o, rtol=1e-5, atol=1e-6)


def test_sparse_attention_sink_limits():
    q, kv, idx, _, scale = _attn_inputs(82)
    idx[0, 2, 0] = 5
    h = q.shape[2]
    # Very negative sink: exp(sink) = 0, plain softmax attention over the selected keys.
    out = BE.sparse_attention(q, kv, idx, torch.full((h,), -1e4), scale)
    b, s, _, d = q.shape
    mask = torch.zeros(b, 1, s, kv.shape[1], dtype=torch.bool)
    for bi in range(b):
        for si in range(s):
            for e in idx[bi, si].tolist():
                if e >= 0:
                    mask[bi, 0, si, e] = True
    kd = kv.double().unsqueeze(1).expand(b, h, -1, d)
    plain = F.scaled_dot_product_attention(q.double().permute(0, 2, 1, 3), kd, kd, attn_mask=mask, scale=scale)
    torch.testing.assert_close(out.double(), plain.permute(0, 2, 1, 3), rtol=1e-5, atol=1e-6)  # fp32 softmax
    # Very positive sink: it takes all the probability mass, the output vanishes (exp(l - 1e4) underflows to 0).
    out = BE.sparse_attention(q, kv, idx, torch.full((h,), 1e4), scale)
    assert out.abs().max() == 0


def test_sparse_attention_many_queries_blocked():
    # more queries than one internal query block (256): the blocked path must equal the dense formula
    g = gen(84)
    b, s, h, d, n, k = 1, 300, 2, 4, 10, 3
    q = torch.randn(b, s, h, d, generator=g)
    kv = torch.randn(b, n, d, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(s)]).unsqueeze(0)
    idx[0, ::7, 0] = -1
    sink = torch.randn(h, generator=g)
    out = BE.sparse_attention(q, kv, idx, sink, d ** -0.5)
    torch.testing.assert_close(out.double(), _dense_sink_attention(q, kv, idx, sink, d ** -0.5),
                               rtol=1e-5, atol=1e-6)  # fp32 softmax over <= 4 logits


def test_sparse_attention_masked_slots_ignore_their_index_value():
    # A -1 slot must be masked, not read as entry 0 (or the last entry): changing kv[0]/kv[-1] is invisible.
    q, kv, idx, sink, scale = _attn_inputs(83)
    idx[:] = torch.tensor([1, 2, 3, -1, -1, -1])
    out1 = BE.sparse_attention(q, kv, idx, sink, scale)
    kv2 = kv.clone()
    kv2[:, 0] = 1e3
    kv2[:, -1] = -1e3
    out2 = BE.sparse_attention(q, kv2, idx, sink, scale)
    assert torch.equal(out1, out2)


# ---------------------------------------------------------------------------------------------------------------
# route (sqrt-softplus router, docs/numerics.md rows 17-18)
# ---------------------------------------------------------------------------------------------------------------
def _sqrt_softplus(z: float) -> float:
    return math.sqrt(math.log1p(math.exp(z)) if z < 30 else z)


def _check_route(weights, ids, logits, k, route_scale):
    t = logits.shape[0]
    assert weights.shape == (t, k) and ids.shape == (t, k) and ids.dtype == torch.int64
    for ti in range(t):
        s = [_sqrt_softplus(float(v)) for v in logits[ti]]
        sel = ids[ti].tolist()
        tot = sum(s[e] for e in sel)
        # fp32 softplus/sqrt/normalise: ~1e-7 relative
        assert weights[ti].tolist() == pytest.approx([s[e] / tot * route_scale for e in sel], rel=1e-5)
        assert float(weights[ti].double().sum()) == pytest.approx(route_scale, rel=1e-5)


def test_route_no_bias():
    t, e, k, rs = 5, 8, 3, 1.5
    logits = randn(t, e, seed=90, scale=3.0)
    weights, ids = BE.route(logits, None, None, k, rs)
    _check_route(weights, ids, logits, k, rs)
    for ti in range(t):
        s = [_sqrt_softplus(float(v)) for v in logits[ti]]
        assert sorted(ids[ti].tolist()) == sorted(sorted(range(e), key=lambda j: -s[j])[:k])


def test_route_bias_changes_selection_not_weights():
    t, e, k, rs = 5, 8, 3, 2.5
    logits = randn(t, e, seed=91, scale=3.0)
    bias = torch.zeros(e)
    bias[[6, 7]] = 100.0  # experts 6 and 7 always selected, whatever their score
    weights, ids = BE.route(logits, bias, None, k, rs)
    _check_route(weights, ids, logits, k, rs)  # weights from the unbiased scores
    _, ids_nb = BE.route(logits, None, None, k, rs)
    changed = 0
    for ti in range(t):
        s = [_sqrt_softplus(float(v)) + float(bias[j]) for j, v in enumerate(logits[ti])]
        assert sorted(ids[ti].tolist()) == sorted(sorted(range(e), key=lambda j: -s[j])[:k])
        assert {6, 7} <= set(ids[ti].tolist())
        changed += set(ids[ti].tolist()) != set(ids_nb[ti].tolist())
    assert changed > 0


def test_route_hash_ids():
    t, e, k, rs = 4, 8, 3, 1.5
    logits = randn(t, e, seed=92, scale=3.0)
    hash_ids = torch.tensor([[0, 1, 2], [7, 3, 5], [4, 4, 0], [6, 2, 1]], dtype=torch.int32)
    bias = torch.full((e,), 50.0)
    bias[0] = -50.0
    weights, ids = BE.route(logits, bias, hash_ids, k, rs)
    assert ids.tolist() == hash_ids.tolist() and ids.dtype == torch.int64
    _check_route(weights, ids, logits, k, rs)


# ---------------------------------------------------------------------------------------------------------------
# experts and swiglu_mlp (clamped SwiGLU, docs/numerics.md rows 19-20)
# ---------------------------------------------------------------------------------------------------------------
def _swiglu_loop(xv, w1, w2, w3, limit):
    """One clamped SwiGLU in float64: gate min(.,limit), up clamp(., -limit, limit)."""
    i_dim, d = w1.shape
    h = []
    for i in range(i_dim):
        g = sum(xv[c] * float(w1[i, c]) for c in range(d))
        u = sum(xv[c] * float(w3[i, c]) for c in range(d))
        g = min(g, limit)
        u = min(max(u, -limit), limit)
        h.append(silu(g) * u)
    return [sum(h[i] * float(w2[c, i]) for i in range(i_dim)) for c in range(d)], h


def _experts_loop(x, weights, ids, w1, w2, w3, limit):
    t, d = x.shape
    out = torch.zeros(t, d, dtype=torch.float64)
    for ti in range(t):
        xv = x[ti].double().tolist()
        for j, e in enumerate(ids[ti].tolist()):
            y, _ = _swiglu_loop(xv, w1[e], w2[e], w3[e], limit)
            out[ti] += float(weights[ti, j]) * torch.tensor(y, dtype=torch.float64)
    return out


def _expert_weights(seed, n_exp=8, d=16, i_dim=12):
    w1 = randn(n_exp, i_dim, d, seed=seed, scale=0.5)
    w2 = randn(n_exp, d, i_dim, seed=seed + 1, scale=0.5)
    w3 = randn(n_exp, i_dim, d, seed=seed + 2, scale=0.5)
    return w1, w2, w3


def _routing(seed, t, n_exp, k):
    g = gen(seed)
    ids = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g) + 0.2
    return weights, ids


LIMIT = 0.5


def _assert_clamp_active(x, w1, w3, ids):
    g = torch.einsum("td,tkid->tki", x.double(), w1.double()[ids])
    u = torch.einsum("td,tkid->tki", x.double(), w3.double()[ids])
    assert (g > LIMIT).any() and (u > LIMIT).any() and (u < -LIMIT).any() and (g.abs() < LIMIT).any()


@pytest.mark.parametrize("t,sync_free", [(3, False), (10, False), (3, True), (10, True)],
                         ids=["gathered", "grouped", "gathered-sync-free", "dense-sync-free"])
def test_experts_vs_naive_loop(t, sync_free):
    n_exp, k, d = 8, 2, 16
    # t*k < n_exp takes the gathered path, otherwise the grouped path, or with sync_free (the decode flag) the
    # dense one (every expert on every token)
    assert (t * k < n_exp) == (t == 3)
    w1, w2, w3 = _expert_weights(100)
    x = randn(t, d, seed=101)
    weights, ids = _routing(102, t, n_exp, k)
    _assert_clamp_active(x, w1, w3, ids)
    out = BE.experts(x, weights, ids, w1, w2, w3, None, None, None, LIMIT, sync_free=sync_free)
    assert out.dtype == torch.float32 and out.shape == (t, d)
    expected = _experts_loop(x, weights, ids, w1, w2, w3, LIMIT)
    # fp32 dots of 16/12 terms summed over 2 experts: ~1e-7 relative, 1e-6 absolute near zero.
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_experts_unused_experts_and_repeated_tokens():
    # grouped path with experts that receive no token and an expert chosen by every token
    t, k, d = 6, 2, 16
    w1, w2, w3 = _expert_weights(110)
    x = randn(t, d, seed=111)
    ids = torch.tensor([[3, 0], [0, 5], [3, 0], [0, 1], [5, 0], [0, 3]])
    weights = torch.rand(t, k, generator=gen(112))
    out = BE.experts(x, weights, ids, w1, w2, w3, None, None, None, LIMIT)
    torch.testing.assert_close(out.double(), _experts_loop(x, weights, ids, w1, w2, w3, LIMIT),
                               rtol=1e-5, atol=1e-6)  # same fp32 justification as above


@pytest.mark.parametrize("t", [3, 10], ids=["gathered", "grouped"])
def test_experts_fp4_weights(t):
    n_exp, k, d, i_dim = 8, 2, 64, 32  # FP4 blocks are 1x32 along the input dim
    w1, w2, w3 = _expert_weights(120, n_exp, d, i_dim)
    q1, s1 = quant.quantize_fp4(w1)
    q2, s2 = quant.quantize_fp4(w2)
    q3, s3 = quant.quantize_fp4(w3)
    assert q1.dtype == torch.uint8 and q1.shape == (n_exp, i_dim, d // 2) and s1.shape == (n_exp, i_dim, d // 32)
    d1, d2, d3 = fp4_dequant_by_hand(q1, s1), fp4_dequant_by_hand(q2, s2), fp4_dequant_by_hand(q3, s3)
    # sanity of the hand dequantisation: MXFP4 keeps every weight within half an e2m1 step (<= 1 x scale)
    assert ((d1 - w1.double()).abs() <= e8m0_bytes_to_float(s1).repeat_interleave(32, -1)).all()
    x = randn(t, d, seed=121)
    weights, ids = _routing(122, t, n_exp, k)
    _assert_clamp_active(x, d1, d3, ids)
    out = BE.experts(x, weights, ids, q1, q2, q3, s1, s2, s3, LIMIT)
    expected = _experts_loop(x, weights, ids, d1, d2, d3, LIMIT)
    # Dequantised FP4 weights are exact in fp32 (e2m1 x power of two); only fp32 summation order differs.
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [3, 10], ids=["gathered", "grouped"])
def test_experts_fp8_weights(t):
    n_exp, k, d, i_dim = 8, 2, 16, 12  # one partial 128x128 block per expert matrix
    w1, w2, w3 = _expert_weights(125, n_exp, d, i_dim)
    packed = [[quant.quantize_fp8_block(we) for we in w] for w in (w1, w2, w3)]
    (q1, s1), (q2, s2), (q3, s3) = [(torch.stack([q for q, _ in p]), torch.stack([s for _, s in p])) for p in packed]
    assert q1.dtype == torch.float8_e4m3fn and s1.shape == (n_exp, 1, 1)
    d1, d2, d3 = [torch.stack([_fp8_dequant_by_hand(q[e], s[e], "ue8m0") for e in range(n_exp)])
                  for q, s in ((q1, s1), (q2, s2), (q3, s3))]
    x = randn(t, d, seed=126)
    weights, ids = _routing(127, t, n_exp, k)
    _assert_clamp_active(x, d1, d3, ids)
    out = BE.experts(x, weights, ids, q1, q2, q3, s1, s2, s3, LIMIT)
    # Dequantised FP8 weights are exact in fp32 (e4m3 x power of two); only fp32 summation order differs.
    torch.testing.assert_close(out.double(), _experts_loop(x, weights, ids, d1, d2, d3, LIMIT), rtol=1e-5, atol=1e-6)


def _experts_grouped_per_expert(x, weights, ids, w1, w2, w3, s1, s2, s3, limit, shared):
    """The grouped (prefill) experts path as it was before its elementwise ops were batched: one `_swiglu` and
    one fp32 index_add_ per expert."""
    t, k = ids.shape
    order = torch.argsort(ids.flatten(), stable=True)
    counts = torch.bincount(ids.flatten(), minlength=w1.shape[0]).tolist()
    tok = order // k
    xs, ws = x[tok], weights.flatten()[order]
    out = torch.zeros(t, x.shape[-1], dtype=torch.float32)
    start = 0
    for e, c in enumerate(counts):
        if c:
            sl = slice(start, start + c)
            y = BE._swiglu(xs[sl], w1[e], w2[e], w3[e], None if s1 is None else s1[e], None if s2 is None else s2[e],
                           None if s3 is None else s3[e], limit, ws[sl])
            out.index_add_(0, tok[sl], y.float())
            start += c
    return (out + shared.float()).to(x.dtype)


@pytest.mark.parametrize("fmt", ["plain", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_experts_grouped_batched_elementwise_equals_per_expert_form(dtype, fmt):
    """The grouped path runs the SwiGLU's elementwise ops once over every (token, expert) row and one index_add_:
    bit-equal to one `_swiglu` + index_add_ per expert (the same per-element ops, the same fp32 accumulation
    order per token), with experts no token picks, plain and FP4 weights."""
    n_exp, k, d, i_dim, t = 8, 2, 64, 32, 40
    w1, w2, w3 = _expert_weights(140, n_exp, d, i_dim)
    s1 = s2 = s3 = None
    if fmt == "fp4":
        (w1, s1), (w2, s2), (w3, s3) = quant.quantize_fp4(w1), quant.quantize_fp4(w2), quant.quantize_fp4(w3)
    else:
        w1, w2, w3 = w1.to(dtype), w2.to(dtype), w3.to(dtype)
    x = randn(t, d, seed=141, scale=2.0).to(dtype)
    weights, ids = _routing(142, t, n_exp - 2, k)  # experts 6 and 7 get no token
    shared = randn(t, d, seed=143).to(dtype)
    got = BE.experts(x, weights, ids, w1, w2, w3, s1, s2, s3, LIMIT, shared=shared)
    want = _experts_grouped_per_expert(x, weights, ids, w1, w2, w3, s1, s2, s3, LIMIT, shared)
    assert got.dtype == dtype and torch.equal(got, want)


def test_swiglu_mlp_vs_loop():
    d, i_dim = 16, 12
    w1, w2, w3 = (w[0] for w in _expert_weights(130, 1, d, i_dim))
    x = randn(2, 3, d, seed=131)
    out = BE.swiglu_mlp(x, w1, w2, w3, None, None, None, LIMIT)
    assert out.shape == x.shape
    expected = torch.tensor([_swiglu_loop(row, w1, w2, w3, LIMIT)[0] for row in x.double().view(-1, d).tolist()],
                            dtype=torch.float64).view(x.shape)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)  # fp32 dots of 12-16 terms


# ---------------------------------------------------------------------------------------------------------------
# linear / grouped_linear
# ---------------------------------------------------------------------------------------------------------------
def _fp8_dequant_by_hand(w8, scale, fmt):
    n, k = w8.shape
    s = e8m0_bytes_to_float(scale) if fmt == "ue8m0" else scale.double()
    full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    return w8.double() * full


@pytest.mark.parametrize("fmt", ["ue8m0", "fp32"])
def test_linear_fp8_block(fmt):
    n, k = 200, 300  # partial edge blocks in both dims
    w = randn(n, k, seed=140, scale=0.05)
    w[:128, 128:256] *= 40  # blocks with very different scales
    w8, s = quant.quantize_fp8_block(w, scale_fmt=fmt)
    assert w8.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    wd = _fp8_dequant_by_hand(w8, s, fmt)
    assert (wd - w.double()).abs().max() < 0.07 * w.abs().max()  # e4m3: 3 mantissa bits, rel step 2^-4
    x = randn(2, 5, k, seed=141)
    y = BE.linear(x, w8, s)
    assert y.dtype == torch.float32 and y.shape == (2, 5, n)
    # the fp32 dequantised weight is exact (e4m3 value x scale); vs a float64 GEMM of 300 terms: ~1e-6 relative
    torch.testing.assert_close(y.double(), F.linear(x.double(), wd), rtol=1e-5, atol=1e-5)
    # and with F.linear in fp32 the only difference is the summation order
    torch.testing.assert_close(y, F.linear(x, wd.float()), rtol=1e-5, atol=1e-5)


def test_linear_fp8_block_bf16_activations():
    n, k = 130, 256
    w = randn(n, k, seed=142, scale=0.05)
    w8, s = quant.quantize_fp8_block(w)
    x = randn(3, k, seed=143, dtype=torch.bfloat16)
    y = BE.linear(x, w8, s)
    assert y.dtype == torch.bfloat16
    # e4m3 x power-of-two is exact in bf16 (3 <= 7 mantissa bits), so only the bf16 GEMM rounding differs:
    # one output rounding (2^-9) plus accumulation error; 2^-6 relative with a small absolute floor.
    expected = F.linear(x.double(), _fp8_dequant_by_hand(w8, s, "ue8m0"))
    torch.testing.assert_close(y.double(), expected, rtol=2**-6, atol=2e-2)


def test_linear_plain_and_fp4():
    n, k = 24, 64
    w = randn(n, k, seed=144, scale=0.2)
    x = randn(4, k, seed=145)
    # plain: fp32 GEMM of 64 terms vs float64: ~1e-6 relative
    torch.testing.assert_close(BE.linear(x, w).double(), F.linear(x.double(), w.double()), rtol=1e-5, atol=1e-5)
    q, s = quant.quantize_fp4(w)
    y = BE.linear(x, q, s)
    torch.testing.assert_close(y.double(), F.linear(x.double(), fp4_dequant_by_hand(q, s)), rtol=1e-5, atol=1e-5)


def test_grouped_linear_vs_per_group_loop():
    b, s, g, kg, n = 2, 3, 4, 6, 5
    x = randn(b, s, g, kg, seed=150)
    w = randn(g * n, kg, seed=151)
    y = BE.grouped_linear(x, w)
    assert y.shape == (b, s, g, n)
    expected = torch.empty(b, s, g, n, dtype=torch.float64)
    for gi in range(g):
        wg = w[gi * n:(gi + 1) * n].double()  # rows of group gi
        for bi in range(b):
            for si in range(s):
                for o in range(n):
                    expected[bi, si, gi, o] = sum(float(x[bi, si, gi, c]) * float(wg[o, c]) for c in range(kg))
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6)  # fp32 6-term dots


def test_grouped_linear_fp8():
    b, g, kg, n = 3, 2, 128, 64
    x = randn(b, g, kg, seed=152)
    w = randn(g * n, kg, seed=153, scale=0.05)
    w8, s = quant.quantize_fp8_block(w)
    wd = _fp8_dequant_by_hand(w8, s, "ue8m0")
    y = BE.grouped_linear(x, w8, s)
    expected = torch.stack([F.linear(x[:, gi].double(), wd[gi * n:(gi + 1) * n]) for gi in range(g)], 1)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)  # fp32 128-term dots, exact weights


def test_fp32_linear_compiled_one_row_form_equals_upcast():
    """fp32_linear's compiled one-row form (multiply + sum over the bf16 weight, no fp32 weight copy) computes
    the same fp32 dot products as the eager upcast; other shapes keep the upcast."""
    from dsv4_ascend.backend import fp32_linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 96, generator=g).bfloat16()
    compiled = torch.compile(fp32_linear, backend="aot_eager", fullgraph=True)
    for rows in ((1, 1), (3, 1)):
        x = torch.randn(*rows, 96, generator=g).bfloat16()
        want = F.linear(x.float(), w.float())
        got = compiled(x, w)
        assert got.dtype == torch.float32 and got.shape == want.shape
        # bf16 x bf16 products are exact in fp32; only the summation order of 96 fp32 terms may differ.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fp32_linear_blocked_upcast_equals_whole_upcast():
    """A bf16 weight with more rows than one upcast block goes through fp32_linear's blocked path (row blocks
    upcast and multiplied into slices of the output): same fp32 dot products as upcasting the whole weight."""
    from dsv4_ascend import backend as B

    g = torch.Generator().manual_seed(1)
    d = 256
    w = torch.randn(B._UPCAST_ELEMENTS // d * 2 + 37, d, generator=g).bfloat16()  # 2 full blocks + a partial
    assert w.shape[0] > B._UPCAST_ELEMENTS // d
    for lead in ((1, 1), (2, 3)):
        x = torch.randn(*lead, d, generator=g).bfloat16()
        want = F.linear(x.float(), w.float())
        got = B.fp32_linear(x, w)
        assert got.dtype == torch.float32 and got.shape == want.shape
        # bf16 x bf16 products are exact in fp32; only the summation order of 256 fp32 terms may differ.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # every column: a misplaced block fails


def test_hc_ops_compiled_forms_equal_eager():
    """hc_pre / hc_post under a compiler take their fusable forms (Sinkhorn and the stream mix as pointwise
    n-term sums instead of baddbmm / einsum); traced here with the eager backend (the same kernels, so only the
    formulation differs) they must give what the eager forms give."""
    x, fn, base, scale = _hc_inputs(60, b=2, s=5)
    pre = torch.compile(BE.hc_pre, backend="eager", fullgraph=True)
    post = torch.compile(BE.hc_post, backend="eager", fullgraph=True)
    want = BE.hc_pre(x, fn, base, scale, 20, EPS, HC_EPS)
    got = pre(x, fn, base, scale, 20, EPS, HC_EPS)
    # Same fp32 operations; the n = 4 term sums may be added in another order: ~1e-7 relative per sweep.
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-6, atol=1e-6)
    f = randn(2, 5, 8, seed=61)
    torch.testing.assert_close(post(f, x, want[1], want[2]), BE.hc_post(f, x, want[1], want[2]),
                               rtol=1e-6, atol=1e-6)


def test_rope_compiled_form_equals_eager_bit_for_bit():
    """rope under a compiler takes its pairwise form (a cos - b sin, b cos + a sin, stacked); traced with the eager
    backend (the same kernels) it must give the eager form's x cos + swap(x) (-sin, sin) bit for bit, in fp32 and
    bf16, on a strided slice (the rope tail of q) and a contiguous tensor: the same products, one rounded sum each
    (a + (-p) == a - p exactly)."""
    rope = torch.compile(BE.rope, backend="eager", fullgraph=True)
    for dt in (torch.float32, torch.bfloat16):
        q = randn(2, 7, 3, 24, seed=62).to(dt)
        ang = randn(2, 7, 1, 4, seed=63)
        for x, cos, sin in ((q[..., -8:], ang.cos(), ang.sin()), (q[:, :, 0, :8].contiguous(), ang[:, :, 0].cos(),
                                                                  ang[:, :, 0].sin())):
            got, want = rope(x, cos, sin), BE.rope(x, cos, sin)
            assert got.dtype == want.dtype == dt
            assert torch.equal(got, want)


def test_indexer_topk_deepseek_numerics_round_scores_like_deepseek():
    """numerics='deepseek', bf16: each q.k rounded to bf16, relu, times the bf16 weight (rounded), head sum (fp32
    accumulation, rounded once), as DeepSeek's bf16 einsum / mul / sum do. Inputs with 3 significant bits make
    every dot product and head sum exact before those roundings, so the expected scores are exact."""
    from dsv4_ascend.backend import RunOptions

    g = gen(73)
    b, s, h, di, n, k = 2, 6, 4, 32, 40, 8

    def coarse(*shape):  # values m * 2^e with |m| < 8: products and sums of a few stay exact in fp32
        return (torch.randint(-7, 8, shape, generator=g) * torch.exp2(torch.randint(-3, 3, shape, generator=g)))

    q = coarse(b, s, h, di).bfloat16()
    keys = coarse(b, n, di).bfloat16()
    w = (torch.rand(b, s, h, generator=g) + 0.5).bfloat16().float()
    n_visible = torch.full((b, s), n)
    got = ReferenceBackend(RunOptions("deepseek")).indexer_topk(q, w, keys, n_visible, k)
    dots = torch.einsum("bshd,bnd->bshn", q.double(), keys.double())  # exact
    prod = (dots.bfloat16().double().relu() * w.double().unsqueeze(-1)).bfloat16().double()
    scores = prod.sum(2).bfloat16().double()  # the head sum is exact in fp64, rounded once
    for bi in range(b):
        for t in range(s):
            assert got[bi, t].tolist() == _expected_topk(scores[bi, t].tolist(), n, k), (bi, t)
    exact = BE.indexer_topk(q, w, keys, n_visible, k)
    assert not torch.equal(got, exact)  # fp32 scores order some near-ties differently
