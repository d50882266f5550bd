"""alpaca-bench next to llama.cpp's llama-bench: same files, same threads, one interleaved run.

    python benchmarks/compare_llama_cpp.py -m smollm2.Q4_1.gguf -m tinyllama.Q4_0.gguf \
        -t 1,2 -p 512 -n 128 -r 5 --rounds 2 --name smollm2-tinyllama \
        [--llama-bench /tmp/llama.cpp/build/bin/llama-bench]
    python benchmarks/compare_llama_cpp.py -m tinyllama.Q4_0.gguf -t 2 -d 2000 -p 512 -n 128

For every round, file and thread count it runs llama-bench (-o json), then alpaca-bench (-o json
--bandwidth), each in a fresh process; odd rounds run ours first, so slow drift of a noisy
machine does not favour one side. The ratios are ours / llama.cpp of the mean t/s of the same
test in the same round (pp<p> prefill, tg<n> decode), for our engine (api "model") and our
Python API (api "llama"); the summary gives their median over the rounds. The bandwidth probe
comes from the same alpaca-bench run (same thread count), and decode is reported as a fraction
of it for both engines (same bytes per token: the file's weights plus the KV cache read).

-d (depth, default 0) runs every test after d tokens in the cache (alpaca-bench -d, tests named
"tg128 @ d2000" as newer llama-bench's). The llama-bench this was written against (c392e509)
has no -d, so llama.cpp's decode at depth comes from its llama-batched-bench (beside
llama-bench, or --llama-batched-bench), which times n generated tokens after a d-token prompt
directly (-npp d -ntg n -npl 1), run -r times, each in a fresh process. Prefill at depth has no
direct llama.cpp test; it is derived by difference within one llama-bench call:
pp<p> @ d<d> = p / (time(pp d+p) - time(pp d)). A difference of two measured means is noisier
than either (the derived record has no stddev); use more -r for a small p.

Everything goes to benchmarks/results/<name>.json. llama.cpp is not part of this project: this
script never builds or downloads it; it runs the llama-bench binary you point it at.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LLAMA_BENCH = "/tmp/llama.cpp/build/bin/llama-bench"
RESULTS_DIR = REPO / "benchmarks" / "results"


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run a benchmark that prints a JSON list on stdout; its stderr is shown only on failure."""
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    if not proc.stdout.lstrip().startswith("["):
        raise RuntimeError(f"{' '.join(cmd)} printed no JSON list: {proc.stdout[:200]!r}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"{' '.join(cmd)} printed malformed JSON ({e})") from None


def llama_bench_cmd(binary: str, model: str, n_threads: int, a: argparse.Namespace) -> list[str]:
    cmd = [binary, "-m", model, "-t", str(n_threads), "-r", str(a.repetitions), "-o", "json"]
    d, p, n = a.n_depth, a.n_prompt, a.n_gen
    if not d:
        return [*cmd, "-p", str(p), "-n", str(n)]
    # The tests prefill_at_depth() derives from; decode at depth is batched-bench's.
    return [*cmd, "-p", f"{d},{d + p}", "-n", "0"]


def batched_bench_cmd(binary: str, model: str, n_threads: int, n_depth: int,
                      n_gen: int) -> list[str]:
    """One llama-batched-bench run: a prompt of n_depth tokens, then n_gen generated tokens."""
    return [binary, "-m", model, "-t", str(n_threads), "-c", str(n_depth + n_gen + 16),
            "-b", "2048", "-ub", "512", "-npp", str(n_depth), "-ntg", str(n_gen), "-npl", "1",
            "--output-format", "jsonl"]


def run_jsonl(cmd: list[str]) -> dict[str, Any]:
    """Run llama-batched-bench; its one JSON line (a test of one prompt length) on stdout."""
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(lines) != 1:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode} and printed "
                           f"{len(lines)} JSON lines:\n{tail}")
    return json.loads(lines[0])


def decode_at_depth(runs: Sequence[dict[str, Any]], model: str, n_depth: int) -> dict[str, Any]:
    """llama.cpp's tg<n> @ d<d> record, llama-bench-shaped, from llama-batched-bench runs."""
    samples = [r["speed_tg"] for r in runs]
    ns = [r["t_tg"] * 1e9 for r in runs]
    first = runs[0]
    return {"model_filename": model, "n_threads": first["n_threads"], "n_prompt": 0,
            "n_gen": first["tg"], "n_depth": n_depth, "avg_ns": statistics.fmean(ns),
            "stddev_ns": statistics.stdev(ns) if len(ns) > 1 else 0.0,
            "avg_ts": statistics.fmean(samples),
            "stddev_ts": statistics.stdev(samples) if len(samples) > 1 else 0.0,
            "samples_ts": samples, "source": "llama-batched-bench"}


def prefill_at_depth(records: Sequence[dict[str, Any]], n_depth: int,
                     n_prompt: int) -> dict[str, Any]:
    """llama.cpp's pp<p> @ d<d> record, from llama-bench's pp d and pp d+p of the same call:
    the time of the d tokens' prefill is subtracted from that of d + p tokens."""
    def find(pp: int) -> dict[str, Any]:
        found = [r for r in records if r["n_prompt"] == pp and r["n_gen"] == 0]
        if len(found) != 1:
            raise RuntimeError(f"expected one llama-bench record with n_prompt {pp}, n_gen 0; "
                               f"got {len(found)}")
        return found[0]

    base, whole = find(n_depth), find(n_depth + n_prompt)
    how = f"time(pp {n_depth + n_prompt}) - time(pp {n_depth})"
    ns = whole["avg_ns"] - base["avg_ns"]
    if ns <= 0:
        raise RuntimeError(f"llama.cpp at depth {n_depth}: {how} = {ns} ns, not positive; "
                           "the difference is lost in the noise (use a larger -p or -r)")
    measured = {k: v for k, v in whole.items() if not k.startswith(("avg_", "stddev_", "samples_"))}
    return {**measured, "n_prompt": n_prompt, "n_gen": 0, "n_depth": n_depth, "avg_ns": ns,
            "stddev_ns": None, "avg_ts": n_prompt / (ns * 1e-9), "stddev_ts": None,
            "derived": how}


def llama_cpp_at_depth(a: argparse.Namespace, model: str, n_threads: int,
                       log: Callable[[str], None]) -> list[dict[str, Any]]:
    """llama.cpp's records at depth a.n_depth: prefill derived, decode from batched-bench."""
    out: list[dict[str, Any]] = []
    if a.n_prompt:
        raw = run_json(llama_bench_cmd(a.llama_bench, model, n_threads, a))
        out += [*raw, prefill_at_depth(raw, a.n_depth, a.n_prompt)]
    if a.n_gen:
        cmd = batched_bench_cmd(a.llama_batched_bench, model, n_threads, a.n_depth, a.n_gen)
        runs = []
        for i in range(a.repetitions):
            log(f"  llama-batched-bench run {i + 1}/{a.repetitions}")
            runs.append(run_jsonl(cmd))
        out.append(decode_at_depth(runs, model, a.n_depth))
    return out


def alpaca_bench_cmd(model: str, n_threads: int, a: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "alpaca_cpu.cli.bench", "-m", model, "-t", str(n_threads),
            "-d", str(a.n_depth), "-p", str(a.n_prompt), "-n", str(a.n_gen), "-r",
            str(a.repetitions), "-o", "json", "--api", a.api, "--bandwidth", "--bandwidth-mib",
            str(a.bandwidth_mib)]


def test_label(record: dict[str, Any]) -> str:
    """llama-bench's test names: pp512, tg128, pp512+tg128 (-pg), with " @ d2000" at depth."""
    pp, tg = record["n_prompt"], record["n_gen"]
    name = f"pp{pp}+tg{tg}" if pp and tg else f"pp{pp}" if pp else f"tg{tg}"
    depth = record.get("n_depth", 0)  # llama-bench records before -d have no n_depth
    return f"{name} @ d{depth}" if depth else name


def ratios(ours: Sequence[dict[str, Any]], theirs: Sequence[dict[str, Any]],
           round_no: int, model: str) -> list[dict[str, Any]]:
    """ours / llama.cpp for each of our records that llama-bench has the same test for."""
    by_test = {test_label(r): r for r in theirs}
    out = []
    for r in ours:
        ref = by_test.get(test_label(r))
        if ref is None:
            continue
        row = {"round": round_no, "model": model, "n_threads": r["n_threads"],
               "test": test_label(r), "api": r["api"], "isa": r["isa"],
               "alpaca_ts": r["avg_ts"], "llama_cpp_ts": ref["avg_ts"],
               "ratio": r["avg_ts"] / ref["avg_ts"]}
        if "bandwidth_fraction" in r:
            row["bandwidth_gbs"] = r["bandwidth_gbs"]
            row["alpaca_bandwidth_fraction"] = r["bandwidth_fraction"]
            row["llama_cpp_bandwidth_fraction"] = (ref["avg_ts"] * r["bytes_per_token"]
                                                   / (r["bandwidth_gbs"] * 1e9))
        out.append(row)
    return out


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over rounds of each (model, threads, test, api, isa) comparison; with several of
    our ISAs, each one's speed also as a ratio to the first one's (`vs_isa`, `isa_ratio`)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["model"], row["n_threads"], row["test"], row["api"], row["isa"])
        groups.setdefault(key, []).append(row)
    out = []
    for (model, n_threads, test, api, isa), rs in groups.items():
        entry = {"model": model, "n_threads": n_threads, "test": test, "api": api, "isa": isa,
                 "rounds": len(rs),
                 "alpaca_ts": statistics.median(r["alpaca_ts"] for r in rs),
                 "llama_cpp_ts": statistics.median(r["llama_cpp_ts"] for r in rs),
                 "ratio": statistics.median(r["ratio"] for r in rs)}
        for key in ("bandwidth_gbs", "alpaca_bandwidth_fraction", "llama_cpp_bandwidth_fraction"):
            if key in rs[0]:
                entry[key] = statistics.median(r[key] for r in rs)
        out.append(entry)
    first: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in out:  # groups keep the order rows came in: each test's first ISA comes first
        base = first.setdefault((e["model"], e["n_threads"], e["test"], e["api"]), e)
        if base is not e:
            e["vs_isa"] = base["isa"]
            e["isa_ratio"] = e["alpaca_ts"] / base["alpaca_ts"]
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def print_summary(summary: Sequence[dict[str, Any]]) -> None:
    print("| model | threads | test | api | isa | alpaca t/s | llama.cpp t/s | ratio | vs first "
          "isa | bw fraction (ours / llama.cpp) |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for s in summary:
        bw = (f"{s['alpaca_bandwidth_fraction']:.1%} / {s['llama_cpp_bandwidth_fraction']:.1%}"
              if "alpaca_bandwidth_fraction" in s else "-")
        vs = f"{s['isa_ratio']:.2f}" if "isa_ratio" in s else "-"
        print(f"| {Path(s['model']).name} | {s['n_threads']} | {s['test']} | {s['api']} | "
              f"{s['isa']} | {s['alpaca_ts']:.2f} | {s['llama_cpp_ts']:.2f} | {s['ratio']:.2f} | "
              f"{vs} | {bw} |")


def run_side(who: str, model: str, n_threads: int, a: argparse.Namespace) -> list[dict[str, Any]]:
    """The records of one side ("alpaca", "alpaca:<isa>" or "llama.cpp") for one file and thread
    count; "alpaca:<isa>" forces our kernels to that ISA (ALPACA_CPU_ISA)."""
    if who.startswith("alpaca"):
        isa = who.partition(":")[2]
        env = {**os.environ, "ALPACA_CPU_ISA": isa} if isa else None
        return run_json(alpaca_bench_cmd(model, n_threads, a), env)
    if a.n_depth:
        return llama_cpp_at_depth(a, model, n_threads, log)
    return run_json(llama_bench_cmd(a.llama_bench, model, n_threads, a))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("-m", "--model", action="append", required=True, help="GGUF file (repeat)")
    ap.add_argument("-t", "--threads", default="2", help="thread counts, e.g. 1,2 (default 2)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-d", "--n-depth", type=int, default=0,
                    help="tokens in the cache before each test (default 0; see above)")
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default 1)")
    ap.add_argument("--api", default="model,llama", help="alpaca-bench --api (default both)")
    ap.add_argument("--bandwidth-mib", type=int, default=1024)
    ap.add_argument("--isa", default="",
                    help="our kernel ISAs to run, comma separated, e.g. avx2,avx512_vnni "
                         "(default: the one chosen at import); each is compared with llama.cpp "
                         "and with the first")
    ap.add_argument("--llama-bench", default=DEFAULT_LLAMA_BENCH,
                    help=f"llama.cpp's llama-bench binary (default {DEFAULT_LLAMA_BENCH})")
    ap.add_argument("--llama-batched-bench", default=None,
                    help="llama.cpp's llama-batched-bench, for decode at depth (default: the "
                         "one beside --llama-bench)")
    ap.add_argument("--name", default=time.strftime("compare-%Y%m%d-%H%M%S"),
                    help="results file name, without .json")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    if a.n_depth < 0:
        ap.error(f"-d must be at least 0, got {a.n_depth}")
    if not os.access(a.llama_bench, os.X_OK):
        ap.error(f"--llama-bench {a.llama_bench} is not an executable file; build llama.cpp "
                 "yourself and point this at its llama-bench")
    if a.llama_batched_bench is None:
        a.llama_batched_bench = str(Path(a.llama_bench).with_name("llama-batched-bench"))
    if a.n_depth and a.n_gen and not os.access(a.llama_batched_bench, os.X_OK):
        ap.error(f"--llama-batched-bench {a.llama_batched_bench} is not an executable file; "
                 "decode at depth needs it (cmake --build build --target llama-batched-bench)")
    missing = [m for m in a.model if not os.path.isfile(m)]
    if missing:
        ap.error(f"no such model file: {missing[0]}")

    ours = [f"alpaca:{isa.strip()}" for isa in a.isa.split(",") if isa.strip()] or ["alpaca"]
    theirs_all: list[dict[str, Any]] = []
    ours_all: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    try:
        for round_no in range(a.rounds):
            for model in a.model:
                for n_threads in threads:
                    sides = ["llama.cpp", *ours]
                    if round_no % 2:
                        sides.reverse()
                    got: dict[str, list[dict[str, Any]]] = {}
                    for who in sides:
                        log(f"round {round_no + 1}/{a.rounds}: {who} {Path(model).name} "
                            f"-t {n_threads}")
                        got[who] = [{**r, "round": round_no}
                                    for r in run_side(who, model, n_threads, a)]
                    theirs_all += got["llama.cpp"]
                    for who in ours:  # in --isa order, whatever order they ran in
                        ours_all += got[who]
                        rows += ratios(got[who], got["llama.cpp"], round_no, model)
    except RuntimeError as e:
        print(f"compare_llama_cpp: error: {e}", file=sys.stderr)
        return 1

    summary = summarize(rows)
    result = {
        "name": a.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "llama_bench": a.llama_bench,
        "llama_batched_bench": a.llama_batched_bench if a.n_depth else None,
        "llama_cpp_build": sorted({str(r["build_commit"]) for r in theirs_all if "build_commit" in r}),
        "settings": {"models": a.model, "threads": threads, "n_prompt": a.n_prompt,
                     "n_gen": a.n_gen, "n_depth": a.n_depth, "repetitions": a.repetitions,
                     "rounds": a.rounds, "api": a.api, "bandwidth_mib": a.bandwidth_mib,
                     "isas": a.isa or "default"},
        "summary": summary, "ratios": rows, "llama_cpp": theirs_all, "alpaca": ours_all,
    }
    a.out_dir.mkdir(parents=True, exist_ok=True)
    out = a.out_dir / f"{a.name}.json"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)  # a reader never sees half a file
    print_summary(summary)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
