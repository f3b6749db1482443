"""The FastAPI app: /v1/completions, /v1/chat/completions (JSON or server-sent events), /v1/models, /health,
/metrics (Prometheus text), and vLLM's /tokenize, /detokenize, /version; every GET route also answers HEAD.

Bodies are read with a size cap and a time limit, parsed, validated and tokenised off the event loop
(`protocol`), then submitted to the engine thread (`worker`). Stop strings, detokenisation and the thinking split
(`text`) happen in the handler; a stop-string hit or a client disconnect aborts the request in the engine, freeing
its slot at once. A valid `X-Request-Id` header is echoed and names the response (`cmpl-<id>`, as vLLM does);
CORS headers are sent only for the origins `allowed_origins` lists (Starlette's CORSMiddleware).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

try:
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError as _err:  # pragma: no cover - the optional extra is missing
    raise ImportError(f"`dsv4 serve` needs FastAPI and uvicorn: pip install 'dsv4-ascend[serve]' ({_err})") from None

from .. import __version__
from ..engine import CapacityError, Engine
from . import schemas as sc
from .gate import AppState, Gate, error_response
from .logprobs import LogprobFormat
from .metrics import Metrics
from .protocol import (MAX_BODY_BYTES, REQUEST_ID_HEADER, APIError, Parsed, Settings, parse_body, parse_chat_request,
                       parse_completion_request, parse_detokenize_request, parse_tokenize_request)
from .text import ChatReply, Output, TokenText
from .worker import EngineWorker, Job

__all__ = ["AppState", "create_app"]

log = logging.getLogger("dsv4.server")

def call_id() -> str:
    """A tool call's id, as OpenAI writes them."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, tokenizer, served_model_name: str = "dsv4", api_key: str | None = None,
               max_queue: int = 512, metrics: Metrics | None = None, body_timeout: float = 30.0,
               allowed_origins: Sequence[str] = (), worker_class: type[EngineWorker] = EngineWorker):
    """The ASGI app serving `engine` (started/stopped with the app's lifespan); CORS headers only for
    `allowed_origins` ("*" for any); `worker_class(engine, metrics)` runs the engine (server.ranks: over ranks).
    Raises ValueError when no request could ever fit (no slot, or a context
    without room for one prompt token and one generated token)."""
    metrics = metrics or Metrics()
    cache = engine.cache
    # The longest request (prompt + max_tokens) the engine can ever hold: the per-sequence length limit, or the
    # whole page budget when that is smaller, less the positions an MTP verify writes past the last token
    # (`Engine.add_request` counts them; a request defaulting max_tokens to the context would be refused).
    spec = getattr(engine, "spec", None)
    extra = spec.n if spec is not None else 0
    context = min(engine.max_seq_len, (cache.num_blocks - 1) * cache.block_size) - extra
    if not engine.free_slots or context < 2:
        raise ValueError(f"no request can ever be served: {len(engine.free_slots)} sequence slot(s) and room for "
                         f"{context} token(s) per request (one needs a slot and 2 tokens: a prompt token and a "
                         "generated one)")
    worker = worker_class(engine, metrics)
    settings = Settings(served_model_name, context, engine.model.cfg.vocab_size, tokenizer.max_token_chars,
                        api_key or None, max_queue, spec is not None)
    state = AppState(settings, metrics, worker, body_timeout)
    tok_text = TokenText(tokenizer)
    fmt = LogprobFormat(tokenizer, tok_text)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="dsv4-ascend", version=__version__, lifespan=lifespan, redoc_url=None,
                  redirect_slashes=False)  # never answer a POST with a redirect; /docs and /openapi.json served
    app.state.dsv4 = state

    def openapi() -> dict:
        if app.openapi_schema is None:  # the routes read their bodies themselves: add the request models
            app.openapi_schema = sc.add_request_schemas(get_openapi(title=app.title, version=app.version,
                                                                    routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi

    def get(path: str, **kw) -> Callable:
        """A GET route that also answers HEAD (HEAD kept out of the OpenAPI document: one operation per route)."""
        def register(fn: Callable) -> Callable:
            app.add_api_route(path, fn, methods=["HEAD"], include_in_schema=False)
            return app.get(path, **kw)(fn)
        return register

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        return error_response(APIError(str(exc.detail), None, exc.status_code,
                                        "not_found_error" if exc.status_code == 404 else "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        return error_response(APIError(str(exc), None))

    @app.exception_handler(Exception)
    async def _server_error(_, exc: Exception):
        log.exception("unhandled error")
        return error_response(APIError(f"internal error: {type(exc).__name__}", None, 500, "server_error"))

    # -- helpers ----------------------------------------------------------------------------------------------
    async def read_body(request: HTTPRequest) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise APIError(f"request body over {MAX_BODY_BYTES} bytes", None, 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(f"request body over {MAX_BODY_BYTES} bytes", None, 413)
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse(request: HTTPRequest, parser: Callable[..., Any]) -> Any:
        try:
            raw = await asyncio.wait_for(read_body(request), state.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(f"the request body did not arrive within {state.body_timeout:g} s", None, 408) from None
        except ClientDisconnect:  # not a server error (it was a logged 500): nginx's 499, sent to nobody
            raise APIError("the client disconnected before its request body arrived", None, 499) from None
        # JSON parsing, validation and tokenisation are CPU-bound: off the event loop, so streams keep flowing.
        body = await asyncio.to_thread(parse_body, raw)
        return await asyncio.to_thread(parser, body, settings, tokenizer)

    async def start(parsed: Parsed, prompt_param: str) -> list[tuple[Job, Output]]:
        """Submit every sequence of the request (prompts x best_of) and wait until all are admitted; the first
        refusal aborts the others and answers for the request."""
        seqs = parsed.sequences()
        room = settings.max_queue + worker.max_slots
        if len(seqs) > room:  # a 503 would be retried forever: this request can never be queued
            param = "n" if parsed.best_of == parsed.n else "best_of"
            param = "prompt" if len(parsed.prompts) > 1 and parsed.best_of == 1 else param
            raise APIError(f"the request needs {len(seqs)} sequences (prompts x {param}); this server queues at "
                           f"most {room} (--max-queue + --max-slots)", param)
        if worker.pending + len(seqs) > room:
            raise APIError("the server is overloaded; retry later", None, 503, "server_error")
        if not worker.alive:
            raise APIError("the engine is not running", None, 503, "server_error")
        loop = asyncio.get_running_loop()
        jobs = [worker.submit(parsed.prompts[i].ids, params, loop) for i, params in seqs]
        try:
            for job in jobs:
                first = await job.queue.get()
                if first[0] == "error":
                    exc = first[1]
                    if isinstance(exc, CapacityError):
                        raise APIError(str(exc), "max_tokens" if len(job.prompt) < settings.max_seq_len
                                       else prompt_param)
                    if isinstance(exc, ValueError):
                        raise APIError(str(exc), prompt_param)
                    if isinstance(exc, APIError):  # e.g. 503 when a rank of a multi-rank job failed
                        raise exc
                    raise APIError(f"engine error: {exc}", None, 500, "server_error")
                if first[0] == "finish":
                    raise APIError("the server is shutting down", None, 503, "server_error")
        except BaseException:
            for job in jobs:
                worker.abort(job)
            raise
        outs = [Output(tokenizer, job.params.stop, 0 if parsed.echo_only else None, job.params.min_tokens)
                for job in jobs]
        for out, (i, _) in zip(outs, seqs):
            out.prompt_index = i
        return list(zip(jobs, outs))

    def apply(job: Job, out: Output, item: tuple) -> list | None:
        """One worker event applied to `out`: the token records it adds ([] for the finish), None for nothing."""
        if item[0] == "tokens":
            if job.req is not None:  # set at admission, before the first token
                out.cached_tokens = job.req.cached_tokens
            batch = []
            for t in item[1]:
                if out.finish is not None:
                    break
                if out.push(*t):
                    batch.append(t)
            if out.stop_hit:
                worker.abort(job)  # frees the slot; the engine may have run a token or two ahead
            return batch
        if item[0] == "prompt":
            out.prompt_logprobs = item[1]
        elif item[0] == "finish":
            out.end(item[1])
            return []
        elif item[0] == "error":
            out.end("error")
            if isinstance(item[1], APIError):
                raise item[1]
            raise APIError(f"engine error: {item[1]}", None, 500, "server_error")
        return None

    async def merged(seqs: list[tuple[Job, Output]]) -> AsyncIterator[tuple[int, list | None]]:
        """(sequence, token batch) in arrival order over all sequences, then (sequence, None) once it finished.
        Events are applied here, as they are read, so each batch's text is exactly what it added."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int, job: Job) -> None:
            while True:
                item = await job.queue.get()
                queue.put_nowait((k, item))
                if item[0] in ("finish", "error"):
                    return

        one = len(seqs) == 1  # the common case reads its job's queue directly
        tasks = [] if one else [asyncio.create_task(pump(k, job)) for k, (job, _) in enumerate(seqs)]
        try:
            left = len(seqs)
            while left:
                k, item = (0, await seqs[0][0].queue.get()) if one else await queue.get()
                job, out = seqs[k]
                if out.finish is not None:
                    continue  # a stop string ended it; the engine's late events are moot
                batch = apply(job, out, item)
                if batch is not None:
                    yield k, batch
                if out.finish is not None:
                    left -= 1
                    yield k, None
        finally:
            for task in tasks:
                task.cancel()

    def finish_reason(out: Output) -> str:
        return out.finish or "stop"  # "stop" (EOS, stop token or stop string), "length", "abort"

    def usage(parsed: Parsed, outs: list[Output]) -> dict:
        """Usage so far: each prompt counted once, the tokens of the choices returned; cached_tokens: per prompt,
        the prompt tokens its sequences took from the prefix cache (the fewest, when it has several)."""
        p = sum(len(x.ids) for x in parsed.prompts)
        n = sum(len(out.tokens) for out in outs)
        cached: dict[int, int] = {}
        for out in outs:
            cached[out.prompt_index] = min(cached.get(out.prompt_index, out.cached_tokens), out.cached_tokens)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n,
                "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}

    def response_id(request: HTTPRequest, prefix: str) -> str:
        return f"{prefix}-{request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex}"  # the header passed _Gate

    async def watch_disconnect(request: HTTPRequest, jobs: list[Job]) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for job in jobs:
                    worker.abort(job)
                return

    async def collect(request: HTTPRequest, seqs: list[tuple[Job, Output]]) -> list[list]:
        """Every sequence's token records [(id, logprob, top)], once all have finished."""
        batches: list[list] = [[] for _ in seqs]
        watcher = asyncio.create_task(watch_disconnect(request, [job for job, _ in seqs]))
        try:
            async for k, batch in merged(seqs):
                batches[k] += batch or []
        finally:
            watcher.cancel()
            for job, out in seqs:
                if out.finish is None:  # the client went away (or the handler failed): free the slot now
                    worker.abort(job)
        return batches

    def done_metric(endpoint: str, reason: str) -> None:
        metrics.inc("dsv4_requests_finished_total", endpoint=endpoint, finish_reason=reason)

    class SSEResponse(StreamingResponse):
        """Server-sent events; whatever ends the response (done, disconnect, cancel) releases the request."""

        def __init__(self, gen: AsyncIterator[str], seqs: list[tuple[Job, Output]]) -> None:
            super().__init__(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.gen = gen
            self.seqs = seqs

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                for job, out in self.seqs:
                    if out.finish is None:  # disconnected mid-stream: abort so the slot frees at once
                        worker.abort(job)
                await self.gen.aclose()

    def stream(endpoint: str, seqs: list[tuple[Job, Output]], parsed: Parsed, first: list[dict],
               on_batch: Callable[[int, list], list[dict]], on_finish: Callable[[int, str], list[dict]],
               tail: Callable[[], list[dict]]) -> SSEResponse:
        """The one streaming skeleton: `first` chunks, then `on_batch(k, batch)` per token batch of sequence k and
        `on_finish(k, reason)` when it ends, then `tail()`; with continuous_usage_stats every chunk carries the
        usage so far; an engine error becomes an error event; always ends with [DONE]; counts finish reasons."""
        outs = [out for _, out in seqs]
        counted = [False] * len(seqs)

        def sse(chunk: dict) -> str:
            if parsed.continuous_usage:
                chunk.setdefault("usage", usage(parsed, outs))
            return _sse(chunk)

        async def gen() -> AsyncIterator[str]:
            left = "abort"
            try:
                for chunk in first:
                    yield sse(chunk)
                async for k, batch in merged(seqs):
                    if batch is None:
                        chunks = on_finish(k, finish_reason(outs[k]))
                        counted[k] = True  # the reason sent (chat turns "stop" into "tool_calls")
                        done_metric(endpoint, [c for x in chunks for c in x["choices"] if c["finish_reason"]][-1][
                            "finish_reason"])
                    else:
                        chunks = on_batch(k, batch)
                    for chunk in chunks:
                        yield sse(chunk)
                for chunk in tail():
                    yield sse(chunk)
            except APIError as err:
                left = "error"
                yield _sse(err.body())
            finally:
                for k in range(len(seqs)):
                    if not counted[k]:
                        done_metric(endpoint, left)
            yield "data: [DONE]\n\n"

        return SSEResponse(gen(), seqs)

    # -- endpoints --------------------------------------------------------------------------------------------
    @get("/health")
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, 503)
        if not worker.alive:
            return JSONResponse({"status": "engine not running"}, 503)
        return {"status": "ok"}

    @get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "dsv4-ascend",
                "max_model_len": settings.max_seq_len}

    @get("/v1/models", responses=sc.responses(sc.ModelList))
    async def models():
        return {"object": "list", "data": [model_card()]}

    @get("/v1/models/{name:path}", responses=sc.responses(sc.ModelCard))
    async def model(name: str):
        if name != settings.model_name:
            shown = name.encode("utf-8", "backslashreplace").decode("utf-8")
            raise APIError(f"the model '{shown}' does not exist", "model", 404, code="model_not_found")
        return model_card()

    @get("/version", responses=sc.responses(sc.VersionResponse))
    async def version():
        return {"version": __version__}

    @app.post("/tokenize", openapi_extra=sc.request_body(sc.TokenizeRequest),
              responses=sc.responses(sc.TokenizeResponse))
    async def tokenize(request: HTTPRequest):
        ids, strs = await parse(request, parse_tokenize_request)
        out = {"count": len(ids), "max_model_len": settings.max_seq_len, "tokens": ids}
        if strs:
            out["token_strs"] = [tokenizer.id_to_token(i) for i in ids]
        return JSONResponse(out)

    @app.post("/detokenize", openapi_extra=sc.request_body(sc.DetokenizeRequest),
              responses=sc.responses(sc.DetokenizeResponse))
    async def detokenize(request: HTTPRequest):
        ids = await parse(request, parse_detokenize_request)
        return {"prompt": await asyncio.to_thread(tokenizer.decode, ids)}

    @app.post("/v1/completions", openapi_extra=sc.request_body(sc.CompletionRequest),
              responses=sc.responses(sc.CompletionResponse, stream=True))
    async def completions(request: HTTPRequest):
        parsed = await parse(request, parse_completion_request)
        seqs = await start(parsed, "prompt")
        rid, now = response_id(request, "cmpl"), int(time.time())
        top_n, per = parsed.logprobs, parsed.best_of

        def head(choices: list[dict]) -> dict:
            return {"id": rid, "object": "text_completion", "created": now, "model": settings.model_name,
                    "choices": choices}

        def prefix(k: int, out: Output) -> tuple[str, dict | None, dict]:
            """What precedes sequence k's text: the echoed prompt, its logprobs, and vLLM's prompt_logprobs."""
            prompt = parsed.prompts[k // per]
            extra = {}
            if parsed.prompt_logprobs is not None:
                extra["prompt_logprobs"] = fmt.prompt_logprobs(prompt.ids, out.prompt_logprobs or [],
                                                                parsed.prompt_logprobs)
            if not parsed.echo:
                return "", None, extra
            text, lp = fmt.echo(prompt.ids, out.prompt_logprobs or [], top_n)
            return text, lp, extra

        def join(a: dict | None, b: dict | None) -> dict | None:
            return b if a is None else {key: a[key] + b[key] for key in a}

        if not parsed.stream:
            batches = await collect(request, seqs)
            choices, kept = [], []
            for p in range(len(parsed.prompts)):
                group = list(range(p * per, (p + 1) * per))
                if per > parsed.n:  # best_of: the n with the highest cumulative logprob (stable: ties keep order)
                    group.sort(key=lambda k: -sum(lp for _, lp, _ in batches[k]))
                for j, k in enumerate(group[:parsed.n]):
                    job, out = seqs[k]
                    text, lp, extra = prefix(k, out)
                    if top_n is not None:
                        lp = join(lp, fmt.completion(batches[k], len(text), top_n))
                    choices.append({"index": p * parsed.n + j, "text": text + out.text, "logprobs": lp,
                                    "finish_reason": finish_reason(out), **extra})
                    kept.append(out)
            for _, out in seqs:
                done_metric("completions", finish_reason(out))
            return {**head(choices), "usage": usage(parsed, kept)}

        offsets = [0] * len(seqs)  # best_of == n when streaming: sequence k is choice k
        opened = [not (parsed.echo or parsed.prompt_logprobs is not None)] * len(seqs)

        def opening(k: int) -> list[dict]:
            """The prompt part (echo, prompt_logprobs), first and once, after the prefill computed it."""
            if opened[k]:
                return []
            opened[k] = True
            text, lp, extra = prefix(k, seqs[k][1])
            offsets[k] = len(text)
            return [head([{"index": k, "text": text, "logprobs": lp, "finish_reason": None, **extra}])]

        def on_batch(k: int, batch: list) -> list[dict]:
            out = seqs[k][1]
            chunks = opening(k)
            piece = out.take()
            lp = fmt.completion(batch, offsets[k], top_n) if top_n is not None and batch else None
            offsets[k] += sum(len(tok_text(t)[0]) for t, _, _ in batch)
            if piece or lp:
                chunks.append(head([{"index": k, "text": piece, "logprobs": lp, "finish_reason": None}]))
            return chunks

        def on_finish(k: int, reason: str) -> list[dict]:
            return [*opening(k),
                    head([{"index": k, "text": seqs[k][1].take(), "logprobs": None, "finish_reason": reason}])]

        def tail() -> list[dict]:
            return [{**head([]), "usage": usage(parsed, [out for _, out in seqs])}] if parsed.include_usage else []

        return stream("completions", seqs, parsed, [], on_batch, on_finish, tail)

    @app.post("/v1/chat/completions", openapi_extra=sc.request_body(sc.ChatCompletionRequest),
              responses=sc.responses(sc.ChatCompletionResponse, stream=True))
    async def chat_completions(request: HTTPRequest):
        parsed = await parse(request, parse_chat_request)
        seqs = await start(parsed, "messages")  # choice k is sequence k (seed + k)
        outs = [out for _, out in seqs]
        rid, now = response_id(request, "chatcmpl"), int(time.time())
        replies = [ChatReply(parsed.thinking, parsed.tools, call_id, parsed.single_tool_call) for _ in seqs]

        if not parsed.stream:
            batches = await collect(request, seqs)
            choices = []
            for k, out in enumerate(outs):
                message = replies[k].message(out.text)
                reason = replies[k].finish_reason(finish_reason(out))
                done_metric("chat", reason)
                lp = {"content": fmt.chat(batches[k])} if parsed.logprobs is not None else None
                choices.append({"index": k, "message": message, "logprobs": lp, "finish_reason": reason})
            return {"id": rid, "object": "chat.completion", "created": now, "model": settings.model_name,
                    "choices": choices, "usage": usage(parsed, outs)}

        def chunk(k: int, delta: dict, lp: list | None, reason: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": settings.model_name,
                    "choices": [{"index": k, "delta": delta,
                                 "logprobs": None if lp is None else {"content": lp}, "finish_reason": reason}]}

        def on_batch(k: int, batch: list) -> list[dict]:
            d = replies[k].delta(outs[k].take(), False)
            lp = fmt.chat(batch) if parsed.logprobs is not None and batch else None
            return [chunk(k, d, lp, None)] if d or lp else []

        def on_finish(k: int, reason: str) -> list[dict]:
            d = replies[k].delta(outs[k].take(), True)
            return [*([chunk(k, d, None, None)] if d else []), chunk(k, {}, None, replies[k].finish_reason(reason))]

        def tail() -> list[dict]:
            return [{"id": rid, "object": "chat.completion.chunk", "created": now, "model": settings.model_name,
                     "choices": [], "usage": usage(parsed, outs)}] if parsed.include_usage else []

        first = [chunk(k, {"role": "assistant", "content": ""}, None, None) for k in range(len(seqs))]
        return stream("chat", seqs, parsed, first, on_batch, on_finish, tail)

    return Gate(app, state, allowed_origins)
