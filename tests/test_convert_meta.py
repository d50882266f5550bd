"""convert-weights on Meta checkpoints (params.json + consolidated.NN.pth): one shard and two
shards give identical tensors, equal to the Hugging Face conversion of the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from alpaca_convert import convert
from hf_tiny import TinyConfig, save_hf, save_meta, tiny_llama, train_spm

import alpaca_cpu
from alpaca_cpu.gguf_file import open_model_file

F32_RTOL = 1e-5  # as in test_convert_hf.py: only summation order differs


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model")


def tensors_equal(a: Path, b: Path) -> None:
    ta, tb = open_model_file(a).tensors, open_model_file(b).tensors
    assert ta.keys() == tb.keys()
    for name, t in ta.items():
        assert t.type == tb[name].type, name
        assert np.array_equal(t.data, tb[name].data), name


@pytest.mark.parametrize("outtype", ["f32", "q4_0"])
def test_one_and_two_shards_give_identical_tensors(outtype: str, spm_model: Path,
                                                   tmp_path: Path) -> None:
    model = tiny_llama(TinyConfig(n_kv_heads=2, seed=3))
    one = save_meta(model, tmp_path / "one", 1, spm_model)
    two = save_meta(model, tmp_path / "two", 2, spm_model)
    hf = save_hf(model, tmp_path / "hf", spm_model=spm_model)
    # the shards really are split: half the rows of wq, half the columns of wo and the embedding
    shard = torch.load(two / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].shape == (32, 64)
    assert shard["layers.0.attention.wo.weight"].shape == (64, 32)
    assert shard["tok_embeddings.weight"].shape == (384, 32)
    for name, folder in (("one", one), ("two", two), ("hf", hf)):
        convert(folder, tmp_path / f"{name}.gguf", outtype=outtype)
    tensors_equal(tmp_path / "one.gguf", tmp_path / "two.gguf")
    tensors_equal(tmp_path / "one.gguf", tmp_path / "hf.gguf")  # the RoPE row order agrees
    md = open_model_file(tmp_path / "two.gguf").metadata
    assert md["tokenizer.ggml.model"] == "llama"
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert md["llama.context_length"] == 4096  # norm_eps 1e-5: a Llama 2 checkpoint
    if outtype == "f32":
        tokens = [1, 45, 200, 3, 77, 12]
        with torch.no_grad():
            ref = model(torch.tensor([tokens])).logits[0].numpy()
        ours = alpaca_cpu.Model(tmp_path / "two.gguf", n_ctx=32, kv_type="f32").forward(
            tokens, all_logits=True)
        assert np.abs(ours - ref).max() / np.abs(ref).max() <= F32_RTOL


def test_meta_release_layout_with_llama1_params(spm_model: Path, tmp_path: Path) -> None:
    """LLaMA-1 as released: tokenizer.model one level up, vocab_size -1, no n_kv_heads."""
    model = tiny_llama(TinyConfig(seed=4))
    folder = save_meta(model, tmp_path / "llama" / "7B", 2, spm_model)
    (folder / "tokenizer.model").rename(tmp_path / "llama" / "tokenizer.model")
    params = json.loads((folder / "params.json").read_text())
    params |= {"vocab_size": -1, "norm_eps": 1e-6}
    del params["n_kv_heads"], params["rope_theta"]
    (folder / "params.json").write_text(json.dumps(params))
    convert(folder, tmp_path / "m.gguf", outtype="f32")
    mf = open_model_file(tmp_path / "m.gguf")
    assert mf.config.n_vocab == 384 and mf.config.n_kv_heads == 4
    assert mf.config.context_length == 2048 and mf.config.rope_base == 10000.0
    assert len(mf.metadata["tokenizer.ggml.tokens"]) == 384
