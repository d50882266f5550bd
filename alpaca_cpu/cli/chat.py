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
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..model import MEMORY_MARGIN_BYTES, NotEnoughMemoryError, check_memory
from ..tokenizer import check_unicode
from .chat_session import (
    ChatSession,
    Style,
    default_color,
    note,
    run_interactive,
    speed_report,
    stream_answer,
)
from .conversation import Conversation, SamplingSettings

if TYPE_CHECKING:
    from ..gguf_file import ModelFile
    from ..llama import Llama

PROG = "alpaca-chat"


class UserError(Exception):
    """Something the user can fix: printed as one line, exit status 1."""


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
    g = p.add_argument_group("structured output (every answer is valid; see README)")
    shape = g.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="answer with a JSON object")
    shape.add_argument("--json-schema", metavar="FILE",
                       help="answer with JSON valid under the JSON Schema in FILE")
    shape.add_argument("--grammar-file", metavar="FILE",
                       help="answer in the GBNF grammar of FILE (llama.cpp's syntax)")
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


def constraint_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """create_chat_completion arguments for --json / --json-schema / --grammar-file, checked
    now (before the model loads): a bad file is a UserError naming it."""
    from ..structured import Grammar, GrammarError

    try:
        if args.json:
            return {"response_format": {"type": "json_object"}}
        if args.json_schema:
            grammar = Grammar.from_json_schema(_read_text(args.json_schema))
            return {"grammar": grammar}
        if args.grammar_file:
            return {"grammar": Grammar.from_file(Path(args.grammar_file).expanduser())}
    except GrammarError as e:
        where = args.json_schema or args.grammar_file
        raise UserError(str(e) if str(e).startswith(str(where)) else f"{where}: {e}") from None
    return {}


def _read_text(path: str) -> str:
    try:
        return Path(path).expanduser().read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})") from None


# ---- loading ---------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def refuse_if_too_large(mf: ModelFile, n_ctx: int) -> None:
    """UserError, with a -c that fits, when the context does not fit in free memory next to
    the weights: the library's check (alpaca_cpu.model.check_memory), phrased for the CLI."""
    try:
        check_memory(mf, n_ctx)
    except NotEnoughMemoryError as e:
        fits = e.fits // 256 * 256
        hint = (f"a context of up to about {fits} tokens fits: pass -c {fits}" if fits >= 256
                else "free some memory or use a smaller model")
        raise UserError(f"not enough memory for a context of {n_ctx} tokens: the weights need "
                        f"{_mib(e.weight_bytes)}, the KV cache {_mib(e.kv_bytes)} and working "
                        f"memory {_mib(MEMORY_MARGIN_BYTES)}, but {_mib(e.available)} is "
                        f"available; {hint}") from None


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

    mf = open_model_file(path)  # validates the file; maps it, reads no weights
    config = mf.config
    n_ctx = args.ctx_size or config.context_length
    if n_ctx > config.context_length:
        print(f"{PROG}: warning: the model was trained with a context of "
              f"{config.context_length} tokens; answers may degrade beyond that",
              file=sys.stderr)
    refuse_if_too_large(mf, n_ctx)
    del mf
    return Llama(path, n_ctx=n_ctx, n_threads=args.threads, chat_format=chat_format,
                 verbose=args.verbose)


# ---- answering -------------------------------------------------------------------------------


def run_once(llm: Llama, conv: Conversation, settings: SamplingSettings, question: str,
             style: Style, verbose: bool, constraint: dict[str, Any] | None = None) -> int:
    """One-shot mode: only the answer goes to stdout."""
    conv.add("user", question)
    answer = stream_answer(llm, conv.messages(),
                           {**settings.completion_kwargs(0), **(constraint or {})}, sys.stdout)
    if not answer.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if answer.finish == "interrupted":
        return 130
    if answer.finish == "length" and settings.n_predict < 0:
        note(style, f"[{PROG}: the answer stopped because the context is full; see -c]")
    if answer.finish == "length" and constraint:
        note(style, f"[{PROG}: the answer stopped before the end of the document (see -n, -c): "
                    "it is only the start of a valid one]")
    if verbose:
        note(style, speed_report(llm, answer))
    return 0


# ---- main ------------------------------------------------------------------------------------


def _read_question(args: argparse.Namespace) -> str | None:
    """The one-shot question (-p, -f, or stdin when it is not a terminal), or None."""
    if args.prompt is not None:
        text = args.prompt
        check_unicode(text, "the -p text")
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
    style = Style(default_color() if args.color is None else args.color)
    settings = _settings_from_args(args)
    if args.system is not None:
        check_unicode(args.system, "the --system text")
    question = _read_question(args)
    constraint = constraint_kwargs(args)
    chat_format = "alpaca" if args.instruct else args.chat_format
    path = resolve_model(args)
    llm = load_model(args, path, chat_format)
    conv = Conversation(system=args.system)
    if question is not None:
        return run_once(llm, conv, settings, question, style, args.verbose, constraint)
    session = ChatSession(llm, conv, settings, style, args.verbose)
    session.constraint = constraint
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
