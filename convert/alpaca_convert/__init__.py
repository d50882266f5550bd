"""alpaca_convert: PyTorch (Meta, Hugging Face, LoRA) and GGUF checkpoints to GGUF files."""

from .converter import Summary, convert
from .errors import ConvertError

__all__ = ["ConvertError", "Summary", "convert"]
