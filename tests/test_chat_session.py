"""alpaca-chat's logic without a real model: /params parsing, /save and /load, context trimming,
input, the memory check, and ChatSession driven by a stand-in model."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_model import TinySpec, write_tiny_model

import alpaca_cpu.cli.conversation as conversation_module
import alpaca_cpu.model as model_module
from alpaca_cpu.cli.chat import UserError, refuse_if_too_large
from alpaca_cpu.cli.chat_session import ChatSession, Style
from alpaca_cpu.cli.conversation import (
    ContextFullError,
    Conversation,
    ConversationFileError,
    SamplingSettings,
    fit_to_context,
    write_atomically,
)
from alpaca_cpu.cli.input import MessageAssembler
from alpaca_cpu.gguf_file import open_model_file
from alpaca_cpu.model import Model

# ---- /params ---------------------------------------------------------------------------------


def test_defaults_are_llama_cpp_chat_defaults() -> None:
    s = SamplingSettings()
    assert (s.temp, s.top_k, s.top_p, s.min_p) == (0.8, 40, 0.95, 0.05)
    assert (s.repeat_penalty, s.repeat_last_n, s.n_predict, s.seed) == (1.0, 64, -1, -1)


def test_params_assignments() -> None:
    s = SamplingSettings().updated("temp=0.2 top_k=20")
    assert s.temp == 0.2 and s.top_k == 20 and s.top_p == 0.95
    s = s.updated(["temperature=0", "top-p=0.5", "n=16", "repeat_last_n=-1", "seed=7"])
    assert (s.temp, s.top_p, s.n_predict, s.repeat_last_n, s.seed) == (0.0, 0.5, 16, -1, 7)
    assert "temp=0.0" in s.describe() and "n_predict=16" in s.describe()
    assert SamplingSettings().updated("") == SamplingSettings()


@pytest.mark.parametrize("text, message", [
    ("temp", "expected name=value"),
    ("temp=", "expected name=value"),
    ("heat=1", "unknown parameter 'heat'"),
    ("top_k=1.5", "top_k = '1.5', expected an integer"),
    ("temp=warm", "expected a number"),
    ("temp=nan", "finite"),
    ("temp=-1", "temp = -1.0, expected >= 0"),
    ("top_p=1.5", "top_p = 1.5, expected in [0, 1]"),
    ("repeat_penalty=0", "repeat_penalty = 0.0, expected > 0"),
    ("repeat_last_n=-2", "repeat_last_n = -2"),
    ("n_predict=-5", "n_predict = -5"),
])
def test_params_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        SamplingSettings().updated(text)
    assert message in str(e.value)


def test_completion_kwargs_and_seeds() -> None:
    kw = SamplingSettings(temp=0.3, n_predict=-1).completion_kwargs(0)
    assert kw == {"temperature": 0.3, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                  "repeat_penalty": 1.0, "repeat_last_n": 64, "max_tokens": None, "seed": None}
    seeded = SamplingSettings(seed=10, n_predict=5)
    assert seeded.completion_kwargs(0)["seed"] == 10  # one-shot -s N equals seed=N in the API
    later = seeded.completion_kwargs(3)
    assert later["seed"] == 13 and later["max_tokens"] == 5


# ---- /save and /load -------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    conv = Conversation(system="Be brief. «ß» 🦙")
    conv.add("user", 'Two lines\nwith "quotes"')
    conv.add("assistant", "ok\u2028")
    path = conv.save(tmp_path / "c.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "alpaca-chat conversation" and data["version"] == 1
    assert data["messages"][0] == {"role": "system", "content": "Be brief. «ß» 🦙"}
    again = Conversation.load(path)
    assert again == conv and again.messages() == conv.messages()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]  # no temporary file left


def test_load_accepts_a_bare_message_list(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]))
    conv = Conversation.load(path)
    assert conv.system is None and [m["role"] for m in conv.turns] == ["user", "assistant"]


@pytest.mark.parametrize("content, message", [
    ("not json", "not a JSON file"),
    (b"\xff\xfe", "not a JSON file"),
    ('{"messages": 3}', "expected a list of messages"),
    ('{"version": 9, "messages": []}', "version 9"),
    ('[{"role": "tool", "content": "x"}]', "messages[0] must be"),
    ('[{"role": "user", "content": 5}]', "messages[0] must be"),
    ('[{"role": "user", "content": "\\udcff"}]', "messages[0]: content is not valid Unicode"),
    ('[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]',
     "messages[1]: a system message must come first"),
])
def test_load_refuses_bad_files(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConversationFileError) as e:
        Conversation.load(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConversationFileError, match="No such file or directory"):
        Conversation.load(tmp_path / "missing.json")


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.json"
    path.write_text("previous")

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(conversation_module.os, "fsync", interrupted)
    conv = Conversation()
    conv.add("user", "x" * 100_000)
    with pytest.raises(KeyboardInterrupt):
        conv.save(path)
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_write_atomically_uses_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_atomically(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o640


# ---- trimming --------------------------------------------------------------------------------


def words(messages: list[dict[str, str]]) -> int:
    """A stand-in token count: words, plus 2 per message for the template."""
    return sum(len(m["content"].split()) + 2 for m in messages)


def conversation(n_turns: int) -> Conversation:
    conv = Conversation(system="sys tem")
    for i in range(n_turns):
        conv.add("user", f"question {i} " + "w " * 8)
        conv.add("assistant", f"answer {i} " + "w " * 8)
    return conv


def test_fit_keeps_a_conversation_that_fits() -> None:
    conv = conversation(3)
    before = conv.messages()
    assert fit_to_context(conv, words, budget=words(before)) == 0
    assert conv.messages() == before


def test_fit_drops_oldest_turns_keeps_system_and_newest() -> None:
    conv = conversation(4)
    conv.add("user", "newest question")
    dropped = fit_to_context(conv, words, budget=40)
    msgs = conv.messages()
    assert dropped == 6 and words(msgs) <= 40
    assert msgs[0] == {"role": "system", "content": "sys tem"}
    assert msgs[1]["content"].startswith("question 3") and msgs[-1]["content"] == "newest question"
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]


def test_fit_starts_the_trimmed_conversation_with_a_user_message() -> None:
    conv = Conversation()
    for role in ("assistant", "assistant", "user", "assistant", "user"):
        conv.add(role, "a b c d")
    fit_to_context(conv, words, budget=12)
    assert [m["role"] for m in conv.turns] == ["user"]


def test_fit_treats_a_render_error_as_too_long() -> None:
    def count(messages: list[dict[str, str]]) -> int:
        if len(messages) > 3:
            raise ValueError("the conversation has 9999 tokens, more than the context")
        return 1

    conv = conversation(3)
    conv.add("user", "new")
    assert fit_to_context(conv, count, budget=10) == 6 and len(conv.messages()) == 2


def test_fit_refuses_a_message_that_cannot_fit_and_changes_nothing() -> None:
    conv = conversation(2)
    conv.add("user", "w " * 100)
    before = conv.messages()
    with pytest.raises(ContextFullError, match="it has 106 tokens; the prompt may use 50"):
        fit_to_context(conv, words, budget=50)
    assert conv.messages() == before


# ---- input -----------------------------------------------------------------------------------


def feed_all(lines: list[str]) -> list[str | None]:
    a = MessageAssembler()
    return [a.feed(line) for line in lines]


def test_single_lines() -> None:
    assert feed_all(["hello", "  spaced  "]) == ["hello", "  spaced  "]


def test_backslash_continues_a_line() -> None:
    assert feed_all(["first \\", "second\\", "third"]) == [None, None, "first \nsecond\nthird"]


def test_triple_quote_blocks() -> None:
    assert feed_all(['"""', "a", "", "  b \\", '"""']) == [None, None, None, None, "a\n\n  b \\"]
    assert feed_all(['"""start', 'end"""']) == [None, "start\nend"]
    assert feed_all(['"""one line"""']) == ["one line"]
    a = MessageAssembler()
    assert a.feed('"""') is None and a.pending
    assert a.feed("typed") is None and a.finish_early() == "typed" and not a.pending


# ---- memory check ----------------------------------------------------------------------------


def test_memory_check_suggests_a_context_that_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """alpaca-chat refuses with the library's formula, so the -c it suggests really loads (it
    used to leave out the library's working-memory margin and suggest a -c that Llama refused)."""
    path = write_tiny_model(tmp_path / "tiny.gguf", TinySpec(context_length=8192))
    mf = open_model_file(path)
    weights = sum(t.data.nbytes for t in mf.tensors.values())
    per_token = mf.config.kv_cache_bytes(1)
    available = weights + model_module.MEMORY_MARGIN_BYTES + 5000 * per_token
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda: available)
    refuse_if_too_large(mf, 4096)
    with pytest.raises(UserError) as e:
        refuse_if_too_large(mf, 8192)
    assert "not enough memory for a context of 8192 tokens" in str(e.value)
    assert str(e.value).endswith("pass -c 4864")
    assert Model(path, n_ctx=4864).n_ctx == 4864  # what Llama, and so alpaca-chat, loads
    monkeypatch.setattr(model_module, "available_memory_bytes", lambda: weights)
    with pytest.raises(UserError, match="use a smaller model"):
        refuse_if_too_large(mf, 512)


# ---- the session -----------------------------------------------------------------------------


class FakeLlama:
    """Answers every conversation with `answer`, chunk by chunk, like create_chat_completion's
    stream; `interrupt_after` chunks raises KeyboardInterrupt (Ctrl-C) instead of going on."""

    def __init__(self, answer: list[str], interrupt_after: int | None = None) -> None:
        self.answer, self.interrupt_after = answer, interrupt_after
        self.seeds: list[int | None] = []

    def n_ctx(self) -> int:
        return 512

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return [0] * words(messages)

    def create_chat_completion(self, messages: list[dict[str, str]], stream: bool,
                               **kwargs: object) -> Iterator[dict[str, object]]:
        assert stream
        self.seeds.append(kwargs["seed"])  # type: ignore[arg-type]

        def chunks() -> Iterator[dict[str, object]]:
            yield {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]}
            for i, piece in enumerate(self.answer):
                if i == self.interrupt_after:
                    raise KeyboardInterrupt
                yield {"choices": [{"delta": {"content": piece}, "finish_reason": None}]}
            yield {"choices": [{"delta": {}, "finish_reason": "stop"}]}
        return chunks()


def session(llm: FakeLlama, seed: int = -1) -> ChatSession:
    return ChatSession(llm, Conversation(system="s"),  # type: ignore[arg-type]
                       SamplingSettings(seed=seed), Style(color=False), verbose=False)


def test_session_keeps_the_answer_and_numbers_the_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    llm = FakeLlama(["Hel", "lo"])
    s = session(llm, seed=7)
    s.ask("hi")
    s.ask("again")
    assert capsys.readouterr().out == "Hello\nHello\n"
    assert [m["role"] for m in s.conv.messages()] == ["system", "user", "assistant", "user",
                                                      "assistant"]
    assert s.conv.turns[1] == {"role": "assistant", "content": "Hello"}
    assert s.command("/params seed=1") and llm.seeds == [7, 8]
    s.ask("third")
    assert llm.seeds == [7, 8, 1]  # a new seed starts its sequence again


def test_session_ctrl_c_keeps_what_was_shown_or_drops_the_question(
        capsys: pytest.CaptureFixture[str]) -> None:
    s = session(FakeLlama(["Hel", "lo"], interrupt_after=1))
    s.ask("hi")
    assert s.conv.turns == [{"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "Hel"}]
    s = session(FakeLlama(["Hel", "lo"], interrupt_after=0))
    s.ask("hi")
    assert s.conv.turns == []
    assert capsys.readouterr().err.count("[stopped]") == 2


def test_session_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = session(FakeLlama(["ok"]))
    s.ask("hi")
    assert s.command(f"/save {tmp_path / 'c.json'}")
    assert s.command("/reset") and s.conv.turns == []
    assert s.command(f"/load {tmp_path / 'c.json'}") and len(s.conv.turns) == 2
    assert s.command("/system be short") and s.conv.system == "be short"
    assert s.command("/nope") and not s.command("/quit")
    err = capsys.readouterr().err
    assert "[saved 3 messages to" in err and "[unknown command /nope;" in err
