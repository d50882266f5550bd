"""llama-cpp-python's constructor arguments (honoured, ignored or refused by name), and
Llama.embed / create_embedding."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from test_api_inputs import write_tiny_llama

import alpaca_cpu.llama_compat as compat
from alpaca_cpu.llama import Llama

# mean of float32 hidden states in float64, normalised: only float32 rounding remains
EMBED_TOL = 1e-6


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=3)


@pytest.fixture(scope="module")
def answer(tiny_path: Path) -> str:
    return Llama(tiny_path, n_ctx=64, n_threads=1)("the llama", max_tokens=8,
                                                    temperature=0)["choices"][0]["text"]


def test_what_llama_cpp_python_users_pass_runs_the_same(tiny_path: Path, answer: str) -> None:
    llm = Llama(tiny_path, n_ctx=64, n_threads=1, n_gpu_layers=-1, n_batch=32, n_ubatch=32,
                n_threads_batch=1, use_mmap=True, use_mlock=False, logits_all=True,
                embedding=True, flash_attn=False, offload_kqv=True, verbose=False,
                rope_freq_base=0.0, chat_handler=None, type_k=0, type_v=0, last_n_tokens_size=64)
    assert llm("the llama", max_tokens=8, temperature=0)["choices"][0]["text"] == answer
    # type_k / type_v = 0 (GGML F32) is honoured: an F32 KV cache, twice the F16 one's size.
    f16 = Llama(tiny_path, n_ctx=64, n_threads=1)
    assert llm.model._core.kv_cache_bytes == 2 * f16.model._core.kv_cache_bytes


def test_a_gpu_layer_count_warns_once(tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "_warned_gpu_layers", False)
    with pytest.warns(UserWarning, match="n_gpu_layers = 35 ignored"):
        Llama(tiny_path, n_ctx=32, n_threads=1, n_gpu_layers=35)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Llama(tiny_path, n_ctx=32, n_threads=1, n_gpu_layers=35)  # no second warning


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"chat_handler": object()}, "chat_handler"),
    ({"draft_model": object()}, "draft_model"),
    ({"lora_path": "x.gguf"}, "lora_path"),
    ({"rope_freq_base": 50000.0}, "rope_freq_base"),
    ({"type_k": 8, "type_v": 8}, "type_k"),
    ({"no_such_argument": 1}, "no_such_argument"),
])
def test_what_we_cannot_honour_is_refused_by_name(tiny_path: Path, kwargs: dict,
                                                  match: str) -> None:
    with pytest.raises(TypeError, match=match):
        Llama(tiny_path, n_ctx=32, n_threads=1, **kwargs)


def test_embed(tiny_path: Path, answer: str) -> None:
    llm = Llama(tiny_path, n_ctx=64, n_threads=1)
    llm("the llama", max_tokens=8, temperature=0)  # the cache holds a conversation
    one = np.array(llm.embed("a tiny llama"))
    both, count = llm.embed(["a tiny llama", "the llama"], return_count=True)
    assert one.shape == (llm.model.config.dim,)
    np.testing.assert_array_equal(one, both[0])
    ids = llm.tokenize(b"a tiny llama")
    assert count == len(ids) + len(llm.tokenize(b"the llama"))
    # The mean over tokens of the final normed hidden state, computed by hand.
    hidden = llm.model.forward_batch(ids, [0] * len(ids), range(len(ids)),
                                     want=np.ones(len(ids), bool), hidden=True)
    np.testing.assert_allclose(one, hidden.mean(axis=0), rtol=0, atol=EMBED_TOL)
    unit = np.array(llm.embed("a tiny llama", normalize=True))
    np.testing.assert_allclose(unit, one / np.linalg.norm(one), atol=EMBED_TOL)
    out = llm.create_embedding(["a tiny llama", "the llama"])
    assert out["object"] == "list" and out["usage"]["prompt_tokens"] == count
    np.testing.assert_allclose(out["data"][0]["embedding"], unit, atol=EMBED_TOL)
    # Generation afterwards is unchanged (the cache was reset, not reused wrongly).
    assert llm("the llama", max_tokens=8, temperature=0)["choices"][0]["text"] == answer
    with pytest.raises(ValueError, match="more than the context"):
        llm.embed("llama " * 100, truncate=False)
    assert len(llm.embed("llama " * 100)) == llm.model.config.dim  # truncated to n_ctx
