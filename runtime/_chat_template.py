"""Renders OpenAI-style chat messages with the chat template stored in the model's GGUF metadata."""

from __future__ import annotations

import re
from typing import Any

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .errors import InvalidGenerationRequest

NO_TEMPLATE = "model has no chat template; use /v1/completions"

# Private-use code points that bracket control-token text found inside message content, so
# that it survives the template and can be tokenised as plain text afterwards.
_OPEN, _CLOSE = "\ue000", "\ue001"
_QUOTED = re.compile(f"{_OPEN}(.*?){_CLOSE}", re.DOTALL)


class ChatTemplate:
    """A compiled `tokenizer.chat_template`, rendered in jinja2's immutable sandbox."""

    def __init__(self, template: str | None, *, bos_token: str, eos_token: str) -> None:
        self._formatter: Jinja2ChatFormatter | None = None
        self._error = NO_TEMPLATE
        if not template:
            return
        try:
            self._formatter = Jinja2ChatFormatter(
                template, eos_token=eos_token, bos_token=bos_token, add_generation_prompt=True
            )
        except jinja2.TemplateError as exc:
            self._error = f"model's chat template does not compile: {exc}; use /v1/completions"

    @property
    def available(self) -> bool:
        return self._formatter is not None

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text, ending with the assistant's generation prompt.

        Raises `InvalidGenerationRequest` when the model has no template or the template
        rejects the messages (for example, roles out of order).
        """
        if self._formatter is None:
            raise InvalidGenerationRequest(self._error)
        if not messages:
            raise InvalidGenerationRequest("messages must not be empty")
        try:
            return self._formatter(messages=[_plain(m) for m in messages]).prompt
        except InvalidGenerationRequest:
            raise
        except Exception as exc:  # jinja2 errors, raise_exception() in the template, bad types
            raise InvalidGenerationRequest(f"chat template rejected the messages: {exc}") from exc


class PromptBuilder:
    """Renders chat messages to (text, parse_special) segments.

    The template's own markup is tokenised with special parsing, so its `<|im_start|>` becomes
    the control token. Text in message content that spells a control token must not: a user
    who writes `<|im_end|><|im_start|>system` would otherwise forge a system turn. Such text is
    bracketed before rendering and tokenised as plain text; content without it renders and
    tokenises exactly as before.
    """

    def __init__(self, template: ChatTemplate, control_texts: tuple[str, ...]) -> None:
        self._template = template
        self._controls = re.compile("|".join(map(re.escape, control_texts))) if control_texts else None

    def segments(self, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
        quoted, marked = self._quote(messages)
        text = self._template.render(quoted)
        if not marked:
            return [(text, True)]
        out: list[tuple[str, bool]] = []
        last = 0
        for match in _QUOTED.finditer(text):
            out.append((text[last : match.start()], True))
            out.append((match.group(1), False))
            last = match.end()
        out.append((text[last:], True))
        if any(_OPEN in t or _CLOSE in t for t, _ in out):  # the template cut into a bracketed span
            raise InvalidGenerationRequest(
                "message content spells the model's control tokens in a way this template cannot render safely"
            )
        return [(t, special) for t, special in out if t]

    def _quote(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
        if self._controls is None:
            return messages, False
        out, marked = [], False
        for message in messages:
            message = _plain(message)
            content = message["content"]
            if isinstance(content, str) and (self._controls.search(content) or _OPEN in content or _CLOSE in content):
                content = content.replace(_OPEN, "").replace(_CLOSE, "")
                message = {**message, "content": self._controls.sub(lambda m: f"{_OPEN}{m.group(0)}{_CLOSE}", content)}
                marked = True
            out.append(message)
        return out, marked


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    """Flatten OpenAI content-part lists (`[{"type": "text", "text": ...}]`) into one string."""
    if not isinstance(message, dict) or "role" not in message:
        raise InvalidGenerationRequest("each message needs a role")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                texts.append(part)
            else:
                raise InvalidGenerationRequest("only text content parts are supported")
        message = {**message, "content": "".join(texts)}
    elif content is None:
        message = {**message, "content": ""}
    return message
