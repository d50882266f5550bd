"""The converter's view of hyper-parameters is the engine's ModelConfig: its `llama.*` keys read
back to the same config, and the converter's range checks are the engine's bounds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from alpaca_convert import ConvertError
from alpaca_convert.hparams import check_config, config_metadata, tensor_shapes
from gguf import GGUFValueType

from alpaca_cpu import gguf_file
from alpaca_cpu.config import ModelConfig

BASE = ModelConfig(n_vocab=384, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   ffn_dim=192, n_rot=16, rope_base=50000.0, rms_eps=1e-5, context_length=256,
                   tied_embeddings=False)


@pytest.mark.parametrize("config", [
    BASE,
    dataclasses.replace(BASE, tied_embeddings=True),
    dataclasses.replace(BASE, head_dim=32, n_rot=32),  # q_dim != dim: key_length is written
], ids=["untied", "tied", "head-dim-not-dim-over-heads"])
def test_metadata_reads_back_to_the_same_config(config: ModelConfig) -> None:
    md = {e.key: e.value for e in config_metadata(config)}
    assert ("llama.attention.key_length" in md) == (config.q_dim != config.dim)
    names = set(tensor_shapes(config))
    assert ("output.weight" in names) == (not config.tied_embeddings)
    read = gguf_file._config_from_metadata(Path("m.gguf"), md | {"general.architecture": "llama"},
                                           names)
    assert read == config


def test_metadata_types() -> None:
    types = {e.key: e.type for e in config_metadata(BASE)}
    assert types["llama.rope.freq_base"] == GGUFValueType.FLOAT32
    assert types["llama.attention.layer_norm_rms_epsilon"] == GGUFValueType.FLOAT32
    assert {k for k, t in types.items() if t == GGUFValueType.UINT32} == set(types) - {
        "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"}


@pytest.mark.parametrize("field, limit", [
    ("dim", gguf_file.MAX_DIM), ("n_layers", gguf_file.MAX_LAYERS),
    ("n_heads", gguf_file.MAX_HEADS), ("head_dim", gguf_file.MAX_HEAD_DIM),
    ("ffn_dim", gguf_file.MAX_FFN), ("n_vocab", gguf_file.MAX_VOCAB),
])
def test_checks_use_the_engine_bounds(field: str, limit: int) -> None:
    """At the engine's bound a value passes; one above it is refused, naming the bound."""
    at_limit = dataclasses.replace(BASE, **{field: limit})
    if field == "n_heads":
        at_limit = dataclasses.replace(at_limit, n_kv_heads=limit)
    check_config(at_limit, "config.json")
    with pytest.raises(ConvertError, match=rf"^config.json: {field} = {limit + 1}, expected an "
                                           rf"integer in \[1, {limit}\]$"):
        check_config(dataclasses.replace(BASE, **{field: limit + 1}), "config.json")
