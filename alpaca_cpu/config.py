"""Model hyper-parameters as data (one dataclass; sizes derived, never stored twice)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a LLaMA-family model, read from GGUF `llama.*` metadata."""

    n_vocab: int
    dim: int  # embedding length
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads for grouped-query attention
    head_dim: int
    ffn_dim: int  # feed-forward hidden size
    n_rot: int  # rotary dimensions per head (== head_dim for LLaMA)
    rope_base: float
    rms_eps: float
    context_length: int  # the context the model was trained with
    tied_embeddings: bool  # True when there is no output.weight and token_embd is reused
    # llama.cpp's linear RoPE scaling ('llama.rope.scaling.type' = linear): positions are divided
    # by this factor (1.0: none).
    rope_scaling_factor: float = 1.0
    # A rope_freqs.weight tensor (n_rot / 2 F32 values, Llama-3 RoPE scaling): the angle of
    # frequency i is divided by value i (docs/design.md, decision 4).
    has_rope_freqs: bool = False

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def kv_cache_bytes(self, n_ctx: int, kv_f16: bool = True) -> int:
        """Bytes of the K and V caches for n_ctx positions."""
        return 2 * self.n_layers * n_ctx * self.kv_dim * (2 if kv_f16 else 4)

    def to_metadata(self) -> dict[str, int | float | str]:
        """The GGUF `llama.*` keys that describe this config (what gguf_file reads back)."""
        md: dict[str, int | float | str] = {
            "llama.vocab_size": self.n_vocab,
            "llama.context_length": self.context_length,
            "llama.embedding_length": self.dim,
            "llama.block_count": self.n_layers,
            "llama.feed_forward_length": self.ffn_dim,
            "llama.rope.dimension_count": self.n_rot,
            "llama.attention.head_count": self.n_heads,
            "llama.attention.head_count_kv": self.n_kv_heads,
            "llama.attention.layer_norm_rms_epsilon": self.rms_eps,
            "llama.rope.freq_base": self.rope_base,
        }
        if self.q_dim != self.dim:  # readers take head size = dim / n_heads otherwise
            md["llama.attention.key_length"] = self.head_dim
            md["llama.attention.value_length"] = self.head_dim
        if self.rope_scaling_factor != 1.0:
            md["llama.rope.scaling.type"] = "linear"
            md["llama.rope.scaling.factor"] = self.rope_scaling_factor
        return md

    def to_hparams(self) -> dict[str, int | float]:
        """The dict the native core's Model constructor takes."""
        d = asdict(self)
        del d["context_length"], d["tied_embeddings"]
        del d["rope_scaling_factor"], d["has_rope_freqs"]  # the core takes rope_divisors()
        return d
