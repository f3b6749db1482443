"""The serving schedule: which sequences run in an engine step, under a token budget, with cache pages on demand.

One `Scheduler.schedule()` per engine step (docs/design.md, "Engine"):
1. every running sequence whose prompt is in the cache decodes (1 + speculative tokens each), oldest first;
2. running sequences with prompt tokens left get prefill chunks (at most `prefill_chunk` tokens each), oldest
   first, while the step's token budget (`max_num_batched_tokens`, vLLM's name) lasts;
3. waiting requests are admitted in arrival order (FIFO: one that does not fit stops the queue) into free slots
   while the budget lasts and free pages cover their prompt; each gets its first chunk.
A sequence holds only the pages of the tokens it has written plus those the step writes next. When a running
sequence needs a page and none is free, the most recently arrived running sequence is preempted (vLLM's
recompute preemption): its slot and pages are freed and it goes back to the front of the queue, to prefill its
prompt and the tokens it already generated again (they are never emitted twice). The oldest sequence is never
preempted for a newer one, and any one request fits the cache alone (refused at `Engine.add_request` otherwise),
so the oldest always progresses: no deadlock.
With prefix caching (`prefix`, prefix_cache.PrefixCache) an admitted request first takes the cached pages of the
longest cached prefix of its context (read-only, shared) and starts its prefill after them; prefill chunks end at
page boundaries, so the cache holds a whole number of pages after a chunk and the engine can record each page's
boundary state. Cached pages no sequence holds count as free: they are evicted (least recently used) before any
running sequence is preempted.
"""
from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from .cache import KVCache
from .prefix_cache import PrefixCache
from .sampling import SamplingParams

__all__ = ["Request", "Chunk", "Plan", "Scheduler"]

_ids = itertools.count()


@dataclass(eq=False)  # identity: a request is itself, whatever its fields (and `in` stays O(1) per item)
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
    prefilled: int = 0           # tokens of `context` already in the cache
    finish_reason: str | None = None  # "stop", "length" or "abort"
    first_token_time: float | None = None
    spec: object | None = None  # speculative.SpecState when MTP drafting is on
    arrival_time: float = field(default_factory=time.perf_counter)
    context: list[int] = field(default_factory=list)  # what the prefill writes: the prompt (+ output[:-1] after a
    preemptions: int = 0                              # preemption: the last output token is the pending one)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at its (first) admission

    def __post_init__(self) -> None:
        self.context = self.context or list(self.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def prefill_done(self) -> bool:
        """Everything before the pending token is in the cache: the sequence decodes."""
        return self.prefilled >= len(self.context)


@dataclass
class Chunk:
    """A prefill chunk of one sequence in this step: context tokens [start, start + len(tokens))."""

    req: Request
    start: int
    tokens: list[int]
    admitted: bool = False  # the request got its slot this step (start > 0 after a prefix-cache hit)

    @property
    def last(self) -> bool:
        """This chunk completes the sequence's prefill."""
        return self.start + len(self.tokens) == len(self.req.context)


@dataclass
class Plan:
    """What one engine step runs."""

    decode: list[Request] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    tokens_per_decode: int = 1

    @property
    def prefill_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.prefill)

    @property
    def tokens(self) -> int:
        """Tokens this step puts through the model (decode rows count 1 + speculative tokens)."""
        return len(self.decode) * self.tokens_per_decode + self.prefill_tokens


class Scheduler:
    """Token-budget scheduling over the cache's slots and pages; owns the waiting queue and the running list."""

    def __init__(self, cache: KVCache, max_slots: int, prefill_chunk: int, max_num_batched_tokens: int,
                 spec_tokens: int = 0, max_prefill_seqs: int | None = None, reserve_full: bool = False,
                 prefix: PrefixCache | None = None) -> None:
        """`max_prefill_seqs`: most sequences that get a prefill chunk per step (None: as many as the budget
        allows); `reserve_full`: give a request pages for prompt + max_tokens when it is admitted (no growth,
        no preemption: the single-user schedule, kept for comparison); `prefix`: the prefix cache (None: off)."""
        for name, v in (("prefill_chunk", prefill_chunk), ("max_num_batched_tokens", max_num_batched_tokens)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, found {v}")
        if max_prefill_seqs is not None and max_prefill_seqs < 1:
            raise ValueError(f"max_prefill_seqs must be >= 1 or None, found {max_prefill_seqs}")
        self.cache = cache
        self.prefill_chunk = prefill_chunk
        self.budget = max_num_batched_tokens
        self.spec_tokens = spec_tokens
        self.max_prefill_seqs = max_prefill_seqs
        self.reserve_full = reserve_full
        self.prefix = prefix
        self.max_slots = max_slots
        self.free_slots: deque[int] = deque(range(max_slots))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # by arrival (request id): the last one is preempted first
        self.preemptions = 0

    # -- one step ---------------------------------------------------------------------------------------------
    def schedule(self) -> Plan:
        """Choose this step's decode rows and prefill chunks, growing (and if need be preempting) page lists."""
        plan = Plan(tokens_per_decode=1 + self.spec_tokens)
        for req in list(self.running):
            if req in self.running and req.prefill_done and self._grow(req, req.length + self.spec_tokens, plan):
                plan.decode.append(req)
        for req in list(self.running):
            if req not in self.running or req.prefill_done:
                continue
            n = self._chunk_len(req, plan)
            if n and self._grow(req, req.prefilled + n, plan):
                plan.prefill.append(Chunk(req, req.prefilled, req.context[req.prefilled:req.prefilled + n]))
        while self.waiting and self.free_slots and not plan.preempted:
            req = self.waiting[0]
            hit = self._cached_prefix(req)
            start = len(hit) * self.cache.block_size
            n = self._chunk_len(req, plan, start)
            taken = sum(p in self.cache.retained for p in hit)  # cached pages no one holds count as free ones
            if not n or self._admission_pages(req) - len(hit) + taken > self.cache.free_pages:
                break  # first come, first served: later requests wait behind this one
            self.waiting.popleft()
            req.slot = self.free_slots.popleft()
            bisect.insort(self.running, req, key=lambda r: r.id)
            if self.prefix is not None:
                req.prefilled = self.prefix.attach(req.slot, hit)
                self.prefix.count(len(req.context), start)
                if not req.preemptions:
                    req.cached_tokens = start
            self.cache.allocate(req.slot, self._full(req) if self.reserve_full else start + n)
            plan.prefill.append(Chunk(req, start, req.context[start:start + n], admitted=True))
        return plan

    def _cached_prefix(self, req: Request) -> list[int]:
        """Cached pages a waiting request can start from (none for prompt logprobs: every prompt position's
        logits are computed)."""
        if self.prefix is None or req.params.prompt_logprobs is not None:
            return []
        return self.prefix.lookup(req.context)

    def _chunk_len(self, req: Request, plan: Plan, start: int | None = None) -> int:
        """Tokens of req's next prefill chunk (from `start`, default req.prefilled) that fit this step (0: none);
        with prefix caching it ends at the next page boundary."""
        if self.max_prefill_seqs is not None and len(plan.prefill) >= self.max_prefill_seqs:
            return 0
        start = req.prefilled if start is None else start
        n = min(self.prefill_chunk, len(req.context) - start, self.budget - plan.tokens)
        if self.prefix is not None:
            n = min(n, self.cache.block_size - start % self.cache.block_size)
        return max(0, n)

    def _full(self, req: Request) -> int:
        return min(len(req.prompt) + req.params.max_tokens + self.spec_tokens, self.cache.max_seq_len)

    def _admission_pages(self, req: Request) -> int:
        """Free pages a waiting request needs before it is admitted: its whole context and the first decode
        token (or everything it may ever write, with reserve_full)."""
        return self.cache.pages_for(self._full(req) if self.reserve_full else len(req.context) + 1)

    def _grow(self, req: Request, tokens: int, plan: Plan) -> bool:
        """Pages for req's first `tokens` tokens, preempting the newest running sequences while pages are short.
        False when req itself had to be preempted."""
        tokens = min(tokens, self.cache.max_seq_len)
        need = self.cache.pages_for(tokens) - self.cache.owned_tokens(req.slot) // self.cache.block_size
        while need > self.cache.free_pages:
            victim = self.running[-1]
            self.preempt(victim, plan)
            if victim is req:
                return False
        self.cache.allocate(req.slot, tokens)
        return True

    def preempt(self, req: Request, plan: Plan | None = None) -> None:
        """Free a running sequence's slot and pages and queue it first, to recompute what it had."""
        self.release(req)
        if plan is not None:
            plan.preempted.append(req)
            if req in plan.decode:
                plan.decode.remove(req)
            plan.prefill = [c for c in plan.prefill if c.req is not req]
        req.context = req.prompt + req.output[:-1]  # the last output token is pending: decode feeds it
        req.prefilled = 0
        req.preemptions += 1
        if req.spec is not None:
            req.spec.drafts, req.spec.q = [], []
        self.preemptions += 1
        # Victims go newest first, so each goes in ahead of the later ones: arrival order is kept.
        self.waiting.appendleft(req)

    # -- leaving ----------------------------------------------------------------------------------------------
    def release(self, req: Request) -> None:
        """Take a sequence out of the running list and free its slot and pages."""
        if req in self.running:
            self.running.remove(req)
        if req.slot is not None:
            self.cache.free(req.slot)
            self.free_slots.append(req.slot)
            req.slot = None

    def remove(self, req: Request) -> None:
        """Forget a request wherever it is (abort)."""
        if req in self.waiting:
            self.waiting.remove(req)
        self.release(req)
