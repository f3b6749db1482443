#!/usr/bin/env python
"""Multi-card / multi-node DeepSeek-V4 generation: DP attention, EP MoE, vocab-parallel lm head.

Run under torchrun, one process per card. Every rank loads the dense weights and only its share of the routed
experts from the same snapshot, takes its own prompts (prompt i goes to rank i % world size), prefills and
greedy-decodes them while all ranks step in lockstep (MoE layers exchange tokens by all-to-all), and rank 0
prints every rank's outputs and resident weight bytes.

Single node, 2 processes (CPU / gloo here; on 2 NPUs the same line uses HCCL):

    torchrun --nproc-per-node 2 scripts/launch.py --model DIR --prompt "Hello" --prompt "The sea is"

Multi-node (run the same line on every node; HOST is node 0's address, any free port):

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id v4job \\
        scripts/launch.py --model /data/DeepSeek-V4-Flash --device npu --dtype bfloat16 --prompt ...

Without torchrun (`python scripts/launch.py ...`) it runs as one rank holding every expert. To serve an OpenAI
endpoint over the same ranks, run `dsv4 serve` under torchrun instead (README, "Serving over ranks").
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="torchrun [torchrun flags] scripts/launch.py", description=__doc__.split("\n\n")[0],
        epilog="torchrun flags: --nproc-per-node N (processes = cards on this node); multi-node adds --nnodes M "
               "--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB, the same on every node. torchrun "
               "sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which this script reads. The world "
               "size must divide the model's n_routed_experts (V4-Flash: 256, V4-Pro: 384).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="official snapshot directory (config.json, model.safetensors.index.json, shards, "
                         "tokenizer.json), visible at the same path on every node; default: the tiny random "
                         "model (created by rank 0 on first use)")
    ap.add_argument("--prompt", action="append", default=[],
                    help="a prompt (repeatable); prompt i runs on rank i %% world size, so ranks run different "
                         "prompts; a rank left without a prompt idles through the collectives "
                         "(default: one built-in prompt per rank)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens to generate per prompt, greedy (default 16)")
    ap.add_argument("--device", default=None, choices=["npu", "cuda", "cpu"],
                    help="device type; the card index is LOCAL_RANK (default: the --dist-backend's device: "
                         "hccl -> npu, nccl -> cuda, gloo -> cpu)")
    ap.add_argument("--dist-backend", default="auto", choices=["auto", "hccl", "nccl", "gloo"],
                    help="torch.distributed backend; auto: hccl when torch_npu sees an NPU, nccl with CUDA, "
                         "else gloo (default auto)")
    ap.add_argument("--backend", default="reference", choices=["reference", "ascend"],
                    help="op implementation: plain torch (reference) or torch_npu / its CPU emulator (ascend)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="activation dtype")
    ap.add_argument("--weights", default="native", choices=["native", "bf16"],
                    help="native: keep FP8/FP4 weights packed; bf16: dequantise at load (more memory)")
    ap.add_argument("--numerics", default="exact", choices=["exact", "deepseek"],
                    help="exact: no quantisation simulation; deepseek: DeepSeek's FP8 act-quant and QAT sims")
    ap.add_argument("--no-tp-head", action="store_true",
                    help="keep the whole lm head on every rank instead of a vocab slice (saves the head's "
                         "all-gather / all-to-all, costs (world-1)/world of its memory per rank)")
    ap.add_argument("--static-ep", type=int, default=None, metavar="C",
                    help="decode rounds of at most C sequences per rank take the static-shape EP path (padded "
                         "buffers, equal-split all-to-alls: what a captured decode step needs); wider rounds and "
                         "prefill take the exact path (default: exact everywhere)")
    ap.add_argument("--fused-moe", action="store_true",
                    help="Ascend only: the static path on torch_npu's MC2 npu_moe_distribute_dispatch/combine "
                         "(needs --dist-backend hccl and --static-ep; never run on an NPU here, emulated on CPU in "
                         "tests/test_parallel.py)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds a collective may wait for the other ranks before failing (default 600)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.fused_moe and args.static_ep is None:
        raise SystemExit("launch.py: --fused-moe runs the static EP path: give its capacity with --static-ep C")
    if args.static_ep is not None and args.static_ep < 1:
        raise SystemExit(f"launch.py: --static-ep must be >= 1, found {args.static_ep}")
    from dsv4_ascend.loading import default_model_dir, make_backend
    from dsv4_ascend.parallel import (generate_lockstep, init_parallel, load_parallel_model,
                                      resident_weight_bytes)
    from dsv4_ascend.tokenizer import load_tokenizer

    ctx = init_parallel(None if args.dist_backend == "auto" else args.dist_backend, args.device, args.timeout)
    try:
        if args.model is None:  # rank 0 writes the tiny default once; the others wait for it
            if ctx.rank == 0:
                default_model_dir()
            ctx.barrier()
        path = Path(args.model) if args.model else default_model_dir()
        t0 = time.perf_counter()
        model = load_parallel_model(path, ctx, backend=make_backend(args.backend, args.numerics),
                                    dtype=getattr(torch, args.dtype), weights=args.weights,
                                    tp_head=not args.no_tp_head, fused=args.fused_moe,
                                    static=args.static_ep is not None, max_tokens_per_rank=args.static_ep or 256)
        load_s = time.perf_counter() - t0
        tok = load_tokenizer(path)
        texts = args.prompt or [f"Prompt number {i}: the quick brown fox" for i in range(ctx.world_size)]
        mine = texts[ctx.rank::ctx.world_size]
        ids = [[tok.bos_id] + tok.encode(t) for t in mine]
        t0 = time.perf_counter()
        outs = generate_lockstep(model, ctx, ids, args.max_tokens, eos_token_id=tok.eos_id)
        gen_s = time.perf_counter() - t0
        r = model.layers[0].ffn.routed
        report = {"rank": ctx.rank, "device": str(ctx.device), "experts": (r.first, r.first + r.count),
                  "bytes": resident_weight_bytes(model), "load_s": load_s, "gen_s": gen_s,
                  "results": [(p, o, tok.decode(o, skip_special_tokens=True)) for p, o in zip(mine, outs)]}
        reports = ctx.gather_objects(report)
        if ctx.rank == 0:
            print(f"[launch] world {ctx.world_size}, process-group backend {ctx.backend or 'none'}, model {path}, "
                  f"lm head {'whole' if args.no_tp_head or ctx.world_size == 1 else 'vocab-parallel'}")
            for rep in reports:
                b = rep["bytes"]
                print(f"[rank {rep['rank']}] {rep['device']}: experts [{rep['experts'][0]}, {rep['experts'][1]}), "
                      f"resident weights {b['total']:,} B (routed experts {b['routed_experts']:,}, lm head "
                      f"{b['head']:,}, embedding {b['embed']:,}, other {b['other']:,}); load {rep['load_s']:.1f} s, "
                      f"generate {rep['gen_s']:.1f} s")
                if not rep["results"]:
                    print("    (no prompt: joined every collective with an empty batch)")
                for prompt, out, text in rep["results"]:
                    print(f"    {prompt!r} -> {text!r}  ids {out}")
    finally:
        ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
