"""The 1M-token context: the `long` preset, exact top-k, bounded per-block temporaries, positions up to 2^20.

fp32 throughout: two chunkings (or decode vs prefill) run the same ops on different shapes, so they differ only by
fp32 rounding (~1e-6 relative); 1e-4 absolute on logits of magnitude ~1-10 leaves room for that, not for bugs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import dsv4_ascend.backend as backend_mod
import dsv4_ascend.model as model_mod
import dsv4_ascend.reference.backend as ref_backend_mod
from dsv4_ascend.attention_view import PagedRows
from dsv4_ascend.cache import RowStore
from dsv4_ascend.config import preset
from dsv4_ascend.engine import Engine, prefill_working_set
from dsv4_ascend.model import Transformer
from dsv4_ascend.reference import ReferenceBackend
from dsv4_ascend.sampling import SamplingParams
from dsv4_ascend.tiny import random_weights
import dsv4_ascend.topk as topk_mod
from dsv4_ascend.topk import order_keys, stable_topk, stable_topk_masked, stable_topk_visible
from dsv4_ascend.weights import assign_tensors

TOL = 1e-4

_BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench_long.py"
_spec = importlib.util.spec_from_file_location("bench_long", _BENCH)
bench_long = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_long)
MAX_POS = 1 << 20


def _long_model(seed: int = 0) -> Transformer:
    cfg = preset("long")
    m = Transformer(cfg, ReferenceBackend(), torch.float32, n_mtp=0)
    assign_tensors(m, [(k, v) for k, v in random_weights(cfg, seed).items() if not k.startswith("mtp.")])
    return m


@pytest.fixture(scope="module")
def long_model() -> Transformer:
    return _long_model()


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 512, (1, n), generator=torch.Generator().manual_seed(seed))


def _prefill(model, cache, ids: torch.Tensor, start: int, chunk: int) -> torch.Tensor:
    """Prefill ids at positions start.. in chunks of `chunk`; the last position's fp32 logits [V]."""
    slot = torch.zeros(1, dtype=torch.int64)
    for s in range(0, ids.shape[1], chunk):
        logits = model(ids[:, s:s + chunk], cache, slot, start + s, last_only=True)
    return logits[0, -1]


def _recompute(model, cache, last_logits: torch.Tensor, out: list[int], start: int) -> list[int]:
    """Greedy tokens by prefill: argmax of the prompt's last logits, then of one chunk over out[:-1] at `start`."""
    chunk = model(torch.tensor([out[:-1]]), cache, torch.zeros(1, dtype=torch.int64), start)
    return [int(last_logits.argmax())] + chunk[0].argmax(-1).tolist()


def test_long_preset_has_v4_context_settings():
    c, flash = preset("long"), preset("v4-flash")
    for key in ("sliding_window", "index_topk", "rope_factor", "rope_original_max_position", "rope_beta_fast",
                "rope_beta_slow", "rope_theta", "compress_rope_theta", "max_position_embeddings"):
        assert getattr(c, key) == getattr(flash, key), key
    assert c.max_position_embeddings == MAX_POS == c.rope_factor * c.rope_original_max_position
    assert set(c.layer_ratios) == {0, 4, 128}


def test_stable_topk_equals_stable_sort():
    # Integer scores: many ties (also +-0 and -inf); the first k of a stable descending sort is the contract.
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 600, (1,), generator=g))
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        s = torch.randint(-3, 4, (3, n), generator=g).float()
        if trial % 4 == 0:
            s = s * 0.0 * torch.randn(3, n, generator=g).sign()  # +0 and -0 compare equal
        s = torch.where(torch.rand(3, n, generator=g) < 0.3, float("-inf"), s)
        if trial % 3 == 0:
            s = torch.randn(3, n, generator=g)
        vals, idx = stable_topk(s, k)
        ref_vals, ref_idx = torch.sort(s, dim=-1, descending=True, stable=True)
        assert torch.equal(idx, ref_idx[..., :k]), (trial, n, k)
        assert torch.equal(vals, ref_vals[..., :k])
    with pytest.raises(ValueError, match="k=5, N=4"):
        stable_topk(torch.zeros(4), 5)


def test_stable_topk_large_rows_and_half_precision():
    # N = 2^18 (the CSA entries at 1M tokens) with ties at the k-th value, and bf16 scores (exact in fp32).
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 50, (3, 1 << 18), generator=g).float()  # ~5,000 copies of each value: ties everywhere
    vals, idx = stable_topk(s, 512)
    ref_vals, ref_idx = torch.sort(s, dim=-1, descending=True, stable=True)
    assert torch.equal(idx, ref_idx[..., :512]) and torch.equal(vals, ref_vals[..., :512])
    b = torch.randn(4, 300, generator=g).bfloat16()
    vals, idx = stable_topk(b, 100)
    assert vals.dtype == torch.bfloat16
    assert torch.equal(idx, torch.sort(b.float(), dim=-1, descending=True, stable=True).indices[..., :100])
    with pytest.raises(ValueError, match="float64"):
        order_keys(torch.zeros(3, dtype=torch.float64))


def test_order_keys_with_explicit_index():
    # Candidates carry their row positions: keys order as (score desc, index asc) over those positions.
    s = torch.tensor([[1.0, -0.0, 0.0, 1.0, float("-inf"), -2.0]])
    idx = torch.tensor([[9, 4, 2, 3, 0, 7]])
    order = order_keys(s, idx).argsort(-1, descending=True)
    assert idx.gather(-1, order).tolist() == [[3, 9, 2, 4, 7, 0]]  # 1 (3, 9), +-0 (2, 4), -2, -inf
    with pytest.raises(ValueError, match="index must have the scores' shape"):
        order_keys(s, idx[:, :3])


def _masked_pick(scores: torch.Tensor, n_visible: torch.Tensor, k: int) -> torch.Tensor:
    """The decode pick before stable_topk_masked: mask to -inf, stable_topk, -1 where the pick is -inf."""
    n = scores.shape[-1]
    masked = scores.masked_fill(torch.arange(n) >= n_visible.unsqueeze(-1), float("-inf"))
    vals, order = stable_topk(masked, min(k, n))
    return torch.where(vals == float("-inf"), torch.full_like(order, -1), order)


@pytest.mark.parametrize("compiled_form", [False, True])
def test_stable_topk_masked_equals_mask_then_stable_topk(monkeypatch, compiled_form):
    # The fused decode pick (mask folded into the keys' high word, -inf read off the keys) must give the old
    # form's picks bit for bit: integer scores (ties), +-0, -inf in visible entries, rows seeing nothing, all or
    # fewer than k, k > N; also its compiled form (mask, then stable_topk) and the 1M shape (2^18 entries).
    if compiled_form:
        monkeypatch.setattr(topk_mod.torch.compiler, "is_compiling", lambda: True)
    g = torch.Generator().manual_seed(11)
    for trial in range(300):
        n = int(torch.randint(0, 3000, (1,), generator=g))
        k = int(torch.randint(0, 700, (1,), generator=g))
        shape = (int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g)))
        s = torch.randint(-3, 4, (*shape, n), generator=g).float() if trial % 2 else torch.randn(*shape, n,
                                                                                                generator=g)
        if trial % 5 == 0:
            s = s.clamp(max=0) * torch.randn(*shape, n, generator=g).sign()  # 0 and -0 ties at the top
        if trial % 7 == 0:
            s = torch.where(torch.rand(*shape, n, generator=g) < 0.5, float("-inf"), s)  # visible -inf scores
        nv = torch.randint(0, n + 1, shape, generator=g)
        nv[0, 0] = n if trial % 3 else 0
        ref = _masked_pick(s, nv, k)
        got = stable_topk_masked(s.clone(), nv, k)
        assert got.dtype == ref.dtype and torch.equal(got, ref), (trial, n, k)
    big = torch.randint(0, 50, (1, 2, 1 << 18), generator=g).float()  # ~5,000 copies of each value
    big[0, 1] = torch.randn(1 << 18, generator=g)
    nv = torch.tensor([[(1 << 18) - 3, 70000]])
    assert torch.equal(stable_topk_masked(big.clone(), nv, 512), _masked_pick(big, nv, 512))
    with pytest.raises(ValueError, match="float32"):
        stable_topk_masked(torch.zeros(1, 4, dtype=torch.bfloat16), torch.tensor([4]), 2)


def test_stable_topk_visible_equals_masked_stable_topk():
    # The threshold pre-filter (host reads, CPU prefill) must pick exactly what the masked sync-free top-k picks:
    # integer scores (ties at the threshold everywhere), rows whose top k is one tied value (all <= 0, as relu
    # zeros under a negative head weight give), +-0, random visible counts; None only when the sample is short.
    g = torch.Generator().manual_seed(6)
    used = 0
    for trial in range(300):
        n = int(torch.randint(1, 5000, (1,), generator=g))
        k = int(torch.randint(0, min(n // 8, 300) + 1, (1,), generator=g))
        rows = int(torch.randint(1, 5, (1,), generator=g))
        s = torch.randint(-3, 4, (rows, n), generator=g).float() if trial % 2 else torch.randn(rows, n, generator=g)
        if trial % 5 == 0:
            s = s.clamp(max=0) * torch.randn(rows, n, generator=g).sign().abs()  # 0, -0 ties at the top
        nv = torch.randint(n // 2, n + 1, (rows,), generator=g) if trial % 3 else torch.full((rows,), n)
        got = stable_topk_visible(s, nv, k)
        masked = s.masked_fill(torch.arange(n) >= nv.unsqueeze(-1), float("-inf"))
        if got is None:
            assert k == 0 or min(int(nv.min()), n // 8) < k
            continue
        used += 1
        assert torch.equal(got, stable_topk(masked, k)[1]), (trial, n, k)
    assert used > 200
    assert stable_topk_visible(torch.zeros(2, 3, 0), torch.zeros(2, 3, dtype=torch.int64), 0) is None  # no entries
    big = torch.randint(0, 50, (3, 1 << 18), generator=g).float()  # the 1M shape: ~5,000 copies of each value
    big[2] = torch.randn(1 << 18, generator=g)  # no ties: entries > tau lie past its visible 70,000 too
    nv = torch.tensor([1 << 18, (1 << 18) - 5, 70000])  # one row sees all: the others' tails are still masked
    ref = stable_topk(big.masked_fill(torch.arange(1 << 18) >= nv.unsqueeze(-1), float("-inf")), 512)[1]
    assert torch.equal(stable_topk_visible(big, nv, 512), ref)


@pytest.mark.parametrize("s, elements", [(1, 2048), (8, 2048), (1, 6144)])
def test_indexer_score_tiles_equal_whole(monkeypatch, s, elements):
    # ReferenceBackend._indexer_scores scores the entries in column tiles (_INDEXER_TILE, wider for fewer query
    # rows: _INDEXER_TILE_ELEMENTS); the fp32 scores must be bit-identical to one GEMM over all of them (decode:
    # 1 query x 2 heads; prefill blocks: 8 x 2), since the picks near ties depend on every bit. Random fp32
    # values: no tie hides a difference.
    g = torch.Generator().manual_seed(9)
    q, keys, w = torch.randn(1, s, 2, 32, generator=g), torch.randn(1, 5000, 32, generator=g), torch.randn(1, s, 2)
    whole = ref_backend_mod._scores(q, keys).relu_().mul_(w.unsqueeze(-1)).sum(2)
    monkeypatch.setattr(ref_backend_mod, "_INDEXER_TILE", 1024)  # 4 whole tiles of 1024 and a partial one,
    monkeypatch.setattr(ref_backend_mod, "_INDEXER_TILE_ELEMENTS", elements)  # or (1, 6144) 1 of 3072 + 1928
    assert torch.equal(ReferenceBackend()._indexer_scores(q, w, keys), whole)


def test_indexer_topk_prefilter_equals_sync_free_pick(monkeypatch):
    # ReferenceBackend.indexer_topk on CPU (eager) takes the pre-filter; its picks equal the sync-free masked
    # top-k (_indexer_pick, what decode and compiled graphs run) on the same scores. Integer inputs: exact
    # scores with ties; negative head weights: rows whose best scores are relu zeros.
    g = torch.Generator().manual_seed(8)
    b, s, h, d, n, k = 2, 6, 2, 8, 6000, 512
    q = torch.randint(-2, 3, (b, s, h, d), generator=g).float()
    keys = torch.randint(-2, 3, (b, n, d), generator=g).float()
    w = torch.randint(-2, 3, (b, s, h), generator=g).float()
    w[0, 0] = -1.0  # every score <= 0: the top k are zeros, lower index first
    n_visible = torch.tensor([[6000, 5999, 4100, 5000, 6000, 4097], [4096, 6000, 5555, 4500, 6000, 5800]])
    be = ReferenceBackend()
    monkeypatch.setattr(ref_backend_mod, "_INDEXER_PREFILTER_ENTRIES", 4096)  # n = 6000 takes the pre-filter
    assert stable_topk_visible(be._indexer_scores(q, w, keys), n_visible, k) is not None  # and it applies
    ref = be._indexer_pick(be._indexer_scores(q, w, keys), n_visible, k)
    assert torch.equal(be.indexer_topk(q, w, keys, n_visible, k), ref)


@pytest.mark.parametrize("integer", [False, True])
def test_paged_indexer_equals_contiguous(monkeypatch, integer):
    # Decode reads the indexer keys page block by page block (ReferenceBackend.indexer_topk_paged, no copy of
    # all N keys); its picks must equal indexer_topk over all keys read into one tensor: the same dot products
    # and the same top-k. Integer values: ties everywhere (the tie-break must not depend on the blocks).
    g = torch.Generator().manual_seed(4)
    per, pages, d, h, k = 64, 96, 32, 2, 512
    store = RowStore((pages + 1, per), d, 0, torch.float32, "cpu")
    vals = torch.randint(-2, 3, store.data.shape, generator=g).float() if integer else torch.randn(
        store.data.shape, generator=g)
    store.data.copy_(vals)
    table = torch.stack([torch.randperm(pages, generator=g) + 1 for _ in range(2)])  # shuffled pages, 2 rows
    n = pages * per - 10
    keys = PagedRows(store, table, n)
    q = torch.randint(-2, 3, (2, 3, h, d), generator=g).float() if integer else torch.randn(2, 3, h, d, generator=g)
    w = torch.rand(2, 3, h, generator=g) + 0.5
    n_visible = torch.tensor([[n, n - 7, 300], [n - 1, 5000, 0]])
    be = ReferenceBackend()
    ref = be.indexer_topk(q, w, keys.read(), n_visible, k)
    assert (ref[1, 2] == -1).all() and (ref[0, 2, 300:] == -1).all() and (ref[0, 2, :300] >= 0).all()
    assert torch.equal(be.indexer_topk_paged(q, w, keys, n_visible, k), ref)  # one GEMM over the whole store
    keys.table = keys.table[:, :20]  # 20 of 97 pages per row: under half the store, so page block by page block
    keys.n = 20 * per - 3
    n_visible = n_visible.clamp(max=keys.n)
    ref = be.indexer_topk(q, w, keys.read(), n_visible, k)
    monkeypatch.setattr(ref_backend_mod, "_INDEXER_KEY_ELEMENTS", 7 * per * d)  # blocks of 7 pages, last partial
    assert torch.equal(be.indexer_topk_paged(q, w, keys, n_visible, k), ref)


def test_query_blocks_equal_one_block(tiny_model, monkeypatch):
    # The indexer and attention run queries in blocks sized by a temporaries budget; tiny budgets (blocks of one
    # or a few queries, every boundary case) must give the same logits as one block.
    ids = _ids(40, seed=5) % 512
    ref = tiny_model(ids)
    monkeypatch.setattr(model_mod, "_INDEXER_SCORES", 7)
    monkeypatch.setattr(backend_mod, "_ATTN_ELEMENTS", 3000)
    assert (tiny_model(ids) - ref).abs().max().item() <= TOL


def _random_history(cache, seed: int) -> None:
    """Fill every cache buffer with fixed random values: a history of 2^20 positions without prefilling it."""
    g = torch.Generator().manual_seed(seed)
    for lc in cache.layers:
        for t in lc.tensors():
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)


def test_positions_near_two_to_the_twenty(long_model):
    # The last 130 prompt positions before 2^20 - 17 (crossing the HCA boundary at 2^20 - 128), over a random
    # 2^20-position history (CSA entries near 262,144, HCA entries near 8,192, page tables of 4,096 pages): two
    # chunkings give the same last logits, and 16 greedy decode steps (up to position 2^20 - 2) equal recomputing
    # those positions by one prefill chunk. Any position, page or entry index that wrapped, or a top-k that broke
    # ties differently, would differ.
    m, n_new = long_model, 16
    end = MAX_POS - n_new - 1
    start = end - 130
    ids = _ids(130, seed=2)
    caches = [m.new_cache(1, MAX_POS) for _ in range(2)]
    for c in caches:
        _random_history(c, seed=7)
    a = _prefill(m, caches[0], ids, start, 48)
    b = _prefill(m, caches[1], ids, start, 130)
    assert (a - b).abs().max().item() <= TOL
    out, slot = [int(a.argmax())], torch.zeros(1, dtype=torch.int64)
    for k in range(n_new - 1):
        logits = m.decode(torch.tensor([[out[-1]]]), torch.tensor([end + k]), caches[0], slot, max_len=end + k + 1)
        out.append(int(logits[0, -1].argmax()))
    assert out == _recompute(m, caches[1], b, out, end)


def _chunked_then_greedy(model, n: int, chunks: tuple[int, int], n_new: int = 16) -> None:
    ids = _ids(n, seed=3)
    caches = [model.new_cache(1, n + n_new) for _ in chunks]
    a, b = (_prefill(model, c, ids, 0, ch) for c, ch in zip(caches, chunks))
    assert (a - b).abs().max().item() <= TOL
    eng = Engine(model, max_slots=1, max_seq_len=n + n_new, prefill_chunk=chunks[0], eos_token_id=-1)
    (req,) = eng.generate([ids[0].tolist()], SamplingParams(temperature=0, max_tokens=n_new))
    assert req.output == _recompute(model, caches[1], b, req.output, n)


def test_chunked_prefill_then_greedy_decode_exact(long_model):
    # 4,096 real positions: 1,024 CSA entries (2x index_topk, so top-k selects), 32 HCA entries, chunk sizes that
    # share no boundary with the windows.
    _chunked_then_greedy(long_model, 4096, (1000, 2048 + 77))


@pytest.mark.slow
def test_one_million_tokens_exact(long_model):
    # The whole context: 1,048,560 prompt tokens prefilled with two chunk sizes, then 16 greedy tokens to 2^20.
    # Hours on a 2-core CPU (scripts/bench_long.py measures the same path and prints progress).
    _chunked_then_greedy(long_model, MAX_POS - 16, (4096, 8192 + 77))


def test_bench_long_exactness_check(long_model, capsys):
    # scripts/bench_long.py --exact at a small length (the full-length command is in docs/design.md): the engine's
    # chunk-700 run vs a chunk-1024 prefill, then the greedy tokens recomputed by prefill. Both verdicts PASS;
    # given wrong logits or a wrong token, the same check FAILs.
    threads = torch.get_num_threads()
    try:
        assert bench_long.main(["--length", "2048", "--chunk", "700", "--segment", "1024", "--exact", "1024",
                                "--decode-contexts", "", "--decode-steps", "4", "--threads", "1",
                                "--mmap-threshold", "0", "--hugetlb", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "(PASS: fp32" in out and out.count(": PASS") == 1 and "FAIL" not in out
    assert "predicted peak RSS: " in out.split("1. prefill")[0] and "peak / predicted = " in out  # before, after
    n, max_seq = 300, 400
    prompt = _ids(n, seed=9)[0].tolist()
    cache = long_model.new_cache(1, max_seq)
    a = _prefill(long_model, cache, torch.tensor([prompt]), 0, 128)
    toks = [int(a.argmax())]
    for k in range(2):  # greedy by one-token chunks on the chunk-128 cache
        logits = long_model(torch.tensor([toks[-1:]]), cache, torch.zeros(1, dtype=torch.int64), n + k)
        toks.append(int(logits[0, -1].argmax()))
    assert bench_long.exact(long_model, prompt, a, toks, max_seq, 77, 1 << 16)
    assert not bench_long.exact(long_model, prompt, a + 1e-3, toks, max_seq, 77, 1 << 16)
    assert not bench_long.exact(long_model, prompt, a, toks[:-1] + [(toks[-1] + 1) % 512], max_seq, 77, 1 << 16)
    assert "FAIL" in capsys.readouterr().out


def _live_peak_bytes(fn) -> int:
    """Peak bytes of torch CPU tensors alive at once while fn() runs, above those alive before (the profiler's
    allocation and free events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def test_prefill_working_set_estimate(long_model):
    # engine.prefill_working_set against the torch tensors really alive in one prefill chunk (2,048 tokens at
    # 4,096: the attention blocks fill their _ATTN_ELEMENTS budget). Its tensor parts (per-chunk activations, the
    # largest block, the keys read whole) must cover the live peak, and not by more than 2x (measured 0.73 of
    # it), so the estimate the benchmark predicts peak RSS with stays tight; the allocator-retained heap and the
    # request's token list are not torch tensors. Only the keys grow with the context, by entries x width.
    cfg, chunk, ctx = long_model.cfg, 2048, 4096
    cache = long_model.new_cache(1, 2 * ctx)
    slot = torch.zeros(1, dtype=torch.int64)
    _prefill(long_model, cache, _ids(ctx, seed=3), 0, chunk)
    ids = _ids(chunk, seed=4)
    live = _live_peak_bytes(lambda: long_model(ids, cache, slot, ctx, last_only=True))
    parts = prefill_working_set(long_model, chunk, ctx + chunk)
    tensors = parts["per-chunk activations"] + parts["largest block"]
    assert tensors / 2 <= live <= tensors, (live / 2**20, {k: v / 2**20 for k, v in parts.items()})
    big, small = prefill_working_set(long_model, chunk, MAX_POS), prefill_working_set(long_model, 2 * chunk, ctx)
    keys = MAX_POS // 4 * cfg.index_head_dim * 4  # the CSA indexer keys, fp32, read whole at 1M
    assert big["largest block"] == model_mod._INDEXER_SCORES * 4 * (cfg.index_n_heads + 3) // cfg.index_n_heads + keys
    assert big["per-chunk activations"] == parts["per-chunk activations"]
    assert small["per-chunk activations"] == 2 * parts["per-chunk activations"]
    assert parts["largest block"] == backend_mod._ATTN_ELEMENTS * 4


def test_hca_decode_equals_gathered_attention(long_model, monkeypatch):
    # The reference's HCA decode path (ring rows by index + one GEMM over every entry, masked by visibility)
    # against the default attend (all K = win + entries gathered, then sparse_attention), two rows decoding 5
    # steps from positions 90 (no HCA entry visible yet) and 1,148 (8 entries; the 9th becomes visible at 1,151).
    # fp32: the two sum the same terms in another order (~1e-7 relative); 1e-5 on logits leaves room for that.
    m = long_model
    ref = ReferenceBackend
    taken = []
    monkeypatch.setattr(ref, "_hca_decode", staticmethod(lambda *a: taken.append(1) or _HCA_DECODE(*a)))
    lens = (90, 1148)
    caches = [m.new_cache(2, 1280) for _ in range(2)]
    for c in caches:
        for slot, n in enumerate(lens):
            m(_ids(n, seed=5 + slot), c, torch.tensor([slot]), 0, last_only=True)
    slots, tok = torch.arange(2), torch.tensor([[7], [9]])
    for k in range(5):
        pos = torch.tensor(lens) + k
        fast = m.decode(tok, pos, caches[0], slots, max_len=int(pos.max()) + 1)
        be = m.layers[0].attn.backend
        be.sparse_attention = lambda *a: ref.sparse_attention(be, *a)  # not the class's own: the default attend
        try:
            plain = m.decode(tok, pos, caches[1], slots, max_len=int(pos.max()) + 1)
        finally:
            del be.sparse_attention
        assert (fast - plain).abs().max().item() <= 1e-5
        tok = fast[:, -1].argmax(-1, keepdim=True)
    assert len(taken) == 5  # one HCA layer, every step


_HCA_DECODE = ReferenceBackend._hca_decode
