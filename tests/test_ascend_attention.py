"""V4 attention through CR's `npu_sparse_attn_sharedkv` (emulated): the op against dense float64 math, and
`AscendBackend.attend` (the custom path) against the reference on the tiny model's real cache views."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import build_tiny
from dsv4_ascend.backend import Backend
from dsv4_ascend.ops import AscendBackend, emulator as E
from dsv4_ascend.reference import ReferenceBackend


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- (1) the emulated op vs dense float64 with explicit masks ---------------------------------------------------
def _paged(dense: list[torch.Tensor], block: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch rows [n_b, D] -> (cache [blocks, block, 1, D], int32 table [B, cols]) with shuffled blocks.

    Unused cache rows are filled with 1e3 so that a read through a wrong index shows up in the output."""
    b = len(dense)
    perm = torch.randperm(b * cols, generator=_g(seed)).view(b, cols)
    cache = torch.full((b * cols, block, 1, dense[0].shape[-1]), 1e3, dtype=dense[0].dtype)
    for bi, rows in enumerate(dense):
        for p in range(rows.shape[0]):
            cache[perm[bi, p // block], p % block, 0] = rows[p]
    return cache, perm.int()


def _dense_attention(q, ori, cmp, kv_len, q_counts, left, right, ratio, picks, sinks, scale):
    """float64 loops: per query row, a 0/1 mask over its batch's ori positions and compressed entries, then a
    softmax with a value-less sink logit per head. q [T, H, D]; ori / cmp lists of [n_b, D]; picks [T, K] or None."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    t = 0
    for b, sq in enumerate(q_counts):
        for s in range(sq):
            pos = kv_len[b] - sq + s
            keys, ok = [], []
            for p in range(ori[b].shape[0]):
                keys.append(ori[b][p])
                ok.append(pos - left <= p <= pos + right and p < kv_len[b])
            if cmp is not None:
                listed = set(range(cmp[b].shape[0])) if picks is None else set(picks[t].tolist())
                for j in range(cmp[b].shape[0]):
                    keys.append(cmp[b][j])
                    ok.append(j in listed and j < (pos + 1) // ratio)
            kk = torch.stack(keys).double()
            mask = torch.tensor(ok)
            for h in range(q.shape[1]):
                logit = (kk @ q[t, h].double()) * scale
                sel = logit[mask]
                top = max(sel.max().item() if sel.numel() else -math.inf, sinks[h].item())
                w = torch.exp(sel - top)
                out[t, h] = (w.unsqueeze(-1) * kk[mask]).sum(0) / (w.sum() + math.exp(sinks[h].item() - top))
            t += 1
    return out


@pytest.mark.parametrize("scenario", ["swa", "hca", "csa"])
@pytest.mark.parametrize("mode", ["decode", "multi_query", "bf16_band_right"])
def test_sparse_attn_sharedkv_vs_dense(scenario, mode):
    h, d, ratio, block = 3, 16, 4, 16  # the kernel's block sizes: multiples of 16, <= 1024
    dtype = torch.bfloat16 if mode == "bf16_band_right" else torch.float32
    left, right = (5, 2) if mode == "bf16_band_right" else (6, 0)
    kv_len = [1, 13, 30] if mode == "decode" else [9, 30, 17]
    q_counts = [1, 1, 1] if mode == "decode" else [4, 1, 6]
    t = sum(q_counts)
    ori = [torch.randn(n, d, generator=_g(60 + i)).to(dtype) for i, n in enumerate(kv_len)]
    cmp = [torch.randn(n // ratio + 1, d, generator=_g(70 + i)).to(dtype) for i, n in enumerate(kv_len)]
    ori_cache, ori_table = _paged(ori, block, 4, 80)
    cmp_cache, cmp_table = _paged(cmp, block, 1, 81)
    q = torch.randn(t + 2, h, d, generator=_g(82)).to(dtype)  # two TND tail rows outside every batch
    sinks = torch.randn(h, generator=_g(83))
    cu = torch.tensor([0] + list(torch.tensor(q_counts).cumsum(0)), dtype=torch.int32)
    # distinct per row (as the lightning indexer emits them), some -1, some not yet visible
    picks = torch.stack([torch.randperm(9, generator=_g(84 + r))[:5] for r in range(t + 2)])
    picks = picks.masked_fill(torch.rand(t + 2, 5, generator=_g(85)) < 0.2, -1).int()
    kw = dict(ori_kv=ori_cache, ori_block_table=ori_table, cu_seqlens_q=cu, sinks=sinks, softmax_scale=0.3,
              seqused_kv=torch.tensor(kv_len, dtype=torch.int32), ori_win_left=left, ori_win_right=right,
              layout_q="TND", metadata=E.npu_sparse_attn_sharedkv_metadata(h, 1, d))
    if scenario != "swa":
        kw.update(cmp_kv=cmp_cache, cmp_block_table=cmp_table, cmp_ratio=ratio)
    if scenario == "csa":
        kw.update(cmp_sparse_indices=picks.view(t + 2, 1, 5))
    out, lse = E.npu_sparse_attn_sharedkv(q, **kw)
    assert out.shape == q.shape and out.dtype == dtype and lse.numel() == 0
    exp = _dense_attention(q[:t], ori, None if scenario == "swa" else cmp, kv_len, q_counts, left, right, ratio,
                           picks[:t] if scenario == "csa" else None, sinks, 0.3)
    # fp32: only fp32 accumulation order differs from the float64 loops (|out| ~ 1, D = 16 terms): 1e-5.
    # bf16: same fp32 math on the same (exactly widened) bf16 inputs, rounded once to bf16 at the end: half an
    # ulp, <= 2^-8 relative, plus the fp32 part -> rtol 2^-8, atol 1e-5.
    tol = dict(rtol=2 ** -8, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert torch.allclose(out[:t].double(), exp, **tol)
    assert torch.equal(out[t:], torch.zeros_like(out[t:]))


def test_sparse_attn_sharedkv_bsnd_matches_tnd():
    h, d = 2, 8
    ori = [torch.randn(10, d, generator=_g(90 + i)) for i in range(2)]
    cache, table = _paged(ori, 16, 3, 91)
    q = torch.randn(2, 3, h, d, generator=_g(92))
    kw = dict(ori_kv=cache, ori_block_table=table, seqused_kv=torch.tensor([7, 10], dtype=torch.int32),
              sinks=torch.randn(h, generator=_g(93)), ori_win_left=3)
    bsnd, _ = E.npu_sparse_attn_sharedkv(q, layout_q="BSND", **kw)
    tnd, _ = E.npu_sparse_attn_sharedkv(q.view(6, h, d), layout_q="TND",
                                        cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32), **kw)
    assert torch.equal(bsnd.view(6, h, d), tnd)
    exp = _dense_attention(q.view(6, h, d), ori, None, [7, 10], [3, 3], 3, 0, 1, None, kw["sinks"], d ** -0.5)
    assert torch.allclose(tnd.double(), exp, rtol=1e-5, atol=1e-5)


def test_sparse_attn_sharedkv_rejects_bad_arguments():
    q = torch.randn(2, 2, 8)
    cache, table = _paged([torch.randn(4, 8)], 16, 1, 94)
    base = dict(ori_kv=cache, ori_block_table=table, cu_seqlens_q=torch.tensor([0, 2], dtype=torch.int32),
                layout_q="TND")
    for rows in (8, 2, 1040):  # documented: block sizes are multiples of 16, at most 1024 (HCA pages of 256/128)
        small, small_table = _paged([torch.randn(min(rows, 4), 8)], rows, 1, 94)
        with pytest.raises(ValueError, match="block size"):
            E.npu_sparse_attn_sharedkv(q, **{**base, "ori_kv": small, "ori_block_table": small_table})
        with pytest.raises(ValueError, match="block size"):
            E.npu_sparse_attn_sharedkv(q, cmp_kv=small, cmp_block_table=small_table, cmp_ratio=4, **base)
    with pytest.raises(ValueError, match="ori_kv must be"):
        E.npu_sparse_attn_sharedkv(q, **{**base, "ori_kv": cache.bfloat16()})
    with pytest.raises(ValueError, match="cmp_ratio"):
        E.npu_sparse_attn_sharedkv(q, cmp_kv=cache, cmp_block_table=table, **base)
    with pytest.raises(TypeError, match="int32"):
        E.npu_sparse_attn_sharedkv(q, cmp_kv=cache, cmp_block_table=table, cmp_ratio=4,
                                   cmp_sparse_indices=torch.zeros(2, 1, 3, dtype=torch.long), **base)


# ---- (2, 3) AscendBackend.attend on the tiny model's real views -------------------------------------------------
class _Counting:
    """The emulator as custom-op provider, counting npu_sparse_attn_sharedkv calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(E, name)

    def npu_sparse_attn_sharedkv(self, *args, **kw):
        self.calls += 1
        return E.npu_sparse_attn_sharedkv(*args, **kw)


class _Compare(ReferenceBackend):
    """Reference backend whose `attend` also runs AscendBackend.attend on the same view and records the gap.

    The model continues with the reference result, so both see exactly the same cache states."""

    def __init__(self, asc: AscendBackend) -> None:
        super().__init__()
        self.asc, self.gaps, self.views = asc, [], []

    def attend(self, q, view, sink, scale):
        ref = Backend.attend(self, q, view, sink, scale)
        got = self.asc.attend(q, view, sink, scale)
        self.views.append((view.chunk is None, view.ratio, view.picks is not None, view.entries_in_store))
        self.gaps.append(((got.float() - ref.float()).abs().max().item(), ref.float().abs().max().item(),
                          torch.allclose(got.float(), ref.float(), **self.tol)))
        return ref


def _no_composite(*_a, **_k):
    raise AssertionError("the custom path fell back to the composite")


def _interleaved_cache(model, slots: int, tokens: int, block: int):
    """A cache whose pages alternate between slots (physical order differs from logical order)."""
    cache = model.new_cache(slots, tokens, block_size=block, preassign=False)
    for n in range(block, cache.max_seq_len + 1, block):
        for s in reversed(range(slots)):
            cache.allocate(s, n)
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_custom_path_matches_reference_on_model_views(dtype):
    prov = _Counting()
    asc = AscendBackend(E, custom=prov)
    asc.sparse_attention = _no_composite  # every call below must take the kernel
    cmp = _Compare(asc)
    # fp32: the two differ only in fp32 summation order over <= ~30 keys of |v| ~ 1: 1e-5.
    # bf16: both accumulate in fp32 from the same bf16 values, then round once: at most one bf16 ulp apart,
    # an ulp being <= 2^-7 of the value.
    cmp.tol = dict(rtol=2 ** -7, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    model = build_tiny(dtype=dtype, backend=cmp)
    cache = _interleaved_cache(model, 3, 96, 16)  # 4 CSA / 2 HCA entries per page, window 8
    lens = {2: 13, 0: 22}
    for slot, n in lens.items():  # chunked prefill: the second chunk starts mid-window and mid-compression
        ids = torch.randint(0, 512, (1, n), generator=_g(slot))
        model(ids[:, :5], cache, torch.tensor([slot]), 0)
        model(ids[:, 5:], cache, torch.tensor([slot]), 5)
    slots = torch.tensor(list(lens))
    pos = torch.tensor(list(lens.values()))
    tok = torch.randint(0, 512, (2, 1), generator=_g(7))
    for _ in range(18):  # crosses window, CSA (4) and HCA (8) boundaries for both rows
        logits = model.decode(tok, pos, cache, slots, max_len=int(pos.max()) + 1)
        tok, pos = logits[:, -1].argmax(-1, keepdim=True), pos + 1
    assert prov.calls == len(cmp.gaps) == len(model.layers) * (4 + 18)  # 4 prefill chunks, 18 decode steps
    kinds = set(cmp.views)
    assert {(True, 0, False, True), (True, 4, True, True), (True, 8, False, True),
            (False, 0, False, True), (False, 4, True, True), (False, 8, False, True)} <= kinds
    bad = [g for g in cmp.gaps if not g[2]]
    assert not bad, (len(bad), max(g[0] for g in cmp.gaps))


def test_attend_falls_back_where_the_kernel_cannot_read_the_keys():
    """Only without a provider (deferred prefill, C8 and V4-Pro's 1024 picks take the kernels now:
    tests/test_ascend_fp8_kv.py)."""
    composite = []
    plain = AscendBackend(E, custom=None)
    plain.sparse_attention = lambda *a: composite.append(1) or ReferenceBackend.sparse_attention(plain, *a)
    cmp = _Compare(plain)
    cmp.tol = dict(rtol=1e-5, atol=1e-5)  # fp32; the composite cases are the reference's code (equal)
    model = build_tiny(backend=cmp)
    ids = torch.randint(0, 512, (1, 12), generator=_g(8))
    model(ids, model.new_cache(1, 64), torch.tensor([0]), 0)
    assert len(composite) == len(model.cfg.layer_ratios) and all(g[2] for g in cmp.gaps)


def test_attend_decode_compiles_fullgraph():
    """The custom decode path has no host reads: torch.compile(fullgraph=True) captures it."""
    asc = AscendBackend(E, custom=E)
    model = build_tiny()
    cache = model.new_cache(2, 48, block_size=16)
    ids = torch.randint(0, 512, (2, 19), generator=_g(9))
    model(ids, cache, torch.arange(2), 0)
    from dsv4_ascend.attention_view import KVView

    lc = cache.layers[1]  # CSA
    h, d = model.cfg.num_attention_heads, model.cfg.head_dim
    slots = torch.arange(2)
    table = lc.block_table[slots]

    def step(q, positions, picks):
        view = KVView(lc.window, slots, positions, None, None, 48, 4, lc.entries,
                      table, picks)
        return asc.attend(q, view, model.layers[1].attn.attn_sink, d ** -0.5)

    q = torch.randn(2, 1, h, d, generator=_g(10))
    positions = torch.tensor([[18], [11]])
    picks = torch.tensor([[[0, 3, -1, 2]], [[1, -1, -1, 0]]])
    eager = step(q, positions, picks)
    compiled = torch.compile(step, fullgraph=True, backend="eager")(q, positions, picks)
    assert torch.equal(eager, compiled)
    view = KVView(lc.window, slots, positions, None, None, 48, 4, lc.entries, table, picks)
    ref = ReferenceBackend().attend(q, view, model.layers[1].attn.attn_sink, d ** -0.5)
    assert torch.allclose(eager, ref, rtol=1e-5, atol=1e-5)
