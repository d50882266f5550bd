"""alpaca-chat --json / --json-schema / --grammar-file: one-shot, interactive, and bad files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jsonschema
import pytest
from test_chat_cli import PROMPT, SMALL, env_for, error_line, finish, run_chat, send_line, spawn

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                 "maximum": 99}},
          "required": ["n"], "additionalProperties": False}


@pytest.mark.real_model
def test_one_shot_json_schema(smollm2_path: Path, tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps(SCHEMA))
    proc = run_chat(["-m", str(smollm2_path), *SMALL, "--temp", "1", "-s", "3", "-n", "40",
                     "--json-schema", str(tmp_path / "s.json"), "-p", "A number"],
                    env_for(tmp_path))
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(proc.stdout), SCHEMA)


@pytest.mark.slow
@pytest.mark.real_model
def test_one_shot_json_and_a_cut_off_document(smollm2_path: Path, tmp_path: Path) -> None:
    args = ["-m", str(smollm2_path), *SMALL, "--temp", "1", "-s", "3", "--json"]
    proc = run_chat([*args, "-n", "40", "-p", "A cat"], env_for(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "only the start of a valid one" in proc.stderr  # 40 tokens: this object is longer
    assert proc.stdout.startswith("{")
    # Sampled at temperature 1, an answer may still run past 100 tokens (a long array): then it
    # says so; every answer that ended parses. Three seeds, at least one of which ends.
    ended = 0
    for seed in ("3", "4", "5"):
        seeded = [*args[: args.index("-s") + 1], seed, *args[args.index("-s") + 2 :]]
        proc = run_chat([*seeded, "-n", "100", "-p",
                         'Describe a cat as JSON: {"name": ..., "age": ...}'], env_for(tmp_path))
        assert proc.returncode == 0, proc.stderr
        if "only the start of a valid one" not in proc.stderr:
            assert isinstance(json.loads(proc.stdout), dict)
            ended += 1
    assert ended >= 1


@pytest.mark.real_model
def test_interactive_grammar_file(smollm2_path: Path, tmp_path: Path) -> None:
    (tmp_path / "yn.gbnf").write_text('root ::= "yes" | "no"\n')
    log = io.StringIO()
    child = spawn(["-m", str(smollm2_path), *SMALL, "--temp", "1", "--no-color",
                   "--grammar-file", str(tmp_path / "yn.gbnf")], env_for(tmp_path), log)
    child.expect(PROMPT)
    for question in ("Is fire hot?", "Is ice hot?"):
        send_line(child, question)
        child.expect(PROMPT)
        assert child.before.strip() in ("yes", "no"), child.before
    child.sendeof()
    finish(child, log)


def test_bad_grammar_and_schema_files_fail_before_loading(tmp_path: Path) -> None:
    """The model path is never opened: the constraint is checked first."""
    (tmp_path / "bad.gbnf").write_text('root ::= ("a" | "b"\n')
    (tmp_path / "bad.json").write_text('{"type": "array", "contains": {}}')
    base = ["-m", str(tmp_path / "never-opened.gguf"), "-p", "x"]
    line = error_line(run_chat([*base, "--grammar-file", str(tmp_path / "bad.gbnf")],
                               env_for(tmp_path)))
    assert "bad.gbnf" in line and "line 2, column 1" in line
    line = error_line(run_chat([*base, "--json-schema", str(tmp_path / "bad.json")],
                               env_for(tmp_path)))
    assert "bad.json" in line and "contains" in line
    proc = run_chat([*base, "--json", "--grammar-file", "x.gbnf"], env_for(tmp_path))
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
