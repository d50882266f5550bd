"""Chat formats: exact built-in prompts, the real SmolLM2 template, precedence, and hostile
templates (server-side template injection and resource exhaustion) refused fast."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import jinja2.ext
import jinja2.sandbox
import pytest

from alpaca_cpu.chat_format import (
    BUILTIN_FORMATS,
    AlpacaChatFormatter,
    ChatMLChatFormatter,
    Llama2ChatFormatter,
    get_chat_formatter,
)
from alpaca_cpu.chat_template import RENDER_TIMEOUT_S, JinjaChatFormatter

# Refusals by count (loops, operations, sizes) come within a fraction of a second; the few that
# end on the wall-clock limit take RENDER_TIMEOUT_S. The slack absorbs a loaded CI machine.
REFUSAL_DEADLINE_S = RENDER_TIMEOUT_S + 3.0

# tokenizer.chat_template of SmolLM2-135M-Instruct (the project's real test model), verbatim.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_GOLDEN_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nName three primary colors.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
COLORS = [{"role": "user", "content": "Name three primary colors."}]

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


# --- alpaca -----------------------------------------------------------------------------------


def test_alpaca_single_instruction_is_stanford_exact() -> None:
    assert AlpacaChatFormatter().render(COLORS) == (
        ALPACA_NO_INPUT + "### Instruction:\nName three primary colors.\n\n### Response:"
    )


def test_alpaca_with_input_section_is_stanford_exact() -> None:
    messages = [user("Translate to French."), {"role": "input", "content": "Good morning"}]
    assert AlpacaChatFormatter().render(messages) == (
        ALPACA_WITH_INPUT
        + "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:"
    )


def test_alpaca_multi_turn_system_preamble_and_no_generation_prompt() -> None:
    messages = [system("You are terse."), user("Hi"), assistant("Hello."), user("Bye")]
    formatter = AlpacaChatFormatter()
    assert formatter.render(messages) == (
        "You are terse.\n\n### Instruction:\nHi\n\n### Response:\nHello.\n\n"
        "### Instruction:\nBye\n\n### Response:"
    )
    assert formatter.render(messages[:3], add_generation_prompt=False) == (
        "You are terse.\n\n### Instruction:\nHi\n\n### Response:\nHello.\n\n"
    )
    assert formatter.render([system(""), user("Hi")]) == "### Instruction:\nHi\n\n### Response:"
    assert formatter.stop == ("### Instruction:",)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "input", "content": "x"}], "'input' message cannot come first"),
        ([assistant("x")], "'assistant' message cannot come first"),
        ([user("a"), user("b")], "cannot come after 'user'"),
        ([user("a"), system("b")], "system message may only be the first"),
        ([{"role": "tool", "content": "x"}], "accepts assistant, input, system, user"),
    ],
)
def test_alpaca_refuses_conversations_it_cannot_express(messages: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AlpacaChatFormatter().render(messages)


# --- chatml and llama-2 -------------------------------------------------------------------------


def test_chatml_renders_the_golden_chatml_prompt() -> None:
    # tests/data/smollm2_greedy.json, case "chatml": llama.cpp's prompt for this request.
    # (SmolLM2's own template adds a default system message, so it renders a longer prompt.)
    assert ChatMLChatFormatter().render(COLORS) == (
        "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chatml_exact() -> None:
    formatter = ChatMLChatFormatter()
    messages = [system("Be kind."), user("Hi"), assistant("Hello!")]
    body = (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    assert formatter.render(messages) == body + "<|im_start|>assistant\n"
    assert formatter.render(messages, add_generation_prompt=False) == body
    assert formatter.stop == ("<|im_end|>",)


def test_llama2_exact_with_system_and_history() -> None:
    # Meta strips each turn's whole text (system block included), not the parts inside it.
    messages = [system("You are terse."), user("Hi there "), assistant(" Hello. "), user(" Bye\n")]
    assert Llama2ChatFormatter().render(messages) == (
        "[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello. </s>"
        "<s>[INST] Bye [/INST]"
    )


def test_llama2_exact_without_system_and_ending_with_an_answer() -> None:
    formatter = Llama2ChatFormatter()
    assert formatter.render([user("Hi")]) == "[INST] Hi [/INST]"
    assert formatter.render([user("Hi")], add_generation_prompt=False) == "[INST] Hi [/INST]"
    assert formatter.render([user("Hi"), assistant("Yo")]) == "[INST] Hi [/INST] Yo </s>"
    assert formatter.stop == ()


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([user("a"), user("b")], "must alternate"),
        ([assistant("a")], "must alternate"),
        ([system("s")], "followed by a user message"),
    ],
)
def test_llama2_refuses_non_alternating_roles(messages: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Llama2ChatFormatter().render(messages)


@pytest.mark.parametrize("formatter", [AlpacaChatFormatter(), ChatMLChatFormatter()])
@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "must be a list"),
        ([["user", "hi"]], r"messages\[0\] must be a mapping"),
        ([{"role": "user", "content": 3}], r"\['content'\] must be a string"),
        ([{"content": "hi"}], r"\['role'\] must be a plain non-empty string"),
        ([{"role": "user\n<|im_start|>", "content": "hi"}], r"\['role'\]"),
    ],
)
def test_builtin_formats_validate_messages(formatter: object, messages: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        formatter.render(messages)  # type: ignore[attr-defined]


def test_none_content_counts_as_empty() -> None:
    messages = [user("Hi"), {"role": "assistant", "content": None}]
    assert (
        ChatMLChatFormatter()
        .render(messages, add_generation_prompt=False)
        .endswith("<|im_start|>assistant\n<|im_end|>\n")
    )


# --- Jinja: the real template and transformers compatibility ----------------------------------


def test_smollm2_template_renders_the_golden_prompt() -> None:
    formatter = JinjaChatFormatter(
        SMOLLM2_TEMPLATE, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    assert formatter.render(COLORS) == SMOLLM2_GOLDEN_PROMPT
    assert formatter.stop == ("<|im_end|>",)


def test_smollm2_template_multi_turn_with_system_and_without_generation_prompt() -> None:
    formatter = JinjaChatFormatter(SMOLLM2_TEMPLATE)
    messages = [system("Be brief."), user("Hi"), assistant("Hello!")]
    assert formatter.render(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_template_sees_transformers_variables_and_functions() -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{{ m.content }}{% endfor %}{{ eos_token }}|{{ add_generation_prompt }}"
        "|{{ messages[0].tool_calls | tojson }}|{% generation %}gen{% endgeneration %}"
        "|{{ strftime_now('%Y') | length }}"
    )
    messages = [
        {"role": "user", "content": "a<b>&", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]},
        {"role": "skip", "content": "hidden"},
    ]
    formatter = JinjaChatFormatter(template, bos_token="<s>", eos_token="</s>")
    assert formatter.render(messages, add_generation_prompt=False) == (
        '<s>a<b>&</s>|False|[{"name": "f", "arguments": {"x": 1}}]|gen|4'
    )


def test_trim_blocks_and_lstrip_blocks_as_in_transformers() -> None:
    template = "{% for m in messages %}\n  {{ m.content }}\n  {% if loop.last %}\nend\n  {% endif %}\n{% endfor %}"
    assert JinjaChatFormatter(template).render([user("a"), user("b")]) == "  a\n  b\nend\n"


def test_raise_exception_becomes_a_value_error_with_the_template_message() -> None:
    template = (
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{% endfor %}"
    )
    formatter = JinjaChatFormatter(template)
    with pytest.raises(ValueError, match="raised an error: Conversation roles must alternate"):
        formatter.render([user("a"), user("b")])
    assert formatter.render([user("a"), assistant("b")]) == ""  # still usable


def test_jinja_messages_must_be_plain_data() -> None:
    formatter = JinjaChatFormatter(SMOLLM2_TEMPLATE)
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\] has type object"):
        formatter.render([{"role": "user", "content": object()}])
    deep: dict = {"role": "user", "content": "x"}
    for _ in range(40):
        deep = {"inner": deep}
    with pytest.raises(ValueError, match="nested more than"):
        formatter.render([deep])
    with pytest.raises(ValueError, match="must be a list"):
        formatter.render("hi")  # type: ignore[arg-type]


def test_one_formatter_renders_from_several_threads() -> None:
    formatter = JinjaChatFormatter(SMOLLM2_TEMPLATE)
    results: list[str] = []

    def work() -> None:
        results.extend(formatter.render(COLORS) for _ in range(50))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [SMOLLM2_GOLDEN_PROMPT] * 200


# Template features real chat templates use; the guarded render must equal jinja2's own.
FEATURE_TEMPLATES = [
    (
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ loop.revindex0 }}"
        "{% if loop.last %}L{% endif %}{{ loop.cycle('a', 'b') }}"
        "{% if loop.previtem %}{{ loop.previtem.role }}{% endif %}"
        "{% if loop.changed(m.role) %}c{% endif %},{% else %}empty{% endfor %}"
    ),
    "{% for m in messages if m.role == 'user' %}{{ m.content|upper }}{{ loop.index0 }}{% endfor %}",
    (
        "{% set ns = namespace(last=-1) %}{% for m in messages[::-1] %}"
        "{% if ns.last == -1 and m.role == 'user' %}"
        "{% set ns.last = messages|length - 1 - loop.index0 %}{% endif %}{% endfor %}{{ ns.last }}"
    ),
    (
        "{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|join(' | ') }}"
        "{{ messages|rejectattr('role', 'in', ['user'])|list|length }}"
    ),
    (
        "{% macro fmt(m) %}[{{ m.role|capitalize }}] {{ m.content|trim|truncate(20) }}{% endmacro %}"
        "{% for m in messages %}{{ fmt(m) }}\n{% endfor %}"
    ),
    "{{ messages|tojson }}{{ {'b': 1, 'a': [1, 2.5, none, true]}|tojson(indent=2, sort_keys=true) }}",
    (
        "{% for k, v in messages[0]|dictsort %}{{ k }}={{ v }};{% endfor %}"
        "{{ messages[0].items()|list|length }}{{ messages[0].get('missing', 'default') }}"
    ),
    (
        "{% if messages[0].content.startswith('He') and 'llo' in messages[0].content %}"
        "{{ messages[0].content.split('l')|join('-') }}{{ messages[0].content.replace('l', 'L') }}"
        "{% endif %}"
    ),
    (
        "{{ '%s has %d chars' % (messages[0].role, messages[0].content|length) }}"
        "{{ '{}:{}'.format(1, 'x') }}{{ 'ab' * 3 }}{{ 2 ** 10 }}{{ 7 // 2 }}{{ 7 % 3 }}"
        "{{ [1, 2] + [3] }}{{ (1, 2) }}{{ messages[0].content ~ '!' }}"
    ),
    (
        "{% for m in messages %}{% for c in m.content %}{% if c == 'l' %}{% break %}{% endif %}"
        "{{ c }}{% endfor %}|{% endfor %}"
    ),
    (
        "{% for item in [[1, [2, 3]], [4]] recursive %}"
        "{% if item is iterable %}({{ loop(item) }}){% else %}{{ item }}{% endif %}{% endfor %}"
    ),
    (
        "{% set x %}{% for m in messages %}{{ m.role }}{% endfor %}{% endset %}{{ x|length }}"
        "{{ x|wordwrap(5) }}{{ x|center(20) }}{{ x|indent(2, true) }}"
    ),
    (
        "{% filter upper %}{{ messages[0].content }}{% endfilter %}"
        "{% macro box() %}[{{ caller() }}]{% endmacro %}{% call box() %}inside{% endcall %}"
    ),
]


@pytest.mark.parametrize("template", FEATURE_TEMPLATES)
def test_guards_do_not_change_what_templates_render(template: str) -> None:
    messages = [user("Hello there"), assistant("Hi! How can I help?"), user("  spaces  ")]
    stock = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    stock.filters["tojson"] = lambda value, indent=None, sort_keys=False: json.dumps(
        value, ensure_ascii=False, indent=indent, sort_keys=sort_keys
    )
    expected = stock.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
    )
    assert JinjaChatFormatter(template).render(messages) == expected


# --- precedence ---------------------------------------------------------------------------------


def test_explicit_name_beats_the_file_template() -> None:
    metadata = {"tokenizer.chat_template": SMOLLM2_TEMPLATE}
    assert isinstance(get_chat_formatter("chatml", metadata), ChatMLChatFormatter)
    assert isinstance(get_chat_formatter("llama-2", metadata), Llama2ChatFormatter)
    assert isinstance(get_chat_formatter("alpaca", metadata), AlpacaChatFormatter)
    assert BUILTIN_FORMATS == ("alpaca", "chatml", "llama-2", "llama-3", "mistral")


def test_file_template_beats_the_alpaca_default() -> None:
    formatter = get_chat_formatter(None, {"tokenizer.chat_template": SMOLLM2_TEMPLATE})
    assert isinstance(formatter, JinjaChatFormatter)
    assert formatter.render(COLORS) == SMOLLM2_GOLDEN_PROMPT


@pytest.mark.parametrize("metadata", [{}, {"tokenizer.chat_template": ""}])
def test_alpaca_is_the_default_without_a_template(metadata: dict) -> None:
    assert isinstance(get_chat_formatter(None, metadata), AlpacaChatFormatter)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown chat_format 'vicuna'.*alpaca, chatml, llama-2"):
        get_chat_formatter("vicuna", {})


def test_template_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        get_chat_formatter(None, {"tokenizer.chat_template": ["{{ x }}"]})


@pytest.mark.parametrize("bos_id", [1, "1"])  # numbers, or strings as llama-cpp-python keeps them
def test_bos_and_eos_texts_come_from_the_file_vocabulary(bos_id: object) -> None:
    metadata = {
        "tokenizer.chat_template": "{{ bos_token }}|{{ eos_token }}",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"],
        "tokenizer.ggml.bos_token_id": bos_id,
        "tokenizer.ggml.eos_token_id": 2,
    }
    formatter = get_chat_formatter(None, metadata)
    assert formatter.render([]) == "<s>|</s>"
    assert formatter.stop == ("</s>",)
    overridden = get_chat_formatter(None, metadata, bos_token="B", eos_token="E")
    assert overridden.render([]) == "B|E"


# --- hostile templates: code execution --------------------------------------------------------

SSTI_PAYLOADS = [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ self.__init__.__globals__.__builtins__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ namespace.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__.os }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os') }}",
    "{{ strftime_now.__globals__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ ()|attr('__class__')|attr('__base__') }}",
    "{{ messages|map(attribute='__class__')|list }}",
    "{{ '{0.__class__.__base__}'.format(1) }}",
    "{{ '{m.__class__}'.format_map({'m': messages}) }}",
    "{{ dict.mro() }}",
    "{{ messages.append(1) }}",
    "{% set x = messages.pop() %}",
    "{{ messages[0].update({'role': 'x'}) }}",
]


@pytest.mark.parametrize("payload", SSTI_PAYLOADS)
def test_reaching_for_python_internals_is_refused(payload: str) -> None:
    with pytest.raises(
        ValueError,
        match="chat template refused: unsafe operation: access to "
        "attribute '.*' of '.*' object is unsafe",
    ):
        JinjaChatFormatter(payload).render(COLORS)


def test_a_refused_payload_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = (
        "{{ self.__init__.__globals__.__builtins__.__import__('os')"
        f".system('touch {marker}') }}}}"
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}"
        f"{{% if c.__name__ == 'Popen' %}}{{{{ c(['touch', '{marker}']) }}}}{{% endif %}}"
        "{% endfor %}"
    )
    with pytest.raises(ValueError, match="unsafe"):
        JinjaChatFormatter(payload).render(COLORS)
    assert not marker.exists()


def test_include_extends_and_import_find_nothing() -> None:
    for payload in (
        "{% include '/etc/passwd' %}",
        "{% extends 'base.html' %}",
        "{% import 'macros' as m %}",
    ):
        with pytest.raises(ValueError, match="chat template refused: rendering failed"):
            JinjaChatFormatter(payload).render(COLORS)


def test_unneeded_globals_are_gone() -> None:
    for payload in ("{{ lipsum(100000) }}", "{{ cycler(1, 2) }}"):
        with pytest.raises(ValueError, match="is undefined"):
            JinjaChatFormatter(payload).render(COLORS)


# --- hostile templates: resource exhaustion ---------------------------------------------------

EXHAUSTION_PAYLOADS = {
    "huge range": ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
    "nested loops, no output": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "loops ran more than",
    ),
    "nested loops, output": (
        "{% for i in range(100000) %}{% for j in range(100000) %}"
        + "x" * 64
        + "{% endfor %}{% endfor %}",
        "exceeds",
    ),
    "captured output": (
        "{% set x %}{% for i in range(100000) %}" + "y" * 4000 + "{% endfor %}{% endset %}",
        "characters in all",
    ),
    "string repetition": ("{{ 'x' * 10**10 }}", "repetition with \\*"),
    "list repetition": ("{{ [0] * 10**9 }}", "repetition with \\*"),
    "huge power": ("{{ 7 ** 100000 }}", "power has more than"),
    "center filter": ("{{ 'x'|center(10**9) }}", "'center' filter"),
    "ljust method": ("{{ 'x'.ljust(4000000000) }}", "str.ljust"),
    "format width": ("{{ '{:>999999999}'.format('x') }}", "format width"),
    "printf width": ("{{ '%999999999s' % 'x' }}", "format width"),
    "replace doubling": (
        (
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(60) %}"
            "{% set ns.s = ns.s|replace('x', ns.s) %}{% endfor %}"
        ),
        "'replace' filter",
    ),
    "concat doubling": (
        (
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
            "{% endfor %}"
        ),
        "larger than",
    ),
    "join blow-up": ("{{ range(100000)|join('x' * 100000) }}", "'join' filter"),
    "indent blow-up": ("{{ ('x\n' * 100000)|indent('y' * 100000) }}", "'indent' filter"),
    "list DAG": (
        (
            "{% set ns = namespace(a=[1]) %}{% for i in range(64) %}{% set ns.a = [ns.a, ns.a] %}"
            "{% endfor %}{{ ns.a }}"
        ),
        "larger than",
    ),
    "namespace DAG": (
        (
            "{% set ns = namespace(c=namespace(v=1)) %}{% for i in range(64) %}"
            "{% set m = namespace() %}{% set m.a = ns.c %}{% set m.b = ns.c %}{% set ns.c = m %}"
            "{% endfor %}{{ ns.c }}"
        ),
        "larger than",
    ),
    "dict view of a namespace cycle": (
        (
            "{% set n0 = namespace(v=1) %}{% set d = {'a': n0} %}{% set ns = namespace(c=n0) %}"
            "{% for i in range(64) %}{% set m = namespace() %}{% set m.a = ns.c %}"
            "{% set m.b = ns.c %}{% set ns.c = m %}{% endfor %}{% set n0.link = ns.c %}"
            "{{ d.values() }}"
        ),
        "larger than",
    ),
    "json indent": ("{{ messages|tojson(indent=100000) }}", "tojson indent"),
    "macro fan-out": (
        (
            "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
            "{{ f(60) }}"
        ),
        "calls, filters and operations|longer than",
    ),
    "infinite recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    "recursive loop": (
        "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
        "RecursionError",
    ),
}


@pytest.mark.parametrize("name", sorted(EXHAUSTION_PAYLOADS))
def test_resource_exhaustion_is_bounded_and_fast(name: str) -> None:
    payload, reason = EXHAUSTION_PAYLOADS[name]
    formatter = JinjaChatFormatter(payload)
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"chat template refused: .*({reason})"):
        formatter.render(COLORS)
    assert time.monotonic() - start < REFUSAL_DEADLINE_S


def test_large_legitimate_conversations_still_render() -> None:
    # 2,000 messages of 1 KB: far more than a context holds, well inside every limit.
    messages = [user("x" * 1000) if i % 2 == 0 else assistant("y" * 1000) for i in range(2000)]
    prompt = JinjaChatFormatter(SMOLLM2_TEMPLATE).render(messages)
    assert prompt.count("<|im_end|>") == 2001
    assert len(prompt) > 2_000_000


# --- broken templates ----------------------------------------------------------------------------


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(ValueError, match="chat template refused: syntax error on line 2"):
        JinjaChatFormatter("ok\n{% for m in messages %}")


def test_unknown_filter_is_refused_at_load() -> None:
    with pytest.raises(ValueError, match="chat template refused: .*No filter named 'shell'"):
        JinjaChatFormatter("{{ messages|shell }}")


def test_oversized_template_is_refused() -> None:
    with pytest.raises(ValueError, match="chat template refused: it has .* characters"):
        JinjaChatFormatter("x" * (1 << 20))


def test_runtime_errors_are_value_errors_and_the_formatter_stays_usable() -> None:
    formatter = JinjaChatFormatter(
        "{% if messages[0].content == 'boom' %}{{ 1 / 0 }}{% endif %}{{ messages[0].content }}"
    )
    with pytest.raises(ValueError, match="rendering failed: ZeroDivisionError"):
        formatter.render([user("boom")])
    assert formatter.render([user("fine")]) == "fine"
