"""Llama-3 and Mistral chat: the official templates (tests/data/chat_templates, provenance in
tests/data/README.md) render in our sandbox exactly as plain jinja2 renders them, with and
without tools; the built-in `llama-3` and `mistral` formats give the same text; a chat on a
Llama-3 vocabulary stops at <|eot_id|> (and at every other end-of-generation token)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2.ext
import jinja2.sandbox
import numpy as np
import pytest
from conftest import DATA_DIR
from llama3_mistral_vocab import vocab_metadata
from tiny_model import TinySpec, tiny_weights, write_tiny_model

from alpaca_cpu import Llama
from alpaca_cpu.chat_format import Llama3ChatFormatter, MistralChatFormatter, get_chat_formatter
from alpaca_cpu.chat_template import JinjaChatFormatter
from alpaca_cpu.tokenizer import Tokenizer

TEMPLATES = DATA_DIR / "chat_templates"
LLAMA_TEMPLATES = ["Llama-3.1-8B-Instruct.jinja", "Llama-3.2-3B-Instruct.jinja"]
MISTRAL_TEMPLATE = "Mistral-7B-Instruct-v0.3.jinja"
TOKENS = {"Llama": ("<|begin_of_text|>", "<|eot_id|>"), "Mistral": ("<s>", "</s>")}

CONVERSATION = [
    {"role": "system", "content": "You are terse. Answer in one line."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "  Red.  "},
    {"role": "user", "content": "And another one, in 日本語?"},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def plain_jinja(template: str, messages: list[dict[str, Any]], tools: list | None,
                bos: str, eos: str) -> str:
    """The template rendered by stock jinja2, set up as transformers' apply_chat_template is."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=messages, tools=tools,
                                            add_generation_prompt=True, bos_token=bos,
                                            eos_token=eos)


@pytest.mark.parametrize("name", [*LLAMA_TEMPLATES, MISTRAL_TEMPLATE])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_official_template_renders_as_jinja2(name: str, tools: list | None) -> None:
    template = (TEMPLATES / name).read_text(encoding="utf-8")
    bos, eos = TOKENS[name.split("-")[0]]
    ours = JinjaChatFormatter(template, bos_token=bos, eos_token=eos).render(CONVERSATION,
                                                                             tools=tools)
    assert ours == plain_jinja(template, CONVERSATION, tools, bos, eos)
    assert ours.startswith(bos) and "And another one, in 日本語?" in ours
    if tools is not None:  # the tools section really rendered
        assert "get_weather" in ours and "Current weather in a city" in ours


def test_template_errors_come_from_raise_exception() -> None:
    template = (TEMPLATES / MISTRAL_TEMPLATE).read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="conversation roles must alternate"):
        JinjaChatFormatter(template, "<s>", "</s>").render(CONVERSATION[:2] + CONVERSATION[1:2])


def test_llama31_template_text() -> None:
    """What the official Llama 3.1 template makes of the conversation, spelled out."""
    template = (TEMPLATES / LLAMA_TEMPLATES[0]).read_text(encoding="utf-8")
    assert JinjaChatFormatter(template, *TOKENS["Llama"]).render(CONVERSATION) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are terse. Answer in one line.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a primary colour.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd another one, in 日本語?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


# llama.cpp's own expected output for its built-in "llama3" format
# (tests/test-chat-template.cpp at 0c1e570, its conversation, verbatim)
LLAMA_CPP_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Who are you"},
    {"role": "assistant", "content": "   I am an assistant   "},
    {"role": "user", "content": "Another question"},
]
LLAMA_CPP_LLAMA3 = (
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWho are you<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nI am an assistant<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnother question<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n")
# ... and for the official Mistral v3 template (its expected_output_jinja)
LLAMA_CPP_MISTRAL_V3 = (
    "[INST] Hello[/INST] Hi there</s>[INST] Who are you[/INST] I am an assistant</s>"
    "[INST] You are a helpful assistant\n\nAnother question[/INST]")


def test_builtin_llama3_matches_llama_cpp() -> None:
    assert Llama3ChatFormatter().render(LLAMA_CPP_CONVERSATION) == LLAMA_CPP_LLAMA3


@pytest.mark.parametrize("messages", [
    CONVERSATION, LLAMA_CPP_CONVERSATION, CONVERSATION[1:], CONVERSATION[:2], CONVERSATION[:3]])
def test_builtin_mistral_is_the_official_template_without_bos(messages: list) -> None:
    template = (TEMPLATES / MISTRAL_TEMPLATE).read_text(encoding="utf-8")
    official = plain_jinja(template, messages, None, "<s>", "</s>")
    assert MistralChatFormatter().render(messages) == official.removeprefix("<s>")


def test_builtin_mistral_matches_llama_cpp() -> None:
    assert MistralChatFormatter().render(LLAMA_CPP_CONVERSATION) == LLAMA_CPP_MISTRAL_V3


def test_builtin_formats_refuse_bad_roles() -> None:
    with pytest.raises(ValueError, match="mistral: roles must alternate"):
        MistralChatFormatter().render([CONVERSATION[1], CONVERSATION[1]])
    with pytest.raises(ValueError, match="unknown chat_format 'llama3'"):
        get_chat_formatter("llama3", {})
    assert isinstance(get_chat_formatter("llama-3", {}), Llama3ChatFormatter)
    assert isinstance(get_chat_formatter("mistral", {}), MistralChatFormatter)


# ---- generation stops at <|eot_id|> -------------------------------------------------------


def chain_model(path: Path, md: dict[str, Any], chain: dict[int, int]) -> Path:
    """A one-layer model whose layer adds nothing (zero output projections), so the logits of a
    position depend on its token alone; the output matrix makes token a predict chain[a]."""
    spec = TinySpec(n_vocab=len(md["tokenizer.ggml.tokens"]), dim=64, n_layers=1, n_heads=4,
                    n_kv_heads=2, ffn_dim=64, rope_base=500000.0, context_length=256)
    w = tiny_weights(spec)
    for name in ("blk.0.attn_output.weight", "blk.0.ffn_down.weight"):
        w[name] = np.zeros_like(w[name])
    embd, out = w["token_embd.weight"], w["output.weight"]
    out *= 0.1
    for a, b in chain.items():
        out[b] = embd[a]  # logit of b after a: |embd[a]|^2 ~ dim, every other ~ +-1
    return write_tiny_model(path, spec, md, weights=w)


@pytest.fixture(scope="module")
def llama3_md(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    md = vocab_metadata("llama3", tmp_path_factory.mktemp("vocab"))
    md["tokenizer.chat_template"] = (TEMPLATES / LLAMA_TEMPLATES[0]).read_text(encoding="utf-8")
    return md


@pytest.mark.parametrize("end", ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
def test_chat_stops_at_end_of_generation_tokens(tmp_path: Path, llama3_md: dict[str, Any],
                                                end: str) -> None:
    tok = Tokenizer.from_metadata(llama3_md)
    end_id = tok.tokens.index(end)
    template = JinjaChatFormatter(llama3_md["tokenizer.chat_template"], *TOKENS["Llama"])
    last = tok.encode(template.render(CONVERSATION), add_bos=False, special=True)[-1]
    words = tok.encode("Blue.", add_bos=False)  # the answer the model is made to give
    chain = dict(zip([last, *words], [*words, end_id]))
    llm = Llama(chain_model(tmp_path / "m.gguf", llama3_md, chain), n_ctx=256)
    out = llm.create_chat_completion(CONVERSATION, temperature=0, max_tokens=20)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"]["content"] == "Blue."
    assert out["usage"]["completion_tokens"] == len(words)
    # the same model with the end token banned keeps going to max_tokens
    banned = llm.create_chat_completion(CONVERSATION, temperature=0, max_tokens=6,
                                        logit_bias={end_id: -1e9})
    assert banned["choices"][0]["finish_reason"] == "length"
    assert banned["choices"][0]["message"]["content"].startswith("Blue.")


@pytest.mark.parametrize("template", [True, False], ids=["file-template", "builtin-llama-3"])
def test_alpaca_chat_one_shot_on_a_llama3_file(tmp_path: Path, llama3_md: dict[str, Any],
                                               template: bool) -> None:
    """alpaca-chat on a Llama-3 file: the file's template (or --chat-format llama-3 for a file
    without one), the answer printed, generation ended by <|eot_id|>."""
    from test_chat_cli import SMALL, env_for, run_chat

    md = dict(llama3_md)
    if not template:
        del md["tokenizer.chat_template"]
    tok = Tokenizer.from_metadata(md)
    last = tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_bos=False,
                      special=True)[-1]
    words = tok.encode("Blue.", add_bos=False)
    chain = dict(zip([last, *words], [*words, tok.tokens.index("<|eot_id|>")]))
    path = chain_model(tmp_path / "m.gguf", md, chain)
    args = ["-m", str(path), *SMALL, "--temp", "0", "-p", "Name a colour."]
    proc = run_chat(args + ([] if template else ["--chat-format", "llama-3"]),
                    env_for(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Blue.\n"
