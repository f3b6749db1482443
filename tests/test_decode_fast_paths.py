"""The eager decode step's cheaper forms equal the forms they replace, bit for bit.

Each rewrite keeps the same arithmetic (the same GEMMs on the same operands, the same masks, the same order of
the fp32 sums) with fewer kernels; these tests run the old form next to the new one on the shapes decode and
prefill use, in fp32 and bf16, and fail on any differing bit.
"""
from __future__ import annotations

import pytest
import torch

from dsv4_ascend.backend import Backend
from dsv4_ascend.cache import CompressorState
from dsv4_ascend.config import preset
from dsv4_ascend.decode_step import EagerDecoder
from dsv4_ascend.rope import RopeTable
from dsv4_ascend.reference import ReferenceBackend
from dsv4_ascend.sampling import SamplingParams

BE = ReferenceBackend()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio,overlap", [(4, True), (8, False), (16, False)])
def test_decode_compressor_equals_composite(ratio, overlap, dtype):
    """ReferenceBackend.compressor's decode form (write the row, then read the ring in position order) gives the
    composite `Backend.compressor`'s entries and state, bit for bit, at every position of the first windows (w = 0
    has no previous window) and far into a sequence, two rows at different positions."""
    cfg = preset("small")
    d, dim, b = 128, 96, 2  # rope on the last qk_rope_head_dim = 64 dims
    c = 2 * d if overlap else d
    g = _gen(ratio)
    wkv = (torch.randn(c, dim, generator=g) * 0.1).to(dtype)
    wgate = (torch.randn(c, dim, generator=g) * 0.1).to(dtype)
    ape = torch.randn(ratio, c, generator=g)
    norm_w = torch.rand(d, generator=g) + 0.5
    st = CompressorState.allocate(b, ratio, d, overlap, "cpu")
    st.state.copy_(torch.randn(st.state.shape, generator=g))  # stale rows everywhere: they must stay masked
    table = RopeTable.compress(cfg)
    slots = torch.tensor([1, 0])
    changed = 0
    for p in list(range(3 * ratio)) + [1000 + i for i in range(2 * ratio)]:
        start = torch.tensor([p, p + 5])
        x = torch.randn(b, 1, dim, generator=g).to(dtype)
        cos, sin = table.cos_sin(((start // ratio).unsqueeze(1) + torch.arange(1)) * ratio)
        s_old, s_new = st.state.clone(), st.state.clone()
        blocks = st.blocks(slots)
        old = Backend.compressor(BE, x, wkv, wgate, ape, norm_w, 1e-6, s_old, blocks, start, cos, sin, ratio)
        new = BE.compressor(x, wkv, wgate, ape, norm_w, 1e-6, s_new, blocks, start, cos, sin, ratio)
        closed = ((start + 1) % ratio == 0).view(b, 1, 1)  # rows of windows still open are unspecified
        assert torch.equal(torch.where(closed, old, 0), torch.where(closed, new, 0)), p
        assert torch.equal(s_old, s_new), p
        changed += int(not torch.equal(s_new, st.state))
        st.state.copy_(s_new)
    assert changed > 0  # the state did move: the comparison saw real updates


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (1, 7), (3, 33)])
def test_hc_post_matmul_equals_einsum(lead, dtype):
    """hc_post's stream mix as one matmul of comb^T is einsum's form ("...ij,...id->...jd") bit for bit."""
    g = _gen(7)
    d = 256
    f = torch.randn(*lead, d, generator=g).to(dtype)
    x = torch.randn(*lead, 4, d, generator=g).to(dtype)
    post = torch.rand(*lead, 4, generator=g) * 2
    comb = torch.rand(*lead, 4, 4, generator=g)
    mixed = torch.einsum("...ij,...id->...jd", comb, x.float())
    old = mixed.add_(post.unsqueeze(-1) * f.float().unsqueeze(-2)).to(dtype)
    assert torch.equal(BE.hc_post(f, x, post, comb), old)


def test_eager_decode_step_runs_in_inference_mode(tiny_model):
    """The eager step's tensors are inference tensors (no autograd bookkeeping per op), and the cache it wrote is
    still a normal tensor that a later prefill may update in place."""
    cache = tiny_model.new_cache(1, 64)
    ids = torch.tensor([[3, 5, 7, 11]])
    tiny_model.prefill(ids, cache, torch.tensor([0]), 0)
    out = EagerDecoder(tiny_model, cache).step(torch.tensor([[2]]), torch.tensor([4]), torch.tensor([0]),
                                                [SamplingParams(temperature=0)])
    assert out.logits.is_inference() and out.tokens.is_inference()
    assert not any(t.is_inference() for lc in cache.layers for t in lc.tensors())
    tiny_model.prefill(torch.tensor([[int(out.tokens[0])]]), cache, torch.tensor([0]), 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (8, 1), (1, 7), (3, 33), (1, 256)])
@pytest.mark.parametrize("inference", [False, True])
def test_hc_pre_eager_equals_emulated_npu_hc_pre(lead, dtype, inference):
    """The eager hc_pre (gates' scale and bias as one multiply + one add, each gate's slice made contiguous
    before its sigmoid, cached Sinkhorn operands, cached 0-dim scalars) equals the emulated npu_hc_pre bit for
    bit at decode and prefill shapes, inside and outside inference mode (the cached operands serve both)."""
    from dsv4_ascend.ops.emulator import npu_hc_pre

    g = _gen(11)
    n, d = 4, 256
    fn = torch.randn((2 + n) * n, n * d, generator=g) / 8
    base, scale = torch.randn((2 + n) * n, generator=g) / 2, torch.rand(3, generator=g) + 0.5
    x = torch.randn(*lead, n, d, generator=g).to(dtype)
    with torch.inference_mode(inference):
        got = BE.hc_pre(x, fn, base, scale, 20, 1e-6, 1e-6)
    want = npu_hc_pre(x, fn, scale, base, hc_mult=n, hc_sinkhorn_iters=20, norm_eps=1e-6, hc_eps=1e-6)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_scalar_operand_equals_python_number(dtype):
    """`scalar(v)` (a cached 0-dim fp32 / int64 tensor) in an op gives what the Python number gives, dtype and
    bits: it neither promotes the other operand nor rounds v differently (eps 1e-6, a head_dim ** -0.5 scale)."""
    from dsv4_ascend.scalar_consts import cast, scalar

    x = torch.randn(3, 5, 64, generator=_gen(12)).to(dtype)
    for v in (1e-6, 192 ** -0.5, 2.0, float("-inf")):
        for a, b in ((x + scalar(v), x + v), (x * scalar(v), x * v), (x.float().clone().add_(scalar(v)), x.float() + v)):
            assert a.dtype == b.dtype and torch.equal(a, b), v
    p = torch.arange(-40, 40)
    for m in (4, 16):
        assert torch.equal(p // scalar(m, torch.int64), p // m) and (p // scalar(m, torch.int64)).dtype == torch.int64
    assert cast(x, dtype) is x and cast(x, torch.float32).dtype == torch.float32
    with torch.inference_mode():
        assert not scalar(3.5).is_inference()  # created outside inference mode, usable in both


def test_compressor_one_window_positions_and_mask_equal_general_form():
    """Compressor.forward's one-window form (decode): the window's rope position start // m * m and the closed
    mask `closed > 0` are the general form's ((start // m) + arange(1)) * m and arange(1) < closed."""
    start = torch.arange(0, 200)
    for m in (4, 16, 128):
        general = ((start // m).unsqueeze(1) + torch.arange(1)) * m
        assert torch.equal((start // m * m).unsqueeze(1), general)
        closed = (start % m + 1) // m
        assert torch.equal((closed > 0).view(-1, 1, 1), (torch.arange(1) < closed.unsqueeze(1)).unsqueeze(-1))


def _sparse_attention_before(q, kv, idx, sink, scale):
    """ReferenceBackend.sparse_attention as it was (row offsets as n * arange(b), mask as ~(idx >= 0))."""
    b = q.shape[0]
    valid = idx >= 0
    n, d = kv.shape[1], kv.shape[2]
    flat = (idx.clamp(min=0) + n * torch.arange(b).view(b, 1, 1)).reshape(-1)
    keys = kv.reshape(b * n, d).index_select(0, flat).view(*idx.shape, d).float()
    logits = torch.matmul(q.float(), keys.transpose(-1, -2)).mul_(scale)
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    sink_col = sink.float().view(1, 1, -1, 1).expand(*logits.shape[:3], 1)
    probs = torch.softmax(torch.cat([logits, sink_col], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs, keys).to(q.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,s", [(1, 1), (3, 1), (2, 5)])
def test_sparse_attention_equals_previous_form(b, s, dtype):
    g = _gen(13)
    h, d, n, k = 4, 32, 40, 9
    q = torch.randn(b, s, h, d, generator=g).to(dtype)
    kv = torch.randn(b, n, d, generator=g).to(dtype)
    idx = torch.randint(-1, n, (b, s, k), generator=g)
    sink = torch.randn(h, generator=g)
    assert torch.equal(BE.sparse_attention(q, kv, idx, sink, d ** -0.5), _sparse_attention_before(q, kv, idx, sink,
                                                                                                  d ** -0.5))


def test_eager_greedy_step_equals_next_tokens(tiny_model):
    """An all-greedy step without logit rules calls `greedy` directly: the tokens and logprobs `next_tokens`
    gives for the same logits."""
    from dsv4_ascend.decode_step import next_tokens
    from dsv4_ascend.sampling import SamplingBatch

    cache = tiny_model.new_cache(2, 64)
    tiny_model.prefill(torch.tensor([[3, 5, 7, 11], [2, 4, 6, 8]]), cache, torch.tensor([0, 1]), 0)
    params = [SamplingParams(temperature=0)] * 2
    pos = torch.tensor([4, 4])
    out = EagerDecoder(tiny_model, cache).step(torch.tensor([[2], [9]]), pos, torch.tensor([0, 1]), params)
    tokens, logprobs = next_tokens(out.logits, SamplingBatch.of(params, out.logits.device), pos + 1,
                                   tiny_model.backend.sample, True)
    assert torch.equal(out.tokens, tokens) and torch.equal(out.logprobs, logprobs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prompts,ascend", [([7], False), ([5, 13, 22], False), ([5, 13, 22], True)])
def test_decode_with_host_lengths_equals_always_emit(prompts, ascend, dtype):
    """Eager decode given the rows' host lengths (a compressor only advances its state on steps where no row
    closes a window) gives the always-emit step's logits bit for bit, over 48 greedy steps that cross many CSA
    (ratio 4) and HCA (ratio 16) entry boundaries; batch 1 and a ragged batch of 3 whose rows close windows on
    different steps; the reference and the emulated Ascend backend (its fused custom `compressor` on the emit
    steps, the composite state rows on the others). The pages start full of stale finite values (a reused page),
    not zeros."""
    from dsv4_ascend.config import ModelConfig
    from dsv4_ascend.ops import AscendBackend, emulator
    from conftest import build_tiny

    cfg = ModelConfig.from_dict({**preset("tiny").to_dict(), "compress_ratios": [0, 4, 16, 4, 0]})
    model = build_tiny(3, dtype, cfg, AscendBackend(emulator, custom=emulator) if ascend else None)
    b, steps = len(prompts), 48
    g = _gen(5)
    caches = [model.new_cache(b, max(prompts) + steps + 1) for _ in range(2)]
    for lc in caches[0].layers:
        for store in (lc.entries, lc.index_keys):
            if store is not None:
                store.data.copy_(torch.randn(store.data.shape, generator=g).to(store.data.dtype))
    for lc_a, lc_b in zip(caches[0].layers, caches[1].layers):
        for a, c in ((lc_a.entries, lc_b.entries), (lc_a.index_keys, lc_b.index_keys)):
            if a is not None:
                c.data.copy_(a.data)
    slots = torch.arange(b)
    ids = torch.randint(2, cfg.vocab_size, (b, max(prompts)), generator=g)
    with torch.inference_mode():
        for cache in caches:
            model.prefill(ids, cache, slots, [0] * b, lengths=prompts)
        nxt = ids.gather(1, torch.tensor(prompts).view(-1, 1) - 1)  # each row's last prompt token, fed again
        pos = torch.tensor(prompts) - 1
        closes = skips = 0
        for t in range(steps):
            p = pos + t
            lengths = (p + 1).tolist()
            a = model.decode(nxt, p, caches[0], slots, max_len=max(lengths))
            c = model.decode(nxt, p, caches[1], slots, max_len=max(lengths), lengths=lengths)
            assert torch.equal(a, c), (t, lengths)
            nxt = a[:, -1].argmax(-1, keepdim=True)
            closes += any(n % 16 == 0 for n in lengths)
            skips += not any(n % 4 == 0 for n in lengths)
    assert closes >= 3 and skips >= 10  # both ratios closed entries, and steps did skip the emit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", [0, 1])  # sliding window only; CSA (window + picks from the pages)
def test_window_picks_decode_attend_equals_default(layer, dtype):
    """ReferenceBackend.attend's decode form for window (+ CSA picks) layers gives the default `Backend.attend`
    (pool + indices + sparse_attention) bit for bit: rows whose window reaches before position 0, and picks
    with -1 holes."""
    from dsv4_ascend.attention_view import KVView
    from conftest import build_tiny

    model = build_tiny(4, dtype)
    cfg, g = model.cfg, _gen(11)
    cache = model.new_cache(2, 48, block_size=16)
    model(torch.randint(0, cfg.vocab_size, (2, 40), generator=g), cache, torch.arange(2), 0)
    lc, attn = cache.layers[layer], model.layers[layer].attn
    h, d = cfg.num_attention_heads, cfg.head_dim
    slots = torch.tensor([1, 0])
    for positions, picks in [([[39], [21]], [[[0, 3, -1, 2]], [[1, -1, -1, 0]]]), ([[2], [0]], [[[-1] * 4]] * 2),
                             ([[9], [30]], [[[1, 0, -1, -1]], [[6, 2, 4, 5]]])]:
        q = torch.randn(2, 1, h, d, generator=g).to(dtype)
        view = KVView(lc.window, slots, torch.tensor(positions), None, None, 48, attn.ratio, lc.entries,
                      lc.block_table[slots], torch.tensor(picks) if attn.ratio else None)
        new = BE.attend(q, view, attn.attn_sink, d ** -0.5)
        assert torch.equal(new, Backend.attend(BE, q, view, attn.attn_sink, d ** -0.5)), positions
