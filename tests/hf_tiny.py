"""Tiny random checkpoints for the converter tests, made with transformers / torch.

- `tiny_llama`: a LlamaForCausalLM with weights drawn at a scale that gives peaked logits (the
  library's own init makes all logits ~0, so any quantization noise would flip the argmax).
- `save_hf`: Hugging Face folder (safetensors, sharded safetensors, pytorch_model.bin, sharded
  .bin) with a SentencePiece or byte-level BPE tokenizer trained here on made-up text.
- `save_meta`: the same weights as a Meta folder (params.json + consolidated.NN.pth shards).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Tiny models run fastest on one thread; more only contend with the engine's own thread pool.
torch.set_num_threads(1)

SPECIAL_BPE = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}")


@dataclass(frozen=True)
class TinyConfig:
    n_vocab: int = 384
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 192  # what Meta's formula gives for dim 64, multiple_of 32
    tied: bool = False
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    seed: int = 0

    def hf_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.n_vocab, hidden_size=self.dim, intermediate_size=self.ffn_dim,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads, rms_norm_eps=self.rms_eps,
            rope_theta=self.rope_theta, tie_word_embeddings=self.tied,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2)


def tiny_llama(cfg: TinyConfig) -> LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(cfg.hf_config()).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # linear (out, in)
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model


# ---- tokenizers -----------------------------------------------------------------------------

def made_up_text(n_lines: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "tu", "ra", "ne", "so", "pi", "va", "de", "gu", "ri", "ha"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    return [" ".join(rng.choice(words) for _ in range(10)) + rng.choice([".", "!", ", 42."])
            for _ in range(n_lines)]


def train_spm(path: Path, vocab_size: int = 384) -> Path:
    """A LLaMA-like SentencePiece model: BPE, byte fallback, <unk>=0 <s>=1 </s>=2, no text
    normalization (LLaMA keeps repeated spaces, and so does llama.cpp)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(made_up_text()), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def train_bpe(path: Path, vocab_size: int = 384, digits: bool = True) -> Path:
    """A byte-level BPE tokenizer.json; digits split one by one (SmolLM's "smollm") or not
    (plain GPT-2, "gpt-2")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level]) if digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_BPE,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(made_up_text(), trainer)
    tok.save(str(path))
    return path


# ---- checkpoint folders ---------------------------------------------------------------------

def save_hf(model: LlamaForCausalLM, folder: Path, weights: str = "safetensors",
            tokenizer: str = "spm", spm_model: Path | None = None) -> Path:
    """weights: "safetensors", "sharded" (safetensors + index), "bin", "sharded-bin"."""
    folder.mkdir(parents=True, exist_ok=True)
    if weights in ("safetensors", "sharded"):
        model.save_pretrained(folder, max_shard_size="60KB" if weights == "sharded" else "5GB")
    else:
        model.config.save_pretrained(folder)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if weights == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:
            names = sorted(state)
            half = len(names) // 2
            parts = [names[:half], names[half:]]
            weight_map = {}
            for i, part in enumerate(parts, 1):
                fname = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin"
                torch.save({n: state[n] for n in part}, folder / fname)
                weight_map |= {n: fname for n in part}
            (folder / "pytorch_model.bin.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "chat_template": CHAT_TEMPLATE}
    if tokenizer == "spm":
        if spm_model is not None:
            (folder / "tokenizer.model").write_bytes(spm_model.read_bytes())
        else:
            train_spm(folder / "tokenizer.model")
    elif tokenizer == "bpe":
        train_bpe(folder / "tokenizer.json")
        config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
                  "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta interleaved rows (the inverse of HF's conversion script)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def save_meta(model: LlamaForCausalLM, folder: Path, n_shards: int, spm_model: Path) -> Path:
    """Meta layout: column-parallel weights split by rows, row-parallel and the embedding by
    columns, norms copied into every shard."""
    cfg = model.config
    sd = model.state_dict()
    meta: dict[str, tuple[torch.Tensor, int | None]] = {
        "tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1),
        "norm.weight": (sd["model.norm.weight"], None),
        "output.weight": (sd["lm_head.weight"], 0),
    }
    for i in range(cfg.num_hidden_layers):
        hf, m = f"model.layers.{i}.", f"layers.{i}."
        meta |= {
            m + "attention.wq.weight": (hf_to_meta_rows(sd[hf + "self_attn.q_proj.weight"],
                                                        cfg.num_attention_heads), 0),
            m + "attention.wk.weight": (hf_to_meta_rows(sd[hf + "self_attn.k_proj.weight"],
                                                        cfg.num_key_value_heads), 0),
            m + "attention.wv.weight": (sd[hf + "self_attn.v_proj.weight"], 0),
            m + "attention.wo.weight": (sd[hf + "self_attn.o_proj.weight"], 1),
            m + "feed_forward.w1.weight": (sd[hf + "mlp.gate_proj.weight"], 0),
            m + "feed_forward.w2.weight": (sd[hf + "mlp.down_proj.weight"], 1),
            m + "feed_forward.w3.weight": (sd[hf + "mlp.up_proj.weight"], 0),
            m + "attention_norm.weight": (sd[hf + "input_layernorm.weight"], None),
            m + "ffn_norm.weight": (sd[hf + "post_attention_layernorm.weight"], None),
        }
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        shard = {name: (t.clone() if axis is None else t.chunk(n_shards, dim=axis)[s].clone())
                 for name, (t, axis) in meta.items()}
        torch.save(shard, folder / f"consolidated.{s:02d}.pth")
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers,
              "n_heads": cfg.num_attention_heads, "n_kv_heads": cfg.num_key_value_heads,
              "vocab_size": cfg.vocab_size, "multiple_of": 32, "norm_eps": cfg.rms_norm_eps,
              "rope_theta": cfg.rope_parameters["rope_theta"] if getattr(
                  cfg, "rope_parameters", None) else cfg.rope_theta}
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "tokenizer.model").write_bytes(spm_model.read_bytes())
    return folder


def snap_to_q4_grid(model: LlamaForCausalLM, seed: int = 0) -> LlamaForCausalLM:
    """Make a decisive model whose matrices Q4_0 stores exactly.

    Every matrix becomes, per 32-block, k * d with integer k in [-8, 7], one k = -8 per block
    (so Q4_0 recovers d) and d a power of two: quantizing loses nothing, and Q4_0 logits must
    match up to the engine's int8 activations. The output matrix is then set to a row
    permutation of the embedding (still on the grid), so the model predicts "next token =
    perm(this token)" with a wide margin, as trained models do: greedy decoding has no near-ties
    that activation rounding could flip.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim != 2:
                continue
            rows, cols = p.shape
            k = torch.randint(-7, 8, (rows, cols // 32, 32), generator=gen).float()
            k[:, :, 0] = -8  # the block's largest magnitude, so its scale is exactly d
            k = k[:, :, torch.randperm(32, generator=gen)]
            scale = p.std().item() / k.std().item()
            d = 2.0 ** round(torch.log2(torch.tensor(scale)).item())
            p.copy_((k * d).reshape(rows, cols))
        if not model.config.tie_word_embeddings:  # tied: the model predicts "this token again"
            embed = model.model.embed_tokens.weight
            model.lm_head.weight.copy_(embed[torch.randperm(embed.shape[0], generator=gen)])
    return model
