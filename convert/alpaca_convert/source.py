"""What every checkpoint reader provides, and how the input's layout is detected."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from .errors import ConvertError
from .hparams import LlamaParams
from .metadata import KeyValue


class Source(ABC):
    """A checkpoint seen through GGUF names: `read` gives one tensor at a time as float32.

    2-D tensors come as (out_features, in_features) with the rows of attn_q / attn_k already in
    the interleaved RoPE order GGUF uses; 1-D tensors (norms) as (n,).
    """

    kind: str  # "Meta", "Hugging Face", "GGUF"
    path: Path
    params: LlamaParams
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


def open_source(path: str | Path) -> Source:
    """Detect the checkpoint layout from what `path` holds and open it (headers only)."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file or folder")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from .sources_gguf import GgufSource

            return GgufSource(path)
        raise ConvertError(f"{path}: a file that is not GGUF (starts with {magic!r}); give a "
                           "checkpoint folder (Meta or Hugging Face) or a .gguf file")
    if (path / "params.json").is_file():
        from .sources_meta import MetaSource

        return MetaSource(path)
    if (path / "config.json").is_file():
        from .sources_hf import HfSource

        return HfSource(path)
    if any(path.glob("consolidated.*.pth")):
        raise ConvertError(f"{path}: missing params.json (a Meta checkpoint folder holds "
                           "params.json beside its consolidated.NN.pth shards)")
    if any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")):
        raise ConvertError(f"{path}: missing config.json (a Hugging Face checkpoint folder "
                           "holds config.json beside its weights)")
    raise ConvertError(f"{path}: cannot tell the checkpoint layout: expected params.json + "
                       "consolidated.NN.pth (Meta) or config.json + weights (Hugging Face)")
