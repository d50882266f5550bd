"""A model file's chat template (Jinja, as in Hugging Face ``transformers``), rendered safely.

The template comes with the model file, so it is untrusted input. ``JinjaChatFormatter`` renders
it in jinja2's immutable sandbox, with every render metered by a budget (the limits below): a
template that reaches for Python internals, runs too long, or grows values or output past a limit
is refused with ``ValueError``. The public surface is ``JinjaChatFormatter`` and the limits;
everything else here is the sandbox's machinery.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import string
import time
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    Sequence,
    Sized,
    ValuesView,
)
from datetime import datetime
from numbers import Integral, Real
from typing import Any, ClassVar, NoReturn

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

__all__ = [
    "MAX_FORMAT_WIDTH",
    "MAX_INPUT_DEPTH",
    "MAX_INT_BITS",
    "MAX_JSON_INDENT",
    "MAX_LOOP_ITERATIONS",
    "MAX_OPERATIONS",
    "MAX_TEMPLATE_CHARS",
    "RENDER_LIMIT_CHARS",
    "RENDER_TIMEOUT_S",
    "TEXT_BUDGET_FACTOR",
    "JinjaChatFormatter",
]



# --- limits ------------------------------------------------------------------------------------
#
# jinja2's immutable sandbox stops attribute walks to Python internals and mutation of lists and
# dicts, but not runaway CPU or memory. Every render therefore runs under a budget: loop
# iterations, calls/filters/arithmetic and wall time are counted; every value that is printed,
# joined, passed to a call/filter/operator or built as a literal is size-checked; operations
# that multiply sizes (str * n, n ** m, padding, replace, join, format, indent, wordwrap) are
# checked *before* they run; and the output is consumed piece by piece and cut off at a limit.

# Real chat templates are under 20 KB; this bounds parse and compile time.
MAX_TEMPLATE_CHARS = 256 * 1024
# Output, and any single value, may exceed the size of the conversation (x2) by this much.
RENDER_LIMIT_CHARS = 1 << 20
# All text a render produces (printed anywhere, also inside {% set %} blocks and macros).
TEXT_BUDGET_FACTOR = 32
MAX_LOOP_ITERATIONS = 100_000
MAX_OPERATIONS = 200_000
RENDER_TIMEOUT_S = 2.0
MAX_INT_BITS = 4096
MAX_FORMAT_WIDTH = 1000
MAX_JSON_INDENT = 64
MAX_INPUT_DEPTH = 32
_MAX_ERROR_CHARS = 300


# --- the formatter ---------------------------------------------------------------------------


def _plain(value: Any, where: str, depth: int, known: dict[int, int]) -> tuple[Any, int]:
    """Copy ``value`` into plain str / number / bool / None / list / dict data (what a template
    may see) and return it with its printed size; container sizes go into ``known``."""
    size = _scalar_size(value)
    if size is not None:
        return (str(value) if isinstance(value, str) else value), size
    if isinstance(value, Integral):
        return int(value), _scalar_size(int(value)) or 0
    if isinstance(value, Real):
        return float(value), 24
    if depth >= MAX_INPUT_DEPTH:
        raise ValueError(f"{where} is nested more than {MAX_INPUT_DEPTH} levels deep")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        size = 2 + 4 * len(value)
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(  # noqa: TRY004
                    f"{where} has a non-string key {key!r}"
                )
            out[key], item_size = _plain(item, f"{where}[{key!r}]", depth + 1, known)
            size += len(key) + item_size
        known[id(out)] = size
        return out, size
    if isinstance(value, (list, tuple)):
        items = []
        size = 2 + 2 * len(value)
        for i, item in enumerate(value):
            plain, item_size = _plain(item, f"{where}[{i}]", depth + 1, known)
            items.append(plain)
            size += item_size
        known[id(items)] = size
        return items, size
    raise ValueError(
        f"{where} has type {type(value).__name__}; messages may hold str, numbers, bool, None, "
        "lists and dicts"
    )


def _short(error: BaseException) -> str:
    text = str(error)
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


class JinjaChatFormatter:
    """Renders a Hugging Face / GGUF chat template (Jinja) the way ``transformers``'
    ``apply_chat_template`` does: variables ``messages``, ``add_generation_prompt``,
    ``tools``, ``bos_token``, ``eos_token``; functions ``raise_exception`` and ``strftime_now``; the
    ``tojson`` filter without HTML escaping; ``trim_blocks`` and ``lstrip_blocks`` on.

    The template is untrusted. It renders in jinja2's immutable sandbox under a budget (see the
    limits above): reaching for Python internals, exceeding a limit, a syntax error or any
    failure while rendering raises ``ValueError`` saying that the chat template was refused and
    why; ``raise_exception`` in the template raises ``ValueError`` with its message.
    """

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "") -> None:
        if not isinstance(template, str):
            raise ValueError(  # noqa: TRY004
                f"chat template must be a string, got {type(template).__name__}"
            )
        if not isinstance(bos_token, str) or not isinstance(eos_token, str):
            raise ValueError(  # noqa: TRY004
                "bos_token and eos_token must be strings"
            )
        if len(template) > MAX_TEMPLATE_CHARS:
            raise ValueError(
                f"chat template refused: it has {len(template)} characters, "
                f"more than the limit of {MAX_TEMPLATE_CHARS}"
            )
        self.template = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.stop: tuple[str, ...] = (eos_token,) if eos_token else ()
        environment = _GuardedSandbox()
        try:
            tree = environment.parse(template)
            tree = _InsertGuards().visit(tree)
            tree.set_environment(environment)
            self._template = environment.from_string(tree)
        except TemplateSyntaxError as error:
            raise ValueError(
                f"chat template refused: syntax error on line {error.lineno}: {_short(error)}"
            ) from error
        except (TemplateError, RecursionError, MemoryError) as error:
            raise ValueError(
                f"chat template refused: it does not compile: {type(error).__name__}: "
                f"{_short(error)}"
            ) from error

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text; ``tools`` (OpenAI-style function descriptions) reaches the template
        as ``tools``, ``None`` when there are none, as ``transformers`` passes it."""
        if tools is not None and (isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence)
                                  or not all(isinstance(t, Mapping) for t in tools)):
            raise ValueError("tools must be a list of mappings")
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError(  # noqa: TRY004
                "messages must be a list of {'role': ..., 'content': ...} mappings"
            )
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise ValueError(  # noqa: TRY004
                    f"messages[{i}] must be a mapping, got {type(message).__name__}"
                )
        known: dict[int, int] = {}
        plain_messages, input_size = _plain(messages, "messages", 0, known)
        plain_tools, tools_size = (None, 0) if tools is None else _plain(tools, "tools", 0, known)
        budget = _RenderBudget(input_size + tools_size + len(self.bos_token)
                               + len(self.eos_token), known)

        reset = _ACTIVE_BUDGET.set(budget)
        stream = self._template.generate(
            messages=plain_messages,
            add_generation_prompt=bool(add_generation_prompt),
            tools=plain_tools,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        pieces, size = [], 0
        try:
            for piece in stream:
                size += len(piece)
                if size > budget.value_limit:
                    raise _Refused(f"the prompt it renders exceeds {budget.value_limit} characters")
                pieces.append(piece)
        except _TemplateRaised as error:
            raise ValueError(f"chat template raised an error: {_short(error)}") from error
        except _Refused as error:
            raise ValueError(f"chat template refused: {error}") from error
        except SecurityError as error:
            raise ValueError(f"chat template refused: unsafe operation: {_short(error)}") from error
        except Exception as error:  # anything else a hostile template provokes (incl. MemoryError)
            raise ValueError(
                f"chat template refused: rendering failed: {type(error).__name__}: {_short(error)}"
            ) from error
        finally:
            stream.close()
            _ACTIVE_BUDGET.reset(reset)
        return "".join(pieces)


# --- the render budget -----------------------------------------------------------------------


class _Refused(Exception):
    """A render limit was hit."""


class _TemplateRaised(Exception):
    """The template called ``raise_exception``."""


def _scalar_size(value: Any) -> int | None:
    """Printed size bound of a scalar, or None when ``value`` is not one."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if value is None or isinstance(value, (bool, float)):
        return 24
    if isinstance(value, int):
        return value.bit_length() // 3 + 2  # >= number of decimal digits and sign
    return None


def _printed_size(value: Any, limit: int, known: Mapping[int, int]) -> int:
    """Upper bound of ``len(str(value))`` (up to repr escaping), counting shared references once
    per use; stops as soon as it passes ``limit``. ``known`` caches the render's own inputs."""
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        size = _scalar_size(item)
        if size is not None:
            total += size
        elif id(item) in known:
            total += known[id(item)]
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        elif isinstance(item, Namespace):
            # Namespaces can be linked into huge DAGs with {% set ns.x = ... %} alone.
            total += 16
            stack.append(getattr(item, "_Namespace__attrs", {}))
        else:
            total += 64  # macros, loop objects, Undefined, functions: short fixed reprs
    return total


class _RenderBudget:
    """What one render may still spend. Lives in ``_ACTIVE_BUDGET`` while the render runs."""

    def __init__(self, input_size: int, known_sizes: dict[int, int]) -> None:
        self.value_limit = RENDER_LIMIT_CHARS + 2 * input_size
        self.text_left = TEXT_BUDGET_FACTOR * self.value_limit
        self.loops_left = MAX_LOOP_ITERATIONS
        self.operations_left = MAX_OPERATIONS
        self.deadline = time.monotonic() + RENDER_TIMEOUT_S
        self.known_sizes = known_sizes

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Refused(f"rendering took longer than {RENDER_TIMEOUT_S} s")

    def loop_step(self) -> None:
        self.loops_left -= 1
        if self.loops_left < 0:
            raise _Refused(f"its loops ran more than {MAX_LOOP_ITERATIONS} iterations")
        self._check_time()

    def operation(self) -> None:
        self.operations_left -= 1
        if self.operations_left < 0:
            raise _Refused(f"it made more than {MAX_OPERATIONS} calls, filters and operations")
        self._check_time()

    def size(self, value: Any) -> int:
        if isinstance(value, str):  # the common case, kept cheap
            return len(value)
        return _printed_size(value, self.value_limit, self.known_sizes)

    def check_input(self, value: Any, what: str) -> None:
        if self.size(value) > self.value_limit:
            raise _Refused(f"{what} is larger than {self.value_limit} characters")

    def check_bound(self, bound: int, what: str) -> None:
        if bound > self.value_limit:
            raise _Refused(f"{what} would produce more than {self.value_limit} characters")

    def spend_text(self, n_chars: int) -> None:
        self.text_left -= n_chars
        if self.text_left < 0:
            raise _Refused(
                f"it produced more than {TEXT_BUDGET_FACTOR * self.value_limit} characters in all"
            )

    def produced(self, value: Any) -> Any:
        """Check a value the template just made; charge its length to the text budget."""
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise _Refused(f"an integer has more than {MAX_INT_BITS} bits")
        self.check_input(value, "a value it built")
        if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
            self.spend_text(len(value))
        return value


_ACTIVE_BUDGET: contextvars.ContextVar[_RenderBudget | None] = contextvars.ContextVar(
    "alpaca_cpu_chat_template_budget", default=None
)


def _budget() -> _RenderBudget:
    budget = _ACTIVE_BUDGET.get()
    if budget is None:
        raise _Refused("template code ran outside a guarded render")
    return budget


# --- checks for operations that multiply sizes ------------------------------------------------

_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def _count(value: Any) -> int:
    return int(value) if isinstance(value, Integral) and not isinstance(value, bool) else 0


def _printf_bound(budget: _RenderBudget, fmt: str, values: Any) -> int:
    fields, widest = 0, 0
    for match in _PRINTF_SPEC.finditer(fmt):
        width, precision = match.groups()
        if "*" in (width, precision):
            raise _Refused("'*' widths in % formatting are not supported")
        widest = max(widest, int(width or 0), int(precision or 0))
        fields += 1
    if widest > MAX_FORMAT_WIDTH:
        raise _Refused(f"a format width of {widest} is over the limit of {MAX_FORMAT_WIDTH}")
    return len(fmt) + fields * (budget.size(values) + widest)


def _format_bound(budget: _RenderBudget, fmt: str, values: Any) -> int:
    """Bound for ``str.format``: each field prints at most all arguments plus its width."""
    fields, widest = 0, 0
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return 0  # malformed: the call itself raises
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        if spec and "{" in spec:
            raise _Refused("nested fields in format specs are not supported")
        widest = max([widest, *(int(d) for d in re.findall(r"\d+", spec or ""))])
        fields += 1
    if widest > MAX_FORMAT_WIDTH:
        raise _Refused(f"a format width of {widest} is over the limit of {MAX_FORMAT_WIDTH}")
    return len(fmt) + fields * (budget.size(values) + widest)


def _replace_bound(text_size: int, old: Any, new: Any, count: Any) -> int:
    if not isinstance(old, (str, bytes)) or not isinstance(new, (str, bytes)):
        return text_size
    hits = text_size + 1 if not old else text_size // len(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return text_size + hits * len(new)


def _materialize(items: Any) -> Any:
    """A list of ``items`` when it is a one-shot iterable, so its size can be checked first."""
    if isinstance(items, (str, bytes, list, tuple, dict)) or not isinstance(items, Iterable):
        return items
    budget = _budget()
    out = []
    for item in items:
        budget.loop_step()
        out.append(item)
    return out


def _check_str_method(
    budget: _RenderBudget, text: Any, name: str, args: tuple, kwargs: dict
) -> tuple:
    """Pre-check the str/bytes methods that can grow their result; returns the args to use."""

    def arg(i: int, key: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name in ("center", "ljust", "rjust", "zfill"):
        bound = max(len(text), _count(arg(0, "width", 0)))
    elif name == "expandtabs":
        bound = len(text) * max(1, _count(arg(0, "tabsize", 8)))
    elif name == "replace":
        bound = _replace_bound(len(text), arg(0, "old"), arg(1, "new"), arg(2, "count", -1))
    elif name == "join" and args:
        items = _materialize(args[0])
        args = (items, *args[1:])
        bound = budget.size(items) + (len(items) if isinstance(items, Sized) else 0) * len(text)
    elif name in ("format", "format_map") and isinstance(text, str):
        bound = _format_bound(budget, text, (args, kwargs))
    elif name == "translate":
        table = arg(0, "table")
        longest = (
            max((budget.size(v) for v in table.values()), default=1)
            if isinstance(table, dict)
            else 1
        )
        bound = len(text) * max(1, longest)
    else:
        return args
    budget.check_bound(bound, f"str.{name}()")
    return args


def _check_filter(budget: _RenderBudget, name: str, values: tuple, kwargs: dict) -> tuple:
    """Pre-check the filters that can grow their result; ``values`` are the filter's arguments
    after any context argument. Returns the arguments to use."""

    def arg(i: int, key: str, default: Any = None) -> Any:
        return values[i] if len(values) > i else kwargs.get(key, default)

    def value_size() -> int:
        return budget.size(arg(0, "value"))

    if name == "center":
        bound = max(value_size(), _count(arg(1, "width", 80)))
    elif name == "indent":
        width = arg(1, "width", 4)
        indent_size = len(width) if isinstance(width, str) else _count(width)
        bound = value_size() + (value_size() + 1) * indent_size  # at most one indent per line
    elif name == "replace":
        bound = _replace_bound(value_size(), arg(1, "old"), arg(2, "new"), arg(3, "count"))
    elif name == "join" and values:
        items = _materialize(values[0])
        values = (items, *values[1:])
        n_items = len(items) if isinstance(items, Sized) else 0
        bound = budget.size(items) + n_items * len(str(arg(1, "d", "")))
    elif name == "wordwrap":
        wrapstring = arg(3, "wrapstring") or "\n"
        bound = value_size() * (1 + len(str(wrapstring)))
    elif name == "format" and values:
        bound = _printf_bound(budget, str(values[0]), (values[1:], kwargs))
    elif name in ("batch", "slice"):
        bound = value_size() + _count(arg(1, "linecount" if name == "batch" else "slices", 0))
    else:
        return values
    budget.check_bound(bound, f"the {name!r} filter")
    return values


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    # Filters with pass_context / pass_eval_context / pass_environment get that object first.
    n_hidden = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)  # keeps jinja_pass_arg, so jinja still passes the context
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.operation()
        values = args[n_hidden:]
        for value in (*values, *kwargs.values()):
            budget.check_input(value, f"an argument of the {name!r} filter")
        values = _check_filter(budget, name, values, kwargs)
        return budget.produced(func(*args[:n_hidden], *values, **kwargs))

    return guarded


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """JSON like transformers' ``tojson`` (no HTML escaping), built incrementally so an indented
    dump of a deep value stops at the size limit instead of after it."""
    indent_size = len(indent) if isinstance(indent, str) else _count(indent)
    if indent_size > MAX_JSON_INDENT:
        raise _Refused(f"a tojson indent of {indent_size} is over the limit of {MAX_JSON_INDENT}")
    budget = _budget()
    encoder = json.JSONEncoder(
        ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    chunks, size = [], 0
    for chunk in encoder.iterencode(value):
        size += len(chunk)
        if size > budget.value_limit:
            raise _Refused(f"tojson output is larger than {budget.value_limit} characters")
        chunks.append(chunk)
    return "".join(chunks)


def _raise_exception(message: Any) -> NoReturn:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# --- the environment -------------------------------------------------------------------------


class _RenderGuard(jinja2.ext.Extension):
    """Hooks that ``_InsertGuards`` wires into every compiled template (through
    ``environment.extensions``, which templates themselves cannot name)."""

    def guard_iter(self, iterable: Any) -> Iterator[Any]:
        budget = _budget()
        for item in iterable:
            budget.loop_step()
            yield item

    def guard_text(self, value: Any) -> str:
        budget = _budget()
        budget.check_input(value, "a printed value")
        text = str(value)
        budget.spend_text(len(text))
        return text

    def guard_value(self, value: Any) -> Any:
        return _budget().produced(value)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask markers): the
    body renders as is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _InsertGuards(NodeTransformer):
    """Rewrites a parsed template: loop iterables, printed values, ``~`` operands and literal
    lists / tuples / dicts pass through the ``_RenderGuard`` hooks."""

    def _hook(self, method: str, node: nodes.Expr) -> nodes.Call:
        hook = nodes.ExtensionAttribute(_RenderGuard.identifier, method, lineno=node.lineno)
        return nodes.Call(hook, [node], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = self._hook("guard_iter", node.iter)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        node.nodes = [self._hook("guard_text", child) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Concat:
        self.generic_visit(node)
        node.nodes = [self._hook("guard_text", child) for child in node.nodes]
        return node

    def _literal(self, node: nodes.Expr) -> nodes.Expr:
        self.generic_visit(node)
        return self._hook("guard_value", node) if getattr(node, "ctx", "load") == "load" else node

    visit_List = visit_Tuple = visit_Dict = _literal


class _GuardedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with arithmetic and calls metered and unsafe access refused at
    once (the stock sandbox returns an Undefined that only fails when used, so
    ``{{ x.__class__ }}`` would silently print nothing)."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,  # as transformers renders chat templates
            lstrip_blocks=True,
            autoescape=False,
            optimized=False,  # no compile-time evaluation: everything runs under the budget
            extensions=[jinja2.ext.loopcontrols, _GenerationTag, _RenderGuard],
        )
        for name in ("lipsum", "cycler"):  # lipsum(n) makes n paragraphs; neither is needed
            self.globals.pop(name, None)
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}

    def unsafe_undefined(self, obj: Any, attribute: str) -> NoReturn:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.operation()
        budget.check_input(left, f"an operand of {operator!r}")
        budget.check_input(right, f"an operand of {operator!r}")
        if operator == "*":
            for sequence, times in ((left, right), (right, left)):
                if isinstance(sequence, (str, bytes, list, tuple)) and isinstance(times, int):
                    budget.check_bound(budget.size(sequence) * max(times, 0), "repetition with *")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and right * left.bit_length() > MAX_INT_BITS:
                raise _Refused(f"a power has more than {MAX_INT_BITS} bits")
        elif operator == "%" and isinstance(left, str):
            budget.check_bound(_printf_bound(budget, left, right), "% formatting")
        return budget.produced(super().call_binop(context, operator, left, right))

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        if isinstance(getattr(obj, "__self__", None), _RenderGuard):
            return obj(*args)  # our own hooks: metered inside
        budget = _budget()
        budget.operation()
        for key, value in (*enumerate(args), *kwargs.items()):
            if key not in ("_loop_vars", "_block_vars"):  # jinja's own bookkeeping
                budget.check_input(value, "a call argument")
        target = getattr(obj, "__wrapped__", obj)  # str.format arrives wrapped by the sandbox
        owner = getattr(target, "__self__", None)
        if isinstance(owner, (str, bytes)):
            args = _check_str_method(budget, owner, getattr(target, "__name__", ""), args, kwargs)
        return budget.produced(super().call(context, obj, *args, **kwargs))
