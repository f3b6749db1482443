"""Capturable expert-parallel decode on 2 gloo ranks: the static-shape dispatch/combine (eager, compiled with
torch.compile(fullgraph=True), and on the emulated MC2 ops) equals one process; a step over the capacity takes
the exact path and still equals it. `static_run` / `check_static_run` run inside test_parallel.py's job."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dsv4_ascend.checkpoint import load_checkpoint
from dsv4_ascend.parallel import ParallelContext, generate_lockstep
from dsv4_ascend.tiny import write_tiny_checkpoint
from multirank import free_port, spawn_ranks

WORLD = 2
CAP = 4  # per-rank capacity of the static path: rank 0 decodes 2 rows, rank 1 3 rows


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=3, tokenizer=False)


def _batch(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(300 + rank)
    return torch.randint(0, 512, [(2, 9), (3, 5)][rank], generator=g)


def _prompts(rank: int) -> list[list[int]]:
    """Rank 0 has two prompts and rank 1 one, so rank 1 idles through prefill and decode rounds."""
    g = torch.Generator().manual_seed(400 + rank)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in [(5, 9), (7,)][rank]]


def _prefill_decode(model, ids: torch.Tensor, decoder=None):
    """Prefill (exact path), then one decode step of the argmax tokens: (next ids, decode logits [B,V])."""
    b, s = ids.shape
    cache = model.new_cache(b + 1, 32)  # + the pad slot a graph decoder needs
    slots = torch.arange(b)
    nxt = model(ids, cache, slots, 0)[:, -1].argmax(-1)
    if decoder is None:
        return nxt, model.decode(nxt.view(b, 1), torch.full((b,), s), cache, slots, max_len=s + 1)[:, -1]
    dec = decoder(model, cache)
    return nxt, dec.step(nxt.view(b, 1), torch.full((b,), s), slots, _greedy(b)).logits


def _greedy(b: int):
    from dsv4_ascend.sampling import SamplingParams

    return [SamplingParams(temperature=0, seed=0) for _ in range(b)]


def static_run(rank: int, ctx, ckpt: str) -> dict:
    """The static-path runs of one rank (called inside a 2-rank job; every rank calls it in step)."""
    from dsv4_ascend.ops import emulator
    from dsv4_ascend.parallel import load_parallel_model

    out: dict = {}
    model = load_parallel_model(ckpt, ctx, dtype=torch.float32, weights="bf16", progress=False, static=True,
                                max_tokens_per_rank=CAP)
    ep = model.expert_parallel
    ids = _batch(rank)
    out["nxt"], out["eager"] = _prefill_decode(model, ids)
    out["static_calls"] = ep.stats["static_calls"]
    # Over the capacity: every rank's step is wider than 1 row, so every rank takes the exact path.
    ep.max_tokens_per_rank = 1
    before = ep.stats["static_calls"]
    _, out["over"] = _prefill_decode(model, ids)
    out["static_after_over"] = ep.stats["static_calls"] - before
    ep.max_tokens_per_rank = CAP
    # Uneven lockstep generation: rank 1 idles through static decode rounds.
    out["gen"] = generate_lockstep(model, ctx, _prompts(rank), max_tokens=4)
    # The emulated MC2 ops (torch_npu's fused dispatch/combine) on the same weights.
    fused = load_parallel_model(ckpt, ctx, dtype=torch.float32, weights="bf16", progress=False, fused=True,
                                npu=emulator, max_tokens_per_rank=CAP)
    _, out["mc2"] = _prefill_decode(fused, ids)
    out["mc2_static"] = fused.expert_parallel.stats["static_calls"]
    # bf16 activations, static decode: the greedy tokens of one process.
    bf16 = load_parallel_model(ckpt, ctx, dtype=torch.bfloat16, weights="bf16", progress=False, static=True,
                               max_tokens_per_rank=CAP)
    out["gen_bf16"] = generate_lockstep(bf16, ctx, _prompts(rank), max_tokens=4)
    out["bf16_static"] = bf16.expert_parallel.stats["static_calls"]
    return out


def check_static_run(rank: int, got: dict, ref, ref16) -> None:
    """The asserts on `static_run`'s results of `rank` against the one-process models `ref` (fp32) and `ref16`
    (bf16)."""
    nxt, want = _prefill_decode(ref, _batch(rank))
    assert torch.equal(got["nxt"], nxt)
    assert got["static_calls"] == len(ref.layers)  # the decode step's MoE layers took the static path
    assert _close(got["eager"], want), f"rank {rank}: static decode logits"
    assert got["static_after_over"] == 0  # over the capacity: the exact path, same result
    assert _close(got["over"], want), f"rank {rank}: over-capacity decode logits"
    assert _close(got["mc2"], want), f"rank {rank}: emulated MC2 decode logits"
    assert got["mc2_static"] == len(ref.layers)
    assert got["gen"] == generate_lockstep(ref, ParallelContext(), _prompts(rank), max_tokens=4)
    # bf16: each rank's partial expert output is rounded to bf16 before the cross-rank sum (one rounding more than
    # one process), so logits differ at bf16 noise and a near-tie may go either way (seen: a 2e-4 fp32 margin).
    # Each token the ranks chose must be a greedy pick of the one-process bf16 model fed the same tokens, up to
    # that noise.
    assert got["bf16_static"] > 0
    _assert_near_greedy(ref16, _prompts(rank), got["gen_bf16"])


# bf16 logits here are ~3 in size: one rounding moves them by up to 3 * 2^-8 = 0.012; the extra rounding of the
# expert partial sums plus prefill-vs-decode rounding stays within a few of those. A wrong expert or a lost rank
# moves logits by O(1).
_BF16_PICK_TOL = 0.05


def _assert_near_greedy(ref16, prompts: list[list[int]], outs: list[list[int]]) -> None:
    """Each generated token is, under the one-process model fed the same tokens, within _BF16_PICK_TOL of the
    maximum logit."""
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            logits = ref16(torch.tensor([p + out[:-1]]))[0, len(p) - 1:].float()
        chosen = logits.gather(1, torch.tensor(out).unsqueeze(1)).squeeze(1)
        gap = logits.max(1).values - chosen
        assert (gap <= _BF16_PICK_TOL).all(), f"tokens {out}: below the greedy pick by {gap.tolist()}"


def _graph_worker(rank: int, port: int, ckpt: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dsv4_ascend.graph_mode import GraphDecoder
    from dsv4_ascend.parallel import init_parallel, load_parallel_model

    ctx = init_parallel("gloo")
    out: dict = {}
    try:
        model = load_parallel_model(ckpt, ctx, dtype=torch.float32, weights="bf16", progress=False, static=True,
                                    max_tokens_per_rank=CAP)
        ids = _batch(rank)
        out["nxt"], out["eager"] = _prefill_decode(model, ids)
        # The compiled decode step: fullgraph (no graph break), the all-to-alls inside the graph.
        graphs: list[str] = []

        def recording(gm, example_inputs):
            graphs.append(str(gm.graph))
            return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        def graph_decoder(m, cache):
            dec = GraphDecoder(m, cache, cache.max_slots - 1, [CAP], recording)
            dec.warmup(progress=False)
            return dec

        _, out["graph"] = _prefill_decode(model, ids, graph_decoder)
        out["graph_a2a"] = sum(g.count("all_to_all_single") for g in graphs)
        out["graph_gather"] = sum(g.count("all_gather_into_tensor") for g in graphs)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        ctx.close()


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # fp32 throughout; EP sums the ranks' partial outputs in another order than one process (and MC2 applies
    # the routing weight after the down projection): rounding differences only, far below 1e-5.
    return (got - want).abs().max().item() <= 1e-5


# The default suite runs `static_run` inside test_parallel.py's 2-rank job (one spawn for both).


@pytest.mark.slow  # torch.compile on 2 ranks sharing a busy CPU: ~2 min
def test_compiled_ep_decode_contains_the_collectives(ckpt, tmp_path):
    spawn_ranks(_graph_worker, WORLD, (free_port(), str(ckpt), str(tmp_path)), timeout_s=300)
    ref = load_checkpoint(ckpt, dtype=torch.float32, weights="bf16", progress=False)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        nxt, want = _prefill_decode(ref, _batch(r))
        assert torch.equal(got["nxt"], nxt)
        assert _close(got["eager"], want) and _close(got["graph"], want), f"rank {r}: compiled decode logits"
        # fullgraph=True compiled (a graph break is an error); bucket CAP: 3 all-to-alls per MoE layer, plus
        # the head's all-gather and all-to-all, are graph nodes.
        assert got["graph_a2a"] == 3 * len(ref.layers) + 1 and got["graph_gather"] == 1
