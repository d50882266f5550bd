"""Merging a PEFT LoRA adapter (as alpaca-lora publishes) into the base weights.

For each targeted linear layer W (out, in): W' = W + scale * B @ A, with A (r, in), B (out, r)
and scale = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA). PEFT adapters are trained on the
Hugging Face layout, so for attn_q / attn_k the update's rows get the same RoPE permutation as
the base weights.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from alpaca_cpu.config import ModelConfig

from .errors import ConvertError
from .hf_layout import gguf_name, permute_for_gguf
from .hparams import tensor_shapes
from .json_file import read_json_object
from .tensor_io import PickleFile, SafetensorsFile

_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name's dotted suffix."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return default


class LoraAdapter:
    """The low-rank updates of one adapter, keyed by GGUF tensor name."""

    def __init__(self, folder: Path, params: ModelConfig) -> None:
        self.path = folder
        config_path = folder / "adapter_config.json"
        if not config_path.is_file():
            raise ConvertError(f"{folder}: missing adapter_config.json (expected a PEFT LoRA "
                               "adapter folder)")
        cfg = read_json_object(config_path)
        self._check_config(config_path, cfg)
        weights = self._load(folder)

        pairs: dict[str, dict[str, np.ndarray]] = {}
        for key, value in weights.items():
            m = _KEY.fullmatch(key)
            if m is None:
                raise ConvertError(f"{folder}: unexpected adapter tensor '{key}' (only LoRA A/B "
                                   "matrices of linear layers can be merged)")
            pairs.setdefault(m.group("module"), {})[m.group("ab")] = value

        shapes = tensor_shapes(params)
        self.params = params
        self.updates: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
        for module, ab in sorted(pairs.items()):
            name = gguf_name(module + ".weight")
            if name is None or name not in shapes or len(shapes[name]) != 2 \
                    or name == "token_embd.weight":
                raise ConvertError(f"{folder}: adapter targets '{module}', which is not a linear "
                                   "layer of this model")
            if set(ab) != {"A", "B"}:
                raise ConvertError(f"{folder}: '{module}' has lora_{''.join(ab)} but not both "
                                   "lora_A and lora_B")
            a, b = ab["A"], ab["B"]
            out_f, in_f = shapes[name]
            r = a.shape[0]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape != (out_f, r):
                raise ConvertError(f"{folder}: '{module}' lora_A {list(a.shape)} / lora_B "
                                   f"{list(b.shape)} do not fit its weight {[out_f, in_f]}")
            rank = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
            if rank != r:
                raise ConvertError(f"{folder}: '{module}' has rank {r}, adapter_config.json "
                                   f"says {rank}")
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            self.updates[name] = (a, b, float(scale))
        if not self.updates:
            raise ConvertError(f"{folder}: the adapter holds no LoRA weights")

    @staticmethod
    def _check_config(path: Path, cfg: dict[str, Any]) -> None:
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ConvertError(f"{path}: peft_type {cfg.get('peft_type')!r}, expected 'LORA'")
        for key in ("r", "lora_alpha"):
            value = cfg.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConvertError(f"{path}: '{key}' = {value!r}, expected a positive number")
        unsupported = {"use_dora": True, "fan_in_fan_out": True}
        for key, bad in unsupported.items():
            if cfg.get(key) == bad:
                raise ConvertError(f"{path}: {key} = true is not supported")
        if cfg.get("bias", "none") != "none":
            raise ConvertError(f"{path}: bias = {cfg['bias']!r}: adapters that train biases are "
                               "not supported (LLaMA has none)")
        if cfg.get("modules_to_save"):
            raise ConvertError(f"{path}: modules_to_save {cfg['modules_to_save']!r}: adapters "
                               "that replace whole modules are not supported")

    @staticmethod
    def _load(folder: Path) -> dict[str, np.ndarray]:
        st, pt = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
        if st.is_file():
            f = SafetensorsFile(st)
            return {name: f.read(name) for name in f.tensors}
        if pt.is_file():
            f = PickleFile(pt)
            return {name: f.read(name) for name in f.tensors}
        raise ConvertError(f"{folder}: missing adapter weights (adapter_model.safetensors or "
                           "adapter_model.bin)")

    def touches(self, name: str) -> bool:
        return name in self.updates

    def apply(self, name: str, w: np.ndarray) -> np.ndarray:
        """W + scale * B @ A, in float32, with the base tensor's row order."""
        if name not in self.updates:
            return w
        a, b, scale = self.updates[name]
        delta = (b @ a) * np.float32(scale)
        return w + permute_for_gguf(name, delta, self.params)

    def describe(self) -> str:
        ranks = sorted({a.shape[0] for a, _, _ in self.updates.values()})
        return (f"LoRA adapter {self.path}: {len(self.updates)} matrices, rank "
                f"{'/'.join(map(str, ranks))}")
