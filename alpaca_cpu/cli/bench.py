"""`alpaca-bench`: prefill and decode speed, load time and memory of GGUF models, as llama-bench.

    alpaca-bench -m MODEL.gguf -t 1,2 -p 512 -n 128 -r 5            # a table, like llama-bench
    alpaca-bench -m MODEL.gguf -t 2 -o json --bandwidth              # records with its fields
    alpaca-bench -m MODEL.gguf -t 2 -d 2000 -p 0 -n 128             # decode after 2000 tokens

Tests, each repeated -r times after one warm-up run that is not counted:
  pp<p>  prefill: one forward() of p random tokens at positions d..d+p-1; t/s = p / time.
  tg<n>  decode: n single-token forward() calls at positions d..d+n-1; t/s = n / time.
-d (default 0) is the depth, as llama-bench's: positions 0..d-1 of the cache are filled with
random tokens once, untimed, so every test attends to d earlier tokens (labels "pp<p> @ d<d>",
records "n_depth"); with d = 0 the tests start from an empty cache.
Both run twice: on `Model.forward` directly (api "model": the engine) and through the public
`Llama.create_completion` (api "llama": what a Python user gets, sampling and detokenizing
included). There, pp<p> is one completion of the p prompt ids with max_tokens=1 and tg<n> one
completion of a 1-token prompt with max_tokens=n (n one-token forwards again, as in the engine
test), greedy, with the end-of-generation tokens banned so that exactly n tokens come out. At
depth d, the d tokens are evaluated first (untimed) and the completion's prompt is those d
tokens followed by the test's, so Llama's prefix reuse computes only the test's tokens.

Memory (api "model"): RSS and peak RSS right after loading and after filling the whole context
(n_ctx tokens, default d + p + n); the peak is reset before each load (Linux), so every figure
belongs to one model. --bandwidth adds the memory read bandwidth measured with the same thread
count and, for decode, the fraction of it used: t/s x bytes read per token / bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from .. import _core
from ..config import ModelConfig
from ..errors import ModelFileError
from ..gguf_file import ModelFile, open_model_file
from ..model import Model
from ..system import physical_cores

PROG = "alpaca-bench"
APIS = ("model", "llama")
FILL_BATCH = 512  # tokens per forward() when filling the cache (depth, memory figure)
KV_BYTES_PER_VALUE = 2  # the engine's KV cache is F16 (Model's default kv_type)


# ---- the model file -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What llama-bench reports about a file, plus what the bandwidth figure needs."""

    path: str
    model_type: str  # "llama 135M Q4_1": architecture, parameter count, main weight type
    size: int  # bytes of all tensors
    n_params: int
    config: ModelConfig
    decode_weight_bytes: int  # weight bytes one decode step reads (see model_info)
    has_tokenizer: bool


def model_info(path: str) -> ModelInfo:
    """Sizes from the file's tensor table (the file is mapped, not read)."""
    mf = open_model_file(path)
    size = sum(t.data.nbytes for t in mf.tensors.values())
    n_params = sum(t.rows * t.cols for t in mf.tensors.values())
    # A decode step reads every matrix once, but only one row of the token embedding, unless
    # the embedding is also the output matrix (tied), which is read whole.
    embd = mf.tensors["token_embd.weight"]
    decode_bytes = size
    if not mf.config.tied_embeddings:
        decode_bytes -= embd.data.nbytes - embd.data.nbytes // embd.rows
    model_type = f"llama {_params_label(n_params)} {_weight_type_name(mf)}"
    return ModelInfo(path=str(mf.path), model_type=model_type, size=size, n_params=n_params,
                     config=mf.config,
                     decode_weight_bytes=decode_bytes,
                     has_tokenizer="tokenizer.ggml.model" in mf.metadata)


def _params_label(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e6:.1f}M"


def _weight_type_name(mf: ModelFile) -> str:
    """The file type as llama.cpp names it (general.file_type), else the commonest matrix type."""
    ftype = mf.metadata.get("general.file_type")
    if isinstance(ftype, int) and ftype in LlamaFileType._value2member_map_:
        name = LlamaFileType(ftype).name
        return "all F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
    types = Counter(t.type for t in mf.tensors.values() if t.rows > 1)
    return GGMLQuantizationType(types.most_common(1)[0][0]).name


# ---- memory ---------------------------------------------------------------------------------


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux 4.0+); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5": reset the resident set high-water mark (proc(5))
        return True
    except OSError:
        return False


def memory_snapshot() -> dict[str, int]:
    """RSS now, its high-water mark (/proc/self/status VmRSS, VmHWM) and ru_maxrss, in bytes."""
    snap = {"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # KiB on Linux
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    snap[key] = int(value.split()[0]) * 1024
    except OSError:  # not Linux: ru_maxrss is all there is
        pass
    return {"rss": snap.get("VmRSS", 0), "peak_rss": snap.get("VmHWM", snap["maxrss"]),
            "maxrss": snap["maxrss"]}


def kv_bytes_at(config: ModelConfig, n_pos: float) -> float:
    """Bytes of K and V that attention reads for one token that sees n_pos positions."""
    return 2 * config.n_layers * config.kv_dim * KV_BYTES_PER_VALUE * n_pos


# ---- timing ---------------------------------------------------------------------------------


def repeat(run: Callable[[], float], reps: int) -> list[float]:
    """Seconds of `reps` calls of run(), after one warm-up call (caches, thread pool, pages)."""
    run()
    return [run() for _ in range(reps)]


def fill_cache(model: Model, tokens: np.ndarray) -> None:
    """Positions 0..len(tokens)-1 of the cache, in batches of FILL_BATCH (untimed)."""
    for start in range(0, len(tokens), FILL_BATCH):
        model.forward(tokens[start : start + FILL_BATCH], start_pos=start)


def prefill_seconds(model: Model, tokens: np.ndarray, start_pos: int) -> float:
    t0 = time.perf_counter()
    model.forward(tokens, start_pos=start_pos)
    return time.perf_counter() - t0


def decode_seconds(model: Model, tokens: np.ndarray, start_pos: int) -> float:
    """n one-token forwards at positions start_pos.. (llama-bench's tg feeds random tokens too)."""
    t0 = time.perf_counter()
    for pos, tok in enumerate(tokens.tolist(), start_pos):
        model.forward([tok], start_pos=pos)
    return time.perf_counter() - t0


def completion_seconds(llm: Any, depth: list[int], prompt: list[int], max_tokens: int,
                       ban: dict[int, float]) -> float:
    """One greedy create_completion of depth + prompt, with the cache holding exactly `depth`
    before it (untimed); checks that it reused depth and made max_tokens tokens."""
    if depth:
        # Not reset first: eval() keeps the depth already cached and recomputes its last token
        # at most, where a reset would recompute all of it before every repetition.
        llm.eval(depth)
    else:
        llm.reset()  # no prefix reuse: the prompt is evaluated from scratch every time
    t0 = time.perf_counter()
    out = llm.create_completion(depth + prompt, max_tokens=max_tokens, temperature=0.0,
                                logit_bias=ban)
    seconds = time.perf_counter() - t0
    made = out["usage"]["completion_tokens"]
    if made != max_tokens:
        raise RuntimeError(f"create_completion made {made} tokens, expected {max_tokens}")
    if llm.last_eval.n_reused != len(depth):
        raise RuntimeError(f"create_completion reused {llm.last_eval.n_reused} cached tokens, "
                           f"expected the depth of {len(depth)}")
    return seconds


# ---- records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    n_prompt: int
    n_gen: int
    n_depth: int
    reps: int
    n_ctx: int
    apis: tuple[str, ...]
    bandwidth_bytes: int | None  # None: no bandwidth probe
    seed: int


def make_record(info: ModelInfo, n_threads: int, isa: str, api: str, n_prompt: int,
                n_gen: int, n_depth: int, seconds: Sequence[float]) -> dict[str, Any]:
    """One llama-bench-shaped record (its field names) for one test; the depth's tokens are
    not counted in t/s, as in llama-bench."""
    n_tokens = n_prompt + n_gen
    samples = [n_tokens / s for s in seconds]
    ns = [s * 1e9 for s in seconds]
    return {
        "model_filename": info.path, "model_type": info.model_type, "model_size": info.size,
        "model_n_params": info.n_params, "n_threads": n_threads, "n_prompt": n_prompt,
        "n_gen": n_gen, "n_depth": n_depth,
        "test_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "avg_ns": round(statistics.fmean(ns)), "stddev_ns": round(_stdev(ns)),
        "avg_ts": statistics.fmean(samples), "stddev_ts": _stdev(samples),
        "samples_ns": [round(x) for x in ns], "samples_ts": samples,
        "isa": isa, "api": api,
    }


def _stdev(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0  # sample stddev, as llama-bench


def bench_engine(info: ModelInfo, n_threads: int, s: Settings,
                 rng: np.random.Generator) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """api "model" records, and the load time / memory figures of the bare engine."""
    gc.collect()
    peak_reset = reset_peak_rss()
    before = memory_snapshot()
    t0 = time.perf_counter()
    model = Model(info.path, n_ctx=s.n_ctx, n_threads=n_threads)
    load_s = time.perf_counter() - t0
    after_load = memory_snapshot()
    n_vocab = info.config.n_vocab
    d = s.n_depth
    # Once: the tests write positions >= d only, so the depth stays valid across them.
    fill_cache(model, rng.integers(0, n_vocab, d))
    records = []
    if s.n_prompt:
        prompt = rng.integers(0, n_vocab, s.n_prompt)
        secs = repeat(partial(prefill_seconds, model, prompt, d), s.reps)
        records.append(make_record(info, n_threads, model.isa, "model", s.n_prompt, 0, d, secs))
    if s.n_gen:
        gen = rng.integers(0, n_vocab, s.n_gen)
        secs = repeat(partial(decode_seconds, model, gen, d), s.reps)
        records.append(make_record(info, n_threads, model.isa, "model", 0, s.n_gen, d, secs))
    fill_cache(model, rng.integers(0, n_vocab, s.n_ctx))
    full = memory_snapshot()
    del model
    memory = {
        "n_ctx": s.n_ctx, "load_s": load_s,
        "kv_bytes": info.config.kv_cache_bytes(s.n_ctx, kv_f16=KV_BYTES_PER_VALUE == 2),
        "rss_before_load": before["rss"], "rss_load": after_load["rss"],
        "peak_rss_load": after_load["peak_rss"], "rss_full_ctx": full["rss"],
        "peak_rss_full_ctx": full["peak_rss"], "maxrss_full_ctx": full["maxrss"],
        "peak_rss_reset": peak_reset,
    }
    return records, memory


def bench_api(info: ModelInfo, n_threads: int, s: Settings,
              rng: np.random.Generator) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """api "llama" records (Llama.create_completion), and its load time and RSS."""
    from ..llama import Llama  # imported here: the engine tests need no tokenizer stack

    gc.collect()
    peak_reset = reset_peak_rss()
    before = memory_snapshot()
    # n_batch >= p: the prompt is one forward(), as in the engine test; the depth's batches
    # are at least FILL_BATCH tokens.
    llm = Llama(info.path, n_ctx=s.n_ctx, n_threads=n_threads,
                n_batch=max(s.n_prompt, FILL_BATCH))
    after_load = memory_snapshot()
    ban = {tok: -math.inf for tok in llm.tokenizer_.eog_ids}
    n_vocab = info.config.n_vocab
    isa = llm.model.isa
    d = s.n_depth
    depth = rng.integers(0, n_vocab, d).tolist()
    records = []
    if s.n_prompt:
        prompt = rng.integers(0, n_vocab, s.n_prompt).tolist()
        secs = repeat(partial(completion_seconds, llm, depth, prompt, 1, ban), s.reps)
        records.append(make_record(info, n_threads, isa, "llama", s.n_prompt, 0, d, secs))
    if s.n_gen:
        first = [int(rng.integers(0, n_vocab))]
        secs = repeat(partial(completion_seconds, llm, depth, first, s.n_gen, ban), s.reps)
        records.append(make_record(info, n_threads, isa, "llama", 0, s.n_gen, d, secs))
    memory = {"n_ctx": s.n_ctx, "load_s": llm.load_seconds, "rss_before_load": before["rss"],
              "rss_load": after_load["rss"], "peak_rss_load": after_load["peak_rss"],
              "peak_rss_reset": peak_reset}
    del llm
    return records, memory


def bandwidth_fields(info: ModelInfo, record: dict[str, Any], gbs: float) -> dict[str, Any]:
    """The probe's figure and, for a decode record, the fraction of it that decode used."""
    fields: dict[str, Any] = {"bandwidth_gbs": gbs}
    if record["n_gen"]:
        # Token i attends to d + i + 1 positions: on average d + (n + 1) / 2 over the test.
        n_pos = record["n_depth"] + (record["n_gen"] + 1) / 2
        per_token = info.decode_weight_bytes + kv_bytes_at(info.config, n_pos)
        fields["bytes_per_token"] = round(per_token)
        fields["bandwidth_fraction"] = record["avg_ts"] * per_token / (gbs * 1e9)
    return fields


def bench_model(path: str, threads: Sequence[int], s: Settings,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    info = model_info(path)
    if "llama" in s.apis and not info.has_tokenizer:
        raise ValueError(f"{path}: the file has no tokenizer, which the Llama API needs; "
                         "run with --api model")
    records = []
    for n_threads in threads:
        rng = np.random.default_rng(s.seed)
        found = []
        if "model" in s.apis:
            log(f"{info.model_type}, {n_threads} threads: engine (Model.forward)")
            recs, memory = bench_engine(info, n_threads, s, rng)
            found += [{**r, **memory} for r in recs]
        gbs = None
        if s.bandwidth_bytes is not None:
            log(f"{n_threads} threads: read bandwidth over {s.bandwidth_bytes >> 20} MiB")
            gbs = _core.read_bandwidth(s.bandwidth_bytes, n_threads)
        if "llama" in s.apis:
            log(f"{info.model_type}, {n_threads} threads: Llama.create_completion")
            recs, memory = bench_api(info, n_threads, s, rng)
            found += [{**r, **memory} for r in recs]
        if gbs is not None:
            found = [{**r, **bandwidth_fields(info, r, gbs)} for r in found]
        records += found
    return records


# ---- output ---------------------------------------------------------------------------------


def _bytes_label(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _params_table_label(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def test_label(record: dict[str, Any]) -> str:
    """llama-bench's name of a test: "pp512", "tg128", "tg128 @ d2000" at depth 2000."""
    name = f"pp{record['n_prompt']}" if record["n_prompt"] else f"tg{record['n_gen']}"
    return f"{name} @ d{record['n_depth']}" if record["n_depth"] else name


def markdown(records: Sequence[dict[str, Any]]) -> str:
    """llama-bench's table (with api and isa columns), then load time, memory and bandwidth."""
    header = ["model", "size", "params", "api", "isa", "threads", "test", "t/s"]
    rows = [[r["model_type"], _bytes_label(r["model_size"]),
             _params_table_label(r["model_n_params"]), r["api"], r["isa"], str(r["n_threads"]),
             test_label(r),
             f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"] for r in records]
    out = [_table(header, rows, right_from=5)]
    seen = {}
    for r in records:  # one line per (model, threads, api): the figures shared by its tests
        seen.setdefault((r["model_filename"], r["n_threads"], r["api"]), r)
    header = ["model", "api", "threads", "load s", "RSS load", "peak load", "RSS full ctx",
              "KV cache", "read GB/s", "tg bw fraction"]
    rows = []
    for (_, _, api), r in seen.items():
        tg = next((x for x in records if x["model_filename"] == r["model_filename"]
                   and x["n_threads"] == r["n_threads"] and x["api"] == api and x["n_gen"]), {})
        rows.append([
            r["model_type"], api, str(r["n_threads"]), f"{r['load_s']:.2f}",
            _bytes_label(r["rss_load"]), _bytes_label(r["peak_rss_load"]),
            (f"{_bytes_label(r['rss_full_ctx'])} (n_ctx {r['n_ctx']})"
             if "rss_full_ctx" in r else "-"),
            _bytes_label(r["kv_bytes"]) if "kv_bytes" in r else "-",
            f"{r['bandwidth_gbs']:.1f}" if "bandwidth_gbs" in r else "-",
            f"{tg['bandwidth_fraction']:.1%}" if "bandwidth_fraction" in tg else "-",
        ])
    out.append(_table(header, rows, right_from=2))
    return "\n\n".join(out)


def _table(header: list[str], rows: list[list[str]], right_from: int) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i >= right_from else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "| " + " | ".join("-" * (w - 1) + (":" if i >= right_from else "-")
                             for i, w in enumerate(widths)) + " |"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# ---- command line ---------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return values


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _apis(text: str) -> tuple[str, ...]:
    apis = tuple(a.strip() for a in text.split(","))
    if not apis or any(a not in APIS for a in apis):
        raise argparse.ArgumentTypeError(
            f"expected a comma list of {', '.join(APIS)}, got {text!r}")
    return apis


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("-m", "--model", action="append", required=True,
                    help="GGUF file (repeat for several)")
    ap.add_argument("-t", "--threads", type=_int_list, default=None,
                    help="thread counts, comma separated (default: physical cores)")
    ap.add_argument("-p", "--n-prompt", type=_non_negative, default=512,
                    help="prompt tokens of the prefill test (0: no prefill test)")
    ap.add_argument("-n", "--n-gen", type=_non_negative, default=128,
                    help="generated tokens of the decode test (0: no decode test)")
    ap.add_argument("-d", "--n-depth", type=_non_negative, default=0,
                    help="tokens already in the cache before each test (default 0)")
    ap.add_argument("-r", "--repetitions", type=_non_negative, default=5)
    ap.add_argument("-c", "--n-ctx", type=_non_negative, default=0,
                    help="context size; the memory figure fills it (default: d + p + n)")
    ap.add_argument("-o", "--output", choices=("md", "json"), default="md")
    ap.add_argument("--api", type=_apis, default=APIS,
                    help="model (Model.forward), llama (Llama.create_completion) or both "
                         "(default model,llama)")
    ap.add_argument("--bandwidth", action="store_true",
                    help="measure memory read bandwidth and the decode fraction of it")
    ap.add_argument("--bandwidth-mib", type=int, default=1024,
                    help="buffer size of the bandwidth probe (default 1024 MiB)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    args = ap.parse_args(argv)
    if args.repetitions < 1:
        ap.error("-r must be at least 1")
    if args.n_prompt == 0 and args.n_gen == 0:
        ap.error("nothing to measure: -p and -n are both 0")
    if args.bandwidth_mib < 1:
        ap.error("--bandwidth-mib must be at least 1")
    if args.n_ctx and args.n_ctx < min_ctx(args):
        ap.error(f"-c {args.n_ctx} is too small for -d {args.n_depth} / -p {args.n_prompt} / "
                 f"-n {args.n_gen}: the tests need at least {min_ctx(args)} "
                 "(d + the longer of p and n + 1)")
    return args


def min_ctx(args: argparse.Namespace) -> int:
    """The context every test fits: each runs alone after the depth, and the API's decode test
    needs room for its 1-token prompt and n tokens."""
    return args.n_depth + max(args.n_prompt, args.n_gen) + 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # llama-bench's context is d + p + n; with p or n 0 that leaves no room for the API's test.
    n_ctx = args.n_ctx or max(args.n_depth + args.n_prompt + args.n_gen, min_ctx(args))
    settings = Settings(n_prompt=args.n_prompt, n_gen=args.n_gen, n_depth=args.n_depth,
                        reps=args.repetitions, n_ctx=n_ctx, apis=args.api,
                        bandwidth_bytes=args.bandwidth_mib << 20 if args.bandwidth else None,
                        seed=args.seed)
    threads = args.threads or [physical_cores()]

    def log(msg: str) -> None:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)

    records = []
    try:
        for path in args.model:
            if not os.path.isfile(path):
                raise ValueError(f"{path}: no such file")
            records += bench_model(path, threads, settings, log)
    except (ValueError, ModelFileError, RuntimeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.output == "json":
        print(json.dumps(records, indent=1))
    else:
        print(markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
