"""Which GGML type each tensor gets for an --outtype: llama-quantize's choices, as data.

An --outtype names a mix (llama.cpp's "file type"): the type most matrices get, the type of the
output matrix, and a few rules that give chosen matrices more bits. The rules are llama.cpp's
(`llama_tensor_get_type` in src/llama-quant.cpp, read at ggml 0c1e570), for the LLaMA
architecture without experts and without an importance matrix:

1. Norms (1-D tensors) stay F32. f32 / f16 mixes: every matrix in that type.
2. The output matrix (or token_embd when it doubles as the output) gets the mix's output type
   (Q6_K for every quantized mix but q8_0), except Q8_0 when its rows are not whole blocks of
   the mix's main type.
3. Otherwise the first rule of the mix whose role (attn_v, ffn_down, ...) and layer condition
   match picks the type; no rule: the mix's main type.
4. llama.cpp's "70B" LLaMA (80 layers, grouped-query attention) gets Q5_K for attn_v where the
   mix would give it Q3_K or Q4_K.
5. A type whose block does not divide the row length falls back (FALLBACK: Q4_K -> Q5_0, ...);
   a row that is not whole blocks of that either, or of a type without a fallback, stays F16.

A new mix is a row of MIXES; a new type only needs its fallback here. Whether this build can
quantize a type is the engine's type table's business (`quantizer_missing`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F
from gguf.constants import GGML_QUANT_SIZES

from alpaca_cpu import _core
from alpaca_cpu.config import ModelConfig

from .hparams import tensor_shapes

# A layer condition: (layer index, layer count, query heads per KV head) -> does the rule apply.
Condition = Callable[[int, int, int], bool]


def always(i: int, n: int, gqa: int) -> bool:
    return True


def more_bits(i: int, n: int, gqa: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third
    layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def first_eighth(i: int, n: int, gqa: int) -> bool:
    return i < n // 8


def first_sixteenth(i: int, n: int, gqa: int) -> bool:
    return i < n // 16


def first_layers(k: int) -> Condition:
    def cond(i: int, n: int, gqa: int) -> bool:
        return i < k
    cond.__name__ = f"first_{k}_layers"
    return cond


def gqa_at_least_4(i: int, n: int, gqa: int) -> bool:
    return gqa >= 4


@dataclass(frozen=True)
class Rule:
    role: str  # the GGUF name of a layer's matrix: attn_v, ffn_down, attn_output, ...
    type: T
    when: Condition = always


@dataclass(frozen=True)
class Mix:
    file_type: F  # general.file_type
    main: T  # what a matrix gets when no rule says otherwise
    output: T | None = None  # the output matrix (and a tied token_embd); None: main
    rules: tuple[Rule, ...] = ()  # the first that matches wins


MIXES: dict[str, Mix] = {
    "f32": Mix(F.ALL_F32, T.F32),
    "f16": Mix(F.MOSTLY_F16, T.F16),
    "q8_0": Mix(F.MOSTLY_Q8_0, T.Q8_0),
    "q4_0": Mix(F.MOSTLY_Q4_0, T.Q4_0, T.Q6_K),
    "q4_1": Mix(F.MOSTLY_Q4_1, T.Q4_1, T.Q6_K),
    "q5_0": Mix(F.MOSTLY_Q5_0, T.Q5_0, T.Q6_K),
    "q5_1": Mix(F.MOSTLY_Q5_1, T.Q5_1, T.Q6_K),
    "iq4_nl": Mix(F.MOSTLY_IQ4_NL, T.IQ4_NL, T.Q6_K, (
        Rule("attn_v", T.Q5_K, gqa_at_least_4),
        Rule("ffn_down", T.Q5_K, first_eighth))),
    "q2_k": Mix(F.MOSTLY_Q2_K, T.Q2_K, T.Q6_K, (
        Rule("attn_v", T.Q4_K, gqa_at_least_4),
        Rule("attn_v", T.Q3_K),
        Rule("ffn_down", T.Q3_K),
        Rule("attn_output", T.Q3_K))),
    "q3_k_m": Mix(F.MOSTLY_Q3_K_M, T.Q3_K, T.Q6_K, (
        Rule("attn_v", T.Q5_K, first_layers(2)),
        Rule("attn_v", T.Q4_K),
        Rule("ffn_down", T.Q5_K, first_sixteenth),
        Rule("ffn_down", T.Q4_K),
        Rule("attn_output", T.Q4_K))),
    "q4_k_s": Mix(F.MOSTLY_Q4_K_S, T.Q4_K, T.Q6_K, (
        Rule("attn_v", T.Q5_K, first_layers(4)),
        Rule("ffn_down", T.Q5_K, first_eighth))),
    "q4_k_m": Mix(F.MOSTLY_Q4_K_M, T.Q4_K, T.Q6_K, (
        Rule("attn_v", T.Q6_K, more_bits),
        Rule("ffn_down", T.Q6_K, more_bits))),
    "q5_k_s": Mix(F.MOSTLY_Q5_K_S, T.Q5_K, T.Q6_K),
    "q5_k_m": Mix(F.MOSTLY_Q5_K_M, T.Q5_K, T.Q6_K, (
        Rule("attn_v", T.Q6_K, more_bits),
        Rule("ffn_down", T.Q6_K, more_bits))),
    "q6_k": Mix(F.MOSTLY_Q6_K, T.Q6_K, T.Q6_K),
}
OUTTYPES = tuple(MIXES)

# Where a row is not whole blocks of a type: the type llama.cpp uses instead.
FALLBACK: dict[T, T] = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1,
                        T.Q6_K: T.Q8_0}
# llama.cpp's 70B LLaMA (its model type LLM_TYPE_70B): attn_v one step up from these.
LLAMA_70B_ATTN_V: dict[T, T] = {T.Q3_K: T.Q5_K, T.Q4_K: T.Q5_K}
_UNQUANTIZED = (T.F32, T.F16)


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


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


def _role(name: str) -> tuple[str, int]:
    """(role, layer index): ("attn_v", 3) for blk.3.attn_v.weight, ("output", -1) ..."""
    parts = name.split(".")
    if parts[0] == "blk":
        return parts[2], int(parts[1])
    return parts[0], -1


def _fallback(t: T, cols: int) -> T:
    if t in _UNQUANTIZED or cols % block_size(t) == 0:
        return t
    t = FALLBACK.get(t, T.F16)
    return t if t in _UNQUANTIZED or cols % block_size(t) == 0 else T.F16


def tensor_type(name: str, shape: tuple[int, ...], mix: Mix, config: ModelConfig) -> T:
    if len(shape) == 1:
        return T.F32
    if mix.main in _UNQUANTIZED:
        return mix.main
    cols = shape[-1]
    role, layer = _role(name)
    if role == "output" or (config.tied_embeddings and role == "token_embd"):
        qtype = T.Q8_0 if cols % block_size(mix.main) else (mix.output or mix.main)
    else:
        gqa = config.n_heads // config.n_kv_heads
        qtype = next((r.type for r in mix.rules
                      if r.role == role and r.when(layer, config.n_layers, gqa)), mix.main)
        if role == "attn_v" and config.n_layers == 80 and config.n_kv_heads != config.n_heads:
            qtype = LLAMA_70B_ATTN_V.get(qtype, qtype)
    return _fallback(qtype, cols)


def plan(config: ModelConfig, outtype: str) -> list[PlannedTensor]:
    """Every tensor of the model, in the order written, with the type the mix gives it."""
    mix = MIXES[outtype]
    return [PlannedTensor(name, shape, tensor_type(name, shape, mix, config))
            for name, shape in tensor_shapes(config).items()]


def quantizable() -> frozenset[T]:
    """The weight types this build's engine can make: the rows of its native type table (the
    one `_core.quantize` reads; alpaca_cpu.ggml_types mirrors it)."""
    return frozenset(T(row["id"]) for row in _core.type_traits() if row["is_weight"])


def quantizer_missing(tensors: list[PlannedTensor]) -> list[T]:
    """The planned types this build's engine cannot make."""
    return sorted({t.type for t in tensors} - quantizable())
