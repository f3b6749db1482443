"""The decoding engine: continuous batching over static cache slots, chunked prefill, batched decode.

Seams: `Engine.step` decides what runs each step (admit waiting requests into free slots, one prefill chunk,
then one decode step for every running request); `KVCache` holds the state; the model runs prefill chunks
(host-known start) and sync-free decode steps; `sampling.sample` picks tokens on the device.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from .cache import KVCache
from .decode_step import Decoder, EagerDecoder, StepResult, all_greedy, next_tokens
from .logits_process import LogitRules
from .model import Transformer
from .sampling import SamplingBatch, SamplingParams

__all__ = ["Request", "Engine", "CapacityError", "plan_capacity"]


class CapacityError(ValueError):
    """A request cannot fit the cache or the context length."""


def plan_capacity(model: Transformer, budget_bytes: int, max_slots: int, max_seq_len: int,
                  kv_fp8: bool = False) -> int:
    """Number of cache pages that fit in `budget_bytes` next to the per-slot state (window rings, compressor
    rows). Raises CapacityError when not even one full-length sequence fits."""
    def size(pages: int) -> int:
        return KVCache(model.cfg, max_slots, max_seq_len, model.dtype, "meta", len(model.mtp), num_blocks=pages,
                       kv_fp8=kv_fp8, preassign=False).nbytes()

    fixed, per_page = size(1), size(2) - size(1)
    pages = 1 + (budget_bytes - fixed) // max(per_page, 1)
    probe = KVCache(model.cfg, 1, max_seq_len, model.dtype, "meta", len(model.mtp), num_blocks=2, preassign=False)
    if pages - 1 < probe.pages_per_seq:
        raise CapacityError(f"a KV-cache budget of {budget_bytes / 2**20:.1f} MiB holds {max(pages - 1, 0)} pages of "
                            f"{probe.block_size} tokens; one sequence of max_seq_len {max_seq_len} needs "
                            f"{probe.pages_per_seq} (plus {fixed / 2**20:.1f} MiB of per-slot state)")
    return int(pages)


_ids = itertools.count()


@dataclass
class Request:
    """One generation request and its progress."""

    prompt: list[int]
    params: SamplingParams
    id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    # params.prompt_logprobs set: per prompt token, its logprob, rank (1 = most likely) and the top-N (None for
    # the first token, which nothing predicts); filled by the prefill
    prompt_logprobs: list[tuple[float, int, dict[int, float]] | None] = field(default_factory=list)
    slot: int | None = None
    prefilled: int = 0           # prompt tokens already in the cache
    finish_reason: str | None = None  # "stop", "length" or "abort"
    first_token_time: float | None = None
    spec: object | None = None  # speculative.SpecState when MTP drafting is on
    arrival_time: float = field(default_factory=time.perf_counter)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


class Engine:
    """Runs many requests of different lengths together; requests join and leave between steps."""

    def __init__(self, model: Transformer, max_slots: int = 8, max_seq_len: int = 4096, prefill_chunk: int = 512,
                 eos_token_id: int | None = None, cache_bytes: int | None = None, kv_fp8: bool = False,
                 graph: bool = False, graph_buckets: list[int] | None = None,
                 graph_compiler: str | None = None, speculative_tokens: int = 0,
                 graph_tuning: str = "default", compile_prefill: bool = False) -> None:
        """`cache_bytes`: KV-cache memory budget (default: enough pages for every slot at max_seq_len).
        `graph`: run decode as captured graphs, one per batch bucket (compiled at start); `graph_compiler`
        overrides the torch.compile backend (e.g. "aot_eager" to trace without code generation).
        `speculative_tokens`: MTP drafts verified per step (0 = off). `graph_tuning`: "max" freezes the weights
        into the compiled graph and autotunes its GEMMs (CPU: faster decode, longer compile). `compile_prefill`:
        prefill chunks run with the backend's per-token ops compiled (graph_mode.GraphPrefiller; compiles on the
        first chunks, `graph_compiler` applies to it too)."""
        self.model = model
        self.device = model.embed.weight.device
        # Graph mode reserves one extra slot for the rows that pad a batch up to its bucket.
        n_slots = max_slots + 1 if graph else max_slots
        pages = plan_capacity(model, cache_bytes, n_slots, max_seq_len, kv_fp8) if cache_bytes else None
        self.cache = model.new_cache(n_slots, max_seq_len, num_blocks=pages, kv_fp8=kv_fp8, preassign=False)
        # The decode step, eager or one compiled graph per batch bucket: one call, one result type.
        self.decoder: Decoder = EagerDecoder(model, self.cache)
        if graph:
            from dsv4_ascend.graph_mode import GraphDecoder, default_buckets

            self.decoder = GraphDecoder(model, self.cache, max_slots, graph_buckets or default_buckets(max_slots),
                                        graph_compiler, tuning=graph_tuning)
            self.decoder.warmup()
        self.prefiller = self.model  # one prefill chunk: prefiller(ids, cache, slots, start_pos, last_only=...)
        if compile_prefill:
            from dsv4_ascend.graph_mode import GraphPrefiller

            self.prefiller = GraphPrefiller(model, graph_compiler)
        self.spec = None
        if speculative_tokens:
            from .speculative import Speculator

            self.spec = Speculator(model, self.cache, speculative_tokens)
        self.prefill_chunk = prefill_chunk
        self.eos = model.cfg.eos_token_id if eos_token_id is None else eos_token_id
        # [logit rules hook] per-slot penalty / bias state on the device and grammar matchers (logits_process)
        self.rules = LogitRules(self.cache.max_slots, model.cfg.vocab_size, self.eos, self.device)
        self.free_slots = deque(range(max_slots))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "decode_steps": 0, "requests": 0}

    # -- admission --------------------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams | None = None) -> Request:
        """Queue a request; refuses at once (CapacityError) if it can never fit."""
        params = params or SamplingParams()
        params.check_vocab(self.model.cfg.vocab_size)  # a request the sampler cannot run fails here, alone
        self.rules.check(params, speculative=self.spec is not None)  # [logit rules hook]
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); found {bad[:5]}")
        need = len(prompt) + params.max_tokens
        if need > self.cache.max_seq_len:
            raise CapacityError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = {need} "
                                f"exceeds the cache's max_seq_len {self.cache.max_seq_len}")
        if self.cache.pages_for(need) > self.cache.num_blocks - 1:
            raise CapacityError(f"prompt + max_tokens = {need} tokens needs {self.cache.pages_for(need)} cache pages; "
                                f"the cache has {self.cache.num_blocks - 1}")
        req = Request(list(prompt), params)
        self.waiting.append(req)
        self.stats["requests"] += 1
        return req

    def abort(self, req: Request) -> None:
        """Stop a request now and free its slot (e.g. the client went away)."""
        if req in self.waiting:
            self.waiting.remove(req)
        if not req.finished:
            req.finish_reason = "abort"
        self._release(req)

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.slot is not None:
            self.cache.free(req.slot)
            self.free_slots.append(req.slot)
            req.slot = None

    def spec_stats(self) -> dict[str, float]:
        """Speculative decoding: draft acceptance rate and main-model steps per generated token."""
        if self.spec is None:
            return {}
        st = self.spec.stats
        return {"acceptance_rate": st["accepted"] / max(st["proposed"], 1),
                "main_steps_per_token": self.stats["decode_steps"] / max(self.stats["decode_tokens"], 1),
                **st}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one scheduling iteration -----------------------------------------------------------------------------
    def step(self) -> list[tuple[Request, int]]:
        """Admit, run at most one prefill chunk, then one batched decode step. Returns (request, token) events."""
        while self.waiting and self.free_slots:
            req = self.waiting[0]
            tokens = min(len(req.prompt) + req.params.max_tokens + (self.spec.n if self.spec else 0),
                         self.cache.max_seq_len)
            if self.cache.pages_for(tokens) > self.cache.free_pages:
                break  # wait for running sequences to free pages (first come, first served)
            self.waiting.popleft()
            req.slot = self.free_slots.popleft()
            self.cache.allocate(req.slot, tokens)  # pages for the whole request: no mid-run eviction
            self.rules.admit(req)  # [logit rules hook] the slot's penalty / bias state and grammar matcher
            self.running.append(req)
        events: list[tuple[Request, int]] = []
        pending = [r for r in self.running if r.prefilled < len(r.prompt)]
        if pending:
            events += self._prefill_chunk(pending[0])
        decoding = [r for r in self.running if r.prefilled == len(r.prompt) and r.output and not r.finished]
        if decoding:
            events += self._decode(decoding)
        return events

    def _prefill_chunk(self, req: Request) -> list[tuple[Request, int]]:
        start = req.prefilled
        chunk = req.prompt[start:start + self.prefill_chunk]
        ids = torch.tensor([chunk], device=self.device)
        last = start + len(chunk) == len(req.prompt)
        slot = torch.tensor([req.slot], device=self.device)
        req.prefilled += len(chunk)
        self.stats["prefill_tokens"] += len(chunk)
        if self.spec is None:
            logits = self.prefiller(ids, self.cache, slot, start, last_only=req.params.prompt_logprobs is None)
            self._prompt_logprobs(req, logits[0], start)
            return self._emit([req], logits[:, -1]) if last else []
        logits, streams, _ = self.model.prefill(ids, self.cache, slot, start)
        self._prompt_logprobs(req, logits[0], start)
        if not last:
            self.spec.absorb(req.slot, streams, req.prompt[start + 1:start + len(chunk) + 1], start)
            return []
        events = self._emit([req], logits[:, -1])
        if not req.finished:
            self._draft(req, streams, req.prompt[start + 1:] + [req.output[-1]], start)
        return events

    @staticmethod
    def _prompt_logprobs(req: Request, logits: Tensor, start: int) -> None:
        """Record the logprobs of the prompt tokens that a prefill chunk's logits [S,V] predict (positions
        start+1 .. start+S), when the request asks for them (params.prompt_logprobs); the first token gets None."""
        n = req.params.prompt_logprobs
        if n is None:
            return
        if start == 0:
            req.prompt_logprobs.append(None)
        targets = req.prompt[start + 1:start + logits.shape[0] + 1]  # the last chunk predicts one token past
        if not targets:
            return
        lps = torch.log_softmax(logits[:len(targets)].float(), -1)
        tok_lp = lps.gather(-1, torch.tensor(targets, device=lps.device).unsqueeze(1))
        ranks = ((lps > tok_lp).sum(-1) + 1).tolist()  # prefill, not the decode step: host reads are fine here
        top = lps.topk(n, -1) if n else None
        for i, (lp, rank) in enumerate(zip(tok_lp[:, 0].tolist(), ranks)):
            best = dict(zip(top.indices[i].tolist(), top.values[i].tolist())) if n else {}
            req.prompt_logprobs.append((lp, rank, best))

    def _draft(self, req: Request, streams: Tensor, next_ids: list[int], start: int) -> None:
        """Let the MTP block absorb main streams at [start, start+S) and propose the next round's drafts."""
        from .speculative import SpecState

        if req.spec is None:
            req.spec = SpecState(generator=torch.Generator().manual_seed(req.params.seed))
        logits, x = self.spec.absorb(req.slot, streams, next_ids, start)
        self.spec.propose(req.slot, logits, x, start + len(next_ids) - 1, req.params, req.spec)

    def _spec_round(self, req: Request) -> list[tuple[Request, int]]:
        """One verify round for one sequence: up to n+1 new tokens."""
        length = req.length - 1  # the last output token is known but not yet in the cache
        tokens, logits, streams = self.spec.verify(req.slot, req.output[-1], length, req.params, req.spec)
        self.stats["decode_steps"] += 1
        lps = torch.log_softmax(logits.float(), -1)
        events = []
        for i, tok in enumerate(tokens):
            events += self._record([req], StepResult(torch.tensor([tok]), lps[i, tok].view(1), logits[i:i + 1]))
            self.stats["decode_tokens"] += 1
            if req.finished:
                return events
        self._draft(req, streams, tokens, length)
        return events

    def _decode(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        if self.spec is not None:
            return [e for r in reqs for e in self._spec_round(r)]
        dev = self.device
        ids = torch.tensor([[r.output[-1]] for r in reqs], device=dev)
        pos = torch.tensor([r.length - 1 for r in reqs], device=dev)
        slots = torch.tensor([r.slot for r in reqs], device=dev)
        params = [r.params for r in reqs]
        result = self.decoder.step(ids, pos, slots, params, max_len=max(r.length for r in reqs),
                                   adjust=self.rules.batch(reqs))  # [logit rules hook]
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(reqs)
        return self._record(reqs, result)

    def _emit(self, reqs: list[Request], logits: Tensor) -> list[tuple[Request, int]]:
        """Choose and record the next token of each request from its last prefill logits [B,V]."""
        params = [r.params for r in reqs]
        sb = SamplingBatch.of(params, logits.device)
        step = torch.tensor([r.length for r in reqs], device=logits.device)
        tokens, lps = next_tokens(logits, sb, step, self.model.backend.sample, all_greedy(params),
                                  self.rules.batch(reqs))  # [logit rules hook]
        return self._record(reqs, StepResult(tokens, lps, logits))

    def _record(self, reqs: list[Request], result: StepResult) -> list[tuple[Request, int]]:
        want_top = max((r.params.logprobs or 0) for r in reqs)
        top = torch.log_softmax(result.logits.float(), -1).topk(want_top, -1) if want_top else None
        tokens_l = result.tokens.tolist()  # the one host read per step: tokens must be streamed
        lps_l = result.logprobs.tolist()
        self.rules.record(reqs, result.tokens, tokens_l)  # [logit rules hook] token counts, grammar matchers
        now = time.perf_counter()
        events = []
        for i, (r, tok) in enumerate(zip(reqs, tokens_l)):
            r.output.append(tok)
            r.logprobs.append(lps_l[i])
            if r.params.logprobs:
                n = r.params.logprobs
                r.top_logprobs.append(dict(zip(top.indices[i, :n].tolist(), top.values[i, :n].tolist())))
            if r.first_token_time is None:
                r.first_token_time = now
            if (tok == self.eos and not r.params.ignore_eos) or tok in r.params.stop_token_ids:
                r.finish_reason = "stop"
            elif len(r.output) >= r.params.max_tokens:
                r.finish_reason = "length"
            events.append((r, tok))
            if r.finished:
                self._release(r)
        return events

    # -- convenience ------------------------------------------------------------------------------------------
    def run(self) -> Iterator[tuple[Request, int]]:
        """Step until every queued request finishes, yielding (request, token) as tokens appear."""
        while self.has_work:
            yield from self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Request]:
        """Generate for several prompts together; returns the finished requests in prompt order."""
        plist = params if isinstance(params, list) else [params or SamplingParams() for _ in prompts]
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        for _ in self.run():
            pass
        return reqs
