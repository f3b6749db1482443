#!/usr/bin/env python
"""Per-rank resident weight bytes with expert parallelism: EP=2 (2 processes, gloo) vs EP=1 (one process).

Writes an official-format checkpoint (FP8 dense linears, MXFP4 routed experts; default: hidden 1024,
moe_intermediate 512, 16 experts, 4 layers, vocab 16384), loads it with `load_parallel_model` once in one process
and once in each of 2 processes started with torch.multiprocessing (gloo, 127.0.0.1), and prints each rank's
resident weight bytes (every parameter storage once: routed experts, lm head, embedding, the rest) and RSS growth
over the load. Then the same split computed (no weights loaded: meta tensors) for V4-Flash and V4-Pro at EP 1..64.

    python scripts/measure_ep_memory.py [--hidden 1024] [--moe-inter 512] [--experts 16] [--layers 4]
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _rank(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from dsv4_ascend.parallel import init_parallel, load_parallel_model, resident_weight_bytes

    ctx = init_parallel("gloo")
    try:
        before = _rss()
        model = load_parallel_model(model_dir, ctx, dtype=torch.bfloat16, weights="native", progress=False)
        rss = _rss() - before
        ids = torch.arange(8).view(1, 8) * 5 % model.cfg.vocab_size  # one forward: the model really runs
        model(ids)
        r = model.layers[0].ffn.routed
        torch.save({"bytes": resident_weight_bytes(model), "rss": rss, "experts": (r.first, r.first + r.count)},
                   Path(out_dir) / f"ep{world}_rank{rank}.pt")
    finally:
        ctx.close()


def _run(world: int, model_dir: Path, out_dir: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(world, port, str(model_dir), str(out_dir)), nprocs=world, start_method="spawn")
    return [torch.load(out_dir / f"ep{world}_rank{r}.pt") for r in range(world)]


def _meta_bytes(cfg, world: int, rank: int = 0) -> dict[str, int]:
    """The split `resident_weight_bytes` would report for `cfg` at EP=`world` (vocab-parallel head), on meta."""
    from dsv4_ascend.backend import Backend
    from dsv4_ascend.model import Transformer, WeightFormats
    from dsv4_ascend.parallel import expert_range_for, resident_weight_bytes

    rng = expert_range_for(rank, world, cfg.n_routed_experts) if world > 1 else None
    m = Transformer(cfg, Backend(), torch.bfloat16, WeightFormats.from_config(cfg), device="meta", expert_range=rng)
    b = resident_weight_bytes(m)
    b["head"] = -(-cfg.vocab_size // world) * cfg.hidden_size * 2
    b["total"] = sum(v for k, v in b.items() if k != "total")
    return b


def _fmt(b: dict[str, int], unit: float, name: str) -> str:
    return (f"{b['total'] / unit:>10.2f} {b['routed_experts'] / unit:>10.2f} {b['head'] / unit:>8.2f} "
            f"{b['embed'] / unit:>8.2f} {b['other'] / unit:>8.2f} {name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024, help="hidden_size (default 1024)")
    ap.add_argument("--moe-inter", type=int, default=512, help="moe_intermediate_size (default 512)")
    ap.add_argument("--experts", type=int, default=16, help="n_routed_experts (default 16)")
    ap.add_argument("--layers", type=int, default=4, help="num_hidden_layers (default 4)")
    ap.add_argument("--vocab", type=int, default=16384, help="vocab_size (default 16384)")
    args = ap.parse_args(argv)
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)

    from dsv4_ascend.config import ModelConfig, preset
    from dsv4_ascend.tiny import write_tiny_checkpoint

    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=4, head_dim=64, qk_rope_head_dim=16, q_lora_rank=128, o_groups=2,
                      o_lora_rank=64, sliding_window=16, compress_ratios=([0, 4] * args.layers)[: args.layers],
                      index_n_heads=2, index_head_dim=32, index_topk=4, n_routed_experts=args.experts,
                      num_experts_per_tok=2, moe_intermediate_size=args.moe_inter, num_hash_layers=1,
                      num_nextn_predict_layers=1, rope_original_max_position=64, max_position_embeddings=4096)
    print(f"config: hidden {cfg.hidden_size}, moe_intermediate {cfg.moe_intermediate_size}, {cfg.n_routed_experts} "
          f"routed experts x {cfg.num_hidden_layers} layers + 1 MTP block, vocab {cfg.vocab_size}; FP8 dense, "
          f"{cfg.expert_dtype} experts, bf16 rest; lm head vocab-parallel at EP=2")
    with tempfile.TemporaryDirectory() as tmp:
        d = write_tiny_checkpoint(Path(tmp) / "ckpt", cfg, seed=0, tokenizer=False)
        res = {w: _run(w, d, Path(tmp)) for w in (1, 2)}
    mib = 2.0 ** 20
    print(f"\nmeasured (MiB)   {'total':>10} {'experts':>10} {'head':>8} {'embed':>8} {'other':>8}  RSS growth")
    for w, ranks in res.items():
        for r, got in enumerate(ranks):
            lo, hi = got["experts"]
            print(f"EP={w} rank {r}:  " + _fmt(got["bytes"], mib, f" {got['rss'] / mib:8.1f}   experts [{lo},{hi})"))
    one, two = res[1][0]["bytes"], res[2][0]["bytes"]
    print(f"EP=2 / EP=1 per rank: total {two['total'] / one['total']:.3f}x, routed experts "
          f"{two['routed_experts'] / one['routed_experts']:.3f}x, head {two['head'] / one['head']:.3f}x")

    gib = 2.0 ** 30
    for name in ("v4-flash", "v4-pro"):
        big = preset(name)
        print(f"\ncomputed, {name} native formats, one rank (GiB) "
              f"{'total':>10} {'experts':>10} {'head':>8} {'embed':>8} {'other':>8}")
        for w in (1, 8, 16, 32, 64):
            if big.n_routed_experts % w == 0:
                print(f"  EP={w:<3}{'':33}" + _fmt(_meta_bytes(big, w), gib, ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
