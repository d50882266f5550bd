"""convert-weights on Hugging Face checkpoints: our logits on the converted file equal
transformers' logits on the checkpoint, for MHA, GQA and tied embeddings, from safetensors
and from pytorch_model.bin; quantized tensors equal gguf.quants; the tokenizer is embedded."""

from __future__ import annotations

import json
from pathlib import Path

import gguf.quants
import numpy as np
import pytest
import torch
from alpaca_convert import convert
from gguf import GGMLQuantizationType as T
from gguf import TokenType
from hf_tiny import (
    CHAT_TEMPLATE,
    TinyConfig,
    made_up_text,
    save_hf,
    snap_to_q4_grid,
    tiny_llama,
    train_spm,
)

import alpaca_cpu
from alpaca_cpu.gguf_file import open_model_file
from alpaca_cpu.tokenizer import Tokenizer

# Largest |logit difference| / largest |logit|, our engine on the converted file vs transformers
# on the float32 checkpoint (both with float32 weights and KV cache; only summation order
# differs, measured ~5e-7):
F32_RTOL = 1e-5
# Q8_0: weights and activations both rounded to int8 per 32-block (~0.4 % per value); measured
# 1.2-1.8e-2 on these models.
Q8_0_RTOL = 3e-2
# Q4_0 on Gaussian weights: 4-bit weights lose ~10 % per value, so logits move by 0.1-0.2 of
# their range (measured 0.11-0.21). A wrong row order or layout gives ~1.
Q4_0_RTOL = 0.3
# Q4_0 / Q8_0 on a decisive model snapped to the Q4 grid (hf_tiny.snap_to_q4_grid): weights
# survive Q4_0 exactly, so only int8 activations (and Q8_0's rounding) remain.
GRID_RTOL = 3e-2

CONFIGS = {
    "mha": TinyConfig(),
    "gqa": TinyConfig(n_kv_heads=2, rope_theta=50000.0, seed=1),
    "tied-gqa": TinyConfig(tied=True, n_kv_heads=1, dim=128, n_heads=4, ffn_dim=352, seed=2),
}
PROMPT = [1, 17, 250, 33, 102, 7, 64, 300, 5, 41]
N_GREEDY = 8


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model")


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def hf_logits(model: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def greedy_hf(model: torch.nn.Module, tokens: list[int], n: int) -> tuple[list[int], float]:
    """transformers' greedy continuation, and its smallest top-1 - top-2 margin relative to
    the largest |logit| of that step."""
    seq, margin = list(tokens), np.inf
    for _ in range(n):
        row = hf_logits(model, seq)[-1]
        top2 = np.sort(row)[-2:]
        margin = min(margin, float((top2[1] - top2[0]) / np.abs(row).max()))
        seq.append(int(row.argmax()))
    return seq[len(tokens):], margin


def greedy_ours(path: Path, tokens: list[int], n: int) -> list[int]:
    m = alpaca_cpu.Model(path, n_ctx=64, kv_type="f32")
    seq = list(tokens)
    logits = m.forward(seq)
    for _ in range(n):
        seq.append(int(logits.argmax()))
        logits = m.forward([seq[-1]], start_pos=len(seq) - 1)
    return seq[len(tokens):]


def our_logits(path: Path, tokens: list[int]) -> np.ndarray:
    return alpaca_cpu.Model(path, n_ctx=64, kv_type="f32").forward(tokens, all_logits=True)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
@pytest.mark.parametrize("config", CONFIGS)
def test_logits_match_transformers(config: str, weights: str, spm_model: Path,
                                   tmp_path: Path) -> None:
    model = tiny_llama(CONFIGS[config])
    folder = save_hf(model, tmp_path / "hf", weights, spm_model=spm_model)
    ref = hf_logits(model, PROMPT)

    convert(folder, tmp_path / "f32.gguf", outtype="f32")
    assert rel_err(our_logits(tmp_path / "f32.gguf", PROMPT), ref) <= F32_RTOL

    convert(folder, tmp_path / "q8_0.gguf", outtype="q8_0")
    assert rel_err(our_logits(tmp_path / "q8_0.gguf", PROMPT), ref) <= Q8_0_RTOL

    convert(folder, tmp_path / "q4_0.gguf", outtype="q4_0")
    err = rel_err(our_logits(tmp_path / "q4_0.gguf", PROMPT), ref)
    assert 0.01 < err <= Q4_0_RTOL  # really quantized, and no worse than 4 bits explain


@pytest.mark.parametrize("outtype", ["q4_0", "q8_0"])
@pytest.mark.parametrize("config", CONFIGS)
def test_quantized_greedy_tokens_match_transformers(config: str, outtype: str,
                                                    spm_model: Path, tmp_path: Path) -> None:
    model = snap_to_q4_grid(tiny_llama(CONFIGS[config]))
    folder = save_hf(model, tmp_path / "hf", "safetensors", spm_model=spm_model)
    out = tmp_path / f"{outtype}.gguf"
    convert(folder, out, outtype=outtype)
    assert rel_err(our_logits(out, PROMPT), hf_logits(model, PROMPT)) <= GRID_RTOL
    expected, margin = greedy_hf(model, PROMPT, N_GREEDY)
    assert margin > 2 * GRID_RTOL  # no near-tie: agreement is owed, not luck
    assert greedy_ours(out, PROMPT, N_GREEDY) == expected


@pytest.mark.parametrize("weights", ["sharded", "sharded-bin"])
def test_sharded_checkpoints_give_the_same_file_contents(weights: str, spm_model: Path,
                                                         tmp_path: Path) -> None:
    model = tiny_llama(CONFIGS["gqa"])
    single = save_hf(model, tmp_path / "single", "safetensors", spm_model=spm_model)
    sharded = save_hf(model, tmp_path / "sharded", weights, spm_model=spm_model)
    convert(single, tmp_path / "a.gguf", outtype="q4_1")
    convert(sharded, tmp_path / "b.gguf", outtype="q4_1")
    a, b = open_model_file(tmp_path / "a.gguf"), open_model_file(tmp_path / "b.gguf")
    assert len(list(sharded.glob("*-of-*"))) > 1
    assert a.tensors.keys() == b.tensors.keys()
    for name, t in a.tensors.items():
        assert t.type == b.tensors[name].type
        assert np.array_equal(t.data, b.tensors[name].data), name


@pytest.mark.parametrize("outtype", ["f16", "q8_0", "q4_0", "q4_1"])
def test_quantized_tensors_equal_gguf_quants(outtype: str, spm_model: Path,
                                             tmp_path: Path) -> None:
    """Each tensor equals gguf.quants applied to the same float input (the F32 conversion)."""
    folder = save_hf(tiny_llama(CONFIGS["tied-gqa"]), tmp_path / "hf", spm_model=spm_model)
    convert(folder, tmp_path / "f32.gguf", outtype="f32")
    convert(folder, tmp_path / "q.gguf", outtype=outtype, quantizer="reference")
    floats = open_model_file(tmp_path / "f32.gguf").tensors
    quant = open_model_file(tmp_path / "q.gguf").tensors
    want = T[outtype.upper()]
    for name, q in quant.items():
        x = floats[name].data.view(np.float32).reshape(floats[name].rows, floats[name].cols)
        if x.shape[0] == 1 and name.endswith("norm.weight"):
            assert q.type == T.F32
        elif name == "token_embd.weight" and outtype in ("q4_0", "q4_1"):
            assert q.type == T.Q8_0  # tied, so the output matrix: Q6_K's fallback (128 cols)
        else:
            assert q.type == want, name
        assert np.array_equal(q.data, gguf.quants.quantize(x, q.type).reshape(-1).view(np.uint8)
                              ), name


def test_untied_q4_output_matrix_is_q8_0(spm_model: Path, tmp_path: Path) -> None:
    """llama-quantize gives it Q6_K, which falls back to Q8_0 for rows of 64 (not 256-blocks)."""
    folder = save_hf(tiny_llama(CONFIGS["mha"]), tmp_path / "hf", spm_model=spm_model)
    convert(folder, tmp_path / "q.gguf", outtype="q4_1")
    mf = open_model_file(tmp_path / "q.gguf")
    assert mf.tensors["output.weight"].type == T.Q8_0
    assert mf.tensors["token_embd.weight"].type == T.Q4_1
    assert mf.metadata["general.file_type"] == 3  # LLAMA_FTYPE_MOSTLY_Q4_1
    assert mf.metadata["general.quantization_version"] == 2


def test_sentencepiece_tokenizer_is_embedded(spm_model: Path, tmp_path: Path) -> None:
    import sentencepiece

    folder = save_hf(tiny_llama(CONFIGS["mha"]), tmp_path / "hf", spm_model=spm_model)
    convert(folder, tmp_path / "m.gguf", outtype="q8_0")
    md = open_model_file(tmp_path / "m.gguf").metadata
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    n = sp.GetPieceSize()
    assert md["tokenizer.ggml.model"] == "llama"
    assert md["tokenizer.ggml.tokens"] == [sp.IdToPiece(i) for i in range(n)]
    assert np.allclose(md["tokenizer.ggml.scores"], [sp.GetScore(i) for i in range(n)])
    types = md["tokenizer.ggml.token_type"]
    assert types[:3] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    assert types[3] == TokenType.BYTE and md["tokenizer.ggml.tokens"][3] == "<0x00>"
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"],
            md["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert md["tokenizer.ggml.add_bos_token"] is True
    assert md["tokenizer.ggml.add_eos_token"] is False
    assert md["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert md["llama.vocab_size"] == n
    # The engine's tokenizer on the embedded vocabulary splits text as SentencePiece does.
    tok = Tokenizer.from_metadata(md)
    for text in ["kalo mitu ranepi, 42.", "Hello wörld é!", "  two  spaces"]:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text


# The split regexes as Llama 3's and Qwen2's tokenizer.json files write them (written out here,
# not imported, so that a changed constant in the code shows).
SPLIT_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def use_split_pre_tokenizer(tokenizer_json: Path, pre: str) -> None:
    """Give a trained tokenizer.json the Split + ByteLevel pre-tokenizer of Llama 3 / Qwen2."""
    tok = json.loads(tokenizer_json.read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": SPLIT_REGEX[pre]}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]}
    tok["model"]["ignore_merges"] = pre == "llama-bpe"  # as Llama 3's file has it
    tokenizer_json.write_text(json.dumps(tok))


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe", "qwen2"])
def test_bpe_tokenizer_is_embedded(pre: str, tmp_path: Path) -> None:
    from hf_tiny import train_bpe
    from tokenizers import Tokenizer as HFTokenizer

    folder = save_hf(tiny_llama(CONFIGS["mha"]), tmp_path / "hf", tokenizer="bpe")
    if pre == "gpt-2":  # the same folder with a plain GPT-2 pre-tokenizer
        train_bpe(folder / "tokenizer.json", digits=False)
    elif pre in SPLIT_REGEX:
        use_split_pre_tokenizer(folder / "tokenizer.json", pre)
    convert(folder, tmp_path / "m.gguf", outtype="q8_0")
    md = open_model_file(tmp_path / "m.gguf").metadata
    hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert md["tokenizer.ggml.pre"] == pre
    vocab = hf.get_vocab()
    assert md["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert md["tokenizer.ggml.token_type"][:3] == [TokenType.CONTROL] * 3
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert md["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m)
                                           for m in merges]
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"],
            md["tokenizer.ggml.unknown_token_id"], md["tokenizer.ggml.padding_token_id"]) == \
        (1, 2, 0, 2)
    assert md["tokenizer.ggml.add_bos_token"] is False
    tok = Tokenizer.from_metadata(md)
    for text in ["kalo mitu ranepi, 12345.", "Hello wörld é!\n\n  x", "<|im_start|>user",
                 "It'S kalo'll 1234567 \r\n mi"]:
        assert tok.encode(text, special=True) == hf.encode(text, add_special_tokens=False).ids, \
            text


def test_sentencepiece_without_dummy_prefix_says_so(tmp_path: Path) -> None:
    import sentencepiece

    folder = save_hf(tiny_llama(CONFIGS["mha"]), tmp_path / "hf", tokenizer="none")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(made_up_text()), model_prefix=str(folder / "tokenizer"),
        vocab_size=384, model_type="bpe", byte_fallback=True, add_dummy_prefix=False,
        minloglevel=2)
    convert(folder, tmp_path / "m.gguf", outtype="q8_0")
    md = open_model_file(tmp_path / "m.gguf").metadata
    assert md["tokenizer.ggml.add_space_prefix"] is False
    convert(save_hf(tiny_llama(CONFIGS["mha"]), tmp_path / "hf2", spm_model=None),
            tmp_path / "m2.gguf", outtype="q8_0")
    assert "tokenizer.ggml.add_space_prefix" not in open_model_file(tmp_path / "m2.gguf").metadata


def test_vocab_padded_to_embedding_rows(spm_model: Path, tmp_path: Path) -> None:
    """A model with more embedding rows than tokens gets [PADn] tokens, as llama.cpp does."""
    cfg = TinyConfig(n_vocab=400)
    folder = save_hf(tiny_llama(cfg), tmp_path / "hf", spm_model=spm_model)
    convert(folder, tmp_path / "m.gguf", outtype="f32")
    md = open_model_file(tmp_path / "m.gguf").metadata
    assert len(md["tokenizer.ggml.tokens"]) == 400
    assert md["tokenizer.ggml.tokens"][384:386] == ["[PAD384]", "[PAD385]"]
    assert md["tokenizer.ggml.token_type"][399] == TokenType.UNUSED
