"""What the converter adds to the engine's ModelConfig: range checks on hyper-parameters read
from a checkpoint, the tensors they imply in numpy order, and their typed GGUF entries."""

from __future__ import annotations

from alpaca_cpu.config import ModelConfig
from alpaca_cpu.gguf_file import (
    MAX_CONTEXT,
    MAX_DIM,
    MAX_FFN,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_RMS_EPS,
    MAX_ROPE_BASE,
    MAX_VOCAB,
    expected_tensor_shapes,
)

from . import metadata as kv
from .errors import ConvertError

# The engine's sanity bounds, so that a lying config cannot make us plan absurd tensors.
_LIMITS = {"dim": MAX_DIM, "n_layers": MAX_LAYERS, "n_heads": MAX_HEADS, "n_kv_heads": MAX_HEADS,
           "head_dim": MAX_HEAD_DIM, "ffn_dim": MAX_FFN, "n_vocab": MAX_VOCAB,
           "context_length": MAX_CONTEXT}


def check_config(config: ModelConfig, where: str) -> ModelConfig:
    """Refuse values no LLaMA has; `where` names the file they came from."""
    for name, hi in _LIMITS.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
            raise ConvertError(f"{where}: {name} = {value!r}, expected an integer in [1, {hi}]")
    if config.n_heads % config.n_kv_heads:
        raise ConvertError(f"{where}: {config.n_kv_heads} key/value heads do not divide "
                           f"{config.n_heads} attention heads")
    if config.head_dim % 2:
        raise ConvertError(f"{where}: head size {config.head_dim} is odd, RoPE needs it even")
    if not (0.0 < config.rms_eps < MAX_RMS_EPS):
        raise ConvertError(f"{where}: RMS norm epsilon {config.rms_eps!r}, "
                           f"expected in (0, {MAX_RMS_EPS:g})")
    if not (0.0 < config.rope_base < MAX_ROPE_BASE):
        raise ConvertError(f"{where}: RoPE base {config.rope_base!r}, "
                           f"expected in (0, {MAX_ROPE_BASE:g})")
    return config


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape (out_features, in_features), in the order we write.

    The engine's own table (GGUF order, contiguous length first), reversed: one source of truth
    for what a llama file holds.
    """
    return {name: tuple(reversed(shape)) for name, shape in expected_tensor_shapes(config).items()}


def config_metadata(config: ModelConfig) -> list[kv.KeyValue]:
    """The `llama.*` keys llama.cpp and our engine read: integers as UINT32, floats as FLOAT32."""
    return [kv.string(key, value) if isinstance(value, str)
            else kv.f32(key, value) if isinstance(value, float) else kv.u32(key, value)
            for key, value in config.to_metadata().items()]
