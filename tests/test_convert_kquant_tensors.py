"""convert-weights against llama-quantize on the real model, tensor for tensor.

tests/data/smollm2_kquant_tensors.json holds, for each file llama-quantize made from the F32
GGUF that `convert-weights SmolLM2-135M-Instruct.Q4_1.gguf --outtype f32` writes, every tensor's
type and the sha256 of its data (tests/data/README.md). Here the same F32 file is made again and:

- our plan gives every tensor llama-quantize's type, for every file listed, and --dry-run prints it;
- our quantizers give llama-quantize's bytes for every (tensor, type) pair of those files, and the
  Q4_K_M file convert-weights writes holds exactly llama-quantize's tensors;
- that file's logits follow llama.cpp's (tests/data/smollm2_kquants_greedy.json) as closely as
  llama.cpp's own follow the exact float forward pass of the same weights.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from alpaca_convert import convert
from alpaca_convert.converter import encode
from alpaca_convert.quant_plan import MIXES, plan
from conftest import DATA_DIR
from gguf import GGMLQuantizationType as T
from test_convert_mixes import SMOLLM2
from test_golden_logits import DECISIVE_MARGIN

import alpaca_cpu
from alpaca_cpu import _core
from alpaca_cpu.gguf_file import open_model_file
from alpaca_cpu.reference import ReferenceModel

pytestmark = pytest.mark.real_model

REFERENCE = json.loads((DATA_DIR / "smollm2_kquant_tensors.json").read_text())


def reference_tensors(file_type: str) -> dict[str, tuple[str, str]]:
    """Tensor name -> (GGML type name, sha256 of its data) in llama-quantize's file."""
    types = REFERENCE["files"][file_type]["types"]  # in the order of REFERENCE["tensors"]
    assert len(types) == len(REFERENCE["tensors"])
    return {name: (t, REFERENCE["data_sha256"][name][t])
            for (name, _), t in zip(REFERENCE["tensors"], types)}


FILE_TYPES = sorted(REFERENCE["files"])  # llama-quantize's names: Q4_K_M, Q5_0, ...
NATIVE = {T(row["id"]) for row in _core.type_traits() if row["is_weight"]}
# The files whose every type this build quantizes (plan made from SmolLM2's hyper-parameters).
WRITABLE = [f for f in FILE_TYPES if {t.type for t in plan(SMOLLM2, f.lower())} <= NATIVE]


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kquant") / "SmolLM2-135M-Instruct.F32.gguf"
    convert(smollm2_path, out, outtype="f32", out=io.StringIO())
    return out


def dry_run_types(path: Path, outtype: str) -> dict[str, str]:
    """Tensor name -> type name, as `convert-weights --dry-run` prints them."""
    text = io.StringIO()
    convert(path, None, outtype=outtype, dry_run=True, out=text)
    rows = [ln.split() for ln in text.getvalue().splitlines() if ln.startswith("  ")]
    assert all(r[3] == "->" for r in rows)
    return {r[0]: r[4] for r in rows}


def test_every_file_type_is_an_outtype() -> None:
    assert FILE_TYPES and {f.lower() for f in FILE_TYPES} <= set(MIXES)


def test_smollm2_f32_has_the_planned_shape(smollm2_f32: Path) -> None:
    """The plans below are made from SMOLLM2: it must have the real file's shapes (all a plan
    depends on)."""
    real = open_model_file(smollm2_f32).config
    fields = ("n_vocab", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
              "tied_embeddings")
    assert {f: getattr(real, f) for f in fields} == {f: getattr(SMOLLM2, f) for f in fields}


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_plan_has_llama_quantizes_types(file_type: str) -> None:
    want = {name: t for name, (t, _) in reference_tensors(file_type).items()}
    got = {t.name: t.type.name for t in plan(SMOLLM2, file_type.lower())}
    assert got.keys() == want.keys()
    assert int(MIXES[file_type.lower()].file_type) == \
        REFERENCE["files"][file_type]["general.file_type"]
    wrong = [f"{n}: {got[n]} (llama.cpp {want[n]})" for n in want if got[n] != want[n]]
    assert not wrong, f"{len(wrong)} of {len(want)} tensors differ: " + "; ".join(wrong[:5])


def test_dry_run_prints_the_plan(smollm2_f32: Path) -> None:
    """`convert-weights --dry-run` on the real file shows llama-quantize's types (one mix: the
    plan itself is compared for every mix above)."""
    want = {name: t for name, (t, _) in reference_tensors("Q4_K_M").items()}
    assert dry_run_types(smollm2_f32, "q4_k_m") == want


def test_writable_files_are_those_the_native_table_allows() -> None:
    """Every file llama-quantize made is one this build can write."""
    assert set(WRITABLE) == set(FILE_TYPES)


# Every (tensor, type) pair that occurs in some file, once: the bytes of a tensor in a given type
# are the same in every file that uses that type (tests/data/README.md), so quantizing each pair
# once checks all 13 files' tensors at the cost of about four conversions.
PAIRS: dict[str, set[str]] = {}
for _f in FILE_TYPES:
    for _name, (_t, _) in reference_tensors(_f).items():
        PAIRS.setdefault(_t, set()).add(_name)
# IQ4_NL's quantizer searches 15 scales per block (as llama-quantize does): all 180 of its
# tensors would take ~15 s of the suite, so two layers' (every shape and role it has) stand for
# the rest, plus the tensors outside the layers.
PAIRS["IQ4_NL"] = {n for n in PAIRS["IQ4_NL"]
                   if not n.startswith("blk.") or n.startswith(("blk.0.", "blk.29."))}


@pytest.mark.parametrize("type_name", sorted(PAIRS))
def test_quantized_tensors_have_llama_quantizes_bytes(type_name: str, smollm2_f32: Path) -> None:
    source = open_model_file(smollm2_f32).tensors
    wrong = []
    for name in sorted(PAIRS[type_name]):
        t = source[name]
        data = np.asarray(t.data)  # the F32 file's bytes
        if type_name != "F32":
            rows = data.view(np.float32).reshape(t.rows, t.cols)
            data = encode(rows, T[type_name], n_threads=2)
        got = hashlib.sha256(data.tobytes()).hexdigest()
        if got != REFERENCE["data_sha256"][name][type_name]:
            wrong.append(name)
    assert not wrong, f"{len(wrong)} of {len(PAIRS[type_name])} {type_name} tensors differ: " + \
        ", ".join(wrong[:5])


@pytest.fixture(scope="module")
def smollm2_q4_k_m(smollm2_f32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("kquant") / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
    convert(smollm2_f32, out, outtype="q4_k_m", out=io.StringIO(), quantizer="reference")
    return out


def test_written_file_has_llama_quantizes_tensors(smollm2_q4_k_m: Path) -> None:
    """End to end: the file convert-weights writes holds llama-quantize's tensors."""
    ours = open_model_file(smollm2_q4_k_m).tensors
    want = reference_tensors("Q4_K_M")
    assert ours.keys() == want.keys()
    wrong = [name for name, (type_name, sha) in want.items()
             if ours[name].type.name != type_name
             or hashlib.sha256(np.asarray(ours[name].data).tobytes()).hexdigest() != sha]
    assert not wrong, f"{len(wrong)} of {len(want)} tensors differ: " + "; ".join(wrong[:5])


# Teacher-forced logits on that file against llama.cpp's. Two correct engines that both quantize
# activations to int8 (Q8_K for K-quants, Q8_0 / Q8_1 otherwise) each land some distance from
# the exact float forward pass of the same weights (alpaca_cpu.reference); on this mix llama.cpp
# is up to 1.3 from it and ~0.56 on average for the "code" prompt, so the fixed max-1.5 /
# mean-0.40 distance to llama.cpp of test_golden_logits does not hold between two correct
# engines here. What must hold: we are no farther from the exact result than llama.cpp is, within
# ACCURACY_SLACK (float summation order and F16 rounding differ between the engines), and we pick
# llama.cpp's token wherever it was decisive.
ACCURACY_SLACK = 0.05  # mean over steps of the per-step max |logit - exact| on llama.cpp's top-5
KQUANT_GOLDEN = json.loads((DATA_DIR / "smollm2_kquants_greedy.json").read_text())


@pytest.fixture(scope="module")
def q4_k_m_logits(smollm2_q4_k_m: Path) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """Per golden case: (case, our logits, exact float logits) at the 48 generation steps."""
    model = alpaca_cpu.Model(smollm2_q4_k_m, n_ctx=512)
    exact = ReferenceModel(smollm2_q4_k_m, n_ctx=512)
    out = []
    for case in KQUANT_GOLDEN["models"]["Q4_K_M"]["cases"]:
        tokens = case["prompt_ids"] + case["generated_ids"]
        steps = slice(len(case["prompt_ids"]) - 1,
                      len(case["prompt_ids"]) - 1 + len(case["top5_logits"]))
        out.append((case, model.forward(tokens, all_logits=True)[steps],
                    np.asarray(exact.forward(tokens, all_logits=True))[steps]))
    return out


def test_q4_k_m_picks_llama_cpps_decisive_tokens(q4_k_m_logits) -> None:
    for case, ours, _ in q4_k_m_logits:
        for step, top5 in enumerate(case["top5_logits"]):
            if top5[0][1] - top5[1][1] > DECISIVE_MARGIN:
                assert int(ours[step].argmax()) == top5[0][0], f"{case['name']}: step {step}"


def test_q4_k_m_is_as_exact_as_llama_cpp(q4_k_m_logits) -> None:
    for case, ours, exact in q4_k_m_logits:
        ids = np.array([[i for i, _ in top5] for top5 in case["top5_logits"]])
        theirs = np.array([[v for _, v in top5] for top5 in case["top5_logits"]])
        rows = np.arange(len(ids))[:, None]
        ours_err = np.abs(ours[rows, ids] - exact[rows, ids]).max(axis=1).mean()
        their_err = np.abs(theirs - exact[rows, ids]).max(axis=1).mean()
        assert ours_err <= their_err + ACCURACY_SLACK, \
            f"{case['name']}: ours {ours_err:.3f} from exact, llama.cpp {their_err:.3f}"
