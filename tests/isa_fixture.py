"""Run a test once per ISA this machine has, forcing it like ALPACA_CPU_ISA does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import alpaca_cpu

ISAS = alpaca_cpu.available_isas()


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    before = alpaca_cpu.active_isa()
    alpaca_cpu.set_isa(request.param)
    yield request.param
    alpaca_cpu.set_isa(before)
