"""alpaca-server through the real `openai` SDK against a real uvicorn on 127.0.0.1.

A tiny random model with a byte-fallback vocabulary (test_api_inputs.write_tiny_llama): its
text is gibberish but fully deterministic, so every greedy answer of the server can be
compared with the library's `Llama` answering the same request alone.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from server_util import running_server
from test_api_inputs import write_tiny_llama

from alpaca_cpu.llama import Llama

N_CTX = 1100
LONG = 1000  # max_tokens of a stream that is dropped early
PARALLEL = 4
EOS = 2  # </s> in write_tiny_llama's vocabulary
NO_EOS = {str(EOS): -100}  # logit_bias that keeps a stream going until max_tokens
# Embeddings come back L2-normalised, through float32 (base64, the SDK's default).
NORM_TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=9)


@pytest.fixture(scope="module")
def reference(tiny_path: Path) -> Llama:
    """The library answering one request at a time: what the server must reproduce."""
    return Llama(tiny_path, n_ctx=N_CTX, n_threads=2, chat_format="chatml")


@pytest.fixture(scope="module")
def server(tiny_path: Path):
    llama = Llama(tiny_path, n_ctx=N_CTX, n_threads=2, chat_format="chatml",
                  n_seq_max=PARALLEL)
    with running_server(llama, max_tokens_limit=4096, max_body_bytes=64 << 10) as s:
        yield s


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0) as c:
        yield c


def chat_messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "you are a llama"},
            {"role": "user", "content": f"tell me about llama number {i}" + " and" * (i % 5)}]


def test_chat_and_completion_equal_the_library(client: openai.OpenAI, reference: Llama) -> None:
    msgs = chat_messages(1)
    got = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12,
                                         temperature=0)
    want = reference.create_chat_completion(msgs, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert got.usage.prompt_tokens == len(reference.render_chat(msgs))
    assert got.usage.completion_tokens == want["usage"]["completion_tokens"]
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens

    got = client.completions.create(model="tiny", prompt="the llama is", max_tokens=10,
                                    temperature=0, logit_bias=NO_EOS)
    want = reference("the llama is", max_tokens=10, temperature=0, logit_bias={EOS: -100})
    assert got.choices[0].text == want["choices"][0]["text"]
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 10
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]


def test_streams_equal_the_whole_answer(client: openai.OpenAI) -> None:
    msgs = chat_messages(2)
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16,
                                           temperature=0, logit_bias=NO_EOS)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=16, temperature=0, logit_bias=NO_EOS,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    whole = client.completions.create(model="tiny", prompt="a tiny llama", max_tokens=9,
                                      temperature=0, logit_bias=NO_EOS, logprobs=2)
    chunks = list(client.completions.create(model="tiny", prompt="a tiny llama", max_tokens=9,
                                            temperature=0, logit_bias=NO_EOS, stream=True,
                                            logprobs=2))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    lp = whole.choices[0].logprobs
    # (top_logprobs is keyed by token text: byte tokens that print alike share an entry)
    assert len(lp.tokens) == 9 and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert [c.choices[0].logprobs.token_logprobs[0] for c in chunks
            if c.choices[0].logprobs] == pytest.approx(lp.token_logprobs)


def test_chat_logprobs(client: openai.OpenAI, reference: Llama) -> None:
    msgs = chat_messages(4)
    got = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6,
                                         temperature=0, logit_bias=NO_EOS, logprobs=True,
                                         top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert "".join(c.token for c in content) == got.choices[0].message.content
    want = reference(reference.render_chat(msgs), max_tokens=6, temperature=0, logprobs=3,
                     logit_bias={EOS: -100})["choices"][0]["logprobs"]
    assert [c.logprob for c in content] == pytest.approx(want["token_logprobs"], abs=1e-5)
    for c in content:
        assert 1 <= len(c.top_logprobs) <= 3 and bytes(c.bytes).decode() == c.token
    streamed = [c.choices[0].logprobs.content[0].logprob for c in client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=6, temperature=0, logit_bias=NO_EOS,
        logprobs=True, stream=True) if c.choices and c.choices[0].logprobs]
    assert streamed == pytest.approx([c.logprob for c in content], abs=1e-5)


def test_stop_strings_never_leak_in_a_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="the", max_tokens=30, temperature=0,
                                     logit_bias=NO_EOS).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # three characters from the middle
    assert len(stop) == 3
    chunks = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="the", max_tokens=30, temperature=0, logit_bias=NO_EOS,
        stop=[stop], stream=True)]
    streamed = "".join(chunks)
    assert streamed == full[: full.index(stop)]
    assert stop not in streamed


def test_batching_changes_nothing(server, reference: Llama) -> None:
    """8 greedy requests at once (different prompts and lengths, started at different times,
    half streamed) give exactly what each gives alone."""
    jobs = [(i, 6 + 3 * i) for i in range(8)]
    alone = [reference.create_chat_completion(chat_messages(i), max_tokens=n, temperature=0)
             ["choices"][0]["message"]["content"] for i, n in jobs]

    async def one(aclient: openai.AsyncOpenAI, i: int, n: int) -> str:
        await asyncio.sleep(0.02 * i)
        if i % 2:
            stream = await aclient.chat.completions.create(
                model="tiny", messages=chat_messages(i), max_tokens=n, temperature=0,
                stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])
        r = await aclient.chat.completions.create(model="tiny", messages=chat_messages(i),
                                                  max_tokens=n, temperature=0)
        return r.choices[0].message.content

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0) as c:
            return await asyncio.gather(*(one(c, i, n) for i, n in jobs))

    steps_before = server.scheduler.stats.steps
    assert asyncio.run(together()) == alone
    # Fewer engine steps than tokens generated: the requests really were batched.
    assert server.scheduler.stats.steps - steps_before < sum(n for _, n in jobs)


def test_a_cancelled_stream_frees_its_slot(server, client: openai.OpenAI) -> None:
    server.wait_idle()
    stats = server.scheduler.stats
    cancelled, generated = stats.cancelled, stats.generated_tokens
    expected = client.completions.create(model="tiny", prompt="in the", max_tokens=30,
                                         temperature=0, logit_bias=NO_EOS).choices[0].text
    # Every slot busy; the long one is dropped after its first chunks.
    streams = [client.completions.create(model="tiny", prompt="in the", max_tokens=30,
                                         temperature=0, logit_bias=NO_EOS, stream=True)
               for _ in range(PARALLEL - 1)]
    dropped = client.completions.create(model="tiny", prompt="is a", max_tokens=LONG,
                                        logit_bias=NO_EOS, stream=True)
    chunks = iter(dropped)
    next(chunks)
    next(chunks)
    dropped.close()
    # The other streams are unaffected.
    for s in streams:
        assert "".join(c.choices[0].text for c in s) == expected
    server.wait_idle()
    assert stats.cancelled == cancelled + 1
    # The dropped request stopped long before its max_tokens, and its slot serves again.
    assert stats.generated_tokens - generated < 4 * 30 + LONG // 2
    assert client.completions.create(model="tiny", prompt="is", max_tokens=2).usage


def test_a_multi_turn_chat_reuses_the_cached_prefix(server, client: openai.OpenAI) -> None:
    server.wait_idle()
    msgs = chat_messages(3)
    first = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8,
                                           temperature=0)
    stats = server.scheduler.stats
    evaluated, prompted = stats.evaluated_tokens, stats.prompt_tokens
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "and then"}]
    second = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8,
                                            temperature=0)
    assert stats.prompt_tokens - prompted == second.usage.prompt_tokens
    # Only the tokens after the first turn's prompt were computed.
    assert stats.evaluated_tokens - evaluated <= \
        second.usage.prompt_tokens - first.usage.prompt_tokens


def test_embeddings(client: openai.OpenAI, reference: Llama) -> None:
    one = client.embeddings.create(model="tiny", input="a llama")
    assert len(one.data) == 1 and one.usage.prompt_tokens > 0
    v = np.array(one.data[0].embedding)
    assert v.shape == (reference.model.config.dim,)
    assert abs(np.linalg.norm(v) - 1) <= NORM_TOL
    many = client.embeddings.create(model="tiny", input=["a llama", "the tiny llama is"],
                                    encoding_format="float")
    assert [d.index for d in many.data] == [0, 1]
    lib = reference.create_embedding(["a llama", "the tiny llama is"])
    for got, want in zip(many.data, lib["data"]):
        np.testing.assert_allclose(got.embedding, want["embedding"], atol=NORM_TOL)
    np.testing.assert_allclose(v, lib["data"][0]["embedding"], atol=NORM_TOL)
    assert many.usage.prompt_tokens == lib["usage"]["prompt_tokens"]
    assert not np.allclose(many.data[0].embedding, many.data[1].embedding)


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(("body", "status", "pattern"), [
    ({"model": "gpt-4", "prompt": "hi"}, 404, "gpt-4"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "llama " * 300}, 400, "context"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
])
def test_bad_completion_requests(server, body: dict, status: int, pattern: str) -> None:
    r = httpx.post(server.v1 + "/completions", json=body)
    assert r.status_code == status
    assert re.search(pattern, error_of(r)["message"])


@pytest.mark.parametrize(("messages", "pattern"), [
    ([{"role": "wizard", "content": "hi"}], r"messages\[0\]\.role.*wizard"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\]\.content\[0\].*image"),
    ([], "messages"),
])
def test_bad_chat_requests(server, messages: list, pattern: str) -> None:
    r = httpx.post(server.v1 + "/chat/completions", json={"model": "tiny", "messages": messages})
    assert r.status_code == 400
    assert re.search(pattern, error_of(r)["message"])


def test_text_parts_and_max_completion_tokens(client: openai.OpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "tell me"},
                                          {"type": "text", "text": "about llamas"}]}]
    plain = [{"role": "user", "content": "tell me\nabout llamas"}]
    a = client.chat.completions.create(model="tiny", messages=parts, max_completion_tokens=5,
                                       temperature=0, logit_bias=NO_EOS)
    b = client.chat.completions.create(model="tiny", messages=plain, max_tokens=5,
                                       temperature=0, logit_bias=NO_EOS)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == 5


def test_malformed_bodies(server) -> None:
    url = server.v1 + "/completions"
    r = httpx.post(url, content=b'{"model": "tiny", "prompt": ', headers={
        "content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
    r = httpx.post(url, content=b'{"model": "tiny", "prompt": "\xff\xfe"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    error_of(r)
    r = httpx.post(url, content=b"x" * (100 << 10), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in error_of(r)["message"]
    r = httpx.get(server.v1 + "/nothing-here")
    assert r.status_code == 404
    error_of(r)


def test_sdk_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="llama " * 300)
    assert e.value.code == "context_length_exceeded"


def test_models_health_and_metrics(server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    before = _metric(server, 'alpaca_requests_total{endpoint="/v1/completions",status="200"}')
    generated = _metric(server, "alpaca_generated_tokens_total")
    for _ in range(3):
        client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=0,
                                  logit_bias=NO_EOS)
    assert _metric(server, 'alpaca_requests_total{endpoint="/v1/completions",status="200"}') \
        == before + 3
    assert _metric(server, "alpaca_generated_tokens_total") == generated + 12
    assert _metric(server, "alpaca_slots") == PARALLEL


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_api_key(tiny_path: Path) -> None:
    llama = Llama(tiny_path, n_ctx=64, n_threads=1, chat_format="chatml")
    with running_server(llama, api_key="s3cret") as s:
        assert httpx.get(s.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(s.v1 + "/models", headers=headers)
            assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/metrics").status_code == 401
        with openai.OpenAI(base_url=s.v1, api_key="wrong", max_retries=0) as bad, \
                pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with openai.OpenAI(base_url=s.v1, api_key="s3cret", max_retries=0) as ok:
            assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).usage


def test_a_full_queue_answers_503(tiny_path: Path) -> None:
    llama = Llama(tiny_path, n_ctx=N_CTX, n_threads=1, chat_format="chatml")
    with running_server(llama, max_queue=1) as s, \
            openai.OpenAI(base_url=s.v1, api_key="x", max_retries=0) as c:
        running = c.completions.create(model="tiny", prompt="a", max_tokens=LONG,
                                       logit_bias=NO_EOS, stream=True)
        next(iter(running))  # it holds the only slot
        queued = threading.Thread(target=lambda: c.completions.create(
            model="tiny", prompt="b", max_tokens=1), daemon=True)
        queued.start()
        deadline = time.monotonic() + 5
        while s.scheduler.queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(s.v1 + "/completions", json={"model": "tiny", "prompt": "c"})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert error_of(r)["code"] == "overloaded"
        running.close()
        queued.join(10)
        assert not queued.is_alive()


@pytest.mark.real_model
@pytest.mark.slow  # ~7 s on 2 cores
def test_smollm2_concurrent_chats_equal_the_library_alone(smollm2_path: Path) -> None:
    """The real model (quantized weights and activations): 4 chats at once through the
    server, each exactly what the library answers alone."""
    questions = ["Name three primary colors.", "What is the capital of France?",
                 "Give me one tip for better sleep.", "Say hello in Spanish."]
    lib = Llama(smollm2_path, n_ctx=512, n_threads=2)
    alone = [lib.create_chat_completion([{"role": "user", "content": q}], temperature=0,
                                        max_tokens=24)["choices"][0]["message"]["content"]
             for q in questions]
    llama = Llama(smollm2_path, n_ctx=512, n_threads=2, n_seq_max=4)
    with running_server(llama, model_id="smollm2") as s:
        async def ask(c: openai.AsyncOpenAI, q: str) -> str:
            r = await c.chat.completions.create(model="smollm2", temperature=0, max_tokens=24,
                                                messages=[{"role": "user", "content": q}])
            return r.choices[0].message.content

        async def together() -> list[str]:
            async with openai.AsyncOpenAI(base_url=s.v1, api_key="x", max_retries=0) as c:
                return await asyncio.gather(*(ask(c, q) for q in questions))
        assert asyncio.run(together()) == alone
