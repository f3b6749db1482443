"""V4-Pro-shaped attention (index_topk 1024, HCA layers first) and C8 (FP8) KV caches on the fused Ascend path
(emulated): a counting provider shows that prefill, decode and MTP verify (deferred prefill) reach the shared-KV
kernels in every layer and never the composite, that the kernel metadata is built once per step and kind (not per
layer), and each fused call matches the reference composite on the same cache view."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import build_tiny
from dsv4_ascend.config import preset
from dsv4_ascend.ops import AscendBackend, emulator as E
from test_ascend_attention import _Compare, _no_composite

# The tiny preset's widths with V4-Pro's attention shape: index_topk 1024 and HCA before CSA (Pro's layers start
# 128, 128, 4, 128, ...; HCA ratio 8 here so short prompts close entries), MTP block last.
PRO_TINY = dataclasses.replace(preset("tiny"), index_topk=1024, compress_ratios=[8, 4, 8, 4, 0])


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Counting:
    """The emulator as custom-op provider, recording every shared-KV kernel and metadata call."""

    def __init__(self) -> None:
        self.kernel, self.meta = [], []

    def __getattr__(self, name: str):
        return getattr(E, name)

    def _kern(self, name, *a, **kw):
        idx = kw.get("cmp_sparse_indices")
        self.kernel.append((name, kw.get("cmp_ratio"), 0 if idx is None else idx.shape[-1]))
        return getattr(E, name)(*a, **kw)

    def npu_sparse_attn_sharedkv(self, *a, **kw):
        return self._kern("npu_sparse_attn_sharedkv", *a, **kw)

    def npu_kv_quant_sparse_attn_sharedkv(self, *a, **kw):
        return self._kern("npu_kv_quant_sparse_attn_sharedkv", *a, **kw)

    def npu_sparse_attn_sharedkv_metadata(self, *a, **kw):
        self.meta.append(("bf16", kw["cmp_ratio"], kw["cmp_topk"]))
        return E.npu_sparse_attn_sharedkv_metadata(*a, **kw)

    def npu_kv_quant_sparse_attn_sharedkv_metadata(self, *a, **kw):
        self.meta.append(("c8", kw["cmp_ratio"], kw["cmp_topk"]))
        return E.npu_kv_quant_sparse_attn_sharedkv_metadata(*a, **kw)


@pytest.mark.parametrize("kv_fp8", [False, True], ids=["bf16-cache", "c8-cache"])
def test_pro_prefill_decode_verify_all_fused(kv_fp8):
    prov = _Counting()
    asc = AscendBackend(E, custom=prov)
    asc.sparse_attention = _no_composite  # the composite must never run
    cmp = _Compare(asc)
    # fp32: the kernel and the composite read the same stored values (C8: the same bytes, decoded exactly) and
    # differ only in fp32 summation order over <= 8 + 1024 keys of |v| ~ 1: 1e-5.
    cmp.tol = dict(rtol=1e-5, atol=1e-5)
    model = build_tiny(cfg=PRO_TINY, backend=cmp)
    ratios = model.cfg.layer_ratios
    kinds = len({r for r in ratios})  # one metadata per (ratio, K2) kind and step
    # 2304 tokens of capacity: decode reads 576 CSA entries, so the indexer emits 576 > 512 picks -> K2 = 1024
    cache = model.new_cache(2, 2304, kv_fp8=kv_fp8, block_size=64)
    ids = torch.randint(0, 512, (2, 40), generator=_g(0))
    slots = torch.tensor([1, 0])
    steps = []

    def run(fn):
        k0, m0 = len(prov.kernel), len(prov.meta)
        out = fn()
        steps.append((prov.kernel[k0:], prov.meta[m0:]))
        return out

    run(lambda: model(ids[:, :21], cache, slots, 0))  # chunked prefill: mid-window, mid-compression
    run(lambda: model(ids[:, 21:30], cache, slots, 21))
    tok, pos = ids[:, 30:31], torch.tensor([30, 30])
    for _ in range(5):
        logits = run(lambda: model.decode(tok, pos, cache, slots))
        tok, pos = logits[:, -1].argmax(-1, keepdim=True), pos + 1
    # MTP verify: a deferred prefill of 4 draft tokens (entries not committed to the pages), then commit 2
    _, _, commit = run(lambda: model.prefill(ids[:, 35:39], cache, slots, 35, defer=True))
    commit(2)
    name = "npu_kv_quant_sparse_attn_sharedkv" if kv_fp8 else "npu_sparse_attn_sharedkv"
    for kern, meta in steps:
        assert [k[0] for k in kern] == [name] * len(ratios)  # every layer fused, the right kernel
        assert len(meta) == kinds  # metadata built once per kind, shared by the layers of the step
    decode_k2 = {k[2] for kern, _ in steps[2:7] for k in kern if k[1] == 4}
    prefill_k2 = {k[2] for kern, _ in steps[:2] + steps[7:] for k in kern if k[1] == 4}
    assert decode_k2 == {1024} and prefill_k2 == {512}
    assert len(cmp.gaps) == len(ratios) * len(steps)
    assert {v[3] for v in cmp.views} == {True, False}  # deferred views (entries not in the pages) were seen
    bad = [g for g in cmp.gaps if not g[2]]
    assert not bad, (len(bad), max(g[0] for g in cmp.gaps))


def test_c8_cache_rows_are_the_kernel_layout_and_the_950_epilogue_writes_them():
    """A bf16 C8 cache written through the 950 backend's kv_compress_epilog hook holds the bytes the cache's own
    packing writes (both: the epilogue's layout and scale rule)."""
    from dsv4_ascend.cache import c8_pack, c8_unpack

    ids = torch.randint(0, 512, (1, 19), generator=_g(1))
    got, calls = {}, []
    for quant in ("bf16", "fp8"):
        be = AscendBackend(E, custom=E, quant=quant)
        assert (be.c8_write is not None) == (quant == "fp8")
        if be.c8_write is not None:
            be.c8_write = lambda *a, _f=be.c8_write: calls.append(1) or _f(*a)
        model = build_tiny(cfg=PRO_TINY, dtype=torch.bfloat16, backend=be)  # plain bf16 weights: bf16 linears
        cache = model.new_cache(1, 64, kv_fp8=True)
        model(ids, cache, torch.tensor([0]), 0)
        got[quant] = [t for lc in cache.layers for t in (lc.window.data,) + (
            (lc.entries.data,) if lc.entries is not None else ())]
    assert calls and all(t.dtype == torch.uint8 and t.shape[-1] == 256 for t in got["fp8"])  # 128 + 64 + 1 -> 256
    # Layer 0 runs before any indexer (whose FP8 picks on the 950 path differ from bf16 ones): same kv, so the
    # epilogue's window rows equal the cache's packing byte for byte.
    assert torch.equal(got["fp8"][0], got["bf16"][0])
    rows = torch.cat([t.reshape(-1, 256) for t in got["fp8"]])
    rows = rows[rows.ne(0).any(-1)]  # never-written rows are all zero (the MTP block's, unused pages)
    assert rows.shape[0] > 19
    assert torch.equal(c8_pack(c8_unpack(rows, 128, 64, torch.bfloat16), 64, torch.bfloat16), rows)


def test_shared_metadata_is_captured_once_per_step_in_graph_mode():
    """Two CSA layers' decode attention traced as one graph (fullgraph): with the step's shared dict the kernel
    metadata (and the ring block table) appear once in the captured graph, without it once per layer."""
    from dsv4_ascend.attention_view import KVView

    asc = AscendBackend(E, custom=E)
    model = build_tiny(cfg=PRO_TINY)
    cache = model.new_cache(2, 48, block_size=16)
    model(torch.randint(0, 512, (2, 19), generator=_g(2)), cache, torch.arange(2), 0)
    layers = [i for i, r in enumerate(model.cfg.layer_ratios) if r == 4]
    h, d = model.cfg.num_attention_heads, model.cfg.head_dim
    slots = torch.arange(2)

    def step(q, positions, picks, share: bool):
        shared = {} if share else None
        outs = []
        for i in layers:
            lc = cache.layers[i]
            view = KVView(lc.window, slots, positions, None, None, 48, 4, lc.entries, lc.block_table[slots], picks,
                          shared=shared)
            outs.append(asc.attend(q, view, model.layers[i].attn.attn_sink, d ** -0.5))
        return torch.stack(outs)

    def metadata_nodes(share: bool) -> int:
        found = []

        def backend(gm, _inputs):
            found.append(sum(1 for n in gm.graph.nodes if n.target is torch.zeros and tuple(n.args[:1]) == (1024,)))
            return gm.forward

        torch._dynamo.reset()
        args = (torch.randn(2, 1, h, d, generator=_g(3)), torch.tensor([[18], [11]]),
                torch.tensor([[[0, 3, -1, 2]], [[1, -1, -1, 0]]]))
        out = torch.compile(lambda *a: step(*a, share), fullgraph=True, backend=backend)(*args)
        assert torch.equal(out, step(*args, share))
        return found[0]

    assert len(layers) == 2 and metadata_nodes(True) == 1 and metadata_nodes(False) == 2
