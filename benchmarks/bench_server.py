"""alpaca-server throughput through HTTP with real clients: 1, 2, 4, 8 concurrent streams.

    python benchmarks/bench_server.py -m smollm2.Q4_1.gguf -t 4 [--gen 128] [--streams 1,2,4,8]
        [--ttft] [--llama-batched-bench /tmp/lcp/build/bin/llama-batched-bench] [-o out.json]

For each number of streams N it starts `alpaca-server --parallel max(streams)` (in this
process, uvicorn on a free 127.0.0.1 port), then N `AsyncOpenAI` clients each stream one
greedy completion of --gen tokens (end-of-generation banned, so every stream runs to the end)
after a short distinct prompt, all started together. Reported per N:

- decode_tps: tokens received by all clients after the last stream got its first token,
  divided by the time from then to the last token (aggregate decode speed with N streams
  running; prefill excluded);
- e2e_tps: all tokens / wall time of the round (prefill included);
- speedup: decode_tps / decode_tps of 1 stream.

--ttft: time to first token of a short request sent while 3 requests with long prompts
(--long-prompt tokens) are being prefilled.

--llama-batched-bench BIN: the engine's batched decode with 4 sequences (Model.forward_batch,
no HTTP: --npp prompt tokens each, then --gen steps of 4 tokens) next to llama.cpp's
`llama-batched-bench -npl 4` on the same file with the same threads, interleaved, --reps times.

Prints one JSON object (and writes it to -o). Timing on a busy machine is noise: run it on a
quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_llama_cpp import run_jsonl


def free_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


class Server:
    """alpaca-server's app on uvicorn in a thread, for the duration of a `with`."""

    def __init__(self, model: str, n_ctx: int, parallel: int, threads: int | None) -> None:
        from alpaca_cpu.llama import Llama
        self.llama = Llama(model, n_ctx=n_ctx, n_threads=threads, n_seq_max=parallel)
        self.parallel = parallel

    def __enter__(self) -> str:
        import uvicorn

        from alpaca_cpu.server import ServerSettings, create_app
        app = create_app(self.llama, ServerSettings(model_id="bench", max_queue=256))
        self.sock = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


async def stream(client: Any, prompt: str, n_gen: int, no_eos: dict[str, int]) -> list[float]:
    """Arrival time of every streamed token of one greedy completion."""
    times = []
    s = await client.completions.create(model="bench", prompt=prompt, max_tokens=n_gen,
                                        temperature=0, logit_bias=no_eos, stream=True)
    async for chunk in s:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
    return times


async def round_of(url: str, n: int, n_gen: int, no_eos: dict[str, int]) -> dict[str, Any]:
    import openai
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as client:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(stream(client, f"Story {i}: once upon a time", n_gen,
                                             no_eos) for i in range(n)))
    t_end = max(r[-1] for r in runs)
    t_all_started = max(r[0] for r in runs)
    after = sum(sum(t > t_all_started for t in r) for r in runs)
    return {"streams": n, "tokens": sum(map(len, runs)),
            "decode_tps": after / (t_end - t_all_started) if t_end > t_all_started else 0.0,
            "e2e_tps": sum(map(len, runs)) / (t_end - t0),
            "ttft_s_mean": statistics.fmean(r[0] - t0 for r in runs)}


async def ttft_under_prefill(url: str, long_tokens: int, no_eos: dict[str, int]) -> float:
    import openai
    long_prompt = list(range(1000, 1000 + long_tokens - 1))  # token ids: exactly that long
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as client:
        longs = [asyncio.create_task(client.completions.create(
            model="bench", prompt=[100 + i, *long_prompt], max_tokens=8, temperature=0))
            for i in range(3)]
        await asyncio.sleep(0.2)  # the long prompts are being prefilled
        t0 = time.perf_counter()
        times = await stream(client, "Hi", 4, no_eos)
        await asyncio.gather(*longs)
    return times[0] - t0


def engine_batched_decode(model: str, threads: int | None, npl: int, npp: int,
                          ntg: int) -> float:
    """Aggregate tokens/s of ntg decode steps of npl sequences after npp-token prompts."""
    from alpaca_cpu.model import Model
    m = Model(model, n_ctx=npp + ntg + 1, n_threads=threads, n_slots=npl)
    rng = np.random.default_rng(0)
    n_vocab = m.config.n_vocab
    for s in range(npl):
        m.forward_batch(rng.integers(0, n_vocab, npp), [s] * npp, range(npp))
    toks = rng.integers(0, n_vocab, (ntg, npl))
    t0 = time.perf_counter()
    for i in range(ntg):
        m.forward_batch(toks[i], range(npl), [npp + i] * npl)
    return npl * ntg / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--gen", type=int, default=128, help="tokens per stream")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--ttft", action="store_true")
    ap.add_argument("--long-prompt", type=int, default=1000)
    ap.add_argument("--llama-batched-bench", default=None, metavar="BIN")
    ap.add_argument("--npp", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args(argv)
    counts = [int(x) for x in a.streams.split(",")]
    n_ctx = max(a.gen + 64, a.long_prompt + 64 if a.ttft else 0)
    out: dict[str, Any] = {"model": a.model, "threads": a.threads, "gen": a.gen,
                           "machine": platform.machine(), "rounds": []}
    srv = Server(a.model, n_ctx, max(*counts, 4 if a.ttft else 1), a.threads)
    no_eos = {str(srv.llama.token_eos()): -100}  # every stream runs its --gen tokens
    with srv as url:
        asyncio.run(round_of(url, 1, 4, no_eos))  # warm-up
        for n in counts:
            out["rounds"].append(asyncio.run(round_of(url, n, a.gen, no_eos)))
        if a.ttft:
            out["ttft_short_under_3_prefills_s"] = asyncio.run(
                ttft_under_prefill(url, a.long_prompt, no_eos))
    base = out["rounds"][0]["decode_tps"] if out["rounds"] else 0.0
    for r in out["rounds"]:
        r["speedup"] = r["decode_tps"] / base if base else None
    if a.llama_batched_bench:
        ours, theirs = [], []
        from alpaca_cpu.system import physical_cores
        threads = a.threads or physical_cores()
        for _ in range(a.reps):
            ours.append(engine_batched_decode(a.model, threads, 4, a.npp, a.gen))
            theirs.append(run_jsonl([
                a.llama_batched_bench, "-m", a.model, "-t", str(threads), "-c",
                str(4 * (a.npp + a.gen) + 64), "-b", "2048", "-ub", "512", "-npp", str(a.npp),
                "-ntg", str(a.gen), "-npl", "4", "--output-format", "jsonl"])["speed_tg"])
        out["batched_decode_npl4"] = {
            "alpaca_tps": ours, "llama_cpp_tps": theirs,
            "ratio_median": statistics.median(o / t for o, t in zip(ours, theirs))}
    text = json.dumps(out, indent=2)
    print(text)
    if a.output:
        Path(a.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
