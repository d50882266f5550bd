"""RoPE scaling: Llama 3's rope_freqs.weight and llama.cpp's linear scaling.

- The real model with a Llama-3 rope_freqs.weight added, made again exactly as llama.cpp's
  reference file was (tests/data/smollm2_kquants_greedy.json, case Q4_1_rope3; the sha256 of the
  whole file proves the remake): teacher-forced logits within test_golden_logits' criteria of
  llama.cpp's.
- Tiny models: the engine equals the numpy reference with both kinds of scaling, and each kind
  changes the logits the way its definition says (linear factor f at position p = plain RoPE at
  p / f on every frequency).
- Bad rope_freqs.weight and unsupported scaling types are refused naming the tensor or key.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DATA_DIR
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from test_golden_logits import MAX_MEAN_DIFF, MAX_STEP_DIFF, compare
from tiny_model import TinySpec, write_tiny_model

import alpaca_cpu
from alpaca_cpu.errors import ModelFileError
from alpaca_cpu.reference import ReferenceModel, rope

GOLDEN = json.loads((DATA_DIR / "smollm2_kquants_greedy.json").read_text())["models"]["Q4_1_rope3"]
# The engine (F16 KV cache, int8 activations) against the float64-accumulating numpy reference on
# tiny F32 models: the tolerance test_model uses for the same comparison.
ENGINE_VS_REFERENCE_ATOL = 2e-3


def llama3_formula(wavelengths: Iterable[Any], factor: float, low: float, high: float,
                   original_context: int) -> list[Any]:
    """Meta's Llama-3 scaling, as written in its reference code and llama.cpp's converter, on
    whatever number type the wavelengths have (float64 here, torch float32 tensors elsewhere)."""
    out = []
    for wavelen in wavelengths:
        if wavelen < original_context / high:
            out.append(1)
        elif wavelen > original_context / low:
            out.append(factor)
        else:
            smooth = (original_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def llama3_divisors_float64(base: float, head_dim: int, factor: float, low: float, high: float,
                            original_context: int) -> np.ndarray:
    """Llama 3's per-frequency RoPE divisors in float64, rounded to float32 at the end: how the
    Q4_1_rope3 reference file's values were computed (its sha256 confirms it)."""
    wavelengths = [2 * math.pi * base ** (i / head_dim) for i in range(0, head_dim, 2)]
    return np.array(llama3_formula(wavelengths, factor, low, high, original_context), np.float32)


def with_extra_tensor(src: Path, dst: Path, name: str, values: np.ndarray) -> Path:
    """src with one F32 tensor appended, every key, value and other tensor copied unchanged."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        writer.add_key_value(key, field.contents(), vtype,
                             field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def rope3_path(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    divisors = llama3_divisors_float64(1e5, 64, 8.0, 1.0, 4.0, 8192)
    path = with_extra_tensor(smollm2_path, tmp_path_factory.mktemp("rope3") / "rope3.gguf",
                             "rope_freqs.weight", divisors)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == GOLDEN["sha256"], "the remade Q4_1_rope3 file differs from llama.cpp's input"
    return path


@pytest.mark.real_model
def test_llama3_rope_freqs_teacher_forced_match_llama_cpp(rope3_path: Path) -> None:
    model = alpaca_cpu.Model(rope3_path, n_ctx=512)
    for case in GOLDEN["cases"]:
        tokens = case["prompt_ids"] + case["generated_ids"]
        n_prompt = len(case["prompt_ids"])
        steps = model.forward(tokens, all_logits=True)[n_prompt - 1:
                                                       n_prompt - 1 + len(case["top5_logits"])]
        worst, mean = compare(steps, case)
        assert worst <= MAX_STEP_DIFF, f"{case['name']}: max difference {worst:.3f}"
        assert mean <= MAX_MEAN_DIFF, f"{case['name']}: mean difference {mean:.3f}"


# Tiny F32 models with RoPE scaling that bites within 64 positions: head size 16 (8
# frequencies with wavelengths 6 .. 20,000 positions), a Llama-3 original context of 256 so that
# one frequency is in the smooth band and four are slowed 8 times; and a linear factor of 4.
TINY_SPEC = TinySpec(n_vocab=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, seed=7)
TINY_TOKENS = [int(t) for t in np.random.default_rng(1).integers(0, 320, 64)]
TINY_CASES = {
    "llama3": {"tokens": TINY_TOKENS, "positions": list(range(0, 64, 4)) + [63]},
    "linear": {"tokens": TINY_TOKENS, "positions": list(range(0, 64, 4)) + [63]},
}
TINY_LLAMA3_DIVISORS = llama3_divisors_float64(10000.0, 16, 8.0, 1.0, 4.0, 256)


def tiny_scaled_model(folder: Path, name: str) -> Path:
    """The tiny model of TINY_CASES[name] (vocabulary type 'none', which llama.cpp accepts)."""
    no_vocab = {"tokenizer.ggml.model": "none"}
    if name == "linear":
        return write_tiny_model(folder / "linear.gguf", TINY_SPEC, no_vocab | {
            "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    plain = write_tiny_model(folder / "plain.gguf", TINY_SPEC, no_vocab)
    return with_extra_tensor(plain, folder / f"{name}.gguf", "rope_freqs.weight",
                             TINY_LLAMA3_DIVISORS)


# llama.cpp and our engine both keep K/V in F16 and multiply F32 weights in float32: on these
# tiny models the logits agree to ~3e-4; a RoPE scaling applied wrongly moves them by > 0.1.
LLAMA_CPP_ATOL = 2e-3
TINY_REFERENCE = json.loads((DATA_DIR / "rope_scaling_llama_cpp.json").read_text())["cases"]


@pytest.mark.parametrize("name", sorted(TINY_CASES))
def test_tiny_scaled_models_match_llama_cpp(tmp_path: Path, name: str) -> None:
    path = tiny_scaled_model(tmp_path, name)
    ref = TINY_REFERENCE[name]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref["sha256"], "remade file differs"
    theirs = np.array(ref["logits"], np.float32)
    tokens, rows = TINY_CASES[name]["tokens"], ref["positions"]
    ours = alpaca_cpu.Model(path, n_ctx=128).forward(tokens, all_logits=True)[rows]
    exact = ReferenceModel(path, n_ctx=128).forward(tokens, all_logits=True)[rows]
    assert np.abs(ours - theirs).max() <= LLAMA_CPP_ATOL
    assert np.abs(exact - theirs).max() <= LLAMA_CPP_ATOL
    # the same weights with plain RoPE are far from llama.cpp's: the scaling is what matches
    plain = alpaca_cpu.Model(write_tiny_model(tmp_path / "p.gguf", TINY_SPEC), n_ctx=128)
    assert np.abs(plain.forward(tokens, all_logits=True)[rows] - theirs).max() > 50 * LLAMA_CPP_ATOL


def test_linear_factor_is_plain_rope_at_scaled_positions() -> None:
    x = np.random.default_rng(3).standard_normal((5, 2, 16)).astype(np.float32)
    pos = np.arange(5) * 4
    divided = rope(x, pos, 16, 10000.0, np.full(8, 4.0, np.float32))
    np.testing.assert_allclose(divided, rope(x, pos / 4, 16, 10000.0), rtol=0, atol=1e-6)


def rope_freqs_file(tmp_path: Path, values: np.ndarray) -> Path:
    plain = write_tiny_model(tmp_path / "plain.gguf", TinySpec(dim=64, n_heads=4))
    return with_extra_tensor(plain, tmp_path / "bad.gguf", "rope_freqs.weight", values)


@pytest.mark.parametrize(("values", "message"), [
    (np.ones(7, np.float32), r"tensor 'rope_freqs.weight' has shape \[7\], expected \[8\]"),
    (np.ones(8, np.float16), r"tensor 'rope_freqs.weight' has type F16, expected F32"),
    (np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32), r"'rope_freqs.weight' value 3 is 0.0"),
    (np.array([1, -2, 1, 1, 1, 1, 1, 1], np.float32), r"'rope_freqs.weight' value 1 is -2.0"),
    (np.array([1, 1, 1, 1, 1, np.nan, 1, 1], np.float32), r"'rope_freqs.weight' value 5 is nan"),
    (np.array([np.inf] + [1] * 7, np.float32), r"'rope_freqs.weight' value 0 is inf"),
])
def test_bad_rope_freqs_are_refused_naming_the_tensor(tmp_path: Path, values: np.ndarray,
                                                      message: str) -> None:
    with pytest.raises(ModelFileError, match=message):
        alpaca_cpu.Model(rope_freqs_file(tmp_path, values), n_ctx=16)


@pytest.mark.parametrize(("extra", "message"), [
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0},
     r"'llama.rope.scaling.type' = 'yarn', expected 'none' or 'linear'"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": -2.0},
     r"'llama.rope.scaling.factor' = -2.0, expected a number in \(0.0, 10000.0\)"),
    ({"llama.rope.scale_linear": float("inf")}, r"'llama.rope.scale_linear' = inf"),
])
def test_bad_rope_scaling_metadata_is_refused(tmp_path: Path, extra: dict, message: str) -> None:
    with pytest.raises(ModelFileError, match=message):
        alpaca_cpu.Model(write_tiny_model(tmp_path / "m.gguf", TinySpec(), extra), n_ctx=16)


def test_scaling_type_none_ignores_the_factor(tmp_path: Path) -> None:
    none = write_tiny_model(tmp_path / "n.gguf", TINY_SPEC, {
        "llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0})
    plain = write_tiny_model(tmp_path / "p.gguf", TINY_SPEC)
    assert alpaca_cpu.Model(none, n_ctx=16).config.rope_scaling_factor == 1.0
    np.testing.assert_array_equal(alpaca_cpu.Model(none, n_ctx=16).forward(TINY_TOKENS[:8]),
                                  alpaca_cpu.Model(plain, n_ctx=16).forward(TINY_TOKENS[:8]))


def test_requantizing_keeps_the_scaling(tmp_path: Path) -> None:
    from alpaca_convert import convert

    from alpaca_cpu.gguf_file import open_model_file

    for name in TINY_CASES:
        src = tiny_scaled_model(tmp_path, name)
        convert(src, tmp_path / f"{name}.q8_0.gguf", outtype="q8_0")
        a, b = open_model_file(src), open_model_file(tmp_path / f"{name}.q8_0.gguf")
        assert b.config.rope_scaling_factor == a.config.rope_scaling_factor
        np.testing.assert_array_equal(b.rope_divisors(), a.rope_divisors())
