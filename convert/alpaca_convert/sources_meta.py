"""Meta LLaMA checkpoints: params.json + consolidated.NN.pth model-parallel shards.

Meta's weights already use the interleaved RoPE order GGUF wants. With several shards every
matrix was split for tensor parallelism: column-parallel layers (wq, wk, wv, w1, w3, output) by
output rows, row-parallel layers (wo, w2) and the token embedding by input columns; norms are
copied into every shard.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from alpaca_cpu.config import ModelConfig

from . import metadata as kv
from .errors import ConvertError
from .hparams import check_config, config_metadata, tensor_shapes
from .json_file import read_json_object
from .metadata import KeyValue
from .rope_scaling import ROPE_FREQS, llama3_scaling
from .source import Source
from .tensor_io import PickleFile
from .tokenizer import find_tokenizer, tokenizer_metadata

ROWS, COLS, REPLICATED = 0, 1, None  # concatenation axis of each kind of tensor

_TOP_LEVEL = {
    "tok_embeddings.weight": ("token_embd.weight", COLS),
    "norm.weight": ("output_norm.weight", REPLICATED),
    "output.weight": ("output.weight", ROWS),
}
_IN_BLOCK = {
    "attention_norm.weight": ("attn_norm.weight", REPLICATED),
    "attention.wq.weight": ("attn_q.weight", ROWS),
    "attention.wk.weight": ("attn_k.weight", ROWS),
    "attention.wv.weight": ("attn_v.weight", ROWS),
    "attention.wo.weight": ("attn_output.weight", COLS),
    "ffn_norm.weight": ("ffn_norm.weight", REPLICATED),
    "feed_forward.w1.weight": ("ffn_gate.weight", ROWS),
    "feed_forward.w3.weight": ("ffn_up.weight", ROWS),
    "feed_forward.w2.weight": ("ffn_down.weight", COLS),
}
_IGNORED = {"rope.freqs"}  # LLaMA-1 saved its RoPE frequencies; they are recomputed


def meta_names(n_layers: int) -> dict[str, tuple[str, int | None]]:
    """Meta tensor name -> (GGUF name, shard concatenation axis)."""
    names = dict(_TOP_LEVEL)
    for i in range(n_layers):
        for meta, (gguf, axis) in _IN_BLOCK.items():
            names[f"layers.{i}.{meta}"] = (f"blk.{i}.{gguf}", axis)
    return names


def _ffn_dim(dim: int, multiple_of: int, multiplier: float | None) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4*dim, scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _context_length(p: dict[str, Any]) -> int:
    """params.json does not say; these are the lengths the releases were trained with."""
    if "max_seq_len" in p:
        return int(p["max_seq_len"])
    if p.get("rope_theta") == 500_000:
        return 131072 if p.get("use_scaled_rope") else 8192  # Llama 3.1+, Llama 3.0
    if p.get("rope_theta") == 1_000_000:
        return 16384  # Code Llama
    if p.get("norm_eps") == 1e-5:
        return 4096  # Llama 2
    return 2048  # LLaMA 1


def _scaled_rope(path: Path, p: dict[str, Any]) -> bool:
    """Llama 3.1+ params.json: `use_scaled_rope` (Meta's apply_scaling: factor
    `rope_scaling_factor`, default 8, high_freq_factor 4, low 1, original context 8192)."""
    value = p.get("use_scaled_rope", False)
    if not isinstance(value, bool):
        raise ConvertError(f"{path}: use_scaled_rope = {value!r}, expected true or false")
    return value


class MetaSource(Source):
    kind = "Meta"

    def __init__(self, folder: Path) -> None:
        self.path = folder
        params_path = folder / "params.json"
        p = read_json_object(params_path)
        self.tokenizer_path = find_tokenizer(folder, search_parent=True)
        self.shard_paths = self._find_shards(folder)
        self.shards = [PickleFile(f) for f in self.shard_paths]
        self.params = self._params(params_path, p)
        self._llama31 = p.get("use_scaled_rope") is True
        # tensors computed from params.json, not read from the shards (Llama 3.1's rope_freqs)
        self._computed: dict[str, np.ndarray] = {}
        if self.params.has_rope_freqs:
            scaling = llama3_scaling(str(params_path), p, {"factor": "rope_scaling_factor"})
            self._computed[ROPE_FREQS] = scaling.rope_freqs(self.params.rope_base,
                                                            self.params.head_dim)
        self._names = meta_names(self.params.n_layers)
        self._by_gguf = {gguf: (meta, axis) for meta, (gguf, axis) in self._names.items()}
        self._check_tensors()

    @staticmethod
    def _find_shards(folder: Path) -> list[Path]:
        shards = sorted(folder.glob("consolidated.*.pth"))
        if not shards:
            raise ConvertError(f"{folder}: no consolidated.NN.pth weight shards beside params.json")
        numbers = []
        for f in shards:
            m = re.fullmatch(r"consolidated\.(\d+)\.pth", f.name)
            if not m:
                raise ConvertError(f"{f}: unexpected shard name, expected consolidated.NN.pth")
            numbers.append(int(m.group(1)))
        if numbers != list(range(len(shards))):
            missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
            raise ConvertError(f"{folder}: shard count mismatch: found shards {numbers}, expected "
                               f"consolidated.00 .. {len(shards) - 1:02d} (missing: {missing})")
        return shards

    def _params(self, path: Path, p: dict[str, Any]) -> ModelConfig:
        def need(key: str) -> Any:
            if key not in p:
                raise ConvertError(f"{path}: missing '{key}'")
            return p[key]

        dim, n_heads = need("dim"), need("n_heads")
        first = self.shards[0].tensors
        n_vocab = p.get("vocab_size", -1)
        if not isinstance(n_vocab, int) or n_vocab <= 0:  # LLaMA-1 writes -1: take the embedding
            if "tok_embeddings.weight" not in first:
                raise ConvertError(f"{self.shard_paths[0]}: missing tensor 'tok_embeddings.weight'")
            n_vocab = int(first["tok_embeddings.weight"].shape[0])
        try:
            ffn_dim = p.get("hidden_dim") or _ffn_dim(dim, need("multiple_of"),
                                                      p.get("ffn_dim_multiplier"))
            head_dim = p.get("head_dim") or dim // n_heads
            params = ModelConfig(
                n_vocab=n_vocab, dim=dim, n_layers=need("n_layers"), n_heads=n_heads,
                n_kv_heads=p.get("n_kv_heads") or n_heads, head_dim=head_dim, n_rot=head_dim,
                ffn_dim=ffn_dim,
                rms_eps=float(need("norm_eps")), rope_base=float(p.get("rope_theta", 10000.0)),
                context_length=_context_length(p), tied_embeddings=False,
                has_rope_freqs=_scaled_rope(path, p))
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise ConvertError(f"{path}: a hyper-parameter is not a valid number ({e})") from None
        return check_config(params, str(path))

    def _check_tensors(self) -> None:
        n = len(self.shards)
        first = self.shards[0].tensors
        for path, shard in zip(self.shard_paths, self.shards):
            unexpected = sorted(set(shard.tensors) - set(self._names) - _IGNORED)
            if unexpected:
                raise ConvertError(f"{path}: unexpected tensor name(s) for a LLaMA checkpoint: "
                                   f"{', '.join(unexpected[:5])}")
            missing = [m for m in self._names if m not in shard.tensors]
            if missing:
                raise ConvertError(f"{path}: missing tensor(s) {', '.join(missing[:5])} "
                                   f"({len(missing)} in all)")
        # Every split tensor must come in n equal parts; say so plainly when n is wrong.
        q_rows = int(first["layers.0.attention.wq.weight"].shape[0])
        if q_rows and self.params.q_dim % q_rows == 0 and self.params.q_dim // q_rows != n:
            raise ConvertError(f"{self.path}: shard count mismatch: found {n} consolidated.NN.pth "
                               f"file(s), but each holds 1/{self.params.q_dim // q_rows} of "
                               "attention.wq (a shard is missing or extra)")
        shapes = tensor_shapes(self.params)
        for meta, (gguf, axis) in self._names.items():
            parts = [s.shape(meta) for s in self.shards]
            if axis is REPLICATED:
                merged = parts[0] if all(x == parts[0] for x in parts) else None
            elif all(len(x) == 2 for x in parts) and len({x[1 - axis] for x in parts}) == 1:
                total = sum(x[axis] for x in parts)
                merged = (total, parts[0][1]) if axis == ROWS else (parts[0][0], total)
            else:
                merged = None
            if merged != shapes[gguf]:
                raise ConvertError(f"{self.path}: tensor '{meta}' has shard shapes "
                                   f"{[list(x) for x in parts]}, which do not merge to "
                                   f"{list(shapes[gguf])} (from params.json, {n} shard(s))")

    def read(self, name: str) -> np.ndarray:
        if name in self._computed:
            return self._computed[name]
        meta, axis = self._by_gguf[name]
        parts = [s.read(meta) for s in self.shards]
        if axis is REPLICATED:  # small (norms): check the copies really agree
            for path, part in zip(self.shard_paths[1:], parts[1:]):
                if not np.array_equal(part, parts[0]):
                    raise ConvertError(f"{path}: tensor '{meta}' differs from its copy in "
                                       f"{self.shard_paths[0].name}; shards of one checkpoint "
                                       "hold the same norms")
            return parts[0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)

    def stored_type(self, name: str) -> str:
        if name in self._computed:
            return "computed"
        return self.shards[0].dtype(self._by_gguf[name][0])

    def metadata(self) -> list[KeyValue]:
        tok_kv, self.tokenizer_description = tokenizer_metadata(
            self.tokenizer_path, self.path, self.params.n_vocab, add_bos_eos=(True, False),
            llama31=self._llama31)
        return kv.general(self.path.resolve().name) + config_metadata(self.params) + tok_kv

    def describe(self) -> str:
        n = len(self.shards)
        return f"Meta LLaMA, {n} shard{'s' * (n > 1)} in {self.path}"
