"""Hugging Face LLaMA tensor names and row order, seen from GGUF: shared by the checkpoint reader
(sources_hf) and the LoRA merge (lora), whose adapters are trained on the HF layout.

HF stores q_proj / k_proj rows in rotate-half order (the pair of a row i is row i + head_dim/2);
GGUF `llama` wants Meta's interleaved pairs (rows 2i, 2i+1), so those rows are permuted back.
"""

from __future__ import annotations

import re

import numpy as np

from alpaca_cpu.config import ModelConfig

_TOP_LEVEL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_IN_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some exports save beside the weights; recomputed at load, never converted.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def gguf_name(hf_name: str) -> str | None:
    """HF parameter name -> GGUF tensor name (None when it is not a LLaMA weight)."""
    if hf_name in _TOP_LEVEL:
        return _TOP_LEVEL[hf_name]
    m = _BLOCK.fullmatch(hf_name)
    if m and m.group(2) in _IN_BLOCK:
        return f"blk.{int(m.group(1))}.{_IN_BLOCK[m.group(2)]}"
    return None


def rotate_half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of each head from (first halves, second halves) to interleaved pairs."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return (w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def permute_for_gguf(name: str, w: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Apply the RoPE row permutation to attn_q / attn_k rows (any other tensor unchanged)."""
    if name.endswith(".attn_q.weight"):
        return rotate_half_to_interleaved(w, config.n_heads)
    if name.endswith(".attn_k.weight"):
        return rotate_half_to_interleaved(w, config.n_kv_heads)
    return w
