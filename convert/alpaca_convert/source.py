"""What every checkpoint reader provides (detect.py picks the reader for an input)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from alpaca_cpu.config import ModelConfig

from .metadata import KeyValue


class Source(ABC):
    """A checkpoint seen through GGUF names: `read` gives one tensor at a time as float32.

    2-D tensors come as (out_features, in_features) with the rows of attn_q / attn_k already in
    the interleaved RoPE order GGUF uses; 1-D tensors (norms) as (n,).
    """

    kind: str  # "Meta", "Hugging Face", "GGUF"
    path: Path
    params: ModelConfig
    tokenizer_description: str = ""  # set by metadata(), for the plan

    @abstractmethod
    def read(self, name: str) -> np.ndarray: ...

    @abstractmethod
    def stored_type(self, name: str) -> str:
        """How the tensor is stored in the input ("BF16", "Q4_1", ...), for the plan."""

    @abstractmethod
    def metadata(self) -> list[KeyValue]:
        """Hyper-parameters, tokenizer and `general.*` keys (file type and quantization version
        are added by the converter)."""

    @abstractmethod
    def describe(self) -> str: ...

    def raw(self, name: str) -> tuple[GGMLQuantizationType, np.ndarray] | None:
        """The stored GGML bytes (rows, row_bytes) when the input is already GGUF."""
        return None
