"""An OpenAI-compatible HTTP server over one continuously-batching `Engine` (`dsv4 serve`).

Modules: `body` (the body as checked JSON, OpenAI-style errors), `schemas` (pydantic request models, the request
contract, and response models), `validation` (request errors as 400s naming the field), `protocol` (translation
into engine inputs), `worker` (the engine thread and its jobs), `text` (incremental detokenisation, stop strings,
thinking split, chat messages), `logprobs` (their response formats), `metrics` (Prometheus), `gate` (API key,
drain, X-Request-Id, CORS middleware), `app` (routes), `run` (uvicorn with a graceful drain, background
server, `dsv4 serve`).
"""
from .app import AppState, create_app
from .body import APIError
from .metrics import Metrics
from .run import BackgroundServer, DrainingServer, build_server, serve_main
from .worker import EngineWorker

__all__ = ["APIError", "AppState", "EngineWorker", "Metrics", "create_app", "DrainingServer", "BackgroundServer",
           "build_server", "serve_main"]
