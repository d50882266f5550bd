"""How fast one thread's GEMM kernels stream weights, per type, token count and ISA (JSON).

    python benchmarks/gemm_stream.py [--types Q4_0,Q6_K] [--tokens 1,8] [--isa avx2,avx512_vnni]
        [--rounds 5] [--name NAME]

For each case, GB/s of weight bytes read by the table's GEMM (alpaca_cpu._core.gemm_read_rate:
the best of 15 passes) over matrices of 5632 x 2048 (a TinyLlama FFN matrix) filling 200 MB (--memory-mib),
far beyond the caches ("memory"), and over one 256 x 2048 matrix that stays in L2 ("cache":
the kernel alone). Rounds alternate the cases' order; the JSON keeps every round and the
median, and 1 thread's probed read bandwidth (the same probe as alpaca-bench's) measured in
each round, so "memory" cases can be read as a fraction of it. Decode is the 1-token memory
case; prefill the 8-token cache case. Results go to benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

from alpaca_cpu import _core

DEFAULT_TYPES = "Q4_0,Q4_1,Q8_0,Q5_0,Q4_K,Q5_K,Q6_K,Q3_K,Q2_K"
PROBE_BYTES = 512 << 20
MATRIX = (5632, 2048)  # rows, cols of the memory case
CACHE_MATRIX = (256, 2048)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--isa", default=_core.active_isa(), help="comma separated kernel tables")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--memory-mib", type=int, default=200, help="weights of the memory case")
    ap.add_argument("--name", default="gemm-stream")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    shapes = {"memory": (*MATRIX, args.memory_mib << 20), "cache": (*CACHE_MATRIX, 1)}
    ids = {t["name"]: t["id"] for t in _core.type_traits()}
    types = args.types.split(",")
    unknown = [t for t in types if t not in ids]
    if unknown:
        ap.error(f"unknown types {unknown}; known: {sorted(ids)}")
    cases = [(isa, t, n, where) for isa in args.isa.split(",") for t in types
             for n in map(int, args.tokens.split(",")) for where in shapes]
    runs: dict[tuple, list[float]] = {c: [] for c in cases}
    probes = []
    for r in range(args.rounds):
        probes.append(_core.read_bandwidth(PROBE_BYTES, 1, 3))
        for case in (cases if r % 2 == 0 else cases[::-1]):
            isa, t, n, where = case
            rows, cols, total = shapes[where]
            runs[case].append(_core.gemm_read_rate(ids[t], rows, cols, n, total, isa=isa))
    probe = statistics.median(probes)
    out = {
        "cpu": cpu_model(),
        "probe_gbs_1thread": {"median": probe, "rounds": probes},
        "cases": [
            {"isa": isa, "type": t, "n_tok": n, "where": where,
             "gbs_median": statistics.median(v), "gbs_rounds": v,
             **({"fraction_of_probe": statistics.median(v) / probe} if where == "memory" else {})}
            for (isa, t, n, where), v in runs.items()
        ],
    }
    print(f"{'isa':12} {'type':5} {'tok':>3} {'memory GB/s':>11} {'of probe':>8} {'cache GB/s':>10}")
    for isa, t, n, where in cases:
        if where == "memory":
            mem = statistics.median(runs[(isa, t, n, "memory")])
            cache = statistics.median(runs[(isa, t, n, "cache")])
            print(f"{isa:12} {t:5} {n:3} {mem:11.2f} {mem / probe:8.0%} {cache:10.2f}")
    print(f"probe (1 thread): {probe:.2f} GB/s; {out['cpu']}")
    path = Path(args.out_dir) / f"{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
