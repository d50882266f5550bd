"""Make tests/data/rope_scaling_llama_cpp.json: llama.cpp's logits on tiny models with RoPE
scaling (run by hand where llama-cpp-python and its libllama are installed; the tests only read
the JSON). See tests/data/README.md.

    PYTHONPATH=<llama-cpp-python sdist> LLAMA_CPP_LIB_PATH=<dir of libllama.so> \\
        python tests/data/make_rope_scaling_reference.py
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llama_cpp
from alpaca_convert import convert
from test_convert_llama3 import CONVERTED_POSITIONS, converted_tokens, llama3_folder
from test_rope_scaling import TINY_CASES, tiny_scaled_model


def main() -> None:
    out = {"description": (
        "Logits llama.cpp gives on tiny random F32 models with RoPE scaling, made by "
        "tests/test_rope_scaling.py's tiny_scaled_model (sha256 of each file below): "
        "llama-cpp-python 0.3.36's Llama(path, n_ctx=128, logits_all=True, n_threads=2) on the "
        "libllama of its vendored llama.cpp (ggml 0c1e570), the tokens evaluated in one "
        "eval(); rows = logits at the listed positions, rounded to 6 decimals. "
        "converted_hf_llama3: the same for the F32 file convert-weights writes from "
        "tests/test_convert_llama3.py's tiny Hugging Face Llama-3 checkpoint (llama3_folder, "
        "untied), on converted_tokens()."),
        "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in TINY_CASES:
            path = tiny_scaled_model(Path(tmp), name)
            tokens, positions = TINY_CASES[name]["tokens"], TINY_CASES[name]["positions"]
            llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, n_threads=2,
                                  verbose=False)
            llm.eval(tokens)
            scores = np.asarray(llm.scores[: len(tokens)], np.float32)
            out["cases"][name] = {
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "positions": positions,
                "logits": [[round(float(v), 6) for v in scores[p]] for p in positions],
            }
        # a tiny Hugging Face Llama-3 checkpoint converted by convert-weights (F32)
        folder, _ = llama3_folder(Path(tmp) / "hf", tied=False)
        path = Path(tmp) / "converted.gguf"
        with contextlib.redirect_stdout(io.StringIO()):
            convert(folder, path, outtype="f32")
        ids = converted_tokens()
        llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)], np.float32)
        out["converted_hf_llama3"] = {
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "positions": CONVERTED_POSITIONS,
            "logits": [[round(float(v), 6) for v in scores[p]] for p in CONVERTED_POSITIONS],
        }
    dst = Path(__file__).with_name("rope_scaling_llama_cpp.json")
    dst.write_text(json.dumps(out, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
