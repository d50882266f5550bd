"""RoPE scaling read from checkpoints, turned into what GGUF files carry.

Llama 3.1+ ("llama3" scaling) stretches the low frequencies of RoPE: the converter writes one
divisor per frequency as the tensor `rope_freqs.weight`, computed as llama.cpp's
convert_hf_to_gguf computes it (float32 frequencies), so the files are the same.
"""

from __future__ import annotations

import math

import numpy as np


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
