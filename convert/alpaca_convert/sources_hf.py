"""Hugging Face `LlamaForCausalLM` checkpoints: config.json + safetensors or pytorch_model*.bin.

Tensor names and the q/k row permutation are in hf_layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from alpaca_cpu.config import ModelConfig

from . import metadata as kv
from .errors import ConvertError
from .hf_layout import IGNORED, gguf_name, permute_for_gguf
from .hparams import check_config, config_metadata, tensor_shapes
from .json_file import read_json_object
from .metadata import KeyValue
from .rope_scaling import ROPE_FREQS, rope_scaling
from .source import Source
from .tensor_io import PickleFile, SafetensorsFile
from .tokenizer import find_tokenizer, tokenizer_metadata

# Mistral 7B is a LLaMA with grouped-query attention; its sliding window (v0.1: 4096) is
# ignored, as llama.cpp's converter and engine ignore it.
ARCHITECTURES = ("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM")


def params_from_config(path: Path, cfg: dict[str, Any]) -> ModelConfig:
    archs = cfg.get("architectures")
    if archs is not None:
        if not (isinstance(archs, list) and any(a in ARCHITECTURES for a in archs)):
            raise ConvertError(f"{path}: unknown architecture {archs!r}, expected "
                               f"{' or '.join(ARCHITECTURES)}")
    elif cfg.get("model_type") not in ("llama", "mistral"):
        raise ConvertError(f"{path}: unknown architecture: no 'architectures' and model_type "
                           f"{cfg.get('model_type')!r}, expected 'llama' or 'mistral'")

    def need(key: str) -> Any:
        if key not in cfg:
            raise ConvertError(f"{path}: missing '{key}'")
        return cfg[key]

    if cfg.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{path}: hidden_act = {cfg['hidden_act']!r}, expected 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ConvertError(f"{path}: {key} = true; LLaMA layers without biases are expected")
    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    n_kv_heads = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or (dim // n_heads if isinstance(dim, int)
                                       and isinstance(n_heads, int) and n_heads else 0)
    rope = _rope_entry(cfg)
    rope_base = rope.get("rope_theta", 10000.0)
    if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)):
        raise ConvertError(f"{path}: rope_theta = {rope_base!r}, expected a number")
    linear, llama3 = rope_scaling(str(path), rope)
    try:
        params = ModelConfig(
            n_vocab=need("vocab_size"), dim=dim, n_layers=need("num_hidden_layers"),
            n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, n_rot=head_dim,
            ffn_dim=need("intermediate_size"), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_base=float(rope_base), context_length=cfg.get("max_position_embeddings", 2048),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling_factor=linear, has_rope_freqs=llama3 is not None)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{path}: a hyper-parameter is not a number ({e})") from None
    return check_config(params, str(path))


def _rope_entry(cfg: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings: transformers 5 keeps them in rope_parameters, older versions in
    rope_theta and rope_scaling at the top level."""
    rope = dict(cfg.get("rope_scaling") or {})
    if "rope_theta" in cfg:
        rope["rope_theta"] = cfg["rope_theta"]
    return rope | dict(cfg.get("rope_parameters") or {})


def _check_numbered(folder: Path, files: list[Path], what: str) -> None:
    """Shards named X-00001-of-0000N.ext: all N present, no strays."""
    numbered = [re.search(r"-(\d+)-of-(\d+)\.", f.name) for f in files]
    if not all(numbered):
        return
    totals = {int(m.group(2)) for m in numbered if m}
    found = {int(m.group(1)) for m in numbered if m}
    if len(totals) != 1 or found != set(range(1, max(totals) + 1)):
        total = max(totals)
        missing = sorted(set(range(1, total + 1)) - found)
        extra = sorted(found - set(range(1, total + 1)))
        raise ConvertError(f"{folder}: shard count mismatch in {what}: found {len(files)} file(s) "
                           f"for {total} shard(s) (missing: {missing or 'none'}, extra: "
                           f"{extra or 'none'}, totals named: {sorted(totals)})")


def _weight_files(folder: Path) -> tuple[list[Path], str]:
    """The checkpoint's weight files and their kind ("safetensors" or "pickle")."""
    for ext, kind, single in (("safetensors", "safetensors", "model.safetensors"),
                              ("bin", "pickle", "pytorch_model.bin")):
        index = folder / f"{single}.index.json"
        stem = single.split(".")[0]
        numbered = sorted(folder.glob(f"{stem}-*-of-*.{ext}"))
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index}: missing or empty 'weight_map'")
            names = sorted(set(map(str, weight_map.values())))
            files = [folder / n for n in names]
            for f in files:
                if not f.is_file() or f.parent != folder:
                    raise ConvertError(f"{index}: shard count mismatch: names {f.name}, which is "
                                       f"missing ({len(names)} shard(s) listed)")
            strays = sorted(set(numbered) - set(files))
            if strays:
                raise ConvertError(f"{index}: shard count mismatch: {strays[0].name} is in the "
                                   f"folder but not in the index ({len(names)} shard(s) listed)")
            _check_numbered(folder, files, index.name)
            return files, kind
        if (folder / single).is_file():
            return [folder / single], kind
        if numbered:
            _check_numbered(folder, numbered, f"{stem}-*-of-*.{ext}")
            return numbered, kind
    raise ConvertError(f"{folder}: no weights: expected model.safetensors, model-*-of-*.safetensors"
                       " (+ index), pytorch_model.bin or pytorch_model-*-of-*.bin (+ index)")


class HfSource(Source):
    kind = "Hugging Face"

    def __init__(self, folder: Path) -> None:
        self.path = folder
        config_path = folder / "config.json"
        self.config = read_json_object(config_path)
        self.params = params_from_config(config_path, self.config)
        # tensors computed from the config, not read from the weights (Llama 3's rope_freqs)
        self._computed: dict[str, np.ndarray] = {}
        _, llama3 = rope_scaling(str(config_path), _rope_entry(self.config))
        if llama3 is not None:
            self._computed[ROPE_FREQS] = llama3.rope_freqs(self.params.rope_base,
                                                           self.params.head_dim)
        self._shapes = tensor_shapes(self.params)
        self.tokenizer_path = find_tokenizer(folder)
        self.files, self.file_kind = _weight_files(folder)
        # GGUF name -> (file, HF name, reader of that file, stored dtype)
        self._where: dict[str, tuple[Path, str, Callable[[str], np.ndarray], str]] = {}
        unexpected: list[str] = []
        for f in self.files:
            for hf_name, shape, dtype, read in self._open_file(f):
                name = gguf_name(hf_name)
                if name == "output.weight" and self.params.tied_embeddings:
                    continue  # a saved copy of the tied embedding: the engine reuses token_embd
                if name is None:
                    if not IGNORED.fullmatch(hf_name):
                        unexpected.append(f"{hf_name} (in {f.name})")
                    continue
                if name in self._where:
                    raise ConvertError(f"{f}: tensor '{hf_name}' also appears in "
                                       f"{self._where[name][0].name}")
                self._check_shape(f, hf_name, name, shape)
                self._where[name] = (f, hf_name, read, dtype)
        if unexpected:
            raise ConvertError(f"{folder}: unexpected tensor name(s) for LlamaForCausalLM: "
                               f"{', '.join(unexpected[:5])}"
                               + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
        missing = [n for n in self._shapes if n not in self._where and n not in self._computed]
        if missing:
            raise ConvertError(f"{folder}: missing tensor(s) {', '.join(missing[:5])} "
                               f"({len(missing)} in all) in {', '.join(f.name for f in self.files)}")

    def _open_file(self, f: Path) -> list[tuple[str, tuple[int, ...], str,
                                                Callable[[str], np.ndarray]]]:
        reader = SafetensorsFile(f) if self.file_kind == "safetensors" else PickleFile(f)
        return [(n, reader.shape(n), reader.dtype(n), reader.read) for n in reader.tensors]

    def _check_shape(self, f: Path, hf_name: str, name: str, shape: tuple[int, ...]) -> None:
        expected = self._shapes.get(name)
        if expected is None:
            raise ConvertError(f"{f}: unexpected tensor '{hf_name}': layer index outside the "
                               f"{self.params.n_layers} layers of config.json")
        if tuple(shape) != expected:
            raise ConvertError(f"{f}: tensor '{hf_name}' has shape {list(shape)}, expected "
                               f"{list(expected)} from config.json")

    def read(self, name: str) -> np.ndarray:
        if name in self._computed:
            return self._computed[name]
        _, hf_name, read, _ = self._where[name]
        return permute_for_gguf(name, read(hf_name), self.params)

    def stored_type(self, name: str) -> str:
        return "computed" if name in self._computed else self._where[name][3]

    def metadata(self) -> list[KeyValue]:
        tok_kv, self.tokenizer_description = tokenizer_metadata(
            self.tokenizer_path, self.path, self.params.n_vocab, hf_config=self.config)
        repo = self.config.get("_name_or_path")
        url = (f"https://huggingface.co/{repo}" if isinstance(repo, str)
               and re.fullmatch(r"[\w.-]+/[\w.-]+", repo) else None)
        return kv.general(self.path.resolve().name, url) + config_metadata(self.params) + tok_kv

    def describe(self) -> str:
        n = len(self.files)
        arch = next((a for a in self.config.get("architectures") or [] if a in ARCHITECTURES),
                    "LlamaForCausalLM")
        return (f"Hugging Face {arch}, {n} {self.file_kind} file{'s' * (n > 1)} "
                f"in {self.path}")
