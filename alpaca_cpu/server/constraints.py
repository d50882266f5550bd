"""A request's structured-output fields, checked and compiled by its handler before it is queued.

`response_format`, `tools` / `tool_choice` (chat), `grammar` (GBNF, llama.cpp's field) and
`json_schema` (llama.cpp's bare schema, completions) become a Grammar and, for a chat request
with tools, the ToolPlan that renders the prompt and reads the calls back; `constraint()` then
makes the generation's Constraint (its first mask computed). Bad input is an OpenAIError 400
naming the field at fault, raised before the scheduler sees the request, so it never takes a
slot. The library's own parts do the work (alpaca_cpu.tool_calls, alpaca_cpu.structured).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..llama import Llama
from ..structured import Constraint, Grammar, GrammarError
from ..tool_calls import ToolPlan, call_syntax, request_constraint, response_format_grammar
from . import protocol as p

_T = TypeVar("_T")


def _checked(param: str, make: Callable[[], _T]) -> _T:
    """make(), its ValueError as a 400 that names the field (the library's `.param` first)."""
    try:
        return make()
    except ValueError as e:
        code = "invalid_grammar" if isinstance(e, GrammarError) else "invalid_value"
        field = getattr(e, "param", None) or param
        message = str(e) if str(e).startswith(field) else f"{field}: {e}"
        raise p.OpenAIError(400, message, param=field, code=code) from None


def chat_constraint(llama: Llama, body: p.ChatCompletionRequest,
                    ) -> tuple[Grammar | None, ToolPlan | None]:
    """The Grammar a chat request generates under (None: free text) and its ToolPlan (None:
    the request has no tools)."""
    template = getattr(llama._chat, "template", None)
    grammar, plan = _checked("response_format", lambda: request_constraint(
        body.response_format, body.tools, body.tool_choice, template))
    if body.grammar is not None:
        if grammar is not None:
            raise p.OpenAIError(400, "grammar cannot be combined with response_format or tools "
                                "that constrain the answer", param="grammar",
                                code="invalid_value")
        grammar = _checked("grammar", lambda: Grammar.from_string(body.grammar or ""))
    return grammar, plan


def history_plan(llama: Llama, messages: list[dict[str, Any]]) -> ToolPlan | None:
    """A plan that only renders earlier tool calls and results (a request without tools whose
    history has them): templates without tool support see them as text, as with tools."""
    if any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return ToolPlan([], "none", call_syntax(getattr(llama._chat, "template", None)))
    return None


def completion_grammar(body: p.CompletionRequest) -> Grammar | None:
    """The Grammar of a /v1/completions request: `grammar`, `json_schema` or `response_format`
    (at most one)."""
    given = [name for name in ("grammar", "json_schema", "response_format")
             if getattr(body, name) is not None]
    if len(given) > 1:
        raise p.OpenAIError(400, f"{' and '.join(given)} both constrain the text; send one",
                            param=given[1], code="invalid_value")
    if body.grammar is not None:
        return _checked("grammar", lambda: Grammar.from_string(body.grammar or ""))
    if body.json_schema is not None:
        return _checked("json_schema", lambda: Grammar.from_json_schema(body.json_schema,
                                                                        strict=False))
    return _checked("response_format", lambda: response_format_grammar(body.response_format))


def constraint(llama: Llama, grammar: Grammar | None, param: str) -> Constraint | None:
    """A generation's walk through `grammar`, its first mask computed (a grammar that allows no
    first token is refused here)."""
    if grammar is None:
        return None
    return _checked(param, lambda: Constraint(grammar, llama.tokenizer_))
