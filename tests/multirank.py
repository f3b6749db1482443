"""Helpers for tests that run several torch.distributed ranks (gloo, CPU) as local processes."""
from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, world: int, args: tuple, timeout_s: float) -> None:
    """Run fn(rank, *args) in `world` spawned processes; fail the test (and kill them) past `timeout_s`."""
    pc = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not pc.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process run did not finish within {timeout_s} s")
    finally:
        for p in pc.processes:
            if p.is_alive():
                p.kill()
                p.join()
