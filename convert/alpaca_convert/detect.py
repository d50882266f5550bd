"""Which checkpoint reader an input needs, told from what the path holds."""

from __future__ import annotations

from pathlib import Path

from .errors import ConvertError
from .source import Source
from .sources_gguf import GgufSource
from .sources_hf import HfSource
from .sources_meta import MetaSource


def open_source(path: str | Path) -> Source:
    """Detect the checkpoint layout from what `path` holds and open it (headers only)."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: no such file or folder")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return GgufSource(path)
        raise ConvertError(f"{path}: a file that is not GGUF (starts with {magic!r}); give a "
                           "checkpoint folder (Meta or Hugging Face) or a .gguf file")
    if (path / "params.json").is_file():
        return MetaSource(path)
    if (path / "config.json").is_file():
        return HfSource(path)
    if any(path.glob("consolidated.*.pth")):
        raise ConvertError(f"{path}: missing params.json (a Meta checkpoint folder holds "
                           "params.json beside its consolidated.NN.pth shards)")
    if any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")):
        raise ConvertError(f"{path}: missing config.json (a Hugging Face checkpoint folder "
                           "holds config.json beside its weights)")
    raise ConvertError(f"{path}: cannot tell the checkpoint layout: expected params.json + "
                       "consolidated.NN.pth (Meta) or config.json + weights (Hugging Face)")
