"""The engine thread: `EngineWorker` owns the `Engine` and is the only code that touches it once started.

It admits submitted requests, applies aborts, steps while there is work and sleeps on a condition variable
otherwise. Handlers talk to it through `submit` / `abort` (thread-safe) and receive events on a per-request asyncio
queue (`loop.call_soon_threadsafe`): ("started",), ("error", exc), ("prompt", [None | (logprob, rank, top)])
(once, before the first tokens, when the request asked for prompt logprobs), ("tokens", [(id, logprob, top)]),
("finish", reason). Gauges are updated before a request's last event is sent, so /metrics read after a response
already counts it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field

from ..engine import Engine, Request
from ..sampling import SamplingParams
from .metrics import Metrics
from .body import APIError

__all__ = ["Job", "EngineWorker"]

log = logging.getLogger("dsv4.server")

@dataclass(eq=False)
class Job:
    """One submitted request as the worker and its handler see it."""

    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    req: Request | None = None       # set by the engine thread on admission
    cancelled: bool = False          # abort asked (set under the worker lock)
    done: bool = False               # a "finish" or "error" event was sent (engine thread only)
    sent: int = 0                    # tokens of req.output already delivered (engine thread only)
    first_token: float | None = None
    last_token: float | None = None

    def deliver(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class EngineWorker:
    """Runs `engine` on a background thread; the only code that calls into the engine once started."""

    def __init__(self, engine: Engine, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.max_slots = len(engine.free_slots)
        self._cond = threading.Condition()
        self._inbox: list[Job] = []
        self._aborts: list[Job] = []
        self._jobs: dict[int, Job] = {}   # request id -> job (engine thread only)
        self._stopping = False
        self._abort_all = False
        self._pending = 0                 # submitted and not yet finished (under the lock)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # the last engine failure, for logs and /health
        self._spec_seen = (0, 0)          # MTP (proposed, accepted) already counted in the metrics
        self._prefix_seen = (0, 0)        # prefix cache (query, hit) tokens already counted in the metrics
        self._update_gauges()

    # -- called from any thread -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending

    def submit(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop) -> Job:
        """Queue a request; its events arrive on the returned job's queue (first "started" or "error")."""
        job = Job(list(prompt), params, loop, queue=asyncio.Queue())
        with self._cond:
            if self._stopping:
                raise APIError("the server is shutting down", status=503, type="server_error")
            self._inbox.append(job)
            self._pending += 1
            self._cond.notify()
        return job

    def abort(self, job: Job) -> None:
        """Ask the engine thread to stop `job` and free its slot (no-op once finished)."""
        with self._cond:
            if job.cancelled:
                return
            job.cancelled = True
            self._aborts.append(job)
            self._cond.notify()

    def abort_all(self) -> None:
        """Abort every request submitted so far (drain deadline); their streams end with finish_reason "abort"."""
        with self._cond:
            self._abort_all = True
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is left and end the thread (bounded wait)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- engine thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or eng.has_work or self._stopping or self._abort_all):
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                stopping, abort_all, self._abort_all = self._stopping, self._abort_all, False
            if abort_all:
                aborts += list(self._jobs.values())
            for job in inbox:
                if stopping or abort_all:
                    self._finish(job, ("finish", "abort"))
                else:
                    self._admit(job)
            for job in aborts:
                self._abort(job, "abort")
            if stopping:
                for job in list(self._jobs.values()):
                    self._abort(job, "abort")
                self._update_gauges()
                return
            if eng.has_work:
                try:
                    events = eng.step()
                    self._count_step()
                except Exception as exc:  # noqa: BLE001 - keep serving; fail only the culprits
                    events = self._isolate(exc)
                seen: dict[int, Request] = {}
                for req, _ in events:
                    seen.setdefault(req.id, req)
                for req in seen.values():
                    self._deliver(req)
            self._update_gauges()

    def _isolate(self, exc: Exception) -> list[tuple[Request, None]]:
        """After a failed step: fail the requests whose parameters no longer pass validation (they alone caused it;
        the others re-run the step, whose cache writes are idempotent), or every request in flight when none is
        to blame. Returns an event for each survivor so that tokens recorded before the failure are delivered."""
        self.error = exc
        vocab = self.engine.model.cfg.vocab_size
        blamed: list[tuple[Job, Exception]] = []
        for job in self._jobs.values():
            try:
                dataclasses.replace(job.req.params).check_vocab(vocab)  # re-runs every field check
            except ValueError as why:
                blamed.append((job, ValueError(f"the request's sampling parameters cannot run: {why}")))
        if not blamed:
            blamed = [(job, exc) for job in self._jobs.values()]
        log.error("engine step failed (%s: %s); failing %d of %d request(s)", type(exc).__name__, exc, len(blamed),
                  len(self._jobs), exc_info=exc if len(blamed) == len(self._jobs) else None)
        for job, why in blamed:
            self._abort(job, None, why)
        return [(job.req, None) for job in self._jobs.values()]

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            self._finish(job, ("finish", "abort"))
            return
        try:
            job.req = self.engine.add_request(job.prompt, job.params)
        except Exception as exc:  # noqa: BLE001 - CapacityError / ValueError go back to the handler
            self._finish(job, ("error", exc))
            return
        self._jobs[job.req.id] = job
        self.metrics.inc("dsv4_prompt_tokens_total", len(job.prompt))
        job.deliver(("started",))

    def _abort(self, job: Job, reason: str | None, exc: BaseException | None = None) -> None:
        if job.done or job.req is None:
            return
        self.engine.abort(job.req)  # harmless on a finished request; frees its slot otherwise
        self._jobs.pop(job.req.id, None)
        self._finish(job, ("error", exc) if exc is not None else ("finish", reason))

    def _deliver(self, req: Request) -> None:
        job = self._jobs.get(req.id)
        if job is None or job.done:
            return
        now = time.perf_counter()
        new = req.output[job.sent:]
        if new:
            if job.sent == 0 and req.params.prompt_logprobs is not None:
                job.deliver(("prompt", list(req.prompt_logprobs)))
            lps = req.logprobs[job.sent:]
            tops = req.top_logprobs[job.sent:] if req.params.logprobs else [None] * len(new)
            job.sent = len(req.output)
            if job.first_token is None:
                job.first_token = now
                self.metrics.observe("dsv4_time_to_first_token_seconds", now - job.arrival)
            job.last_token = now
            self.metrics.inc("dsv4_generation_tokens_total", len(new))
            job.deliver(("tokens", list(zip(new, lps, tops))))
        if req.finished:
            self._jobs.pop(req.id, None)
            self._finish(job, ("finish", req.finish_reason))

    def _finish(self, job: Job, item: tuple) -> None:
        if job.done:
            return
        job.done = True
        if job.first_token is not None:
            end = job.last_token or job.first_token
            self.metrics.observe("dsv4_e2e_request_latency_seconds", end - job.arrival)
            if job.sent > 1:
                self.metrics.observe("dsv4_time_per_output_token_seconds", (end - job.first_token) / (job.sent - 1))
        with self._cond:
            self._pending -= 1
        self._update_gauges()
        job.deliver(item)

    def _count_step(self) -> None:
        """The engine's per-step figures (Engine.last_step, spec stats) into the step metrics."""
        st = self.engine.last_step
        if not st.get("tokens"):
            return
        m = self.metrics
        m.inc("dsv4_engine_steps_total")
        m.observe("dsv4_engine_step_tokens", st["tokens"])
        m.inc("dsv4_engine_prefill_tokens_total", st["prefill_tokens"])
        m.inc("dsv4_engine_decode_tokens_total", st["decode_tokens"])
        m.inc("dsv4_preemptions_total", st["preemptions"])
        spec = self.engine.spec_stats()
        if spec:
            m.inc("dsv4_spec_draft_tokens_total", spec["proposed"] - self._spec_seen[0])
            m.inc("dsv4_spec_accepted_tokens_total", spec["accepted"] - self._spec_seen[1])
            self._spec_seen = (spec["proposed"], spec["accepted"])
        prefix = self.engine.prefix_stats() if hasattr(self.engine, "prefix_stats") else {}
        if prefix:
            m.inc("dsv4_prefix_cache_query_tokens_total", prefix["query_tokens"] - self._prefix_seen[0])
            m.inc("dsv4_prefix_cache_hit_tokens_total", prefix["hit_tokens"] - self._prefix_seen[1])
            self._prefix_seen = (prefix["query_tokens"], prefix["hit_tokens"])
            m.set_gauges(dsv4_prefix_cache_hit_rate=prefix["hit_rate"], dsv4_prefix_cache_pages=prefix["cached_pages"])

    def _update_gauges(self) -> None:
        eng, cache = self.engine, self.engine.cache
        running = list(eng.running)
        pages = cache.num_blocks - 1  # page 0 is the null page
        used_pages = pages - cache.free_pages
        self.metrics.set_gauges(dsv4_cache_slots_used=self.max_slots - len(eng.free_slots),
                                dsv4_cache_slots_total=self.max_slots, dsv4_cache_pages_used=used_pages,
                                dsv4_cache_pages_total=pages, dsv4_cache_usage_ratio=used_pages / max(1, pages),
                                dsv4_cache_tokens_used=sum(r.length for r in running),
                                dsv4_requests_running=len(running), dsv4_requests_waiting=len(eng.waiting))
