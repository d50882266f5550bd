"""Coverage-guided fuzzing of the model-file loader and the tokenizer with atheris (libFuzzer).

Each input is taken as a whole GGUF file. It is parsed by the strict reader
(`alpaca_cpu.gguf_reader`), its metadata turned into a `Tokenizer` that encodes and decodes a
fixed text, and the file loaded into the engine (`alpaca_cpu.Model`, one forward of one token).
Every failure must be a `ValueError` (`ModelFileError` is one); any other exception, a crash,
a hang (-timeout) or memory growth (-rss_limit_mb) is a finding. Coverage guides the mutations
through the Python code (the reader, the validation, the tokenizer); the native code is run but
not instrumented, so crashes there are found by chance, as in tests/test_fuzz_gguf.py.

Set-up: `pip install atheris`. Atheris 3.0 ships manylinux x86-64 wheels for CPython 3.11-3.13
(2.3 for 3.10), so no clang or libFuzzer build is needed there; other platforms (arm64) have no
wheels and need clang with libFuzzer to build it.

Short run (a few seconds; seeds are made on the fly; tests/test_fuzz_gguf.py runs one with
--loader-only, which leaves the tokenizer out):
    python benchmarks/fuzz_gguf_atheris.py -atheris_runs=2000

Long run (hours), keeping the corpus so that each run starts where the last one stopped:
    python benchmarks/fuzz_gguf_atheris.py --write-seeds fuzz/corpus
    python benchmarks/fuzz_gguf_atheris.py fuzz/corpus -max_total_time=14400 -timeout=20 \\
        -rss_limit_mb=2048 -max_len=65536 -artifact_prefix=fuzz/ -jobs=4 -workers=4

A finding leaves fuzz/crash-<sha1> (or timeout-, oom-); replay it without atheris:
    python benchmarks/fuzz_gguf_atheris.py --replay fuzz/crash-<sha1>
The libFuzzer flags are documented at https://llvm.org/docs/LibFuzzer.html#options.
Prints a JSON summary line at the end of --replay (and of --write-seeds).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tiny_model: the tests' writer makes the seeds

TEXT = "Hello wörld! <s> the 日本語 text\n\t  123 </s> \x00 <|endoftext|> ab"


def _import_targets() -> None:
    global ModelFileError, Model, read_gguf, Tokenizer
    from alpaca_cpu import Model
    from alpaca_cpu.errors import ModelFileError
    from alpaca_cpu.gguf_reader import read_gguf

    try:
        from alpaca_cpu.tokenizer import Tokenizer
    except ImportError:  # the tokenizer arrived later than the loader; fuzz what exists
        Tokenizer = None  # type: ignore[assignment,misc]


_work = Path(tempfile.mkdtemp(prefix="alpaca-fuzz-"))  # the input file, the default seeds
atexit.register(shutil.rmtree, _work, ignore_errors=True)
_fuzz_tokenizer = True  # --loader-only turns it off


def one_input(data: bytes) -> None:
    """The fuzz target: anything but a ValueError propagates and is a finding."""
    path = _work / "input.gguf"
    path.write_bytes(data)
    try:
        metadata = read_gguf(path).metadata
    except ModelFileError:
        return
    if Tokenizer is not None and _fuzz_tokenizer:
        try:
            tok = Tokenizer.from_metadata(metadata)
            ids = tok.encode(TEXT)
            tok.decode(ids)
            tok.encode(TEXT.encode() + b"\xff\xfe")
        except ValueError:
            pass
    try:
        model = Model(path, n_ctx=8, n_threads=1)
    except ValueError:
        return
    model.forward([0])


# ---- seeds -------------------------------------------------------------------------------------

def _byte_level_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def write_seeds(folder: Path) -> list[Path]:
    """Small valid models with a SentencePiece-style and a byte-level BPE vocabulary."""
    from gguf import GGMLQuantizationType as T
    from tiny_model import TinySpec, write_tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    spm_tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
                  + ["▁", "▁the", "e", "h", "t", "th", "▁t", "日本"])
    spm = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": spm_tokens,
           "tokenizer.ggml.scores": [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0],
           "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * 8,
           "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    bpe_tokens = _byte_level_chars() + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    bpe = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
           "tokenizer.ggml.tokens": bpe_tokens,
           "tokenizer.ggml.token_type": [1] * 259 + [3],
           "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he"],
           "tokenizer.ggml.bos_token_id": 259, "tokenizer.ggml.eos_token_id": 259}
    paths = []
    for name, md, wtype in (("spm-q8_0", spm, T.Q8_0), ("bpe-q4_1", bpe, T.Q4_1)):
        spec = TinySpec(n_vocab=len(md["tokenizer.ggml.tokens"]), dim=32, n_layers=1, n_heads=2,
                        n_kv_heads=1, ffn_dim=32, wtype=wtype, context_length=64)
        paths.append(write_tiny_model(folder / f"seed-{name}.gguf", spec, md))
    return paths


def _instrument_package(atheris: Any, package: str) -> int:
    """Add coverage instrumentation to every function of an imported package, in place.

    atheris.instrument_imports() cannot see modules behind the editable install's import hook,
    and instrument_all() takes ~45 s instrumenting numpy and the rest; this takes well under 1 s.
    """
    seen: set[int] = set()
    count = 0

    def visit(obj: Any) -> None:
        nonlocal count
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (staticmethod, classmethod)):
            visit(obj.__func__)
        elif isinstance(obj, property):
            for f in (obj.fget, obj.fset, obj.fdel):
                if f is not None:
                    visit(f)
        elif isinstance(obj, types.FunctionType) and obj.__module__.startswith(package):
            atheris.instrument_func(obj)
            count += 1
        elif isinstance(obj, type) and obj.__module__.startswith(package):
            for member in vars(obj).values():
                visit(member)

    for name, module in list(sys.modules.items()):
        if name == package or name.startswith(package + "."):
            for member in list(vars(module).values()):
                visit(member)
    return count


# ---- entry points ------------------------------------------------------------------------------

def replay(files: list[str]) -> int:
    """Run the target on saved inputs without atheris; report each outcome."""
    _import_targets()
    failed = 0
    for name in files:
        try:
            one_input(Path(name).read_bytes())
            outcome = "ok"
        except Exception as e:  # noqa: BLE001  (a finding: report it, go on with the next)
            outcome, failed = f"{type(e).__name__}: {e}", failed + 1
        print(f"{name}: {outcome}", file=sys.stderr)
    print(json.dumps({"replayed": len(files), "findings": failed}))
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    global _fuzz_tokenizer
    if "--loader-only" in argv:  # fuzz the file reader and the engine, not the tokenizer
        argv = [a for a in argv if a != "--loader-only"]
        _fuzz_tokenizer = False
    if argv[1:2] == ["--write-seeds"] and len(argv) == 3:
        paths = write_seeds(Path(argv[2]))
        print(json.dumps({"seeds": [str(p) for p in paths]}))
        return 0
    if argv[1:2] == ["--replay"]:
        return replay(argv[2:])
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    _import_targets()
    _instrument_package(atheris, "alpaca_cpu")
    args = list(argv)
    if not any(os.path.isdir(a) for a in args[1:] if not a.startswith("-")):
        seeds = _work / "seeds"
        write_seeds(seeds)
        args.append(str(seeds))  # libFuzzer starts from the seed files in this folder
    atheris.Setup(args, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
