"""Chat formats: turn a list of ``{"role", "content"}`` messages into one prompt string.

``get_chat_formatter`` picks the format: an explicit ``chat_format`` name first, then the model
file's ``tokenizer.chat_template`` (Jinja, as in Hugging Face ``transformers``), then ``alpaca``.

Built-in formats:

- ``alpaca``: Stanford Alpaca's exact prompt (``train.py`` ``PROMPT_DICT``), with or without its
  ``### Input:`` section. Roles: an optional first ``system`` message replaces the standard
  preamble; each ``user`` message is an instruction; a message with role ``input`` right after a
  ``user`` message is that instruction's input; ``assistant`` messages are earlier responses.
  Multi-turn conversations repeat ``### Instruction:`` / ``### Response:`` sections.
- ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message.
- ``llama-2``: Meta's reference ``chat_completion`` layout.
- ``llama-3``: ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`` per message
  (contents stripped), as Meta's Llama 3 Instruct template and llama.cpp's built-in ``llama3``.
- ``mistral``: Mistral's v3 instruct layout (Mistral 7B Instruct v0.3, Mixtral 8x22B), as its
  official template renders a conversation without tools.

BOS: the built-in formats never start with a BOS token (the tokenizer adds it, as with
llama-cpp-python); ``llama-2`` does contain ``</s><s>`` between turns, and ``chatml`` its control
tokens, so the text must be tokenized with special-token parsing on. A Jinja template decides for
itself (many start with ``{{ bos_token }}``); callers should then not add a second BOS.

Jinja templates are untrusted input (they come with the model file): they render in the metered
sandbox of ``alpaca_cpu.chat_template``. Bad messages and refused templates raise ``ValueError``
(the project's rule for untrusted input, hence ValueError also for wrong types).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from numbers import Integral
from typing import Any, ClassVar, Protocol

from .chat_template import JinjaChatFormatter

__all__ = [
    "BUILTIN_FORMATS",
    "AlpacaChatFormatter",
    "ChatFormatter",
    "ChatMLChatFormatter",
    "JinjaChatFormatter",
    "Llama2ChatFormatter",
    "Llama3ChatFormatter",
    "MistralChatFormatter",
    "get_chat_formatter",
]

BUILTIN_FORMATS = ("alpaca", "chatml", "llama-2", "llama-3", "mistral")


class ChatFormatter(Protocol):
    """Renders a conversation to prompt text; ``stop`` lists extra stop strings of the format."""

    stop: tuple[str, ...]

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str: ...


def get_chat_formatter(
    chat_format: str | None,
    metadata: Mapping[str, Any],
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> ChatFormatter:
    """Choose the chat format: ``chat_format`` by name, else the file's template, else alpaca.

    ``bos_token`` / ``eos_token`` (the token texts a Jinja template sees) default to the texts
    that ``metadata`` gives for ``tokenizer.ggml.bos_token_id`` / ``eos_token_id``.
    """
    if chat_format is not None:
        builtin = _BUILTINS.get(chat_format) if isinstance(chat_format, str) else None
        if builtin is None:
            raise ValueError(
                f"unknown chat_format {chat_format!r}; known formats: {', '.join(BUILTIN_FORMATS)}"
                " (or leave chat_format unset to use the model file's own template)"
            )
        return builtin()
    template = metadata.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(
            f"metadata 'tokenizer.chat_template' must be a string, got {type(template).__name__}"
        )
    if template:
        if bos_token is None:
            bos_token = _token_text(metadata, "tokenizer.ggml.bos_token_id")
        if eos_token is None:
            eos_token = _token_text(metadata, "tokenizer.ggml.eos_token_id")
        return JinjaChatFormatter(template, bos_token=bos_token, eos_token=eos_token)
    return AlpacaChatFormatter()


def _token_text(metadata: Mapping[str, Any], id_key: str) -> str:
    """The text of the token whose id ``metadata[id_key]`` names, or "" when unknown."""
    token_id = metadata.get(id_key)
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(token_id, str) and token_id.isdigit():  # llama-cpp-python keeps values as str
        token_id = int(token_id)
    if not isinstance(token_id, Integral) or isinstance(token_id, bool) or tokens is None:
        return ""
    if not 0 <= token_id < len(tokens):
        return ""
    text = tokens[int(token_id)]
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


# --- built-in formats -----------------------------------------------------------------------


def _role_content_pairs(
    messages: Sequence[Mapping[str, Any]], format_name: str, roles: frozenset[str] | None
) -> list[tuple[str, str]]:
    """Validate ``messages`` for a built-in format: string roles (from ``roles`` if given) and
    string contents (``None`` counts as empty, as OpenAI sends for some assistant messages)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(  # noqa: TRY004
            "messages must be a list of {'role': ..., 'content': ...} mappings"
        )
    pairs = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(  # noqa: TRY004
                f"messages[{i}] must be a mapping, got {type(message).__name__}"
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role or any(c in role for c in "\n\r<>|"):
            raise ValueError(
                f"messages[{i}]['role'] must be a plain non-empty string, got {role!r}"
            )
        if roles is not None and role not in roles:
            raise ValueError(
                f"messages[{i}] has role {role!r}; the {format_name} format accepts "
                f"{', '.join(sorted(roles))}"
            )
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(  # noqa: TRY004
                f"messages[{i}]['content'] must be a string for the {format_name} format, "
                f"got {type(content).__name__}"
            )
        pairs.append((role, content))
    return pairs


def _check_alternating(pairs: list[tuple[str, str]], format_name: str) -> None:
    """Roles user, assistant, user, ... (after the system message was taken off)."""
    for i, (role, _) in enumerate(pairs):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"{format_name}: roles must alternate user/assistant after an optional system "
                f"message; got {role!r} where {expected!r} belongs"
            )


ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)


class AlpacaChatFormatter:
    """Stanford Alpaca. One turn renders exactly as Alpaca was trained::

        {preamble}\\n\\n### Instruction:\\n{user}\\n\\n[### Input:\\n{input}\\n\\n]### Response:

    Earlier answers render as ``### Response:\\n{answer}\\n\\n`` before the next instruction.
    The preamble is the "with input" one when any instruction has an input, or the content of a
    leading ``system`` message (none when that is empty).
    """

    stop: tuple[str, ...] = ("### Instruction:",)
    _ROLES = frozenset({"system", "user", "input", "assistant"})
    # Which role may come right before each role (None: start of the conversation).
    _MAY_FOLLOW: ClassVar[dict[str, tuple[str | None, ...]]] = {
        "user": (None, "assistant"),
        "input": ("user",),
        "assistant": ("user", "input"),
    }

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        pairs = _role_content_pairs(messages, "alpaca", self._ROLES)
        system = pairs.pop(0)[1] if pairs and pairs[0][0] == "system" else None
        previous: str | None = None
        for i, (role, _) in enumerate(pairs):
            if role == "system":
                raise ValueError("alpaca: a system message may only be the first message")
            if previous not in self._MAY_FOLLOW[role]:
                after = f"after {previous!r}" if previous else "first"
                raise ValueError(f"alpaca: a {role!r} message cannot come {after} (message {i})")
            previous = role

        if system is None:
            has_input = any(role == "input" for role, _ in pairs)
            system = ALPACA_PREAMBLE_WITH_INPUT if has_input else ALPACA_PREAMBLE
        parts = [system + "\n\n"] if system else []
        headers = {"user": "### Instruction:", "input": "### Input:", "assistant": "### Response:"}
        parts += [f"{headers[role]}\n{content}\n\n" for role, content in pairs]
        if add_generation_prompt:
            parts.append("### Response:")
        return "".join(parts)


class ChatMLChatFormatter:
    """ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, any role; the
    generation prompt is ``<|im_start|>assistant\\n``."""

    stop: tuple[str, ...] = ("<|im_end|>",)

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        pairs = _role_content_pairs(messages, "chatml", None)
        text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in pairs)
        return text + "<|im_start|>assistant\n" if add_generation_prompt else text


class Llama2ChatFormatter:
    """Llama-2-chat as Meta's reference ``chat_completion`` builds it::

        [INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]

    Contents are stripped like Meta's; roles must alternate user / assistant after an optional
    system message. The text omits the first ``<s>`` (the tokenizer adds BOS). A user turn always
    ends with ``[/INST]``, so ``add_generation_prompt`` changes nothing here.
    """

    stop: tuple[str, ...] = ()
    _ROLES = frozenset({"system", "user", "assistant"})

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        pairs = _role_content_pairs(messages, "llama-2", self._ROLES)
        if pairs and pairs[0][0] == "system":
            system = pairs.pop(0)[1]
            if not pairs:
                raise ValueError("llama-2: a system message must be followed by a user message")
            pairs[0] = (pairs[0][0], f"<<SYS>>\n{system}\n<</SYS>>\n\n{pairs[0][1]}")
        _check_alternating(pairs, "llama-2")
        turns = []
        for i in range(0, len(pairs), 2):
            user = pairs[i][1].strip()
            if i + 1 < len(pairs):
                turns.append(f"[INST] {user} [/INST] {pairs[i + 1][1].strip()} ")
            else:
                turns.append(f"[INST] {user} [/INST]")
        text = "</s><s>".join(turns)
        return text + "</s>" if len(pairs) % 2 == 0 and pairs else text


class Llama3ChatFormatter:
    """Llama 3 Instruct: ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
    per message, any role, contents stripped; the generation prompt is
    ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``. Without the template's leading
    ``<|begin_of_text|>`` (the tokenizer adds BOS)."""

    stop: tuple[str, ...] = ("<|eot_id|>",)

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        pairs = _role_content_pairs(messages, "llama-3", None)
        text = "".join(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"
                       for role, content in pairs)
        if add_generation_prompt:
            text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
        return text


class MistralChatFormatter:
    """Mistral v3 instruct (Mistral 7B Instruct v0.3), as its official template renders a
    conversation without tools::

        [INST] {user}[/INST] {answer}</s>[INST] {system}\\n\\n{last user}[/INST]

    An optional first system message goes into the last message when that is a user message
    (as in the official template, it is left out of a conversation that ends with an answer);
    roles must alternate user / assistant after it; answers are stripped. Without the template's leading ``<s>`` (the
    tokenizer adds BOS). A user turn always ends with ``[/INST]``, so ``add_generation_prompt``
    changes nothing here.
    """

    stop: tuple[str, ...] = ()
    _ROLES = frozenset({"system", "user", "assistant"})

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        pairs = _role_content_pairs(messages, "mistral", self._ROLES)
        system = pairs.pop(0)[1] if pairs and pairs[0][0] == "system" else None
        _check_alternating(pairs, "mistral")
        parts = []
        for i, (role, content) in enumerate(pairs):
            if role == "assistant":
                parts.append(f" {content.strip()}</s>")
            elif i == len(pairs) - 1 and system is not None:
                parts.append(f"[INST] {system}\n\n{content}[/INST]")
            else:
                parts.append(f"[INST] {content}[/INST]")
        return "".join(parts)


_BUILTINS: dict[str, Callable[[], ChatFormatter]] = {
    "alpaca": AlpacaChatFormatter,
    "chatml": ChatMLChatFormatter,
    "llama-2": Llama2ChatFormatter,
    "llama-3": Llama3ChatFormatter,
    "mistral": MistralChatFormatter,
}
