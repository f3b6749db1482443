"""The reference backend's prefill attention and indexer skip what a causal block of queries cannot see; these tests
check the results against the forms that compute (and mask) everything."""
from __future__ import annotations

import pytest
import torch

from dsv4_ascend.backend import RunOptions
from dsv4_ascend.reference import ReferenceBackend
from dsv4_ascend.reference import backend as reference_backend


@pytest.mark.parametrize("dtype,numerics", [(torch.float32, "exact"), (torch.bfloat16, "exact"),
                                            (torch.bfloat16, "deepseek")])
def test_indexer_topk_causal_trim_equals_masked_pick(dtype, numerics):
    # indexer_topk (eager CPU) scores only the entries below the block's largest n_visible; the picks must be
    # exactly those of scoring all N entries and masking (what decode and compiled graphs run). Integer-valued
    # inputs: exact scores with ties (relu zeros among them), so the tie-break is checked too.
    g = torch.Generator().manual_seed(3)
    b, s, h, d, n, k = 2, 16, 4, 32, 300, 8
    be = ReferenceBackend(RunOptions(numerics))
    q = torch.randint(-2, 3, (b, s, h, d), generator=g).to(dtype)
    keys = torch.randint(-2, 3, (b, n, d), generator=g).to(dtype)
    w = torch.randint(-2, 3, (b, s, h), generator=g).float()
    for first in (0, 3, 30, 500, 1100):  # a causal block at positions first..first+s-1, ratio 4
        n_visible = ((first + torch.arange(s) + 1) // 4).clamp(max=n).expand(b, s).contiguous()
        want = be._indexer_pick(be._indexer_scores(q, w, keys), n_visible.clone(), k)
        got = be.indexer_topk(q, w, keys, n_visible, k)
        assert got.shape == (b, s, k)
        assert torch.equal(got, want), first
    # random fp32 values (no ties to hide a changed score)
    q, keys, w = torch.randn(b, s, h, d, generator=g), torch.randn(b, n, d, generator=g), torch.randn(b, s, h)
    n_visible = ((200 + torch.arange(s) + 1) // 4).expand(b, s).contiguous()
    assert torch.equal(be.indexer_topk(q, w, keys, n_visible, k),
                       be._indexer_pick(be._indexer_scores(q, w, keys), n_visible.clone(), k))


def _prefill_logits(model, ids: torch.Tensor, chunks: tuple[int, ...]) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    slots, out, start = torch.arange(ids.shape[0]), [], 0
    for c in chunks:
        out.append(model(ids[:, start:start + c], cache, slots, start))
        start += c
    return torch.cat(out, 1)


@pytest.mark.parametrize("dense_per_pick", [0, 4, 1000])
def test_prefill_attend_equals_gathered_default(tiny_model, monkeypatch, dense_per_pick):
    # ReferenceBackend.attend (prefill: query blocks, one logits buffer, HCA entries past the block's last visible
    # one skipped) against the default attend (every key of every query gathered, masked, `sparse_attention`), on
    # chunked prefills whose starts and ends fall inside and on window (8), CSA (4) and HCA (8) boundaries, 16-query
    # blocks that straddle HCA entries. fp32: the softmax and the value GEMM sum the same non-zero terms in another
    # order (~1e-7 relative); 1e-5 on logits of magnitude ~5 leaves room for that, not for a wrong mask.
    # CSA blocks (top 4 here): every block gathers its picks (0), blocks seeing <= 16 entries take the dense form
    # and later ones gather (4: the chunk at 43 changes form between its blocks), every block is dense (1000).
    monkeypatch.setattr(reference_backend, "_CSA_DENSE_ENTRIES_PER_PICK", dense_per_pick)
    m = tiny_model
    ids = torch.randint(2, 512, (2, 120), generator=torch.Generator().manual_seed(4))
    chunks = (37, 3, 64, 16)
    fast = _prefill_logits(m, ids, chunks)
    be = m.layers[0].attn.backend
    be.sparse_attention = lambda *a: ReferenceBackend.sparse_attention(be, *a)  # not the class's own: the default
    try:
        plain = _prefill_logits(m, ids, chunks)
    finally:
        del be.sparse_attention
    assert (fast - plain).abs().max().item() <= 1e-5
