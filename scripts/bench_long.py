#!/usr/bin/env python3
"""Long-context benchmark: the engine prefills one prompt of up to 1,048,576 tokens in chunks, then decodes.

Model: the `long` preset (V4's context settings: window 128, CSA ratio 4 with index_topk 512, HCA ratio 128, YaRN
65,536 x 16, max_position_embeddings 2^20; narrow widths), random weights, reference backend, fp32.
Reports, with progress while it runs:
1. prefill tokens/s of every `--segment` tokens of the prompt (does prefill slow down as the context grows?);
2. decode step time (median of `--decode-steps` greedy steps) after prompts of each `--decode-contexts` length and
   after the whole prompt;
3. KV-cache bytes allocated (and per token) and the process's peak RSS against the prediction printed before the
   prefill: `RSS before the engine + cache bytes planned by engine.plan_capacity (resident from allocation) +
   engine.prefill_working_set(chunk, length)` (docs/design.md, "Long context");
4. optional exactness check at the end of the prompt (--exact CHUNK_B): the prompt prefilled again, through the
   model, in chunks of CHUNK_B into a second cache: its last-position fp32 logits must equal the main run's, and the
   main run's greedy tokens must equal recomputing those positions by one prefill chunk (exit status 1 if not);
5. optional probes (--probe): prefill and decode speed at long contexts over a random-filled cache.

Full run with the exactness check (docs/design.md, "Long context"):
  python scripts/bench_long.py --exact 8269 --decode-contexts 1024,131072 --probe 1048576
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
from torch import Tensor


def _rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0, or 1 when the exactness check (--exact) fails."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1 << 20,
                    help="prompt tokens prefilled (default 1048576), capped at max_position_embeddings - "
                         "decode-steps - 1 so that the decoded positions stay below 2^20")
    ap.add_argument("--segment", type=int, default=1 << 16, help="tokens per reported prefill segment (65536)")
    ap.add_argument("--chunk", type=int, default=4096, help="engine prefill chunk in tokens (4096)")
    ap.add_argument("--decode-contexts", default="1024,131072",
                    help="comma-separated shorter prompt lengths to time decode after (each is its own request, "
                         "prefilled first); the full --length is always timed too. Empty: only the full length")
    ap.add_argument("--decode-steps", type=int, default=16, help="greedy decode steps timed per context (16)")
    ap.add_argument("--exact", type=int, default=0, metavar="CHUNK_B",
                    help="after the main run, prefill the prompt again (model calls, a second cache) in chunks of "
                         "CHUNK_B (!= --chunk): the last-position fp32 logits must equal the main run's (max |diff| "
                         "<= 1e-4) and the main run's greedy tokens (the prompt's argmax, then --decode-steps decoded) "
                         "must equal recomputing those positions by one prefill chunk; exit status 1 if not. 0: off")
    ap.add_argument("--probe", default="",
                    help="comma-separated context lengths P (e.g. 1048576) to probe without prefilling them: a fresh "
                         "1-slot cache is filled with random values (a stand-in history; the work of a step depends "
                         "on how many entries exist, not on their values), then --probe-tokens are prefilled at "
                         "positions just below P - decode-steps - 1 and --decode-steps decode steps run. Runs after "
                         "the main run, whose peak RSS is reported before it")
    ap.add_argument("--probe-tokens", type=int, default=8192, help="prefill tokens timed per probe (8192)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value (2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (0)")
    ap.add_argument("--mmap-threshold", type=int, default=4 << 20,
                    help="glibc mallopt(M_MMAP_THRESHOLD) in bytes, set at start (default 4 MiB). Blocks above it "
                         "(the per-block indexer/attention temporaries) are mmap'd and returned on free, so RSS does "
                         "not keep what a chunk freed; smaller ones are reused from the heap. 0: glibc as is (its "
                         "dynamic threshold keeps freed blocks up to 32 MiB in the heap: RSS creeps as their sizes "
                         "change with the context); 131072 (glibc's initial value): flat RSS, but every temporary "
                         "is page-faulted on first touch (docs/design.md)")
    ap.add_argument("--hugetlb", type=int, choices=(0, 1), default=1,
                    help="1 (default): run under GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (the script re-executes "
                         "itself once to set it), so mmap'd blocks use transparent huge pages: 512x fewer page "
                         "faults (at 1M tokens a 4 KiB-page fault per fresh temporary halved prefill speed)")
    ap.add_argument("--trim", type=int, choices=(0, 1), default=1,
                    help="1 (default): glibc malloc_trim(0) after every engine step, so the heap's free pages go "
                         "back to the system. Without it the heap of blocks under the mmap threshold grew from 127 "
                         "to 240 MiB resident between 500K and 660K tokens of a 1M run (freed blocks the next, "
                         "slightly larger ones do not fit) while live tensors stayed bounded (docs/design.md)")
    args = ap.parse_args(argv)
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if args.hugetlb and "glibc.malloc.hugetlb" not in tunables:
        if argv is not None:
            ap.error("--hugetlb 1 needs GLIBC_TUNABLES=glibc.malloc.hugetlb=1 at process start (run the script, "
                     "or pass --hugetlb 0)")
        env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, "glibc.malloc.hugetlb=1"])))
        print("re-running under GLIBC_TUNABLES=glibc.malloc.hugetlb=1", flush=True)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    for name in ("length", "segment", "chunk", "decode_steps", "threads", "probe_tokens"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, found {getattr(args, name)}")
    if args.exact < 0 or args.exact == args.chunk:
        ap.error(f"--exact must be a chunk size other than --chunk ({args.chunk}), or 0; found {args.exact}")
    if args.mmap_threshold < 0:
        ap.error(f"--mmap-threshold must be >= 0, found {args.mmap_threshold}")
    libc = None
    if args.mmap_threshold or args.trim:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    if args.mmap_threshold and not libc.mallopt(-3, args.mmap_threshold):  # M_MMAP_THRESHOLD = -3 (malloc.h)
        ap.error(f"mallopt(M_MMAP_THRESHOLD, {args.mmap_threshold}) failed (not glibc?); pass --mmap-threshold 0")
    contexts = [int(c) for c in args.decode_contexts.split(",") if c.strip()]
    probes = [int(c) for c in args.probe.split(",") if c.strip()]
    torch.set_num_threads(args.threads)

    from dsv4_ascend.cache import KVCache
    from dsv4_ascend.config import preset
    from dsv4_ascend.engine import Engine, plan_capacity, prefill_working_set
    from dsv4_ascend.model import Transformer
    from dsv4_ascend.reference import ReferenceBackend
    from dsv4_ascend.sampling import SamplingParams
    from dsv4_ascend.tiny import random_weights
    from dsv4_ascend.weights import assign_tensors

    cfg = preset("long")
    steps = args.decode_steps
    max_seq = min(max([args.length] + contexts) + steps + 1, cfg.max_position_embeddings)
    length = min(args.length, max_seq - steps - 1)
    if any(c >= length for c in contexts):
        ap.error(f"--decode-contexts must be shorter than the prompt ({length} tokens)")
    model = Transformer(cfg, ReferenceBackend(), torch.float32, n_mtp=0)
    assign_tensors(model, [(k, v) for k, v in random_weights(cfg, args.seed).items() if not k.startswith("mtp.")])
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(2, cfg.vocab_size, (length,), generator=g).tolist()
    print(f"preset long: hidden {cfg.hidden_size}, layer ratios {cfg.layer_ratios}, window {cfg.sliding_window}, "
          f"index_topk {cfg.index_topk}, YaRN {cfg.rope_original_max_position} x {cfg.rope_factor:g}; fp32, "
          f"reference backend, threads {args.threads}; prompt {length} tokens, chunk {args.chunk}", flush=True)

    # The cache plan: the bytes of one slot at max_seq, as plan_capacity sizes it (page count for that budget).
    need = KVCache(cfg, 1, max_seq, torch.float32, "meta", 0, preassign=False).nbytes()
    pages = plan_capacity(model, need, 1, max_seq)
    rss0 = _rss_mib()
    eng = Engine(model, max_slots=1, max_seq_len=max_seq, prefill_chunk=args.chunk, eos_token_id=-1, cache_bytes=need)
    cache_bytes = eng.cache.nbytes()
    rss_engine = _rss_mib()
    ws = prefill_working_set(model, args.chunk, max_seq)
    predicted = rss0 + (need + sum(ws.values())) / 2**20

    def meta_cache(pages: int) -> KVCache:
        return KVCache(cfg, 1, max_seq, torch.float32, "meta", 0, num_blocks=pages, preassign=False)

    paged_per_token = (meta_cache(2).nbytes() - meta_cache(1).nbytes()) / meta_cache(1).block_size
    print(f"KV cache: planned {need / 2**20:.1f} MiB ({pages} pages of {eng.cache.block_size} tokens), allocated "
          f"{cache_bytes / 2**20:.1f} MiB = {cache_bytes / max_seq:.1f} B/token of context "
          f"(paged part {paged_per_token:.1f} B/token); RSS before the engine {rss0:.0f} MiB, after it "
          f"{rss_engine:.0f} MiB (the cache is resident from allocation: torch.zeros writes every page)", flush=True)
    print(f"predicted peak RSS: {predicted:.0f} MiB = RSS before the engine {rss0:.0f} + planned cache "
          f"{need / 2**20:.1f} + prefill working set at {max_seq} tokens "
          f"({', '.join(f'{k} {v / 2**20:.1f}' for k, v in ws.items())})", flush=True)

    def run(n: int, report_segments: bool) -> tuple[list[tuple[float, float]], list[int], Tensor | None]:
        """Prefill prompt[:n] through the engine, then `steps` greedy decode steps; returns the decode step times
        (wall, CPU seconds of the process),
        the greedy tokens and the fp32 logits [V] of the prompt's last position (the engine's `model.logits` call
        that chose the first token)."""
        seen: list[Tensor] = []
        model.logits = lambda streams: seen.append(type(model).logits(model, streams)) or seen[-1]
        (req,) = [eng.add_request(prompt[:n], SamplingParams(temperature=0, max_tokens=steps + 1))]
        t0 = t_seg = time.perf_counter()
        c_seg, seg_done, seg_start, times = time.process_time(), 0, 0, []
        while eng.has_work:
            was_prefilling = req.prefilled < n
            t, c = time.perf_counter(), time.process_time()
            eng.step()
            if libc is not None and args.trim:
                libc.malloc_trim(0)  # return the heap's free pages (glibc keeps them resident otherwise)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if was_prefilling and req.prefilled == n:
                del model.logits  # the prompt's last logits are seen[-1]; decode steps are not recorded
            if not was_prefilling:
                times.append((dt, dc))
            elif report_segments and (req.prefilled // args.segment > seg_done or req.prefilled == n):
                now, cpu = time.perf_counter(), time.process_time()
                seg_tokens = req.prefilled - seg_start
                print(f"  prefill {seg_start:>8}..{req.prefilled:>8}: {seg_tokens / (now - t_seg):8.1f} tok/s, "
                      f"{seg_tokens / (cpu - c_seg):8.1f} tok/CPU-s  (elapsed {now - t0:7.1f} s, peak RSS "
                      f"{_rss_mib():.0f} MiB)", flush=True)
                seg_done, seg_start, t_seg, c_seg = req.prefilled // args.segment, req.prefilled, now, cpu
        return times, req.output, seen[-1][0] if seen else None

    print("\n1. prefill tok/s per segment", flush=True)
    t_full, out, last_logits = run(length, True)
    print("\n2. decode step time (median of greedy steps after the prompt; CPU time: all threads of the process)",
          flush=True)
    decode = {length: t_full}
    for c in contexts:
        decode[c] = run(c, False)[0]
    for c in sorted(decode):
        print(f"  context {c:>8}: {statistics.median(t for t, _ in decode[c]) * 1e3:8.2f} ms/step, CPU "
              f"{statistics.median(c for _, c in decode[c]) * 1e3:8.2f} ms/step", flush=True)
    lo = min(decode)
    ratio = [statistics.median(x[i] for x in decode[length]) / statistics.median(x[i] for x in decode[lo])
             for i in (0, 1)]
    print(f"  t({length}) / t({lo}) = {ratio[0]:.2f} wall, {ratio[1]:.2f} CPU  (goal <= 2)")
    peak = _rss_mib()
    print(f"\n3. memory (main run): peak RSS {peak:.0f} MiB, predicted {predicted:.0f} MiB before the prefill: "
          f"peak / predicted = {peak / predicted:.3f} (goal within 10%); working set seen "
          f"{peak - rss_engine:.0f} MiB (peak - RSS after the engine), predicted {sum(ws.values()) / 2**20:.0f}",
          flush=True)

    eng = None  # frees the main run's cache: the exactness check and the probes allocate their own
    ok = exact(model, prompt, last_logits, out, max_seq, args.exact, args.segment) if args.exact else True
    if probes:
        print(f"\n5. probes over a random-filled history (no prefill of it): {args.probe_tokens} prefill tokens in "
              f"chunks of {args.chunk}, then {steps} decode steps", flush=True)
    for p in probes:
        probe(model, p, args.probe_tokens, args.chunk, steps, g)
    return 0 if ok else 1


def exact(model, prompt: list[int], a: Tensor, out: list[int], max_seq: int, chunk: int, segment: int) -> bool:
    """Prefill `prompt` into a fresh cache in chunks of `chunk`; compare its last-position logits with `a` and
    recompute the greedy tokens `out` by one prefill chunk at the prompt's end; print both verdicts."""
    n = len(prompt)
    print(f"\n4. exactness at the end of the prompt: prefill {n} tokens again in chunks of {chunk} (second cache)",
          flush=True)
    cache = model.new_cache(1, max_seq)
    slot = torch.zeros(1, dtype=torch.int64)
    ids = torch.tensor([prompt])
    t0, done = time.perf_counter(), 0
    for s in range(0, n, chunk):
        logits = model(ids[:, s:s + chunk], cache, slot, s, last_only=True)
        if (s + chunk) // segment > done or s + chunk >= n:
            done = (s + chunk) // segment
            print(f"  prefilled {min(s + chunk, n):>8} (elapsed {time.perf_counter() - t0:7.1f} s)", flush=True)
    b = logits[0, -1]
    diff = (a - b).abs().max().item()
    # Positions n .. n+len(out)-2 in one chunk: their argmax predicts out[1:]; out[0] is the prompt's argmax.
    rec = [int(b.argmax())] + model(torch.tensor([out[:-1]]), cache, slot, n)[0].argmax(-1).tolist()
    same = rec == out
    print(f"  last-position logits, chunk {chunk} vs the main run's: max |diff| {diff:.3g} "
          f"({'PASS' if diff <= 1e-4 else 'FAIL'}: fp32, goal <= 1e-4)")
    print(f"  greedy tokens {out}\n  recomputed by prefill {rec}: {'PASS' if same else 'FAIL'}", flush=True)
    return diff <= 1e-4 and same


def probe(model, context: int, n: int, chunk: int, steps: int, g: torch.Generator) -> None:
    """Prefill n tokens ending just below `context` over a random-filled cache, then decode; print both speeds."""
    cache = model.new_cache(1, context)
    for lc in cache.layers:
        for t in lc.tensors():
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    end = context - steps - 1
    slot = torch.zeros(1, dtype=torch.int64)
    ids = torch.randint(2, model.cfg.vocab_size, (1, n), generator=g)
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, n, chunk):
        logits = model(ids[:, s:s + chunk], cache, slot, end - n + s, last_only=True)
    t_pre, c_pre = time.perf_counter() - t0, time.process_time() - c0
    tok, times = logits[:, -1].argmax(-1), []
    for k in range(steps):
        t, c = time.perf_counter(), time.process_time()
        logits = model.decode(tok.view(1, 1), torch.tensor([end + k]), cache, slot, max_len=end + k + 1)
        times.append((time.perf_counter() - t, time.process_time() - c))
        tok = logits[:, -1].argmax(-1)
    print(f"  context {context:>8}: prefill {end - n}..{end}: {n / t_pre:8.1f} tok/s, {n / c_pre:8.1f} tok/CPU-s; "
          f"decode at {end}: {statistics.median(t for t, _ in times) * 1e3:8.2f} ms/step, CPU "
          f"{statistics.median(c for _, c in times) * 1e3:8.2f} ms/step", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
