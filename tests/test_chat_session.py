"""alpaca-chat's model-free logic: /params parsing, /save and /load, context trimming, input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from alpaca_cpu.cli import chat_session
from alpaca_cpu.cli.chat import UserError, check_memory
from alpaca_cpu.cli.chat_session import (
    ContextFullError,
    Conversation,
    ConversationFileError,
    SamplingSettings,
    fit_to_context,
    write_atomically,
)
from alpaca_cpu.cli.input import MessageAssembler
from alpaca_cpu.config import ModelConfig

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

    monkeypatch.setattr(chat_session.os, "fsync", interrupted)
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


def test_memory_check_suggests_a_context_that_fits(tmp_path: Path) -> None:
    cfg = ModelConfig(n_vocab=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      ffn_dim=128, n_rot=16, rope_base=1e4, rms_eps=1e-5, context_length=4096,
                      tied_embeddings=True)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"\0" * 1_000_000)
    per_token = cfg.kv_cache_bytes(1)  # 256 bytes
    check_memory(model, cfg, 4096, available=1_000_000 + 4096 * per_token)
    with pytest.raises(UserError) as e:
        check_memory(model, cfg, 8192, available=1_000_000 + 5000 * per_token)
    assert "not enough memory for a context of 8192 tokens" in str(e.value)
    assert "pass -c 4864" in str(e.value)
    with pytest.raises(UserError, match="use a smaller model"):
        check_memory(model, cfg, 512, available=900_000)
