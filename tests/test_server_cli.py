"""The `alpaca-server` command: options, API key from the environment, access log, and a
graceful stop on SIGTERM / Ctrl-C (exit 0 within the drain time)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from test_api_inputs import write_tiny_llama

from alpaca_cpu.server.cli import DRAIN_SECONDS, build_parser

START_TIMEOUT_S = 30.0
EXIT_MARGIN_S = 5.0  # beyond the drain time: uvicorn's own shutdown and the scheduler's join


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tiny_path: Path, *args: str, env: dict[str, str] | None = None):
    """alpaca-server in a subprocess on a free port; its stderr goes to proc.stderr, a
    temporary file (a pipe nobody reads would fill up with the access log and block it)."""
    port = free_port()
    err = tempfile.TemporaryFile("w+")  # noqa: SIM115  (the caller closes it with proc)
    proc = subprocess.Popen(
        [sys.executable, "-m", "alpaca_cpu.server.cli", "-m", str(tiny_path), "--port",
         str(port), "-c", "2048", "--parallel", "2", "-t", "1", "--chat-format", "chatml",
         *args], stderr=err, text=True, env={**os.environ, **(env or {})})
    proc.stderr = err
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            err.seek(0)
            raise AssertionError(f"alpaca-server did not start: {err.read()}")
        time.sleep(0.05)


def test_defaults() -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.parallel) == ("127.0.0.1", 8080, 4)


# Ctrl-C takes the same path as SIGTERM in uvicorn: its run is under `slow` (a process start
# costs ~2 s of the default suite).
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT,
                                                              marks=pytest.mark.slow)])
def test_a_signal_drains_and_exits_0(tiny_path: Path, sig: signal.Signals) -> None:
    proc, url = start(tiny_path, env={"ALPACA_API_KEY": "k3y"})
    try:
        headers = {"Authorization": "Bearer k3y"}
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers=headers).json()
        assert models["data"][0]["id"] == "tiny"
        # A stream is running (2000 tokens: far longer than the drain) when the signal comes.
        with httpx.stream("POST", url + "/v1/completions", headers=headers, timeout=30, json={
                "model": "tiny", "prompt": "the", "max_tokens": 2000, "stream": True,
                "logit_bias": {"2": -100}}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            t0 = time.monotonic()
            proc.send_signal(sig)
            for _ in lines:  # the stream ends (cancelled at the drain's end), no hang
                pass
        assert proc.wait(DRAIN_SECONDS + EXIT_MARGIN_S) == 0
        assert time.monotonic() - t0 <= DRAIN_SECONDS + EXIT_MARGIN_S
        proc.stderr.seek(0)
        err = proc.stderr.read()
        # One access-log line per request, with its status.
        assert '"GET /v1/models" 401' in err and '"GET /v1/models" 200' in err
        assert '"POST /v1/completions" 200' in err
        assert "alpaca-server: stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
