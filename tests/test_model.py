"""The native forward pass equals the numpy reference on tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from tiny_model import TinySpec, write_tiny_model

import alpaca_cpu
from alpaca_cpu.reference import ReferenceModel

# Max |logit difference| relative to the largest |logit|, engine vs float32 reference:
# - float weights: only the F16 KV cache rounds (~2^-11 relative) and summation order differs.
FLOAT_RTOL = 2e-3
# - quantized weights: the engine also quantizes activations to int8 per 32-block (~0.5 %
#   per value), as llama.cpp does; errors add up over layers.
QUANT_RTOL = 3e-2
# Same engine, same inputs, different batching or threads: only float summation order changes.
SAME_ENGINE_RTOL = 1e-4

SPECS = {
    "mha-f32-untied": TinySpec(),
    "gqa-f16-tied": TinySpec(wtype=T.F16, n_heads=4, n_kv_heads=2, tied=True, seed=1),
    "gqa-q8_0-hd32": TinySpec(wtype=T.Q8_0, dim=128, n_heads=4, n_kv_heads=1, seed=2),
    "mha-q4_0-hd128": TinySpec(wtype=T.Q4_0, n_heads=2, n_kv_heads=2, head_dim=128, seed=3),
    "gqa-q4_1-tied-hd64": TinySpec(wtype=T.Q4_1, dim=128, n_heads=2, n_kv_heads=1, tied=True,
                                   embd_type=T.Q8_0, rope_base=100000.0, seed=4),
    "mha-q4_1-3layers": TinySpec(wtype=T.Q4_1, n_layers=3, ffn_dim=160, seed=5),
    # Types mixed tensor by tensor as llama-quantize's Q4_K_M does, with every activation format
    # in one fused group: Q|K|V needs Q8_K (Q4_K, Q6_K) and Q8_1 (Q5_1); gate|up Q8_0 (IQ4_NL)
    # and Q8_K (Q5_K). ffn_down's rows (ffn_dim 288) are not whole super-blocks: Q5_0.
    "gqa-q4_k_m-mix": TinySpec(wtype=T.Q4_K, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=288,
                               embd_type=T.Q2_K, seed=6, tensor_types=(
                                   ("attn_q", T.Q5_1), ("attn_v", T.Q6_K), ("output", T.Q6_K),
                                   ("ffn_gate", T.IQ4_NL), ("ffn_up", T.Q5_K),
                                   ("ffn_down", T.Q5_0), ("attn_output", T.Q3_K))),
    "mha-k-quants-tied": TinySpec(wtype=T.Q6_K, dim=256, n_heads=2, n_kv_heads=2, ffn_dim=512,
                                  tied=True, embd_type=T.Q4_K, seed=7, tensor_types=(
                                      ("attn_k", T.Q4_K), ("ffn_down", T.Q5_K),
                                      ("ffn_gate", T.Q3_K), ("ffn_up", T.Q2_K))),
}


def rtol_for(spec: TinySpec) -> float:
    return FLOAT_RTOL if spec.wtype in (T.F32, T.F16) else QUANT_RTOL


def max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=list(SPECS), ids=list(SPECS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    spec = SPECS[request.param]
    path = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model.gguf", spec)
    tokens = np.random.default_rng(spec.seed).integers(0, spec.n_vocab, 40).tolist()
    ref = ReferenceModel(path, n_ctx=64).forward(tokens, all_logits=True)
    return spec, path, tokens, ref


def test_prefill_matches_reference(tiny, isa: str) -> None:
    spec, path, tokens, ref = tiny
    m = alpaca_cpu.Model(path, n_ctx=64, n_threads=2)
    assert m.isa == isa
    got = m.forward(tokens, all_logits=True)
    assert got.shape == (len(tokens), spec.n_vocab) and got.dtype == np.float32
    assert max_rel(got, ref) <= rtol_for(spec)
    last = m.forward(tokens)  # rewinds to 0 and returns only the last row
    assert last.shape == (spec.n_vocab,)
    assert max_rel(last, got[-1]) <= SAME_ENGINE_RTOL


def test_decode_token_by_token_matches_prefill(tiny, isa: str) -> None:
    spec, path, tokens, ref = tiny
    m = alpaca_cpu.Model(path, n_ctx=64, n_threads=2)
    prefill = m.forward(tokens, all_logits=True)
    steps = np.stack([m.forward([t], start_pos=i) for i, t in enumerate(tokens)])
    assert max_rel(steps, prefill) <= SAME_ENGINE_RTOL
    assert max_rel(steps, ref) <= rtol_for(spec)


def test_one_thread_equals_many(tiny) -> None:
    _, path, tokens, _ = tiny
    one = alpaca_cpu.Model(path, n_ctx=64, n_threads=1).forward(tokens, all_logits=True)
    three = alpaca_cpu.Model(path, n_ctx=64, n_threads=3).forward(tokens, all_logits=True)
    assert max_rel(three, one) <= SAME_ENGINE_RTOL


def test_rewind_overwrites_later_positions(tiny) -> None:
    spec, path, tokens, ref = tiny
    m = alpaca_cpu.Model(path, n_ctx=64, n_threads=2)
    m.forward(tokens[:30])
    m.forward([(t + 1) % spec.n_vocab for t in tokens[20:30]], start_pos=20)  # a different branch
    again = m.forward(tokens[20:], start_pos=20, all_logits=True)
    assert max_rel(again, ref[20:]) <= rtol_for(spec)


def test_f32_kv_cache_matches_reference(tiny) -> None:
    spec, path, tokens, ref = tiny
    got = alpaca_cpu.Model(path, n_ctx=64, kv_type="f32").forward(tokens, all_logits=True)
    assert max_rel(got, ref) <= rtol_for(spec)


def test_long_prefill_spans_internal_batches(tmp_path: Path) -> None:
    """Inputs longer than the native batch (512) are split; logits must not notice."""
    spec = TinySpec(context_length=1024, n_layers=1, seed=9)
    path = write_tiny_model(tmp_path / "m.gguf", spec)
    tokens = np.random.default_rng(9).integers(0, spec.n_vocab, 600)
    m = alpaca_cpu.Model(path, n_ctx=700)
    whole = m.forward(tokens, all_logits=True)
    tail = ReferenceModel(path, n_ctx=700).forward(tokens, all_logits=True)
    assert max_rel(whole, tail) <= FLOAT_RTOL
    assert max_rel(m.forward(tokens), whole[-1]) <= SAME_ENGINE_RTOL


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_decode_over_long_context_equals_prefill(tmp_path: Path, isa: str, kv_type: str) -> None:
    """Attention takes each query's positions in parts of 256 at fixed boundaries and folds the
    parts' softmaxes in order (Model::attention); a decode step spreads its parts over threads,
    a prefill folds them per block of queries. Same parts, same folds: the logits of a token
    are the same bits whether it is prefilled, decoded or recomputed, and whatever the thread
    count (a cached prompt re-evaluated from its last token must not change a greedy answer)."""
    spec = TinySpec(context_length=1024, n_layers=2, n_heads=4, n_kv_heads=2, seed=11)
    path = write_tiny_model(tmp_path / "m.gguf", spec)
    tokens = np.random.default_rng(11).integers(0, spec.n_vocab, 620)
    m = alpaca_cpu.Model(path, n_ctx=640, n_threads=2, kv_type=kv_type)
    assert m.isa == isa
    # The whole context in one call (engine batches of 512, then 108), blocks of 16 tokens.
    whole = m.forward(tokens, all_logits=True)
    m.forward(tokens[:600])
    # Decode steps at 600+: 3 parts each, spread over tasks and merged afterwards.
    steps = np.stack([m.forward([t], start_pos=600 + i) for i, t in enumerate(tokens[600:])])
    np.testing.assert_array_equal(steps, whole[600:])
    # Chunks starting anywhere: blocks of queries cut at other places.
    batch = m.forward(tokens[597:610], start_pos=597, all_logits=True)
    np.testing.assert_array_equal(batch, whole[597:610])
    one_thread = alpaca_cpu.Model(path, n_ctx=640, n_threads=1, kv_type=kv_type)
    np.testing.assert_array_equal(one_thread.forward(tokens, all_logits=True), whole)
    ref = ReferenceModel(path, n_ctx=640).forward(tokens, all_logits=True)
    assert max_rel(steps, ref[600:]) <= FLOAT_RTOL


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> alpaca_cpu.Model:
    path = write_tiny_model(tmp_path_factory.mktemp("small") / "m.gguf", TinySpec())
    return alpaca_cpu.Model(path, n_ctx=16)


@pytest.mark.parametrize(
    ("tokens", "start_pos", "message"),
    [
        ([], 0, "non-empty"),
        ([1, 2], 15, "do not fit the context of 16"),
        ([1], -1, "do not fit"),
        ([1, 320], 0, "token id 320 at index 1"),
        ([-5], 0, "token id -5"),
        ([1.5], 0, "integer ids"),
    ],
)
def test_bad_forward_arguments_raise_value_error(small_model, tokens, start_pos, message) -> None:
    with pytest.raises(ValueError, match=message):
        small_model.forward(tokens, start_pos=start_pos)
    # The model stays usable.
    assert np.isfinite(small_model.forward([1, 2, 3])).all()


def test_config_and_properties(small_model) -> None:
    c = small_model.config
    assert (c.n_vocab, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == (320, 64, 2, 4, 4, 16)
    assert not c.tied_embeddings and c.n_rot == 16 and c.rope_base == 10000.0
    assert small_model.n_ctx == 16 and small_model.n_threads >= 1
    assert small_model.isa in alpaca_cpu.available_isas()


def test_bad_constructor_arguments(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", TinySpec())
    for kwargs, msg in [({"n_ctx": 0}, "n_ctx"), ({"n_threads": 0}, "n_threads"),
                        ({"kv_type": "q8"}, "kv_type")]:
        with pytest.raises(ValueError, match=msg):
            alpaca_cpu.Model(path, **kwargs)


def test_native_core_refuses_shapes_that_disagree_with_the_hyperparameters(tmp_path: Path) -> None:
    """The second line of defence: _core.Model checks shapes even if Python did not."""
    from alpaca_cpu import _core
    from alpaca_cpu.gguf_file import open_model_file

    mf = open_model_file(write_tiny_model(tmp_path / "m.gguf", TinySpec()))
    tensors = {n: (int(t.type), t.rows, t.cols, t.data) for n, t in mf.tensors.items()}
    hparams = mf.config.to_hparams() | {"n_vocab": mf.config.n_vocab + 1}
    with pytest.raises(ValueError, match="token_embd.weight has shape"):
        _core.Model(hparams, tensors, 16, 1)
