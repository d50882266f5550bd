"""LLaMA hyper-parameters as the converter sees them, and the GGUF tensors they imply."""

from __future__ import annotations

from dataclasses import dataclass

from alpaca_cpu.config import ModelConfig
from alpaca_cpu.gguf_file import expected_tensor_shapes

from . import metadata as kv
from .errors import ConvertError

# Far above any real LLaMA; low enough that a lying config cannot make us plan absurd tensors.
_LIMITS = {"dim": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
           "head_dim": 1024, "ffn_dim": 1 << 20, "n_vocab": 1 << 22, "context_length": 1 << 24}


@dataclass(frozen=True)
class LlamaParams:
    """Hyper-parameters of a LLaMA-family checkpoint (names follow the engine's ModelConfig)."""

    n_vocab: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rms_eps: float
    rope_base: float
    context_length: int
    tied_embeddings: bool

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def check(self, where: str) -> LlamaParams:
        """Refuse values no LLaMA has; `where` names the file they came from."""
        for name, hi in _LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise ConvertError(f"{where}: {name} = {value!r}, expected an integer in [1, {hi}]")
        if self.n_heads % self.n_kv_heads:
            raise ConvertError(f"{where}: {self.n_kv_heads} key/value heads do not divide "
                               f"{self.n_heads} attention heads")
        if self.head_dim % 2:
            raise ConvertError(f"{where}: head size {self.head_dim} is odd, RoPE needs it even")
        if not (0.0 < self.rms_eps < 1.0):
            raise ConvertError(f"{where}: RMS norm epsilon {self.rms_eps!r}, expected in (0, 1)")
        if not (0.0 < self.rope_base < 1e12):
            raise ConvertError(f"{where}: RoPE base {self.rope_base!r}, expected in (0, 1e12)")
        return self

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name -> numpy shape (out_features, in_features), in the order we write.

        The engine's own table (GGUF order, contiguous length first), reversed: one source of
        truth for what a llama file holds.
        """
        config = ModelConfig(
            n_vocab=self.n_vocab, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, ffn_dim=self.ffn_dim,
            n_rot=self.head_dim, rope_base=self.rope_base, rms_eps=self.rms_eps,
            context_length=self.context_length, tied_embeddings=self.tied_embeddings)
        return {name: tuple(reversed(shape))
                for name, shape in expected_tensor_shapes(config).items()}

    def n_params(self) -> int:
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def metadata(self) -> list[kv.KeyValue]:
        """The `llama.*` keys llama.cpp and our engine read."""
        entries = [
            kv.u32("llama.vocab_size", self.n_vocab),
            kv.u32("llama.context_length", self.context_length),
            kv.u32("llama.embedding_length", self.dim),
            kv.u32("llama.block_count", self.n_layers),
            kv.u32("llama.feed_forward_length", self.ffn_dim),
            kv.u32("llama.rope.dimension_count", self.head_dim),
            kv.u32("llama.attention.head_count", self.n_heads),
            kv.u32("llama.attention.head_count_kv", self.n_kv_heads),
            kv.f32("llama.attention.layer_norm_rms_epsilon", self.rms_eps),
            kv.f32("llama.rope.freq_base", self.rope_base),
        ]
        if self.head_dim * self.n_heads != self.dim:  # readers assume dim / n_heads otherwise
            entries += [kv.u32("llama.attention.key_length", self.head_dim),
                        kv.u32("llama.attention.value_length", self.head_dim)]
        return entries
