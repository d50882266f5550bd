"""RoPE scaling read from checkpoints, turned into what GGUF files carry.

Llama 3.1+ ("llama3" scaling) stretches the low frequencies of RoPE: the converter writes one
divisor per frequency as the tensor `rope_freqs.weight`, computed as llama.cpp's
convert_hf_to_gguf computes it (float32 frequencies), so the files are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from alpaca_cpu.gguf_file import MAX_ROPE_SCALING, ROPE_FREQS

from .errors import ConvertError

__all__ = ["ROPE_FREQS", "Llama3Scaling", "llama3_rope_freqs", "llama3_scaling", "rope_scaling"]


def llama3_rope_freqs(rope_base: float, head_dim: int, factor: float, low_freq_factor: float,
                      high_freq_factor: float, original_context: int) -> np.ndarray:
    """(head_dim / 2) float32 divisors of the RoPE angle of each frequency.

    Wavelengths shorter than original_context / high_freq_factor keep their frequency (1);
    longer than original_context / low_freq_factor are slowed by `factor`; in between the
    divisor moves smoothly from one to the other.
    """
    # 1 / base^(2i/d) in float32 as torch computes it (a correctly rounded power; the same bits
    # for Llama 3's shapes, within an ulp elsewhere)
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    freqs = np.float32(1.0) / (np.float64(rope_base) ** exponents.astype(np.float64)).astype(
        np.float32)
    short_wave = original_context / high_freq_factor
    long_wave = original_context / low_freq_factor
    one = np.float32(1.0)
    out = []
    for freq in freqs:
        # float32 throughout; `a / tensor` in torch is reciprocal(tensor) * a
        wavelen = one / freq * np.float32(2 * math.pi)
        if wavelen < short_wave:
            out.append(1.0)
        elif wavelen > long_wave:
            out.append(factor)
        else:
            smooth = (one / wavelen * np.float32(original_context) - np.float32(low_freq_factor)) \
                / np.float32(high_freq_factor - low_freq_factor)
            out.append(one / ((one - smooth) / np.float32(factor) + smooth))
    return np.array(out, dtype=np.float32)


def _number(where: str, key: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not lo < value < hi:
        raise ConvertError(f"{where}: RoPE scaling '{key}' = {value!r}, expected a number in "
                           f"({lo:g}, {hi:g})")
    return float(value)


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1+ RoPE scaling parameters (Hugging Face `rope_type: llama3`, Meta
    `use_scaled_rope`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192

    def rope_freqs(self, rope_base: float, head_dim: int) -> np.ndarray:
        return llama3_rope_freqs(rope_base, head_dim, self.factor, self.low_freq_factor,
                                 self.high_freq_factor, self.original_context)


def llama3_scaling(where: str, entry: dict[str, Any], names: dict[str, str] | None = None,
                   ) -> Llama3Scaling:
    """Llama3Scaling from a config entry (Hugging Face key names, or `names` mapping ours to the
    entry's), defaults where a key is absent, each value checked."""
    keys = {"factor": "factor", "low_freq_factor": "low_freq_factor",
            "high_freq_factor": "high_freq_factor",
            "original_context": "original_max_position_embeddings"} | (names or {})
    d = Llama3Scaling()
    factor = _number(where, keys["factor"], entry.get(keys["factor"], d.factor), 0.0,
                     MAX_ROPE_SCALING)
    low = _number(where, keys["low_freq_factor"],
                  entry.get(keys["low_freq_factor"], d.low_freq_factor), 0.0, 1e6)
    high = _number(where, keys["high_freq_factor"],
                   entry.get(keys["high_freq_factor"], d.high_freq_factor), low, 1e6)
    context = entry.get(keys["original_context"], d.original_context)
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ConvertError(f"{where}: RoPE scaling '{keys['original_context']}' = {context!r}, "
                           "expected a positive integer")
    return Llama3Scaling(factor, low, high, context)


def rope_scaling(where: str, scaling: dict[str, Any]) -> tuple[float, Llama3Scaling | None]:
    """(linear factor, Llama 3 scaling or None) for a Hugging Face `rope_scaling` /
    `rope_parameters` entry, as llama.cpp's converter turns it into a GGUF file: "llama3"
    becomes rope_freqs.weight, "linear" the `llama.rope.scaling.*` keys; no type or "default"
    is plain RoPE. Other types (YaRN, dynamic NTK, LongRoPE) are refused."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return 1.0, None
    if kind == "linear":
        return _number(where, "factor", scaling.get("factor"), 0.0, MAX_ROPE_SCALING), None
    if kind == "llama3":
        return 1.0, llama3_scaling(where, scaling)
    raise ConvertError(f"{where}: RoPE scaling {kind!r} is not supported (plain, 'linear' and "
                       "'llama3' are)")
