"""Importance matrices (alpaca_cpu/imatrix.py, alpaca-imatrix): llama.cpp's file formats,
collection through the numpy forward pass, and their use by convert-weights --imatrix."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from alpaca_convert import convert
from alpaca_convert.errors import ConvertError
from gguf import GGMLQuantizationType as T
from tiny_model import TinySpec, write_tiny_model

from alpaca_cpu.cli.imatrix import collect
from alpaca_cpu.gguf_file import open_model_file
from alpaca_cpu.imatrix import Imatrix, ImatrixError, read_imatrix, write_imatrix
from alpaca_cpu.quants import dequantize
from alpaca_cpu.reference import ReferenceModel

SPEC = TinySpec()  # dim 64, ffn 96, 2 layers, vocab 320
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("imatrix") / "tiny.gguf", SPEC)


def test_collect_sums_squared_inputs_of_every_layer_matrix(tiny_f32: Path) -> None:
    model = ReferenceModel(tiny_f32, n_ctx=16)
    tokens = list(np.random.default_rng(0).integers(0, SPEC.n_vocab, 40))
    im = collect(model, tokens, 16, bos_id=1, progress=False)
    assert im.chunk_count == 2 and im.chunk_size == 16  # 40 // 16 chunks
    assert sorted(im.sums) == sorted(f"blk.{i}.{m}.weight" for i in range(SPEC.n_layers)
                                     for m in MATRICES)
    assert all(c == 32 for c in im.counts.values())
    # q, k and v read the same input; its mean square is what a hand-run forward pass gives.
    np.testing.assert_array_equal(im.sums["blk.1.attn_q.weight"], im.sums["blk.1.attn_v.weight"])
    seen: list[np.ndarray] = []
    model.observer = lambda name, x: seen.append(x) if name == "blk.0.ffn_down.weight" else None
    for i in range(2):
        chunk = tokens[16 * i : 16 * (i + 1)]
        model.forward([1] + chunk[1:], start_pos=0)
    expect = sum((x.astype(np.float64) ** 2).sum(axis=0) for x in seen)
    np.testing.assert_allclose(im.sums["blk.0.ffn_down.weight"], expect, rtol=1e-12)
    assert im.importance("blk.0.ffn_down.weight").shape == (SPEC.ffn_dim,)


def test_calibration_shorter_than_one_chunk_refused(tiny_f32: Path) -> None:
    model = ReferenceModel(tiny_f32, n_ctx=16)
    with pytest.raises(ValueError, match="has 15 tokens, fewer than one chunk of 16"):
        collect(model, list(range(15)), 16, bos_id=1, progress=False)


@pytest.mark.real_model
def test_cli_refuses_a_short_text(smollm2_path: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from alpaca_cpu.cli.imatrix import main

    text = tmp_path / "short.txt"
    text.write_text("Far too short to calibrate anything.\n")
    out = tmp_path / "im.gguf"
    assert main(["-m", str(smollm2_path), "-f", str(text), "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "alpaca-imatrix: error: the calibration text has" in err
    assert "fewer than one chunk of 512 (-c)" in err
    assert not out.exists()


def sample_imatrix() -> Imatrix:
    rng = np.random.default_rng(5)
    im = Imatrix(datasets=["calib.txt"], chunk_count=3, chunk_size=512)
    for name, cols in (("blk.0.attn_q.weight", 64), ("blk.0.ffn_down.weight", 96)):
        im.sums[name] = rng.random(cols) * 1000
        im.counts[name] = 1536.0
    return im


def test_gguf_round_trip_in_llama_cpp_layout(tmp_path: Path) -> None:
    import gguf

    im = sample_imatrix()
    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, im)
    back = read_imatrix(path)
    assert back.datasets == ["calib.txt"] and back.chunk_count == 3 and back.chunk_size == 512
    for name in im.sums:
        np.testing.assert_allclose(back.sums[name], im.sums[name].astype(np.float32))
        assert back.counts[name] == 1536.0
    # The layout llama.cpp's reader (common/imatrix-loader) expects.
    r = gguf.GGUFReader(str(path))
    assert r.get_field("general.type").contents() == "imatrix"
    shapes = {t.name: (t.tensor_type, list(t.shape)) for t in r.tensors}
    assert shapes["blk.0.ffn_down.weight.in_sum2"] == (T.F32, [96, 1])
    assert shapes["blk.0.ffn_down.weight.counts"] == (T.F32, [1, 1])


def legacy_bytes(entries: dict[str, tuple[int, np.ndarray]], chunks: int, dataset: str) -> bytes:
    out = struct.pack("<i", len(entries))
    for name, (ncall, values) in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall,
                                                                           len(values))
        out += values.astype("<f4").tobytes()
    return out + struct.pack("<i", chunks) + struct.pack("<i", len(dataset)) + dataset.encode()


def test_legacy_dat_read_as_llama_quantize_does(tmp_path: Path) -> None:
    values = np.array([2.0, 4.0, 6.0, 8.0], dtype=np.float32)  # mean * ncall
    path = tmp_path / "imatrix.dat"
    path.write_bytes(legacy_bytes({"blk.0.attn_q.weight": (2, values)}, 7, "wiki.txt"))
    im = read_imatrix(path)
    np.testing.assert_allclose(im.importance("blk.0.attn_q.weight"), values / 2)
    assert im.chunk_count == 7 and im.datasets == ["wiki.txt"]


@pytest.mark.parametrize("cut", [2, 9, 30])
def test_truncated_or_foreign_files_refused(tmp_path: Path, cut: int) -> None:
    good = legacy_bytes({"blk.0.attn_q.weight": (2, np.ones(4, np.float32))}, 1, "x")
    path = tmp_path / "bad.dat"
    path.write_bytes(good[:cut])
    with pytest.raises(ImatrixError, match=str(path)):
        read_imatrix(path)
    model = tmp_path / "model.gguf"
    write_tiny_model(model, SPEC)
    with pytest.raises(ImatrixError, match="not an imatrix file"):
        read_imatrix(model)


def test_convert_with_imatrix_lowers_the_weighted_error(tiny_f32: Path, tmp_path: Path) -> None:
    """Every Q4_0 matrix with an entry gets a lower importance-weighted error than without
    the imatrix; --dry-run names the method of each tensor; the file records the imatrix."""
    rng = np.random.default_rng(6)
    im = Imatrix(datasets=["calib.txt"], chunk_count=1, chunk_size=16)
    src = open_model_file(tiny_f32)
    for name, t in src.tensors.items():
        if name.startswith("blk.") and not name.endswith("norm.weight"):
            im.sums[name] = rng.gamma(0.3, 3.0, t.cols)
            im.counts[name] = 1.0
    imatrix = tmp_path / "im.gguf"
    write_imatrix(imatrix, im)
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    convert(tiny_f32, plain, outtype="q4_0")
    convert(tiny_f32, weighted, outtype="q4_0", imatrix=imatrix)
    a, b = open_model_file(plain), open_model_file(weighted)
    assert b.metadata["quantize.imatrix.file"] == "im.gguf"
    assert b.metadata["quantize.imatrix.entries_count"] == len(im)
    for name in im.sums:
        s = src.tensors[name]
        x = dequantize(s.data, s.type, s.cols).astype(np.float64)
        imp = im.importance(name).astype(np.float64)

        def err(mf: object, name: str = name, x: np.ndarray = x, imp: np.ndarray = imp) -> float:
            t = mf.tensors[name]
            assert t.type == T.Q4_0
            return float((imp * (x - dequantize(t.data, t.type, t.cols)) ** 2).sum())

        assert err(b) < err(a), name
    import io

    buf = io.StringIO()
    convert(tiny_f32, None, outtype="q4_0", imatrix=imatrix, dry_run=True, out=buf)
    lines = {line.split()[0]: line for line in buf.getvalue().splitlines()
             if line.startswith("  ")}
    assert f"imatrix:   {imatrix}: {len(im)} matrices" in buf.getvalue()
    assert lines["blk.0.attn_q.weight"].endswith("Q4_0") is False
    assert lines["blk.0.attn_q.weight"].split()[-1] == "search+imatrix"
    assert lines["token_embd.weight"].split()[-1] == "search"  # no entry for it
    assert lines["blk.0.attn_norm.weight"].split()[-1] == "convert"
    with pytest.raises(ConvertError, match="needs --quantizer search"):
        convert(tiny_f32, None, outtype="q4_0", imatrix=imatrix, quantizer="reference",
                dry_run=True)


def llama_cpp_tool(name: str) -> str:
    """A llama.cpp binary from $LLAMA_CPP_BIN or PATH; skip when absent (llama.cpp is not part
    of this project, and CI does not build it)."""
    import os
    import shutil

    found = shutil.which(name, path=os.environ.get("LLAMA_CPP_BIN") or None) or \
        shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found (set LLAMA_CPP_BIN to a llama.cpp build's bin folder)")
    return found


# Per-column mean squared activations: ours (numpy float32 forward) against llama-imatrix's
# (ggml float32 kernels, its own tokenization of the same text); measured: max difference 4.6 %
# of the matrix's largest value, median 0.1 %.
IMPORTANCE_ATOL_OF_MAX = 0.1


@pytest.mark.slow
@pytest.mark.real_model
def test_files_interoperate_with_llama_cpp(smollm2_path: Path, tmp_path: Path) -> None:
    """Our imatrix in llama-quantize and llama-imatrix (which merges it with its own), and
    llama-imatrix's in ours: the same matrices, importances that agree, summed counts. (Both
    run the Q4_1 file; llama.cpp multiplies it with 8-bit activations, we in float32.)"""
    import subprocess

    imatrix_bin, quantize_bin = llama_cpp_tool("llama-imatrix"), llama_cpp_tool("llama-quantize")
    text = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration_sample.txt"
    ours, theirs, merged = tmp_path / "ours.gguf", tmp_path / "theirs.gguf", tmp_path / "m.gguf"
    from alpaca_cpu.cli.imatrix import main as imatrix_main

    assert imatrix_main(["-m", str(smollm2_path), "-f", str(text), "-o", str(ours), "-q",
                         "--chunks", "2"]) == 0

    def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                              timeout=600, check=False)

    r = run(imatrix_bin, "-m", smollm2_path, "-f", text, "-o", theirs, "-c", "512", "--chunks",
            "2", "-t", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = read_imatrix(ours), read_imatrix(theirs)
    assert sorted(a.sums) == sorted(b.sums) and len(a) == 210
    for name in a.sums:
        ia, ib = a.importance(name), b.importance(name)
        assert np.abs(ia - ib).max() <= IMPORTANCE_ATOL_OF_MAX * ib.max(), name
    r = run(imatrix_bin, "-m", smollm2_path, "--in-file", ours, "--in-file", theirs, "-o", merged)
    assert r.returncode == 0, r.stderr[-2000:]
    m = read_imatrix(merged)
    name = "blk.7.ffn_down.weight"
    assert m.counts[name] == a.counts[name] + b.counts[name]
    np.testing.assert_allclose(m.sums[name], a.sums[name] + b.sums[name], rtol=1e-5)
    q = tmp_path / "q4_0.gguf"
    r = run(quantize_bin, "--allow-requantize", "--imatrix", ours, smollm2_path, q, "Q4_0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"loaded 210 importance matrix entries from {ours}" in r.stdout + r.stderr
