"""The GGML types the engine knows: the Python mirror of the native traits table
(csrc/ggml_types.cpp, exposed as `_core.type_traits()`; tests/test_ggml_types.py holds the two
equal row by row).

One row per type: what a reader, converter or test needs to know about it, with its numpy twins
(alpaca_cpu/quants.py) to and from float. A new type is a row here and in the native table,
plus its kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from . import kquants, quants


@dataclass(frozen=True)
class TypeTraits:
    id: int                # value of enum ggml_type
    name: str              # GGML's name: "Q4_0", "F16", ...
    block_size: int        # elements per block (1 for F32/F16)
    type_size: int         # bytes per block
    is_block: bool         # quantized in blocks: rows must be whole blocks
    is_weight: bool        # may be a weight matrix (Q8_1, Q8_K: activation formats only)
    vec_dot_type: int      # the activation format a weight row of this type multiplies with
    # numpy twins: (rows, cols) float32 -> (rows, row_bytes) uint8, and (blocks, type_size)
    # uint8 -> (blocks, block_size) float32
    from_float: Callable[[np.ndarray], np.ndarray]
    to_float: Callable[[np.ndarray], np.ndarray]

    @property
    def gguf_type(self) -> GGMLQuantizationType | None:
        """The gguf package's enum member, or None for a type it does not list as a file type."""
        try:
            return GGMLQuantizationType(self.id)
        except ValueError:
            return None


F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 = 0, 1, 2, 3, 6, 7, 8, 9
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ4_NL = 10, 11, 12, 13, 14, 15, 20
QK_K = 256  # weights per super-block of the K-quants and Q8_K

TYPES: dict[int, TypeTraits] = {t.id: t for t in (
    TypeTraits(F32, "F32", 1, 4, False, True, F32, quants.from_float_f32, quants.to_float_f32),
    TypeTraits(F16, "F16", 1, 2, False, True, F32, quants.from_float_f16, quants.to_float_f16),
    TypeTraits(Q4_0, "Q4_0", 32, 18, True, True, Q8_0, quants.from_float_q4_0,
               quants.to_float_q4_0),
    TypeTraits(Q4_1, "Q4_1", 32, 20, True, True, Q8_1, quants.from_float_q4_1,
               quants.to_float_q4_1),
    TypeTraits(Q5_0, "Q5_0", 32, 22, True, True, Q8_0, quants.from_float_q5_0,
               quants.to_float_q5_0),
    TypeTraits(Q5_1, "Q5_1", 32, 24, True, True, Q8_1, quants.from_float_q5_1,
               quants.to_float_q5_1),
    TypeTraits(Q8_0, "Q8_0", 32, 34, True, True, Q8_0, quants.from_float_q8_0,
               quants.to_float_q8),
    TypeTraits(Q8_1, "Q8_1", 32, 36, True, False, Q8_1, quants.from_float_q8_1,
               quants.to_float_q8),
    TypeTraits(Q2_K, "Q2_K", QK_K, 84, True, True, Q8_K, kquants.from_float_q2_k,
               kquants.to_float_q2_k),
    TypeTraits(Q3_K, "Q3_K", QK_K, 110, True, True, Q8_K, kquants.from_float_q3_k,
               kquants.to_float_q3_k),
    TypeTraits(Q4_K, "Q4_K", QK_K, 144, True, True, Q8_K, kquants.from_float_q4_k,
               kquants.to_float_q4_k),
    TypeTraits(Q5_K, "Q5_K", QK_K, 176, True, True, Q8_K, kquants.from_float_q5_k,
               kquants.to_float_q5_k),
    TypeTraits(Q6_K, "Q6_K", QK_K, 210, True, True, Q8_K, kquants.from_float_q6_k,
               kquants.to_float_q6_k),
    TypeTraits(Q8_K, "Q8_K", QK_K, 292, True, False, Q8_K, quants.from_float_q8_k,
               quants.to_float_q8_k),
    TypeTraits(IQ4_NL, "IQ4_NL", 32, 18, True, True, Q8_0, quants.from_float_iq4_nl,
               quants.to_float_iq4_nl),
)}

# The types a model file's tensors may have.
WEIGHT_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    GGMLQuantizationType(t.id) for t in TYPES.values() if t.is_weight)
# Of those, the ones quantized in blocks.
BLOCK_WEIGHT_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    GGMLQuantizationType(t.id) for t in TYPES.values() if t.is_weight and t.is_block)


def traits(type_id: int) -> TypeTraits:
    """The row of a type id; ValueError naming the id if the engine does not know it."""
    t = TYPES.get(int(type_id))
    if t is None:
        known = ", ".join(t.name for t in TYPES.values())
        raise ValueError(f"unsupported GGML type id {int(type_id)} (supported: {known})")
    return t
