"""Peak memory and time of convert-weights on a TinyLlama-1.1B-shaped checkpoint, as JSON.

    python benchmarks/convert_tinyllama.py [--outtype q4_0] [--dtype bf16] [--threads N]
                                           [--layers 22] [--workdir DIR] [--keep]
                                           [--quantizer search|reference] [--self-imatrix]

Writes a Hugging Face LlamaForCausalLM folder with random weights (22 layers, dim 2048, 32
heads, 4 KV heads, FFN 5632, vocab 32000; one model.safetensors written tensor by tensor, so
making it needs little memory) and a small SentencePiece tokenizer (the vocabulary is padded to
32000 by the converter), then runs `convert-weights` on it in a child process and reports the
child's peak RSS (getrusage via wait4, for that child alone) and wall time. Speed and memory do
not depend on the values.

Linux charges a child the peak RSS of the process it was forked from (kept across exec), so
the checkpoint is made in a separate process and this parent stays small (its own peak is
reported too, as the floor of the measurement).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"n_vocab": 32000, "dim": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4,
         "ffn_dim": 5632}
_ST_DTYPE = {"bf16": ("BF16", 2), "f16": ("F16", 2), "f32": ("F32", 4)}


def hf_tensors(n_layers: int) -> dict[str, tuple[int, ...]]:
    s = SHAPE
    kv_dim = s["dim"] // s["n_heads"] * s["n_kv_heads"]
    shapes = {"model.embed_tokens.weight": (s["n_vocab"], s["dim"]),
              "model.norm.weight": (s["dim"],), "lm_head.weight": (s["n_vocab"], s["dim"])}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (s["dim"],),
                   p + "post_attention_layernorm.weight": (s["dim"],),
                   p + "self_attn.q_proj.weight": (s["dim"], s["dim"]),
                   p + "self_attn.k_proj.weight": (kv_dim, s["dim"]),
                   p + "self_attn.v_proj.weight": (kv_dim, s["dim"]),
                   p + "self_attn.o_proj.weight": (s["dim"], s["dim"]),
                   p + "mlp.gate_proj.weight": (s["ffn_dim"], s["dim"]),
                   p + "mlp.up_proj.weight": (s["ffn_dim"], s["dim"]),
                   p + "mlp.down_proj.weight": (s["dim"], s["ffn_dim"])}
    return shapes


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str) -> None:
    """Header first, then each tensor in 16M-value chunks of random normals / sqrt(fan_in)."""
    st_name, itemsize = _ST_DTYPE[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": st_name, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            n = int(np.prod(shape))
            scale = np.float32(1.0 if len(shape) == 1 else 1 / np.sqrt(shape[-1]))
            for start in range(0, n, 1 << 24):
                x = rng.standard_normal(min(1 << 24, n - start), dtype=np.float32) * scale
                if len(shape) == 1:
                    x += 1
                if dtype == "bf16":  # keep the top half of each float32
                    x = (x.view(np.uint32) >> 16).astype(np.uint16)
                elif dtype == "f16":
                    x = x.astype(np.float16)
                f.write(x.tobytes())


def write_checkpoint(folder: Path, n_layers: int, dtype: str) -> None:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    s = SHAPE
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": s["dim"], "intermediate_size": s["ffn_dim"],
              "num_hidden_layers": n_layers, "num_attention_heads": s["n_heads"],
              "num_key_value_heads": s["n_kv_heads"], "vocab_size": s["n_vocab"],
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
              "eos_token_id": 2, "torch_dtype": {"bf16": "bfloat16", "f16": "float16",
                                                 "f32": "float32"}[dtype]}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
             for _ in range(3000)]
    text = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(5000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf,
                                   vocab_size=1000, model_type="bpe", byte_fallback=True,
                                   minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    write_safetensors(folder / "model.safetensors", hf_tensors(n_layers), dtype)


def run_measured(cmd: list[str], env: dict[str, str], work: Path) -> tuple[int, float, int, str,
                                                                         str]:
    """(exit code, wall seconds, peak RSS in KiB, stdout, stderr) of one child process."""
    out_path, err_path = work / "child.out", work / "child.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    texts = out_path.read_text(), err_path.read_text()
    out_path.unlink()
    err_path.unlink()
    return proc.returncode, wall, usage.ru_maxrss, *texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outtype", default="q4_0")
    ap.add_argument("--dtype", choices=list(_ST_DTYPE), default="bf16",
                    help="storage type of the checkpoint (default bf16, as TinyLlama ships)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quantizer", choices=["search", "reference"], default="search",
                    help="convert-weights --quantizer (default search, its default)")
    ap.add_argument("--self-imatrix", action="store_true",
                    help="convert-weights --self-imatrix (the model samples its own calibration "
                         "text first: a temporary F16 GGUF, the engine, the numpy forward pass)")
    ap.add_argument("--layers", type=int, default=SHAPE["n_layers"])
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where to put the checkpoint and output (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and output")
    ap.add_argument("--make-only", type=Path, help=argparse.SUPPRESS)  # the checkpoint process
    args = ap.parse_args(argv)
    if args.make_only:
        write_checkpoint(args.make_only, args.layers, args.dtype)
        return 0

    work = args.workdir or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    ckpt, out = work / "tinyllama-random", work / f"tinyllama-random.{args.outtype}.gguf"
    t = time.perf_counter()
    if not (ckpt / "model.safetensors").is_file():
        subprocess.run([sys.executable, __file__, "--make-only", str(ckpt), "--layers",
                        str(args.layers), "--dtype", args.dtype], check=True)
    make_s = time.perf_counter() - t

    env = dict(os.environ)  # a source checkout works without reinstalling
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "convert"),
                                                      env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "alpaca_convert.cli", str(ckpt), "-o", str(out),
           "--outtype", args.outtype, "--quantizer", args.quantizer, "--force", "-q"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.self_imatrix:
        cmd.append("--self-imatrix")
    code, wall_s, peak_kib, stdout, stderr = run_measured(cmd, env, work)
    if code != 0:
        print(stderr, file=sys.stderr)
        return code
    # The same interpreter importing the converter and converting nothing: the fixed cost.
    _, _, base_kib, _, _ = run_measured([sys.executable, "-c", "import alpaca_convert.converter"],
                                        env, work)
    largest_f32 = SHAPE["n_vocab"] * SHAPE["dim"] * 4
    report = {
        "checkpoint": {"layers": args.layers, **{k: v for k, v in SHAPE.items()
                                                if k != "n_layers"},
                       "dtype": args.dtype,
                       "bytes": (ckpt / "model.safetensors").stat().st_size},
        "outtype": args.outtype,
        "quantizer": args.quantizer,
        "self_imatrix": args.self_imatrix,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "make_checkpoint_s": round(make_s, 1),
        "convert_wall_s": round(wall_s, 2),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "import_only_rss_mib": round(base_kib / 1024, 1),
        "parent_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "largest_tensor_f32_mib": round(largest_f32 / 2**20, 1),
        "peak_rss_over_largest_tensor": round(peak_kib * 1024 / largest_f32, 2),
        "output_bytes": out.stat().st_size,
        "summary": stdout.strip(),
    }
    print(json.dumps(report, indent=2))
    if not args.keep and args.workdir is None:
        for p in sorted(work.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
