"""The client's messages as kvcache stores and compares them.

``normalise`` turns a request's ``messages`` into :class:`ChatMessage` (the loaders'
rules: content parts joined, tool calls kept as JSON); ``canonical_calls`` gives
``tool_calls`` one shape, so a reply as the upstream sent it and the same message as a
client sends it back are stored and compared alike. Every turn carries the whole
history, so the plain message (only ``role`` and text ``content``) takes
``parse_message``'s short path.
"""

from __future__ import annotations

from typing import Any

from kvcache_cli.engine.entries import ChatMessage
from kvcache_cli.loaders import parse_message


def canonical_calls(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with its ``tool_calls`` in one shape (``id``, ``type``, ``function``:
    ``name``, ``arguments``, in that order)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    shaped = []
    for call in calls:
        if not isinstance(call, dict):
            return message
        given = call.get("function")
        function: dict[str, Any] = given if isinstance(given, dict) else {}
        shaped.append(
            {
                "id": call.get("id"),
                "type": call.get("type") or "function",
                "function": {"name": function.get("name"), "arguments": function.get("arguments")},
            }
        )
    return {**message, "tool_calls": shaped}


def normalise(raw: list[Any]) -> list[ChatMessage]:
    """The request's messages as stored; a bad one is a ``BadInputError`` naming it
    (``messages[i]``)."""
    return [
        parse_message(canonical_calls(message) if isinstance(message, dict) else message, f"messages[{i}]")
        for i, message in enumerate(raw)
    ]
