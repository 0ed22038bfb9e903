"""The wire format: request models and the OpenAI-style error body.

Only what kvcache reads is typed; every other field of a request is kept as sent
(``extra="allow"``) and forwarded upstream unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    502: "upstream_error",
    503: "unavailable_error",
    504: "timeout_error",
}


class ChatMessageParam(BaseModel):
    """One message of a chat request. ``content`` may be text, content parts or null
    (an assistant message carrying ``tool_calls``)."""

    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: the fields kvcache reads; the rest pass through."""

    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessageParam] = Field(min_length=1)
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    user: str | None = None

    def reply_reserve(self, default: int) -> int:
        """Tokens kept free for the reply: ``max_completion_tokens``, ``max_tokens`` or ``default``."""
        return self.max_completion_tokens or self.max_tokens or default


def error_body(status: int, message: str, code: str, err_type: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "code"}}`` as OpenAI's API answers; ``code`` is
    one of kvcache's stable codes (the README's Serve section lists them)."""
    return {
        "error": {
            "message": message,
            "type": err_type or ERROR_TYPES.get(status, _default_type(status)),
            "code": code,
        }
    }


def _default_type(status: int) -> str:
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def describe_validation_error(errors: list[Any]) -> str:
    """One line from pydantic's errors: ``messages.2.role: Input should be ...``."""
    parts = []
    for err in errors[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"
