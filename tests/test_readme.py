"""The README's Python examples run as written."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
from conftest import REPO


def python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.real_model
def test_readme_python_examples_run(smollm2_path) -> None:
    blocks = python_blocks()
    assert len(blocks) >= 2
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {})  # noqa: S102  (the README's own code)
    assert "Paris" in out.getvalue()
