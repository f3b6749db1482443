#!/usr/bin/env python3
"""Cost of logit adjustments: decode tokens/s of a batch with penalties + a json_schema constraint vs plain sampling.

The model is the `tiny` preset (random weights) with the real DeepSeek-V4 vocabulary (129 280 ids) and tokenizer,
so the per-step adjustment work ([batch, 129 280] penalties, the llguidance mask over the real token table) is
full size while the model itself is small: the relative slowdown printed is an upper bound for a real model, and
the milliseconds per step are the absolute cost. Plain, penalties-only and penalties + json_schema runs alternate
(same engine, same prompts); only decode steps are timed (after every request's first token).

Read the constrained run with care at a temperature above 0: the sampler sorts each row's whole vocabulary
(`sampling.sample`, for top-k / top-p), and a CPU sort's time depends on the values: a row whose grammar mask set
all but a few logits to -inf sorts several times faster than 129,280 distinct logits. That made "adjusted" once
measure faster than plain; the penalties-only run has plain's sort and isolates the penalties' cost, and
`--temperature 0` (argmax, no sort) isolates the constraint's.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

SCHEMA = {"type": "array", "minItems": 64, "items": {
    "type": "object", "required": ["id", "name"], "additionalProperties": False,
    "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 8}}}}


def _decode_rate(eng, reqs) -> tuple[float, float]:
    """Run `reqs` (already added) to the end; (decode tokens/s, ms per decode step) over the decode-only steps."""
    while any(not r.output for r in reqs):
        eng.step()
    tokens0, steps0 = eng.stats["decode_tokens"], eng.stats["decode_steps"]
    t0 = time.perf_counter()
    while eng.has_work:
        eng.step()
    dt = time.perf_counter() - t0
    tokens, steps = eng.stats["decode_tokens"] - tokens0, eng.stats["decode_steps"] - steps0
    return tokens / dt, 1000 * dt / max(steps, 1)


def _best_ms(fn, reps: int = 7) -> float:
    """The fastest of `reps` calls, in ms (the least disturbed by other load)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def components(batch: int, vocab: int, temperature: float) -> None:
    """Per-step costs on [batch, vocab] fp32 logits, apart from the model: the adjustments themselves, and the
    sampler on plain logits vs logits a grammar mask left 128 finite values in (the sort's data dependence)."""
    from dsv4_ascend.logits_process import AdjustBatch, adjust_logits
    from dsv4_ascend.sampling import SamplingBatch, sample

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=g) * 2
    sb = SamplingBatch(torch.full((batch,), temperature), torch.zeros(batch, dtype=torch.long), torch.ones(batch),
                       torch.arange(batch))
    step = torch.full((batch,), 5)
    pen = AdjustBatch.neutral(batch, vocab)
    pen.counts[:, :20], pen.prompt[:, 20:60] = 1, True
    pen.presence += 0.2
    pen.frequency += 0.2
    pen.repetition.fill_(1.1)
    pen.active.fill_(True)
    masked = pen.padded(batch)
    masked.mask.zero_()
    masked.mask[:, :4] = -1  # 128 allowed tokens
    out = adjust_logits(logits, masked, sb.temperature)
    print(f"components, [{batch}, {vocab}], {torch.get_num_threads()} threads (best of 7 calls):")
    print(f"  adjust_logits, penalties:        {_best_ms(lambda: adjust_logits(logits, pen, sb.temperature)):7.1f} ms")
    print(f"  adjust_logits, penalties + mask: {_best_ms(lambda: adjust_logits(logits, masked, sb.temperature)):7.1f} ms")
    print(f"  sample, plain logits:            {_best_ms(lambda: sample(logits, sb, step)):7.1f} ms")
    print(f"  sample, masked logits:           {_best_ms(lambda: sample(out, sb, step)):7.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=2, help="plain / adjusted pairs, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy rows (argmax, no vocabulary sort)")
    ap.add_argument("--components-only", action="store_true", help="only the per-step costs apart from the model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dsv4_ascend.chat import encode_message_segments
    from dsv4_ascend.config import preset
    from dsv4_ascend.constraints import GuidedSpec
    from dsv4_ascend.engine import Engine
    from dsv4_ascend.model import Transformer
    from dsv4_ascend.reference import ReferenceBackend
    from dsv4_ascend.sampling import SamplingParams
    from dsv4_ascend.tiny import random_weights
    from dsv4_ascend.tokenizer import Tokenizer, default_tokenizer_path
    from dsv4_ascend.weights import assign_tensors

    tok = Tokenizer.from_file(default_tokenizer_path())
    components(args.batch, tok.vocab_size, args.temperature or 0.8)
    if args.components_only:
        return
    cfg = dataclasses.replace(preset("tiny"), vocab_size=tok.vocab_size)
    model = Transformer(cfg, ReferenceBackend(), torch.float32)
    assign_tensors(model, random_weights(cfg, 0).items())
    eng = Engine(model, max_slots=args.batch, max_seq_len=256)
    prompts = [tok.encode_segments(encode_message_segments([{"role": "user", "content": f"List {i + 3} users."}]))
               for i in range(args.batch)]
    spec = GuidedSpec("json_schema", schema=SCHEMA, tokenizer=tok)

    penalties = {"repetition_penalty": 1.1, "frequency_penalty": 0.2, "presence_penalty": 0.2}
    kinds = {"plain": {}, "penalties": penalties, "penalties+json": {**penalties, "guided": spec}}

    def run(kind: str) -> tuple[float, float]:
        extra = kinds[kind]
        reqs = [eng.add_request(p, SamplingParams(temperature=args.temperature, seed=i, max_tokens=args.new_tokens,
                                                  ignore_eos="guided" not in extra, **extra))
                for i, p in enumerate(prompts)]
        rate = _decode_rate(eng, reqs)
        assert all(len(r.output) == args.new_tokens for r in reqs), "a request ended early: the batch shrank"
        return rate

    for kind in kinds:  # warm-up (the first builds the llguidance token table: ~1 s, once per tokenizer)
        run(kind)
    got: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            got[kind].append(run(kind))
    print(f"tiny preset, vocab {cfg.vocab_size}, batch {args.batch}, {args.new_tokens} tokens/request, "
          f"temperature {args.temperature:g}, {args.threads} threads, {args.rounds} interleaved rounds (best of the rounds: "
          "the least disturbed by other load)")
    ms = {}
    for kind, runs in got.items():
        rate, ms[kind] = max(r for r, _ in runs), min(m for _, m in runs)
        print(f"{kind + ':':16s}{rate:8.1f} decode tok/s  {ms[kind]:7.2f} ms/step   rounds: "
              + ", ".join(f"{r:.1f}" for r, _ in runs))
    for kind in ("penalties", "penalties+json"):
        print(f"cost of {kind}: {ms[kind] - ms['plain']:+.2f} ms/step "
              f"({100 * (ms[kind] / ms['plain'] - 1):+.0f}% time per token)")


if __name__ == "__main__":
    main()
