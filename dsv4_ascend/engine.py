"""The decoding engine: continuous batching over static cache slots, token-budget steps, batched decode.

Seams: `scheduler.Scheduler` decides what runs each step (decode rows for every running sequence, prefill
chunks of as many sequences as the token budget allows, pages on demand with preemption); `Engine.step` runs it:
one ragged prefill forward for all the step's chunks (each row at its own start), then one decode forward (or
one batched MTP verify) for every decoding row. `KVCache` holds the state; `sampling.sample` picks tokens on the
device. `step()` with nothing to do runs no forward and returns no events.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
from torch import Tensor

from .backend import _ATTN_ELEMENTS
from .cache import KVCache
from .decode_step import Decoder, EagerDecoder, StepResult, all_greedy, next_tokens
from .logits_process import LogitRules
from .model import _INDEXER_SCORES, Transformer
from .prefix_cache import RECORD_SHARE, PrefixCache, default_records
from .sampling import SamplingBatch, SamplingParams
from .scheduler import Chunk, Plan, Request, Scheduler

__all__ = ["Request", "Engine", "CapacityError", "plan_capacity", "prefill_working_set"]


class CapacityError(ValueError):
    """A request cannot fit the cache or the context length."""


def plan_capacity(model: Transformer, budget_bytes: int, max_slots: int, max_seq_len: int,
                  kv_fp8: bool = False, block_size: int | None = None) -> int:
    """Number of cache pages that fit in `budget_bytes` next to the per-slot state (window rings, compressor
    rows). Raises CapacityError when not even one full-length sequence fits."""
    def size(pages: int) -> int:
        return KVCache(model.cfg, max_slots, max_seq_len, model.dtype, "meta", len(model.mtp), num_blocks=pages,
                       kv_fp8=kv_fp8, preassign=False, block_size=block_size).nbytes()

    fixed, per_page = size(1), size(2) - size(1)
    pages = 1 + (budget_bytes - fixed) // max(per_page, 1)
    probe = KVCache(model.cfg, 1, max_seq_len, model.dtype, "meta", len(model.mtp), num_blocks=2, preassign=False,
                    block_size=block_size)
    if pages - 1 < probe.pages_per_seq:
        raise CapacityError(f"a KV-cache budget of {budget_bytes / 2**20:.1f} MiB holds {max(pages - 1, 0)} pages of "
                            f"{probe.block_size} tokens; one sequence of max_seq_len {max_seq_len} needs "
                            f"{probe.pages_per_seq} (plus {fixed / 2**20:.1f} MiB of per-slot state)")
    return int(pages)


def prefill_working_set(model: Transformer, chunk: int, context: int) -> dict[str, int]:
    """Estimated peak bytes, beyond the KV cache, of prefilling one `chunk` at `context` tokens with the reference
    backend's per-block budgets and glibc's mmap threshold at 4 MiB, by part (docs/design.md, "Long context")."""
    cfg, e = model.cfg, torch.empty(0, dtype=model.dtype).element_size()
    # Per token of the chunk: the CSA picks (int64, index_topk each) and ~two live copies of the widest vectors.
    width = (cfg.hc_mult * cfg.hidden_size + cfg.num_attention_heads * cfg.head_dim
             + cfg.index_n_heads * cfg.index_head_dim + cfg.q_lora_rank)
    per_chunk = chunk * (8 * cfg.index_topk * (4 in cfg.layer_ratios) + 2 * e * width)
    # The compressed keys one layer reads whole: CSA's indexer keys, HCA's entries (grows with the context).
    keys = max([context // m * (cfg.index_head_dim if m == 4 else cfg.head_dim) * e for m in cfg.layer_ratios if m]
               or [0])
    # The indexer's block: [blk, heads, N] fp32 scores, head-weighted [blk, N] fp32 and their int64 top-k keys.
    indexer = (_INDEXER_SCORES * 4 * (cfg.index_n_heads + 3) // cfg.index_n_heads) if 4 in cfg.layer_ratios else 0
    return {"per-chunk activations": per_chunk,
            "allocator-retained heap": per_chunk,  # glibc keeps the small blocks' high-water mark resident
            "largest block": max(_ATTN_ELEMENTS * 4, indexer + keys),  # attention: keys + logits + probs <= budget
            "request token list": 8 * context}


class Engine:
    """Runs many requests of different lengths together; requests join and leave between steps.

    API for the server and other drivers: `add_request` / `abort` / `step() -> [(request, token)]` / `has_work`
    / `run` / `generate`; `stats` (counters, see `_count`) and `spec_stats()`.
    """

    def __init__(self, model: Transformer, max_slots: int = 8, max_seq_len: int = 4096, prefill_chunk: int = 512,
                 eos_token_id: int | None = None, cache_bytes: int | None = None, kv_fp8: bool = False,
                 graph: bool = False, graph_buckets: list[int] | None = None,
                 graph_compiler: str | None = None, speculative_tokens: int = 0,
                 graph_tuning: str = "default", max_num_batched_tokens: int | None = None,
                 max_prefill_seqs: int | None = None, reserve_full: bool = False,
                 block_size: int | None = None, compile_prefill: bool = False, prefix_cache: bool = False,
                 prefix_records: int | None = None) -> None:
        """`cache_bytes`: KV-cache memory budget (default: enough pages for every slot at max_seq_len).
        `graph`: run decode as captured graphs, one per batch bucket (compiled at start); `graph_compiler`
        overrides the torch.compile backend (e.g. "aot_eager" to trace without code generation).
        `speculative_tokens`: MTP drafts verified per step (0 = off). `graph_tuning`: "max" freezes the weights
        into the compiled graph and autotunes its GEMMs (CPU: faster decode, longer compile).
        `max_num_batched_tokens`: tokens per step, decode rows first, prefill chunks in what remains (default
        max(2048, prefill_chunk)); `max_prefill_seqs`, `reserve_full`: see `Scheduler` (the single-user
        schedule is prefill_chunk budget, 1 prefill sequence, full reservation); `block_size`: cache page size.
        `compile_prefill`: prefill chunks run with the backend's per-token ops compiled (graph_mode.GraphPrefiller;
        compiles on the first chunks, `graph_compiler` applies to it too). `prefix_cache`: automatic prefix
        caching (prefix_cache.py; prefill chunks then end at page boundaries); its boundary records take
        `RECORD_SHARE` of `cache_bytes` (or that share of the cache memory next to the default pages), or
        `prefix_records` records if given."""
        self.model = model
        self.device = model.embed.weight.device
        # Graph mode reserves one extra slot for the rows that pad a batch up to its bucket.
        n_slots = max_slots + 1 if graph else max_slots
        page_bytes = int(cache_bytes * (1 - RECORD_SHARE)) if cache_bytes and prefix_cache else cache_bytes
        pages = plan_capacity(model, page_bytes, n_slots, max_seq_len, kv_fp8, block_size) if cache_bytes else None
        self.cache = model.new_cache(n_slots, max_seq_len, num_blocks=pages, kv_fp8=kv_fp8, preassign=False,
                                     block_size=block_size)
        # The longest sequence a request may reach: the cache rounds its length up to whole pages, which must not
        # let a request past the max_seq_len asked for (and so past max_position_embeddings).
        self.max_seq_len = max_seq_len
        # The decode step, eager or one compiled graph per batch bucket: one call, one result type.
        self.decoder: Decoder = EagerDecoder(model, self.cache)
        verifier = None
        if graph:
            from dsv4_ascend.graph_mode import GraphDecoder, GraphVerifier, default_buckets

            buckets = graph_buckets or default_buckets(max_slots)
            self.decoder = GraphDecoder(model, self.cache, max_slots, buckets, graph_compiler, tuning=graph_tuning)
            # Decode rows run as MTP verify rounds: the verify is the captured step. Not over ranks (expert
            # parallel): a verify's rows x (n+1) tokens exceed the static EP capacity (max_slots rows per call),
            # and the exact EP path reads counts on the host, so there it stays eager as the ranks pair it.
            if speculative_tokens and getattr(model, "expert_parallel", None) is None:
                verifier = GraphVerifier(model, self.cache, max_slots, buckets, speculative_tokens, graph_compiler,
                                         tuning=graph_tuning)
                verifier.warmup()
            else:
                self.decoder.warmup()
        self.spec = None
        if speculative_tokens:
            from .speculative import Speculator

            self.spec = Speculator(model, self.cache, speculative_tokens, verifier)
        self.prefill_chunk = prefill_chunk
        # The ids that end a sequence: the config's (every id of an eos_token_id list), or the one given here.
        self.eos_ids = frozenset(model.cfg.eos_ids if eos_token_id is None else (eos_token_id,))
        # [logit rules hook] per-slot penalty / bias state on the device and grammar matchers (logits_process)
        self.rules = LogitRules(self.cache.max_slots, model.cfg.vocab_size, sorted(self.eos_ids), self.device)
        self.prefiller = None  # compiled per-token ops for prefill chunks (graph_mode.GraphPrefiller)
        if compile_prefill:
            from dsv4_ascend.graph_mode import GraphPrefiller

            self.prefiller = GraphPrefiller(model, graph_compiler)
        budget = max(2048, prefill_chunk) if max_num_batched_tokens is None else max_num_batched_tokens
        self.prefix = None
        if prefix_cache:
            records = prefix_records or default_records(self.cache, cache_bytes and cache_bytes - page_bytes)
            self.prefix = PrefixCache(self.cache, records, check_next=self.spec is not None)
        self.scheduler = Scheduler(self.cache, max_slots, prefill_chunk, budget, speculative_tokens,
                                   max_prefill_seqs, reserve_full, self.prefix)
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "decode_steps": 0, "requests": 0, "steps": 0,
                      "batched_tokens": 0, "prefill_rows": 0, "decode_rows": 0, "preemptions": 0}
        self.last_step: dict[str, int] = {}

    @property
    def waiting(self):
        """Requests queued for a slot, in arrival order (preempted ones first)."""
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        """Requests holding a cache slot, by arrival."""
        return self.scheduler.running

    @property
    def free_slots(self):
        return self.scheduler.free_slots

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
        extra = self.spec.n if self.spec else 0  # a verify writes (deferred) up to n positions past the last token
        need = len(prompt) + params.max_tokens
        if need + extra > self.max_seq_len:
            more = f" + {extra} speculative" if extra else ""
            raise CapacityError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}){more} = "
                                f"{need + extra} exceeds the engine's max_seq_len {self.max_seq_len}")
        if self.cache.pages_for(need + extra) > self.cache.num_blocks - 1:
            raise CapacityError(f"prompt + max_tokens = {need} tokens needs {self.cache.pages_for(need + extra)} "
                                f"cache pages; the cache has {self.cache.num_blocks - 1}")
        req = Request(list(prompt), params)
        self.scheduler.waiting.append(req)
        self.stats["requests"] += 1
        return req

    def abort(self, req: Request) -> None:
        """Stop a request now and free its slot (e.g. the client went away)."""
        if not req.finished:
            req.finish_reason = "abort"
        self.scheduler.remove(req)

    def spec_stats(self) -> dict[str, float]:
        """Speculative decoding: draft acceptance rate and main-model forwards per generated token."""
        if self.spec is None:
            return {}
        st = self.spec.stats
        return {"acceptance_rate": st["accepted"] / max(st["proposed"], 1),
                "main_steps_per_token": self.stats["decode_steps"] / max(self.stats["decode_tokens"], 1),
                **st}

    def prefix_stats(self) -> dict[str, float]:
        """Prefix caching: prompt tokens looked up at admissions and served from the cache, the hit rate, pages
        cached now, registered and evicted so far ({} when off)."""
        if self.prefix is None:
            return {}
        st = self.prefix.stats
        return {**st, "hit_rate": st["hit_tokens"] / max(st["query_tokens"], 1),
                "cached_pages": self.prefix.cached_pages, "records": self.prefix.records}

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # -- one scheduling iteration -----------------------------------------------------------------------------
    def step(self) -> list[tuple[Request, int]]:
        """Schedule, run the step's prefill chunks (one forward), then its decode rows (one forward). Returns
        (request, token) events in order; no work: no forward, no events."""
        plan = self.scheduler.schedule()
        for c in plan.prefill:
            if c.admitted:  # just admitted (or re-admitted after a preemption): the slot's rules state
                self.rules.admit(c.req)  # [logit rules hook]
        events: list[tuple[Request, int]] = []
        decode_tokens = self.stats["decode_tokens"]
        if plan.prefill:
            events += self._prefill(plan.prefill)
        if plan.decode:
            events += self._decode(plan.decode)
        self._count(plan, self.stats["decode_tokens"] - decode_tokens)
        return events

    def _count(self, plan: Plan, decoded: int) -> None:
        """Per-step counters: tokens through the model, prefill vs decode, preemptions (and `last_step`)."""
        st = self.stats
        if plan.tokens:
            st["steps"] += 1
        st["batched_tokens"] += plan.tokens
        st["prefill_tokens"] += plan.prefill_tokens
        st["prefill_rows"] += len(plan.prefill)
        st["decode_rows"] += len(plan.decode)
        st["preemptions"] += len(plan.preempted)
        self.last_step = {"tokens": plan.tokens, "prefill_tokens": plan.prefill_tokens,
                          "prefill_rows": len(plan.prefill), "decode_rows": len(plan.decode),
                          "decode_tokens": decoded, "preemptions": len(plan.preempted)}

    def _prefill(self, chunks: list[Chunk]) -> list[tuple[Request, int]]:
        """All chunks of the step in one forward (a ragged batch: each row at its own start, right-padded).

        The streams of every chunk token are computed; logits only where a token is chosen (a prompt's last
        chunk). A feature that wants every prompt token's logits takes `model.logits(streams[b, :len])` here.
        """
        dev = self.device
        lens = [len(c.tokens) for c in chunks]
        width = max(lens)
        ids = torch.tensor([c.tokens + [0] * (width - len(c.tokens)) for c in chunks], device=dev)
        slots = torch.tensor([c.req.slot for c in chunks], device=dev)
        starts = [c.start for c in chunks]
        run = self.model.prefill_streams if self.prefiller is None else self.prefiller.prefill_streams
        if len(chunks) == 1:  # one rectangular chunk: the plain path (fused attention where the backend has it)
            streams, _ = run(ids, self.cache, slots, starts[0])
        else:
            streams, _ = run(ids, self.cache, slots, starts, lengths=lens)
        for i, c in enumerate(chunks):
            if c.req.params.prompt_logprobs is not None:
                self._prompt_logprobs(c.req, self.model.logits(streams[i, :lens[i]]), c.start)
            c.req.prefilled += len(c.tokens)
        if self.prefix is not None and self.spec is None:
            self._register([(c.req, c.req.context, c.start + len(c.tokens)) for c in chunks])
        emit = [i for i, c in enumerate(chunks) if c.last and not c.req.output]  # resumed ones have their token
        events = []
        if emit:
            rows = torch.tensor(emit, device=dev)
            last = torch.tensor([lens[i] - 1 for i in emit], device=dev)
            events = self._emit([chunks[i].req for i in emit], self.model.logits(streams[rows, last]))
        if self.spec is not None:
            self._absorb_chunks(chunks, streams, slots)
            if self.prefix is not None:  # the MTP rows of a boundary need the token after it: not a last chunk's
                self._register([(c.req, c.req.context, c.start + len(c.tokens)) for c in chunks
                                if not c.last and not c.req.finished])
        return events

    def _register(self, ends: list[tuple[Request, list[int], int]]) -> None:
        """Prefix caching: cache the page each sequence's cache just completed ((request, its tokens, tokens now
        in its cache)), with the per-slot state at that boundary."""
        bs = self.cache.block_size
        for req, tokens, n in ends:
            if n % bs == 0 and req.slot is not None:
                self.prefix.register(req.slot, tokens, n, tokens[n] if n < len(tokens) else None)

    @staticmethod
    def _prompt_logprobs(req: Request, logits: Tensor, start: int) -> None:
        """Record the logprobs of the prompt tokens that a prefill chunk's logits [S,V] predict (positions
        start+1 .. start+S), when the request asks (params.prompt_logprobs); the first token gets None. A chunk
        recomputed after a preemption records nothing twice."""
        n = req.params.prompt_logprobs
        if start == 0 and not req.prompt_logprobs:
            req.prompt_logprobs.append(None)
        lo = max(start + 1, len(req.prompt_logprobs))  # next prompt position not yet recorded
        hi = min(start + logits.shape[0], len(req.prompt) - 1)  # the last chunk predicts one token past the prompt
        if hi < lo:
            return
        lps = torch.log_softmax(logits[lo - start - 1:hi - start].float(), -1)
        targets = torch.tensor(req.prompt[lo:hi + 1], device=lps.device).unsqueeze(1)
        tok_lp = lps.gather(-1, targets)
        ranks = ((lps > tok_lp).sum(-1) + 1).tolist()  # prefill, not the decode step: host reads are fine here
        top = lps.topk(n, -1) if n else None
        for i, (lp, rank) in enumerate(zip(tok_lp[:, 0].tolist(), ranks)):
            best = dict(zip(top.indices[i].tolist(), top.values[i].tolist())) if n else {}
            req.prompt_logprobs.append((lp, rank, best))

    def _absorb_chunks(self, chunks: list[Chunk], streams: Tensor, slots: Tensor) -> None:
        """MTP: the block absorbs every chunk's main streams; sequences whose prefill completed propose drafts."""
        from .speculative import SpecState

        keep = [i for i, c in enumerate(chunks) if not c.req.finished]
        if not keep:
            return
        nxt = []
        for i in keep:
            c = chunks[i]
            seq = c.req.context + c.req.output[-1:] if c.last else c.req.context
            nxt.append(seq[c.start + 1:c.start + len(c.tokens) + 1])
        rows = torch.tensor(keep, device=self.device)
        logits, x = self.spec.absorb(slots[rows], streams[rows], nxt, [chunks[i].start for i in keep])
        done = [j for j, i in enumerate(keep) if chunks[i].last]
        if not done:
            return
        reqs = [chunks[keep[j]].req for j in done]
        for r in reqs:
            if r.spec is None:
                r.spec = SpecState(generator=torch.Generator().manual_seed(r.params.seed))
        sel = torch.tensor(done, device=self.device)
        pos = [chunks[keep[j]].start + len(chunks[keep[j]].tokens) - 1 for j in done]
        self.spec.propose(slots[rows][sel], logits[sel], x[sel], pos, [r.params for r in reqs],
                          [r.spec for r in reqs])

    def _spec_round(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        """One verify round for every decoding row in one forward: up to n+1 new tokens per row."""
        dev = self.device
        slots = torch.tensor([r.slot for r in reqs], device=dev)
        lengths = [r.length - 1 for r in reqs]  # the last output token is known but not yet in the cache
        tokens, logits, streams = self.spec.verify(slots, [r.output[-1] for r in reqs], lengths,
                                                   [r.params for r in reqs], [r.spec for r in reqs])
        self.stats["decode_steps"] += 1
        picked = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in tokens], batch_first=True).to(dev)
        lps = torch.log_softmax(logits[:, :picked.shape[1]].float(), -1).gather(-1, picked.unsqueeze(-1))[..., 0]
        events = []
        for i in range(picked.shape[1]):
            rows = [b for b, r in enumerate(reqs) if i < len(tokens[b]) and not r.finished]
            if not rows:
                break
            at = torch.tensor(rows, device=dev)
            events += self._record([reqs[b] for b in rows], StepResult(picked[at, i], lps[at, i], logits[at, i]))
            self.stats["decode_tokens"] += len(rows)
        live = [b for b, r in enumerate(reqs) if not r.finished]
        if live:
            at = torch.tensor(live, device=dev)
            mtp_logits, x = self.spec.absorb(slots[at], streams[at], [tokens[b] for b in live],
                                             [lengths[b] for b in live])
            self.spec.propose(slots[at], mtp_logits, x, [lengths[b] + len(tokens[b]) - 1 for b in live],
                              [reqs[b].params for b in live], [reqs[b].spec for b in live])
        return events

    def _decode(self, reqs: list[Request]) -> list[tuple[Request, int]]:
        if self.spec is not None:
            return self._spec_round(reqs)
        dev = self.device
        ids = torch.tensor([[r.output[-1]] for r in reqs], device=dev)
        pos = torch.tensor([r.length - 1 for r in reqs], device=dev)
        slots = torch.tensor([r.slot for r in reqs], device=dev)
        params = [r.params for r in reqs]
        lengths = [r.length for r in reqs]
        result = self.decoder.step(ids, pos, slots, params, max_len=max(lengths),
                                   adjust=self.rules.batch(reqs), lengths=lengths)  # [logit rules hook]
        if self.prefix is not None:  # before _record releases finished sequences
            bs = self.cache.block_size
            self._register([(r, r.prompt + r.output, r.length) for r in reqs if r.length % bs == 0])
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
            if (tok in self.eos_ids and not r.params.ignore_eos) or tok in r.params.stop_token_ids:
                r.finish_reason = "stop"
            elif len(r.output) >= r.params.max_tokens:
                r.finish_reason = "length"
            events.append((r, tok))
            if r.finished:
                self.scheduler.release(r)
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
