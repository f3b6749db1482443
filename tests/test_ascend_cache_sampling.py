"""Cache writes (Backend.scatter_rows) and sampling (Backend.sample) on the Ascend backend, emulated on CPU.

Emulated ops are checked against independent loop / dense computations written from the documented semantics;
the AscendBackend paths against the plain-torch defaults they replace (tokens and logits must be identical).
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch

from conftest import build_tiny
from dsv4_ascend.backend import plain_scatter_rows, redirect_skipped_rows
from dsv4_ascend.config import preset
from dsv4_ascend.ops import AscendBackend, emulator as E
from dsv4_ascend.reference import ReferenceBackend
from dsv4_ascend.sampling import SamplingBatch, sample, uniform_noise


class Counting:
    """Forwards to an op module and counts calls by name (to see which path a backend took)."""

    def __init__(self, mod) -> None:
        self.mod, self.calls = mod, Counter()

    def __getattr__(self, name: str):
        f = getattr(self.mod, name)
        if not callable(f):
            return f

        def wrapped(*a, **k):
            self.calls[name] += 1
            return f(*a, **k)

        return wrapped


def _dense_last_wins(var: torch.Tensor, rows: list[int], upd: torch.Tensor) -> torch.Tensor:
    """Expected scatter with negative rows skipped and the last duplicate winning, as a float64 one-hot matmul."""
    n, u = var.shape[0], len(rows)
    pick = torch.zeros(n, u, dtype=torch.float64)
    for i, r in enumerate(rows):
        if r >= 0:
            pick[r] = 0
            pick[r, i] = 1  # a later write to r replaces the earlier choice
    hit = pick.sum(1, keepdim=True) > 0
    return torch.where(hit, pick @ upd.double(), var.double())


# ---- emulated ops --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,s", [(torch.bfloat16, 128), (torch.float16, 512), (torch.int8, 1)])
def test_scatter_nd_update_asc_skips_negatives_last_wins(dtype, s):
    g = torch.Generator().manual_seed(1)
    var = (torch.randn(12, s, generator=g) * 20).to(dtype)
    rows = [3, -1, 7, 3, 0, -5, 11, 7]  # duplicates 3 and 7, two skipped rows
    upd = (torch.randn(len(rows), s, generator=g) * 20).to(dtype)
    want = _dense_last_wins(var, rows, upd)
    out = var.clone()
    assert E.scatter_nd_update_asc(out, torch.tensor(rows).view(-1, 1), upd) is None
    assert torch.equal(out.double(), want)
    out32 = var.clone()
    E.scatter_nd_update_asc(out32, torch.tensor(rows, dtype=torch.int32).view(-1, 1), upd)
    assert torch.equal(out32, out)


def test_scatter_nd_update_asc_rejects_what_the_op_does_not_take():
    v = torch.zeros(4, 128, dtype=torch.bfloat16)
    i = torch.tensor([[1]])
    with pytest.raises(ValueError, match="1, 128 or 512"):
        E.scatter_nd_update_asc(torch.zeros(4, 64, dtype=torch.bfloat16), i, torch.zeros(1, 64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float32"):
        E.scatter_nd_update_asc(v.float(), i, torch.zeros(1, 128))
    with pytest.raises(IndexError, match="out of range"):
        E.scatter_nd_update_asc(v, torch.tensor([[4]]), torch.zeros(1, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="u .* <= b"):
        E.scatter_nd_update_asc(v, torch.zeros(5, 1, dtype=torch.long), torch.zeros(5, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        E.scatter_nd_update_asc(torch.zeros(128, 4, dtype=torch.bfloat16).t(), i, torch.zeros(1, 4,
                                                                                              dtype=torch.bfloat16))


def test_npu_scatter_nd_update_nd_indices():
    # input [4, 5, 6], indices [3, 2] -> updates [3, 6] (the documented example shape rule).
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, 6, generator=g)
    idx = torch.tensor([[0, 1], [3, 4], [0, 1]])  # duplicate (0, 1): the last one wins
    upd = torch.randn(3, 6, generator=g)
    want = x.clone()
    for n in range(3):
        a, b = idx[n].tolist()
        for c in range(6):
            want[a, b, c] = upd[n, c]
    out = x.clone()
    assert E.npu_scatter_nd_update_(out, idx, upd) is out
    assert torch.equal(out, want)
    with pytest.raises(IndexError, match="not supported"):
        E.npu_scatter_nd_update_(x.clone(), torch.tensor([[-1, 0]]), upd[:1])
    with pytest.raises(ValueError, match="shape"):
        E.npu_scatter_nd_update_(x.clone(), idx, upd[:, :5])


# ---- Backend.scatter_rows ------------------------------------------------------------------------------------
def _rows_case(dtype=torch.float32, s=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    dst = (torch.randn(10, s, generator=g) * 10).to(dtype)
    rows = [4, -1, 9, 0, -2, 5]
    src = (torch.randn(len(rows), s, generator=g) * 10).to(dtype)
    return dst, rows, src


def test_plain_scatter_rows_skips_negatives_and_edge_cases():
    dst, rows, src = _rows_case()
    out = dst.clone()
    ReferenceBackend().scatter_rows(out, torch.tensor(rows), src)
    assert torch.equal(out.double(), _dense_last_wins(dst, rows, src))
    # All rows skipped / no rows: untouched.
    out = dst.clone()
    plain_scatter_rows(out, torch.tensor([-1, -3]), src[:2])
    assert torch.equal(out, dst)
    plain_scatter_rows(out, torch.zeros(0, dtype=torch.long), src[:0])
    assert torch.equal(out, dst)
    # Valid duplicates: policy "one of them wins" (unspecified which, as on the device).
    out = dst.clone()
    plain_scatter_rows(out, torch.tensor([2, -1, 2]), src[:3])
    assert torch.equal(out[2], src[0]) or torch.equal(out[2], src[2])
    assert torch.equal(out[torch.arange(10) != 2], dst[torch.arange(10) != 2])


def test_redirect_is_sync_free_and_keeps_last_valid():
    # The redirect is what makes a non-skipping scatter skip: negatives become copies of the last valid write.
    dst, rows, src = _rows_case()
    fn = torch.compile(redirect_skipped_rows, fullgraph=True, backend="eager")  # a host read would break fullgraph
    idx, upd = fn(dst, torch.tensor(rows), src)
    assert idx.tolist() == [4, 5, 9, 0, 5, 5]
    assert torch.equal(upd[1], src[5]) and torch.equal(upd[4], src[5]) and torch.equal(upd[0], src[0])
    idx, upd = fn(dst, torch.tensor([-1, -1]), src[:2])  # nothing valid: rewrite row 0 with itself
    assert idx.tolist() == [0, 0] and torch.equal(upd, dst[:1].expand(2, -1))


@pytest.mark.parametrize("dtype,s,path", [(torch.bfloat16, 128, "scatter_nd_update_asc"),
                                          (torch.uint8, 512, "scatter_nd_update_asc"),
                                          (torch.bfloat16, 72, "npu_scatter_nd_update_"),
                                          (torch.float32, 1, "npu_scatter_nd_update_")])
def test_ascend_scatter_rows_paths(dtype, s, path):
    g = torch.Generator().manual_seed(4)
    dst = torch.randint(0, 200, (10, s), generator=g).to(dtype)
    rows = [4, -1, 9, 0, -2, 5, 9]
    src = torch.randint(0, 200, (len(rows), s), generator=g).to(dtype)
    npu, custom = Counting(E), Counting(E)
    be = AscendBackend(npu=npu, custom=custom)
    out = dst.clone()
    be.scatter_rows(out, torch.tensor(rows), src)
    assert torch.equal(out.double(), _dense_last_wins(dst, rows, src))
    assert (npu.calls + custom.calls)[path] == 1
    # Without a custom provider everything takes the built-in + redirect.
    npu2 = Counting(E)
    out2 = dst.clone()
    AscendBackend(npu=npu2, custom=None).scatter_rows(out2, torch.tensor(rows), src)
    assert torch.equal(out2, out) and npu2.calls["npu_scatter_nd_update_"] == 1


def _decode_logits(model, scatter, kv_fp8=False, prompt=10, steps=3, seed=5):
    """Prefill + decode logits with cache writes through `scatter` (None: the cache's aten index_put)."""
    cache = model.new_cache(2, prompt + steps + 1, scatter=scatter, kv_fp8=kv_fp8)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (2, prompt + steps), generator=g)
    slots = torch.arange(2)
    outs = [model(ids[:, :prompt], cache, slots, 0)]
    for t in range(prompt, prompt + steps):
        outs.append(model.decode(ids[:, t:t + 1], torch.full((2,), t), cache, slots))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("case", ["custom_bf16_d128", "builtin_c8"])
def test_model_cache_writes_through_ascend_scatter(case):
    # Same model, same inputs; only the cache-write primitive differs: the logits must be bit-identical, and the
    # Ascend op path must actually have run (call counts).
    if case == "custom_bf16_d128":  # every store 128 wide in bf16 -> CR's scatter_nd_update_asc
        cfg = dataclasses.replace(preset("tiny"), head_dim=128, index_head_dim=128)
        model, kv_fp8, path = build_tiny(cfg=cfg, dtype=torch.bfloat16), False, "scatter_nd_update_asc"
    else:  # C8: uint8 nope (64 wide), fp32 scales, fp32 rope -> the built-in + redirect
        model, kv_fp8, path = build_tiny(), True, "npu_scatter_nd_update_"
    npu, custom = Counting(E), Counting(E)
    be = AscendBackend(npu=npu, custom=custom)
    want = _decode_logits(model, None, kv_fp8)
    got = _decode_logits(model, be.scatter_rows, kv_fp8)
    assert torch.equal(got, want)
    assert torch.equal(_decode_logits(model, plain_scatter_rows, kv_fp8), want)  # the base default too
    n = (npu.calls + custom.calls)[path]
    assert n >= 3 * len(model.layers)  # prefill + 3 decode steps, at least one store per layer each


def test_new_cache_routes_writes_to_the_backend():
    be = AscendBackend()
    model = build_tiny(backend=be)
    cache = model.new_cache(1, 16)
    lc = next(lc for lc in cache.layers if lc.index_keys is not None)
    for store in (lc.window, lc.entries, lc.index_keys):
        assert store.scatter.__func__ is AscendBackend.scatter_rows and store.scatter.__self__ is be
    # The reference backend keeps the base default, which the cache's own aten write already equals: no hook.
    assert build_tiny().new_cache(1, 16).layers[0].window.scatter is None


# ---- npu_top_k_top_p_sample ----------------------------------------------------------------------------------
def _loop_sample(logits, top_k, top_p, q, eps, ks_max):
    """The documented semantics row by row in Python floats (float64): (picked ids, kept-id sets)."""
    bsz, vocab = logits.shape
    ks = min(1024, -(-ks_max // 8) * 8)
    picks, kept = [], []
    for b in range(bsz):
        row = [float(v) for v in logits[b].float()]
        order = sorted(range(vocab), key=lambda i: (-row[i], i))
        k, p = int(top_k[b]), float(top_p[b])
        k_on = 1 <= k <= min(vocab, ks)
        cand = order[:k] if k_on else order
        if p <= 0:
            cand = cand[:1]
        elif p < 1:
            m = max(row[i] for i in cand)
            z = sum(math.exp(row[i] - m) for i in cand)
            acc, cut = 0.0, []
            for i in cand:
                if acc > p:  # mass strictly above this candidate exceeds p: it and all later ones go
                    break
                cut.append(i)
                acc += math.exp(row[i] - m) / z
            cand = cut
        if not (k_on or p < 1):
            cand = list(range(vocab))  # no stage ran: token order, q read by token id
        m = max(row[i] for i in cand)
        z = sum(math.exp(row[i] - m) for i in cand)
        best, best_j = -1.0, 0
        for j, i in enumerate(cand):
            sc = math.exp(row[i] - m) / z
            if q is not None:
                sc /= abs(float(q[b, j])) + eps
            if sc > best:
                best, best_j = sc, j
        picks.append(cand[best_j])
        kept.append(set(cand))
    return picks, kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_top_p_sample_vs_loop(dtype):
    g = torch.Generator().manual_seed(6)
    bsz, vocab = 40, 1200
    logits = (torch.randn(bsz, vocab, generator=g) * 3).to(dtype)
    top_k = torch.randint(1, 60, (bsz,), generator=g, dtype=torch.int32)
    top_k[::4] = 0                       # stage skipped
    top_k[1::8] = 1100                   # > ks_max (1024) and < V: skipped too
    top_k[2::8] = 2000                   # > V: skipped
    top_p = (torch.rand(bsz, generator=g) * 0.9 + 0.05).to(dtype)
    top_p[::3] = 1.0                     # stage skipped
    top_p[5::10] = 0.0                   # keep the top candidate only
    q = torch.empty(bsz, vocab).exponential_(generator=g)
    for qq, eps in ((q, 1e-8), (None, 1e-8), (q, 0.0)):
        idx, sel = E.npu_top_k_top_p_sample(logits, top_k, top_p, q=qq, eps=eps, is_need_logits=True)
        want, kept = _loop_sample(logits, top_k, top_p, qq, eps, 1024)
        assert idx.dtype == torch.int64 and idx.tolist() == want
        for b in range(bsz):
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[list(kept[b])] = True
            assert torch.equal(sel[b][mask], logits[b].float()[mask]) and bool(torch.isinf(sel[b][~mask]).all())
    # Both stages skipped and no q: the argmax (first index on ties).
    idx, empty = E.npu_top_k_top_p_sample(logits, torch.zeros(bsz, dtype=torch.int32), torch.ones(bsz, dtype=dtype))
    assert idx.tolist() == logits.float().argmax(-1).tolist() and empty.numel() == 0
    # ks_max is rounded up to a multiple of 8: 13 -> 16 admits top_k = 15, skips 17.
    k = torch.tensor([15, 17], dtype=torch.int32)
    _, s2 = E.npu_top_k_top_p_sample(logits[:2], k, torch.ones(2, dtype=dtype), is_need_logits=True, ks_max=13)
    assert torch.isfinite(s2).sum(1).tolist() == [15, vocab]


def test_top_k_top_p_sample_argument_checks():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="int32"):
        E.npu_top_k_top_p_sample(x, torch.ones(2, dtype=torch.long), torch.ones(2))
    with pytest.raises(ValueError, match="logits' dtype"):
        E.npu_top_k_top_p_sample(x, torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="q must be float32"):
        E.npu_top_k_top_p_sample(x, torch.ones(2, dtype=torch.int32), torch.ones(2), q=torch.ones(2, 9))
    with pytest.raises(NotImplementedError, match="multiNomial"):
        E.npu_top_k_top_p_sample(x, torch.ones(2, dtype=torch.int32), torch.ones(2), post_sample="multiNomial")


# ---- Backend.sample ------------------------------------------------------------------------------------------
def _batch(g, bsz, vocab):
    temp = torch.rand(bsz, generator=g) * 1.5 + 0.05
    temp[::6] = 0.0                                            # greedy rows mixed in
    top_k = torch.randint(1, 80, (bsz,), generator=g)
    top_k[::2] = 0                                             # off
    top_k[3::12] = 1100                                        # in (1024, V): the op cannot apply it
    top_k[7::12] = vocab + 5                                   # >= V: the same as off
    top_p = torch.rand(bsz, generator=g) * 0.9 + 0.05
    top_p[1::3] = 1.0
    seed = torch.randint(0, 2**31 - 1, (bsz,), generator=g)
    return SamplingBatch(temp, top_k, top_p, seed)


def _expressible(sb: SamplingBatch, vocab: int) -> torch.Tensor:
    """Rows the op covers (docs/ascend.md): sampled, exactly one of top-k (<= 1024, < V) / top-p active."""
    k_on = (sb.top_k > 0) & (sb.top_k < vocab)
    p_on = sb.top_p < 1
    return (sb.temperature > 0) & (k_on != p_on) & (sb.top_k <= 1024)


def test_ascend_sample_equals_reference_token_for_token():
    g = torch.Generator().manual_seed(7)
    bsz, vocab = 48, 1500
    npu = Counting(E)
    be = AscendBackend(npu=npu, custom=None)
    picked_rows, n_rows = 0, 0
    for trial in range(16):
        logits = torch.randn(bsz, vocab, generator=g) * (1 + trial % 4)
        sb = _batch(g, bsz, vocab)
        step = torch.randint(0, 4096, (bsz,), generator=g)
        tok, lp = be.sample(logits, sb, step)
        ref_tok, ref_lp = sample(logits, sb, step)
        assert torch.equal(tok, ref_tok) and torch.equal(lp, ref_lp)
        # Not vacuous: the op's own picks (no fallback) equal the reference on the rows it can express.
        ok = _expressible(sb, vocab)
        scaled = logits / sb.temperature.clamp(min=1e-5).unsqueeze(1)
        q = (-torch.log(uniform_noise(sb.seed, step, vocab))).float()
        k = torch.where((sb.top_k > 0) & (sb.top_k < vocab), sb.top_k, 0).to(torch.int32)
        raw, _ = E.npu_top_k_top_p_sample(scaled, k, torch.where(sb.top_p < 1, sb.top_p, 1.0), q=q, eps=0.0)
        assert torch.equal(raw[ok], ref_tok[ok])
        picked_rows += int(ok.sum())
        n_rows += bsz
    assert npu.calls["npu_top_k_top_p_sample"] == 16
    assert picked_rows > 0.2 * n_rows  # 25% measured: the sampled rows with exactly one of top-k / top-p


def test_ascend_sample_is_sync_free_and_greedy_rows_exact():
    be = AscendBackend(npu=E, custom=None)
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 300, generator=g)
    sb = SamplingBatch(torch.tensor([0.0, 0.7, 0.0, 1.0, 0.0, 0.3]), torch.tensor([0, 5, 3, 0, 0, 40]),
                       torch.tensor([1.0, 1.0, 0.5, 0.8, 1.0, 1.0]), torch.arange(6))
    step = torch.arange(6)
    fn = torch.compile(be.sample, fullgraph=True, backend="eager")  # a host read would break fullgraph
    tok, lp = fn(logits, sb, step)
    assert tok[[0, 2, 4]].tolist() == logits.argmax(-1)[[0, 2, 4]].tolist()
    assert torch.equal(tok, sample(logits, sb, step)[0])
    assert torch.allclose(lp, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0])
