"""Which GGML type each tensor gets for an --outtype, following llama.cpp's defaults.

- Norms (1-D) stay F32.
- f32 / f16 / q8_0: every matrix in that type (what convert_hf_to_gguf.py writes).
- q4_0 / q4_1: every matrix in that type, except the output projection (or the token embedding
  when it doubles as output), which llama-quantize keeps at higher precision: Q6_K there, Q8_0
  when the row length is not a multiple of 256. We have no K-quants yet, so we use Q8_0 always.
- A quantized type needs rows in whole 32-blocks; otherwise F16 (as convert_hf_to_gguf.py does).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType
from gguf.constants import GGML_QUANT_SIZES

from alpaca_cpu.ggml_types import BLOCK_WEIGHT_TYPES as _QUANTIZED

OUTTYPES: dict[str, T] = {"f32": T.F32, "f16": T.F16, "q4_0": T.Q4_0, "q4_1": T.Q4_1,
                          "q8_0": T.Q8_0}
FILE_TYPES: dict[T, LlamaFileType] = {
    T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16,
    T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    T.Q8_0: LlamaFileType.MOSTLY_Q8_0,
}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, cols) or (n,)
    type: T

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return self.n_elements // block * size


def tensor_type(name: str, shape: tuple[int, ...], outtype: T, tied: bool) -> T:
    if len(shape) == 1:
        return T.F32
    qtype = outtype
    if outtype in (T.Q4_0, T.Q4_1) and (
            name == "output.weight" or (tied and name == "token_embd.weight")):
        qtype = T.Q8_0  # llama.cpp: Q6_K (a K-quant we do not have yet)
    if qtype in _QUANTIZED and shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = T.F16
    return qtype


def plan(shapes: dict[str, tuple[int, ...]], outtype: T, tied: bool) -> list[PlannedTensor]:
    return [PlannedTensor(name, shape, tensor_type(name, shape, outtype, tied))
            for name, shape in shapes.items()]
