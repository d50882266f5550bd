"""Importance matrices without calibration data: text the model samples itself
(alpaca_cpu/self_calibration.py, alpaca-imatrix --self-generated, convert-weights --self-imatrix)."""

from __future__ import annotations

import io
from pathlib import Path

import gguf
import numpy as np
import pytest
from alpaca_convert import convert, converter
from alpaca_convert.cli import main as convert_main
from alpaca_convert.errors import ConvertError
from tiny_model import write_tiny_model

from alpaca_cpu import self_calibration
from alpaca_cpu.cli.imatrix import main as imatrix_main
from alpaca_cpu.cli.imatrix import self_generated_imatrix
from alpaca_cpu.gguf_file import open_model_file
from alpaca_cpu.imatrix import read_imatrix, write_imatrix
from alpaca_cpu.sampling import sample
from alpaca_cpu.self_calibration import UNFILTERED, sample_tokens
from alpaca_cpu.tokenizer import Tokenizer

N_CTX = 24  # small chunks: the tests check the mechanics, the README the quality


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Hugging Face LlamaForCausalLM folder (safetensors + SentencePiece tokenizer)."""
    from hf_tiny import TinyConfig, save_hf, tiny_llama, train_spm

    root = tmp_path_factory.mktemp("selfcal-hf")
    spm = train_spm(root / "tokenizer.model")
    return save_hf(tiny_llama(TinyConfig()), root / "hf", spm_model=spm)


@pytest.fixture(scope="module")
def tiny_f32(spm_folder: Path) -> Path:
    """That model as an F32 GGUF file, with its tokenizer (BOS and EOS)."""
    out = spm_folder.parent / "tiny.f32.gguf"
    convert(spm_folder, out, outtype="f32", progress=False, out=io.StringIO())
    return out


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """convert-weights --self-imatrix with 2 chunks of N_CTX tokens instead of 512."""
    monkeypatch.setattr(converter, "SELF_CTX", N_CTX)


def test_draws_follow_the_model_distribution_untruncated() -> None:
    """Token 0 has half the mass, 99 others share the rest (0.005 each: what top-k 40, top-p
    0.95 or min-p 0.05 would cut). 4000 draws: the binomial sd of a frequency near 0.5 is
    0.0079, so 0.03 is 3.8 sd; with truncation token 0 would take ~100 %, at temperature 2 ~9 %.
    """
    tolerance = 0.03
    rng = np.random.default_rng(0)
    logits = np.full(100, np.log(0.5 / 99), dtype=np.float32)
    logits[0] = np.log(0.5)
    draws = np.array([sample(logits, UNFILTERED, rng) for _ in range(4000)])
    assert abs((draws == 0).mean() - 0.5) < tolerance
    assert len(set(draws.tolist())) > 90  # the tail is drawn too


def test_tokens_are_seeded_start_at_bos_and_do_not_depend_on_threads(tiny_f32: Path) -> None:
    tok = Tokenizer.from_metadata(open_model_file(tiny_f32).metadata)
    a = sample_tokens(tiny_f32, n_chunks=2, n_ctx=N_CTX, seed=5, n_threads=1)
    assert len(a) == 2 * N_CTX
    assert a[0] == tok.bos_id and a[N_CTX] == tok.bos_id
    assert all(0 <= t < tok.n_vocab for t in a)
    assert sample_tokens(tiny_f32, n_chunks=2, n_ctx=N_CTX, seed=5, n_threads=2) == a
    b = sample_tokens(tiny_f32, n_chunks=2, n_ctx=N_CTX, seed=6, n_threads=1)
    assert b != a
    assert len(set(a)) > N_CTX // 2  # sampled, not one token repeated


def test_an_end_of_text_token_starts_a_new_document(tiny_f32: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that always ends its text: every sampled EOS becomes BOS, as packed documents."""
    import alpaca_cpu.model

    tok = Tokenizer.from_metadata(open_model_file(tiny_f32).metadata)
    assert tok.eos_id is not None and tok.eos_id != tok.bos_id

    class AlwaysEnds:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def forward(self, tokens: list[int], start_pos: int = 0) -> np.ndarray:
            logits = np.full(tok.n_vocab, -1e9, dtype=np.float32)
            logits[tok.eos_id] = 0.0
            return logits

    monkeypatch.setattr(alpaca_cpu.model, "Model", AlwaysEnds)
    assert sample_tokens(tiny_f32, n_chunks=1, n_ctx=8) == [tok.bos_id] * 8


def test_bad_sizes_and_a_file_without_tokenizer_refused(tiny_f32: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_chunks >= 1"):
        sample_tokens(tiny_f32, n_chunks=0, n_ctx=N_CTX)
    bare = write_tiny_model(tmp_path / "bare.gguf")
    with pytest.raises(ValueError, match="no tokenizer"):
        sample_tokens(bare, n_chunks=1, n_ctx=N_CTX)


def test_imatrix_cli_self_generated(tiny_f32: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "self.imatrix.gguf"
    assert imatrix_main(["-m", str(tiny_f32), "--self-generated", "-c", str(N_CTX),
                         "--chunks", "2", "--seed", "3", "-q", "-o", str(out)]) == 0
    im = read_imatrix(out)
    assert im.chunk_count == 2 and im.chunk_size == N_CTX
    assert im.datasets == ["self-generated (seed 3)"]
    assert len(im) == open_model_file(tiny_f32).config.n_layers * 7
    again = self_generated_imatrix(tiny_f32, 2, N_CTX, seed=3, progress=False)
    for name in im.sums:  # the same seed: the same activations
        np.testing.assert_allclose(im.sums[name], again.sums[name], rtol=1e-6)
    with pytest.raises(SystemExit):  # a text and --self-generated: one source only
        imatrix_main(["-m", str(tiny_f32), "--self-generated", "-f", str(tiny_f32),
                      "-o", str(tmp_path / "x.gguf")])
    capsys.readouterr()


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data) for t in gguf.GGUFReader(path).tensors}


def test_convert_self_imatrix_equals_convert_with_that_imatrix(
        tiny_f32: Path, tmp_path: Path, small_chunks: None) -> None:
    """--self-imatrix is alpaca-imatrix --self-generated then --imatrix: same bytes, every run;
    and not the bytes of the search without importance."""
    convert(tiny_f32, tmp_path / "self.gguf", outtype="q4_0", self_imatrix=True, force=True,
            progress=False)
    convert(tiny_f32, tmp_path / "self2.gguf", outtype="q4_0", self_imatrix=True,
            progress=False)
    im = self_generated_imatrix(tiny_f32, converter.SELF_CHUNKS, N_CTX, converter.SELF_SEED,
                                progress=False)
    write_imatrix(tmp_path / "im.gguf", im)
    convert(tiny_f32, tmp_path / "file.gguf", outtype="q4_0", imatrix=tmp_path / "im.gguf",
            progress=False)
    convert(tiny_f32, tmp_path / "plain.gguf", outtype="q4_0", progress=False)
    ours = _tensor_bytes(tmp_path / "self.gguf")
    assert ours == _tensor_bytes(tmp_path / "self2.gguf")
    assert ours == _tensor_bytes(tmp_path / "file.gguf")
    assert ours != _tensor_bytes(tmp_path / "plain.gguf")
    meta = open_model_file(tmp_path / "self.gguf").metadata
    assert meta["quantize.imatrix.dataset"] == f"self-generated (seed {converter.SELF_SEED})"
    assert meta["quantize.imatrix.chunks_count"] == converter.SELF_CHUNKS


def test_convert_self_imatrix_from_a_folder_leaves_no_temporary_file(
        tmp_path: Path, small_chunks: None, spm_folder: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    convert(spm_folder, out_dir / "m.gguf", outtype="q4_0", self_imatrix=True, progress=False)
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.gguf"]
    meta = open_model_file(out_dir / "m.gguf").metadata
    assert meta["quantize.imatrix.dataset"].startswith("self-generated")


def test_convert_self_imatrix_refusals(tiny_f32: Path, tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="--self-imatrix and --imatrix"):
        convert(tiny_f32, tmp_path / "x.gguf", self_imatrix=True, imatrix=tmp_path / "im.gguf")
    with pytest.raises(ConvertError, match="needs --quantizer search"):
        convert(tiny_f32, tmp_path / "x.gguf", self_imatrix=True, quantizer="reference")
    assert not (tmp_path / "x.gguf").exists()


def test_dry_run_says_what_will_be_made(tiny_f32: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert convert_main([str(tiny_f32), "--self-imatrix", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"self-generated before quantizing: {self_calibration.DEFAULT_CHUNKS} chunks" in text
    assert "blk.0.attn_q.weight" in text and "search+imatrix" in text
