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
