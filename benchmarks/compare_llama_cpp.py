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
has no -d, so its figures at depth are derived by difference from tests it does have, run in
the same llama-bench call: pp<p> @ d<d> = p / (time(pp d+p) - time(pp d)), and
tg<n> @ d<d> = n / (time(pg d,n) - time(pp d)), where pg d,n prefills d tokens and generates n.
A difference of two measured means is noisier than either (the derived records have no
stddev, and pp d+p splits its prefill into batches at other positions than a prefill at
depth would); use more -r for a small p or n.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LLAMA_BENCH = "/tmp/llama.cpp/build/bin/llama-bench"
RESULTS_DIR = REPO / "benchmarks" / "results"


def run_json(cmd: list[str]) -> list[dict[str, Any]]:
    """Run a benchmark that prints a JSON list on stdout; its stderr is shown only on failure."""
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
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
    # The tests at_depth() derives the figures at depth from (this llama-bench has no -d).
    prompts = [d, d + p] if p else [d]
    return [*cmd, "-p", ",".join(map(str, prompts)), "-n", "0",
            *(["-pg", f"{d},{n}"] if n else [])]


def at_depth(records: Sequence[dict[str, Any]], n_depth: int, n_prompt: int,
             n_gen: int) -> list[dict[str, Any]]:
    """llama.cpp's pp<p> @ d<d> and tg<n> @ d<d> records, from llama-bench's records of the
    tests llama_bench_cmd asks for at depth d: the time of the d tokens' prefill is subtracted
    from that of a test which starts with it."""
    def find(pp: int, tg: int) -> dict[str, Any]:
        found = [r for r in records if r["n_prompt"] == pp and r["n_gen"] == tg]
        if len(found) != 1:
            raise RuntimeError(f"expected one llama-bench record with n_prompt {pp}, n_gen {tg}; "
                               f"got {len(found)}")
        return found[0]

    base = find(n_depth, 0)
    tests = []
    if n_prompt:
        tests.append((n_prompt, 0, find(n_depth + n_prompt, 0),
                      f"time(pp {n_depth + n_prompt}) - time(pp {n_depth})"))
    if n_gen:
        tests.append((0, n_gen, find(n_depth, n_gen),
                      f"time(pg {n_depth},{n_gen}) - time(pp {n_depth})"))
    out = []
    for pp, tg, whole, how in tests:
        ns = whole["avg_ns"] - base["avg_ns"]
        if ns <= 0:
            raise RuntimeError(f"llama.cpp at depth {n_depth}: {how} = {ns} ns, not positive; "
                               "the difference is lost in the noise (use a larger -p/-n or -r)")
        measured = {k: v for k, v in whole.items() if not k.startswith(("avg_", "stddev_",
                                                                          "samples_"))}
        out.append({**measured, "n_prompt": pp, "n_gen": tg, "n_depth": n_depth, "avg_ns": ns,
                    "stddev_ns": None, "avg_ts": (pp + tg) / (ns * 1e-9), "stddev_ts": None,
                    "derived": how})
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
    """Median over rounds of each (model, threads, test, api) comparison."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["n_threads"], row["test"], row["api"]), []).append(row)
    out = []
    for (model, n_threads, test, api), rs in groups.items():
        entry = {"model": model, "n_threads": n_threads, "test": test, "api": api,
                 "rounds": len(rs),
                 "alpaca_ts": statistics.median(r["alpaca_ts"] for r in rs),
                 "llama_cpp_ts": statistics.median(r["llama_cpp_ts"] for r in rs),
                 "ratio": statistics.median(r["ratio"] for r in rs)}
        for key in ("bandwidth_gbs", "alpaca_bandwidth_fraction", "llama_cpp_bandwidth_fraction"):
            if key in rs[0]:
                entry[key] = statistics.median(r[key] for r in rs)
        out.append(entry)
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
    print("| model | threads | test | api | alpaca t/s | llama.cpp t/s | ratio | bw fraction "
          "(ours / llama.cpp) |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for s in summary:
        bw = (f"{s['alpaca_bandwidth_fraction']:.1%} / {s['llama_cpp_bandwidth_fraction']:.1%}"
              if "alpaca_bandwidth_fraction" in s else "-")
        print(f"| {Path(s['model']).name} | {s['n_threads']} | {s['test']} | {s['api']} | "
              f"{s['alpaca_ts']:.2f} | {s['llama_cpp_ts']:.2f} | {s['ratio']:.2f} | {bw} |")


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
    ap.add_argument("--llama-bench", default=DEFAULT_LLAMA_BENCH,
                    help=f"llama.cpp's llama-bench binary (default {DEFAULT_LLAMA_BENCH})")
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
    missing = [m for m in a.model if not os.path.isfile(m)]
    if missing:
        ap.error(f"no such model file: {missing[0]}")

    theirs_all: list[dict[str, Any]] = []
    ours_all: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    try:
        for round_no in range(a.rounds):
            for model in a.model:
                for n_threads in threads:
                    jobs = [("llama.cpp", llama_bench_cmd(a.llama_bench, model, n_threads, a)),
                            ("alpaca", alpaca_bench_cmd(model, n_threads, a))]
                    if round_no % 2:
                        jobs.reverse()
                    got: dict[str, list[dict[str, Any]]] = {}
                    for who, cmd in jobs:
                        print(f"round {round_no + 1}/{a.rounds}: {who} {Path(model).name} "
                              f"-t {n_threads}", file=sys.stderr, flush=True)
                        got[who] = [{**r, "round": round_no} for r in run_json(cmd)]
                    if a.n_depth:  # kept with the records they are derived from
                        got["llama.cpp"] += at_depth(got["llama.cpp"], a.n_depth, a.n_prompt,
                                                     a.n_gen)
                    theirs_all += got["llama.cpp"]
                    ours_all += got["alpaca"]
                    rows += ratios(got["alpaca"], got["llama.cpp"], round_no, model)
    except RuntimeError as e:
        print(f"compare_llama_cpp: error: {e}", file=sys.stderr)
        return 1

    summary = summarize(rows)
    result = {
        "name": a.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "llama_bench": a.llama_bench,
        "llama_cpp_build": sorted({str(r.get("build_commit")) for r in theirs_all}),
        "settings": {"models": a.model, "threads": threads, "n_prompt": a.n_prompt,
                     "n_gen": a.n_gen, "n_depth": a.n_depth, "repetitions": a.repetitions,
                     "rounds": a.rounds, "api": a.api, "bandwidth_mib": a.bandwidth_mib},
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
