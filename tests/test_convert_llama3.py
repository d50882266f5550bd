"""convert-weights on Llama 3.x and Mistral checkpoints.

- A tiny Hugging Face Llama-3-style model made here (rope_scaling "llama3", rope_theta 500000,
  grouped-query attention, tied and untied embeddings, a Llama-3 tokenizer.json trained here):
  our converted F32 file's logits equal transformers' over 100 positions, where the scaling
  matters; rope_freqs.weight is what transformers divides its frequencies by.
- linear rope_scaling becomes llama.cpp's `llama.rope.scaling.*` keys, same logits.
- A tiny MistralForCausalLM folder with a Mistral v3 SentencePiece tokenizer converts the same way.
- A Meta Llama 3.1 folder (params.json with use_scaled_rope, tiktoken tokenizer.model) gives the
  same file as the Hugging Face folder of the same weights.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from alpaca_convert import convert
from conftest import DATA_DIR
from hf_tiny import save_meta
from llama3_mistral_vocab import LLAMA3_SPECIAL, train_llama3_bpe
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import alpaca_cpu
from alpaca_cpu.gguf_file import open_model_file
from alpaca_cpu.tokenizer import Tokenizer
from alpaca_cpu.tokenizer_bpe import byte_level_to_bytes

# Largest |logit difference| / largest |logit| between our engine on the converted F32 file
# and transformers on the checkpoint (float32 weights and KV cache in both; only summation
# order differs, measured ~1e-6). Plain RoPE instead of Llama 3's scaling gives ~0.3.
F32_RTOL = 1e-4
N_POSITIONS = 100
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights at a scale that gives peaked logits (the library's init gives all ~0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model.eval()


def llama3_folder(folder: Path, tied: bool, rope_scaling: dict | None = LLAMA3_SCALING,
                  seed: int = 0, extra_rows: int = 0) -> tuple[Path, LlamaForCausalLM]:
    """extra_rows: embedding rows past the tokenizer's tokens (Meta's reserved specials)."""
    folder.mkdir(parents=True)
    train_llama3_bpe(folder / "tokenizer.json")
    n_vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]) \
        + len(LLAMA3_SPECIAL)
    config = LlamaConfig(
        vocab_size=n_vocab + extra_rows, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=rope_scaling, max_position_embeddings=256,
        tie_word_embeddings=tied, bos_token_id=n_vocab - 8, eos_token_id=n_vocab - 4)
    torch.manual_seed(seed)
    model = randomize(LlamaForCausalLM(config), seed)
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": (DATA_DIR / "chat_templates" / "Llama-3.1-8B-Instruct.jinja")
        .read_text(encoding="utf-8")}))
    return folder, model


CONVERTED_POSITIONS = [*range(0, N_POSITIONS, 10), N_POSITIONS - 1]


def converted_tokens() -> list[int]:
    """The ids tests/data/rope_scaling_llama_cpp.json has llama.cpp's logits for."""
    return tokens(608)


def tokens(n_vocab: int, n: int = N_POSITIONS) -> list[int]:
    return [int(t) for t in np.random.default_rng(5).integers(0, n_vocab - 8, n)]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def logits_pair(model: torch.nn.Module, path: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = alpaca_cpu.Model(path, n_ctx=128, kv_type="f32").forward(ids, all_logits=True)
    return ours, ref


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama3_logits_match_transformers(tmp_path: Path, tied: bool) -> None:
    folder, model = llama3_folder(tmp_path / "hf", tied)
    convert(folder, tmp_path / "f32.gguf", outtype="f32")
    mf = open_model_file(tmp_path / "f32.gguf")
    assert mf.config.has_rope_freqs and mf.config.rope_base == 500000.0
    assert mf.config.tied_embeddings == tied and mf.config.n_kv_heads == 2
    # rope_freqs.weight: how much transformers slows each frequency
    rotary = model.model.rotary_emb
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    np.testing.assert_allclose(mf.rope_divisors(), (plain / rotary.inv_freq).numpy(), rtol=1e-6)
    assert mf.rope_divisors().max() == 8.0 and mf.rope_divisors().min() == 1.0
    ids = tokens(mf.config.n_vocab)
    ours, ref = logits_pair(model, tmp_path / "f32.gguf", ids)
    assert rel_err(ours, ref) <= F32_RTOL
    # the tokenizer is Llama 3's, with its template and end-of-turn tokens
    assert mf.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    tok = Tokenizer.from_metadata(mf.metadata)
    assert {tok.tokens[i] for i in tok.eog_ids} == {"<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"}
    assert mf.metadata["tokenizer.chat_template"].startswith("{{- bos_token }}")


# llama.cpp keeps K/V in F16 (our default too): ~1e-4 of the largest logit on this model.
LLAMA_CPP_RTOL = 1e-3


def test_converted_file_matches_llama_cpp(tmp_path: Path) -> None:
    """The file convert-weights writes gives llama.cpp's logits (measured once: the file's
    sha256 and llama.cpp's logits are in tests/data/rope_scaling_llama_cpp.json)."""
    ref = json.loads((DATA_DIR / "rope_scaling_llama_cpp.json").read_text())["converted_hf_llama3"]
    folder, _ = llama3_folder(tmp_path / "hf", tied=False)
    convert(folder, tmp_path / "f32.gguf", outtype="f32")
    digest = hashlib.sha256((tmp_path / "f32.gguf").read_bytes()).hexdigest()
    assert digest == ref["sha256"], "the converted file differs from the one llama.cpp ran"
    theirs = np.array(ref["logits"], np.float32)
    ours = alpaca_cpu.Model(tmp_path / "f32.gguf", n_ctx=128).forward(
        converted_tokens(), all_logits=True)[ref["positions"]]
    assert rel_err(ours, theirs) <= LLAMA_CPP_RTOL


def test_plain_rope_would_not_match(tmp_path: Path) -> None:
    """The comparison above can fail: the same weights converted without the scaling differ."""
    folder, model = llama3_folder(tmp_path / "hf", tied=False)
    config = json.loads((folder / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(config.get(key), dict):
            config[key] = {"rope_type": "default", "rope_theta": 500000.0}
    (folder / "config.json").write_text(json.dumps(config))
    convert(folder, tmp_path / "plain.gguf", outtype="f32")
    assert not open_model_file(tmp_path / "plain.gguf").config.has_rope_freqs
    ours, ref = logits_pair(model, tmp_path / "plain.gguf", tokens(config["vocab_size"]))
    assert rel_err(ours, ref) > 100 * F32_RTOL


def test_linear_scaling_converts_to_llama_cpp_keys(tmp_path: Path) -> None:
    folder, model = llama3_folder(tmp_path / "hf", tied=False,
                                  rope_scaling={"rope_type": "linear", "factor": 4.0})
    convert(folder, tmp_path / "f32.gguf", outtype="f32")
    mf = open_model_file(tmp_path / "f32.gguf")
    assert mf.metadata["llama.rope.scaling.type"] == "linear"
    assert mf.metadata["llama.rope.scaling.factor"] == 4.0
    assert not mf.config.has_rope_freqs and mf.config.rope_scaling_factor == 4.0
    ours, ref = logits_pair(model, tmp_path / "f32.gguf", tokens(mf.config.n_vocab))
    assert rel_err(ours, ref) <= F32_RTOL


def test_mistral_folder_converts(tmp_path: Path) -> None:
    folder = tmp_path / "mistral"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((DATA_DIR / "mistral_v3_tiny_tokenizer.model")
                                             .read_bytes())
    config = MistralConfig(
        vocab_size=700, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
        rope_theta=1000000.0, max_position_embeddings=256, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(3)
    model = randomize(MistralForCausalLM(config), 3)
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "chat_template": (DATA_DIR / "chat_templates" / "Mistral-7B-Instruct-v0.3.jinja")
        .read_text(encoding="utf-8")}))
    convert(folder, tmp_path / "f32.gguf", outtype="f32")
    mf = open_model_file(tmp_path / "f32.gguf")
    assert mf.config.rope_base == 1000000.0 and mf.config.n_kv_heads == 1
    ours, ref = logits_pair(model, tmp_path / "f32.gguf", tokens(700, 40))
    assert rel_err(ours, ref) <= F32_RTOL
    tok = Tokenizer.from_metadata(mf.metadata)
    assert tok.encode("[INST] hi[/INST]", special=True)[:2] == [1, tok.tokens.index("[INST]")]
    assert {tok.tokens[i] for i in tok.eog_ids} == {"</s>"}


def tiktoken_file(tokenizer_json: Path, path: Path) -> Path:
    """Meta's tokenizer.model format (base64 token bytes and rank per line) for the base
    vocabulary of a byte-level BPE tokenizer.json, ranks = ids (as in Llama 3's files)."""
    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    lines = [f"{base64.b64encode(byte_level_to_bytes(text)).decode()} {i}"
             for text, i in sorted(vocab.items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_meta_llama31_checkpoint_equals_the_hugging_face_conversion(tmp_path: Path) -> None:
    """params.json with use_scaled_rope and a tiktoken tokenizer.model: the same tensors
    (rope_freqs.weight included) and the same vocabulary as the Hugging Face folder of the same
    model, whose rope_scaling is what Meta's use_scaled_rope means."""
    meta_scaling = LLAMA3_SCALING | {"original_max_position_embeddings": 8192}
    hf, model = llama3_folder(tmp_path / "hf", tied=False, rope_scaling=meta_scaling,
                              extra_rows=8)
    spec = tiktoken_file(hf / "tokenizer.json", tmp_path / "tokenizer.model")
    meta = save_meta(model, tmp_path / "original", 2, spec)
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps(params | {
        "rope_theta": 500000.0, "use_scaled_rope": True}))
    convert(hf, tmp_path / "hf.gguf", outtype="f32")
    convert(meta, tmp_path / "meta.gguf", outtype="f32")
    a, b = open_model_file(tmp_path / "hf.gguf"), open_model_file(tmp_path / "meta.gguf")
    assert a.tensors.keys() == b.tensors.keys() and "rope_freqs.weight" in b.tensors
    for name, t in a.tensors.items():
        assert np.array_equal(t.data, b.tensors[name].data), name
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.merges"):
        assert b.metadata[key] == a.metadata[key], key
    n_base = a.config.n_vocab - len(LLAMA3_SPECIAL) - 8  # then Meta's special tokens
    assert b.metadata["tokenizer.ggml.tokens"][:n_base] == a.metadata["tokenizer.ggml.tokens"][:n_base]
    assert b.metadata["tokenizer.ggml.tokens"][n_base:] == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
        *(f"<|reserved_special_token_{i}|>" for i in range(2, 7))]
    assert b.metadata["tokenizer.ggml.bos_token_id"] == n_base
    assert b.metadata["llama.context_length"] == 131072
    tok = Tokenizer.from_metadata(b.metadata)
    assert {tok.tokens[i] for i in tok.eog_ids} == {"<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"}
    ids = tokens(a.config.n_vocab)
    ours, ref = logits_pair(model, tmp_path / "meta.gguf", ids)
    assert rel_err(ours, ref) <= F32_RTOL


def test_tiktoken_file_errors(tmp_path: Path) -> None:
    from alpaca_convert.errors import ConvertError
    from alpaca_convert.tokenizer_tiktoken import tiktoken_vocab

    bad = tmp_path / "tokenizer.model"
    bad.write_text("YQ== 0\nYg== 2\n")
    with pytest.raises(ConvertError, match="line 2 has rank 2, expected 1"):
        tiktoken_vocab(bad, 16)
    bad.write_text("YQ== 0\nYWJj 1\n")  # "abc" with no way to make it from "a"
    with pytest.raises(ConvertError, match=r"token b'abc' \(rank 1\) cannot be made"):
        tiktoken_vocab(bad, 16)


@pytest.mark.parametrize("args", [
    (500000.0, 128, 8.0, 1.0, 4.0, 8192),    # Llama 3.1 8B / 70B / 405B
    (500000.0, 64, 32.0, 1.0, 4.0, 8192),    # Llama 3.2 1B
    (500000.0, 128, 32.0, 1.0, 4.0, 8192),   # Llama 3.2 3B
    (100000.0, 64, 8.0, 1.0, 4.0, 8192),     # the SmolLM2 golden case
    (500000.0, 16, 8.0, 1.0, 4.0, 64),       # the tiny models here
])
def test_rope_freqs_are_bit_identical_to_llama_cpps_converter(args: tuple) -> None:
    """llama.cpp's convert_hf_to_gguf computes them with torch float32 tensors; so do we,
    without torch (the converter must run on safetensors alone)."""
    import math

    from alpaca_convert.rope_scaling import llama3_rope_freqs
    from test_rope_scaling import llama3_formula

    base, dim, factor, low, high, context = args
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelengths = [2 * math.pi / freq for freq in freqs]  # torch float32 scalars
    expected = llama3_formula(wavelengths, factor, low, high, context)
    expected = torch.tensor(expected, dtype=torch.float32).numpy()
    ours = llama3_rope_freqs(*args)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))
