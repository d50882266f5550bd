"""The LLaMA forward pass in plain numpy: the tests' oracle and a slow fallback.

Same API as `alpaca_cpu.Model` (forward(tokens, start_pos, all_logits)), float32 weights
dequantized with the numpy twins in `quants.py`, float32 activations and KV cache. Never
imports the native extension.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from .config import ModelConfig
from .gguf_file import ModelFile, open_model_file
from .quants import dequantize


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis."""
    x64 = x.astype(np.float64)
    scale = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps)
    return (x64 * scale).astype(np.float32) * weight


def rope(x: np.ndarray, positions: np.ndarray, n_rot: int, base: float,
         divisors: np.ndarray | None = None) -> np.ndarray:
    """Rotate interleaved pairs (x[..., 2i], x[..., 2i+1]) of each head by
    pos * base^(-2i/n_rot) / divisors[i] (RoPE scaling; None: all 1).

    x: (n_tok, n_heads, head_dim); positions: (n_tok,); divisors: (n_rot/2,).
    """
    inv_freq = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)  # (n_rot/2)
    if divisors is not None:
        inv_freq = inv_freq / divisors.astype(np.float64)
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (n_tok, n_rot/2)
    cos = np.cos(ang)[:, None, :].astype(np.float32)
    sin = np.sin(ang)[:, None, :].astype(np.float32)
    out = x.copy()
    x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
    out[..., 0:n_rot:2] = x0 * cos - x1 * sin
    out[..., 1:n_rot:2] = x0 * sin + x1 * cos
    return out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class _Dequantized(Mapping[str, np.ndarray]):
    """A model file's tensors as float32 arrays, dequantized at each access."""

    def __init__(self, mf: ModelFile) -> None:
        self._tensors = mf.tensors

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        return dequantize(t.data, t.type, t.cols)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


class ReferenceModel:
    """numpy forward pass over a validated GGUF file; see `alpaca_cpu.Model` for the API."""

    def __init__(self, path: str | os.PathLike[str] | ModelFile, n_ctx: int = 2048,
                 keep_weights: bool = True) -> None:
        """keep_weights=False dequantizes each weight when it is used instead of once: slower
        per pass, but memory stays at the mapped file plus one float32 matrix (a 7B model's
        float32 weights alone would take 28 GB)."""
        mf = path if isinstance(path, ModelFile) else open_model_file(path)
        self.config: ModelConfig = mf.config
        self.n_ctx = n_ctx
        self.w: Mapping[str, np.ndarray] = _Dequantized(mf)
        if keep_weights:
            self.w = {name: self.w[name] for name in mf.tensors}
        self.rope_divisors = mf.rope_divisors()
        c = self.config
        self.k_cache = np.zeros((c.n_layers, n_ctx, c.n_kv_heads, c.head_dim), np.float32)
        self.v_cache = np.zeros_like(self.k_cache)
        # Called as observer(weight name, input rows) before each matrix product of a layer
        # (the importance-matrix collector's hook, alpaca_cpu/imatrix.py); None: nothing.
        self.observer: Callable[[str, np.ndarray], None] | None = None

    def _mm(self, x: np.ndarray, name: str) -> np.ndarray:
        """x @ W^T for the weight `name`: (n, cols) -> (n, rows)."""
        if self.observer is not None:
            self.observer(name, x)
        return x @ self.w[name].T

    def forward(self, tokens: Sequence[int] | np.ndarray, start_pos: int = 0,
                all_logits: bool = False) -> np.ndarray:
        c, w = self.config, self.w
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        if n == 0 or start_pos < 0 or start_pos + n > self.n_ctx:
            raise ValueError(f"positions {start_pos}..{start_pos + n - 1} outside [0, {self.n_ctx})")
        if tokens.min() < 0 or tokens.max() >= c.n_vocab:
            raise ValueError(f"token ids must be in [0, {c.n_vocab})")
        pos = np.arange(start_pos, start_pos + n)
        end = start_pos + n
        x = w["token_embd.weight"][tokens]  # (n, dim)
        mask = pos[:, None] >= np.arange(end)[None, :]  # (n, end) causal
        for i in range(c.n_layers):
            p = f"blk.{i}."
            # attention: xb = rmsnorm(x); q, k, v projections; RoPE; cache
            xb = rmsnorm(x, w[p + "attn_norm.weight"][0], c.rms_eps)
            q = self._mm(xb, p + "attn_q.weight").reshape(n, c.n_heads, c.head_dim)
            k = self._mm(xb, p + "attn_k.weight").reshape(n, c.n_kv_heads, c.head_dim)
            v = self._mm(xb, p + "attn_v.weight").reshape(n, c.n_kv_heads, c.head_dim)
            q = rope(q, pos, c.n_rot, c.rope_base, self.rope_divisors)
            k = rope(k, pos, c.n_rot, c.rope_base, self.rope_divisors)
            self.k_cache[i, start_pos:end] = k
            self.v_cache[i, start_pos:end] = v
            # scores = q k^T / sqrt(head_dim), causal softmax; query head h uses kv head h // group
            keys = np.repeat(self.k_cache[i, :end], c.group_size, axis=1)  # (end, n_heads, hd)
            vals = np.repeat(self.v_cache[i, :end], c.group_size, axis=1)
            # per head (h, t, d) @ (h, d, p): batched BLAS products, unlike einsum's loops
            scores = q.transpose(1, 0, 2) @ keys.transpose(1, 2, 0) / np.sqrt(c.head_dim)
            scores = np.where(mask[None], scores, -np.inf)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            att = (probs @ vals.transpose(1, 0, 2)).transpose(1, 0, 2)
            att = att.reshape(n, c.q_dim).astype(np.float32)
            x = x + self._mm(att, p + "attn_output.weight")
            # feed-forward: SwiGLU
            xb = rmsnorm(x, w[p + "ffn_norm.weight"][0], c.rms_eps)
            h = silu(self._mm(xb, p + "ffn_gate.weight")) * self._mm(xb, p + "ffn_up.weight")
            x = x + self._mm(h, p + "ffn_down.weight")
        out_w = w["token_embd.weight"] if c.tied_embeddings else w["output.weight"]
        xs = x if all_logits else x[-1:]
        logits = rmsnorm(xs, w["output_norm.weight"][0], c.rms_eps) @ out_w.T
        logits = logits.astype(np.float32)
        return logits if all_logits else logits[0]
