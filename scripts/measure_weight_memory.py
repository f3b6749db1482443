#!/usr/bin/env python
"""Resident memory of the routed experts: packed MXFP4 (weights="native") vs dequantised bf16 (weights="bf16").

Writes an official-format checkpoint with realistic expert shapes but few layers/experts (default: hidden 1024,
moe_intermediate 512, 16 experts, 2 layers), then loads it once per mode, each in a fresh child process, and
prints the bytes held by the routed-expert parameters (weights + scales), all parameters, and the child's RSS
growth over the load. Goal from issue 3: experts packed <= 0.3x bf16.

    python scripts/measure_weight_memory.py [--hidden 1024] [--moe-inter 512] [--experts 16] [--layers 2]
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _child(mode: str, model_dir: str) -> None:
    import torch

    from dsv4_ascend.checkpoint import load_checkpoint
    from dsv4_ascend.model import RoutedExperts
    from dsv4_ascend.reference import ReferenceBackend

    torch.set_num_threads(2)
    before = _rss()
    m = load_checkpoint(model_dir, backend=ReferenceBackend(), dtype=torch.bfloat16, weights=mode, progress=False)
    after = _rss()
    experts = sum(p.nbytes for mod in m.modules() if isinstance(mod, RoutedExperts) for p in mod.parameters())
    params = sum(p.nbytes for p in m.parameters())
    ids = torch.arange(16).view(1, 16) * 7 % m.cfg.vocab_size
    logits = m(ids)
    torch.save(logits, Path(model_dir) / f"logits_{mode}.pt")
    print(json.dumps({"experts": experts, "params": params, "rss": after - before,
                      "dtypes": sorted({str(p.dtype) for mod in m.modules() if isinstance(mod, RoutedExperts)
                                        for p in mod.parameters()})}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024, help="hidden_size (default 1024)")
    ap.add_argument("--moe-inter", type=int, default=512, help="moe_intermediate_size (default 512)")
    ap.add_argument("--experts", type=int, default=16, help="n_routed_experts (default 16)")
    ap.add_argument("--layers", type=int, default=2, help="num_hidden_layers (default 2)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)

    import torch

    from dsv4_ascend.config import ModelConfig
    from dsv4_ascend.tiny import write_tiny_checkpoint

    cfg = ModelConfig(vocab_size=512, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                      head_dim=64, qk_rope_head_dim=16, q_lora_rank=128, o_groups=2, o_lora_rank=64,
                      sliding_window=16, compress_ratios=([0, 4] * args.layers)[: args.layers], index_n_heads=2,
                      index_head_dim=32, index_topk=4, n_routed_experts=args.experts, num_experts_per_tok=2,
                      moe_intermediate_size=args.moe_inter, num_hash_layers=1, num_nextn_predict_layers=0,
                      rope_original_max_position=64, max_position_embeddings=4096)
    print(f"config: hidden {cfg.hidden_size}, moe_intermediate {cfg.moe_intermediate_size}, "
          f"{cfg.n_routed_experts} experts x {cfg.num_hidden_layers} layers, expert_dtype {cfg.expert_dtype}, "
          f"model dtype bf16")
    with tempfile.TemporaryDirectory() as tmp:
        d = write_tiny_checkpoint(Path(tmp) / "ckpt", cfg, seed=0, tokenizer=False)
        disk = sum(p.stat().st_size for p in d.glob("*.safetensors"))
        print(f"checkpoint: {disk / 2**20:.1f} MiB on disk")
        res = {}
        for mode in ("native", "bf16"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(d)], check=True,
                                 capture_output=True, text=True).stdout
            res[mode] = json.loads(out.strip().splitlines()[-1])
        diff = (torch.load(d / "logits_native.pt") - torch.load(d / "logits_bf16.pt")).abs().max().item()
    n = 3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.n_routed_experts * cfg.num_hidden_layers
    print(f"routed-expert weights: {n:,} (w1, w2, w3 of every expert and layer)")
    print(f"{'mode':8} {'expert bytes':>14} {'bits/weight':>12} {'all params':>12} {'RSS growth':>12}  dtypes")
    for mode, r in res.items():
        print(f"{mode:8} {r['experts']:>14,} {8 * r['experts'] / n:>12.4f} {r['params'] / 2**20:>9.1f} MiB "
              f"{r['rss'] / 2**20:>8.1f} MiB  {', '.join(r['dtypes'])}")
    ratio = res["native"]["experts"] / res["bf16"]["experts"]
    print(f"routed experts, packed FP4 / bf16 = {ratio:.4f}x (goal <= 0.3x): {'PASS' if ratio <= 0.3 else 'FAIL'}")
    print(f"max |logits(native) - logits(bf16)| over 16 tokens = {diff:.3g}")
    return 0 if ratio <= 0.3 else 1


if __name__ == "__main__":
    sys.exit(main())
