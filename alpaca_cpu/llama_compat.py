"""llama-cpp-python's `Llama` constructor arguments: which ones ours honours, ignores or refuses.

Code written for llama-cpp-python passes arguments that steer a GPU, llama.cpp's memory
mapping or its batching. `Llama(**kwargs)` runs them through `split_compat_args`: the ones
that mean something here are honoured (returned), the ones that do not are accepted and
ignored, and the ones whose meaning we cannot give are refused by name (TypeError), so that
nothing is silently different.
"""

from __future__ import annotations

import warnings
from typing import Any

# Accepted and ignored: they only steer llama.cpp's GPU offload, memory mapping, internal
# batching or performance counters; the CPU engine's results do not depend on them.
IGNORED = frozenset({
    "split_mode", "main_gpu", "tensor_split", "use_mmap", "use_mlock", "n_ubatch",
    "n_threads_batch", "offload_kqv", "flash_attn", "op_offload", "swa_full", "no_perf",
    "numa", "last_n_tokens_size",
    # logprobs work without logits_all here; embeddings without embedding=True
    "logits_all", "embedding",
})
# Accepted at their llama-cpp-python default only: anything else changes what the model
# computes in a way this engine does not implement.
DEFAULT_ONLY: dict[str, Any] = {
    "rope_scaling_type": -1, "pooling_type": -1, "attention_type": -1,
    "rope_freq_base": 0.0, "rope_freq_scale": 0.0, "yarn_ext_factor": -1.0,
    "yarn_attn_factor": 1.0, "yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0, "yarn_orig_ctx": 0,
    "vocab_only": False, "spm_infill": False, "lora_scale": 1.0,
}
# Refused whenever given (other than None): features this project does not have.
REFUSED = frozenset({"chat_handler", "draft_model", "tokenizer", "kv_overrides", "lora_base",
                     "lora_path"})
# ggml type ids llama-cpp-python takes for type_k / type_v, and our kv_type for them.
KV_TYPES = {0: "f32", 1: "f16"}

_warned_gpu_layers = False


def split_compat_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check llama-cpp-python-only constructor arguments; return those we honour
    ({"kv_type": ...} from type_k/type_v). TypeError names any argument refused."""
    global _warned_gpu_layers
    honoured: dict[str, Any] = {}
    kv = {kwargs.pop(k, None) for k in ("type_k", "type_v")} - {None}
    if kv:
        if len(kv) > 1 or next(iter(kv)) not in KV_TYPES:
            raise TypeError(f"type_k / type_v = {sorted(kv)}: this engine's KV cache is F16 (1) "
                            f"or F32 (0), the same type for keys and values")
        honoured["kv_type"] = KV_TYPES[next(iter(kv))]
    gpu = kwargs.pop("n_gpu_layers", 0)
    if gpu not in (0, -1) and not _warned_gpu_layers:
        _warned_gpu_layers = True
        warnings.warn(f"n_gpu_layers = {gpu!r} ignored: alpaca_cpu runs on the CPU only",
                      stacklevel=3)
    for name, value in kwargs.items():
        if name in IGNORED:
            continue
        if name in DEFAULT_ONLY:
            if value != DEFAULT_ONLY[name]:
                raise TypeError(f"Llama() argument {name}={value!r} is not supported (only its "
                                f"default, {DEFAULT_ONLY[name]!r})")
            continue
        if name in REFUSED:
            if value is not None:
                raise TypeError(f"Llama() argument {name!r} is not supported by alpaca_cpu")
            continue
        raise TypeError(f"Llama() got an unexpected keyword argument {name!r}")
    return honoured
