"""alpaca-bench next to llama-bench engines (llama.cpp, forks): same files, same threads, one
interleaved run.

    python benchmarks/compare_llama_cpp.py -m smollm2.Q4_1.gguf -m tinyllama.Q4_0.gguf \
        -t 1,2 -p 512 -n 128 -r 5 --rounds 2 --name smollm2-tinyllama \
        [--llama-bench /tmp/llama.cpp/build/bin/llama-bench]
    python benchmarks/compare_llama_cpp.py -m tinyllama.Q4_0.gguf -t 2 -d 2000 -p 512 -n 128
    python benchmarks/compare_llama_cpp.py -m smollm2.Q4_0.gguf -t 1,2 -p 512 -n 128 -r 2 \
        --engine llama.cpp=/tmp/llama.cpp/build/bin/llama-bench \
        --engine ik-rtr0=/tmp/ik_llama.cpp/build/bin/llama-bench,-rtr,0 \
        --engine ik-rtr1=/tmp/ik_llama.cpp/build/bin/llama-bench,-rtr,1

The engines are llama-bench binaries that print llama.cpp's -o json records: --engine
NAME=PATH[,ARG...] (repeat; the ARGs, comma separated, go to that llama-bench as they are, so an
ARG cannot hold a comma). Without --engine there is one, named "llama.cpp": --llama-bench, or its
default path.

For every round, file and thread count it runs each engine's llama-bench (-o json) and
alpaca-bench (-o json --bandwidth), each in a fresh process, in an order rotated by one place each
round (round 0: the engines in the order given, then ours; round 1 starts with the second ...),
so that slow drift of a noisy machine favours no side: with k sides, each runs first in one round
of k. The ratios are ours / each engine of the mean t/s of the same test in the same round
(pp<p> prefill, tg<n> decode), for our engine (api "model") and our Python API (api "llama");
"ratio_vs_best" is ours / the best other engine: the highest t/s among the engines for that test
in that round (best_engine names it). The summary gives medians over the rounds, and
best_engine_rounds counts the rounds each engine was the best. The bandwidth probe comes from the
same alpaca-bench run (same thread count), and decode is reported as a fraction of it for every
engine (same bytes per token: the file's weights plus the KV cache read).

-d (depth, default 0) runs every test after d tokens in the cache (alpaca-bench -d, tests named
"tg128 @ d2000" as newer llama-bench's); it takes one engine without extra arguments. The
llama-bench this was written against (c392e509) has no -d, so the engine's decode at depth comes
from its llama-batched-bench (beside its llama-bench, or --llama-batched-bench), which times n
generated tokens after a d-token prompt directly (-npp d -ntg n -npl 1), run -r times, each in a
fresh process. Prefill at depth has no direct llama.cpp test; it is derived by difference within
one llama-bench call: pp<p> @ d<d> = p / (time(pp d+p) - time(pp d)). A difference of two
measured means is noisier than either (the derived record has no stddev); use more -r for a
small p.

Everything goes to benchmarks/results/<name>.json: "engines" (name, path, args, build_commit as
llama-bench reports it), "engine_records" (each engine's llama-bench records by name), "alpaca"
(ours), "ratios" (one row per round and test, with an "engines" entry per engine: ts, ratio,
bandwidth_fraction) and "summary". The fields of files written before --engine are kept for the
engine named "llama.cpp" when the run has one: "llama_bench", "llama_cpp_build", "llama_cpp" (its
records, again), and in every ratio and summary row "llama_cpp_ts", "ratio" (ours / llama.cpp)
and "llama_cpp_bandwidth_fraction"; a run without an engine of that name has none of them.
llama.cpp is not part of this project: this script never builds or downloads any engine; it runs
the binaries you point it at.
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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_LLAMA_BENCH = "/tmp/llama.cpp/build/bin/llama-bench"
RESULTS_DIR = REPO / "benchmarks" / "results"
# The engine named so carries the JSON fields of the files written before --engine.
LEGACY_ENGINE = "llama.cpp"
OURS = "alpaca"  # our sides: "alpaca", or "alpaca:<isa>" with --isa


@dataclass(frozen=True)
class Engine:
    """A llama-bench to compare with: its name in the results, its binary, and the arguments
    added to each of its command lines."""
    name: str
    path: str
    args: tuple[str, ...] = ()

    def describe(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """What the results file says of this engine, with the commits its records report."""
        return {"name": self.name, "path": self.path, "args": list(self.args),
                "build_commit": sorted({str(r["build_commit"]) for r in records
                                        if "build_commit" in r})}


def parse_engine(spec: str) -> Engine:
    """--engine NAME=PATH[,ARG...]"""
    name, sep, rest = spec.partition("=")
    path, *args = rest.split(",")
    if not sep or not name.strip() or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[,ARG...], got {spec!r}")
    if name.startswith(OURS):
        raise argparse.ArgumentTypeError(f"engine names starting with {OURS!r} are ours: {name!r}")
    return Engine(name.strip(), path, tuple(args))


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


def llama_bench_cmd(binary: str, model: str, n_threads: int, a: argparse.Namespace,
                    extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [binary, *extra_args, "-m", model, "-t", str(n_threads), "-r", str(a.repetitions),
           "-o", "json"]
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


def engine_at_depth(engine: Engine, a: argparse.Namespace, model: str, n_threads: int,
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    """An engine's records at depth a.n_depth: prefill derived, decode from batched-bench."""
    out: list[dict[str, Any]] = []
    if a.n_prompt:
        raw = run_json(llama_bench_cmd(engine.path, model, n_threads, a, engine.args))
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


def versus_engine(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """One engine's side of a comparison: its t/s, ours / it, and its decode as a fraction of the
    bandwidth our run measured (same bytes per token)."""
    out = {"ts": theirs["avg_ts"], "ratio": ours["avg_ts"] / theirs["avg_ts"]}
    if "bandwidth_fraction" in ours:
        out["bandwidth_fraction"] = (theirs["avg_ts"] * ours["bytes_per_token"]
                                     / (ours["bandwidth_gbs"] * 1e9))
    return out


def add_legacy_fields(row: dict[str, Any]) -> None:
    """The fields of rows written before --engine, from the engine named llama.cpp, if any."""
    legacy = row["engines"].get(LEGACY_ENGINE)
    if legacy is None:
        return
    row["llama_cpp_ts"] = legacy["ts"]
    row["ratio"] = legacy["ratio"]
    if "bandwidth_fraction" in legacy:
        row["llama_cpp_bandwidth_fraction"] = legacy["bandwidth_fraction"]


def comparison_rows(ours: Sequence[dict[str, Any]],
                    theirs_by_engine: dict[str, Sequence[dict[str, Any]]],
                    round_no: int, model: str) -> list[dict[str, Any]]:
    """One row per record of ours that some engine has the same test for: ours / each such
    engine, and ours / the best of them (the highest t/s)."""
    tests_by_engine = {name: {test_label(r): r for r in records}
                       for name, records in theirs_by_engine.items()}
    out = []
    for r in ours:
        test = test_label(r)
        refs = {name: tests[test] for name, tests in tests_by_engine.items() if test in tests}
        if not refs:
            continue
        best = max(refs, key=lambda name: refs[name]["avg_ts"])
        row = {"round": round_no, "model": model, "n_threads": r["n_threads"], "test": test,
               "api": r["api"], "isa": r["isa"], "alpaca_ts": r["avg_ts"],
               "engines": {name: versus_engine(r, ref) for name, ref in refs.items()},
               "best_engine": best, "best_engine_ts": refs[best]["avg_ts"],
               "ratio_vs_best": r["avg_ts"] / refs[best]["avg_ts"]}
        if "bandwidth_fraction" in r:
            row["bandwidth_gbs"] = r["bandwidth_gbs"]
            row["alpaca_bandwidth_fraction"] = r["bandwidth_fraction"]
        add_legacy_fields(row)
        out.append(row)
    return out


def median_versus_engine(rows: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    """Median over the rows (rounds) that have engine `name` of each of its fields."""
    sides = [r["engines"][name] for r in rows if name in r["engines"]]
    return {"rounds": len(sides), **{key: statistics.median(s[key] for s in sides)
                                     for key in sides[0]}}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over rounds of each (model, threads, test, api, isa) comparison; with several of
    our ISAs, each one's speed also as a ratio to the first one's (`vs_isa`, `isa_ratio`)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["model"], row["n_threads"], row["test"], row["api"], row["isa"])
        groups.setdefault(key, []).append(row)
    out = []
    for (model, n_threads, test, api, isa), rs in groups.items():
        names = list(dict.fromkeys(name for r in rs for name in r["engines"]))
        entry = {"model": model, "n_threads": n_threads, "test": test, "api": api, "isa": isa,
                 "rounds": len(rs),
                 "alpaca_ts": statistics.median(r["alpaca_ts"] for r in rs),
                 "engines": {name: median_versus_engine(rs, name) for name in names},
                 "best_engine_ts": statistics.median(r["best_engine_ts"] for r in rs),
                 "ratio_vs_best": statistics.median(r["ratio_vs_best"] for r in rs),
                 "best_engine_rounds": dict(Counter(r["best_engine"] for r in rs))}
        for key in ("bandwidth_gbs", "alpaca_bandwidth_fraction"):
            if key in rs[0]:
                entry[key] = statistics.median(r[key] for r in rs)
        add_legacy_fields(entry)
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


def print_summary(summary: Sequence[dict[str, Any]], engine_names: Sequence[str]) -> None:
    """A markdown table: per engine its t/s and ours / it; then ours / the best engine."""
    print("| model | threads | test | api | isa | alpaca t/s | "
          + "".join(f"{name} t/s | ours / {name} | " for name in engine_names)
          + "ours / best | vs first isa | bw fraction (ours / " + " / ".join(engine_names) + ") |")
    print("| --- | ---: | ---: | --- | --- | ---: | " + "---: | ---: | " * len(engine_names)
          + "---: | ---: | ---: |")
    for s in summary:
        cells = [Path(s["model"]).name, str(s["n_threads"]), s["test"], s["api"], s["isa"],
                 f"{s['alpaca_ts']:.2f}"]
        for name in engine_names:
            e = s["engines"].get(name)
            cells += [f"{e['ts']:.2f}", f"{e['ratio']:.2f}"] if e else ["-", "-"]
        cells.append(f"{s['ratio_vs_best']:.2f}")
        cells.append(f"{s['isa_ratio']:.2f}" if "isa_ratio" in s else "-")
        if "alpaca_bandwidth_fraction" in s:
            fractions = [s["alpaca_bandwidth_fraction"],
                         *(s["engines"].get(name, {}).get("bandwidth_fraction")
                           for name in engine_names)]
            cells.append(" / ".join("-" if f is None else f"{f:.1%}" for f in fractions))
        else:
            cells.append("-")
        print("| " + " | ".join(cells) + " |")


def rotated(sides: Sequence[str], round_no: int) -> list[str]:
    """The order of the sides in round round_no: moved by one place each round, so each side
    runs first in one round of len(sides)."""
    k = round_no % len(sides)
    return [*sides[k:], *sides[:k]]


def run_engine(engine: Engine, model: str, n_threads: int,
               a: argparse.Namespace) -> list[dict[str, Any]]:
    """One engine's llama-bench records for one file and thread count."""
    if a.n_depth:
        return engine_at_depth(engine, a, model, n_threads, log)
    return run_json(llama_bench_cmd(engine.path, model, n_threads, a, engine.args))


def run_ours(side: str, model: str, n_threads: int, a: argparse.Namespace) -> list[dict[str, Any]]:
    """alpaca-bench's records for one file and thread count; side "alpaca:<isa>" forces our
    kernels to that ISA (ALPACA_CPU_ISA)."""
    isa = side.partition(":")[2]
    env = {**os.environ, "ALPACA_CPU_ISA": isa} if isa else None
    return run_json(alpaca_bench_cmd(model, n_threads, a), env)


def run_sides(sides: Sequence[str], engines: dict[str, Engine], model: str, n_threads: int,
              round_no: int, a: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every side once, for one file and thread count, in this round's order; each side's
    records tagged with the round."""
    got: dict[str, list[dict[str, Any]]] = {}
    for side in rotated(sides, round_no):
        log(f"round {round_no + 1}/{a.rounds}: {side} {Path(model).name} -t {n_threads}")
        records = (run_engine(engines[side], model, n_threads, a) if side in engines
                   else run_ours(side, model, n_threads, a))
        got[side] = [{**r, "round": round_no} for r in records]
    return got


@dataclass
class Measurements:
    engine_records: dict[str, list[dict[str, Any]]]
    ours: list[dict[str, Any]]
    rows: list[dict[str, Any]]


def measure(engines: Sequence[Engine], ours: Sequence[str], threads: Sequence[int],
            a: argparse.Namespace) -> Measurements:
    """All rounds: every file, thread count and side; ours compared with every engine."""
    by_name = {e.name: e for e in engines}
    m = Measurements({e.name: [] for e in engines}, [], [])
    for round_no in range(a.rounds):
        for model in a.model:
            for n_threads in threads:
                got = run_sides([*by_name, *ours], by_name, model, n_threads, round_no, a)
                theirs = {name: got[name] for name in by_name}
                for name, records in theirs.items():
                    m.engine_records[name] += records
                for side in ours:  # in --isa order, whatever order they ran in
                    m.ours += got[side]
                    m.rows += comparison_rows(got[side], theirs, round_no, model)
    return m


def results(a: argparse.Namespace, engines: Sequence[Engine], threads: Sequence[int],
            m: Measurements, summary: list[dict[str, Any]]) -> dict[str, Any]:
    """The results file's content (see the module docstring)."""
    out: dict[str, Any] = {
        "name": a.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "engines": [e.describe(m.engine_records[e.name]) for e in engines],
        "llama_batched_bench": a.llama_batched_bench if a.n_depth else None,
        "settings": {"models": a.model, "threads": list(threads), "n_prompt": a.n_prompt,
                     "n_gen": a.n_gen, "n_depth": a.n_depth, "repetitions": a.repetitions,
                     "rounds": a.rounds, "api": a.api, "bandwidth_mib": a.bandwidth_mib,
                     "isas": a.isa or "default", "order": "rotated by one place each round"},
        "summary": summary, "ratios": m.rows, "engine_records": m.engine_records,
        "alpaca": m.ours,
    }
    legacy = next((e for e in engines if e.name == LEGACY_ENGINE), None)
    if legacy is not None:
        out["llama_bench"] = legacy.path
        out["llama_cpp_build"] = legacy.describe(m.engine_records[legacy.name])["build_commit"]
        out["llama_cpp"] = m.engine_records[legacy.name]
    return out


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def engines_to_run(ap: argparse.ArgumentParser, a: argparse.Namespace) -> list[Engine]:
    """The --engine list, or the one engine "llama.cpp" of --llama-bench (or its default);
    refuses what cannot run: duplicate names, binaries that are not executable, -d with more
    than one engine or with extra arguments."""
    if a.engine and a.llama_bench is not None:
        ap.error("give --engine (repeat it) or --llama-bench, not both")
    engines = a.engine or [Engine(LEGACY_ENGINE, a.llama_bench or DEFAULT_LLAMA_BENCH)]
    names = [e.name for e in engines]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        ap.error(f"engine name {duplicate!r} given twice")
    for e in engines:
        if not os.access(e.path, os.X_OK):
            ap.error(f"engine {e.name}: {e.path} is not an executable file; build it yourself "
                     "and point this at its llama-bench")
    if a.n_depth and (len(engines) > 1 or engines[0].args):
        ap.error("-d compares with one engine, without extra arguments (its decode at depth "
                 "comes from its llama-batched-bench, which takes no llama-bench arguments); "
                 f"got {len(engines)} engines: {', '.join(names)}")
    return engines


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
                         "(default: the one chosen at import); each is compared with every "
                         "engine and with the first")
    ap.add_argument("--engine", action="append", type=parse_engine, default=[],
                    metavar="NAME=PATH[,ARG...]",
                    help="a llama-bench to compare with, named NAME in the results, with ARGs "
                         "added to its command line (repeat; see above)")
    ap.add_argument("--llama-bench", default=None,
                    help="without --engine: llama.cpp's llama-bench, the one engine, named "
                         f"llama.cpp (default {DEFAULT_LLAMA_BENCH})")
    ap.add_argument("--llama-batched-bench", default=None,
                    help="the engine's llama-batched-bench, for decode at depth (default: the "
                         "one beside its llama-bench)")
    ap.add_argument("--name", default=time.strftime("compare-%Y%m%d-%H%M%S"),
                    help="results file name, without .json")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    if a.n_depth < 0:
        ap.error(f"-d must be at least 0, got {a.n_depth}")
    engines = engines_to_run(ap, a)
    if a.llama_batched_bench is None:
        a.llama_batched_bench = str(Path(engines[0].path).with_name("llama-batched-bench"))
    if a.n_depth and a.n_gen and not os.access(a.llama_batched_bench, os.X_OK):
        ap.error(f"--llama-batched-bench {a.llama_batched_bench} is not an executable file; "
                 "decode at depth needs it (cmake --build build --target llama-batched-bench)")
    missing = [m for m in a.model if not os.path.isfile(m)]
    if missing:
        ap.error(f"no such model file: {missing[0]}")

    ours = [f"{OURS}:{isa.strip()}" for isa in a.isa.split(",") if isa.strip()] or [OURS]
    try:
        m = measure(engines, ours, threads, a)
    except RuntimeError as e:
        print(f"compare_llama_cpp: error: {e}", file=sys.stderr)
        return 1

    summary = summarize(m.rows)
    out = a.out_dir / f"{a.name}.json"
    write_json(out, results(a, engines, threads, m, summary))
    print_summary(summary, [e.name for e in engines])
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
