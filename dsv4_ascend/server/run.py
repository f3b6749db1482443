"""Running the app: `DrainingServer` (uvicorn with a graceful drain), `BackgroundServer` (tests, benchmarks) and
`dsv4 serve` (`build_server`, `serve_main`).

On shutdown the listening socket closes, /health and new requests get 503, in-flight requests run to completion
for up to `drain_timeout` seconds; the rest are then aborted (their streams end with finish_reason "abort") and
the worker stops.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time

try:
    import uvicorn
except ImportError as _err:  # pragma: no cover - the optional extra is missing
    raise ImportError(f"`dsv4 serve` needs FastAPI and uvicorn: pip install 'dsv4-ascend[serve]' ({_err})") from None

from ..engine import Engine
from .app import AppState, create_app

__all__ = ["DrainingServer", "BackgroundServer", "allowed_origins", "build_server", "serve_main"]

class DrainingServer(uvicorn.Server):
    """uvicorn.Server with a graceful drain: on shutdown the app is flagged as draining (503 for new requests,
    /health 503), in-flight requests run on for up to `drain_timeout` seconds, then the ones left are aborted so
    their streams still end cleanly (finish_reason "abort", then [DONE]); uvicorn's own
    `timeout_graceful_shutdown` (set a few seconds later) is the backstop."""

    def __init__(self, config, drain_timeout: float | None = None) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets=None) -> None:
        state = getattr(self.config.app, "state", None)
        timer = None
        if isinstance(state, AppState):
            state.draining = True
            if self.drain_timeout is not None:
                timer = asyncio.get_running_loop().call_later(self.drain_timeout, state.worker.abort_all)
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()


def _uvicorn_config(app, host: str, port: int, log_level: str, drain_timeout: float, access_log: bool = True):
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=drain_timeout + 5.0, lifespan="on")


class BackgroundServer:
    """Runs an app under uvicorn on a thread (tests, benchmarks): `with BackgroundServer(app) as srv: srv.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, drain_timeout: float = 30.0,
                 log_level: str = "warning") -> None:
        self.config = _uvicorn_config(app, host, port, log_level, drain_timeout, access_log=False)
        self.server = DrainingServer(self.config, drain_timeout)
        self.thread = threading.Thread(target=self.server.run, name="dsv4-uvicorn", daemon=True)
        self.host = host
        self.port = port

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def shutdown(self) -> None:
        """Begin a graceful shutdown (returns at once)."""
        self.server.should_exit = True

    def stop(self, timeout: float = 60.0) -> None:
        self.shutdown()
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s]+")


def allowed_origins(values: list[str] | None) -> list[str]:
    """--allowed-origins (repeated and/or comma-separated) as a list; each must be '*' or scheme://host[:port]
    (browsers send the Origin header without a path, so one with a path or trailing slash would never match)."""
    out = [o.strip() for v in values or () for o in v.split(",")]
    for o in out:
        if o != "*" and not _ORIGIN.fullmatch(o):
            raise SystemExit(f"dsv4 serve: --allowed-origins: {o!r} is not an origin: give '*' or "
                             "scheme://host[:port] with no path or trailing slash")
    return out


def check_serve_flags(args) -> list[str]:
    """The serve flags no model is needed for (SystemExit naming the flag); returns the CORS origins."""
    for flag, value, least in (("--max-slots", args.max_slots, 1), ("--max-seq-len", args.max_seq_len, 2),
                               ("--prefill-chunk", args.prefill_chunk, 1), ("--max-queue", args.max_queue, 0),
                               ("--max-num-batched-tokens", 1 if getattr(args, "max_num_batched_tokens", None) is None
                                else args.max_num_batched_tokens, 1),
                               ("--block-size", 1 if getattr(args, "block_size", None) is None else args.block_size, 1)):
        if value < least:  # checked before any weight is read
            raise SystemExit(f"dsv4 serve: {flag} must be >= {least} (got {value}): no request could ever be served"
                             if flag in ("--max-slots", "--max-seq-len") else
                             f"dsv4 serve: {flag} must be >= {least} (got {value})")
    if args.drain_timeout < 0:
        raise SystemExit(f"dsv4 serve: --drain-timeout must be >= 0 (got {args.drain_timeout})")
    port = getattr(args, "port", 0)
    if not 0 <= port <= 65535:  # else uvicorn's bind fails with an OverflowError, after the weights were read
        raise SystemExit(f"dsv4 serve: --port must be in [0, 65535] (got {port})")
    budget = getattr(args, "kv_cache_gib", None)
    if budget is not None and not (math.isfinite(budget) and budget > 0):  # 0 was taken as "no budget"
        raise SystemExit(f"dsv4 serve: --kv-cache-gib must be a positive number of GiB (got {budget})")
    origins = allowed_origins(getattr(args, "allowed_origins", None))
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="[dsv4] %(levelname)s %(message)s")
    return origins


def build_engine(args, model) -> Engine:
    """The engine `dsv4 serve` runs over `model`, from its flags."""
    budget = getattr(args, "kv_cache_gib", None)
    return Engine(model, max_slots=args.max_slots, max_seq_len=args.max_seq_len, prefill_chunk=args.prefill_chunk,
                  cache_bytes=int(budget * 2**30) if budget else None, kv_fp8=getattr(args, "kv_fp8", False),
                  speculative_tokens=getattr(args, "speculative_tokens", 0), graph=getattr(args, "graph", False),
                  graph_tuning=getattr(args, "graph_tuning", "default"),
                  compile_prefill=getattr(args, "compile_prefill", False),
                  max_num_batched_tokens=getattr(args, "max_num_batched_tokens", None),
                  prefix_cache=not getattr(args, "no_prefix_cache", False), block_size=getattr(args, "block_size", None))


def build_server(args, engine: Engine | None = None, path=None, worker_class=None) -> DrainingServer:
    """The uvicorn server `dsv4 serve` runs, from its parsed command-line flags (model loaded, not started).
    Given `engine` (and its model directory `path`), serves it with `worker_class` (server.ranks) instead."""
    import os
    import sys

    from ..loading import load_model  # the one place the server imports the model loader (lazily)
    from ..tokenizer import load_tokenizer

    origins = check_serve_flags(args)
    if engine is None:
        model, path = load_model(args.model, args.device, args.backend, args.dtype, args.weights, args.numerics,
                                 getattr(args, "quant", "auto"))
        engine = build_engine(args, model)
    tok = load_tokenizer(path)
    name = args.served_model_name or path.name
    api_key = args.api_key if args.api_key is not None else os.environ.get("DSV4_API_KEY")
    try:
        app = create_app(engine, tok, served_model_name=name, api_key=api_key, max_queue=args.max_queue,
                         allowed_origins=origins, **({"worker_class": worker_class} if worker_class else {}))
    except ValueError as exc:  # e.g. a KV-cache budget with room for no request
        raise SystemExit(f"dsv4 serve: {exc}") from None
    cache = engine.cache
    ranks = getattr(app.state.worker, "world", 1)
    print(f"[dsv4] serving '{name}' ({path}) on http://{args.host}:{args.port}: "
          f"{f'{ranks} ranks x ' if ranks > 1 else ''}{args.max_slots} slots, "
          f"{cache.num_blocks - 1} pages of {cache.block_size} tokens, max_seq_len {cache.max_seq_len}"
          f"{'; API key required' if api_key else ''}{f'; CORS for {origins}' if origins else ''}", file=sys.stderr)
    config = _uvicorn_config(app, args.host, args.port, args.log_level, args.drain_timeout)
    return DrainingServer(config, args.drain_timeout)


def serve_main(args) -> int:
    """`dsv4 serve`: serve until SIGINT/SIGTERM, then drain in-flight requests (bounded by --drain-timeout)."""
    build_server(args).run()
    return 0
