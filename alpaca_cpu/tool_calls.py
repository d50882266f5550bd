"""OpenAI requests' `response_format`, `tools` and `tool_choice` as constraints, and the model's
tool calls back in OpenAI's `message.tool_calls` shape.

Three call syntaxes, chosen from the chat template (docs/design.md, section 16):

- hermes: Qwen 2.5 / Hermes templates, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
- llama3: Llama 3.1+ templates (`<|python_tag|>` / `ipython`), `{"name": ..., "parameters": {...}}`;
- generic: any other template or built-in format: `{"name": ..., "arguments": {...}}`, with the tools
  described in a system message and tool results given back as user messages.

`request_constraint()` is what a server calls with an OpenAI request's fields.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .structured import Grammar, GrammarError

MAX_TOOLS = 128  # a request with more tools is refused (each adds a grammar branch)
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # OpenAI's rule for function names


@dataclass(frozen=True)
class CallSyntax:
    """How a model writes one tool call: prefix, name, separator, arguments, suffix."""

    name: str
    prefix: str
    arguments_key: str
    suffix: str

    def head(self, tool: str) -> str:
        """The text before the arguments' JSON."""
        return f'{self.prefix}{{"name": {json.dumps(tool)}, "{self.arguments_key}": '

    def tail(self) -> str:
        return "}" + self.suffix


SYNTAXES = {
    "hermes": CallSyntax("hermes", "<tool_call>\n", "arguments", "\n</tool_call>"),
    "llama3": CallSyntax("llama3", "", "parameters", ""),
    "generic": CallSyntax("generic", "", "arguments", ""),
}


def call_syntax(template: str | None) -> CallSyntax:
    """The syntax a chat template (its Jinja source; None for built-in formats) expects."""
    if template and "tools" in template:
        if "<tool_call>" in template:
            return SYNTAXES["hermes"]
        if "<|python_tag|>" in template or "ipython" in template:
            return SYNTAXES["llama3"]
    return SYNTAXES["generic"]


def template_handles_tools(template: str | None) -> bool:
    return call_syntax(template).name != "generic"


# ---- checking a request -----------------------------------------------------------------------


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI `tools`, checked: [{"type": "function", "function": {"name", "parameters"...}}]."""
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise ValueError(f"tools must be a list of tool objects, got {type(tools).__name__}")  # noqa: TRY004
    if not tools:
        raise ValueError("tools is an empty list; leave it out instead")
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"tools has {len(tools)} entries, more than the limit of {MAX_TOOLS}")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type") != "function" \
                or not isinstance(tool.get("function"), Mapping):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"tools[{i}].function.name = {name!r}: expected 1-64 characters "
                             f"of a-z, A-Z, 0-9, '_', '.', '-'")
        if name in seen:
            raise ValueError(f"tools[{i}].function.name {name!r} appears twice")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON Schema object")  # noqa: TRY004
        try:
            Grammar.from_json_schema(params, strict=bool(fn.get("strict", False)))
        except GrammarError as e:
            raise GrammarError(f"tools[{i}] ({name}).function.parameters: {e}") from None
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def chosen_tools(tools: list[dict[str, Any]], tool_choice: Any) -> tuple[list[dict[str, Any]],
                                                                         str]:
    """(the tools the model may call, "auto" | "required" | "none") for a `tool_choice`."""
    if tool_choice is None:
        tool_choice = "auto"
    if tool_choice in ("auto", "required", "none"):
        return tools, tool_choice
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), Mapping):
        name = tool_choice["function"].get("name")
        named = [t for t in tools if t["function"]["name"] == name]
        if not named:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools "
                             f"({', '.join(t['function']['name'] for t in tools)})")
        return named, "required"
    raise ValueError(f"tool_choice = {tool_choice!r}: expected 'auto', 'none', 'required' or "
                     f"{{'type': 'function', 'function': {{'name': ...}}}}")


def response_format_grammar(response_format: Any) -> Grammar | None:
    """The Grammar of an OpenAI `response_format` (None for text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError(f"response_format must be an object, got {type(response_format).__name__}")  # noqa: TRY004
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")  # llama-cpp-python's extension
        return Grammar.json_object() if schema is None else Grammar.from_json_schema(schema,
                                                                                     strict=False)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise ValueError("response_format.json_schema must be an object with a 'schema'")
        strict = spec.get("strict", False)
        if not isinstance(strict, bool):
            raise ValueError(f"response_format.json_schema.strict = {strict!r}, expected a bool")
        try:
            return Grammar.from_json_schema(spec["schema"], strict=strict)
        except GrammarError as e:
            raise GrammarError(f"response_format.json_schema.schema: {e}") from None
    raise ValueError(f"response_format.type = {kind!r}: expected 'text', 'json_object' or "
                     f"'json_schema'")


def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a Lark string literal


def tools_grammar(tools: list[dict[str, Any]], mode: str, syntax: CallSyntax) -> Grammar:
    """One call to one of `tools`, with arguments valid under its parameters; in mode "auto" a
    plain text answer too (which then cannot start like a call)."""
    rules = []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        params = dict(fn["parameters"])
        if fn.get("strict") and "properties" in params:
            params.setdefault("additionalProperties", False)
        schema = json.dumps(params, separators=(",", ":"))
        rules.append(f"call_{i}: {_lark_string(syntax.head(fn['name']))} args_{i} "
                     f"{_lark_string(syntax.tail())}\nargs_{i}: %json {schema}")
    calls = " | ".join(f"call_{i}" for i in range(len(tools)))
    first = (syntax.prefix or "{")[0]
    start = f"start: {calls}"
    if mode == "auto":
        start += f" | TEXT\nTEXT: /[^{re.escape(first)}\\s](.|\\n)*/"
    return Grammar.from_lark(start + "\n" + "\n".join(rules))


@contextmanager
def _blame(param: str) -> Iterator[None]:
    """A ValueError raised inside gets `.param`: the request field at fault (a server answers
    OpenAI's error shape with it); the first field named is kept."""
    try:
        yield
    except ValueError as e:
        if getattr(e, "param", None) is None:
            e.param = param  # type: ignore[attr-defined]
        raise


def request_constraint(response_format: Any = None, tools: Any = None, tool_choice: Any = None,
                       template: str | None = None) -> tuple[Grammar | None, ToolPlan | None]:
    """The constraint of an OpenAI chat request (for the server and create_chat_completion):
    the Grammar to generate under (None: free text) and, when tools may be called, the plan
    that reads the calls back. Raises ValueError (GrammarError) for a bad request, with
    `.param` naming its field ("response_format", "tools" or "tool_choice")."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            with _blame("tool_choice"):
                raise ValueError("tool_choice is set but the request has no tools")
        with _blame("response_format"):
            return response_format_grammar(response_format), None
    with _blame("tools"):
        checked = check_tools(tools)
    with _blame("tool_choice"):
        allowed, mode = chosen_tools(checked, tool_choice)
    syntax = call_syntax(template)
    plan = ToolPlan(checked, mode, syntax)
    with _blame("response_format"):
        if mode == "none":
            return response_format_grammar(response_format), plan
        if response_format is not None and response_format_grammar(response_format) is not None:
            raise ValueError("response_format and tools cannot both constrain one answer; drop "
                             "one or set tool_choice to 'none'")
    with _blame("tools"):
        return tools_grammar(allowed, mode, syntax), plan


# ---- prompts with tools -----------------------------------------------------------------------


@dataclass
class ToolPlan:
    """What a chat request with tools needs: the tools, the mode and the call syntax."""

    tools: list[dict[str, Any]]
    mode: str  # "auto", "required" or "none"
    syntax: CallSyntax

    def prompt_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The messages as the chat format renders them: with a template that handles tools,
        assistant tool calls stay as they are (content "" where None); otherwise (generic) the
        tools are described in a system message, calls become JSON text and tool results
        user messages."""
        out: list[dict[str, Any]] = []
        generic = self.syntax.name == "generic"
        if generic and self.mode != "none":
            listing = json.dumps([t["function"] for t in self.tools], indent=1)
            note = (f"You can call these tools:\n{listing}\nTo call one, answer with only "
                    f'{{"name": <tool name>, "arguments": <arguments object>}}.')
            if messages and messages[0].get("role") == "system":
                note = f"{messages[0].get('content') or ''}\n\n{note}"
                messages = messages[1:]
            out.append({"role": "system", "content": note})
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"messages[{i}] must be a dict")  # noqa: TRY004
            m = dict(m)
            calls = m.get("tool_calls")
            if m.get("content") is None and (calls or m.get("role") == "assistant"):
                m["content"] = ""
            if calls is not None:
                m["tool_calls"] = _check_calls(calls, i)
            if not generic:
                out.append(m)
            elif m.get("role") == "tool":
                out.append({"role": "user", "content": f"Result of tool call "
                            f"{m.get('tool_call_id', '')}: {m.get('content', '')}"})
            elif calls:
                text = "\n".join(json.dumps({"name": c["function"]["name"],
                                             "arguments": json.loads(c["function"]["arguments"])})
                                 for c in m["tool_calls"])
                out.append({"role": m["role"], "content": (m["content"] + "\n" + text).strip()})
            else:
                out.append(m)
        return out

    def parse(self, text: str) -> list[dict[str, Any]] | None:
        """The OpenAI tool_calls of a whole answer, or None when it is plain text."""
        found = _split_call(text, self.syntax)
        if found is None:
            return None
        name, arguments = found
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": arguments}}]

    def stream(self, deltas: Iterator[str]) -> Iterator[tuple[str | None, dict[str, Any] | None]]:
        """Text deltas in, (content delta, tool-call delta) pairs out, as OpenAI streams them
        (see CallStream; this is its pull-driven form)."""
        pieces = CallStream(self.syntax)
        for delta in deltas:
            yield from pieces.feed(delta)
        yield from pieces.close()


Piece = tuple[str | None, dict[str, Any] | None]  # (content delta, tool-call delta)


@dataclass
class CallStream:
    """One streamed answer read as OpenAI streams it, push-driven (a server feeds it a delta per
    generated token): the call's id and name once, then its arguments piece by piece (the
    syntax's tail after the arguments is held back); a plain text answer passes through as
    content once it cannot be the start of a call."""

    syntax: CallSyntax
    buf: str = ""
    started: bool = False  # the call's head was seen (id and name sent)
    text: bool = False  # the answer is plain text
    sent: int = 0  # characters of buf already sent as arguments

    def feed(self, delta: str) -> list[Piece]:
        if self.text:
            return [(delta, None)] if delta else []
        self.buf += delta
        out: list[Piece] = []
        if not self.started:
            if not _may_start_call(self.buf, self.syntax):
                self.text = True
                return [(self.buf, None)]
            m = _head_match(self.buf, self.syntax)
            if m is None:
                return []
            self.started = True
            self.sent = m.end()
            out.append((None, {"index": 0, "id": f"call_{uuid.uuid4().hex[:24]}",
                               "type": "function",
                               "function": {"name": json.loads(m.group(1)), "arguments": ""}}))
        limit = len(self.buf) - len(self.syntax.tail())
        if limit > self.sent:
            out.append((None, {"index": 0, "function": {"arguments": self.buf[self.sent:limit]}}))
            self.sent = limit
        return out

    def close(self) -> list[Piece]:
        """What is still held back when the answer ends."""
        if self.text:
            return []
        if not self.started:
            return [(self.buf, None)] if self.buf else []
        if not self.buf.endswith(self.syntax.tail()) and len(self.buf) > self.sent:
            # cut short (length): the arguments as far as they got
            return [(None, {"index": 0, "function": {"arguments": self.buf[self.sent:]}})]
        return []


def _check_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
        raise ValueError(f"messages[{i}].tool_calls must be a list")  # noqa: TRY004
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments"), str):
            raise ValueError(f"messages[{i}].tool_calls[{j}] must be {{'id', 'type': 'function', "  # noqa: TRY004
                             f"'function': {{'name': str, 'arguments': JSON text}}}}")
        try:
            json.loads(fn["arguments"])
        except json.JSONDecodeError as e:
            raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: "
                             f"{e}") from None
        out.append({"id": c.get("id", ""), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    return out


def _head_match(text: str, syntax: CallSyntax) -> re.Match[str] | None:
    pattern = (re.escape(syntax.prefix) + r'\{"name": ("(?:[^"\\]|\\.)*"), "'
               + re.escape(syntax.arguments_key) + '": ')
    return re.match(pattern, text)


def _may_start_call(text: str, syntax: CallSyntax) -> bool:
    start = syntax.prefix or "{"
    n = min(len(text), len(start))
    return text[:n] == start[:n]


def _split_call(text: str, syntax: CallSyntax) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a whole call, None when `text` is not one."""
    m = _head_match(text, syntax)
    if m is None or not text.endswith(syntax.tail()):
        return None
    arguments = text[m.end() : len(text) - len(syntax.tail())]
    try:
        json.loads(arguments)
    except json.JSONDecodeError:
        return None
    return json.loads(m.group(1)), arguments
