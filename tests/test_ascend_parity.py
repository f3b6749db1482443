"""AscendBackend (torch_npu ops emulated on CPU) against the reference: per op, and for the whole tiny model.

Two adjustments make the comparison about the backend and not about the test model, both explained where used:
- norm weights are rounded to bf16 values in both models (the official checkpoint stores them in bf16, and
  npu_rms_norm documents gamma with x's dtype, so on the device they are bf16 anyway);
- the bf16 comparison uses the reference with DeepSeek's association order for the mHC mixing matmul.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import bf16_norms as _bf16_norms, build_tiny
from dsv4_ascend.ops import AscendBackend, emulator
from dsv4_ascend.reference import ReferenceBackend


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- per op: AscendBackend vs ReferenceBackend (layout conversions, fp32) -----------------------------------------
@pytest.fixture(scope="module")
def pair():
    return AscendBackend(emulator), ReferenceBackend()


def test_backend_defaults_to_emulator_here():
    be = AscendBackend()
    assert be.npu is emulator and be.custom is emulator and be.provider.startswith("emulator")


def test_ops_match_reference_fp32(pair):
    asc, ref = pair
    x = torch.randn(2, 5, 3, 16, generator=_g(0))
    w = torch.rand(16, generator=_g(1)) + 0.5
    assert torch.allclose(asc.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), atol=1e-6)
    assert torch.allclose(asc.rms_norm(x, None, 1e-6), ref.rms_norm(x, None, 1e-6), atol=1e-6)
    ang = torch.randn(2, 5, 1, 8, generator=_g(2))
    assert torch.allclose(asc.rope(x, ang.cos(), -ang.sin()), ref.rope(x, ang.cos(), -ang.sin()), atol=1e-6)
    lin = torch.randn(24, 16, generator=_g(3))
    assert torch.allclose(asc.linear(x, lin), ref.linear(x, lin), atol=1e-5)
    wo = torch.randn(3 * 7, 16, generator=_g(4))
    assert torch.allclose(asc.grouped_linear(x, wo), ref.grouped_linear(x, wo), atol=1e-5)
    # mHC
    n, d = 4, 16
    xs = torch.randn(2, 3, n, d, generator=_g(5))
    fn = torch.randn((2 + n) * n, n * d, generator=_g(6)) / 8
    base, scale = torch.randn((2 + n) * n, generator=_g(7)) / 2, torch.rand(3, generator=_g(8)) + 0.5
    for a, b in zip(asc.hc_pre(xs, fn, base, scale, 20, 1e-6, 1e-6), ref.hc_pre(xs, fn, base, scale, 20, 1e-6, 1e-6)):
        assert torch.allclose(a, b, atol=1e-5)
    h, post, comb = ref.hc_pre(xs, fn, base, scale, 20, 1e-6, 1e-6)
    assert torch.allclose(asc.hc_post(h, xs, post, comb), ref.hc_post(h, xs, post, comb), atol=1e-5)
    assert torch.allclose(asc.hc_head(xs, fn[:n], base[:n], scale[:1], 1e-6, 1e-6),
                          ref.hc_head(xs, fn[:n], base[:n], scale[:1], 1e-6, 1e-6), atol=1e-5)


def test_indexer_and_attention_match_reference(pair):
    asc, ref = pair
    b, s, h, di, n = 2, 6, 2, 8, 37
    q = torch.randn(b, s, h, di, generator=_g(9))
    w = torch.randn(b, s, h, generator=_g(10))
    keys = torch.randn(b, n, di, generator=_g(11))
    n_vis = torch.tensor([[0, 1, 2, 9, 30, 37], [3, 3, 4, 4, 5, 36]])
    for k in (4, 64):  # fewer and more picks than visible entries (-1 padding)
        assert torch.equal(asc.indexer_topk(q, w, keys, n_vis, k), ref.indexer_topk(q, w, keys, n_vis, k))
    d, kk = 16, 9
    qa = torch.randn(b, s, h, d, generator=_g(12))
    pool = torch.randn(b, 20, d, generator=_g(13))
    idx = torch.randint(-1, 20, (b, s, kk), generator=_g(14))
    sink = torch.randn(h, generator=_g(15))
    assert torch.allclose(asc.sparse_attention(qa, pool, idx, sink, 0.25),
                          ref.sparse_attention(qa, pool, idx, sink, 0.25), atol=1e-5)
    kv, sc = torch.randn(b, 12, 2 * d, generator=_g(16)), torch.randn(b, 12, 2 * d, generator=_g(17))
    assert torch.allclose(asc.compress(kv, sc, 4, True), ref.compress(kv, sc, 4, True), atol=1e-6)


def test_moe_matches_reference(pair):
    asc, ref = pair
    t, e, k, dim, inter = 9, 8, 2, 16, 12
    logits = torch.randn(t, e, generator=_g(18))
    bias = 0.1 * torch.randn(e, generator=_g(19))
    hashed = torch.randint(0, e, (t, k), generator=_g(20))
    for bi, hi in ((bias, None), (None, hashed)):
        wa, ia = asc.route(logits, bi, hi, k, 1.5)
        wr, ir = ref.route(logits, bi, hi, k, 1.5)
        assert torch.equal(ia, ir) and torch.allclose(wa, wr, atol=1e-6)
    x = torch.randn(t, dim, generator=_g(21))
    w1, w3 = torch.randn(e, inter, dim, generator=_g(22)) / 4, torch.randn(e, inter, dim, generator=_g(23)) / 4
    w2 = torch.randn(e, dim, inter, generator=_g(24)) / 4
    wts, ids = ref.route(logits, bias, None, k, 1.5)
    for sync_free in (False, True):
        assert torch.allclose(asc.experts(x, wts, ids, w1, w2, w3, None, None, None, 1.0, sync_free),
                              ref.experts(x, wts, ids, w1, w2, w3, None, None, None, 1.0, sync_free), atol=1e-5)
    assert torch.allclose(asc.swiglu_mlp(x, w1[0], w2[0], w3[0], None, None, None, 1.0),
                          ref.swiglu_mlp(x, w1[0], w2[0], w3[0], None, None, None, 1.0), atol=1e-5)


def test_moe_deepseek_numerics_act_quantise_like_reference():
    # numerics="deepseek": FP8 act-quant (1x128, power-of-two scales) in front of both FP4 expert GEMMs, as the
    # reference (and AscendBackend.linear) do. Without it the emulated MoE was 3.4% RMS off on the tiny model
    # (93% of the outputs differ). The quantised operands are exact in bf16, so only fp32 summation order may
    # differ: a bf16 ulp (2^-8 relative) on a few outputs.
    from dsv4_ascend import quant
    from dsv4_ascend.backend import RunOptions

    ds = RunOptions("deepseek")
    asc, ref = AscendBackend(emulator, options=ds), ReferenceBackend(ds)
    t, e, k, dim, inter = 12, 4, 2, 256, 128
    x = torch.randn(t, dim, generator=_g(30)).to(torch.bfloat16)
    w13 = [quant.quantize_fp4(torch.randn(e, inter, dim, generator=_g(31 + i)) / 16) for i in range(2)]
    w2, s2 = quant.quantize_fp4(torch.randn(e, dim, inter, generator=_g(33)) / 16)
    wts, ids = ref.route(torch.randn(t, e, generator=_g(34)), None, None, k, 1.5)
    args = (x, wts, ids, w13[0][0], w2, w13[1][0], w13[0][1], s2, w13[1][1], 10.0)
    for sync_free in (False, True):
        a, r = asc.experts(*args, sync_free), ref.experts(*args, sync_free)
        assert (a.float() - r.float()).abs().max() <= 2**-7 * r.float().abs().max(), sync_free
        assert (a != r).float().mean() <= 0.02


def test_int_matmul_is_exact_without_fp64():
    # The emulator's int8 GEMMs (W8A8 / A8W4) must equal the int32 accumulation exactly: fp32 K-chunks of 1024
    # hold every partial sum (<= 2^24) exactly. Extreme operands (-128 everywhere, K = 4096: the sum is 2^26) and
    # random ones with batch dims, against int64 matmuls.
    from dsv4_ascend.ops.emulator.numerics import _int_matmul

    a = torch.full((2, 4096), -128, dtype=torch.int8)
    assert _int_matmul(a, a.t().contiguous()).tolist() == [[2**26, 2**26], [2**26, 2**26]]
    x = torch.randint(-128, 128, (3, 5, 2500), generator=_g(40), dtype=torch.int8)
    w = torch.randint(-128, 128, (3, 2500, 7), generator=_g(41), dtype=torch.int8)
    assert torch.equal(_int_matmul(x, w).long(), torch.bmm(x.long(), w.long()))


# ---- model level ---------------------------------------------------------------------------------------------------
def test_model_fp32_logits_close():
    # fp32 throughout: the two backends differ only by fp32 rounding order (measured max |diff| 3.6e-6 on logits
    # of magnitude ~1-10), so 1e-4 leaves room for that and none for a layout or semantics bug.
    ids = torch.randint(0, 512, (2, 40), generator=_g(1))
    ref = _bf16_norms(build_tiny())(ids)
    asc = _bf16_norms(build_tiny(backend=AscendBackend(emulator)))(ids)
    assert (asc - ref).abs().max().item() <= 1e-4


B, PROMPT, STEPS = 2, 8, 200


def _greedy(model, forced=None):
    """Prefill PROMPT tokens, then STEPS decode steps with the cache; returns (logits [B, STEPS+1, V], tokens).

    With `forced`, the given tokens are fed (teacher forcing), so both backends see the same sequence and one
    disagreement cannot snowball into a different continuation."""
    prompt = torch.randint(0, 512, (B, PROMPT), generator=_g(5))
    cache = model.new_cache(B, PROMPT + STEPS + 1)
    slots = torch.arange(B)
    out = [model(prompt, cache, slots, 0, last_only=True)[:, -1]]
    toks = []
    for t in range(STEPS):
        nxt = out[-1].argmax(-1) if forced is None else forced[:, t]
        toks.append(nxt)
        out.append(model.decode(nxt.view(B, 1), torch.full((B,), PROMPT + t), cache, slots,
                                max_len=PROMPT + t + 1)[:, 0])
    return torch.stack(out, 1), torch.stack(toks, 1)


@pytest.fixture(scope="module")
def bf16_reference_run():
    return _greedy(_bf16_norms(build_tiny(dtype=torch.bfloat16, backend=ReferenceBackend())))


def _figures(ref: torch.Tensor, got: torch.Tensor) -> dict:
    return {
        "cosine": F.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item(),
        "min_step_cosine": F.cosine_similarity(ref, got, dim=-1).min().item(),
        "top1": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
        "max_abs": (ref - got).abs().max().item(),
        "rel_rms": ((ref - got).square().mean().sqrt() / ref.square().mean().sqrt()).item(),
    }


def test_model_bf16_greedy_parity(bf16_reference_run):
    # Measured over 2 x 201 positions on the whole-128-block tiny preset: cosine 0.99879, top-1 96.8%, rel RMS
    # 4.9%, max |diff| 1.68, worst single step 0.893. The differences come from fp32 accumulation-order
    # differences (grouped expert GEMM vs the reference's gathered einsum, fused ops) that flip a near-tie of a
    # discrete top-k choice. For scale: bf16 vs fp32 *reference* on this model is cosine 0.9966, top-1 92.0%, rel
    # RMS 8.2% (single steps down to 0.83): the bars sit between the measured parity and that bf16 noise floor.
    # (The 64-wide tiny preset measured cosine 0.999901, top-1 100%, against a noise floor of 0.9997.) HCA pages
    # and the 8-row window reach the emulated npu_sparse_attn_sharedkv as blocks of 16 (its documented block
    # sizes), which reorders its fp32 softmax sums: another ~1e-5 of summation-order drift.
    ref_logits, toks = bf16_reference_run
    got, _ = _greedy(_bf16_norms(build_tiny(dtype=torch.bfloat16, backend=AscendBackend(emulator))), toks)
    f = _figures(ref_logits, got)
    assert f["cosine"] >= 0.998, f
    assert f["top1"] >= 0.95, f


def test_model_w8a8_greedy_parity(bf16_reference_run):
    # W8A8 (CR's A2/A3 scheme: int8 per-channel weights on q_b/o_b/indexer q_b/shared+routed experts, per-token
    # dynamic int8 activations, int8 indexer q/k) against the bf16 reference. One int8 operand has a rounding
    # error of step/sqrt(12) with step = amax/127; for Gaussian-like rows (amax ~ 3.5 sigma) that is ~0.8% of
    # the row RMS per operand, ~1.1% per GEMM with both operands quantised, i.e. ~4x bf16's 2^-9 rounding. The
    # model amplifies bf16-level noise to 2.7% RMS on the logits (bf16 vs fp32 reference), so int8 noise
    # lands near 10-15% RMS, cosine ~0.99, top-1 ~90% (measured over 2 x 201 positions: cosine 0.992, top-1
    # 89.6%, rel RMS 12.4%; the indexer's int8 scores also flip some top-k picks). Bounds: rel RMS <= 0.2, cosine >= 0.98,
    # top-1 >= 0.8; a broken int8 path (wrong scale axis, transposed weight) gives O(1) error and chance top-1.
    ref_logits, toks = bf16_reference_run
    be = AscendBackend(emulator, quant="w8a8")
    model = _bf16_norms(build_tiny(dtype=torch.bfloat16, backend=be))
    be.prepare(model)
    assert len(be.scheme.linears) == 12 and len(be.scheme.routed) == 5 and len(be.scheme.shared) == 5  # 4 layers + 1 MTP block
    got, _ = _greedy(model, toks)
    f = _figures(ref_logits, got)
    assert f["rel_rms"] <= 0.2, f
    assert f["cosine"] >= 0.98, f
    assert f["top1"] >= 0.8, f
    assert not math.isnan(f["max_abs"])
