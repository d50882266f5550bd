"""The README's Python examples run as written; those that talk to alpaca-server at its default
address run against a real server over the same model (on a free port, substituted)."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
from conftest import REPO
from server_util import running_server

from alpaca_cpu.llama import Llama

SERVER_URL = "http://127.0.0.1:8080/v1"  # alpaca-server's default address, as the README uses


def python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.real_model
def test_readme_python_examples_run(smollm2_path) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 2
    out = io.StringIO()
    with contextlib.ExitStack() as stack:
        server = None
        stack.enter_context(contextlib.redirect_stdout(out))
        for block in blocks:
            if SERVER_URL in block:
                if server is None:  # the file name without .gguf: the README's model id
                    llama = Llama(smollm2_path, n_ctx=1024, n_threads=2, n_seq_max=2)
                    server = stack.enter_context(running_server(llama,
                                                                model_id=smollm2_path.stem))
                block = block.replace(SERVER_URL, server.v1)
            exec(compile(block, "README.md", "exec"), {})  # noqa: S102  (the README's own code)
    assert server is not None, "no README example talks to alpaca-server"
    assert "Paris" in out.getvalue()
