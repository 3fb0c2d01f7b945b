"""Renders OpenAI-style chat messages with the chat template stored in the model's GGUF metadata."""

from __future__ import annotations

from typing import Any

import jinja2
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .errors import InvalidGenerationRequest

NO_TEMPLATE = "model has no chat template; use /v1/completions"


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
