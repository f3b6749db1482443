#!/usr/bin/env python3
"""Prefill throughput: dsv4-ascend's reference backend (eager, and with --compiled its compiled prefill ops) vs
transformers' DeepseekV4ForCausalLM, same weights.

Builds one random model per dtype (transformers' module with the same weights mapped into ours) and runs full
forwards (one chunk, no cache reuse) of each `--seqs` length on every implementation, interleaved: each repeat
runs ours (eager), ours (compiled) and transformers back to back, so machine load hits all of them alike; the
median per implementation is reported. Threads are pinned (unpinned runs on small shared machines vary by orders
of magnitude). `--logits last` (the default) computes the last position's logits only, as a prefill that hands
its first token to decode does (transformers: logits_to_keep=1); `--logits all` computes all of them.
transformers is skipped above `--hf-max-seq` (it is quadratic in the sequence); `--only transformers` / `--only ours`
times one side alone (a long transformers run in the background, compared with ours from another run).
`--gemms` also times the GEMMs alone: every mm / bmm / addmm / baddbmm / grouped mm of one eager forward of ours and
of transformers is recorded (with its operands) and replayed on its own; ours' GEMMs with fp32 operands are replayed
once more with the operands in bf16 (what they would cost at the bf16 rate, e.g. with a bf16 x bf16 -> fp32 GEMM).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model config preset (tiny, small); default small")
    ap.add_argument("--seqs", default="512", help="comma-separated prompt lengths (default 512); e.g. "
                    "512,2048,8192,32768 for the sweep")
    ap.add_argument("--seq", type=int, default=None, help="one prompt length (same as --seqs N)")
    ap.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per implementation; median reported")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value (default 2)")
    ap.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16 (default float32)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="one dtype (same as --dtypes)")
    ap.add_argument("--compiled", action="store_true", help="also time ours with compiled prefill ops "
                    "(graph_mode.GraphPrefiller; compiled before timing)")
    ap.add_argument("--logits", default="last", choices=["last", "all"], help="logits computed (default last)")
    ap.add_argument("--hf-max-seq", type=int, default=8192, help="skip transformers above this length")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers")
    ap.add_argument("--only", default=None, choices=["ours", "transformers"], help="run only ours (eager, and "
                    "compiled with --compiled) or only transformers, e.g. to time transformers once at a long "
                    "length in the background")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="wall: perf_counter; cpu: this "
                    "process's CPU time (time.process_time), which a loaded shared machine does not inflate "
                    "(meaningful with --threads 1)")
    ap.add_argument("--no-warmup", action="store_true", help="no untimed first run per length (long prompts: the "
                    "first timed run gives the compared logits; compiled ops are still compiled before timing)")
    ap.add_argument("--gemms", action="store_true", help="also time the GEMMs of one eager forward alone (ours and "
                    "transformers), and ours' fp32 GEMMs with bf16 operands")
    args = ap.parse_args()
    if args.only == "transformers" and (args.compiled or args.skip_hf):
        ap.error("--only transformers runs transformers alone: drop --compiled / --skip-hf")
    if args.only == "ours":
        args.skip_hf = True
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    from dsv4_ascend.config import ModelConfig, preset
    from dsv4_ascend.graph_mode import GraphPrefiller
    from dsv4_ascend.hf_oracle import build_hf_model, stable_indexer_topk
    from dsv4_ascend.model import Transformer
    from dsv4_ascend.reference import ReferenceBackend
    from dsv4_ascend.weights import assign_tensors

    seqs = [args.seq] if args.seq else [int(s) for s in args.seqs.split(",")]
    dtypes = [args.dtype] if args.dtype else args.dtypes.split(",")
    last = args.logits == "last"
    native = preset(args.preset).to_dict()
    native.pop("quantization_config", None)
    native.pop("expert_dtype", None)
    cfg = ModelConfig.from_dict(native)
    names = ([] if args.only == "transformers" else ["ours eager"] + ["ours compiled"] * args.compiled) + \
        ([] if args.skip_hf else ["transformers"])
    order = f"interleaved per repeat: {', '.join(names)}" if len(names) > 1 else f"only {names[0]}"
    print(f"config={args.preset} batch={args.batch} threads={args.threads} logits={args.logits} "
          f"repeats={args.repeats} (median) clock={args.clock}; {order}")
    for dname in dtypes:
        dtype = getattr(torch, dname)
        hf, sd = build_hf_model(native, seed=0, dtype=dtype)
        ours = Transformer(cfg, ReferenceBackend(), dtype, n_mtp=0)
        assign_tensors(ours, sd.items())
        impls = {} if args.only == "transformers" else {"ours eager": lambda ids: ours(ids, last_only=last)}
        if args.compiled:
            pre = GraphPrefiller(ours)
            impls["ours compiled"] = lambda ids: pre(ids, ours.new_cache(ids.shape[0], ids.shape[1]),
                                                     torch.arange(ids.shape[0]), 0, last_only=last)
            t0 = time.perf_counter()
            pre.warmup()
            print(f"[{dname}] compiled prefill ops: {pre.compiles} graphs in {time.perf_counter() - t0:.0f} s")

        def hf_run(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), stable_indexer_topk():
                out = hf(input_ids=ids, use_cache=False, logits_to_keep=1 if last else 0)
            return out.logits.float()

        for s in seqs:
            if s > cfg.max_position_embeddings:
                print(f"[{dname}] seq {s}: skipped (max_position_embeddings {cfg.max_position_embeddings})")
                continue
            ids = torch.randint(0, cfg.vocab_size, (args.batch, s), generator=torch.Generator().manual_seed(0))
            run = dict(impls)
            if not args.skip_hf and s <= args.hf_max_seq:
                run["transformers"] = hf_run
            outs = {} if args.no_warmup else {name: fn(ids) for name, fn in run.items()}  # warm-up (+ logits)
            times: dict[str, list[float]] = {name: [] for name in run}
            for _ in range(args.repeats):
                for name, fn in run.items():
                    t0 = clock()
                    out = fn(ids)
                    times[name].append(clock() - t0)
                    outs.setdefault(name, out)
            n = args.batch * s
            base = statistics.median(times["transformers"]) if "transformers" in times else None
            for name, ts in times.items():
                t = statistics.median(ts)
                diff = ""
                if "ours eager" in outs:
                    d = (outs[name][:, -1].float() - outs["ours eager"][:, -1].float()).abs().max().item()
                    diff = f"  last-logits max-abs-diff vs ours eager {d:.2e}"
                ratio = f"  {base / t:5.2f}x transformers" if base and name != "transformers" else ""
                print(f"[{dname}] seq {s:>6} {name:14s}: {n / t:9.1f} tok/s ({t * 1e3:8.0f} ms){ratio}{diff}",
                      flush=True)
            if args.gemms:
                for name in [k for k in run if k != "ours compiled"]:
                    calls = _record_gemms(lambda: run[name](ids))
                    reps = max(1, args.repeats)
                    t = statistics.median(_replay(calls, clock) for _ in range(reps))
                    f32 = [c for c in calls if _fp32_operands(c)]
                    line = f"{t * 1e3:.1f} ms ({len(calls)} calls)"
                    if f32 and name == "ours eager":
                        t32 = statistics.median(_replay(f32, clock) for _ in range(reps))
                        t16 = statistics.median(_replay(f32, clock, torch.bfloat16) for _ in range(reps))
                        line += (f"; of which fp32-operand GEMMs {t32 * 1e3:.1f} ms ({len(f32)} calls), "
                                 f"{t16 * 1e3:.1f} ms with bf16 operands")
                    print(f"[{dname}] seq {s:>6} {name:14s}: GEMMs alone {line}", flush=True)


_GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
          torch.ops.aten.baddbmm.default, torch.ops.aten.mm.out, torch.ops.aten.bmm.out,
          torch.ops.aten._grouped_mm.default}
_CASTABLE = _GEMMS - {torch.ops.aten._grouped_mm.default}


class _GemmRecorder(TorchDispatchMode):
    """Records (op, operands cloned, kwargs) of every GEMM dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMMS:
            clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            self.calls.append((func, [clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _record_gemms(fn) -> list:
    with _GemmRecorder() as rec:
        fn()
    return rec.calls


def _fp32_operands(call) -> bool:
    func, a, _ = call
    return func in _CASTABLE and any(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in a)


def _replay(calls: list, clock, dtype: torch.dtype | None = None) -> float:
    """Time of running the recorded GEMMs once each (operands cast to `dtype` when given)."""
    cast = (lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) if dtype else \
        (lambda v: v)
    ops = [(f, [cast(t) for t in a], {n: cast(v) for n, v in k.items()}) for f, a, k in calls]
    t0 = clock()
    for f, a, k in ops:
        f(*a, **k)
    return clock() - t0


if __name__ == "__main__":
    main()
