"""The measurement tools: alpaca-bench's records, alpaca-perplexity against an independent
computation on the numpy reference, and the random-model writer (benchmarks/)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from alpaca_convert import quant_plan
from alpaca_convert.rope_scaling import ROPE_FREQS
from gguf import GGMLQuantizationType as T
from tiny_model import TinySpec, write_tiny_model

import alpaca_cpu
from alpaca_cpu.cli import bench, perplexity
from alpaca_cpu.gguf_file import open_model_file
from alpaca_cpu.quants import dequantize
from alpaca_cpu.reference import ReferenceModel
from alpaca_cpu.tokenizer import Tokenizer
from alpaca_cpu.tokenizer_bpe import BYTE_TO_UNICODE

REPO = Path(__file__).resolve().parents[1]

# perplexity() on the numpy reference vs the same reference driven by the test's own loop:
# the same float32 logits up to batching (matmul blocking), so only rounding differs.
SAME_MODEL_RTOL = 1e-6
# The native engine vs the float32 reference on a float tiny model: the F16 KV cache and the
# summation order move logits by up to ~1e-3 relative (test_model.FLOAT_RTOL), but the errors
# average out over the scored tokens (measured: 1e-6 on PPL, 4e-5 on its error).
ENGINE_PPL_RTOL = 5e-4
# The CLI prints PPL with 4 decimals and its error with 5.
PRINTED_PPL_ATOL = 5e-5
PRINTED_ERR_ATOL = 5e-6
# Dequantized random weights stay within their uniform range, up to one quantization step
# (4-bit types: 1/7 of the block's absolute maximum).
QUANT_RANGE_SLACK = 1.0 + 1.0 / 7
# The token embedding of a --mix file (uniform noise of standard deviation 1) after quantization:
# Q2_K's error, the largest, has an RMS of 0.23 there and the result a deviation of 1.009
# (measured; Q4_K: 0.055 and 0.998), so 0.1 leaves room and still catches a wrong scale.
MIX_EMBD_STD_ATOL = 0.1
# A record's t/s samples against its samples_ns, which are rounded to whole nanoseconds.
TS_FROM_NS_RTOL = 1e-6

CTX = 16  # perplexity chunk: 8 context tokens, 7 scored per chunk
BOS = 0
# Merges that make some multi-byte tokens out of the test text.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]
TEXT = ("The heron stands in the shallow water at the edge of the river, and the sun is low. "
        "Another heron answers from the reeds on the far side, then the evening is silent.\n")


def bpe_tokenizer_metadata(n_vocab: int) -> dict[str, Any]:
    """A byte-level BPE vocabulary of n_vocab tokens that adds BOS (id 0, also EOS)."""
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = ["<|endoftext|>", *BYTE_TO_UNICODE.values(), *merged]
    tokens += [f"<unused{i}>" for i in range(n_vocab - len(tokens))]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (n_vocab - 1),
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": BOS,
        "tokenizer.ggml.eos_token_id": BOS,
        "tokenizer.ggml.add_bos_token": True,
    }


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(n_heads=4, n_kv_heads=2, seed=11)
    path = tmp_path_factory.mktemp("bench") / "tiny-bpe.gguf"
    return write_tiny_model(path, spec, extra_metadata=bpe_tokenizer_metadata(spec.n_vocab))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(TEXT)
    return path


# ---- perplexity ------------------------------------------------------------------------------


def reference_perplexity(path: Path, ids: list[int], n_ctx: int,
                         bos: int | None) -> tuple[float, float, int]:
    """PPL, its error and the number of scored tokens, written out plainly from the
    definition in llama.cpp's perplexity.cpp, on the numpy reference model."""
    ref = ReferenceModel(path, n_ctx=n_ctx)
    nll = []
    for k in range(len(ids) // n_ctx):
        chunk = ids[k * n_ctx : (k + 1) * n_ctx]
        inputs = ([bos] + chunk[1:]) if bos is not None else chunk
        logits = ref.forward(inputs, 0, all_logits=True).astype(np.float64)
        for pos in range(n_ctx // 2, n_ctx - 1):
            row = logits[pos]
            log_z = row.max() + math.log(np.exp(row - row.max()).sum())
            nll.append(log_z - row[chunk[pos + 1]])
    values = np.array(nll)
    ppl = math.exp(values.mean())
    # llama.cpp: sqrt((mean(x^2) - mean(x)^2) / (n - 1)), i.e. the sample stddev over sqrt(n)
    return ppl, ppl * values.std(ddof=1) / math.sqrt(len(values)), len(values)


def text_ids(path: Path) -> list[int]:
    tok = Tokenizer.from_metadata(open_model_file(path).metadata)
    return tok.encode(TEXT.removesuffix("\n"))  # the CLI drops one trailing newline


def test_test_text_makes_several_chunks_with_merges(tiny_with_tokenizer: Path) -> None:
    ids = text_ids(tiny_with_tokenizer)
    assert ids[0] == BOS and len(ids) >= 5 * CTX
    assert len(ids) < len(TEXT.encode())  # some merges applied: the vocabulary is BPE


@pytest.mark.parametrize("bos", [BOS, None], ids=["bos-replaced", "no-bos"])
@pytest.mark.parametrize("n_batch", [CTX, 5], ids=["whole-chunk", "batch-5"])
def test_perplexity_is_llama_cpp_definition(tiny_with_tokenizer: Path, bos: int | None,
                                            n_batch: int) -> None:
    ids = text_ids(tiny_with_tokenizer)
    expected_ppl, expected_err, n_scored = reference_perplexity(tiny_with_tokenizer, ids, CTX,
                                                                bos)
    seen: list[tuple[int, float]] = []
    result = perplexity.perplexity(ReferenceModel(tiny_with_tokenizer, n_ctx=CTX), ids, CTX,
                                   n_batch, bos, on_chunk=lambda i, p, s: seen.append((i, p)))
    assert result.n_chunks == len(ids) // CTX and result.n_scored == n_scored
    assert n_scored == result.n_chunks * (CTX - CTX // 2 - 1)
    assert result.ppl == pytest.approx(expected_ppl, rel=SAME_MODEL_RTOL)
    assert result.error == pytest.approx(expected_err, rel=SAME_MODEL_RTOL)
    assert [i for i, _ in seen] == list(range(result.n_chunks))
    assert seen[-1][1] == result.ppl and result.running == [p for _, p in seen]
    assert 1.0 < result.ppl < 10 * 320  # finite and of a sane size for 320 tokens


def test_bos_replacement_changes_the_result(tiny_with_tokenizer: Path) -> None:
    ids = text_ids(tiny_with_tokenizer)
    ref = ReferenceModel(tiny_with_tokenizer, n_ctx=CTX)
    with_bos = perplexity.perplexity(ref, ids, CTX, CTX, BOS).ppl
    without = perplexity.perplexity(ref, ids, CTX, CTX, None).ppl
    assert with_bos != without  # so the parametrized test above checks both paths


def test_perplexity_cli_matches_reference(tiny_with_tokenizer: Path, text_file: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    ids = text_ids(tiny_with_tokenizer)
    expected_ppl, expected_err, _ = reference_perplexity(tiny_with_tokenizer, ids, CTX, BOS)
    code = perplexity.main(["-m", str(tiny_with_tokenizer), "-f", str(text_file), "-c",
                            str(CTX), "-t", "1", "-b", "5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    m = re.fullmatch(r"Final estimate: PPL = (\d+\.\d{4}) \+/- (\d+\.\d{5})\n", out)
    assert m, out
    ppl, ppl_err = float(m[1]), float(m[2])
    assert ppl == pytest.approx(expected_ppl, rel=ENGINE_PPL_RTOL, abs=PRINTED_PPL_ATOL)
    assert ppl_err == pytest.approx(expected_err, rel=ENGINE_PPL_RTOL, abs=PRINTED_ERR_ATOL)
    n_chunks = len(ids) // CTX
    running = re.findall(r"\[(\d+)\](\d+\.\d{4}),", err)
    assert [int(i) for i, _ in running] == list(range(1, n_chunks + 1))
    assert float(running[-1][1]) == ppl


def test_perplexity_cli_refuses_short_text(tiny_with_tokenizer: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    short = tmp_path / "short.txt"
    short.write_text("The heron.")
    code = perplexity.main(["-m", str(tiny_with_tokenizer), "-f", str(short), "-c", str(CTX)])
    assert code == 2
    assert f"needs at least {2 * CTX}" in capsys.readouterr().err


def import_script(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# ---- alpaca-bench ----------------------------------------------------------------------------

RECORD_TYPES = {
    "model_filename": str, "model_type": str, "model_size": int, "model_n_params": int,
    "n_threads": int, "n_prompt": int, "n_gen": int, "avg_ts": float, "stddev_ts": float,
    "samples_ts": list, "isa": str, "api": str, "avg_ns": int, "stddev_ns": int,
    "samples_ns": list, "load_s": float, "n_ctx": int, "rss_load": int, "peak_rss_load": int,
    "bandwidth_gbs": float,
}
ENGINE_ONLY = {"rss_full_ctx": int, "peak_rss_full_ctx": int, "kv_bytes": int}


def run_bench(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = bench.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_json_records(tiny_with_tokenizer: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    p, n, reps = 8, 4, 2
    code, out, err = run_bench(["-m", str(tiny_with_tokenizer), "-t", "1,2", "-p", str(p), "-n",
                                str(n), "-r", str(reps), "-o", "json", "--bandwidth",
                                "--bandwidth-mib", "4"], capsys)
    assert code == 0, err
    records = json.loads(out)
    mf = open_model_file(tiny_with_tokenizer)
    cfg = mf.config
    size = sum(t.data.nbytes for t in mf.tensors.values())
    keys = [(r["n_threads"], r["api"], r["n_prompt"], r["n_gen"]) for r in records]
    assert sorted(keys) == sorted((t, api, pp, tg) for t in (1, 2) for api in ("model", "llama")
                                  for pp, tg in ((p, 0), (0, n)))
    embd = mf.tensors["token_embd.weight"]
    for r in records:
        types = RECORD_TYPES | (ENGINE_ONLY if r["api"] == "model" else {})
        for key, kind in types.items():
            assert isinstance(r[key], kind), (key, r[key])
        assert r["model_filename"] == str(tiny_with_tokenizer)
        assert r["model_size"] == size
        assert r["model_n_params"] == sum(t.rows * t.cols for t in mf.tensors.values())
        assert r["model_type"] == "llama 0.1M F32"
        assert r["isa"] in alpaca_cpu.available_isas()
        assert r["n_ctx"] == p + n
        assert len(r["samples_ts"]) == len(r["samples_ns"]) == reps
        assert r["avg_ts"] == pytest.approx(statistics.fmean(r["samples_ts"]))
        assert r["stddev_ts"] == pytest.approx(statistics.stdev(r["samples_ts"]))
        for ts, ns in zip(r["samples_ts"], r["samples_ns"]):
            assert ts > 0 and ts == pytest.approx((p if r["n_prompt"] else n) / (ns * 1e-9),
                                                  rel=TS_FROM_NS_RTOL)
        assert 0 < r["rss_load"] <= r["peak_rss_load"]
        assert r["bandwidth_gbs"] > 0
        if r["api"] == "model":
            assert r["kv_bytes"] == 2 * cfg.n_layers * r["n_ctx"] * cfg.kv_dim * 2  # F16
            assert r["rss_full_ctx"] <= r["peak_rss_full_ctx"]
            assert r["peak_rss_load"] <= r["peak_rss_full_ctx"]
        if r["n_gen"]:
            # untied: the embedding contributes one row; KV read at (n + 1) / 2 positions on average
            kv = 2 * cfg.n_layers * cfg.kv_dim * 2 * (n + 1) / 2
            expected = size - embd.data.nbytes + embd.data.nbytes // embd.rows + kv
            assert r["bytes_per_token"] == round(expected)
            assert r["bandwidth_fraction"] == pytest.approx(
                r["avg_ts"] * r["bytes_per_token"] / (r["bandwidth_gbs"] * 1e9))
        else:
            assert "bandwidth_fraction" not in r


def test_bench_markdown_table(tiny_with_tokenizer: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_bench(["-m", str(tiny_with_tokenizer), "-t", "1", "-p", "8", "-n",
                                "4", "-r", "1", "--api", "model"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert re.match(r"\| model +\| size +\| params +\| api +\| isa +\| threads \| +test \| +t/s \|",
                    lines[0])
    rows = [line for line in lines if line.startswith("| llama ")]
    assert re.search(r"\| +pp8 \| +\d+\.\d\d ± \d+\.\d\d \|$", rows[0])
    assert re.search(r"\| +tg4 \| +\d+\.\d\d ± \d+\.\d\d \|$", rows[1])
    assert "RSS full ctx" in out and "(n_ctx 12)" in out


def test_bench_without_tokenizer_needs_api_model(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tiny_model(tmp_path / "plain.gguf", TinySpec(wtype=T.Q8_0))
    code, _, err = run_bench(["-m", str(path), "-p", "4", "-n", "2", "-r", "1"], capsys)
    assert code == 2 and "--api model" in err
    code, out, err = run_bench(["-m", str(path), "-p", "4", "-n", "2", "-r", "1", "-o", "json",
                                "--api", "model"], capsys)
    assert code == 0, err
    records = json.loads(out)
    assert [(r["api"], r["n_prompt"], r["n_gen"]) for r in records] == [("model", 4, 0),
                                                                        ("model", 0, 2)]
    assert records[0]["model_type"] == "llama 0.1M Q8_0"


def test_bench_depth_engine_positions(tiny_with_tokenizer: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    d, p, n, reps = 9, 5, 3, 2
    calls: list[tuple[int, int]] = []

    class RecordingModel(alpaca_cpu.Model):
        """The engine, noting (start_pos, number of tokens) of every forward()."""

        def forward(self, tokens: Any, start_pos: int = 0, **kwargs: Any) -> Any:
            calls.append((start_pos, len(tokens)))
            return super().forward(tokens, start_pos=start_pos, **kwargs)

    monkeypatch.setattr(bench, "FILL_BATCH", 4)  # so that the depth takes several batches
    monkeypatch.setattr(bench, "Model", RecordingModel)
    code, _, err = run_bench(["-m", str(tiny_with_tokenizer), "-t", "1", "-d", str(d), "-p",
                              str(p), "-n", str(n), "-r", str(reps), "--api", "model"], capsys)
    assert code == 0, err
    depth = [(0, 4), (4, 4), (8, 1)]  # positions 0..d-1, once
    prefill = [(d, p)] * (reps + 1)  # warm-up and reps, all right after the depth
    decode = [(pos, 1) for pos in range(d, d + n)] * (reps + 1)
    n_ctx = d + p + n
    memory = [(start, min(4, n_ctx - start)) for start in range(0, n_ctx, 4)]
    assert calls == depth + prefill + decode + memory


def test_bench_depth_json_records(tiny_with_tokenizer: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    d, p, n, reps = 20, 6, 4, 2
    evals: list[tuple[int, int, int, int]] = []

    def recording(llm: Any, depth: list[int], prompt: list[int], *args: Any) -> float:
        seconds = real(llm, depth, prompt, *args)
        evals.append((len(depth), len(prompt), llm.last_eval.n_reused,
                      llm.last_eval.n_evaluated))
        return seconds

    real = bench.completion_seconds
    monkeypatch.setattr(bench, "completion_seconds", recording)
    code, out, err = run_bench(["-m", str(tiny_with_tokenizer), "-t", "1", "-d", str(d), "-p",
                                str(p), "-n", str(n), "-r", str(reps), "-o", "json",
                                "--bandwidth", "--bandwidth-mib", "4"], capsys)
    assert code == 0, err
    records = json.loads(out)
    assert sorted((r["api"], r["n_prompt"], r["n_gen"], r["n_depth"]) for r in records) == \
        sorted((api, pp, tg, d) for api in ("model", "llama") for pp, tg in ((p, 0), (0, n)))
    mf = open_model_file(tiny_with_tokenizer)
    cfg, embd = mf.config, mf.tensors["token_embd.weight"]
    size = sum(t.data.nbytes for t in mf.tensors.values())
    for r in records:
        assert isinstance(r["n_depth"], int)
        assert r["n_ctx"] == d + p + n
        for ts, ns in zip(r["samples_ts"], r["samples_ns"]):  # the depth is not counted
            assert ts > 0 and ts == pytest.approx((p if r["n_prompt"] else n) / (ns * 1e-9),
                                                  rel=TS_FROM_NS_RTOL)
        if r["n_gen"]:
            # the decode tokens see d + 1 .. d + n positions: d + (n + 1) / 2 on average
            kv = 2 * cfg.n_layers * cfg.kv_dim * 2 * (d + (n + 1) / 2)
            expected = size - embd.data.nbytes + embd.data.nbytes // embd.rows + kv
            assert r["bytes_per_token"] == round(expected)
    # Every completion (warm-up and reps) reused the d cached tokens and computed only its own.
    assert evals == [(d, p, d, p)] * (reps + 1) + [(d, 1, d, 1)] * (reps + 1)


def test_bench_depth_markdown_label(tiny_with_tokenizer: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_bench(["-m", str(tiny_with_tokenizer), "-t", "1", "-d", "6", "-p", "8",
                                "-n", "4", "-r", "1", "--api", "model"], capsys)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| llama ")]
    assert re.search(r"\| +pp8 @ d6 \| +\d+\.\d\d ± \d+\.\d\d \|$", rows[0])
    assert re.search(r"\| +tg4 @ d6 \| +\d+\.\d\d ± \d+\.\d\d \|$", rows[1])
    assert "(n_ctx 18)" in out


def test_bench_depth_context_bound(tiny_with_tokenizer: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    # The decode test is the longer: the API's needs d + 1 + n positions, exactly the bound.
    d, p, n = 6, 2, 8
    args = ["-m", str(tiny_with_tokenizer), "-t", "1", "-d", str(d), "-p", str(p), "-n", str(n),
            "-r", "1", "-o", "json"]
    code, out, err = run_bench([*args, "-c", str(d + n + 1)], capsys)
    assert code == 0, err
    assert {r["n_ctx"] for r in json.loads(out)} == {d + n + 1}
    with pytest.raises(SystemExit) as exc:
        bench.main([*args, "-c", str(d + n)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"-c {d + n} is too small for -d {d} / -p {p} / -n {n}" in err
    assert f"at least {d + n + 1}" in err


# ---- benchmarks/compare_llama_cpp.py ---------------------------------------------------------


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    return import_script("compare_llama_cpp")


# Derived t/s are exact quotients of the hand-made times; only float rounding differs.
DERIVED_TS_RTOL = 1e-12


def llama_bench_record(n_prompt: int, n_gen: int, avg_ns: int) -> dict[str, Any]:
    """A record with the fields of llama-bench c392e509 -o json that prefill_at_depth() reads
    or keeps."""
    return {"build_commit": "c392e509", "model_filename": "m.gguf", "model_type": "llama ?B Q4_0",
            "n_threads": 2, "n_prompt": n_prompt, "n_gen": n_gen, "avg_ns": avg_ns,
            "stddev_ns": 1000, "avg_ts": (n_prompt + n_gen) / (avg_ns * 1e-9), "stddev_ts": 0.5,
            "samples_ns": [avg_ns], "samples_ts": [1.0]}


def test_compare_commands_at_depth(compare: ModuleType) -> None:
    a = argparse.Namespace(n_depth=1000, n_prompt=64, n_gen=32, repetitions=3)
    cmd = compare.llama_bench_cmd("llama-bench", "m.gguf", 2, a)
    assert cmd[cmd.index("-p") + 1] == "1000,1064" and cmd[cmd.index("-n") + 1] == "0"
    assert "-pg" not in cmd
    cmd = compare.batched_bench_cmd("llama-batched-bench", "m.gguf", 2, 1000, 32)
    assert cmd[cmd.index("-npp") + 1] == "1000" and cmd[cmd.index("-ntg") + 1] == "32"
    assert cmd[cmd.index("-npl") + 1] == "1" and int(cmd[cmd.index("-c") + 1]) >= 1032
    a.n_depth = 0
    cmd = compare.llama_bench_cmd("llama-bench", "m.gguf", 2, a)
    assert cmd[cmd.index("-p") + 1] == "64" and cmd[cmd.index("-n") + 1] == "32"


def test_compare_prefill_at_depth_derivation(compare: ModuleType) -> None:
    d, p = 1000, 64
    theirs = [llama_bench_record(d, 0, 2_000_000_000), llama_bench_record(d + p, 0, 2_400_000_000)]
    pp = compare.prefill_at_depth(theirs, d, p)
    assert compare.test_label(pp) == "pp64 @ d1000"
    assert (pp["n_prompt"], pp["n_gen"], pp["n_depth"]) == (p, 0, d)
    assert pp["avg_ns"] == 400_000_000
    assert pp["avg_ts"] == pytest.approx(p / 0.4, rel=DERIVED_TS_RTOL)
    assert pp["derived"] == "time(pp 1064) - time(pp 1000)"
    assert pp["stddev_ts"] is None and "samples_ts" not in pp
    assert pp["build_commit"] == "c392e509" and pp["n_threads"] == 2
    # The raw records keep their own names: neither is taken for the test at depth.
    assert [compare.test_label(r) for r in theirs] == ["pp1000", "pp1064"]
    ours = [{"n_threads": 2, "api": "model", "isa": "avx2", "n_prompt": p, "n_gen": 0,
             "n_depth": d, "avg_ts": 300.0}]
    [row] = compare.comparison_rows(ours, {"llama.cpp": [*theirs, pp]}, 0, "m.gguf")
    assert row["test"] == "pp64 @ d1000"
    assert row["ratio"] == pytest.approx(300.0 / (p / 0.4), rel=DERIVED_TS_RTOL)


def test_compare_prefill_at_depth_refuses_noise(compare: ModuleType) -> None:
    theirs = [llama_bench_record(100, 0, 5_000_000), llama_bench_record(101, 0, 4_900_000)]
    with pytest.raises(RuntimeError, match="not positive"):
        compare.prefill_at_depth(theirs, 100, 1)
    with pytest.raises(RuntimeError, match="n_prompt 102, n_gen 0; got 0"):
        compare.prefill_at_depth(theirs, 100, 2)


def test_compare_decode_at_depth_from_batched_bench(compare: ModuleType) -> None:
    # llama-batched-bench --output-format jsonl lines (c392e509), fields it reads
    runs = [{"n_threads": 2, "pp": 2000, "tg": 128, "pl": 1, "t_tg": t, "speed_tg": 128 / t}
            for t in (2.0, 4.0)]
    tg = compare.decode_at_depth(runs, "m.gguf", 2000)
    assert compare.test_label(tg) == "tg128 @ d2000"
    assert tg["avg_ts"] == pytest.approx((64 + 32) / 2, rel=DERIVED_TS_RTOL)
    assert tg["samples_ts"] == [64.0, 32.0]
    assert tg["stddev_ts"] == pytest.approx(statistics.stdev([64.0, 32.0]), rel=DERIVED_TS_RTOL)
    assert tg["avg_ns"] == pytest.approx(3e9, rel=DERIVED_TS_RTOL)


def our_record(isa: str, n_prompt: int, n_gen: int, avg_ts: float) -> dict[str, Any]:
    """The fields of an alpaca-bench -o json record that compare_llama_cpp reads."""
    return {"n_threads": 2, "api": "model", "isa": isa, "n_prompt": n_prompt, "n_gen": n_gen,
            "n_depth": 0, "avg_ts": avg_ts}


def engine_record(n_prompt: int, n_gen: int, avg_ts: float) -> dict[str, Any]:
    return {**llama_bench_record(n_prompt, n_gen, 10**9), "avg_ts": avg_ts}


def test_compare_summary_per_isa(compare: ModuleType) -> None:
    """--isa: each of our ISAs is its own comparison with llama.cpp, and also a ratio to the
    first ISA named, per test; medians over rounds."""
    rows = []
    for round_no, (avx2, avx512) in enumerate([(100.0, 150.0), (110.0, 160.0), (90.0, 170.0)]):
        theirs = {"llama.cpp": [engine_record(512, 0, 50.0)]}
        for isa, ts in (("avx2", avx2), ("avx512_vnni", avx512)):
            rows += compare.comparison_rows([our_record(isa, 512, 0, ts)], theirs, round_no,
                                            "m.gguf")
    base, wide = compare.summarize(rows)
    assert (base["isa"], base["alpaca_ts"], base["ratio"]) == ("avx2", 100.0, 2.0)
    assert base["llama_cpp_ts"] == 50.0 and base["engines"]["llama.cpp"]["rounds"] == 3
    assert "isa_ratio" not in base
    assert (wide["isa"], wide["alpaca_ts"], wide["vs_isa"]) == ("avx512_vnni", 160.0, "avx2")
    assert wide["isa_ratio"] == pytest.approx(1.6, rel=DERIVED_TS_RTOL)
    assert wide["rounds"] == 3


def test_compare_best_engine_per_round(compare: ModuleType) -> None:
    """ours / the best engine is taken round by round: the engine with the highest t/s in that
    round, whichever it is; ours / each engine too, and medians over rounds."""
    speeds = [{"a": 100.0, "b": 80.0}, {"a": 90.0, "b": 120.0}, {"a": 110.0, "b": 60.0}]
    rows = []
    for round_no, by_engine in enumerate(speeds):
        theirs = {name: [engine_record(0, 16, ts)] for name, ts in by_engine.items()}
        ours = [{**our_record("avx2", 0, 16, 60.0), "bandwidth_gbs": 10.0,
                 "bytes_per_token": 10**8, "bandwidth_fraction": 0.6}]
        [row] = compare.comparison_rows(ours, theirs, round_no, "m.gguf")
        best = max(by_engine, key=by_engine.__getitem__)
        assert (row["best_engine"], row["best_engine_ts"]) == (best, by_engine[best])
        assert row["ratio_vs_best"] == pytest.approx(60.0 / by_engine[best],
                                                     rel=DERIVED_TS_RTOL)
        for name, ts in by_engine.items():
            assert row["engines"][name]["ratio"] == pytest.approx(60.0 / ts, rel=DERIVED_TS_RTOL)
            assert row["engines"][name]["bandwidth_fraction"] == pytest.approx(
                ts * 1e8 / 10e9, rel=DERIVED_TS_RTOL)
        assert "llama_cpp_ts" not in row and "ratio" not in row  # no engine named llama.cpp
        rows.append(row)
    [s] = compare.summarize(rows)
    assert s["best_engine_rounds"] == {"a": 2, "b": 1}
    assert s["best_engine_ts"] == 110.0  # median of 100, 120, 110
    assert s["ratio_vs_best"] == pytest.approx(60.0 / 110.0, rel=DERIVED_TS_RTOL)
    assert s["engines"]["a"]["ts"] == 100.0 and s["engines"]["b"]["ts"] == 80.0
    assert s["engines"]["b"]["ratio"] == pytest.approx(60.0 / 80.0, rel=DERIVED_TS_RTOL)


# Stand-ins for a llama-bench that takes -rtr (ik_llama.cpp's) and for alpaca-bench: records at
# fixed speeds (the engine twice as fast with -rtr 1), each run logged to LOG in running order.
FAKE_RTR_BENCH = """#!{python}
import json, sys
a = sys.argv
p, n = int(a[a.index("-p") + 1]), int(a[a.index("-n") + 1])
rtr = int(a[a.index("-rtr") + 1]) if "-rtr" in a else 0
with open({log!r}, "a") as f:
    f.write(f"rtr{{rtr}}\\n")
print(json.dumps([{{"build_commit": f"fake{{rtr}}", "n_threads": int(a[a.index("-t") + 1]),
                   "n_prompt": pp, "n_gen": tg, "avg_ts": 100.0 * (1 + rtr) / (1 + 9 * (tg > 0))}}
                  for pp, tg in ((p, 0), (0, n))]))
"""
FAKE_ALPACA_BENCH = """#!{python}
import json, sys
a = sys.argv
p, n = int(a[a.index("-p") + 1]), int(a[a.index("-n") + 1])
with open({log!r}, "a") as f:
    f.write("alpaca\\n")
print(json.dumps([{{"n_threads": int(a[a.index("-t") + 1]), "api": "model", "isa": "fake",
                   "n_prompt": pp, "n_gen": tg, "n_depth": 0, "avg_ts": 150.0 if pp else 15.0}}
                  for pp, tg in ((p, 0), (0, n))]))
"""


def fake_script(path: Path, template: str, log: Path) -> Path:
    path.write_text(template.format(python=sys.executable, log=str(log)))
    path.chmod(0o755)
    return path


def test_compare_several_engines_interleaved(compare: ModuleType, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--engine, twice: every side runs once per round in an order rotated each round, the extra
    arguments reach their engine, and ours is compared with each engine and the best of them."""
    log = tmp_path / "order.log"
    engine = fake_script(tmp_path / "llama-bench", FAKE_RTR_BENCH, log)
    ours = fake_script(tmp_path / "alpaca-bench", FAKE_ALPACA_BENCH, log)
    monkeypatch.setattr(compare, "alpaca_bench_cmd",
                        lambda model, n_threads, a: [str(ours), "-m", model, "-t",
                                                     str(n_threads), "-p", str(a.n_prompt),
                                                     "-n", str(a.n_gen)])
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    code = compare.main(["-m", str(model), "-t", "1", "-p", "8", "-n", "4", "-r", "1",
                         "--rounds", "3", "--engine", f"llama.cpp={engine}", "--engine",
                         f"ik-rtr1={engine},-rtr,1", "--out-dir", str(tmp_path), "--name", "x"])
    assert code == 0, capsys.readouterr().err
    assert log.read_text().split() == ["rtr0", "rtr1", "alpaca",
                                       "rtr1", "alpaca", "rtr0",
                                       "alpaca", "rtr0", "rtr1"]
    result = json.loads((tmp_path / "x.json").read_text())
    assert result["engines"] == [
        {"name": "llama.cpp", "path": str(engine), "args": [], "build_commit": ["fake0"]},
        {"name": "ik-rtr1", "path": str(engine), "args": ["-rtr", "1"], "build_commit": ["fake1"]}]
    assert [len(records) for records in result["engine_records"].values()] == [6, 6]
    assert len(result["ratios"]) == 6  # 3 rounds, pp8 and tg4
    expected = {"pp8": (150.0, {"llama.cpp": 100.0, "ik-rtr1": 200.0}),
                "tg4": (15.0, {"llama.cpp": 10.0, "ik-rtr1": 20.0})}
    assert sorted(s["test"] for s in result["summary"]) == sorted(expected)
    for s in result["summary"]:
        ours_ts, theirs = expected[s["test"]]
        assert s["rounds"] == 3 and s["alpaca_ts"] == ours_ts
        for name, ts in theirs.items():
            assert s["engines"][name]["ts"] == ts
            assert s["engines"][name]["ratio"] == pytest.approx(ours_ts / ts)
        assert s["best_engine_rounds"] == {"ik-rtr1": 3}
        assert s["ratio_vs_best"] == pytest.approx(ours_ts / theirs["ik-rtr1"])
        # the fields of files written before --engine, from the engine named llama.cpp
        assert s["llama_cpp_ts"] == theirs["llama.cpp"]
        assert s["ratio"] == s["engines"]["llama.cpp"]["ratio"]
    assert result["llama_bench"] == str(engine) and result["llama_cpp_build"] == ["fake0"]
    assert result["llama_cpp"] == result["engine_records"]["llama.cpp"]
    assert "ours / best" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--engine", "a=ENGINE", "--engine", "a=ENGINE"], "engine name 'a' given twice"),
    (["--engine", "a=ENGINE", "--engine", "b=ENGINE", "-d", "100"], "-d compares with one engine"),
    (["--engine", "a=ENGINE,-rtr,1", "-d", "100"], "-d compares with one engine"),
    (["--engine", "a=ENGINE", "--llama-bench", "ENGINE"], "not both"),
    (["--engine", "ENGINE"], "expected NAME=PATH"),
    (["--engine", "alpaca=ENGINE"], "are ours"),
    (["--engine", "a=/nonexistent/llama-bench"], "is not an executable file"),
])
def test_compare_refuses_bad_engines(compare: ModuleType, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str], args: list[str],
                                     message: str) -> None:
    engine = fake_script(tmp_path / "llama-bench", FAKE_RTR_BENCH, tmp_path / "log")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    with pytest.raises(SystemExit) as exc:
        compare.main(["-m", str(model), *(arg.replace("ENGINE", str(engine)) for arg in args)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "log").exists()


# ---- benchmarks/make_random_model.py ---------------------------------------------------------


@pytest.fixture(scope="module")
def make_random_model() -> ModuleType:
    return import_script("make_random_model")


CUSTOM = ["--shape", "custom", "--layers", "2", "--dim", "64", "--heads", "4", "--kv-heads",
          "2", "--ffn", "96", "--vocab", "300"]


@pytest.mark.parametrize("type_name", ["q4_0", "q4_1", "q8_0", "f16"])
def test_random_model_loads_and_runs(make_random_model: ModuleType, tmp_path: Path,
                                     type_name: str) -> None:
    out = tmp_path / f"random.{type_name}.gguf"
    assert make_random_model.main([*CUSTOM, "--type", type_name, "-o", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left
    mf = open_model_file(out)
    cfg = mf.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.n_vocab) == \
        (2, 64, 4, 2, 96, 300)
    assert not cfg.tied_embeddings
    wtype = T[type_name.upper()]
    for name, t in mf.tensors.items():
        assert t.type == (T.F32 if name.endswith("norm.weight") else wtype), name
        if t.type == T.F32:
            assert np.all(dequantize(t.data, t.type, t.cols) == 1.0)
        else:
            values = dequantize(t.data, t.type, t.cols)
            bound = math.sqrt(3.0) if name == "token_embd.weight" else math.sqrt(3.0 / t.cols)
            assert np.abs(values).max() <= bound * QUANT_RANGE_SLACK, name
            assert values.std() > bound / 3, name  # filled with noise, not zeros
    tok = Tokenizer.from_metadata(mf.metadata)
    assert tok.encode("hi") == [1, 3 + 0xE2, 3 + 0x96, 3 + 0x81,  # "\u2581" (SPM space) in UTF-8
                                3 + ord("h"), 3 + ord("i")]  # BOS, then byte tokens
    assert tok.eos_id == 2 and tok.n_vocab == 300
    model = alpaca_cpu.Model(out, n_ctx=32, n_threads=1)
    logits = model.forward([1, 70, 80, 90], all_logits=True)
    assert logits.shape == (4, 300) and np.isfinite(logits).all()
    assert logits.std() > 0


def test_random_model_real_shapes(make_random_model: ModuleType) -> None:
    """Parameter counts of the named shapes are those of the real models."""
    def n_params(shape: str) -> int:
        plan = make_random_model.tensor_plan(make_random_model.SHAPES[shape],
                                             make_random_model.TYPES["q4_0"])
        return sum(math.prod(t.shape) for t in plan if t.name != ROPE_FREQS)
    assert n_params("tinyllama") == 1_100_048_384  # TinyLlama-1.1B
    assert n_params("llama3.2-1b") == 1_235_814_400  # Llama-3.2-1B (tied embeddings)
    assert n_params("llama7b") == 6_738_415_616  # LLaMA-7B
    plan = make_random_model.tensor_plan(make_random_model.SHAPES["llama7b"],
                                         make_random_model.TYPES["q4_0"])
    # The Q4_0 file is ~3.9 GB: every matrix in Q4_0 (18 bytes per 32 weights).
    assert sum(t.nbytes for t in plan) == pytest.approx(3.79e9, rel=0.01)


def test_random_model_llama32_rope_freqs(make_random_model: ModuleType) -> None:
    """Llama 3.2's RoPE scaling is written as llama.cpp's converter writes it: rope_freqs.weight
    first, 32 divisors for head size 64 (factor 32 for long wavelengths, 1 for short ones)."""
    plan = make_random_model.tensor_plan(make_random_model.SHAPES["llama3.2-1b"],
                                         make_random_model.MIXES["q4_k_m"])
    first = plan[0]
    assert first.name == ROPE_FREQS and first.shape == (32,) and first.type == T.F32
    assert first.values[0] == 1.0 and first.values[-1] == 32.0
    assert np.all(np.diff(first.values) >= 0)  # longer wavelengths are slowed more
    assert "output.weight" not in {t.name for t in plan}  # tied


REAL_SHAPE_PLANS = json.loads((REPO / "tests" / "data" /
                               "llama_quantize_real_shape_plans.json").read_text())["plans"]


@pytest.mark.parametrize("shape", list(REAL_SHAPE_PLANS))
def test_random_model_mixes_are_llama_quantize_plans(make_random_model: ModuleType,
                                                     shape: str) -> None:
    """At the named shapes, every tensor of every mix gets the type llama.cpp's llama-quantize
    gives it (its --dry-run on the same layout, stored in tests/data)."""
    for mix, expected in REAL_SHAPE_PLANS[shape].items():
        plan = make_random_model.tensor_plan(make_random_model.SHAPES[shape],
                                             make_random_model.MIXES[mix])
        assert len(plan) == expected["n_tensors"], mix
        assert sum(t.type == T.F32 for t in plan) == expected["n_f32"], mix
        ours = {t.name: t.type.name for t in plan if t.type != T.F32}
        theirs = {name: expected["other"].get(name, expected["main"]) for name in ours}
        assert ours == theirs, mix
        assert set(expected["other"]) <= set(ours), mix


# A tiny shape on which the mixes differ as at real sizes: rows of 256 take K-quants, ffn_down's
# rows of 320 take the fallbacks, 4 query heads per KV head, and 4 layers of which 2 and 3 are
# "more bits" layers (q4_k_m, q5_k_m).
KQ_CUSTOM = ["--shape", "custom", "--layers", "4", "--dim", "256", "--heads", "8", "--kv-heads",
             "2", "--ffn", "320", "--vocab", "300"]
NEW_MIXES = ["q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k", "q5_0", "q5_1",
             "iq4_nl"]


@pytest.fixture(scope="module")
def kquant_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kq-text") / "text.txt"
    path.write_text(TEXT[:80])  # byte tokens on these files: 81 tokens with BOS, 5 chunks of 16
    return path


@pytest.mark.parametrize("mix", NEW_MIXES)
def test_random_model_mix_loads_and_tools_run(make_random_model: ModuleType, tmp_path: Path,
                                              kquant_text: Path, mix: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A --mix file has the converter's plan tensor for tensor, and the engine, alpaca-bench and
    alpaca-perplexity run it."""
    out = tmp_path / f"random.{mix}.gguf"
    assert make_random_model.main([*KQ_CUSTOM, "--mix", mix, "-o", str(out)]) == 0
    mf = open_model_file(out)
    expected = {t.name: t.type for t in quant_plan.plan(mf.config, mix)}
    assert {name: t.type for name, t in mf.tensors.items()} == expected
    assert mf.metadata["general.file_type"] == int(quant_plan.MIXES[mix].file_type)
    assert len(set(expected.values()) - {T.F32}) >= 2  # a mix: more than one matrix type
    embd = mf.tensors["token_embd.weight"]
    values = dequantize(embd.data, embd.type, embd.cols)
    # uniform on [-sqrt(3), sqrt(3)): standard deviation 1, plus the quantization noise
    assert abs(values.std() - 1.0) <= MIX_EMBD_STD_ATOL, values.std()
    model = alpaca_cpu.Model(out, n_ctx=32, n_threads=1)
    logits = model.forward([1, 70, 80, 90], all_logits=True)
    assert logits.shape == (4, 300) and np.isfinite(logits).all() and logits.std() > 0
    del model
    capsys.readouterr()
    code, bench_out, err = run_bench(["-m", str(out), "-t", "1", "-p", "4", "-n", "2", "-r", "1",
                                      "-o", "json", "--api", "model"], capsys)
    assert code == 0, err
    records = json.loads(bench_out)
    assert [(r["n_prompt"], r["n_gen"]) for r in records] == [(4, 0), (0, 2)]
    name = quant_plan.MIXES[mix].file_type.name.removeprefix("MOSTLY_")
    assert all(r["model_type"] == f"llama 2M {name}" and r["avg_ts"] > 0 for r in records)
    assert perplexity.main(["-m", str(out), "-f", str(kquant_text), "-c", str(CTX), "-t",
                            "1"]) == 0
    m = re.fullmatch(r"Final estimate: PPL = (\d+\.\d{4}) \+/- (\d+\.\d{5})\n",
                     capsys.readouterr().out)
    assert m and 1.0 < float(m[1]) < 10 * 300


# A stand-in for llama.cpp's llama-bench (not part of this project): the records it prints with
# -o json for -p P -n N, with the fields compare_llama_cpp reads, at fixed speeds.
FAKE_LLAMA_BENCH = """#!{python}
import json, sys
a = sys.argv
p, n = int(a[a.index("-p") + 1]), int(a[a.index("-n") + 1])
print(json.dumps([{{"build_commit": "0c1e570", "model_filename": a[a.index("-m") + 1],
                   "model_type": "llama ?B Q4_K - Medium", "n_threads": int(a[a.index("-t") + 1]),
                   "n_prompt": pp, "n_gen": tg, "avg_ns": 10**9, "stddev_ns": 0,
                   "avg_ts": float(pp + tg), "stddev_ts": 0.0, "samples_ts": [float(pp + tg)]}}
                  for pp, tg in ((p, 0), (0, n))]))
"""


def test_compare_runs_a_kquant_mix(make_random_model: ModuleType, compare: ModuleType,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """compare_llama_cpp end to end on a Q4_K_M file: our side really runs (alpaca-bench in its
    own process), llama.cpp's is the stand-in above."""
    model = tmp_path / "random.q4_k_m.gguf"
    assert make_random_model.main([*KQ_CUSTOM, "--mix", "q4_k_m", "-o", str(model)]) == 0
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH.format(python=sys.executable))
    fake.chmod(0o755)
    code = compare.main(["-m", str(model), "-t", "1", "-p", "4", "-n", "2", "-r", "1", "--api",
                         "model", "--bandwidth-mib", "4", "--llama-bench", str(fake),
                         "--out-dir", str(tmp_path), "--name", "kq"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "kq.json").read_text())
    assert sorted(s["test"] for s in result["summary"]) == ["pp4", "tg2"]
    for s in result["summary"]:
        assert s["llama_cpp_ts"] == (4.0 if s["test"] == "pp4" else 2.0)
        assert s["alpaca_ts"] > 0 and s["ratio"] == pytest.approx(s["alpaca_ts"] /
                                                                  s["llama_cpp_ts"])
    assert {r["model_type"] for r in result["alpaca"]} == {"llama 2M Q4_K_M"}


def test_random_model_f32_mix_has_random_matrices(make_random_model: ModuleType,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "f32.gguf"
    assert make_random_model.main([*CUSTOM, "--mix", "f32", "-o", str(out)]) == 0
    for name, t in open_model_file(out).tensors.items():
        values = dequantize(t.data, t.type, t.cols)
        assert t.type == T.F32, name
        if name.endswith("norm.weight"):
            assert np.all(values == 1.0), name
        else:  # uniform noise of the tensor's scale, not the norms' ones
            bound = math.sqrt(3.0) if name == "token_embd.weight" else math.sqrt(3.0 / t.cols)
            assert np.abs(values).max() <= bound and values.std() > bound / 3, name


def test_random_model_tied_mix_gives_embedding_output_type(make_random_model: ModuleType,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "tied.gguf"
    assert make_random_model.main([*KQ_CUSTOM, "--mix", "q4_k_m", "--tied", "-o", str(out)]) == 0
    mf = open_model_file(out)
    assert mf.config.tied_embeddings and "output.weight" not in mf.tensors
    assert mf.tensors["token_embd.weight"].type == T.Q6_K  # the output matrix's type


@pytest.mark.parametrize("extra, message", [
    (["--shape", "custom", "--layers", "2", "--dim", "64", "--ffn", "96"], "needs --heads"),
    ([*CUSTOM[:5], "48", *CUSTOM[6:]], "is not a multiple of 32"),
    ([*CUSTOM[:-1], "100"], "expected at least 259"),
    ([*CUSTOM[:9], "3", *CUSTOM[10:]], "must be a multiple of --kv-heads"),
])
def test_random_model_refuses_bad_shapes(make_random_model: ModuleType, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str], extra: list[str],
                                         message: str) -> None:
    out = tmp_path / "bad.gguf"
    assert make_random_model.main([*extra, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_random_model_keeps_existing_file(make_random_model: ModuleType, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    assert make_random_model.main([*CUSTOM, "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert make_random_model.main([*CUSTOM, "-o", str(out), "--force"]) == 0
    assert open_model_file(out).config.n_layers == 2


# ---- benchmarks/gemm_stream.py ---------------------------------------------------------------

def test_gemm_stream_writes_a_rate_per_case(tmp_path: Path) -> None:
    gemm_stream = import_script("gemm_stream")
    gemm_stream.MATRIX, gemm_stream.CACHE_MATRIX = (256, 512), (16, 512)  # small: seconds less
    assert gemm_stream.main(["--types", "Q4_0,Q6_K", "--tokens", "1,3", "--rounds", "2",
                             "--memory-mib", "2", "--out-dir", str(tmp_path), "--name", "g"]) == 0
    out = json.loads((tmp_path / "g.json").read_text())
    cases = {(c["type"], c["n_tok"], c["where"]): c for c in out["cases"]}
    assert set(cases) == {(t, n, w) for t in ("Q4_0", "Q6_K") for n in (1, 3)
                          for w in ("memory", "cache")}
    for c in cases.values():
        assert len(c["gbs_rounds"]) == 2 and all(r > 0 for r in c["gbs_rounds"])
        assert c["gbs_median"] == statistics.median(c["gbs_rounds"])
        assert ("fraction_of_probe" in c) == (c["where"] == "memory")
    assert out["probe_gbs_1thread"]["median"] > 0


def test_gemm_read_rate_refuses_bad_shapes() -> None:
    q4_0 = T.Q4_0.value
    with pytest.raises(ValueError, match="rows 10 is not a positive multiple of 16"):
        alpaca_cpu._core.gemm_read_rate(q4_0, 10, 64, 1, 1 << 20)
    with pytest.raises(ValueError, match=r"cols 40 is not a positive multiple of 32 \(Q4_0\)"):
        alpaca_cpu._core.gemm_read_rate(q4_0, 16, 40, 1, 1 << 20)
    with pytest.raises(ValueError, match="n_tok 0 is not in 1..512"):
        alpaca_cpu._core.gemm_read_rate(q4_0, 16, 64, 0, 1 << 20)
