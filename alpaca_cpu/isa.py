"""Kernel ISA selection: the best this CPU has, or a lower one forced by ALPACA_CPU_ISA."""

from __future__ import annotations

import os

from . import _core

ENV_VAR = "ALPACA_CPU_ISA"


def available_isas() -> list[str]:
    """ISAs this build can run on this CPU, lowest first."""
    return list(_core.available_isas())


def set_isa(name: str) -> None:
    """Use `name`'s kernels for models created from now on (ValueError if unavailable)."""
    _core.set_active_isa(name)


def active_isa() -> str:
    return _core.active_isa()


def select_from_environment() -> None:
    """Apply ALPACA_CPU_ISA, once, at import."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return
    try:
        set_isa(name)
    except ValueError as e:
        raise ImportError(f"{ENV_VAR}={name!r}: {e}") from None
