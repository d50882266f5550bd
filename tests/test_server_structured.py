"""Structured output through alpaca-server: tools, response_format and grammars, through the real
`openai` SDK against a real uvicorn on 127.0.0.1 serving SmolLM2.

Every answer is greedy (temperature 0), so a streamed answer must equal the whole one and an
unconstrained answer must not change when constrained requests share its batch. Outputs are
checked by independent parsers: `jsonschema`, `json` and regular expressions written here.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from server_util import running_server

from alpaca_cpu.llama import Llama
from alpaca_cpu.structured import Constraint
from alpaca_cpu.tool_calls import request_constraint

pytestmark = pytest.mark.real_model

MODEL = "smollm2"
MAX_TOKENS_CALL = 48  # a whole call to either tool below takes ~30 tokens on SmolLM2
MAX_TOKENS_DOC = 40  # the small documents below take < 25
N_DIGITS = 48  # the batch test's constrained documents: 3x the free answer's 16 tokens or more

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 20},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "description": "The weather in a city"}},
         {"type": "function", "function": {"name": "add", "parameters": ADD,
                                           "description": "a + b"}}]
SCHEMA_OF = {"get_weather": WEATHER, "add": ADD}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0,
                                                   "maximum": 150}},
          "required": ["name", "age"]}
DATE_GBNF = 'root ::= year "-" month "-" day\nyear ::= [12] [0-9] [0-9] [0-9]\n' \
            'month ::= "0" [1-9] | "1" [0-2]\nday ::= "0" [1-9] | [12] [0-9] | "3" [01]'
DATE = re.compile(r"[12]\d{3}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])")


@pytest.fixture(scope="module")
def llama(smollm2_path) -> Llama:
    return Llama(smollm2_path, n_ctx=1024, n_threads=2, n_seq_max=4)


@pytest.fixture(scope="module")
def server(llama: Llama):
    with running_server(llama, model_id=MODEL) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0) as c:
        yield c


def _check_call(call: Any, name: str | None = None) -> dict[str, Any]:
    """An OpenAI tool call whose arguments validate against its tool's parameters."""
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in SCHEMA_OF
    if name is not None:
        assert call.function.name == name
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMA_OF[call.function.name])
    return arguments


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_a_call_is_forced(client: openai.OpenAI, choice: Any) -> None:
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS,
                                       tool_choice=choice, max_tokens=MAX_TOKENS_CALL,
                                       temperature=0, parallel_tool_calls=False)
    out = r.choices[0]
    assert out.finish_reason == "tool_calls", out
    assert out.message.content is None and out.message.role == "assistant"
    (call,) = out.message.tool_calls
    _check_call(call, "add" if isinstance(choice, dict) else None)


def test_tool_choice_none_and_auto(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS,
                                       tool_choice="none", max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS,
                                       tool_choice="auto", max_tokens=MAX_TOKENS_CALL,
                                       temperature=0)
    out = r.choices[0]
    if out.message.tool_calls:  # "auto": a valid call, or text that does not start like one
        assert out.finish_reason == "tool_calls" and out.message.content is None
        _check_call(out.message.tool_calls[0])
    else:
        assert out.message.content and not out.message.content.lstrip().startswith("{")


def _warm(client: openai.OpenAI, **request: Any) -> None:
    """Leave the request's prompt cached in a slot, so that the next identical requests all
    reuse it (the last prompt token recomputed alone): a prompt prefilled whole can give
    slightly different logits for its last token than the one-token path, enough to flip a
    near-tie between two greedy choices (seen: get_weather against add)."""
    client.chat.completions.create(**{**request, "max_tokens": 1})


def test_streamed_call_equals_the_whole_one(client: openai.OpenAI) -> None:
    _warm(client, model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required")
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS,
                                           tool_choice="required", max_tokens=MAX_TOKENS_CALL,
                                           temperature=0).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
        max_tokens=MAX_TOKENS_CALL, temperature=0, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    # OpenAI's shape: index, id, type and name first with arguments "", then argument pieces.
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == whole.function.name and first.function.arguments == ""
    assert rest and all(d.index == 0 and d.id is None and d.function.name is None
                        and d.function.arguments for d in rest)
    arguments = "".join(d.function.arguments for d in rest)
    assert arguments == whole.function.arguments
    assert not any(c.choices[0].delta.content for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    jsonschema.validate(json.loads(arguments), SCHEMA_OF[first.function.name])


def test_tool_result_round_trip(client: openai.OpenAI, llama: Llama) -> None:
    """The assistant's call and the tool's result go back through the chat template: the
    prompt the server evaluated is the library's rendering of them, result included."""
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS,
                                       tool_choice="required", max_tokens=MAX_TOKENS_CALL,
                                       temperature=0)
    call = r.choices[0].message.tool_calls[0]
    result = "18 degrees and raining"
    messages = [*QUESTION, {"role": "assistant", "content": None,
                            "tool_calls": [call.model_dump(exclude_none=True)]},
                {"role": "tool", "tool_call_id": call.id, "content": result}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                       tool_choice="none", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None
    _, plan = request_constraint(None, TOOLS, "none", getattr(llama._chat, "template", None))
    assert plan is not None
    rendered = plan.prompt_messages(messages)
    prompt = llama.detokenize(llama.render_chat(rendered)).decode()
    assert result in prompt and call.function.name in prompt
    assert r.usage.prompt_tokens == len(llama.render_chat(rendered))


def test_response_format_json_schema_and_json_object(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=ask, response_format=fmt,
                                       max_tokens=MAX_TOKENS_DOC, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    doc = json.loads(r.choices[0].message.content)
    jsonschema.validate(doc, PERSON)
    assert set(doc) == {"name", "age"}  # strict: no property the schema does not list
    chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=ask, response_format=fmt, max_tokens=MAX_TOKENS_DOC,
        temperature=0, stream=True)]
    assert "".join(chunks) == r.choices[0].message.content  # each chunk extends a prefix

    # json_object leaves the keys free, and a 135M model may repeat one until max_tokens (a
    # valid prefix): every answer that stopped parses, and at least one of three stops.
    stopped = 0
    for question in ("A JSON object with a person's name and age.", "Describe a person as JSON.",
                     "Give the name and age of a person as a JSON object."):
        ask = [{"role": "user", "content": question}]
        r = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=MAX_TOKENS_DOC,
                                           response_format={"type": "json_object"},
                                           temperature=0)
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
            stopped += 1
    assert stopped >= 1

    # max_tokens reached mid-document: "length", and the text is the start of the document
    whole = client.chat.completions.create(model=MODEL, messages=ask, response_format=fmt,
                                           max_tokens=MAX_TOKENS_DOC, temperature=0)
    short = client.chat.completions.create(model=MODEL, messages=ask, response_format=fmt,
                                           max_tokens=3, temperature=0).choices[0]
    assert short.finish_reason == "length"
    assert whole.choices[0].message.content.startswith(short.message.content)
    with pytest.raises(json.JSONDecodeError):
        json.loads(short.message.content)


def test_completions_grammar_and_json_schema(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The first moon landing was on ",
                                  max_tokens=16, temperature=0, extra_body={"grammar": DATE_GBNF})
    assert r.choices[0].finish_reason == "stop"
    assert DATE.fullmatch(r.choices[0].text), r.choices[0].text
    r = client.completions.create(model=MODEL, prompt="A person as JSON: ", temperature=0,
                                  max_tokens=MAX_TOKENS_DOC, extra_body={"json_schema": PERSON})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    r = client.completions.create(model=MODEL, prompt="A person as JSON: ", temperature=0,
                                  max_tokens=MAX_TOKENS_DOC, extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)


@pytest.mark.parametrize(("path", "body", "param", "message"), [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, "response_format", "strin"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "contains": {"type": "string"}}}}},
     "response_format", "unsupported keyword.*contains"),
    ("chat", {"response_format": {"type": "yaml"}}, "response_format", "yaml"),
    ("chat", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}},
     "tool_choice", "'mul'.*not in tools"),
    ("chat", {"tool_choice": "required"}, "tool_choice", "no tools"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integr"}}}}}]}, "tools", "integr"),
    ("chat", {"grammar": 'root ::= "a" |\n  ("b" '}, "grammar", "line 2, column 8"),
    ("completions", {"grammar": 'root ::= "a" |\n  ("b" '}, "grammar", "line 2, column 8"),
    ("completions", {"grammar": 'root ::= "a" root'}, "grammar", "accepts nothing"),
    ("completions", {"json_schema": {"type": "object", "patternProperties": {"[": {}}}},
     "json_schema", r"\["),
    ("completions", {"grammar": 'root ::= "a"', "json_schema": {}}, "json_schema", "send one"),
])
def test_bad_structure_is_a_400_before_any_slot(server, path: str, body: dict, param: str,
                                                message: str) -> None:
    server.wait_idle()
    stats = server.scheduler.stats
    before = (stats.prompt_tokens, stats.steps)
    base = ({"messages": QUESTION} if path == "chat" else {"prompt": "x"})
    r = httpx.post(f"{server.v1}/{path.replace('chat', 'chat/completions')}",
                   json={"model": MODEL, **base, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert re.search(message, error["message"]), error["message"]
    assert (stats.prompt_tokens, stats.steps) == before  # never queued, no slot taken


def test_sdk_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS,
                                       tool_choice={"type": "function",
                                                    "function": {"name": "mul"}})
    assert e.value.body["param"] == "tool_choice"


def test_constrained_neighbours_change_nothing(server, smollm2_path, monkeypatch) -> None:
    """A greedy free answer beside constrained requests in the same batch is the library's
    answer alone; the constrained ones keep to their grammar, their masks advanced on the
    scheduler's mask worker (beside the forward pass), not on its own thread. (The free
    question is asked of this server once only: its prompt is prefilled whole, as the
    library's is; see _warm.)"""
    question = [{"role": "user", "content": "Name three colors of the rainbow."}]
    free = {"model": MODEL, "messages": question, "max_tokens": 16, "temperature": 0}
    lib = Llama(smollm2_path, n_ctx=1024, n_threads=2)
    alone = lib.create_chat_completion(question, max_tokens=16, temperature=0)[
        "choices"][0]["message"]["content"]
    threads: set[str] = set()
    advance = Constraint.advance

    def spy(self: Constraint, token: int) -> None:
        threads.add(threading.current_thread().name)
        advance(self, token)
    monkeypatch.setattr(Constraint, "advance", spy)
    digits = f"root ::= [0-9]{{{N_DIGITS}}}"

    async def together() -> tuple[str, list[str], list[bool]]:
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0) as c:
            streams = [await c.completions.create(
                model=MODEL, prompt=f"Count to {n}: ", max_tokens=N_DIGITS, temperature=0,
                stream=True, extra_body={"grammar": digits}) for n in (10, 20, 30)]
            firsts = [await s.__anext__() for s in streams]  # all three are decoding now

            async def rest(s: Any, first: Any) -> str:
                return first.choices[0].text + "".join([ch.choices[0].text async for ch in s])
            tasks = [asyncio.create_task(rest(s, f)) for s, f in zip(streams, firsts)]
            r = await c.chat.completions.create(**free)
            overlapped = [not t.done() for t in tasks]  # still decoding when it was answered
            return r.choices[0].message.content, await asyncio.gather(*tasks), overlapped

    beside, docs, overlapped = asyncio.run(together())
    assert beside == alone
    assert all(re.fullmatch(rf"[0-9]{{{N_DIGITS}}}", d) for d in docs), docs
    assert all(overlapped), "the constrained streams ended before the free request: no overlap"
    # the masks ran on the mask thread beside the forward pass where a core is spare, else on
    # the scheduler's own thread before it (structured.spare_core); never on a handler's thread
    where = "alpaca-mask" if server.scheduler.mask_beside else "alpaca-scheduler"
    assert threads and all(name.startswith(where) for name in threads), (where, threads)
