"""`alpaca-chat`: chat with an instruction-tuned model in the terminal, or answer one question.

    alpaca-chat                         # the default model (fetched once), interactive
    alpaca-chat -m model.gguf --temp 0.2
    alpaca-chat -p "Name three colors"  # one-shot: only the answer on stdout
    echo "Name three colors" | alpaca-chat

Flags and defaults follow llama.cpp's (`llama-cli`); see `alpaca-chat -h`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .chat_session import (
    ContextFullError,
    Conversation,
    ConversationFileError,
    SamplingSettings,
    fit_to_context,
)

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..llama import Llama

PROG = "alpaca-chat"
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


# ---- command line ----------------------------------------------------------------------------


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from ..chat_format import BUILTIN_FORMATS

    d = SamplingSettings()
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Chat with a LLaMA-family GGUF model on the CPU. With no -m, uses "
                    "SmolLM2-135M-Instruct, fetched once into the user cache. With -p, -f or "
                    "text on stdin, answers once and prints only the answer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", metavar="PATH", help="GGUF model file (default: SmolLM2)")
    g.add_argument("--model-dir", metavar="DIR",
                   help="where the default model is cached (default: $XDG_CACHE_HOME/alpaca-cpu"
                        " or ~/.cache/alpaca-cpu)")
    g.add_argument("-c", "--ctx-size", type=_int_at_least(0), default=4096, metavar="N",
                   help="context size in tokens; 0 = the model's training context")
    g.add_argument("-t", "--threads", type=_int_at_least(1), default=None, metavar="N",
                   help="threads (default: one per physical core)")
    g = p.add_argument_group("conversation")
    fmt = g.add_mutually_exclusive_group()
    fmt.add_argument("--instruct", action="store_true",
                     help="Alpaca instruction format (for Alpaca-style models)")
    fmt.add_argument("--chat-format", choices=BUILTIN_FORMATS, default=None,
                     help="a built-in chat format instead of the model file's template")
    g.add_argument("--system", metavar="TEXT", help="system prompt")
    g.add_argument("-p", "--prompt", metavar="TEXT", help="answer TEXT once and exit")
    g.add_argument("-f", "--file", metavar="FILE", help="answer the text of FILE once and exit")
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--n-predict", type=_int_at_least(-1), default=d.n_predict, metavar="N",
                   help="most tokens per answer; -1 = until the model stops or the context "
                        "is full")
    g.add_argument("--temp", type=float, default=d.temp, help="temperature; 0 = greedy")
    g.add_argument("--top-k", type=int, default=d.top_k, help="top-k; 0 = off")
    g.add_argument("--top-p", type=float, default=d.top_p, help="top-p; 1 = off")
    g.add_argument("--min-p", type=float, default=d.min_p, help="min-p; 0 = off")
    g.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty,
                   help="repetition penalty; 1 = off")
    g.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n,
                   help="tokens the penalty looks back on; 0 = off, -1 = the whole context")
    g.add_argument("-s", "--seed", type=int, default=d.seed, help="random seed; -1 = random")
    g = p.add_argument_group("output")
    g.add_argument("--color", action=argparse.BooleanOptionalAction, default=None,
                   help="colour the prompt and notes (default: on when stdout is a terminal)")
    g.add_argument("--verbose", action="store_true",
                   help="print load time and prompt / generation speed after each answer")
    g.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("alpaca-cpu")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _settings_from_args(args: argparse.Namespace) -> SamplingSettings:
    return SamplingSettings(**{f.name: getattr(args, f.name) for f in fields(SamplingSettings)})


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


def _default_color() -> bool:
    return (sys.stdout.isatty() and "NO_COLOR" not in os.environ
            and os.environ.get("TERM") != "dumb")


def _note(style: Style, text: str, error: bool = False) -> None:
    """A message for the user (not part of any answer): to stderr."""
    sys.stdout.flush()  # keep the order of answer text and notes on a terminal
    print(style.error(text) if error else style.note(text), file=sys.stderr, flush=True)


class UserError(Exception):
    """Something the user can fix: printed as one line, exit status 1."""


# ---- loading ---------------------------------------------------------------------------------


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def check_memory(path: Path, config: ModelConfig, n_ctx: int,
                 available: int | None = None) -> None:
    """Refuse a context whose KV cache, next to the weights, does not fit in free memory."""
    available = available_memory() if available is None else available
    if available is None:
        return
    weights = path.stat().st_size  # the engine keeps a repacked copy of about this size
    kv = config.kv_cache_bytes(n_ctx)
    if weights + kv <= available:
        return
    fits = (available - weights) // config.kv_cache_bytes(1) // 256 * 256
    hint = (f"a context of up to about {fits} tokens fits: pass -c {fits}" if fits >= 256
            else "free some memory or use a smaller model")
    raise UserError(f"not enough memory for a context of {n_ctx} tokens: the weights need "
                    f"{_mib(weights)} and the KV cache {_mib(kv)}, but {_mib(available)} is "
                    f"available; {hint}")


def resolve_model(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model).expanduser()
    from ..default_model import ModelDownloadError, default_model_path
    try:
        return default_model_path(args.model_dir,
                                  log=lambda s: print(s, file=sys.stderr, flush=True))
    except ModelDownloadError as e:
        raise UserError(str(e)) from None


def load_model(args: argparse.Namespace, path: Path, chat_format: str | None) -> Llama:
    from ..gguf_file import open_model_file
    from ..llama import Llama

    config = open_model_file(path).config  # validates the file; maps it, reads no weights
    n_ctx = args.ctx_size or config.context_length
    if n_ctx > config.context_length:
        print(f"{PROG}: warning: the model was trained with a context of "
              f"{config.context_length} tokens; answers may degrade beyond that",
              file=sys.stderr)
    check_memory(path, config, n_ctx)
    return Llama(path, n_ctx=n_ctx, n_threads=args.threads, chat_format=chat_format,
                 verbose=args.verbose)


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


def run_once(llm: Llama, conv: Conversation, settings: SamplingSettings, question: str,
             style: Style, verbose: bool) -> int:
    """One-shot mode: only the answer goes to stdout."""
    conv.add("user", question)
    answer = stream_answer(llm, conv.messages(), settings.completion_kwargs(0), sys.stdout)
    if not answer.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if answer.finish == "interrupted":
        return 130
    if answer.finish == "length" and settings.n_predict < 0:
        _note(style, f"[{PROG}: the answer stopped because the context is full; see -c]")
    if verbose:
        _note(style, speed_report(llm, answer))
    return 0


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

    def note(self, text: str, error: bool = False) -> None:
        _note(self.style, text, error)

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
                               self.settings.completion_kwargs(self.n_answers), sys.stdout)
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
                check_text(text, "the message")
            except UserError as e:
                session.note(f"[{e}]", error=True)
                continue
            if text.startswith("/") and not text.startswith("//"):
                if not session.command(text):
                    return 0
                continue
            session.ask(text[1:] if text.startswith("//") else text)
    finally:
        reader.save_history()


# ---- main ------------------------------------------------------------------------------------


def check_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode. Bytes that are not UTF-8 reach Python as lone surrogates
    (from argv, or a terminal in the C locale); refuse them here with a clear message."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not valid UTF-8 text (at character {e.start})") from None
    return text


def _read_question(args: argparse.Namespace) -> str | None:
    """The one-shot question (-p, -f, or stdin when it is not a terminal), or None."""
    if args.prompt is not None:
        text = check_text(args.prompt, "the -p text")
    elif args.file is not None:
        try:
            text = Path(args.file).expanduser().read_bytes().decode("utf-8")
        except OSError as e:
            raise UserError(f"cannot read {args.file}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"{args.file} is not UTF-8 text (byte {e.start})") from None
    elif not sys.stdin.isatty():
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"stdin is not UTF-8 text (byte {e.start})") from None
    else:
        return None
    if not text.strip():
        raise UserError("the question is empty")
    return text


def _banner(llm: Llama, path: Path, chat_format: str | None) -> str:
    if chat_format is not None:
        fmt = chat_format
    elif llm.metadata.get("tokenizer.chat_template"):
        fmt = "the model's template"
    else:
        fmt = "alpaca (the model file has no template)"
    return (f"{PROG}: {path.name} | chat format: {fmt} | context: {llm.n_ctx()} tokens\n"
            "Type a message and press Enter; end a line with \\ or use \"\"\" for more lines. "
            "/help lists commands. Ctrl-C stops an answer, Ctrl-D quits.")


def run(args: argparse.Namespace) -> int:
    style = Style(_default_color() if args.color is None else args.color)
    settings = _settings_from_args(args)
    if args.system is not None:
        check_text(args.system, "the --system text")
    question = _read_question(args)
    chat_format = "alpaca" if args.instruct else args.chat_format
    path = resolve_model(args)
    llm = load_model(args, path, chat_format)
    conv = Conversation(system=args.system)
    if question is not None:
        return run_once(llm, conv, settings, question, style, args.verbose)
    session = ChatSession(llm, conv, settings, style, args.verbose)
    return run_interactive(session, _banner(llm, path, chat_format))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _settings_from_args(args).validate()
    except ValueError as e:
        parser.error(str(e))  # exits 2 with the usage, like any other bad flag
    try:
        return run(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `alpaca-chat -p ... | head -1`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit-time flush cannot fail again
        return 141
    except MemoryError:
        print(f"{PROG}: error: out of memory; try a smaller -c", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except ValueError as e:  # incl. alpaca_cpu.ModelFileError: the message names the problem
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C while loading, or in one-shot mode
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
