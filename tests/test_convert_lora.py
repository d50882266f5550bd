"""convert-weights --lora: a PEFT LoRA adapter merged into the base weights gives the logits
peft computes with the adapter applied at run time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from alpaca_convert import ConvertError, convert
from hf_tiny import TinyConfig, save_hf, save_meta, tiny_llama, train_spm
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

import alpaca_cpu
from alpaca_cpu.gguf_file import open_model_file

# peft 0.21 still calls a transformers 5 property that warns of its own deprecation.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# Merged F32 file vs peft at run time: W + s*B@A is rounded once in float32 instead of adding
# two float32 products, so a little more than test_convert_hf.F32_RTOL.
LORA_F32_RTOL = 1e-4
TOKENS = [1, 90, 13, 250, 7, 33, 301, 2, 64]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_spm(tmp_path_factory.mktemp("spm") / "tokenizer.model")


def make_adapter(base_cfg: TinyConfig, folder: Path, fmt: str,
                 **lora_kwargs: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base model, peft model with a random non-zero adapter), the adapter saved to folder."""
    base = tiny_llama(base_cfg)
    peft_model = get_peft_model(tiny_llama(base_cfg), LoraConfig(
        init_lora_weights=False, lora_dropout=0.0, **lora_kwargs)).eval()  # type: ignore[arg-type]
    with torch.no_grad():  # PEFT's non-default init is tiny; make the update matter
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)))
                        * 0.2)
    if fmt == "safetensors":
        peft_model.save_pretrained(folder)
    else:  # alpaca-lora's format: adapter_config.json + adapter_model.bin
        peft_model.save_pretrained(folder)
        (folder / "adapter_model.safetensors").unlink()
        torch.save(get_peft_model_state_dict(peft_model), folder / "adapter_model.bin")
    return base, peft_model


def logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


@pytest.mark.parametrize("fmt, kwargs", [
    ("safetensors", {"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR}),
    ("bin", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
             "use_rslora": True, "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"v_proj": 3}}),
])
def test_merged_logits_equal_peft(fmt: str, kwargs: dict, spm_model: Path,
                                  tmp_path: Path) -> None:
    cfg = TinyConfig(n_kv_heads=2, seed=5)
    base, peft_model = make_adapter(cfg, tmp_path / "adapter", fmt, **kwargs)
    folder = save_hf(base, tmp_path / "base", spm_model=spm_model)
    ref, plain = logits(peft_model), logits(base)
    assert np.abs(ref - plain).max() > 0.1 * np.abs(plain).max()  # the adapter matters

    convert(folder, tmp_path / "merged.gguf", outtype="f32", lora=tmp_path / "adapter")
    ours = alpaca_cpu.Model(tmp_path / "merged.gguf", n_ctx=32, kv_type="f32").forward(
        TOKENS, all_logits=True)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= LORA_F32_RTOL


def test_lora_on_meta_base_equals_lora_on_hf_base(spm_model: Path, tmp_path: Path) -> None:
    """Adapters are trained on the HF layout: on a Meta base the update's q/k rows are
    permuted like the base weights."""
    cfg = TinyConfig(n_kv_heads=2, seed=6)
    base, _ = make_adapter(cfg, tmp_path / "adapter", "safetensors", r=4, lora_alpha=4,
                           target_modules=["q_proj", "k_proj"])
    hf = save_hf(base, tmp_path / "hf", spm_model=spm_model)
    meta = save_meta(base, tmp_path / "meta", 2, spm_model)
    convert(hf, tmp_path / "hf.gguf", outtype="q8_0", lora=tmp_path / "adapter")
    convert(meta, tmp_path / "meta.gguf", outtype="q8_0", lora=tmp_path / "adapter")
    a, b = open_model_file(tmp_path / "hf.gguf"), open_model_file(tmp_path / "meta.gguf")
    for name, t in a.tensors.items():
        assert np.array_equal(t.data, b.tensors[name].data), name


def test_lora_on_gguf_base_equals_lora_on_hf_base(spm_model: Path, tmp_path: Path) -> None:
    """A GGUF file as the base: its q/k rows are already interleaved, the update is permuted."""
    cfg = TinyConfig(n_kv_heads=2, seed=8)
    base, _ = make_adapter(cfg, tmp_path / "adapter", "safetensors", r=4, lora_alpha=8,
                           target_modules=ALL_LINEAR)
    hf = save_hf(base, tmp_path / "hf", spm_model=spm_model)
    convert(hf, tmp_path / "base.gguf", outtype="f32")
    convert(hf, tmp_path / "a.gguf", outtype="q4_0", lora=tmp_path / "adapter")
    convert(tmp_path / "base.gguf", tmp_path / "b.gguf", outtype="q4_0",
            lora=tmp_path / "adapter")
    a, b = open_model_file(tmp_path / "a.gguf"), open_model_file(tmp_path / "b.gguf")
    for name, t in a.tensors.items():
        assert np.array_equal(t.data, b.tensors[name].data), name


def test_adapter_errors(spm_model: Path, tmp_path: Path) -> None:
    cfg = TinyConfig(seed=7)
    base, _ = make_adapter(cfg, tmp_path / "adapter", "safetensors", r=4, lora_alpha=8,
                           target_modules=["q_proj"])
    folder = save_hf(base, tmp_path / "base", spm_model=spm_model)
    out = tmp_path / "m.gguf"
    with pytest.raises(ConvertError, match="missing adapter_config.json"):
        convert(folder, out, lora=tmp_path / "base")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ConvertError, match="use_dora = true is not supported"):
        convert(folder, out, lora=tmp_path / "adapter")
    config_path.write_text(json.dumps(config | {"r": 5}))
    with pytest.raises(ConvertError, match="has rank 4, adapter_config.json says 5"):
        convert(folder, out, lora=tmp_path / "adapter")
    config_path.write_text(json.dumps(config))
    # an adapter for a bigger model does not fit
    make_adapter(TinyConfig(dim=128, n_heads=4, ffn_dim=352), tmp_path / "big",
                            "safetensors", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ConvertError, match=r"do not fit its weight \[64, 64\]"):
        convert(folder, out, lora=tmp_path / "big")
    assert not out.exists()
