"""Multi-process expert parallelism on CPU (gloo): 2 ranks give the same logits as one process."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dsv4_ascend.checkpoint import load_checkpoint
from dsv4_ascend.parallel import (ParallelContext, expert_range_for, generate_lockstep, idle_forward,
                                  init_parallel, install_parallel, load_parallel_model, resident_weight_bytes)
from dsv4_ascend.tiny import write_tiny_checkpoint
from multirank import free_port, spawn_ranks
from test_ep_static import check_static_run, static_run

WORLD = 2
TIMEOUT_S = 240  # the whole 2-process run: ~30 s on a busy 2-core CI box


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=3, tokenizer=False)


def _batch(rank: int) -> torch.Tensor:
    """A different batch per rank (different size and length)."""
    g = torch.Generator().manual_seed(100 + rank)
    shape = [(2, 11), (3, 6)][rank]
    return torch.randint(0, 512, shape, generator=g)


def _prompts(rank: int) -> list[list[int]]:
    """Rank 0 has two prompts and rank 1 one, so rank 1 idles through a prefill round."""
    g = torch.Generator().manual_seed(200 + rank)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in [(5, 9), (7,)][rank]]


def _load(ckpt: Path):
    return load_checkpoint(ckpt, dtype=torch.float32, weights="bf16", progress=False)


def _run_batch(model, ids: torch.Tensor, next_ids: torch.Tensor | None, extra: torch.Tensor | None):
    """Prefill logits, one decode step (fed `next_ids`, default argmax) and optionally a second one."""
    b, s = ids.shape
    cache = model.new_cache(b, 32)
    slots = torch.arange(b)
    pre = model(ids, cache, slots, 0)
    nxt = pre[:, -1].argmax(-1) if next_ids is None else next_ids
    dec = model.decode(nxt.view(b, 1), torch.full((b,), s), cache, slots, max_len=s + 1)
    dec2 = None
    if extra is not None:
        dec2 = model.decode(extra.view(b, 1), torch.full((b,), s + 1), cache, slots, max_len=s + 2)
    return pre, nxt, dec, dec2


def _mtp(model, ids: torch.Tensor) -> torch.Tensor:
    """MTP draft logits over a prompt (fresh cache): main streams at t with token t+1."""
    b, s = ids.shape
    cache = model.new_cache(b, 32)
    _, streams, _ = model.prefill(ids, cache, torch.arange(b), 0)
    return model.mtp_prefill(streams[:, :-1], ids[:, 1:], cache, torch.arange(b), 0)[0]


def _worker(rank: int, port: int, ckpt: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_parallel("gloo")
    try:
        model = load_parallel_model(ckpt, ctx, dtype=torch.float32, weights="bf16", progress=False)
        ids = _batch(rank)
        b, s = ids.shape
        cache = model.new_cache(b, 32)
        slots = torch.arange(b)
        pre = model(ids, cache, slots, 0)
        nxt = pre[:, -1].argmax(-1)
        dec = model.decode(nxt.view(b, 1), torch.full((b,), s), cache, slots, max_len=s + 1)
        # An empty batch: rank 0 runs one more decode step, rank 1 has no tokens and only joins the collectives.
        extra = dec[:, -1].argmax(-1)
        dec2 = None
        if rank == 0:
            dec2 = model.decode(extra.view(b, 1), torch.full((b,), s + 1), cache, slots, max_len=s + 2)
        else:
            idle_forward(model)
        gen = generate_lockstep(model, ctx, _prompts(rank), max_tokens=4)
        mtp = _mtp(model, ids)  # the MTP block's MoE is expert-parallel too
        torch.save({"pre": pre, "nxt": nxt, "dec": dec, "extra": extra, "dec2": dec2, "gen": gen, "mtp": mtp,
                    "stats": dict(model.expert_parallel.stats), "bytes": resident_weight_bytes(model),
                    "experts": (model.layers[0].ffn.routed.first, model.layers[0].ffn.routed.count),
                    "static": static_run(rank, ctx, ckpt)},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        ctx.close()


def _spawn(ckpt: Path, out_dir: Path) -> None:
    spawn_ranks(_worker, WORLD, (free_port(), str(ckpt), str(out_dir)), TIMEOUT_S)


@pytest.fixture
def one_thread():
    """The reference runs while the CI box may be busy: one thread avoids OpenMP oversubscription stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ranks_out(ckpt, tmp_path_factory) -> list[dict]:
    """One 2-rank job for the tests below: each rank's results."""
    out = tmp_path_factory.mktemp("ranks")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _spawn(ckpt, out)
    finally:
        torch.set_num_threads(n)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_expert_parallel_two_ranks_match_one_process(ckpt, ranks_out, one_thread):
    res = ranks_out
    ref_model = _load(ckpt)
    for r, got in enumerate(res):
        assert got["experts"] == (4 * r, 4)  # each rank holds (and loaded) half of the 8 experts
        # Tokens of this rank went to the other rank's experts, and came back.
        assert got["stats"]["rows_sent_remote"] > 0 and got["stats"]["rows_received"] > 0
        ids = _batch(r)
        pre, _, dec, dec2 = _run_batch(ref_model, ids, got["nxt"], got["extra"] if r == 0 else None)
        assert got["pre"].dtype == torch.float32 and got["pre"].shape == pre.shape
        assert (got["pre"] - pre).abs().max().item() <= 1e-5, f"rank {r} prefill logits"
        assert (got["dec"] - dec).abs().max().item() <= 1e-5, f"rank {r} decode logits"
        if r == 0:  # the step rank 1 joined with an empty batch
            assert (got["dec2"] - dec2).abs().max().item() <= 1e-5
        assert (got["mtp"] - _mtp(ref_model, ids)).abs().max().item() <= 1e-5, f"rank {r} MTP logits"
        assert got["gen"] == generate_lockstep(ref_model, ParallelContext(), _prompts(r), max_tokens=4)
    full = resident_weight_bytes(ref_model)
    for got in res:  # half the experts and half the head per rank
        assert got["bytes"]["routed_experts"] * WORLD == full["routed_experts"]
        assert got["bytes"]["head"] * WORLD == full["head"]
        assert got["bytes"]["other"] == full["other"]


def test_static_ep_decode_matches_one_process(ckpt, ranks_out, one_thread):
    """The capturable static path (test_ep_static.static_run) in the same job."""
    ref_model = _load(ckpt)
    ref16 = load_checkpoint(ckpt, dtype=torch.bfloat16, weights="bf16", progress=False)
    for r, got in enumerate(ranks_out):
        check_static_run(r, got["static"], ref_model, ref16)


def test_world_size_must_divide_experts(ckpt):
    assert expert_range_for(1, 4, 8) == (2, 4)
    with pytest.raises(ValueError, match=r"world size 3 does not divide .* 8 .*n_routed_experts"):
        expert_range_for(0, 3, 8)
    ctx = ParallelContext(rank=0, world_size=3, backend="gloo")  # no process group is needed to fail
    with pytest.raises(ValueError, match="n_routed_experts"):
        load_parallel_model(ckpt, ctx, progress=False)


def test_install_refuses_a_model_with_the_wrong_experts(ckpt):
    model = _load(ckpt)  # all 8 experts, but rank 1 of 2 must hold experts 4..7
    with pytest.raises(ValueError, match=r"rank 1 of 2 must hold \(4, 8\)"):
        install_parallel(model, ParallelContext(rank=1, world_size=2, backend="gloo"))
