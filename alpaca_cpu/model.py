"""`Model`: a validated GGUF file loaded into the native engine."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from . import _core
from .config import ModelConfig
from .gguf_file import ROPE_FREQS, ModelFile, open_model_file
from .system import available_memory_bytes, physical_cores

# Activations, scratch and the interpreter on top of weights and KV cache: a model that needs
# more than what is available minus this margin is refused rather than started.
MEMORY_MARGIN_BYTES = 256 << 20
MAX_SLOTS = 512  # sequence slots of one model (the engine's largest batch)


class NotEnoughMemoryError(ValueError):
    """The weights and the KV cache of n_ctx positions do not fit in the available memory.

    The sizes are attributes, so that a front end can phrase its own advice; ``fits`` is the
    largest n_ctx that would fit (0 when even the weights do not).
    """

    def __init__(self, n_ctx: int, weight_bytes: int, kv_bytes: int, available: int,
                 fits: int) -> None:
        self.n_ctx, self.weight_bytes, self.kv_bytes = n_ctx, weight_bytes, kv_bytes
        self.available, self.fits = available, fits
        need = weight_bytes + kv_bytes + MEMORY_MARGIN_BYTES
        super().__init__(
            f"n_ctx = {n_ctx} needs {need / 2**30:.2f} GiB ({weight_bytes / 2**30:.2f} GiB "
            f"weights + {kv_bytes / 2**30:.2f} GiB KV cache), but only {available / 2**30:.2f} "
            f"GiB is available; n_ctx <= {fits} would fit")


def check_memory(mf: ModelFile, n_ctx: int, kv_f16: bool = True, n_slots: int = 1) -> None:
    """Raise NotEnoughMemoryError unless the model's weights, the KV cache of n_ctx positions
    of each of n_slots sequence slots and MEMORY_MARGIN_BYTES fit in available memory (nothing
    is checked where that is unknown).

    The weights count as the file's tensor bytes: the engine keeps a repacked copy of about
    that size. Called before anything large is allocated, by Model and by alpaca-chat.
    """
    have = available_memory_bytes()
    if have is None:
        return
    weight_bytes = sum(t.data.nbytes for t in mf.tensors.values())
    kv_bytes = mf.config.kv_cache_bytes(n_ctx, kv_f16) * n_slots
    if weight_bytes + kv_bytes + MEMORY_MARGIN_BYTES > have:
        per_token = mf.config.kv_cache_bytes(1, kv_f16) * n_slots
        fits = max(0, (have - weight_bytes - MEMORY_MARGIN_BYTES) // per_token)
        raise NotEnoughMemoryError(n_ctx, weight_bytes, kv_bytes, have, fits)


class Model:
    """A LLaMA-family model in the native engine, driven by token ids.

    >>> m = Model("model.gguf", n_ctx=2048)
    >>> logits = m.forward([1, 2, 3])            # (n_vocab,) for the last token
    >>> rows = m.forward([4], start_pos=3, all_logits=True)   # (1, n_vocab)

    With n_slots > 1 the KV cache holds that many sequences of n_ctx positions each, and
    forward_batch runs tokens of several of them in one call (forward uses slot 0).
    """

    def __init__(self, path: str | os.PathLike[str], n_ctx: int = 2048,
                 n_threads: int | None = None, kv_type: str = "f16", n_slots: int = 1) -> None:
        if kv_type not in ("f16", "f32"):
            raise ValueError(f"kv_type = {kv_type!r}, expected 'f16' or 'f32'")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx = {n_ctx!r}, expected a positive integer")
        if n_threads is None:
            n_threads = physical_cores()
        if isinstance(n_threads, bool) or not isinstance(n_threads, int) \
                or not 1 <= n_threads <= 1024:
            raise ValueError(f"n_threads = {n_threads!r}, expected an integer in [1, 1024]")
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) \
                or not 1 <= n_slots <= MAX_SLOTS:
            raise ValueError(f"n_slots = {n_slots!r}, expected an integer in [1, {MAX_SLOTS}]")
        mf = open_model_file(path)
        if n_ctx > mf.config.context_length * 64:
            raise ValueError(f"n_ctx = {n_ctx} is far beyond the {mf.config.context_length} "
                             f"tokens {mf.path} was trained for")
        check_memory(mf, n_ctx, kv_type == "f16", n_slots)
        self.path = mf.path
        self.config: ModelConfig = mf.config
        self.metadata: dict[str, Any] = mf.metadata
        tensors = {name: (int(t.type), t.rows, t.cols, t.data) for name, t in mf.tensors.items()}
        # The core takes RoPE scaling as one vector of per-frequency divisors, under the name
        # of the tensor it generalizes (the linear factor folded in; None: plain RoPE).
        divisors = mf.rope_divisors()
        tensors.pop(ROPE_FREQS, None)
        if divisors is not None:
            tensors[ROPE_FREQS] = (int(GGMLQuantizationType.F32), 1, divisors.size,
                                   divisors.view(np.uint8))
        self._core = _core.Model(self.config.to_hparams(), tensors, n_ctx, n_threads,
                                 kv_type == "f16", n_slots)
        # The native model owns repacked copies; drop the file mapping.
        del tensors, mf

    @property
    def n_ctx(self) -> int:
        return self._core.n_ctx

    @property
    def n_slots(self) -> int:
        return self._core.n_slots

    @property
    def n_threads(self) -> int:
        return self._core.n_threads

    @property
    def isa(self) -> str:
        """The kernel set this model runs on (e.g. 'avx2')."""
        return self._core.isa

    def forward(self, tokens: Sequence[int] | np.ndarray, start_pos: int = 0,
                all_logits: bool = False) -> np.ndarray:
        """Evaluate tokens at positions start_pos.. and return float32 logits.

        Returns (n_vocab,) for the last token, or (len(tokens), n_vocab) with all_logits.
        Cache positions >= start_pos are overwritten (this is how to rewind).
        """
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"tokens must be a non-empty 1-D sequence of ids, got shape "
                             f"{arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tokens must be integer ids, got dtype {arr.dtype}")
        n_vocab = self.config.n_vocab
        bad = (arr < 0) | (arr >= n_vocab)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"token id {int(arr[i])} at index {i} is outside [0, {n_vocab})")
        if isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer)):
            raise ValueError(f"start_pos = {start_pos!r}, expected an integer")  # noqa: TRY004
        if start_pos < 0 or start_pos + arr.size > self.n_ctx:
            raise ValueError(f"positions {start_pos}..{start_pos + arr.size - 1} do not fit the "
                             f"context of {self.n_ctx} tokens")
        return self._core.forward(arr.astype(np.int32), int(start_pos), bool(all_logits))

    def forward_batch(self, tokens: Sequence[int] | np.ndarray,
                      seq_ids: Sequence[int] | np.ndarray, positions: Sequence[int] | np.ndarray,
                      want: Sequence[bool] | np.ndarray | None = None,
                      hidden: bool = False) -> np.ndarray:
        """Evaluate tokens of several sequences in one call; token i is at positions[i] of
        slot seq_ids[i].

        A sequence's tokens are adjacent, at consecutive positions starting at most at its
        slot's length (slot_length; starting before it rewinds the slot). Each token attends
        only to its own slot. Returns float32 (n_wanted, n_vocab) logits of the tokens whose
        `want` is true (default: the last token of each sequence), in batch order, or with
        hidden=True their final normed hidden states (n_wanted, dim). A sequence's results do
        not depend on the other sequences in the batch.
        """
        ids = np.asarray(tokens)
        seq = np.asarray(seq_ids)
        pos = np.asarray(positions)
        for name, arr in (("tokens", ids), ("seq_ids", seq), ("positions", pos)):
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{name} must be a non-empty 1-D sequence of integers, got "
                                 f"shape {arr.shape} dtype {arr.dtype}")
            if arr.shape != ids.shape:
                raise ValueError(f"{name} has {arr.size} entries, tokens {ids.size}")
        if want is None:
            wanted = np.append(seq[1:] != seq[:-1], True)
        else:
            wanted = np.asarray(want)
            if wanted.shape != ids.shape or wanted.dtype != np.bool_:
                raise ValueError(f"want must be {ids.size} booleans, got shape {wanted.shape} "
                                 f"dtype {wanted.dtype}")
        return self._core.forward_seqs(ids.astype(np.int32), seq.astype(np.int32),
                                       pos.astype(np.int64), wanted.astype(np.uint8),
                                       bool(hidden))

    def slot_length(self, slot: int) -> int:
        """Positions slot `slot` holds (set by the last forward_batch that wrote it)."""
        return self._core.slot_length(int(slot))

    def rewind_slot(self, slot: int, n_pos: int = 0) -> None:
        """Keep positions [0, n_pos) of a slot (0: clear it); later ones are overwritten."""
        self._core.rewind_slot(int(slot), int(n_pos))

    def save_kv(self, n_pos: int) -> bytes:
        """The KV cache of positions [0, n_pos) (for saving a session)."""
        return self._core.save_kv(self._check_n_pos(n_pos))

    def load_kv(self, data: bytes, n_pos: int) -> None:
        """Restore positions [0, n_pos) of the KV cache from save_kv's bytes."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(  # noqa: TRY004
                f"load_kv takes the bytes save_kv gave, got {type(data).__name__}")
        self._core.load_kv(bytes(data), self._check_n_pos(n_pos))

    def _check_n_pos(self, n_pos: int) -> int:
        if isinstance(n_pos, bool) or not isinstance(n_pos, (int, np.integer)) \
                or not 0 <= n_pos <= self.n_ctx:
            raise ValueError(f"n_pos = {n_pos!r}, expected an integer in [0, {self.n_ctx}]")
        return int(n_pos)
