"""Make tests/data/llama_quantize_real_shape_plans.json: the type llama.cpp's `llama-quantize`
gives each tensor of the TinyLlama-1.1B, Llama-3.2-1B and LLaMA-7B shapes, for every mix (run by
hand where llama.cpp is built; the tests only read the JSON). See tests/data/README.md.

    python tests/data/make_real_shape_plans.py /path/to/llama.cpp/build/bin/llama-quantize

The input of each run is an F16 file of the shape as benchmarks/make_random_model.py lays it out
(same names, order, metadata and vocabulary), except that its tensor data is never written: the
file is extended to its full size as a sparse file (zeros that take no disk), which is all that
`llama-quantize --dry-run` needs, since it reads only the header to plan and size each tensor.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "llama_quantize_real_shape_plans.json"
# llama-quantize's names of the mixes (its ftype argument), by the converter's --outtype names.
FTYPES = {"q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q5_k_s": "Q5_K_S",
          "q6_k": "Q6_K", "q3_k_m": "Q3_K_M", "q2_k": "Q2_K", "q5_0": "Q5_0", "q5_1": "Q5_1",
          "iq4_nl": "IQ4_NL", "q4_0": "Q4_0", "q4_1": "Q4_1", "q8_0": "Q8_0"}
# One line per tensor of --dry-run: "[  12/ 201] blk.0.attn_v.weight - [...], type = f16, ...
# -> 0.12 MiB (q6_K)"; tensors kept in their type end without the "(type)".
LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[.*?\], type =\s+(\w+),.*?(?:\((\w+)\))?$")


def load_script() -> object:
    spec = importlib.util.spec_from_file_location(
        "make_random_model", REPO / "benchmarks" / "make_random_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_sparse_f16(mrm: object, shape_name: str, path: Path) -> None:
    """The F16 file of the shape, its data left as a hole."""
    shape = mrm.SHAPES[shape_name]  # type: ignore[attr-defined]
    mix = mrm.TYPES["f16"]  # type: ignore[attr-defined]
    writer = GGUFWriter(str(path), "llama")
    mrm._add_metadata(writer, shape, mix.file_type, "f16")  # type: ignore[attr-defined]
    total = 0
    for t in mrm.tensor_plan(shape, mix):  # type: ignore[attr-defined]
        dtype = np.float32 if t.type == GGMLQuantizationType.F32 else np.float16
        writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), t.nbytes)
        total += -(-t.nbytes // writer.data_alignment) * writer.data_alignment
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with open(path, "r+b") as f:
        end = f.seek(0, 2)
        data_start = -(-end // writer.data_alignment) * writer.data_alignment
        f.truncate(data_start + total)


def dry_run(binary: str, path: Path, ftype: str) -> tuple[dict[str, str], str]:
    """({tensor name: GGML type}, llama.cpp's version line)."""
    proc = subprocess.run([binary, "--dry-run", str(path), ftype], check=True,
                          capture_output=True, text=True)
    types, version = {}, ""
    for line in (proc.stdout + proc.stderr).splitlines():
        m = LINE.match(line.strip())
        if m:
            name, src, dst = m.groups()
            types[name] = (dst or src).upper()
        elif line.startswith("version:"):
            version = line.removeprefix("version:").strip()
    return types, version


def compact(types: dict[str, str]) -> dict[str, object]:
    """The plan as its commonest matrix type, the number of F32 tensors and every other
    tensor's type by name."""
    matrices = [t for t in types.values() if t != "F32"]
    main = max(set(matrices), key=matrices.count)
    return {"n_tensors": len(types), "main": main,
            "n_f32": sum(t == "F32" for t in types.values()),
            "other": {n: t for n, t in types.items() if t not in (main, "F32")}}


def main() -> None:
    binary = sys.argv[1]
    mrm = load_script()
    plans: dict[str, dict[str, object]] = {}
    versions = set()
    with tempfile.TemporaryDirectory() as tmp:
        for shape_name in ("tinyllama", "llama3.2-1b", "llama7b"):
            path = Path(tmp) / f"{shape_name}.F16.gguf"
            write_sparse_f16(mrm, shape_name, path)
            plans[shape_name] = {}
            for mix, ftype in FTYPES.items():
                types, version = dry_run(binary, path, ftype)
                plans[shape_name][mix] = compact(types)
                versions.add(version)
            path.unlink()
    out = {
        "description": (
            "llama-quantize --dry-run <F16 file> <FTYPE>: the GGML type of every tensor, by "
            "tensor name, for each named shape of benchmarks/make_random_model.py and each mix "
            "(keys: convert-weights --outtype names), written compactly: the number of tensors, "
            "the commonest matrix type (main), the number of F32 tensors and the type of every "
            "other tensor by name. Made by tests/data/make_real_shape_plans.py."),
        "llama_cpp": sorted(versions), "plans": plans}
    OUT.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
