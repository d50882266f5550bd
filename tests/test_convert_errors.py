"""convert-weights refuses bad input with a clear message, never runs pickled code, and never
leaves a partial or clobbered output file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import alpaca_convert.converter as convert_module
import numpy as np
import pytest
import torch
from alpaca_convert import ConvertError, convert
from alpaca_convert.cli import main
from hf_tiny import TinyConfig, save_hf, save_meta, tiny_llama, train_spm
from safetensors.torch import save_file

from alpaca_cpu.gguf_file import open_model_file


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, spm_model: Path) -> Path:
    return save_hf(tiny_llama(TinyConfig(n_kv_heads=2)), tmp_path_factory.mktemp("hf") / "m",
                   spm_model=spm_model)


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory: pytest.TempPathFactory, spm_model: Path) -> Path:
    return save_meta(tiny_llama(TinyConfig(n_kv_heads=2)), tmp_path_factory.mktemp("meta") / "m",
                     2, spm_model)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


class Payload:
    """A pickle that runs a shell command when loaded by a plain unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


# ---- untrusted pickles ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_pickle_carrying_code_is_refused_and_never_runs(kind: str, hf_dir: Path,
                                                        tmp_path: Path) -> None:
    folder = copy(hf_dir, tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    if kind == "zip":  # what torch.save writes
        torch.save({"model.embed_tokens.weight": torch.zeros(4), "x": Payload(marker)},
                   folder / "pytorch_model.bin")
    else:  # a bare pickle, as torch's legacy format starts
        with open(folder / "pytorch_model.bin", "wb") as f:
            pickle.dump({"model.embed_tokens.weight": [0.0], "x": Payload(marker)}, f, protocol=2)
    with pytest.raises(ConvertError, match=r"pytorch_model.bin: refused to load: the pickle "
                                           r"wants to run code.*GLOBAL posix.system"):
        convert(folder, tmp_path / "out.gguf")
    assert not marker.exists()
    assert not (tmp_path / "out.gguf").exists()
    if kind == "legacy":  # the payload is live: a plain unpickler would have run it
        with open(folder / "pytorch_model.bin", "rb") as f:
            pickle.load(f)
        assert marker.exists()


def test_meta_shard_carrying_code_is_refused(meta_dir: Path, tmp_path: Path) -> None:
    folder = copy(meta_dir, tmp_path / "meta")
    marker = tmp_path / "pwned"
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    torch.save(shard | {"extra": Payload(marker)}, folder / "consolidated.01.pth")
    with pytest.raises(ConvertError, match="consolidated.01.pth: refused to load"):
        convert(folder, tmp_path / "out.gguf")
    assert not marker.exists()


def test_non_tensor_entries_are_refused(hf_dir: Path, tmp_path: Path) -> None:
    folder = copy(hf_dir, tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(4), "step": 3},
               folder / "pytorch_model.bin")
    with pytest.raises(ConvertError, match="entry 'step' is a int, expected a tensor"):
        convert(folder, tmp_path / "out.gguf")


# ---- layout, config and tensors -------------------------------------------------------------

def test_missing_params_json(meta_dir: Path, tmp_path: Path) -> None:
    folder = copy(meta_dir, tmp_path / "meta")
    (folder / "params.json").unlink()
    with pytest.raises(ConvertError, match="missing params.json"):
        convert(folder, tmp_path / "out.gguf")


def test_missing_config_json(hf_dir: Path, tmp_path: Path) -> None:
    folder = copy(hf_dir, tmp_path / "hf")
    (folder / "config.json").unlink()
    with pytest.raises(ConvertError, match="missing config.json"):
        convert(folder, tmp_path / "out.gguf")


def test_unrecognised_folder_and_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="cannot tell the checkpoint layout"):
        convert(tmp_path / "empty", tmp_path / "out.gguf")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConvertError, match="a file that is not GGUF"):
        convert(tmp_path / "notes.txt", tmp_path / "out.gguf")
    with pytest.raises(ConvertError, match="no such file or folder"):
        convert(tmp_path / "nothing", tmp_path / "out.gguf")


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_missing_tokenizer(layout: str, hf_dir: Path, meta_dir: Path, tmp_path: Path) -> None:
    folder = copy(hf_dir if layout == "hf" else meta_dir, tmp_path / "x" / "ckpt")
    (folder / "tokenizer.model").unlink()
    with pytest.raises(ConvertError, match="missing tokenizer: expected tokenizer.model"):
        convert(folder, tmp_path / "out.gguf")


@pytest.mark.parametrize("layout, name", [("hf", "config.json"), ("hf", "tokenizer_config.json"),
                                          ("meta", "params.json"), ("lora", "adapter_config.json")])
@pytest.mark.parametrize("text, message", [("[1, 2]", "expected a JSON object"),
                                           ("{broken", r"cannot read JSON \(Expecting")])
def test_json_files_must_hold_an_object(layout: str, name: str, text: str, message: str,
                                        hf_dir: Path, meta_dir: Path, tmp_path: Path) -> None:
    folder = copy(meta_dir if layout == "meta" else hf_dir, tmp_path / "ckpt")
    lora = None
    if layout == "lora":
        lora = tmp_path / "adapter"
        lora.mkdir()
    bad = (lora or folder) / name
    bad.write_text(text)
    with pytest.raises(ConvertError, match=rf"^{bad}: {message}"):
        convert(folder, tmp_path / "out.gguf", lora=lora)


def edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | changes))


def test_unknown_architecture(hf_dir: Path, tmp_path: Path) -> None:
    folder = copy(hf_dir, tmp_path / "hf")
    edit_config(folder, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ConvertError, match=r"unknown architecture \['GPT2LMHeadModel'\], "
                                           "expected LlamaForCausalLM"):
        convert(folder, tmp_path / "out.gguf")


def test_rope_scaling_is_refused(hf_dir: Path, tmp_path: Path) -> None:
    folder = copy(hf_dir, tmp_path / "hf")
    edit_config(folder, rope_parameters={"rope_theta": 10000.0, "rope_type": "yarn",
                                         "factor": 4.0})
    with pytest.raises(ConvertError, match="RoPE scaling 'yarn' is not supported"):
        convert(folder, tmp_path / "out.gguf")


def test_unexpected_tensor_name(hf_dir: Path, tmp_path: Path) -> None:
    folder = copy(hf_dir, tmp_path / "hf")
    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
              folder / "model.safetensors")
    with pytest.raises(ConvertError, match=r"unexpected tensor name\(s\) for LlamaForCausalLM: "
                                           r"model.layers.0.self_attn.q_proj.bias"):
        convert(folder, tmp_path / "out.gguf")


def test_unexpected_tensor_shape(hf_dir: Path, tmp_path: Path) -> None:
    folder = copy(hf_dir, tmp_path / "hf")
    edit_config(folder, intermediate_size=160)
    with pytest.raises(ConvertError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' has "
                                           r"shape \[64, 192\], expected \[64, 160\] from "
                                           "config.json"):
        convert(folder, tmp_path / "out.gguf")


def test_missing_tensor(hf_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = copy(hf_dir, tmp_path / "hf")
    weights = load_file(folder / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ConvertError, match=r"missing tensor\(s\) output.weight"):
        convert(folder, tmp_path / "out.gguf")


def test_corrupt_safetensors_header(hf_dir: Path, tmp_path: Path) -> None:
    folder = copy(hf_dir, tmp_path / "hf")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[0:8] = (1 << 40).to_bytes(8, "little")
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ConvertError, match="safetensors header length 1099511627776 is larger"):
        convert(folder, tmp_path / "out.gguf")


def test_meta_unexpected_shape(meta_dir: Path, tmp_path: Path) -> None:
    folder = copy(meta_dir, tmp_path / "meta")
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps(params | {"multiple_of": 256}))
    with pytest.raises(ConvertError, match=r"tensor 'layers.0.feed_forward.w1.weight' has shard "
                                           r"shapes \[\[96, 64\], \[96, 64\]\], which do not "
                                           r"merge to \[256, 64\]"):
        convert(folder, tmp_path / "out.gguf")


def test_meta_shards_disagreeing_on_a_norm(meta_dir: Path, tmp_path: Path) -> None:
    folder = copy(meta_dir, tmp_path / "meta")
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    shard["layers.1.ffn_norm.weight"] += 1
    torch.save(shard, folder / "consolidated.01.pth")
    with pytest.raises(ConvertError, match="consolidated.01.pth: tensor 'layers.1.ffn_norm.weight'"
                                           " differs from its copy in consolidated.00.pth"):
        convert(folder, tmp_path / "out.gguf")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("change", ["missing", "extra", "gap"])
def test_meta_shard_count_mismatch(change: str, meta_dir: Path, tmp_path: Path) -> None:
    folder = copy(meta_dir, tmp_path / "meta")
    if change == "missing":
        (folder / "consolidated.01.pth").unlink()
    elif change == "extra":
        shutil.copy(folder / "consolidated.01.pth", folder / "consolidated.02.pth")
    else:
        (folder / "consolidated.01.pth").rename(folder / "consolidated.02.pth")
    with pytest.raises(ConvertError, match="shard count mismatch"):
        convert(folder, tmp_path / "out.gguf")


def test_hf_shard_count_mismatch(spm_model: Path, tmp_path: Path) -> None:
    folder = save_hf(tiny_llama(TinyConfig()), tmp_path / "hf", "sharded", spm_model=spm_model)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    n = len(shards)
    assert n > 2
    shards[1].unlink()
    with pytest.raises(ConvertError, match=f"shard count mismatch: names {shards[1].name}, "
                                           "which is missing"):
        convert(folder, tmp_path / "out.gguf")
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(ConvertError, match=rf"shard count mismatch in model-\*-of-\*.safetensors:"
                                           rf" found {n - 1} file\(s\) for {n} shard\(s\) "
                                           r"\(missing: \[2\]"):
        convert(folder, tmp_path / "out.gguf")


def test_corrupt_gguf_input(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(ConvertError, match=r"bad\.gguf: "):  # the engine's own validation
        convert(tmp_path / "bad.gguf", tmp_path / "out.gguf")


def test_unknown_outtype(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="--outtype 'q5_k', expected one of f32, f16"):
        convert(hf_dir, tmp_path / "out.gguf", outtype="q5_k")


# ---- safe writing ---------------------------------------------------------------------------

def test_existing_output_needs_force(hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(ConvertError, match="out.gguf: already exists; use --force"):
        convert(hf_dir, out)
    assert out.read_bytes() == b"precious"
    convert(hf_dir, out, force=True)
    assert open_model_file(out).config.n_layers == 2
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert leftovers(tmp_path) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failure_midway_leaves_no_partial_file(failure: BaseException, existing: bool,
                                               hf_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.gguf"
    if existing:
        out.write_bytes(b"precious")
    real_encode, calls = convert_module.encode, []

    def failing_encode(w: np.ndarray, qtype: object, n_threads: int, *rest: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 6:  # header and five tensors are already in the temporary file
            assert leftovers(tmp_path)
            raise failure
        return real_encode(w, qtype, n_threads, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_module, "encode", failing_encode)
    with pytest.raises(type(failure)):
        convert(hf_dir, out, force=existing)
    assert leftovers(tmp_path) == []
    assert out.read_bytes() == b"precious" if existing else not out.exists()


# ---- command line ---------------------------------------------------------------------------

def test_cli_converts_with_progress_and_summary(hf_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.gguf"
    assert main([str(hf_dir), "-o", str(out), "--outtype", "q8_0", "--threads", "2"]) == 0
    captured = capsys.readouterr()
    assert "%|" in captured.err and "B/s" in captured.err  # a progress bar was drawn
    assert f"wrote {out}: 0.15 M parameters" in captured.out
    assert "bits per weight" in captured.out
    assert open_model_file(out).tensors["blk.0.attn_q.weight"].type.name == "Q8_0"


def test_cli_dry_run_writes_nothing(hf_dir: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.gguf"
    assert main([str(hf_dir), "-o", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "input:     Hugging Face LlamaForCausalLM, 1 safetensors file" in text
    assert "tokenizer: SentencePiece from tokenizer.model, 384 tokens" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()
            if line.startswith("  ")}
    assert "quantizer: search (error-minimising scales" in text
    assert rows["output.weight"] == ["384x64", "F32", "->", "Q8_0", "25.5", "KiB", "search"]
    assert rows["blk.1.ffn_down.weight"] == ["64x192", "F32", "->", "Q4_0", "6.8", "KiB",
                                             "search"]
    assert rows["output_norm.weight"][1:4] == ["F32", "->", "F32"]
    assert "dry run: inputs checked, nothing written" in text
    assert not out.exists() and leftovers(tmp_path) == []


def test_cli_reports_errors_and_interrupts(hf_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert main([str(tmp_path / "nothing"), "-o", str(tmp_path / "m.gguf")]) == 1
    assert "convert-weights: error: " in capsys.readouterr().err
    assert main([str(hf_dir)]) == 1
    assert "no output file given" in capsys.readouterr().err

    def interrupted(*args: object, **kwargs: object) -> np.ndarray:
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "encode", interrupted)
    assert main([str(hf_dir), "-o", str(tmp_path / "m.gguf"), "-q"]) == 130
    assert "interrupted; no output written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
