"""Several sequences in one forward call (Model.forward_batch): each sequence's results equal
what it gives alone, on every ISA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from tiny_model import TinySpec, tiny_weights, write_tiny_model

import alpaca_cpu

SPECS = {
    "gqa-f16": TinySpec(wtype=T.F16, n_heads=4, n_kv_heads=2, tied=True, seed=11),
    "gqa-q4_k_m-mix": TinySpec(wtype=T.Q4_K, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=288,
                               embd_type=T.Q8_0, seed=12, tensor_types=(
                                   ("attn_q", T.Q5_1), ("attn_v", T.Q6_K), ("output", T.Q6_K),
                                   ("ffn_gate", T.IQ4_NL), ("ffn_down", T.Q5_0))),
}
N_CTX = 320
# float32 numpy matmul vs the engine's on quantized weights and activations (test_model.py's
# QUANT_RTOL for a whole model; one matmul stays well inside it).
QUANTIZED_MATMUL_RTOL = 3e-2


@pytest.fixture(scope="module", params=list(SPECS), ids=list(SPECS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    spec = SPECS[request.param]
    return spec, write_tiny_model(tmp_path_factory.mktemp("batch") / "model.gguf", spec)


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def run_steps(model: alpaca_cpu.Model, steps: list[dict[int, list[int]]],
              only: int | None = None) -> dict[int, list[np.ndarray]]:
    """Each step is one forward_batch of every sequence's new tokens (or only `only`'s, in slot
    0); every token's logits, per sequence."""
    out: dict[int, list[np.ndarray]] = {}
    for step in steps:
        toks, seqs, pos = [], [], []
        for s, new in step.items():
            if only is not None and s != only:
                continue
            slot = 0 if only is not None else s
            start = model.slot_length(slot)
            toks += new
            seqs += [slot] * len(new)
            pos += range(start, start + len(new))
        if not toks:
            continue
        rows = model.forward_batch(toks, seqs, pos, want=np.ones(len(toks), bool))
        i = 0
        for s, new in step.items():
            if only is not None and s != only:
                continue
            out.setdefault(s, []).extend(rows[i : i + len(new)])
            i += len(new)
    return out


def test_batch_equals_each_sequence_alone(tiny, isa: str) -> None:
    spec, path = tiny
    rng = np.random.default_rng(spec.seed)

    def toks(n: int) -> list[int]:
        return rng.integers(0, spec.n_vocab, n).tolist()

    # Three sequences prefilled together at different lengths, then decode steps where the
    # slots sit at different positions, one sequence prefilling a second chunk meanwhile,
    # one idle for a step and one joining late; the last steps decode past 256 positions,
    # where a decode step's attention parts are spread over threads.
    steps = [{0: toks(30), 1: toks(7), 2: toks(19)},
             {0: toks(1), 1: toks(1), 2: toks(5)},
             {0: toks(1), 2: toks(1), 3: toks(12)},
             {0: toks(1), 1: toks(1), 2: toks(1), 3: toks(1)},
             {0: toks(240), 1: toks(1)},
             {0: toks(1), 1: toks(1), 3: toks(1)},
             {0: toks(1), 2: toks(1)}]
    m = alpaca_cpu.Model(path, n_ctx=N_CTX, n_threads=2, n_slots=4)
    assert m.isa == isa and m.n_slots == 4
    batched = run_steps(m, steps)
    for s in range(4):
        alone = run_steps(alpaca_cpu.Model(path, n_ctx=N_CTX, n_threads=2), steps, only=s)
        # Every float reduction of a token has one order whatever else is in the batch.
        np.testing.assert_array_equal(np.array(batched[s]), np.array(alone[s]), f"sequence {s}")
        assert m.slot_length(s) == len(alone[s])
    # The single-sequence API, called with the same chunks, gives the same logits, bit for bit.
    single = alpaca_cpu.Model(path, n_ctx=N_CTX, n_threads=2)
    start = 0
    got = []
    for step in steps:
        if 0 in step:
            got.extend(single.forward(step[0], start_pos=start, all_logits=True))
            start += len(step[0])
    np.testing.assert_array_equal(np.array(got), np.array(batched[0]))


def test_rewound_slot_is_reused(tiny, isa: str) -> None:
    spec, path = tiny
    rng = np.random.default_rng(spec.seed + 100)
    a, b, c = (rng.integers(0, spec.n_vocab, n).tolist() for n in (25, 9, 14))
    m = alpaca_cpu.Model(path, n_ctx=64, n_threads=2, n_slots=2)
    m.forward_batch(a + b, [0] * 25 + [1] * 9, list(range(25)) + list(range(9)))
    fresh = alpaca_cpu.Model(path, n_ctx=64, n_threads=2)

    def alone(tokens: list[int]) -> np.ndarray:
        fresh.rewind_slot(0, 0)
        return fresh.forward_batch(tokens, [0] * len(tokens), range(len(tokens)))

    # Rewind slot 0 to 10 positions and continue it with c: as if a[:10] + c ran alone.
    m.rewind_slot(0, 10)
    assert m.slot_length(0) == 10
    got = m.forward_batch(c + b[:1], [0] * 14 + [1], list(range(10, 24)) + [9],
                          want=np.array([False] * 13 + [True, True]))
    np.testing.assert_array_equal(got[0], alone(a[:10] + c)[0])
    np.testing.assert_array_equal(got[1], alone(b + b[:1])[0])
    # Starting a run inside what a slot holds rewinds it too; clearing reuses it from 0.
    got = m.forward_batch(c[:3], [1] * 3, [4, 5, 6])
    np.testing.assert_array_equal(got[0], alone(b[:4] + c[:3])[0])
    assert m.slot_length(1) == 7
    m.rewind_slot(0)
    got = m.forward_batch(b, [0] * 9, range(9))
    np.testing.assert_array_equal(got[0], alone(b)[0])


def test_a_run_longer_than_the_engine_batch(tiny, isa: str) -> None:
    """A sequence crossing the engine's 512-token batches goes on in the next one."""
    spec, path = tiny
    rng = np.random.default_rng(spec.seed + 200)
    long, short = rng.integers(0, spec.n_vocab, 520).tolist(), [5, 6, 7]
    m = alpaca_cpu.Model(path, n_ctx=600, n_threads=2, n_slots=2)
    got = m.forward_batch(short + long, [1] * 3 + [0] * 520, list(range(3)) + list(range(520)))
    single = alpaca_cpu.Model(path, n_ctx=600, n_threads=2)
    np.testing.assert_array_equal(got[1], single.forward_batch(long, [0] * 520, range(520))[0])
    single.rewind_slot(0)
    np.testing.assert_array_equal(got[0], single.forward_batch(short, [0] * 3, range(3))[0])
    # Model.forward's batches of 512 + 8 tokens: the same attention parts, the same bits.
    np.testing.assert_array_equal(got[1], single.forward(long))


def test_hidden_states_are_the_normed_final_layer(tiny: tuple[TinySpec, Path]) -> None:
    spec, path = tiny
    m = alpaca_cpu.Model(path, n_ctx=64, n_threads=2, n_slots=2)
    toks = [3, 4, 5, 6]
    hidden = m.forward_batch(toks, [0] * 4, range(4), want=np.ones(4, bool), hidden=True)
    assert hidden.shape == (4, spec.dim)
    # The logits are these states times the output matrix: the same rows' logits, by numpy.
    m.rewind_slot(0)
    logits = m.forward_batch(toks, [0] * 4, range(4), want=np.ones(4, bool))
    w = tiny_weights(spec)["token_embd.weight" if spec.tied else "output.weight"]
    # The file's weights are quantized and the engine quantizes the activations too.
    assert max_rel(hidden @ w.T, logits) <= QUANTIZED_MATMUL_RTOL


@pytest.mark.parametrize(("seqs", "pos", "match"), [
    ([0, 0], [0, 2], "does not follow"),
    ([0, 1, 0], [0, 0, 1], "appears in two runs"),
    ([0, 2], [0, 0], "sequence 2 outside"),
    ([0, 1], [0, 5], "leaves a gap"),
    ([0, 1], [0, -1], "position -1"),
])
def test_bad_batches_are_refused(tiny, seqs: list[int], pos: list[int], match: str) -> None:
    _, path = tiny
    m = alpaca_cpu.Model(path, n_ctx=64, n_threads=1, n_slots=2)
    with pytest.raises(ValueError, match=match):
        m.forward_batch([1] * len(seqs), seqs, pos)
    assert m.slot_length(0) == 0 and m.slot_length(1) == 0  # nothing was run
    with pytest.raises(ValueError, match="outside"):
        m.rewind_slot(0, 3)
    with pytest.raises(ValueError, match="n_slots"):
        alpaca_cpu.Model(path, n_ctx=64, n_threads=1, n_slots=0)
