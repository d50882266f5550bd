"""Constrained decoding: GBNF grammars, JSON Schema and JSON mode, through llguidance.

A `Grammar` is checked and compiled when it is made (bad input fails before any token is
generated); a `Constraint` is one generation's walk through it: the bitmask of the tokens the
grammar allows next, applied to the logits in place, and advanced by each sampled token.
Why llguidance and not outlines-core: docs/design.md, section 16.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import llguidance
import numpy as np
from llguidance.gbnf_to_lark import (
    AlternativeNode,
    GbnfToLarkError,
    GrammarParser,
    RepetitionNode,
    RuleNode,
    RuleRefNode,
    SequenceNode,
    gbnf_to_lark,
)

from .tokenizer import Tokenizer, TokenType

# Bounds on hostile input (docs/design.md, section 16): the text we accept, and llguidance's own
# budgets on the work one grammar may cost (lexer fuel is ~14-50 k units per millisecond).
MAX_GRAMMAR_BYTES = 1 << 20  # a GBNF file, a Lark grammar or a JSON Schema
MAX_SCHEMA_DEPTH = 64  # nesting of a JSON Schema document (deeper is refused, not recursed)
LIMITS = llguidance.LLParserLimits(
    initial_lexer_fuel=2_000_000,  # ~40-140 ms to build a grammar's lexer, then refused
    step_lexer_fuel=200_000,  # ~15 ms of lexer work per token, then the mask step fails
    max_lexer_states=100_000,  # ~100-200 MB of lexer states at most
    max_grammar_size=500_000,
    verbose_errors=False,  # errors name the problem, not the whole parser state
)


class GrammarError(ValueError):
    """A grammar or schema that cannot constrain generation: the message says where and why."""


# ---- grammars ----------------------------------------------------------------------------------


def _check_size(text: str, what: str) -> None:
    if not isinstance(text, str):
        raise GrammarError(f"{what} must be a string, got {type(text).__name__}")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"{what} is larger than {MAX_GRAMMAR_BYTES} bytes")
    if "\x00" in text:
        raise GrammarError(f"{what} contains a NUL character at index {text.index(chr(0))}")


def _line_column(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _productive_rules(rules: Mapping[str, Any]) -> set[str]:
    """Names of the GBNF rules that derive at least one finite string (the usual fixpoint:
    a rule is productive once one of its alternatives uses only productive rules)."""
    productive: set[str] = set()

    def derives(node: Any) -> bool:
        if isinstance(node, RuleRefNode):
            return node.name in productive
        if isinstance(node, SequenceNode):
            return all(derives(c) for c in node.nodes)
        if isinstance(node, AlternativeNode):
            return any(derives(c) for c in node.alternatives)
        if isinstance(node, RepetitionNode):
            return node.min_times == 0 or derives(node.node)
        if isinstance(node, RuleNode):
            return derives(node.alternatives)
        return True  # a literal or a character class

    changed = True
    while changed:
        changed = False
        for name, rule in rules.items():
            if name not in productive and derives(rule):
                productive.add(name)
                changed = True
    return productive


class Grammar:
    """A checked constraint, ready for any number of generations (immutable).

    Made from GBNF (`from_string`, as llama-cpp-python's `LlamaGrammar.from_string`), a file
    (`from_file`), a JSON Schema (`from_json_schema`), JSON mode (`json_object`) or Lark
    (`from_lark`, llguidance's own syntax). Every constructor raises GrammarError for bad input.
    """

    def __init__(self, llg_grammar: str, description: str) -> None:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            llg_grammar, None, limits=LIMITS)
        if is_error:
            raise GrammarError(f"{description}: {'; '.join(messages)}")
        self.llg_grammar = llg_grammar  # llguidance's grammar text (what LLMatcher takes)
        self.description = description

    def __repr__(self) -> str:
        return f"Grammar({self.description})"

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = False) -> Grammar:
        """A GBNF grammar (llama.cpp's syntax, rule `root` first to match). `verbose` is
        accepted for llama-cpp-python compatibility and ignored."""
        del verbose
        _check_size(grammar, "the GBNF grammar")
        try:
            rules = GrammarParser().parse(grammar)
        except GbnfToLarkError as e:
            line, col = _line_column(e.pos.text, e.pos.pos)
            message = str(e).split(" at line ")[0]
            raise GrammarError(f"GBNF syntax error at line {line}, column {col}: {message}") \
                from None
        if "root" not in rules:
            raise GrammarError("the GBNF grammar has no 'root' rule")
        undefined = sorted(_referenced(rules) - set(rules))
        if undefined:
            raise GrammarError(f"the GBNF grammar uses undefined rule(s): {', '.join(undefined)}")
        if "root" not in _productive_rules(rules):
            raise GrammarError("the GBNF grammar accepts nothing: rule 'root' never derives a "
                               "finite string")
        try:
            lark = gbnf_to_lark(grammar)
        except (GbnfToLarkError, ValueError, KeyError) as e:
            raise GrammarError(f"GBNF grammar not supported: {e}") from None
        return cls(llguidance.LLMatcher.grammar_from_lark(lark), "GBNF grammar")

    from_gbnf = from_string

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Grammar:
        """A GBNF grammar read from a file (UTF-8); errors name the file."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_GRAMMAR_BYTES + 1)
        except (OSError, UnicodeDecodeError) as e:
            raise GrammarError(f"{path}: cannot read the grammar file: {e}") from None
        try:
            return cls.from_string(text)
        except GrammarError as e:
            raise GrammarError(f"{path}: {e}") from None

    @classmethod
    def from_lark(cls, lark: str) -> Grammar:
        """A grammar in llguidance's Lark syntax (which can embed JSON Schemas, `%json{...}`)."""
        _check_size(lark, "the Lark grammar")
        try:
            text = llguidance.LLMatcher.grammar_from_lark(lark)
        except ValueError as e:
            raise GrammarError(f"Lark grammar: {e}") from None
        return cls(text, "Lark grammar")

    @classmethod
    def from_json_schema(cls, schema: Mapping[str, Any] | str | bool, *,
                         strict: bool = True) -> Grammar:
        """Output that is one JSON document valid under `schema` (a dict or its JSON text).

        Keywords the engine cannot enforce are refused, named, whatever `strict` says: output
        that claims to follow a schema it does not is worse than an error. With strict=False,
        objects accept properties the schema does not list unless it says
        `additionalProperties: false` (JSON Schema's own default); strict=True (OpenAI's
        structured outputs) allows only the listed ones.
        """
        doc = _load_schema(schema)
        if strict:
            doc = _strict_objects(doc)
        try:
            compiled = llguidance.LLMatcher.grammar_from_json_schema(
                doc, overrides={"whitespace_flexible": False, "lenient": False})
        except ValueError as e:
            raise GrammarError(f"JSON Schema: {e}") from None
        try:
            return cls(compiled, "JSON Schema")
        except GrammarError as e:
            raise GrammarError(str(e).replace("Unimplemented keys", "unsupported keyword(s)")) \
                from None

    @classmethod
    def json_object(cls) -> Grammar:
        """JSON mode: any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls.from_json_schema({"type": "object"}, strict=False)


LlamaGrammar = Grammar  # llama-cpp-python's name, for code written against it


def _referenced(rules: Mapping[str, Any]) -> set[str]:
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, RuleRefNode):
            names.add(node.name)
        for child in node.children():
            walk(child)

    for rule in rules.values():
        walk(rule)
    return names


def _load_schema(schema: Mapping[str, Any] | str | bool) -> Any:
    if isinstance(schema, str):
        _check_size(schema, "the JSON Schema")
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON Schema is not valid JSON: {e}") from None
        except RecursionError:
            raise GrammarError(f"the JSON Schema is nested deeper than {MAX_SCHEMA_DEPTH} "
                               f"levels") from None
    if not isinstance(schema, (Mapping, bool)):
        raise GrammarError(f"a JSON Schema must be an object or a boolean, got "
                           f"{type(schema).__name__}")
    _check_depth(schema, 0)
    return schema


def _check_depth(node: Any, depth: int) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"the JSON Schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, Mapping):
        for value in node.values():
            _check_depth(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            _check_depth(value, depth + 1)


def _strict_objects(node: Any) -> Any:
    """The schema with `additionalProperties: false` on each object schema that lists
    properties and says nothing about others (OpenAI's strict mode)."""
    if isinstance(node, list):
        return [_strict_objects(v) for v in node]
    if not isinstance(node, Mapping):
        return node
    out = {k: (v if k in ("enum", "const", "default", "examples") else _strict_objects(v))
           for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out \
            and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


# ---- the tokenizer as llguidance sees it -------------------------------------------------------

_ENGINE_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = \
    weakref.WeakKeyDictionary()
_ENGINE_LOCK = threading.Lock()
SPECIAL_PREFIX = b"\xff"  # llguidance's mark for special tokens: no grammar text can match them


def engine_token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """Each token's bytes for the engine: special tokens (control, unknown, and user-defined ones
    spelled like `<...>`) marked so that grammar text never produces them."""
    out = []
    for i, text in enumerate(tokenizer.tokens):
        kind = tokenizer.token_type(i)
        if kind in (TokenType.CONTROL, TokenType.UNKNOWN) or (
                kind == TokenType.USER_DEFINED and text.startswith("<") and text.endswith(">")):
            out.append(SPECIAL_PREFIX + text.encode())
        else:
            out.append(tokenizer.token_to_piece(i))
    return out


class _Wrapper:
    """What llguidance.TokenizerWrapper reads: token bytes, EOS/BOS ids, a tokenize function."""

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes]) -> None:
        self._tokenizer = tokenizer
        eog = sorted(tokenizer.eog_ids)
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else eog[0]
        self.bos_token_id = tokenizer.bos_id
        self.tokens = tokens
        self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(SPECIAL_PREFIX)]

    def __call__(self, data: bytes) -> list[int]:
        return self._tokenizer.encode_plain(data)


def engine_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer`, built once (~0.3 s at 49k tokens) and cached."""
    with _ENGINE_LOCK:
        llt = _ENGINE_TOKENIZERS.get(tokenizer)
        if llt is None:
            if not tokenizer.eog_ids:
                raise GrammarError("this model's tokenizer has no end-of-generation token, so "
                                   "a constrained generation could never end")
            wrapper = _Wrapper(tokenizer, engine_token_bytes(tokenizer))
            llt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper),
                                         eos_token=sorted(tokenizer.eog_ids))
            _ENGINE_TOKENIZERS[tokenizer] = llt
        return llt


# ---- one generation ----------------------------------------------------------------------------


class Constraint:
    """One generation's state in a Grammar: the mask of allowed next tokens.

    `apply(logits)` sets the logits of forbidden tokens to -inf in place; `advance(token)`
    consumes the sampled token and computes the next mask (it releases the GIL while it does,
    so the generation loop runs it beside the forward pass).
    """

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer) -> None:
        self.grammar = grammar
        self.n_vocab = tokenizer.n_vocab
        self._eog = np.array(sorted(tokenizer.eog_ids), dtype=np.int64)
        self._matcher = llguidance.LLMatcher(engine_tokenizer(tokenizer), grammar.llg_grammar,
                                             log_level=0, limits=LIMITS)
        self._check("start")
        self._bits = np.full((self.n_vocab + 31) // 32, -1, dtype=np.int32)
        self._forbidden = np.empty(self.n_vocab, dtype=bool)  # made beside the forward pass
        self._fill()
        if self._forbidden.all():
            raise GrammarError(f"{grammar.description} accepts nothing")

    def _check(self, when: str) -> None:
        if self._matcher.is_error():
            raise GrammarError(f"{self.grammar.description}: the constraint failed at {when}: "
                               f"{self._matcher.get_error()}")

    def _fill(self) -> None:
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check("a mask computation")
        bits = np.unpackbits(self._bits.view(np.uint8), count=self.n_vocab, bitorder="little")
        np.equal(bits, 0, out=self._forbidden)

    def allowed(self, token: int) -> bool:
        return not self._forbidden[token]

    def allowed_tokens(self) -> np.ndarray:
        """The ids the grammar allows next."""
        return np.flatnonzero(~self._forbidden)

    def apply(self, logits: np.ndarray) -> None:
        """Forbidden tokens' logits to -inf, in place (logits longer than the tokenizer's
        vocabulary: the extra rows are forbidden too)."""
        head = logits[: self.n_vocab]
        np.copyto(head, np.float32(-np.inf), where=self._forbidden)
        if logits.shape[0] > self.n_vocab:
            logits[self.n_vocab :] = -np.inf

    def advance(self, token: int) -> None:
        """Consume `token` (it must have been allowed) and compute the next mask."""
        if not self._matcher.consume_token(int(token)):
            self._check(f"token {token}")
            raise GrammarError(f"{self.grammar.description}: token {token} is not allowed here")
        if not self._matcher.is_stopped():
            self._fill()
        else:  # the document is complete: only an end-of-generation token may follow
            self._forbidden[:] = True
            self._forbidden[self._eog] = False

    def is_accepting(self) -> bool:
        """True when the text so far is a whole document (generation may end here)."""
        return bool(self._matcher.is_accepting())


# ---- the mask beside the forward pass ----------------------------------------------------------

_MASK_WORKER: ThreadPoolExecutor | None = None
_WORKER_LOCK = threading.Lock()
_T = TypeVar("_T")


def _worker() -> ThreadPoolExecutor:
    global _MASK_WORKER
    with _WORKER_LOCK:
        if _MASK_WORKER is None:
            _MASK_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alpaca-mask")
        return _MASK_WORKER


def spare_core(n_threads: int) -> bool:
    """Whether this process may use a CPU beside the forward pass's `n_threads`: only then is
    the mask computed on a thread of its own. Without one it would take turns with the pass's
    spinning workers and cost more than it hides (SmolLM2, 2 threads on 2 cores: 0.74-0.78 of
    free decode beside the pass, 0.96 before it; bench_structured.py)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return n_threads < cpus


def advance_beside(constraint: Constraint, token: int, work: Callable[[_T], np.ndarray],
                   arg: _T, beside: bool = True) -> np.ndarray:
    """`constraint.advance(token)` on a worker thread while this thread runs `work(arg)` (the
    forward pass, which releases the GIL); both done when this returns. An error of either is
    raised here (the forward pass's first). beside=False (no spare core, see spare_core): the
    advance first, then the work, on this thread."""
    if not beside:
        constraint.advance(token)
        return work(arg)
    pending = _worker().submit(constraint.advance, token)
    try:
        result = work(arg)
    finally:
        error = pending.exception()  # waits: the constraint is never left half-advanced
    if error is not None:
        raise error
    return result
