"""The type table: the Python mirror equals the native one row by row, both agree with gguf, and
every entry point refuses a type id the table does not know (or a type that cannot do what is
asked) with an error naming it, instead of computing something."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from tiny_model import TinySpec, write_tiny_model

from alpaca_cpu import _core, ggml_types
from alpaca_cpu import quants as q
from alpaca_cpu.gguf_file import open_model_file

# Ids the engine does not know: Q4_2 and Q4_3 (removed from GGML, never in a file we accept),
# IQ2_XXS, BF16 and TQ1_0 (not supported yet), one past the native table's slots, and out of
# range both ways.
UNKNOWN_IDS = [4, 5, 16, 30, 34, 40, -1, 1000]
FIELDS = ["id", "name", "block_size", "type_size", "is_block", "is_weight", "vec_dot_type"]


def test_python_and_native_tables_agree_row_by_row() -> None:
    native = _core.type_traits()
    python = [{f: getattr(t, f) for f in FIELDS} for t in ggml_types.TYPES.values()]
    assert [r["id"] for r in native] == [r["id"] for r in python]
    for n, p in zip(native, python):
        assert n == p


def test_table_agrees_with_gguf() -> None:
    for t in ggml_types.TYPES.values():
        assert GGMLQuantizationType(t.id).name == t.name
        if t.is_weight:  # gguf-py sizes Q8_1 with fp32 d and s (40 bytes); ggml-common.h and
            # we use fp16 (36), and no file holds Q8_1
            assert GGML_QUANT_SIZES[GGMLQuantizationType(t.id)] == (t.block_size, t.type_size)
        if t.is_block:  # a weight block meets exactly one activation block
            assert ggml_types.traits(t.vec_dot_type).block_size == t.block_size


@pytest.mark.parametrize("type_id", list(ggml_types.TYPES), ids=lambda i: ggml_types.TYPES[i].name)
def test_every_type_round_trips_like_its_numpy_twins(type_id: int, isa: str) -> None:
    """quantize and dequantize of every row of the table, native (this ISA) vs numpy, bit for bit."""
    rng = np.random.default_rng(type_id)
    cols = 3 * ggml_types.traits(type_id).block_size if type_id >= ggml_types.Q2_K else 96
    x = rng.standard_normal((5, cols)).astype(np.float32)
    data = q.quantize(x, type_id)
    assert np.array_equal(_core.quantize(x, type_id, 1, isa), data)
    assert np.array_equal(_core.dequantize(data, type_id, cols, isa),
                          q.dequantize(data, type_id, cols))


@pytest.mark.parametrize("type_id", UNKNOWN_IDS)
def test_unknown_type_id_is_refused_everywhere(type_id: int, isa: str) -> None:
    msg = f"unsupported GGML type id {type_id} "
    x = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match=msg):
        _core.quantize(x, type_id, 1, isa)
    with pytest.raises(ValueError, match=msg):
        _core.dequantize(np.zeros((2, 36), np.uint8), type_id, 64, isa)
    with pytest.raises(ValueError, match=msg):
        _core.gemm(type_id, np.zeros((2, 36), np.uint8), x, 64, isa)
    with pytest.raises(ValueError, match=msg):
        q.quantize(x, type_id)
    with pytest.raises(ValueError, match=msg):
        ggml_types.traits(type_id)


def test_gemm_on_a_type_without_a_matrix_product_is_refused(isa: str) -> None:
    """Q8_1 is only an activation format: no kernel multiplies Q8_1 weights. gemm used to send
    it to a `default: break;` and return zeros."""
    rng = np.random.default_rng(0)
    w = q.quantize(rng.standard_normal((3, 64)).astype(np.float32), ggml_types.Q8_1)
    act = rng.standard_normal((2, 64)).astype(np.float32)  # what the old code paired it with
    with pytest.raises(ValueError, match=r"Q8_1 \(id 9\) has no matrix product"):
        _core.gemm(ggml_types.Q8_1, w, act, 64, isa)


def _native_tensors(tmp_path: Path) -> tuple[dict, dict]:
    mf = open_model_file(write_tiny_model(tmp_path / "m.gguf", TinySpec()))
    tensors = {n: (int(t.type), t.rows, t.cols, t.data) for n, t in mf.tensors.items()}
    return mf.config.to_hparams(), tensors


@pytest.mark.parametrize("type_id", UNKNOWN_IDS)
def test_native_model_refuses_unknown_weight_type(tmp_path: Path, type_id: int) -> None:
    hparams, tensors = _native_tensors(tmp_path)
    _, rows, cols, data = tensors["blk.0.ffn_up.weight"]
    tensors["blk.0.ffn_up.weight"] = (type_id, rows, cols, data)
    with pytest.raises(ValueError, match=f"unsupported GGML type id {type_id} "):
        _core.Model(hparams, tensors, 16, 1)


def test_native_model_refuses_an_activation_format_as_weight(tmp_path: Path) -> None:
    hparams, tensors = _native_tensors(tmp_path)
    _, rows, cols, _ = tensors["blk.0.ffn_up.weight"]
    data = np.zeros(rows * q.row_bytes(ggml_types.Q8_1, cols), np.uint8)
    tensors["blk.0.ffn_up.weight"] = (ggml_types.Q8_1, rows, cols, data)
    with pytest.raises(ValueError, match="blk.0.ffn_up.weight: type Q8_1 cannot be a weight"):
        _core.Model(hparams, tensors, 16, 1)


def test_native_model_refuses_a_kquant_row_that_is_not_whole_super_blocks(tmp_path: Path) -> None:
    """ffn_down's rows are ffn_dim = 96 long: whole 32-blocks, not whole 256-blocks."""
    hparams, tensors = _native_tensors(tmp_path)
    _, rows, cols, data = tensors["blk.0.ffn_down.weight"]
    assert cols % 256
    tensors["blk.0.ffn_down.weight"] = (ggml_types.Q4_K, rows, cols, data)
    with pytest.raises(ValueError, match="blk.0.ffn_down.weight: row length must be a multiple "
                                         "of 256 for Q4_K"):
        _core.Model(hparams, tensors, 16, 1)
