"""Typed GGUF key/value entries, so every source hands the writer the same thing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gguf import GGUFValueType as V


@dataclass(frozen=True)
class KeyValue:
    """One GGUF metadata entry with its on-disk type (and element type for arrays)."""

    key: str
    value: Any
    type: V
    sub_type: V | None = None


def u32(key: str, value: int) -> KeyValue:
    return KeyValue(key, int(value), V.UINT32)


def i32(key: str, value: int) -> KeyValue:
    return KeyValue(key, int(value), V.INT32)


def f32(key: str, value: float) -> KeyValue:
    return KeyValue(key, float(value), V.FLOAT32)


def boolean(key: str, value: bool) -> KeyValue:
    return KeyValue(key, bool(value), V.BOOL)


def string(key: str, value: str) -> KeyValue:
    return KeyValue(key, str(value), V.STRING)


def array(key: str, values: Sequence[Any], sub_type: V) -> KeyValue:
    return KeyValue(key, list(values), V.ARRAY, sub_type)


def general(name: str, source_url: str | None = None) -> list[KeyValue]:
    """`general.*` keys for a converted checkpoint (architecture is added by the writer)."""
    entries = [string("general.type", "model"), string("general.name", name)]
    if source_url:
        entries.append(string("general.source.url", source_url))
    return entries
