"""`alpaca-chat`'s interactive session: `ChatSession` (a model, a conversation, the sampling
settings and the /commands on them), the loop that reads messages for it, and streaming an
answer to the terminal (shared with one-shot mode in `chat`).

The conversation and settings themselves, which need no model, are in `conversation`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from ..tokenizer import check_unicode
from .conversation import (
    ContextFullError,
    Conversation,
    ConversationFileError,
    SamplingSettings,
    fit_to_context,
)

if TYPE_CHECKING:
    from ..llama import Llama

COMMANDS = ("/help", "/reset", "/system", "/save", "/load", "/params", "/quit", "/exit")
HELP = """\
Commands:
  /help              this text
  /reset             start a new conversation (the system prompt stays)
  /system [TEXT]     show the system prompt, or set it to TEXT
  /save FILE         save the conversation as JSON
  /load FILE         continue a conversation saved with /save
  /params [k=v ...]  show the sampling parameters, or set some: /params temp=0.2 top_k=20
                     (temp top_k top_p min_p repeat_penalty repeat_last_n n_predict seed)
  /quit              exit (so do Ctrl-D and Ctrl-C at an empty prompt)
Input: end a line with \\ to go on to the next one, or put several lines between \"\"\" lines.
Start a message with // to send text that begins with /.
Ctrl-C while the model answers stops the answer; the part already shown stays in the
conversation (if nothing was shown yet, the question is dropped too)."""


# ---- output ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """Terminal colours, or none. Prompt escapes are wrapped in \\001 \\002 so that readline
    knows they take no room on the line."""

    color: bool

    def prompt(self, text: str) -> str:
        return f"\001\033[1;32m\002{text}\001\033[0m\002" if self.color else text

    def note(self, text: str) -> str:
        return f"\033[2m{text}\033[0m" if self.color else text

    def error(self, text: str) -> str:
        return f"\033[1;31m{text}\033[0m" if self.color else text


def default_color() -> bool:
    return (sys.stdout.isatty() and "NO_COLOR" not in os.environ
            and os.environ.get("TERM") != "dumb")


def note(style: Style, text: str, error: bool = False) -> None:
    """A message for the user (not part of any answer): to stderr."""
    sys.stdout.flush()  # keep the order of answer text and notes on a terminal
    print(style.error(text) if error else style.note(text), file=sys.stderr, flush=True)


# ---- answering -------------------------------------------------------------------------------


@dataclass
class Answer:
    text: str
    finish: str | None  # "stop", "length", or "interrupted" (Ctrl-C)
    seconds: float  # prompt evaluation and generation


def stream_answer(llm: Llama, messages: list[dict[str, str]], kwargs: dict[str, Any],
                  out: TextIO) -> Answer:
    """Write the answer to `out` as it is generated. Ctrl-C stops it and keeps what came."""
    chunks = llm.create_chat_completion(messages, stream=True, **kwargs)
    t0 = time.perf_counter()
    parts: list[str] = []
    finish: str | None = None
    try:
        for chunk in chunks:
            choice = chunk["choices"][0]
            piece = choice["delta"].get("content")
            if piece:
                parts.append(piece)  # first: Ctrl-C may land right after the text is shown
                out.write(piece)
                out.flush()
            finish = choice["finish_reason"] or finish
    except KeyboardInterrupt:
        finish = "interrupted"
    finally:
        chunks.close()  # runs the generator's cleanup: the model is ready for the next call
    return Answer("".join(parts), finish, time.perf_counter() - t0)


def speed_report(llm: Llama, answer: Answer) -> str:
    """Prompt and generation speed of the answer just given (for --verbose)."""
    e = llm.last_eval
    n_gen = len(llm.tokenize(answer.text.encode(), add_bos=False)) if answer.text else 0
    gen_s = max(answer.seconds - e.seconds, 1e-9)
    pp = e.n_evaluated / e.seconds if e.seconds > 0 else 0.0
    return (f"[prompt: {e.n_reused + e.n_evaluated} tokens ({e.n_reused} reused, "
            f"{e.n_evaluated} evaluated, {pp:.1f} tokens/s) | answer: {n_gen} tokens in "
            f"{gen_s:.2f} s ({n_gen / gen_s:.1f} tokens/s)]")


# ---- the session -----------------------------------------------------------------------------


class ChatSession:
    """The interactive loop's state: model, conversation, settings, and the commands on them."""

    def __init__(self, llm: Llama, conv: Conversation, settings: SamplingSettings, style: Style,
                 verbose: bool) -> None:
        self.llm = llm
        self.conv = conv
        self.settings = settings
        self.style = style
        self.verbose = verbose
        self.n_answers = 0  # answer k is sampled with seed + k when a seed is set
        self.told_trimming = False
        self.constraint: dict[str, Any] = {}  # --json / --json-schema / --grammar-file

    def note(self, text: str, error: bool = False) -> None:
        note(self.style, text, error)

    def _prompt_budget(self) -> int:
        """Tokens the prompt may use: the rest of the context is kept for the answer."""
        n_ctx = self.llm.n_ctx()
        want = self.settings.n_predict if self.settings.n_predict > 0 else n_ctx // 4
        return n_ctx - min(want, n_ctx // 2)

    def ask(self, question: str) -> None:
        """Answer one user message, streaming to stdout."""
        self.conv.add("user", question)
        try:
            answer = self._answer()
        except KeyboardInterrupt:  # Ctrl-C before the answer began (e.g. while trimming)
            answer = None
            self.note("[stopped]")
        except ValueError as e:  # too long for the context; a template refusing the turns
            answer = None
            self.note(f"[{e}]", error=True)
        if answer is None or (answer.finish == "interrupted" and not answer.text):
            self.conv.turns.pop()  # nothing was said: forget the question too
            return
        self.conv.add("assistant", answer.text)  # all of it, or what was shown before Ctrl-C
        if self.verbose:
            self.note(speed_report(self.llm, answer))

    def _answer(self) -> Answer:
        try:
            dropped = fit_to_context(self.conv, lambda m: len(self.llm.render_chat(m)),
                                     self._prompt_budget())
        except ContextFullError as e:
            raise ValueError(f"{e}; try a larger -c or a shorter message") from None
        if dropped and not self.told_trimming:
            self.told_trimming = True
            self.note(f"[the conversation is longer than the context of {self.llm.n_ctx()} "
                      "tokens: from now on its oldest turns are dropped (the system prompt "
                      "stays)]")
        answer = stream_answer(self.llm, self.conv.messages(),
                               {**self.settings.completion_kwargs(self.n_answers),
                                **self.constraint}, sys.stdout)
        self.n_answers += 1
        if answer.text and not answer.text.endswith("\n"):
            sys.stdout.write("\n")
        if answer.finish == "interrupted":
            self.note("[stopped]")
        elif answer.finish == "length" and self.settings.n_predict < 0:
            self.note("[the answer filled the context]")
        return answer

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.note(HELP)
        elif name == "/reset":
            self.conv.reset()
            self.note("[new conversation]")
        elif name == "/system":
            if rest:
                self.conv.system = rest
                self.note("[system prompt set]")
            else:
                shown = self.conv.system if self.conv.system is not None else \
                    "(none: the chat format's default)"
                self.note(f"[system prompt: {shown}]")
        elif name in ("/save", "/load"):
            self._file_command(name, rest)
        elif name == "/params":
            self._params(rest)
        else:
            self.note(f"[unknown command {name}; /help lists the commands]", error=True)
        return True

    def _file_command(self, name: str, path: str) -> None:
        if not path:
            self.note(f"[usage: {name} FILE]", error=True)
            return
        try:
            if name == "/save":
                saved = self.conv.save(path)
                self.note(f"[saved {len(self.conv.messages())} messages to {saved}]")
            else:
                self.conv = Conversation.load(path)
                self.note(f"[loaded {len(self.conv.messages())} messages from {path}]")
        except ConversationFileError as e:
            self.note(f"[cannot load {e}]", error=True)
        except OSError as e:
            self.note(f"[cannot save to {path}: {e.strerror or e}]", error=True)

    def _params(self, assignments: str) -> None:
        if assignments:
            try:
                new = self.settings.updated(assignments)
            except ValueError as e:
                self.note(f"[{e}]", error=True)
                return
            if new.seed != self.settings.seed:
                self.n_answers = 0  # a new seed starts its sequence again
            self.settings = new
        self.note(f"[{self.settings.describe()}]")


def run_interactive(session: ChatSession, banner: str) -> int:
    """Read messages and /commands from the terminal until /quit or Ctrl-D; the exit status."""
    from ..default_model import cache_dir
    from .input import MessageReader

    # Ctrl-C is how the user stops an answer: make it work even when started with SIGINT
    # ignored (as background jobs of a non-interactive shell are).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    style = session.style
    reader = MessageReader(style.prompt("> "), style.prompt("... "),
                           cache_dir() / "chat_history", COMMANDS)
    session.note(banner)
    try:
        while True:
            text = reader.read()
            if text is None:
                return 0
            if not text.strip():
                continue
            try:
                check_unicode(text, "the message")
            except ValueError as e:
                session.note(f"[{e}]", error=True)
                continue
            if text.startswith("/") and not text.startswith("//"):
                if not session.command(text):
                    return 0
                continue
            session.ask(text[1:] if text.startswith("//") else text)
    finally:
        reader.save_history()
