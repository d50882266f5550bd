"""Reading chat messages from a terminal: multi-line input, line editing, persistent history.

A message is one line, or several when a line ends with a backslash, or everything between
a line that starts with triple quotes and a line that ends with them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

BLOCK = '"""'
HISTORY_LENGTH = 1000


class MessageAssembler:
    """Joins input lines into messages (pure logic: fed one line at a time)."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._in_block = False

    @property
    def pending(self) -> bool:
        """True in the middle of a multi-line message."""
        return self._in_block or bool(self._lines)

    def clear(self) -> None:
        self._lines, self._in_block = [], False

    def feed(self, line: str) -> str | None:
        """Take one line; return the finished message, or None when more lines are needed."""
        if self._in_block:
            if line.rstrip().endswith(BLOCK):
                self._lines.append(line.rstrip()[: -len(BLOCK)])
                return self._finish(block=True)
            self._lines.append(line)
            return None
        if not self._lines and line.lstrip().startswith(BLOCK):
            rest = line.lstrip()[len(BLOCK):]
            if rest.rstrip().endswith(BLOCK):  # """one line"""
                return rest.rstrip()[: -len(BLOCK)].strip()
            self._in_block = True
            self._lines.append(rest)
            return None
        if line.endswith("\\"):
            self._lines.append(line[:-1])
            return None
        self._lines.append(line)
        return self._finish(block=False)

    def finish_early(self) -> str:
        """End of input inside a multi-line message: what was typed so far."""
        return self._finish(block=self._in_block)

    def _finish(self, block: bool) -> str:
        text = "\n".join(self._lines)
        self.clear()
        # The lines holding the quotes often hold nothing else: do not keep those blank ends.
        return text.strip("\n") if block else text


class MessageReader:
    """Reads messages from the terminal with readline editing and a history file.

    read() returns a message, "" when the user cancelled what they were typing (Ctrl-C on a
    non-empty line), or None to quit (Ctrl-D or Ctrl-C at an empty prompt).
    """

    def __init__(self, prompt: str, continuation: str, history_file: Path | None,
                 commands: Sequence[str] = ()) -> None:
        self.prompt = prompt
        self.continuation = continuation
        self.history_file = history_file
        self._assembler = MessageAssembler()
        self._readline = _setup_readline(history_file, commands)

    def read(self) -> str | None:
        while True:
            try:
                line = input(self.continuation if self._assembler.pending else self.prompt)
            except EOFError:
                print()
                return self._assembler.finish_early() if self._assembler.pending else None
            except KeyboardInterrupt:
                typed = self._assembler.pending or bool(self._line_buffer())
                self._assembler.clear()
                print()
                return "" if typed else None
            message = self._assembler.feed(line)
            if message is not None:
                return message

    def _line_buffer(self) -> str:
        """What was on the line when Ctrl-C came (readline keeps it until the next input)."""
        return self._readline.get_line_buffer() if self._readline is not None else ""

    def save_history(self) -> None:
        """Write the history file (through a temporary file, so it is never half-written)."""
        if self._readline is None or self.history_file is None:
            return
        tmp = self.history_file.with_name(self.history_file.name + f".{os.getpid()}.tmp")
        try:
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(str(tmp))
            os.replace(tmp, self.history_file)
        except OSError:
            tmp.unlink(missing_ok=True)  # history is a convenience: never fail the chat for it


def _setup_readline(history_file: Path | None, commands: Sequence[str]) -> ModuleType | None:
    """Import readline (which makes input() editable), load the history, complete /commands."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input() still works
        return None
    readline.set_history_length(HISTORY_LENGTH)
    if history_file is not None:
        with contextlib.suppress(OSError):  # first run, or unreadable: an empty history
            readline.read_history_file(str(history_file))

    def complete(text: str, state: int) -> str | None:
        matches = [c + " " for c in commands if c.startswith(text)] if text.startswith("/") else []
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t\n")
    if "libedit" in (readline.__doc__ or ""):  # macOS's readline is libedit
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    return readline
