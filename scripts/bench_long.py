#!/usr/bin/env python3
"""Long-context benchmark: the engine prefills one prompt of up to 1,048,576 tokens in chunks, then decodes.

Model: the `long` preset (V4's context settings: window 128, CSA ratio 4 with index_topk 512, HCA ratio 128, YaRN
65,536 x 16, max_position_embeddings 2^20; narrow widths), random weights, reference backend, fp32.
Reports, with progress while it runs:
1. prefill tokens/s of every `--segment` tokens of the prompt (does prefill slow down as the context grows?);
2. decode step time (median of `--decode-steps` greedy steps) after prompts of each `--decode-contexts` length and
   after the whole prompt;
3. KV-cache bytes allocated (and per token) and the process's peak RSS against the prediction
   `RSS before the engine + cache bytes planned by engine.plan_capacity + working set`, the working set taken as
   measured over the first segment plus the one term that grows with the context (docs/design.md, "Long
   context"), and against an analytic bound from the per-block budgets;
4. optional probes (--probe): prefill and decode speed at long contexts over a random-filled cache.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch


def _rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _working_set_bytes(cfg, chunk: int, context: int) -> int:
    """Bound on prefill temporaries of one chunk, for the reference backend in fp32 (docs/design.md).

    Per-block budgets (independent of the context): the indexer's [blk, heads, N] scores and the attention's
    [blk, K, d] gathered keys + logits, each alive a few times over (einsum output, relu, weighted sum / mask,
    top-k; keys, logits, probabilities). Per chunk: activations and projections, a few fp32 copies of the
    [chunk, hc_mult, hidden] streams. The one part that grows with the context: each CSA layer reads the
    indexer keys of all context/4 entries into one contiguous tensor (index_head_dim values each)."""
    import dsv4_ascend.backend as backend_mod
    import dsv4_ascend.model as model_mod

    f32 = 4
    blocks = 4 * model_mod._INDEXER_SCORES * f32 + 3 * backend_mod._ATTN_ELEMENTS * f32
    widest = max(cfg.num_attention_heads * cfg.head_dim, cfg.hc_mult * cfg.hidden_size,
                 cfg.index_n_heads * cfg.index_head_dim, cfg.index_topk * 2)
    per_chunk = 8 * chunk * widest * f32
    keys = context // 4 * cfg.index_head_dim * f32
    return blocks + per_chunk + keys


def main() -> None:
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
    ap.add_argument("--probe", default="",
                    help="comma-separated context lengths P (e.g. 1048576) to probe without prefilling them: a fresh "
                         "1-slot cache is filled with random values (a stand-in history; the work of a step depends "
                         "on how many entries exist, not on their values), then --probe-tokens are prefilled at "
                         "positions just below P - decode-steps - 1 and --decode-steps decode steps run. Runs after "
                         "the main run, whose peak RSS is reported before it")
    ap.add_argument("--probe-tokens", type=int, default=8192, help="prefill tokens timed per probe (8192)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads value (2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt (0)")
    ap.add_argument("--mmap-threshold", type=int, default=128 * 1024,
                    help="glibc mallopt(M_MMAP_THRESHOLD) in bytes, set at start (default 131072, glibc's initial "
                         "value; setting it turns off glibc's dynamic threshold, under which freed 1-32 MiB "
                         "temporaries stay in the heap and RSS creeps up with varying sizes); 0 = leave glibc as is")
    args = ap.parse_args()
    for name in ("length", "segment", "chunk", "decode_steps", "threads", "probe_tokens"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, found {getattr(args, name)}")
    if args.mmap_threshold < 0:
        ap.error(f"--mmap-threshold must be >= 0, found {args.mmap_threshold}")
    if args.mmap_threshold:
        import ctypes

        if not ctypes.CDLL("libc.so.6").mallopt(-3, args.mmap_threshold):  # M_MMAP_THRESHOLD = -3 (malloc.h)
            ap.error(f"mallopt(M_MMAP_THRESHOLD, {args.mmap_threshold}) failed (not glibc?); pass --mmap-threshold 0")
    contexts = [int(c) for c in args.decode_contexts.split(",") if c.strip()]
    probes = [int(c) for c in args.probe.split(",") if c.strip()]
    torch.set_num_threads(args.threads)

    from dsv4_ascend.cache import KVCache
    from dsv4_ascend.config import preset
    from dsv4_ascend.engine import Engine, plan_capacity
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
    ws = _working_set_bytes(cfg, args.chunk, max_seq)
    predicted = rss0 + (need + ws) / 2**20
    def meta_cache(pages: int) -> KVCache:
        return KVCache(cfg, 1, max_seq, torch.float32, "meta", 0, num_blocks=pages, preassign=False)

    paged_per_token = (meta_cache(2).nbytes() - meta_cache(1).nbytes()) / meta_cache(1).block_size
    print(f"KV cache: planned {need / 2**20:.1f} MiB ({pages} pages of {eng.cache.block_size} tokens), allocated "
          f"{cache_bytes / 2**20:.1f} MiB = {cache_bytes / max_seq:.1f} B/token of context "
          f"(paged part {paged_per_token:.1f} B/token); RSS before the engine "
          f"{rss0:.0f} MiB; working-set bound {ws / 2**20:.0f} MiB", flush=True)

    early: list[tuple[int, float]] = []  # (tokens, peak RSS MiB) after the first segment

    def run(n: int, report_segments: bool) -> list[float]:
        """Prefill prompt[:n] through the engine, then `steps` greedy decode steps; returns decode step times."""
        (req,) = [eng.add_request(prompt[:n], SamplingParams(temperature=0, max_tokens=steps + 1))]
        t0 = t_seg = time.perf_counter()
        seg_done, times = 0, []
        while eng.has_work:
            was_prefilling = req.prefilled < n
            t = time.perf_counter()
            eng.step()
            dt = time.perf_counter() - t
            if not was_prefilling:
                times.append(dt)
            elif report_segments and (req.prefilled // args.segment > seg_done or req.prefilled == n):
                now = time.perf_counter()
                seg_tokens = req.prefilled - seg_done * args.segment
                print(f"  prefill {seg_done * args.segment:>8}..{req.prefilled:>8}: {seg_tokens / (now - t_seg):8.1f} "
                      f"tok/s  (elapsed {now - t0:7.1f} s, peak RSS {_rss_mib():.0f} MiB)", flush=True)
                if not seg_done:
                    early.append((req.prefilled, _rss_mib()))
                seg_done, t_seg = req.prefilled // args.segment, now
        return times

    print("\n1. prefill tok/s per segment", flush=True)
    t_full = run(length, True)
    print("\n2. decode step time (median of greedy steps after the prompt)", flush=True)
    decode = {length: statistics.median(t_full)}
    for c in contexts:
        decode[c] = statistics.median(run(c, False))
    for c in sorted(decode):
        print(f"  context {c:>8}: {decode[c] * 1e3:8.2f} ms/step", flush=True)
    lo = min(decode)
    print(f"  t({length}) / t({lo}) = {decode[length] / decode[lo]:.2f}  (goal <= 2)")
    peak = _rss_mib()
    # The working set measured over the first segment (peak RSS then, less the RSS before the engine and the cache
    # pages written so far) plus the one part that grows with the context (the indexer keys read per CSA call).
    n1, rss1 = early[0]
    grow = (_working_set_bytes(cfg, args.chunk, max_seq) - _working_set_bytes(cfg, args.chunk, n1)) / 2**20
    ws1 = rss1 - rss0 - cache_bytes * n1 / max_seq / 2**20
    pred1 = rss0 + need / 2**20 + ws1 + grow
    print(f"\n3. memory (main run): peak RSS {peak:.0f} MiB")
    print(f"  predicted from the first {n1} tokens: {pred1:.0f} MiB (RSS before the engine {rss0:.0f} + planned cache "
          f"{need / 2**20:.1f} + working set measured then {ws1:.0f} + growth of the indexer-key read {grow:.1f}); "
          f"peak / predicted = {peak / pred1:.3f} (goal within 10%)")
    print(f"  analytic bound: {predicted:.0f} MiB (RSS before the engine + cache + working-set bound "
          f"{ws / 2**20:.0f}); peak / bound = {peak / predicted:.3f}", flush=True)

    if probes:
        del eng
        print(f"\n4. probes over a random-filled history (no prefill of it): {args.probe_tokens} prefill tokens in "
              f"chunks of {args.chunk}, then {steps} decode steps", flush=True)
    for p in probes:
        probe(model, p, args.probe_tokens, args.chunk, steps, g)


def probe(model, context: int, n: int, chunk: int, steps: int, g: torch.Generator) -> None:
    """Prefill n tokens ending just below `context` over a random-filled cache, then decode; print both speeds."""
    cache = model.new_cache(1, context)
    for lc in cache.layers:
        for t in lc.tensors():
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    end = context - steps - 1
    slot = torch.zeros(1, dtype=torch.int64)
    ids = torch.randint(2, model.cfg.vocab_size, (1, n), generator=g)
    t0 = time.perf_counter()
    for s in range(0, n, chunk):
        logits = model(ids[:, s:s + chunk], cache, slot, end - n + s, last_only=True)
    t_pre = time.perf_counter() - t0
    tok, times = logits[:, -1].argmax(-1), []
    for k in range(steps):
        t = time.perf_counter()
        logits = model.decode(tok.view(1, 1), torch.tensor([end + k]), cache, slot, max_len=end + k + 1)
        times.append(time.perf_counter() - t)
        tok = logits[:, -1].argmax(-1)
    print(f"  context {context:>8}: prefill {end - n}..{end}: {n / t_pre:8.1f} tok/s; decode at {end}: "
          f"{statistics.median(times) * 1e3:8.2f} ms/step", flush=True)


if __name__ == "__main__":
    main()
