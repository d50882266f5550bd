"""Constrained decoding on SmolLM2: JSON Schema, JSON mode, GBNF, tool calls, and bad input.

Validity is checked by independent parsers: `jsonschema` for JSON, small parsers written here for
the GBNF grammars. The validity run (one generation per schema, 40 in all, and the unconstrained
failure rate for contrast) is marked slow. With 200 generations (5 per schema; measured once on
2026-12-07 before it was cut to fit the suite's 3 minutes) 191 finished with "stop", all valid,
and 40 of 40 unconstrained outputs were invalid.
"""

from __future__ import annotations

import json
import re
import time
from datetime import date
from typing import Any

import jsonschema
import numpy as np
import pytest

from alpaca_cpu.llama import Llama
from alpaca_cpu.structured import Constraint, Grammar, GrammarError, engine_token_bytes
from alpaca_cpu.tool_calls import request_constraint

# A hostile schema must be refused or compiled within this long (the bound in structured.LIMITS
# is ~40-140 ms of lexer work; the rest is slack for a loaded 2-core CI machine).
HOSTILE_SECONDS = 10.0
MAX_TOKENS_DOC = 96  # enough for every small document below; "length" results are not counted


@pytest.fixture(scope="module")
def llm(smollm2_path) -> Llama:
    return Llama(smollm2_path, n_ctx=1024, seed=7)


def _ask(what: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Reply with JSON only: {what}"}]


def _obj(props: dict[str, Any], required: list[str] | None = None, *,
         extra: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "required": list(props) if required is None else required}
    if not extra:
        out["additionalProperties"] = False
    return out


STR = {"type": "string", "maxLength": 24}
# 40 schemas: nested objects, arrays with min/max items, enums, anyOf, patterns, number ranges,
# required/optional properties, additionalProperties false.
SCHEMAS: list[dict[str, Any]] = [
    _obj({"name": STR, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    _obj({"city": STR, "country": STR}, ["city"]),
    _obj({"ok": {"type": "boolean"}}),
    _obj({"color": {"enum": ["red", "green", "blue"]}}),
    _obj({"tags": {"type": "array", "items": STR, "minItems": 1, "maxItems": 3}}),
    _obj({"point": _obj({"x": {"type": "number"}, "y": {"type": "number"}})}),
    _obj({"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}}),
    _obj({"score": {"type": "number", "minimum": 0, "maximum": 1}}),
    _obj({"value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 10}]}}),
    _obj({"when": {"type": "string", "format": "date"}}),
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
     "minItems": 2, "maxItems": 4},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 10, "maximum": 99},
    {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
    _obj({"user": _obj({"name": STR, "email": STR}, ["name"]), "active": {"type": "boolean"}}),
    _obj({"items": {"type": "array", "items": _obj({"sku": STR, "qty": {"type": "integer",
                                                                          "minimum": 1}}),
                    "maxItems": 2}}),
    _obj({"status": {"enum": ["open", "closed"]}, "count": {"type": "integer", "minimum": 0}}),
    _obj({"a": {"type": "null"}, "b": {"anyOf": [{"type": "null"}, {"type": "boolean"}]}}),
    _obj({"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}}}),
    _obj({"title": STR, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
          "genre": {"enum": ["drama", "comedy", "sci-fi"]}}, ["title"]),
    _obj({"temp": {"type": "number", "minimum": -50, "maximum": 60}, "unit": {"enum": ["C",
                                                                                    "F"]}}),
    _obj({"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}}),
    _obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
          "lon": {"type": "number", "minimum": -180, "maximum": 180}}),
    _obj({"words": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 3,
                    "maxItems": 3}}),
    _obj({"meta": _obj({"k": STR}, [], extra=True)}),
    _obj({"x": {"type": "integer"}}, [], extra=False),
    _obj({"version": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$"}}),
    _obj({"pair": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2,
                   "maxItems": 2}}),
    _obj({"level": {"type": "integer", "enum": [1, 2, 3]}}),
    _obj({"nested": _obj({"deeper": _obj({"deepest": {"type": "boolean"}})})}),
    _obj({"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}}),
    _obj({"either": {"anyOf": [_obj({"cat": STR}), _obj({"dog": STR})]}}),
    _obj({"name": {"type": "string", "minLength": 3, "maxLength": 12}}),
    _obj({"flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 5}}),
    _obj({"ratio": {"type": "number"}, "label": STR}, ["ratio"]),
    {"type": "array", "items": _obj({"n": {"type": "integer", "minimum": 0, "maximum": 5}}),
     "minItems": 1, "maxItems": 3},
    _obj({"code": {"const": "X1"}, "n": {"type": "integer"}}),
    _obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    _obj({"day": {"enum": ["mon", "tue", "wed"]}, "slots": {"type": "array", "items": {
        "type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3}}),
    {"type": "boolean"},
]
assert len(SCHEMAS) == 40


def _generate(llm: Llama, schema: dict[str, Any], seed: int, constrained: bool = True) -> tuple[
        str, str]:
    kwargs: dict[str, Any] = {}
    if constrained:
        kwargs["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "t", "schema": schema}}
    r = llm.create_chat_completion(_ask(json.dumps(schema)), temperature=1.0, seed=seed,
                                   max_tokens=MAX_TOKENS_DOC, **kwargs)
    choice = r["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def _valid(text: str, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema,
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def test_json_schema_outputs_validate(llm: Llama) -> None:
    """A few schemas of the 40 (the slow test runs them all): each finished output validates."""
    checked = 0
    for i in (0, 6, 10):
        text, finish = _generate(llm, SCHEMAS[i], seed=i)
        if finish == "stop":
            assert _valid(text, SCHEMAS[i]), (i, text)
            checked += 1
    assert checked >= 2  # most of these short documents finish well inside MAX_TOKENS_DOC


# Generations in the suite (the full run: 5 per schema, 200, see the module docstring), spread
# evenly over the 40 schemas; 24 + 6 keep the suite inside its time budget (was 40 + 10, 30 s).
N_VALIDITY = 24
N_CONTRAST = 6  # unconstrained (all 40 failed in the full run)


@pytest.mark.slow
def test_json_schema_validity_every_schema(llm: Llama) -> None:
    """Generations at temperature 1.0 over the 40 schemas: every output that finished with
    "stop" parses and validates; without constraints, the failure rate for contrast."""
    finished = invalid = 0
    for k in range(N_VALIDITY):
        schema = SCHEMAS[k * len(SCHEMAS) // N_VALIDITY]
        text, finish = _generate(llm, schema, seed=1000 + k)
        if finish == "stop":
            finished += 1
            invalid += not _valid(text, schema)
    free_invalid = 0
    for k in range(N_CONTRAST):
        schema = SCHEMAS[k * len(SCHEMAS) // N_CONTRAST]
        text, _ = _generate(llm, schema, seed=5000 + k, constrained=False)
        free_invalid += not _valid(text, schema)
    print(f"constrained: {finished}/{N_VALIDITY} finished, {invalid} invalid; "
          f"unconstrained: {free_invalid}/{N_CONTRAST} invalid")
    assert invalid == 0
    # the rest hit MAX_TOKENS_DOC (9 of 200 in the full-size run); many would mean a broken mask
    assert finished >= N_VALIDITY * 3 // 4
    assert free_invalid >= N_CONTRAST // 2  # the contrast: SmolLM2 alone mostly fails these schemas


def test_json_object_mode(llm: Llama) -> None:
    r = llm.create_chat_completion(_ask("a pet"), response_format={"type": "json_object"},
                                   temperature=1.0, seed=3, max_tokens=48)
    choice = r["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["finish_reason"] == "length"


# ---- GBNF --------------------------------------------------------------------------------------

# Bounded (no unbounded repetition): every generation ends within max_tokens.
ARITHMETIC = """root ::= expr
expr ::= term (" " [-+] " " term){0,3}
term ::= num | "(" num (" " [-+] " " num){1,2} ")"
num ::= [1-9] [0-9]{0,2}
"""
CSV_ROW = """root ::= field ("," field){2} "\\n"
field ::= [a-z]{1,8} | [0-9]{1,4}
"""
DATE = """root ::= year "-" month "-" day
year ::= "19" [0-9] [0-9] | "20" [0-2] [0-9]
month ::= "0" [1-9] | "1" [0-2]
day ::= "0" [1-9] | [12] [0-9] | "3" [01]
"""


def _parse_arithmetic(text: str) -> bool:
    """Recursive descent over expr := term ((' + ' | ' - ') term)*, term := num | (expr)."""
    pos = 0

    def term() -> bool:
        nonlocal pos
        if text.startswith("(", pos):
            pos += 1
            if not expr() or not text.startswith(")", pos):
                return False
            pos += 1
            return True
        m = re.compile(r"[1-9][0-9]{0,2}").match(text, pos)
        if not m:
            return False
        pos = m.end()
        return True

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while text[pos : pos + 3] in (" + ", " - "):
            pos += 3
            if not term():
                return False
        return True

    return expr() and pos == len(text)


def _parse_csv_row(text: str) -> bool:
    if not text.endswith("\n"):
        return False
    fields = text[:-1].split(",")
    return len(fields) == 3 and all(re.fullmatch(r"[a-z]{1,8}|[0-9]{1,4}", f) for f in fields)


def _parse_date(text: str) -> bool:
    m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", text)
    if not m or not 1900 <= int(m.group(1)) <= 2029:
        return False
    try:
        date(int(m.group(1)), int(m.group(2)), 1)
    except ValueError:
        return False
    return 1 <= int(m.group(3)) <= 31


@pytest.mark.parametrize(("grammar", "parse", "prompt"), [
    (ARITHMETIC, _parse_arithmetic, "A sum: "),
    (CSV_ROW, _parse_csv_row, "name,age,city\n"),
    (DATE, _parse_date, "Today's date is "),
])
def test_gbnf_outputs_parse(llm: Llama, grammar: str, parse: Any, prompt: str) -> None:
    finished = 0
    for seed in range(3):
        r = llm.create_completion(prompt, grammar=grammar, temperature=1.0, seed=seed,
                                  max_tokens=40)
        choice = r["choices"][0]
        if choice["finish_reason"] == "stop":
            finished += 1
            assert parse(choice["text"]), choice["text"]
    assert finished >= 1


def test_grammar_object_and_llama_cpp_python_name(llm: Llama) -> None:
    from alpaca_cpu.structured import LlamaGrammar

    g = LlamaGrammar.from_string('root ::= "yes" | "no"')
    r = llm.create_completion("Is water wet? Answer: ", grammar=g, temperature=1.0, seed=1)
    assert r["choices"][0]["text"] in ("yes", "no")
    assert r["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_mid_document_is_length(llm: Llama) -> None:
    r = llm.create_completion("Numbers: ", grammar='root ::= "[" [0-9]+ ("," [0-9]+)* "]"',
                              temperature=1.0, seed=2, max_tokens=3)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "length"
    assert re.fullmatch(r"\[[0-9,]*", choice["text"])  # a valid prefix of the grammar


def test_stream_chunks_are_prefixes(llm: Llama) -> None:
    schema = SCHEMAS[0]
    chunks = llm.create_chat_completion(
        _ask("a person"), stream=True, temperature=1.0, seed=4, max_tokens=MAX_TOKENS_DOC,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    text, finish = "", None
    for c in chunks:
        text += c["choices"][0]["delta"].get("content", "")
        finish = c["choices"][0]["finish_reason"] or finish
    if finish == "stop":
        assert _valid(text, schema), text


# ---- masks -------------------------------------------------------------------------------------


def test_mask_applies_in_place_and_forbids_the_rest(llm: Llama) -> None:
    c = Constraint(Grammar.from_string('root ::= "yes"'), llm.tokenizer_)
    logits = np.zeros(llm.n_vocab(), dtype=np.float32)
    c.apply(logits)  # in place: nothing returned, the same array changed
    allowed = np.flatnonzero(np.isfinite(logits))
    assert 0 < len(allowed) < 10
    for tok in allowed:
        assert b"yes".startswith(llm.tokenizer_.token_to_piece(int(tok)))
    assert all(not llm.tokenizer_.is_eog(int(t)) for t in allowed)  # not complete yet: no EOG


def test_eog_only_where_the_grammar_may_end(llm: Llama) -> None:
    c = Constraint(Grammar.from_string('root ::= "yes"'), llm.tokenizer_)
    for tok in llm.tokenize(b"yes", add_bos=False):
        c.advance(tok)
    logits = np.zeros(llm.n_vocab(), dtype=np.float32)
    c.apply(logits)
    allowed = set(np.flatnonzero(np.isfinite(logits)).tolist())
    assert allowed and allowed <= set(llm.tokenizer_.eog_ids)


def test_special_tokens_never_spell_grammar_text(llm: Llama) -> None:
    """`<|im_start|>` is a control token: a grammar asking for that text gets plain tokens."""
    c = Constraint(Grammar.from_string('root ::= "<|im_start|>"'), llm.tokenizer_)
    logits = np.zeros(llm.n_vocab(), dtype=np.float32)
    c.apply(logits)
    im_start = llm.tokenizer_.tokens.index("<|im_start|>")
    assert not llm.tokenizer_.is_eog(im_start)
    assert not np.isfinite(logits[im_start])
    assert np.isfinite(logits).any()
    # The bridge marks it (llguidance's special-token prefix); plain tokens keep their bytes.
    pieces = engine_token_bytes(llm.tokenizer_)
    assert pieces[im_start] == b"\xff<|im_start|>"
    hello = llm.tokenize(b"hello", add_bos=False)[0]
    assert pieces[hello] == llm.tokenizer_.token_to_piece(hello)


# ---- tool calls --------------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "a + b",
                                           "parameters": ADD}}]
SCHEMA_OF = {"get_weather": WEATHER, "add": ADD}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_tool_call_shape_and_arguments(llm: Llama, choice: Any) -> None:
    r = llm.create_chat_completion(QUESTION, tools=TOOLS, tool_choice=choice, temperature=1.0,
                                   seed=5, max_tokens=MAX_TOKENS_DOC)
    out = r["choices"][0]
    assert out["finish_reason"] == "tool_calls", out
    assert out["message"]["content"] is None
    (call,) = out["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    name = call["function"]["name"]
    if isinstance(choice, dict):
        assert name == "add"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA_OF[name])


def test_tool_choice_none_and_auto_answer_text_or_call(llm: Llama) -> None:
    r = llm.create_chat_completion(QUESTION, tools=TOOLS, tool_choice="none", temperature=0.0,
                                   max_tokens=8)
    assert "tool_calls" not in r["choices"][0]["message"]
    r = llm.create_chat_completion(QUESTION, tools=TOOLS, tool_choice="auto", temperature=1.0,
                                   seed=6, max_tokens=40)
    out = r["choices"][0]
    if out["finish_reason"] == "tool_calls":
        (call,) = out["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]),
                            SCHEMA_OF[call["function"]["name"]])
    else:
        assert isinstance(out["message"]["content"], str)


def test_tool_round_trip_and_streamed_call(llm: Llama) -> None:
    chunks = list(llm.create_chat_completion(QUESTION, tools=TOOLS, tool_choice="required",
                                             temperature=1.0, seed=8, stream=True,
                                             max_tokens=MAX_TOKENS_DOC))
    deltas = [c["choices"][0]["delta"].get("tool_calls") for c in chunks]
    deltas = [d[0] for d in deltas if d]
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"]["arguments"] == ""
    name = deltas[0]["function"]["name"]
    arguments = "".join(d["function"]["arguments"] for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    jsonschema.validate(json.loads(arguments), SCHEMA_OF[name])
    # The call and its result go back through the chat template for the next turn.
    call = {"id": deltas[0]["id"], "type": "function",
            "function": {"name": name, "arguments": arguments}}
    messages = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "22 C and sunny"}]
    r = llm.create_chat_completion(messages, tools=TOOLS, tool_choice="none", temperature=0.0,
                                   max_tokens=4)
    assert r["choices"][0]["finish_reason"] in ("stop", "length")
    _, plan = request_constraint(None, TOOLS, "none", getattr(llm._chat, "template", None))
    assert plan is not None
    prompt = llm.detokenize(llm.render_chat(plan.prompt_messages(messages))).decode()
    assert "22 C and sunny" in prompt and name in prompt


# ---- bad input: refused before any token -------------------------------------------------------


@pytest.mark.parametrize(("grammar", "message"), [
    ('root ::= "a" |\n  ("b" ', "line 2, column 8"),
    ("root ::= foo", "undefined rule.*foo"),
    ('root ::= "a" root', "accepts nothing"),
    ('expr ::= "a"', "no 'root' rule"),
])
def test_gbnf_errors(llm: Llama, grammar: str, message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        llm.create_completion("x", grammar=grammar)


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "strin"}, "strin"),
    ({"type": "array", "contains": {"type": "string"}}, "unsupported keyword.*contains"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "Unsatisfiable"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
    ("{not json", "not valid JSON"),
])
def test_schema_errors(llm: Llama, schema: Any, message: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(GrammarError, match=message):
        llm.create_chat_completion(QUESTION, response_format=fmt)


def test_request_errors(llm: Llama) -> None:
    with pytest.raises(ValueError, match="not in tools"):
        llm.create_chat_completion(QUESTION, tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "x"}})
    with pytest.raises(ValueError, match="response_format.type"):
        llm.create_chat_completion(QUESTION, response_format={"type": "yaml"})
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        llm.create_chat_completion(QUESTION, tools=[{"type": "function", "function": {
            "name": "bad name!"}}])


def _deep(n: int) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "string"}
    for _ in range(n):
        s = {"type": "object", "properties": {"a": s}, "required": ["a"]}
    return s


@pytest.mark.parametrize("schema", [
    _deep(500),
    '{"items":' * 100_000 + "{}" + "}" * 100_000,  # JSON text nested past Python's recursion
    {"enum": [f"value-{i}" for i in range(20_000)]},
    {"type": "string", "pattern": "^(a+)+(b|c?)*(d{1,9}){1,9}$"},
    {"type": "string", "pattern": "^[a-z]{1,1000}[0-9]{1,1000}[a-z]{1,1000}$"},
], ids=["deep", "deep_text", "huge_enum", "catastrophic_pattern", "large_repeat"])
def test_hostile_schema_refused_or_bounded(llm: Llama, schema: Any) -> None:
    t0 = time.perf_counter()
    try:
        g = Grammar.from_json_schema(schema)
        Constraint(g, llm.tokenizer_)  # the first mask: where a lexer blows up, if it does
    except GrammarError:
        pass  # refused with a message: fine
    assert time.perf_counter() - t0 < HOSTILE_SECONDS


HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}\nCall one as "
    "<tool_call>{...}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}"
    "{% for c in m.tool_calls %}<tool_call>\n{{ c.function | tojson }}\n</tool_call>"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_hermes_syntax_grammar_prompt_and_parse(llm: Llama) -> None:
    """A template that knows tools gets them (and the call message) itself; the call syntax is
    its `<tool_call>` one, the grammar accepts exactly that, and the parser reads it back."""
    from alpaca_cpu.chat_template import JinjaChatFormatter

    grammar, plan = request_constraint(None, TOOLS, "required", HERMES_TEMPLATE)
    assert plan is not None and plan.syntax.name == "hermes" and grammar is not None
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    c = Constraint(grammar, llm.tokenizer_)
    for tok in llm.tokenize(call.encode(), add_bos=False):
        assert c.allowed(tok), llm.detokenize([tok])
        c.advance(tok)
    assert c.is_accepting()
    (parsed,) = plan.parse(call) or []
    assert parsed["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    bad = Constraint(grammar, llm.tokenizer_)  # arguments outside the tool's schema: refused
    toks = llm.tokenize(call.replace('"b": 2', '"c": 2').encode(), add_bos=False)
    assert not all(bad.allowed(t) and bad.advance(t) is None for t in toks)
    messages = plan.prompt_messages([*QUESTION, {"role": "assistant", "content": None,
                                                 "tool_calls": parsed and [parsed]}])
    text = JinjaChatFormatter(HERMES_TEMPLATE).render(messages, tools=plan.tools)
    assert "get_weather" in text and '"arguments": "{\\"a\\": 1' in text


def _walk(grammar: Grammar, llm: Llama, text: str) -> bool:
    """True when the grammar accepts `text` as a whole document, token by token."""
    c = Constraint(grammar, llm.tokenizer_)
    for tok in llm.tokenize(text.encode(), add_bos=False):
        if not c.allowed(tok):
            return False
        c.advance(tok)
    return c.is_accepting()


def test_strict_refuses_unlisted_properties(llm: Llama) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert _walk(Grammar.from_json_schema(schema, strict=False), llm, '{"a":1,"b":2}')
    assert not _walk(Grammar.from_json_schema(schema, strict=True), llm, '{"a":1,"b":2}')
    assert _walk(Grammar.from_json_schema(schema, strict=True), llm, '{"a":1}')


@pytest.mark.parametrize("beside", [True, False], ids=["spare-core", "no-spare-core"])
def test_mask_is_computed_beside_the_forward_pass(llm: Llama, monkeypatch, beside: bool) -> None:
    """Where a core is spare, each advance (consume + next mask) runs on the mask worker, not
    the generating thread, and overlaps the forward pass: it starts before that step's forward
    pass returns. Where none is (structured.spare_core), it runs on the generating thread just
    before the forward pass."""
    import threading

    monkeypatch.setattr(llm, "_mask_beside", beside)

    events: list[tuple[str, str]] = []
    advance, forward = Constraint.advance, llm._model.forward

    def recording_advance(self: Constraint, token: int) -> None:
        events.append(("advance", threading.current_thread().name))
        advance(self, token)

    def slow_forward(*args: Any, **kwargs: Any) -> np.ndarray:
        out = forward(*args, **kwargs)
        time.sleep(0.1)  # stands in for a long forward pass (releases the GIL, like it)
        events.append(("forward_done", threading.current_thread().name))
        return out

    monkeypatch.setattr(Constraint, "advance", recording_advance)
    monkeypatch.setattr(llm._model, "forward", slow_forward)
    r = llm.create_completion("Count: ", grammar='root ::= [0-9] [0-9] [0-9]', max_tokens=3,
                              temperature=1.0, seed=1)
    assert len(r["choices"][0]["text"]) == 3
    advances = [i for i, e in enumerate(events) if e[0] == "advance"]
    assert len(advances) >= 2
    main = threading.current_thread().name
    assert all(events[i][1].startswith("alpaca-mask" if beside else main) for i in advances)
    for i in advances:  # the forward pass of the same step finishes after the advance began
        assert events[i + 1] == ("forward_done", main)


@pytest.mark.parametrize(("template", "call"), [
    (HERMES_TEMPLATE, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'),
    ("{{ tools }}<|python_tag|>{% for m in messages %}{{ m.content }}{% endfor %}",
     '{"name": "add", "parameters": {"a": 1, "b": 2}}'),
    (None, '{"name": "add", "arguments": {"a": 1, "b": 2}}'),
], ids=["hermes", "llama3", "generic"])
def test_each_call_syntax_round_trips(llm: Llama, template: str | None, call: str) -> None:
    grammar, plan = request_constraint(None, TOOLS, "required", template)
    assert grammar is not None and plan is not None
    assert _walk(grammar, llm, call)
    assert not _walk(grammar, llm, call.replace('"a": 1', '"a": "one"'))  # not the schema
    assert not _walk(grammar, llm, call.replace('"add"', '"sub"'))  # not a tool
    (parsed,) = plan.parse(call) or []
    assert parsed["function"]["name"] == "add"
    assert json.loads(parsed["function"]["arguments"]) == {"a": 1, "b": 2}
    assert plan.parse("just text") is None


def _spm_tokenizer() -> Any:
    """A small SentencePiece-style vocabulary: control tokens, the 256 byte tokens, then pieces
    with and without the word-start mark (so a space prefix would change the ids)."""
    from alpaca_cpu.tokenizer import Tokenizer

    pieces = ["\u2581", "\u2581[", "[", "]", "1", "2", "12", "\u2581hello", "hello"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # unknown, control, byte, normal
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0})


@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_bridge_on_spm_and_bpe_vocabularies(llm: Llama, kind: str) -> None:
    """SentencePiece (space prefix, byte tokens) and byte-level BPE (SmolLM2): the grammar's text
    comes out as exactly its bytes, never with the SPM space prefix in front."""
    tok = _spm_tokenizer() if kind == "spm" else llm.tokenizer_
    assert kind == "bpe" or tok.encode(b"[12]", add_bos=False)[0] == tok.tokens.index("\u2581[")
    grammar = Grammar.from_string('root ::= "[" [0-9]+ "]"')
    c = Constraint(grammar, tok)
    first = {tok.token_to_piece(int(t)) for t in c.allowed_tokens()}
    assert first and all(p.startswith(b"[") for p in first), first
    for t in tok.encode_plain(b"[12]"):
        assert c.allowed(t)
        c.advance(t)
    assert c.is_accepting()
    assert tok.decode(tok.encode_plain(b"[12]")) == b"[12]"
