"""What `alpaca-chat` remembers: the conversation, the sampling settings, and how both change.

Nothing here touches the model, so it is tested on its own: /params parsing, /save and /load
(conversation JSON, written atomically), and trimming a conversation to fit the context. The
interactive loop that uses them is `chat_session.ChatSession`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..tokenizer import check_unicode

Message = dict[str, str]

ROLES = ("system", "user", "assistant")
FILE_FORMAT = "alpaca-chat conversation"
FILE_VERSION = 1
MAX_FILE_BYTES = 64 << 20  # a conversation file larger than this is not one we wrote


# ---- sampling settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingSettings:
    """Sampling as llama.cpp's chat defaults it (common/common.h), and how long answers may be."""

    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # -1: the whole context
    n_predict: int = -1  # -1: until the model stops or the context is full
    seed: int = -1  # -1: a random seed

    def validate(self) -> None:
        """Raise ValueError naming the first setting that is out of range."""
        checks = [
            ("temp", self.temp >= 0, ">= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
            ("top_p", 0 <= self.top_p <= 1, "in [0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repeat_penalty", self.repeat_penalty > 0, "> 0 (1 turns it off)"),
            ("repeat_last_n", self.repeat_last_n >= -1, ">= -1 (-1 is the whole context)"),
            ("n_predict", self.n_predict >= -1, ">= -1 (-1 is no limit)"),
            ("seed", self.seed >= -1, ">= -1 (-1 is random)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)!r}, expected {rule}")

    def updated(self, assignments: str | Sequence[str]) -> SamplingSettings:
        """A copy with `name=value` assignments applied, e.g. "temp=0.2 top_k=20".

        Names may use dashes or underscores; `temperature` and `n` are aliases of `temp` and
        `n_predict`. Raises ValueError for an unknown name, a bad value or an out-of-range one.
        """
        words = assignments.split() if isinstance(assignments, str) else list(assignments)
        types = {f.name: f.type for f in fields(self)}
        changes: dict[str, Any] = {}
        for word in words:
            name, sep, text = word.partition("=")
            name = _ALIASES.get(name.strip().replace("-", "_"), name.strip().replace("-", "_"))
            if not sep or not text:
                raise ValueError(f"expected name=value, got {word!r}")
            if name not in types:
                raise ValueError(f"unknown parameter {name!r}; known: {', '.join(types)}")
            try:
                changes[name] = int(text) if types[name] == "int" else float(text)
            except ValueError:
                kind = "an integer" if types[name] == "int" else "a number"
                raise ValueError(f"{name} = {text!r}, expected {kind}") from None
            if changes[name] != changes[name] or changes[name] in (float("inf"), float("-inf")):
                raise ValueError(f"{name} = {text!r}, expected a finite number")
        new = replace(self, **changes)
        new.validate()
        return new

    def describe(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))

    def completion_kwargs(self, turn: int) -> dict[str, Any]:
        """Keyword arguments of Llama.create_chat_completion for answer number `turn` (from 0).

        A fixed seed makes a whole session reproducible: answer k is sampled with seed + k.
        """
        return {
            "temperature": self.temp, "top_k": self.top_k, "top_p": self.top_p,
            "min_p": self.min_p, "repeat_penalty": self.repeat_penalty,
            "repeat_last_n": self.repeat_last_n,
            "max_tokens": None if self.n_predict < 0 else self.n_predict,
            "seed": None if self.seed < 0 else self.seed + turn,
        }  # fmt: skip


_ALIASES = {"temperature": "temp", "n": "n_predict", "max_tokens": "n_predict"}


# ---- the conversation ------------------------------------------------------------------------


class ConversationFileError(ValueError):
    """A /load file is unreadable or not a conversation."""


@dataclass
class Conversation:
    """An optional system prompt and the turns after it, oldest first."""

    system: str | None = None
    turns: list[Message] = field(default_factory=list)

    def messages(self) -> list[Message]:
        """The conversation as chat messages (what the template renders)."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [dict(m) for m in self.turns]

    def add(self, role: str, content: str) -> None:
        if role not in ("user", "assistant"):
            raise ValueError(f"role {role!r}, expected 'user' or 'assistant'")
        self.turns.append({"role": role, "content": content})

    def reset(self) -> None:
        """Start a new conversation with the same system prompt."""
        self.turns.clear()

    # ---- files ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"format": FILE_FORMAT, "version": FILE_VERSION, "messages": self.messages()}

    @classmethod
    def from_json(cls, data: Any) -> Conversation:
        """From to_json()'s dict, or from a bare list of OpenAI-style messages."""
        if isinstance(data, Mapping):
            if data.get("version", FILE_VERSION) != FILE_VERSION:
                raise ConversationFileError(
                    f"version {data.get('version')!r}, expected {FILE_VERSION}")
            data = data.get("messages")
        if not isinstance(data, list):
            raise ConversationFileError("expected a list of messages (or {\"messages\": [...]})")
        conv = cls()
        for i, m in enumerate(data):
            if not isinstance(m, Mapping) or m.get("role") not in ROLES \
                    or not isinstance(m.get("content"), str):
                raise ConversationFileError(
                    f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, "
                    "\"content\": a string}")
            try:  # JSON can spell lone surrogates: "\udcff"
                check_unicode(m["content"], f"messages[{i}]: content")
            except ValueError as e:
                raise ConversationFileError(str(e)) from None
            if m["role"] == "system":
                if i != 0:
                    raise ConversationFileError(f"messages[{i}]: a system message must come first")
                conv.system = m["content"]
            else:
                conv.add(m["role"], m["content"])
        return conv

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the conversation as JSON; the file is either the old one or the new one, whole."""
        target = Path(path).expanduser()
        write_atomically(target, json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Conversation:
        source = Path(path).expanduser()
        try:
            if source.stat().st_size > MAX_FILE_BYTES:
                raise ConversationFileError(f"{source}: larger than {MAX_FILE_BYTES >> 20} MiB")
            data = json.loads(source.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConversationFileError(f"{source}: {e.strerror or e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversationFileError(f"{source}: not a JSON file ({e})") from e
        try:
            return cls.from_json(data)
        except ConversationFileError as e:
            raise ConversationFileError(f"{source}: {e}") from None


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and os.replace.

    A crash or Ctrl-C at any moment leaves either the previous file or the new one, never a
    partial file at `path`.
    """
    folder = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the file itself is written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- fitting the context ---------------------------------------------------------------------


class ContextFullError(ValueError):
    """Even the system prompt and the newest message do not fit the context."""


def fit_to_context(conv: Conversation, count_tokens: Callable[[list[Message]], int],
                   budget: int) -> int:
    """Drop the oldest turns until the rendered conversation has at most `budget` tokens.

    The system prompt and the newest message are always kept; the conversation after trimming
    starts with a user message (templates expect that). `count_tokens` may raise ValueError for a
    conversation too long to render at all, which counts as not fitting. Returns how many
    messages were dropped; raises ContextFullError, leaving `conv` as it was, when even the
    system prompt and the newest message do not fit.
    """
    turns = list(conv.turns)  # trimmed copy; `conv` changes only when it fits
    dropped = 0
    while True:
        try:
            n = count_tokens(Conversation(conv.system, turns).messages())
            error = None
        except ValueError as e:
            n, error = None, e
        if n is not None and n <= budget:
            conv.turns[:] = turns
            return dropped
        if len(turns) <= 1:
            detail = str(error) if error is not None else f"it has {n} tokens"
            raise ContextFullError(f"the message does not fit the context: {detail}; the "
                                   f"prompt may use {budget} tokens, the rest is for the answer")
        del turns[0]
        dropped += 1
        while len(turns) > 1 and turns[0]["role"] != "user":
            del turns[0]
            dropped += 1
