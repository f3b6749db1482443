"""An OpenAI-compatible HTTP server over one continuously-batching `Engine` (`dsv4 serve`).

Modules: `protocol` (request parsing and validation, OpenAI-style errors), `worker` (the engine thread and its
jobs), `text` (incremental detokenisation, stop strings, thinking split), `metrics` (Prometheus), `app` (routes),
`run` (uvicorn with a graceful drain, background server, `dsv4 serve`).
"""
from .app import AppState, create_app
from .metrics import Metrics
from .protocol import APIError
from .run import BackgroundServer, DrainingServer, build_server, serve_main
from .worker import EngineWorker

__all__ = ["APIError", "AppState", "EngineWorker", "Metrics", "create_app", "DrainingServer", "BackgroundServer",
           "build_server", "serve_main"]
