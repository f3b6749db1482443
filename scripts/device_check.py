#!/usr/bin/env python3
"""Device check: run as is on a machine with a GPU or an Ascend NPU (a few minutes; no checkpoint needed).

    python scripts/device_check.py --device cuda          # or --device npu (torch_npu + CANN), --device cpu
    python scripts/device_check.py --device cpu --tiny    # seconds; what the test suite runs

1. Correctness: the tiny preset (all three layer types, hash + learned MoE) with random weights in the official
   formats (FP8 dense + e8m0 scales, MXFP4 experts), run on the device in `--dtype` from the native formats, against
   the fp32 CPU reference on the same (dequantised) weights: logit cosine and top-1 agreement over a prefill and
   greedy decode steps. Exit status 1 when below the bars.
2. Performance: a V4-shaped model (`dsv4_ascend.tiny.wide_config`: V4-Flash's real widths, `--layers` layers,
   official formats, random weights) on the device: prefill tok/s (batch 1; eager and, with graphs, the compiled
   prefill ops) per context, and decode step times at each batch and context, eager and graph mode
   (graph_mode.GraphDecoder), with the device's peak memory. Decode steps run on a cache filled with random values
   up to the context (a step's work depends on how many entries exist, not on their values:
   scripts/bench_decode.py). A graph bucket reads every page of the cache rows it holds, so its step time is that
   of the cache's capacity (the largest context) at every context.
`--tiny` runs the performance part on the tiny preset with short contexts instead of the wide model.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

# Bars of the correctness check, per device dtype. bf16 vs the fp32 reference on the tiny preset's whole-block
# weights: the bf16 noise floor measured in tests/test_ascend_parity.py is cosine 0.9966 / top-1 92.0%, so
# 0.99 / 0.85 leave room for another device's summation order and fail on a wrong kernel (cosine ~0.75,
# tests/test_ascend_950.py). fp32 on the device: only summation order differs (cosine ~1 - 1e-9).
BARS = {"bfloat16": (0.99, 0.85), "float32": (0.9999, 0.98)}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "npu":  # pragma: no cover - needs torch_npu
        torch.npu.synchronize(dev)


def _peak_gib(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB device"
    if dev.type == "npu":  # pragma: no cover - needs torch_npu
        return f"{torch.npu.max_memory_allocated(dev) / 2**30:.2f} GiB device"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak RSS"


def _timed(fn, dev: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


_TENSORS: dict[tuple[str, int], dict[str, torch.Tensor]] = {}


def _model(cfg, dev: torch.device, backend: str, dtype: torch.dtype, native: bool, seed: int = 0):
    """Model of `cfg` on `dev` with random weights in the official formats (native) or dequantised from them."""
    from dsv4_ascend.loading import make_backend
    from dsv4_ascend.model import Transformer, WeightFormats
    from dsv4_ascend.tiny import dequantized_weights, official_tensors
    from dsv4_ascend.weights import assign_tensors

    key = (repr(cfg), seed)
    if key not in _TENSORS:  # generated once per config (the wide model's take a while on a CPU)
        _TENSORS[key] = {k: v for k, v in official_tensors(cfg, seed).items() if not k.startswith("mtp.")}
    tensors = _TENSORS[key]
    fmt = WeightFormats("fp8", "fp4") if native else WeightFormats()
    model = Transformer(cfg, make_backend(backend, "exact"), dtype, fmt, device=dev, n_mtp=0)
    assign_tensors(model, (tensors if native else dequantized_weights(tensors)).items())
    return model


def _greedy_logits(m, dev: torch.device, ids: torch.Tensor, steps: int, feed: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 CPU logits [B, prompt+steps, V] of a prefill then `steps` decode steps, the decoded tokens [B, steps]):
    the tokens are this model's greedy picks, or `feed` (another run's picks, so both runs see the same inputs)."""
    b, prompt = ids.shape
    cache = m.new_cache(b, prompt + steps)
    slots = torch.arange(b, device=dev)
    out = [m(ids.to(dev), cache, slots, 0).float().cpu()]
    toks = []
    for i in range(steps):
        tok = out[-1][:, -1].argmax(-1, keepdim=True) if feed is None else feed[:, i:i + 1]
        toks.append(tok)
        out.append(m.decode(tok.to(dev), torch.full((b,), prompt + i, device=dev), cache, slots).float().cpu())
    return torch.cat(out, 1), torch.cat(toks, 1)


def check_correctness(dev: torch.device, backend: str, dtype: torch.dtype, prompt: int = 48, steps: int = 8
                      ) -> bool:
    """Tiny preset on the device (native formats, `dtype`) vs the fp32 CPU reference: logit cosine and top-1."""
    from dsv4_ascend.config import preset

    cfg = preset("tiny")
    ref = _model(cfg, torch.device("cpu"), "reference", torch.float32, native=False)
    got = _model(cfg, dev, backend, dtype, native=True)
    ids = torch.randint(2, cfg.vocab_size, (2, prompt), generator=torch.Generator().manual_seed(1))
    want, toks = _greedy_logits(ref, torch.device("cpu"), ids, steps)
    have, _ = _greedy_logits(got, dev, ids, steps, feed=toks)
    a, b = want.double(), have.double()
    cos = ((a * b).sum() / (a.norm() * b.norm())).item()
    top1 = (a.argmax(-1) == b.argmax(-1)).double().mean().item()
    min_cos, min_top1 = BARS[str(dtype).removeprefix("torch.")]
    ok = cos >= min_cos and top1 >= min_top1  # NaN fails
    print(f"correctness (tiny preset, {backend} on {dev}, {str(dtype)[6:]}, native FP8/FP4 vs fp32 CPU reference; "
          f"{prompt}-token prefill + {steps} decode steps, 2 rows): logit cosine {cos:.6f} (bar {min_cos}), "
          f"top-1 {top1:.1%} (bar {min_top1:.0%}): {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def perf_table(model, dev: torch.device, contexts: list[int], batches: list[int], chunk: int, graph: bool,
               compiler: str | None, repeats: int) -> None:
    """Prefill tok/s (batch 1) and decode ms/step (eager, graph) per context and batch; peak memory."""
    from dsv4_ascend.graph_mode import GraphDecoder, GraphPrefiller
    from dsv4_ascend.sampling import SamplingParams

    cfg = model.cfg
    print(f"\nperformance: hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads x {cfg.head_dim}, "
          f"{cfg.num_hidden_layers} layers (ratios {cfg.layer_ratios}), {cfg.n_routed_experts} experts, "
          f"{str(model.dtype)[6:]} on {dev}", flush=True)
    pre = GraphPrefiller(model, compiler) if graph else None
    for ctx in contexts:
        ids = torch.randint(0, cfg.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0)).to(dev)
        for name, fn in (("eager", model), ("compiled", pre)):
            if fn is None:
                continue
            cache = model.new_cache(1, ctx)
            slots = torch.zeros(1, dtype=torch.int64, device=dev)

            def run(fn=fn, cache=cache, slots=slots) -> None:
                for s in range(0, ctx, chunk):
                    fn(ids[:, s:s + chunk], cache, slots, s, last_only=True)

            t = _timed(run, dev, 1 if ctx > 4096 else repeats)
            print(f"  prefill  ctx {ctx:>6} batch  1 {name:8s}: {ctx / t:10.1f} tok/s  ({_peak_gib(dev)})",
                  flush=True)
    top = max(batches)
    cache = model.new_cache(top + 1, max(contexts) + repeats + 2)  # + 1: GraphDecoder's pad slot
    g = torch.Generator().manual_seed(0)
    for t in (t for lc in cache.layers for t in lc.tensors()):
        if t.dtype.is_floating_point:
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    dec = GraphDecoder(model, cache, top, batches, compiler) if graph else None
    if dec is not None:
        t0 = time.perf_counter()
        dec.warmup(progress=False)
        print(f"  decode graphs: {dec.compiles} buckets {batches} compiled in {time.perf_counter() - t0:.0f} s",
              flush=True)
    for ctx in contexts:
        for b in batches:
            slots = torch.arange(b, device=dev)
            ids = torch.randint(0, cfg.vocab_size, (b, 1), generator=g).to(dev)
            pos = torch.full((b,), ctx, device=dev)
            t_e = _timed(lambda: model.decode(ids, pos, cache, slots, max_len=ctx + 1), dev, repeats)
            line = f"  decode   ctx {ctx:>6} batch {b:>2} eager {t_e * 1e3:8.2f} ms/step"
            if dec is not None:
                params = [SamplingParams(temperature=0)] * b
                t_g = _timed(lambda: dec.step(ids, pos, slots, params), dev, repeats)
                line += f"   graph {t_g * 1e3:8.2f} ms/step"
            print(f"{line}  ({_peak_gib(dev)})", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="torch device: cuda, npu, cpu (default cuda)")
    ap.add_argument("--backend", default=None, choices=["reference", "ascend"],
                    help="op implementation (default: ascend on npu, reference elsewhere)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(BARS), help="activation dtype on the device")
    ap.add_argument("--tiny", action="store_true", help="performance part on the tiny preset with short contexts")
    ap.add_argument("--layers", type=int, default=2, help="layers of the V4-shaped model (default 2: CSA + HCA)")
    ap.add_argument("--contexts", default=None, help="comma-separated contexts (default 1024,32768; tiny: 32,128)")
    ap.add_argument("--batches", default="1,8,64", help="comma-separated decode batch sizes (default 1,8,64)")
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk length (default 4096)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (median; default 3)")
    ap.add_argument("--no-graph", action="store_true", help="skip graph-mode decode and compiled prefill")
    ap.add_argument("--graph-compiler", default=None,
                    help="torch.compile backend override (e.g. aot_eager: capture without code generation)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = ap.parse_args(argv)
    from dsv4_ascend.config import preset
    from dsv4_ascend.loading import LoadError, check_device
    from dsv4_ascend.tiny import wide_config

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dev = check_device(args.device)
    except LoadError as e:
        print(f"device_check: {e}", file=sys.stderr)
        return 2
    backend = args.backend or ("ascend" if dev.type == "npu" else "reference")
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    print(f"device_check: torch {torch.__version__}, device {dev}, backend {backend}", flush=True)
    ok = check_correctness(dev, backend, dtype)
    cfg = preset("tiny") if args.tiny else wide_config(args.layers)
    contexts = [int(c) for c in (args.contexts or ("32,128" if args.tiny else "1024,32768")).split(",")]
    if max(contexts) > cfg.max_position_embeddings:
        ap.error(f"--contexts: {max(contexts)} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    model = _model(cfg, dev, backend, dtype, native=True)
    perf_table(model, dev, contexts, [int(b) for b in args.batches.split(",")], args.chunk, not args.no_graph,
               args.graph_compiler, args.repeats)
    print(f"\ndevice_check: {'PASS' if ok else 'FAIL'} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
