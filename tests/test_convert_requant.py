"""convert-weights on an existing GGUF file: the real SmolLM2 Q4_1 file re-quantized to Q8_0.

llama.cpp's own Q8_0 re-quantization of this file is not available here (only its sha256 and
its logits, tests/data), so the tensors are checked against gguf.quants applied to the
same dequantized weights, and our engine on our file must meet the teacher-forced criteria of
the golden `q8_0` cases (test_golden_logits.py).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import gguf.quants
import numpy as np
import pytest
from alpaca_convert import convert
from gguf import GGMLQuantizationType as T
from test_golden_logits import MAX_MEAN_DIFF, MAX_STEP_DIFF, compare

import alpaca_cpu
from alpaca_cpu.gguf_file import open_model_file

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def q8_0_path(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("requant") / "SmolLM2-135M-Instruct.Q8_0.gguf"
    convert(smollm2_path, out, outtype="q8_0", quantizer="reference")
    return out


def test_tensors_equal_gguf_quants_of_the_dequantized_weights(smollm2_path: Path,
                                                              q8_0_path: Path) -> None:
    src, ours = open_model_file(smollm2_path), open_model_file(q8_0_path)
    assert src.tensors.keys() == ours.tensors.keys()
    requantized = 0
    for name, s in src.tensors.items():
        o = ours.tensors[name]
        if s.type in (T.F32, T.Q8_0):  # norms, and the Q8_0 embedding: copied as they are
            assert o.type == s.type and np.array_equal(o.data, s.data), name
            continue
        assert s.type == T.Q4_1 and o.type == T.Q8_0, name
        x = gguf.quants.dequantize(s.data.reshape(s.rows, -1), s.type)
        want = gguf.quants.quantize(x, T.Q8_0)
        assert np.array_equal(o.data, want.reshape(-1)), name
        requantized += 1
    assert requantized == 210


# sha256 over (name, data) of every tensor, in name order, of llama.cpp's own re-quantization
# of the SmolLM2 Q4_1 file to Q8_0 (llama-quantize --allow-requantize, commit c392e509; that
# file's whole-file sha256 is the golden README's 7b46609d...). Measured once with llama.cpp;
# the whole-file hash differs only through metadata llama.cpp's quantizer writes.
LLAMA_CPP_Q8_0_TENSOR_SHA256 = "881cf355c42c267b3c168c9037cf92224f0186bc37ccb948e093802472c9b30f"


def tensor_data_sha256(path: Path) -> str:
    mf = open_model_file(path)
    h = hashlib.sha256()
    for name in sorted(mf.tensors):
        h.update(name.encode())
        h.update(np.asarray(mf.tensors[name].data).tobytes())
    return h.hexdigest()


def test_tensors_are_bit_identical_to_llama_cpps_requantization(q8_0_path: Path) -> None:
    assert tensor_data_sha256(q8_0_path) == LLAMA_CPP_Q8_0_TENSOR_SHA256


def raw_metadata(path: Path) -> dict[str, bytes]:
    """Each GGUF metadata entry's bytes on disk (value type + value), by key."""
    data = path.read_bytes()
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type -> size

    def skip(pos: int, vtype: int) -> int:
        if vtype in fixed:
            return pos + fixed[vtype]
        if vtype == 8:  # string
            return pos + 8 + int.from_bytes(data[pos:pos + 8], "little")
        assert vtype == 9, vtype  # array: item type, count, items
        itype, n = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if itype in fixed:
            return pos + n * fixed[itype]
        for _ in range(n):
            pos = skip(pos, itype)
        return pos

    _, _, _, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    pos, entries = 24, {}
    for _ in range(n_kv):
        key_len = int.from_bytes(data[pos:pos + 8], "little")
        key = data[pos + 8:pos + 8 + key_len].decode()
        start = pos + 8 + key_len
        pos = skip(start + 4, int.from_bytes(data[start:start + 4], "little"))
        entries[key] = data[start:pos]
    return entries


def test_metadata_is_kept_byte_for_byte(smollm2_path: Path, q8_0_path: Path) -> None:
    src, ours = raw_metadata(smollm2_path), raw_metadata(q8_0_path)
    assert src.keys() == ours.keys()
    for key, raw in src.items():
        if key != "general.file_type":
            assert ours[key] == raw, key
    assert open_model_file(q8_0_path).metadata["general.file_type"] == 7  # MOSTLY_Q8_0


def test_engine_on_our_q8_0_file_matches_llama_cpp(q8_0_path: Path, golden_greedy: dict) -> None:
    model = alpaca_cpu.Model(q8_0_path, n_ctx=512)
    for case in golden_greedy["models"]["q8_0"]["cases"]:
        tokens = case["prompt_ids"] + case["generated_ids"]
        logits = model.forward(tokens, all_logits=True)
        n_prompt = len(case["prompt_ids"])
        steps = logits[n_prompt - 1: n_prompt - 1 + len(case["top5_logits"])]
        worst, mean = compare(steps, case)
        assert worst <= MAX_STEP_DIFF, f"{case['name']}: max difference {worst:.3f}"
        assert mean <= MAX_MEAN_DIFF, f"{case['name']}: mean difference {mean:.3f}"


def test_bpe_tokenizer_conversion_reproduces_llama_cpps_vocabulary(smollm2_path: Path,
                                                                   tmp_path: Path) -> None:
    """SmolLM2's tokenizer rebuilt as a tokenizer.json (its vocabulary, merges, special tokens
    and StarCoder-style pre-tokenizer) converts to the tokenizer keys llama.cpp wrote."""
    import json

    from alpaca_convert.tokenizer import tokenizer_metadata

    md = open_model_file(smollm2_path).metadata
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    special = [i for i, t in enumerate(types) if t == 3]  # CONTROL
    tok_json = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i in special],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": md["tokenizer.ggml.merges"]},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok_json))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>", "chat_template": md["tokenizer.chat_template"]}))
    entries, _ = tokenizer_metadata(tmp_path / "tokenizer.json", tmp_path, len(tokens))
    ours = {e.key: e.value for e in entries}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours[key] == md[key], key
