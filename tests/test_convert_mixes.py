"""convert-weights' K-quant mixes (q4_k_m ...): the type of every tensor, as llama-quantize picks it.

The expected tables below are written out by hand from llama.cpp's `llama_tensor_get_type`
(src/llama-quant.cpp, ggml 0c1e570): layer numbers are literals, not recomputed with the
converter's own rules. The plan was checked once against that llama-quantize (the one vendored
in llama-cpp-python 0.3.36) on tiny F32 files of these shapes (whole 256-blocks with GQA 8/2,
MHA, tied; 80 layers GQA and MHA; dim 80), for all 13 of its file types we name: all 24,791
tensor types agreed, and so did general.file_type. tests/test_convert_kquant_tensors.py
compares the plan with the types llama-quantize wrote for the real model.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from alpaca_convert import convert
from alpaca_convert.errors import ConvertError
from alpaca_convert.quant_plan import MIXES, plan
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F
from tiny_model import TinySpec, write_tiny_model

from alpaca_cpu import _core
from alpaca_cpu.config import ModelConfig
from alpaca_cpu.gguf_file import open_model_file

ALL = "*"  # every layer matrix no other entry names


def config(n_layers: int, dim: int, ffn_dim: int, n_heads: int, n_kv_heads: int, head_dim: int,
           n_vocab: int = 512, tied: bool = False) -> ModelConfig:
    return ModelConfig(n_vocab=n_vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, head_dim=head_dim, ffn_dim=ffn_dim, n_rot=head_dim,
                       rope_base=10000.0, rms_eps=1e-5, context_length=2048,
                       tied_embeddings=tied)


def planned(cfg: ModelConfig, outtype: str) -> dict[str, T]:
    return {t.name: t.type for t in plan(cfg, outtype)}


def check(cfg: ModelConfig, outtype: str, table: dict) -> None:
    """Every tensor of the plan against a table: role -> type, or role -> (type in these layers,
    the layers, type elsewhere); norms F32."""
    for name, got in planned(cfg, outtype).items():
        parts = name.split(".")
        role, layer = (parts[2], int(parts[1])) if parts[0] == "blk" else (parts[0], -1)
        if role.endswith("_norm"):
            want = T.F32
        else:
            want = table.get(role, table[ALL])
            if isinstance(want, tuple):
                there, layers, elsewhere = want
                want = there if layer in layers else elsewhere
        assert got == want, f"{outtype} {name}: planned {got.name}, llama.cpp {want.name}"


# ---- SmolLM2-135M's shapes: GQA 9/3, dim 576 (not whole 256-blocks), ffn 1536, 30 layers, tied

SMOLLM2 = config(30, 576, 1536, 9, 3, 64, n_vocab=49152, tied=True)
# use_more_bits for 30 layers: i < 3, i >= 26, (i - 3) % 3 == 2
MORE_BITS_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
# Rows of 576 are not whole 256-blocks: Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
# Q6_K -> Q8_0; the tied embedding is the output matrix: Q8_0 (Q6_K's fallback, or directly
# when the mix's main type has 256-blocks). Only ffn_down (rows of 1536) keeps K-quants.
SMOLLM2_TABLES: dict[str, dict] = {
    "f32": {ALL: T.F32},
    "f16": {ALL: T.F16},
    "q8_0": {ALL: T.Q8_0},
    "q4_0": {"token_embd": T.Q8_0, ALL: T.Q4_0},
    "q4_1": {"token_embd": T.Q8_0, ALL: T.Q4_1},
    "q5_0": {"token_embd": T.Q8_0, ALL: T.Q5_0},
    "q5_1": {"token_embd": T.Q8_0, ALL: T.Q5_1},
    "iq4_nl": {"token_embd": T.Q8_0, "ffn_down": (T.Q5_K, {0, 1, 2}, T.IQ4_NL), ALL: T.IQ4_NL},
    "q2_k": {"token_embd": T.Q8_0, "ffn_down": T.Q3_K, ALL: T.Q4_0},
    "q3_k_m": {"token_embd": T.Q8_0, "attn_v": (T.Q5_1, {0, 1}, T.Q5_0),
               "ffn_down": (T.Q5_K, {0}, T.Q4_K), "attn_output": T.Q5_0, ALL: T.Q4_0},
    "q4_k_s": {"token_embd": T.Q8_0, "attn_v": (T.Q5_1, {0, 1, 2, 3}, T.Q5_0),
               "ffn_down": (T.Q5_K, {0, 1, 2}, T.Q4_K), ALL: T.Q5_0},
    "q4_k_m": {"token_embd": T.Q8_0, "attn_v": (T.Q8_0, MORE_BITS_30, T.Q5_0),
               "ffn_down": (T.Q6_K, MORE_BITS_30, T.Q4_K), ALL: T.Q5_0},
    "q5_k_s": {"token_embd": T.Q8_0, "ffn_down": T.Q5_K, ALL: T.Q5_1},
    "q5_k_m": {"token_embd": T.Q8_0, "attn_v": (T.Q8_0, MORE_BITS_30, T.Q5_1),
               "ffn_down": (T.Q6_K, MORE_BITS_30, T.Q5_K), ALL: T.Q5_1},
    "q6_k": {"token_embd": T.Q8_0, "ffn_down": T.Q6_K, ALL: T.Q8_0},
}


def test_every_outtype_has_a_smollm2_table() -> None:
    assert set(SMOLLM2_TABLES) == set(MIXES)


@pytest.mark.parametrize("outtype", list(SMOLLM2_TABLES))
def test_smollm2_shapes(outtype: str) -> None:
    check(SMOLLM2, outtype, SMOLLM2_TABLES[outtype])


# ---- Whole 256-blocks everywhere (dim 256, ffn 768), 16 layers, untied, GQA 8/2 (n_gqa 4)

BLOCKS = config(16, 256, 768, 8, 2, 32)
MORE_BITS_16 = {0, 1, 4, 7, 10, 13, 14, 15}  # i < 2, i >= 14, (i - 2) % 3 == 2
BLOCKS_TABLES: dict[str, dict] = {
    "q8_0": {ALL: T.Q8_0},
    "q4_0": {"output": T.Q6_K, ALL: T.Q4_0},
    "q4_1": {"output": T.Q6_K, ALL: T.Q4_1},
    "q5_0": {"output": T.Q6_K, ALL: T.Q5_0},
    "q5_1": {"output": T.Q6_K, ALL: T.Q5_1},
    # n_gqa >= 4: attn_v gets Q5_K
    "iq4_nl": {"output": T.Q6_K, "attn_v": T.Q5_K, "ffn_down": (T.Q5_K, {0, 1}, T.IQ4_NL),
               ALL: T.IQ4_NL},
    "q2_k": {"output": T.Q6_K, "attn_v": T.Q4_K, "ffn_down": T.Q3_K, "attn_output": T.Q3_K,
             ALL: T.Q2_K},
    "q3_k_m": {"output": T.Q6_K, "attn_v": (T.Q5_K, {0, 1}, T.Q4_K),
               "ffn_down": (T.Q5_K, {0}, T.Q4_K), "attn_output": T.Q4_K, ALL: T.Q3_K},
    "q4_k_s": {"output": T.Q6_K, "attn_v": (T.Q5_K, {0, 1, 2, 3}, T.Q4_K),
               "ffn_down": (T.Q5_K, {0, 1}, T.Q4_K), ALL: T.Q4_K},
    "q4_k_m": {"output": T.Q6_K, "attn_v": (T.Q6_K, MORE_BITS_16, T.Q4_K),
               "ffn_down": (T.Q6_K, MORE_BITS_16, T.Q4_K), ALL: T.Q4_K},
    "q5_k_s": {"output": T.Q6_K, ALL: T.Q5_K},
    "q5_k_m": {"output": T.Q6_K, "attn_v": (T.Q6_K, MORE_BITS_16, T.Q5_K),
               "ffn_down": (T.Q6_K, MORE_BITS_16, T.Q5_K), ALL: T.Q5_K},
    "q6_k": {ALL: T.Q6_K},
}


@pytest.mark.parametrize("outtype", list(BLOCKS_TABLES))
def test_whole_super_blocks(outtype: str) -> None:
    check(BLOCKS, outtype, BLOCKS_TABLES[outtype])


def test_few_query_heads_per_kv_head_keep_attn_v_lower() -> None:
    """n_gqa < 4 (here 1: MHA): Q2_K's attn_v gets Q3_K, not Q4_K; IQ4_NL's stays IQ4_NL."""
    mha = config(16, 256, 768, 8, 8, 32)
    assert {t for n, t in planned(mha, "q2_k").items() if "attn_v" in n} == {T.Q3_K}
    assert {t for n, t in planned(mha, "iq4_nl").items() if "attn_v" in n} == {T.IQ4_NL}


def test_tied_embedding_is_quantized_as_the_output_matrix() -> None:
    tied, untied = config(16, 256, 768, 8, 2, 32, tied=True), BLOCKS
    for outtype, embd_tied, embd_untied in [("q4_k_m", T.Q6_K, T.Q4_K), ("q4_0", T.Q6_K, T.Q4_0),
                                            ("q2_k", T.Q6_K, T.Q2_K), ("q8_0", T.Q8_0, T.Q8_0)]:
        assert planned(tied, outtype)["token_embd.weight"] == embd_tied, outtype
        assert "output.weight" not in planned(tied, outtype)
        assert planned(untied, outtype)["token_embd.weight"] == embd_untied, outtype


def test_llama_70b_gets_q5_k_attn_v() -> None:
    """llama.cpp's LLM_TYPE_70B (80 layers, n_kv_heads < n_heads): attn_v Q3_K / Q4_K -> Q5_K.
    80 layers of multi-head attention (its 65B) keep the mix's choice."""
    gqa, mha = config(80, 256, 768, 8, 1, 32), config(80, 256, 768, 8, 8, 32)
    more_bits_80 = {*range(10), 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 48, 51, 54, 57,
                    60, 63, 66, 69, *range(70, 80)}  # i < 10, i >= 70, (i - 10) % 3 == 2

    def attn_v(cfg: ModelConfig, outtype: str) -> list[T]:
        return [planned(cfg, outtype)[f"blk.{i}.attn_v.weight"] for i in range(80)]

    assert attn_v(gqa, "q4_k_m") == [T.Q6_K if i in more_bits_80 else T.Q5_K for i in range(80)]
    assert attn_v(mha, "q4_k_m") == [T.Q6_K if i in more_bits_80 else T.Q4_K for i in range(80)]
    assert attn_v(gqa, "q2_k") == [T.Q5_K] * 80
    assert attn_v(mha, "q2_k") == [T.Q3_K] * 80
    assert attn_v(gqa, "q3_k_m") == [T.Q5_K] * 80
    assert attn_v(gqa, "q4_k_s") == [T.Q5_K] * 80
    assert attn_v(gqa, "q5_k_s") == [T.Q5_K] * 80
    assert attn_v(gqa, "q6_k") == [T.Q6_K] * 80


def test_rows_not_whole_32_blocks_stay_f16() -> None:
    """dim 80: neither a K-quant nor its 32-block fallback fits, nor a 32-block type itself (the
    Q8_0 output included): llama.cpp (ggml 0c1e570) writes F16 for all of them."""
    odd = config(2, 80, 256, 4, 4, 20)
    for outtype in ("q4_k_m", "q2_k", "q4_0", "q8_0", "iq4_nl"):
        for name, t in planned(odd, outtype).items():
            if name.endswith("norm.weight"):
                continue
            cols = 256 if "ffn_down" in name else 80
            if cols == 80:
                assert t == T.F16, (outtype, name)
    assert planned(odd, "q4_k_m")["blk.1.ffn_down.weight"] == T.Q6_K  # 256 columns: fits


@pytest.mark.parametrize("outtype,file_type", [
    ("f32", F.ALL_F32), ("f16", F.MOSTLY_F16), ("q8_0", F.MOSTLY_Q8_0), ("q4_0", F.MOSTLY_Q4_0),
    ("q4_1", F.MOSTLY_Q4_1), ("q5_0", F.MOSTLY_Q5_0), ("q5_1", F.MOSTLY_Q5_1),
    ("iq4_nl", F.MOSTLY_IQ4_NL), ("q2_k", F.MOSTLY_Q2_K), ("q3_k_m", F.MOSTLY_Q3_K_M),
    ("q4_k_s", F.MOSTLY_Q4_K_S), ("q4_k_m", F.MOSTLY_Q4_K_M), ("q5_k_s", F.MOSTLY_Q5_K_S),
    ("q5_k_m", F.MOSTLY_Q5_K_M), ("q6_k", F.MOSTLY_Q6_K)])
def test_file_type(outtype: str, file_type: F) -> None:
    assert MIXES[outtype].file_type == file_type
    # llama.cpp's enum llama_ftype values, which general.file_type holds
    assert int(file_type) == {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8,
                              "q5_1": 9, "q2_k": 10, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15,
                              "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25}[outtype]


# ---- Files: written when this build quantizes every planned type, refused before writing
# otherwise (the engine's native type table decides, read here at run time).

TINY = TinySpec(n_vocab=320, dim=256, n_layers=8, n_heads=4, n_kv_heads=1, ffn_dim=512, seed=3)


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("mixes") / "tiny-f32.gguf", TINY)


def native_weight_types() -> set[T]:
    return {T(row["id"]) for row in _core.type_traits() if row["is_weight"]}


@pytest.mark.parametrize("outtype", list(MIXES))
def test_written_or_refused_naming_the_missing_types(outtype: str, tiny_f32: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    want = {t.name: t.type for t in plan(open_model_file(tiny_f32).config, outtype)}
    missing = sorted(set(want.values()) - native_weight_types())
    if missing:
        with pytest.raises(ConvertError) as e:
            convert(tiny_f32, out, outtype=outtype, out=io.StringIO())
        names = ", ".join(t.name for t in missing)
        assert f"{names} {'are' if len(missing) > 1 else 'is'} not supported by this build's " \
               "quantizers" in str(e.value)
        assert not out.exists() and list(tmp_path.iterdir()) == []
        return
    convert(tiny_f32, out, outtype=outtype, out=io.StringIO())
    mf = open_model_file(out)
    assert {name: t.type for name, t in mf.tensors.items()} == want
    assert mf.metadata["general.file_type"] == int(MIXES[outtype].file_type)


def test_a_type_the_table_lacks_is_refused(tiny_f32: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Availability is read from the engine's native type table: without its Q8_0 row, q8_0 is
    refused with the message, before anything is written (not a crash inside the quantizer)."""
    rows = [r for r in _core.type_traits() if r["id"] != T.Q8_0]
    monkeypatch.setattr(_core, "type_traits", lambda: rows)
    with pytest.raises(ConvertError, match=r"--outtype q8_0: type Q8_0 is not supported by this "
                                           r"build's quantizers \(it has F32, F16, Q4_0, Q4_1"):
        convert(tiny_f32, tmp_path / "out.gguf", outtype="q8_0", out=io.StringIO())
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_each_tensors_type_and_bytes(tiny_f32: Path) -> None:
    text = io.StringIO()
    summary = convert(tiny_f32, None, outtype="q4_k_m", dry_run=True, out=text)
    lines = {ln.split()[0]: ln.split() for ln in text.getvalue().splitlines()
             if ln.startswith("  ")}
    # blk.0.attn_v: 64 x 256 in Q6_K = 64 rows of one 210-byte super-block
    assert lines["blk.0.attn_v.weight"][1:5] == ["64x256", "F32", "->", "Q6_K"]
    assert lines["blk.0.attn_v.weight"][5:] == ["13.1", "KiB", "reference"]  # no K-quant search
    assert lines["blk.1.attn_v.weight"][4] == "Q4_K"  # 8 layers: more bits for 0, 3, 6, 7
    assert lines["output.weight"][4] == "Q6_K"
    assert "(MOSTLY_Q4_K_M)" in text.getvalue()
    assert summary.types["Q6_K"] == 1 + 4 + 4 and summary.types["F32"] == 17
    missing = sorted({T.Q4_K, T.Q6_K} - native_weight_types())
    assert ("writing this file would fail" in text.getvalue()) == bool(missing)
    assert summary.tensor_bytes == sum(
        np.prod(s) // 256 * {"Q4_K": 144, "Q6_K": 210}[t]
        for s, t in [((64, 256), "Q6_K")] * 4 + [((64, 256), "Q4_K")] * 12
        + [((256, 256), "Q4_K")] * 16 + [((512, 256), "Q4_K")] * 16
        + [((256, 512), "Q6_K")] * 4 + [((256, 512), "Q4_K")] * 4
        + [((320, 256), "Q4_K"), ((320, 256), "Q6_K")]) + 17 * 256 * 4
