"""alpaca_cpu: a CPU-first, quantized LLaMA-family inference engine."""

from .config import ModelConfig
from .errors import ModelFileError
from .isa import active_isa, available_isas, select_from_environment, set_isa
from .llama import Llama, LlamaState
from .model import Model

select_from_environment()

__version__ = "0.1.0"
__all__ = ["Llama", "LlamaState", "Model", "ModelConfig", "ModelFileError", "active_isa",
           "available_isas", "set_isa"]
