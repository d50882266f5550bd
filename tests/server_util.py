"""A real alpaca-server (uvicorn) on a free 127.0.0.1 port, started and stopped by a test."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn

from alpaca_cpu.llama import Llama
from alpaca_cpu.server import ServerSettings, create_app
from alpaca_cpu.server.scheduler import Scheduler

START_TIMEOUT_S = 20.0


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    scheduler: Scheduler

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no slot is busy and nothing waits (AssertionError after timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = httpx.get(self.url + "/health").json()
            if health["slots_busy"] == 0 and health["queue"] == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"the server is still busy after {timeout} s: {health}")


@contextmanager
def running_server(llama: Llama, scheduler: Scheduler | None = None,
                   **settings: object) -> Iterator[RunningServer]:
    """`scheduler`: one of the tests' own over `llama` (default: the server's)."""
    settings.setdefault("model_id", "tiny")
    app = create_app(llama, ServerSettings(**settings), scheduler)  # type: ignore[arg-type]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", app.state.scheduler)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
