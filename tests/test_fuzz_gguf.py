"""Mutation fuzzing of the model loader: no mutant of a valid file may crash, hang or balloon.

A small valid model (with tokenizer-style string and number arrays in its metadata) is mutated
thousands of times, deterministically: bit flips, bytes set to 0/0xff/random, structural
fields (counts, lengths, types, dimensions, offsets) set to boundary values, truncations and
spliced chunks, in the header, metadata, tensor table and data. Each mutant is loaded in a
child process, as a user would (`alpaca_cpu.Model(path, n_ctx=32)` and, if it loads, one
forward of a few tokens), under a 2 GiB address-space cap. Each must load (and give logits of
the right shape) or raise ModelFileError/ValueError; death by a signal, MemoryError, another
exception type, or a hang fails the test and leaves the mutant's file for reproduction.

One long-running child loads mutants one after another (so Python and numpy start once) and
is restarted whenever it dies or hangs. Run this file directly with `--fuzz-worker` to get
that child.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import random
import re
import resource
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import require_tool
from gguf import GGMLQuantizationType as T
from tiny_model import TinySpec, write_tiny_model

from alpaca_cpu.gguf_reader import read_gguf

# Long runs: ALPACA_FUZZ_MUTANTS=200000 ALPACA_FUZZ_SEED=7 pytest tests/test_fuzz_gguf.py
SEED = int(os.environ.get("ALPACA_FUZZ_SEED", "20240607"))
N_MUTANTS = int(os.environ.get("ALPACA_FUZZ_MUTANTS", "5000"))
MEMORY_CAP_BYTES = 2 << 30  # RLIMIT_AS of the child
MUTANT_TIMEOUT_S = 10.0  # one load + forward takes ~1-5 ms; a hang is far beyond this
START_TIMEOUT_S = 120.0  # the child's imports, on a busy machine
ALLOWED_ERRORS = {"ModelFileError", "ValueError"}


# ---- the child ------------------------------------------------------------------------------

def worker_main() -> None:
    """Load each path read from stdin; answer one JSON line per path on the original stdout."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_BYTES, MEMORY_CAP_BYTES))
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints must not corrupt the protocol

    import numpy as np

    import alpaca_cpu

    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        path = line.rstrip("\n")
        try:
            m = alpaca_cpu.Model(path, n_ctx=32, n_threads=1)
            n_vocab = m.config.n_vocab
            logits = m.forward([1 % n_vocab, 2 % n_vocab, 3 % n_vocab])
            if logits.shape != (n_vocab,) or logits.dtype != np.float32:
                result = {"outcome": "bad-output", "message": f"{logits.shape} {logits.dtype}"}
            else:
                result = {"outcome": "ok"}
            del m
        except Exception as e:  # noqa: BLE001  (the parent judges the type; we report it)
            result = {"outcome": "error", "type": type(e).__name__, "message": str(e)[:300]}
        protocol.write(json.dumps(result) + "\n")


# ---- the parent -------------------------------------------------------------------------------

BASE_SPEC = TinySpec(n_vocab=48, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                     wtype=T.Q4_1, embd_type=T.Q8_0, context_length=64, seed=11)
BASE_METADATA: dict[str, Any] = {
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "▁a", "é"] + [f"t{i}" for i in range(5, 48)],
    "tokenizer.ggml.scores": [-0.25 * i for i in range(48)],
    "tokenizer.ggml.token_type": [2, 3, 3] + [1] * 45,
    "tokenizer.ggml.add_bos_token": True,
}
# Every block type the engine runs, one per matrix (rows of 256 for the K-quants), so that the
# mutants' flipped bits land in K-quant, Q5_0/Q5_1 and IQ4_NL scales and quants too.
MIXED_SPEC = TinySpec(n_vocab=48, dim=256, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=256,
                      wtype=T.Q4_K, context_length=64, seed=12, tensor_types=(
                          ("attn_q", T.Q2_K), ("attn_k", T.Q3_K), ("attn_v", T.Q5_K),
                          ("attn_output", T.Q6_K), ("ffn_gate", T.Q5_0), ("ffn_up", T.Q5_1),
                          ("ffn_down", T.IQ4_NL), ("output", T.Q8_0)))
BASES = {"q4_1-q8_0": BASE_SPEC, "every-block-type": MIXED_SPEC}
# The default suite's short run on MIXED_SPEC: mutations in the tensor data only.
N_DATA_MUTANTS = 150
DATA_ONLY = (0, 0, 0, 1)
INTERESTING_U64 = [0, 1, 2, 3, 4, 7, 8, 13, 31, 32, 33, 63, 64, 255, 256, 4096, 65535, 65536,
                   (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 32) + 1, 1 << 40,
                   (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 32, (1 << 64) - 1]
REGIONS = ("header", "metadata", "tensor table", "data")


@dataclass(frozen=True)
class Layout:
    """Where the base file's sections and structural fields are."""

    data: bytes
    regions: dict[str, tuple[int, int]]  # name -> [start, end)
    fields: list[tuple[int, int, str]]  # (offset, width in bytes, description)


def layout_of(path: Path) -> Layout:
    data = path.read_bytes()
    gf = read_gguf(path)
    fields: list[tuple[int, int, str]] = [(4, 4, "version"), (8, 8, "tensor count"),
                                          (16, 8, "kv count")]
    for key, start in gf.kv_offsets.items():
        at = start + 8 + len(key.encode())
        fields += [(start, 8, f"'{key}' key length"), (at, 4, f"'{key}' value type")]
        vtype = gf.value_types[key].name
        if vtype == "ARRAY":
            fields += [(at + 4, 4, f"'{key}' item type"), (at + 8, 8, f"'{key}' array length")]
            if isinstance(gf.metadata[key][0], str):  # first item's string length
                fields.append((at + 16, 8, f"'{key}' item 0 length"))
        elif vtype == "STRING":
            fields.append((at + 4, 8, f"'{key}' string length"))
        else:
            fields.append((at + 4, 4 if vtype in ("UINT32", "INT32", "FLOAT32") else 1,
                           f"'{key}' value"))
    table_end = gf.tensor_table_offset
    for t in gf.tensors.values():
        at = t.info_offset + 8 + len(t.name)
        fields += [(t.info_offset, 8, f"'{t.name}' name length"), (at, 4, f"'{t.name}' n_dims")]
        fields += [(at + 4 + 8 * j, 8, f"'{t.name}' dim {j}") for j in range(len(t.shape))]
        at += 4 + 8 * len(t.shape)
        fields += [(at, 4, f"'{t.name}' type"), (at + 4, 8, f"'{t.name}' offset")]
        table_end = at + 12
    regions = {"header": (0, 24), "metadata": (24, gf.tensor_table_offset),
               "tensor table": (gf.tensor_table_offset, table_end), "data": (table_end, len(data))}
    return Layout(data, regions, fields)


def region_of(layout: Layout, offset: int) -> str:
    return next(name for name, (a, b) in layout.regions.items() if a <= offset < b)


def mutate(layout: Layout, rng: random.Random,
           region_weights: tuple[int, ...] = (1, 3, 3, 1)) -> tuple[bytes, str, str]:
    """(mutant, description, region of the first change): 1 to 3 stacked mutations, in
    REGIONS chosen with these weights."""
    buf = bytearray(layout.data)
    steps: list[str] = []
    first_region = ""
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        region = rng.choices(REGIONS, weights=region_weights)[0]
        lo, hi = layout.regions[region]
        hi = min(hi, len(buf))
        if hi <= lo:  # an earlier truncation removed this region
            continue
        first_region = first_region or region
        op = rng.choices(("flip", "byte", "field", "truncate", "splice"),
                         weights=(3, 2, 4, 1, 1))[0]
        if op == "flip":
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(lo, hi)
                bit = rng.randrange(8)
                buf[at] ^= 1 << bit
                steps.append(f"flip bit {bit} of byte {at} ({region})")
        elif op == "byte":
            at = rng.randrange(lo, hi)
            buf[at] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
            steps.append(f"byte {at} := 0x{buf[at]:02x} ({region})")
        elif op == "field":
            candidates = [f for f in layout.fields if lo <= f[0] and f[0] + f[1] <= hi]
            if not candidates:
                continue
            at, width, what = rng.choice(candidates)
            old = int.from_bytes(buf[at:at + width], "little")
            value = rng.choice((rng.choice(INTERESTING_U64), old + rng.randint(-16, 16),
                                old * 2, rng.getrandbits(8 * width)))
            value %= 1 << (8 * width)
            buf[at:at + width] = value.to_bytes(width, "little")
            steps.append(f"{what} at byte {at} := {value}")
        elif op == "truncate":
            at = rng.randrange(lo, hi)
            del buf[at:]
            steps.append(f"truncate at byte {at} ({region})")
        else:
            at = rng.randrange(lo, hi)
            n = rng.randint(1, 64)
            if rng.random() < 0.5:
                del buf[at:at + n]
                steps.append(f"delete {n} bytes at {at} ({region})")
            else:
                buf[at:at] = buf[at:at + n]
                steps.append(f"duplicate {n} bytes at {at} ({region})")
    return bytes(buf), "; ".join(steps) or "unchanged", first_region or "none"


class Worker:
    """The long-running child; restarted after it dies or hangs."""

    def __init__(self, stderr: IO[bytes]) -> None:
        self.stderr = stderr
        self.restarts = -1
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        if self.proc is not None:  # a dead or killed predecessor: release its pipes
            self._reap()
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   MALLOC_ARENA_MAX="2")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--fuzz-worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1, env=env)
        self.restarts += 1
        ready = self._read(START_TIMEOUT_S)
        assert ready == {"ready": True}, f"fuzz worker failed to start: {ready}"

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not readable:
            self.proc.kill()
            self.proc.wait()
            return {"outcome": "hang", "message": f"no answer within {timeout} s"}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            return {"outcome": "died", "message": f"child died ({how})"}
        return json.loads(line)

    def load(self, path: Path) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{path}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            result = {"outcome": "died", "message": "child died before the request"}
        else:
            result = self._read(MUTANT_TIMEOUT_S)
        if result["outcome"] in ("hang", "died"):
            self.start()
        return result

    def _reap(self) -> int:
        assert self.proc is not None and self.proc.stdin is not None
        assert self.proc.stdout is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it died with our last request unread
        code = self.proc.wait(timeout=30)
        self.proc.stdout.close()
        return code

    def close(self) -> None:
        code = self._reap()
        assert code == 0, f"fuzz worker exited with status {code}"


def judge(result: dict[str, Any]) -> str | None:
    """None when the outcome is acceptable, else what went wrong."""
    if result["outcome"] == "ok":
        return None
    if result["outcome"] == "error" and result["type"] in ALLOWED_ERRORS:
        return None
    if result["outcome"] == "error" and result["type"] == "MemoryError":
        return f"exceeded the {MEMORY_CAP_BYTES >> 30} GiB memory cap: {result['message']}"
    return f"{result['outcome']}: {result.get('type', '')} {result.get('message', '')}"


@dataclass
class FuzzRun:
    """What a run of mutants gave."""

    failures: list[str]
    outcomes: Counter[str]
    regions: Counter[str]
    kinds: Counter[str]
    restarts: int
    seconds: float


def fuzz(tmp_path: Path, spec: TinySpec, n_mutants: int,
         region_weights: tuple[int, ...] = (1, 3, 3, 1)) -> FuzzRun:
    """Load the base file of `spec` and n_mutants mutants of it in the worker, judging each."""
    base = write_tiny_model(tmp_path / "base.gguf", spec, BASE_METADATA)
    layout = layout_of(base)
    rng = random.Random(SEED)
    run = FuzzRun([], Counter(), Counter(), Counter(), 0, 0.0)
    start = time.perf_counter()
    with open(tmp_path / "worker-stderr.txt", "wb") as stderr:
        worker = Worker(stderr)
        for i in range(n_mutants + 1):
            if i == 0:
                data, what, region = layout.data, "unchanged base file", "none"
            else:
                data, what, region = mutate(layout, rng, region_weights)
            path = tmp_path / f"mutant-{i}.gguf"
            path.write_bytes(data)
            result = worker.load(path)
            problem = judge(result)
            if i == 0:
                assert result == {"outcome": "ok"}, f"the base file must load: {result}"
            if problem:
                kept = tmp_path / "failing" / path.name
                kept.parent.mkdir(exist_ok=True)
                shutil.move(path, kept)
                run.failures.append(f"mutant {i} ({what}) -> {problem}; file kept at {kept}")
            else:
                path.unlink()
            run.outcomes[result.get("type", result["outcome"])] += 1
            if result["outcome"] == "error":  # "field at byte N: found ..." -> "field"
                field = result["message"].split(": ")[1].split(" at ")[0]
                run.kinds[re.sub(r"[#\d]+", "N", field)] += 1
            run.regions[region] += 1
        worker.close()
    run.restarts = worker.restarts
    run.seconds = time.perf_counter() - start
    assert not run.failures, f"{len(run.failures)} of {n_mutants} mutants failed:\n" + \
        "\n".join(run.failures[:20])
    return run


@pytest.mark.slow
@pytest.mark.parametrize("base_name", list(BASES))
def test_mutated_model_files_never_crash_hang_or_balloon(tmp_path: Path, base_name: str) -> None:
    run = fuzz(tmp_path, BASES[base_name], N_MUTANTS)
    # The fuzzer must really have exercised both paths, in every section of the file.
    assert run.outcomes["ok"] >= N_MUTANTS // 20, run.outcomes
    assert run.outcomes["ModelFileError"] >= N_MUTANTS // 4, run.outcomes
    for name in REGIONS:
        assert run.regions[name] >= N_MUTANTS // 20, run.regions
    assert run.restarts == 0, f"the worker was restarted {run.restarts} times"
    assert len(run.kinds) >= 30, run.kinds  # many different checks fired, not one over and over
    print(f"{N_MUTANTS} mutants in {run.seconds:.1f} s: {dict(run.outcomes)}; regions "
          f"{dict(run.regions)}; {len(run.kinds)} kinds of error, most common: "
          f"{run.kinds.most_common(8)}")


def test_mutated_block_data_of_every_type(tmp_path: Path) -> None:
    """A short run in the default suite: bit flips, bytes set, cuts and splices in the tensor
    data of a file mixing every block type (K-quant super-block and sub-block scales, Q5/IQ4_NL
    scales, quants). A mutant in place loads and runs whatever the values (NaN/inf scales
    included); one cut short is refused; none crashes."""
    run = fuzz(tmp_path, MIXED_SPEC, N_DATA_MUTANTS, DATA_ONLY)
    assert run.regions["data"] == N_DATA_MUTANTS
    assert run.outcomes["ok"] >= N_DATA_MUTANTS // 2, run.outcomes  # most keep their size
    assert run.outcomes["ModelFileError"] >= 1, run.outcomes  # the cuts and deletions
    assert run.restarts == 0


def test_mutator_is_deterministic(tmp_path: Path) -> None:
    layout = layout_of(write_tiny_model(tmp_path / "base.gguf", BASE_SPEC, BASE_METADATA))
    first = [mutate(layout, random.Random(SEED)) for _ in range(3)]
    again = [mutate(layout, random.Random(SEED)) for _ in range(3)]
    assert first == again and first[0][0] != layout.data


def test_worker_reports_deaths_and_hangs(tmp_path: Path) -> None:
    """The harness itself: a killed or silent child is reported and replaced."""
    with open(tmp_path / "stderr.txt", "wb") as stderr:
        worker = Worker(stderr)
        assert worker.proc is not None
        worker.proc.kill()
        worker.proc.wait()
        result = worker.load(tmp_path / "whatever.gguf")
        assert result["outcome"] == "died" and worker.restarts == 1
        assert worker._read(0.2) == {"outcome": "hang", "message": "no answer within 0.2 s"}
        assert worker.proc.returncode is not None  # the silent child was killed
        worker.start()
        result = worker.load(tmp_path / "absent.gguf")
        assert result["outcome"] == "error" and result["type"] == "ModelFileError"
        assert "no such model file" in result["message"] and worker.restarts == 2
        worker.close()


ATHERIS_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_gguf_atheris.py"
ATHERIS_RUNS = 2000


@pytest.mark.slow
def test_atheris_short_run(tmp_path: Path) -> None:
    """A short coverage-guided run of benchmarks/fuzz_gguf_atheris.py (see it for long runs).

    Atheris has wheels for x86-64 Linux only (pyproject's test extra should list it with that
    marker); elsewhere the same target replays its seeds without coverage guidance.
    """
    on_x86_64_linux = (platform.system(), platform.machine()) == ("Linux", "x86_64")
    if on_x86_64_linux and importlib.util.find_spec("atheris") is None:
        require_tool("atheris", "pip install atheris (x86-64 Linux wheels for CPython 3.11-3.13; "
                                "the [test] extra installs it)")
    seeds = tmp_path / "corpus"
    run = subprocess.run([sys.executable, str(ATHERIS_SCRIPT), "--write-seeds", str(seeds)],
                         check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    if not on_x86_64_linux:
        cmd = [sys.executable, str(ATHERIS_SCRIPT), "--replay", *map(str, seeds.iterdir())]
        run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and '"findings": 0' in run.stdout, run.stderr
        return
    # libFuzzer's RSS limit is on the peak RSS getrusage reports, and on Linux a child's starts
    # at its parent's RSS when it was forked: an xdist worker that ran a large test before
    # this one would make any run an "oom". So the limit is 2 GB above this process's peak,
    # and single allocations are held to 2 GB on their own.
    parent_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux
    cmd = [sys.executable, str(ATHERIS_SCRIPT), str(seeds),
           f"-atheris_runs={ATHERIS_RUNS}", "-seed=1", f"-rss_limit_mb={2048 + parent_peak_mb}",
           "-malloc_limit_mb=2048", "-timeout=30",
           f"-artifact_prefix={tmp_path}/"]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    findings = [p.name for p in tmp_path.iterdir() if p.name.split("-")[0] in
                ("crash", "timeout", "oom", "leak")]
    assert run.returncode == 0 and not findings, f"{findings}\n{run.stderr[-3000:]}"
    assert f"Done {ATHERIS_RUNS} in" in run.stderr, run.stderr[-3000:]


if __name__ == "__main__":
    if sys.argv[1:] == ["--fuzz-worker"]:
        worker_main()
    else:  # `python tests/test_fuzz_gguf.py` runs these tests alone
        sys.exit(pytest.main([__file__, "-q", "-s"]))
