"""`dsv4 serve` over torch.distributed ranks: data-parallel attention, expert-parallel MoE, one HTTP endpoint.

torchrun starts one process per card. Every rank loads the dense weights and its share of the routed experts and
runs its own `Engine` (scheduler + KV cache). Rank 0 also runs the HTTP endpoint. One round of the serving loop:

1. rank 0 broadcasts a `Control` (new requests, each placed on the rank with the fewest running tokens; aborts;
   stop) over a host-side gloo group;
2. every rank admits its new requests, applies its aborts, runs `Engine.step()` if it has work, and joins the
   other ranks' model calls until all are done (`lockstep.Lockstep`: every MoE layer is a collective);
3. every rank's new tokens (and admissions, errors, finishes) are gathered to rank 0, which streams them.

Failure: any exception in the loop (a collective fails when a peer dies, or times out after `--dist-timeout`
seconds when a peer hangs) is fatal for the job: rank 0 fails every in-flight request with a 503, answers 503
for `FAIL_GRACE_S` seconds and exits with status 1; the other ranks exit with status 1 at once (torchrun then
stops the rest). SIGTERM: rank 0 drains (uvicorn, --drain-timeout) and then tells every rank to stop; the
other ranks ignore SIGTERM and follow rank 0.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..engine import Engine, Request
from ..lockstep import Lockstep
from ..parallel import ParallelContext
from ..sampling import SamplingParams
from .metrics import Metrics
from .protocol import APIError
from .worker import EngineWorker

__all__ = ["Control", "RankLoop", "RankedWorker", "rank_plan", "serve_ranks_main", "FAIL_GRACE_S", "HEARTBEAT_S"]

log = logging.getLogger("dsv4.server")

FAIL_GRACE_S = 3.0  # rank 0 answers 503 this long after a rank failed, then exits
HEARTBEAT_S = 1.0   # an idle rank 0 still runs a round this often (keeps collectives under their timeout, and
                    # notices a dead rank)


@dataclass
class Control:
    """What rank 0 tells every rank at the start of a round."""

    new: list[tuple[int, int, list[int], SamplingParams]] = field(default_factory=list)  # (id, rank, prompt, params)
    aborts: list[tuple[int, int]] = field(default_factory=list)                          # (id, rank)
    stop: bool = False


class RankLoop:
    """One rank's side of a round: its engine, the requests it owns (by rank-0 id), the lockstep gate."""

    def __init__(self, engine: Engine, ctx: ParallelContext, group: Any) -> None:
        self.engine, self.rank, self.group, self.world = engine, ctx.rank, group, ctx.world_size
        self.lockstep = Lockstep(engine.model, group)
        self.lockstep.install(engine)
        self.reqs: dict[int, Request] = {}
        self.sent: dict[int, int] = {}

    def exchange(self, control: Control | None) -> Control:
        """Rank 0's control, on every rank (a collective)."""
        box = [control]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def round(self, control: Control) -> list[tuple]:
        """Admit, abort, step in lockstep; returns this rank's events: (id, "started"), (id, "error", exc),
        (id, "tokens", ids, logprobs, top_logprobs | None, finish_reason | None, cached_tokens)."""
        eng, events = self.engine, []
        for rid, rank, prompt, params in control.new:
            if rank != self.rank:
                continue
            try:
                self.reqs[rid] = eng.add_request(prompt, params)
                events.append((rid, "started"))
            except Exception as exc:  # noqa: BLE001 - CapacityError / ValueError go back to the client
                events.append((rid, "error", exc))
        for rid, rank in control.aborts:
            if rank == self.rank and rid in self.reqs:
                eng.abort(self.reqs.pop(rid))
                self.sent.pop(rid, None)
        if eng.has_work:
            eng.step()
        self.lockstep.finish()
        for rid, req in list(self.reqs.items()):
            n = self.sent.get(rid, 0)
            if len(req.output) > n or req.finished:
                tops = req.top_logprobs[n:] if req.params.logprobs else None
                events.append((rid, "tokens", req.output[n:], req.logprobs[n:], tops, req.finish_reason,
                               req.cached_tokens))
                self.sent[rid] = len(req.output)
            if req.finished:
                del self.reqs[rid]
                self.sent.pop(rid, None)
        return events

    def report(self, events: list[tuple]) -> list[list[tuple]] | None:
        """Every rank's events on rank 0 (None elsewhere; a collective)."""
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object((events, self.engine.has_work), out, dst=0, group=self.group)
        return out


class RankedWorker(EngineWorker):
    """Rank 0's engine thread: places requests on ranks, drives the rounds, streams every rank's tokens.

    Reuses `EngineWorker`'s jobs, metrics and delivery: each request is mirrored by a `Request` whose output
    grows as its rank reports tokens. `on_failure()` is called (once, from the engine thread) when the job failed.
    """

    def __init__(self, engine: Engine, metrics: Metrics | None = None, *, ctx: ParallelContext, group: Any,
                 on_failure=None) -> None:
        super().__init__(engine, metrics)
        self.ctx, self.group, self.world = ctx, group, ctx.world_size
        self.max_slots = self.max_slots * self.world
        self.owner: dict[int, int] = {}
        self.failed = False
        self.on_failure = on_failure
        self.loop = RankLoop(engine, ctx, group)

    def running_tokens(self) -> list[int]:
        """Tokens held per rank: prompt + output of every unfinished request placed there."""
        load = [0] * self.world
        for rid, job in self._jobs.items():
            load[self.owner[rid]] += len(job.req.prompt) + len(job.req.output)
        return load

    def _run(self) -> None:
        try:
            self._rounds()
        except Exception as exc:  # noqa: BLE001 - a rank died or hung, or a bug here: the whole job fails
            self._fail(exc)

    def _rounds(self) -> None:
        busy = False
        while True:
            with self._cond:
                if not (self._inbox or self._aborts or self._stopping or self._abort_all or busy):
                    self._cond.wait(HEARTBEAT_S)
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                stopping, abort_all, self._abort_all = self._stopping, self._abort_all, False
            if abort_all:
                aborts += list(self._jobs.values())
            control = Control(stop=stopping)
            for job in inbox:
                if stopping or abort_all or job.cancelled:
                    self._finish(job, ("finish", "abort"))
                    continue
                job.req = Request(list(job.prompt), job.params)  # the mirror; its id names the request everywhere
                load = self.running_tokens()
                rank = load.index(min(load))
                self.owner[job.req.id] = rank
                self.metrics.inc("dsv4_rank_requests_total", rank=str(rank))
                self._jobs[job.req.id] = job
                control.new.append((job.req.id, rank, job.req.prompt, job.params))
            for job in aborts:
                if job.req is not None and job.req.id in self._jobs:
                    control.aborts.append((job.req.id, self.owner[job.req.id]))
                    self._abort(job, "abort")
            self.loop.exchange(control)
            if stopping:
                self._abort_rest()
                return
            reports = self.loop.report(self.loop.round(control))
            busy = any(work for _, work in reports)
            for events, _ in reports:
                for ev in events:
                    self._apply(ev)
            self._update_gauges()

    def _apply(self, ev: tuple) -> None:
        job = self._jobs.get(ev[0])
        if job is None:  # aborted meanwhile
            return
        if ev[1] == "started":
            self.metrics.inc("dsv4_prompt_tokens_total", len(job.prompt))
            job.deliver(("started",))
        elif ev[1] == "error":
            del self._jobs[ev[0]]
            self._finish(job, ("error", ev[2]))
        else:
            _, _, ids, lps, tops, reason, cached = ev
            req = job.req
            req.cached_tokens = cached  # the owning rank's prefix-cache hit (usage.prompt_tokens_details)
            req.output += ids
            req.logprobs += lps
            if tops is not None:
                req.top_logprobs += tops
            req.finish_reason = reason
            self._deliver(req)

    def _abort_rest(self) -> None:
        for job in list(self._jobs.values()):
            self._abort(job, "abort")
        self._update_gauges()

    def _fail(self, exc: BaseException) -> None:
        self.error, self.failed = exc, True
        log.error("a rank of the serving job failed (%s: %s): every request fails with 503; exiting in %.0f s",
                  type(exc).__name__, exc, FAIL_GRACE_S)
        err = APIError(f"a rank of the serving job failed ({type(exc).__name__}); the job is exiting", None, 503,
                       "server_error")
        with self._cond:
            self._stopping = True  # submit() answers 503 from now on
            inbox, self._inbox = self._inbox, []
        for job in inbox + list(self._jobs.values()):
            self._jobs.pop(job.req.id if job.req is not None else -1, None)
            self._finish(job, ("error", err))
        if self.on_failure is not None:
            self.on_failure()


def follow(engine: Engine, ctx: ParallelContext, group: Any) -> None:
    """A rank other than 0: run rounds until rank 0 says stop (exceptions propagate: the process fails)."""
    loop = RankLoop(engine, ctx, group)
    while True:
        control = loop.exchange(None)
        if control.stop:
            return
        loop.report(loop.round(control))


def _load(args, ctx: ParallelContext):
    """This rank's model (dense weights + its experts; static EP decode within --max-slots rows) and path."""
    from ..loading import check_device, make_backend, resolve_model_dir, resolve_quant
    from ..parallel import load_parallel_model

    path = resolve_model_dir(args.model)
    check_device(str(ctx.device))
    quant = resolve_quant(path, args.backend, args.weights, getattr(args, "quant", "auto"))
    # Decode steps hold at most max_slots rows (graph buckets too), MTP drafts one row per request: the static
    # capacity max_slots makes every decode call capturable; wider calls (prefill, verify) take the exact path.
    backend = make_backend(args.backend, args.numerics, quant)
    # --fused-moe: torch_npu's MC2 ops (hccl); the Ascend backend's CPU emulator provides them over gloo.
    npu = backend.npu if args.fused_moe and getattr(backend, "emulated", False) else None
    model = load_parallel_model(path, ctx, backend=backend, dtype=getattr(torch, args.dtype), weights=args.weights,
                                static=True, max_tokens_per_rank=args.max_slots, fused=args.fused_moe, npu=npu,
                                progress=ctx.rank == 0)
    if quant in ("fp8", "mxfp8"):
        model.backend.prepare(model)
    return model, path


def rank_plan(engine: Engine, ctx: ParallelContext) -> dict:
    """This rank's capacity plan: its experts, resident weight and KV-cache bytes, the static EP buffers."""
    from ..parallel import resident_weight_bytes, static_buffer_bytes

    m = engine.model
    r = m.layers[0].ffn.routed
    w = resident_weight_bytes(m)
    return {"rank": ctx.rank, "device": str(ctx.device), "experts": (r.first, r.first + r.count),
            "weights": w["total"], "routed_experts": w["routed_experts"], "kv_cache": engine.cache.nbytes(),
            "slots": len(engine.free_slots), "pages": engine.cache.num_blocks - 1,
            "ep_buffers": static_buffer_bytes(m), "capacity": m.expert_parallel.max_tokens_per_rank}


def serve_ranks_main(args, prepare=None) -> int:
    """`dsv4 serve` under torchrun (WORLD_SIZE > 1): rank 0 serves HTTP, every rank runs an engine.
    `prepare(args)`: the command line's checks that read files (rank 0 first: it may write the tiny default)."""
    from ..parallel import init_parallel
    from .run import build_engine, build_server, check_serve_flags

    check_serve_flags(args)
    backend = None if args.dist_backend == "auto" else args.dist_backend
    device = args.device.split(":")[0]  # the card index is LOCAL_RANK
    if backend == "gloo" and device != "cpu":
        raise SystemExit(f"dsv4 serve: --dist-backend gloo runs on the CPU; --device {args.device} needs hccl "
                         "(npu) or nccl (cuda)")
    ctx = init_parallel(backend, device, args.dist_timeout)
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.dist_timeout))
    if prepare is not None:
        if ctx.rank == 0:
            prepare(args)
        ctx.barrier()
        if ctx.rank != 0:
            prepare(args)
    model, path = _load(args, ctx)
    engine = build_engine(args, model)
    plans = ctx.gather_objects(rank_plan(engine, ctx))
    if ctx.rank == 0:
        for p in plans:
            print(f"[dsv4] rank {p['rank']} ({p['device']}): experts [{p['experts'][0]}, {p['experts'][1]}), "
                  f"weights {p['weights'] / 2**20:.1f} MiB (routed experts {p['routed_experts'] / 2**20:.1f}), "
                  f"KV cache {p['kv_cache'] / 2**20:.1f} MiB ({p['slots']} slots, {p['pages']} pages), static EP "
                  f"buffers {p['ep_buffers'] / 2**10:.1f} KiB per MoE call (capacity {p['capacity']} rows)",
                  file=sys.stderr)
    if ctx.rank != 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 drains, then tells this rank to stop
        follow(engine, ctx, group)
        ctx.close()
        return 0
    holder: dict = {}

    def failed() -> None:  # from the engine thread: keep answering 503 a little, then exit with status 1
        threading.Timer(FAIL_GRACE_S, lambda: setattr(holder["server"], "should_exit", True)).start()

    worker_class = _partial_worker(ctx, group, failed)
    server = holder["server"] = build_server(args, engine, path, worker_class)
    server.run()
    worker = server.config.app.state.worker
    if worker.failed:
        print(f"dsv4 serve: error: a rank failed: {worker.error}", file=sys.stderr)
        return 1
    ctx.close()
    return 0


def _partial_worker(ctx: ParallelContext, group: Any, on_failure):
    def make(engine: Engine, metrics: Metrics | None = None) -> RankedWorker:
        return RankedWorker(engine, metrics, ctx=ctx, group=group, on_failure=on_failure)

    return make

