"""Conversation files for ``kvcache process``: detection, parsing and validation.

Accepted forms (detected, or forced with ``fmt``):

- ``native``: ``{"session_id", "messages": [{"role", "content", "timestamp"?}], "kv_entries"?}``
- ``openai``: a bare messages list, or ``{"messages": [...]}``
- ``sharegpt``: a list of ``{"id", "conversations": [{"from", "value"}]}`` (one session each)
- ``jsonl``: JSON Lines, each line one of the above (or one message per line, which
  makes the whole file one conversation).

Errors are ``BadInputError`` naming the file and the place (line and column for JSON,
``messages[i]`` for a message). ``validate_file`` checks a whole file before anything is
written, so a bad file writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kvcache_cli.engine.entries import ROLES, ChatMessage
from kvcache_cli.errors import BadInputError

FORMATS = ("auto", "native", "openai", "sharegpt", "jsonl")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
    "function": "function",
    "function_call": "function",
    "observation": "function",
    "tool": "tool",
}


@dataclass
class Conversation:
    """One session's messages (and optional KV entries) from a file."""

    session_key: str | None
    messages: list[ChatMessage]
    kv_entries: list[dict[str, Any]] = field(default_factory=list)
    place: str = ""


def _fail(where: str, what: str) -> BadInputError:
    return BadInputError(f"{where}: {what}")


def parse_timestamp(value: Any, where: str) -> datetime | None:
    """ISO-8601 text or a Unix time in seconds, as naive UTC."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise _fail(where, f"timestamp must be ISO-8601 text or a number, not {value!r}")
    if isinstance(value, (int, float)):
        try:
            return datetime.fromtimestamp(float(value), UTC).replace(tzinfo=None)
        except (OverflowError, OSError, ValueError):
            raise _fail(where, f"timestamp {value!r} is out of range") from None
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise _fail(where, f"timestamp {value!r} is not ISO-8601") from None
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(UTC).replace(tzinfo=None)
        return parsed
    raise _fail(where, f"timestamp must be ISO-8601 text or a number, not {type(value).__name__}")


def _content_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") not in (None, "text"):
                continue
            else:
                raise _fail(f"{where}.content[{i}]", "content part has no text")
        return "\n".join(parts)
    if value is None:
        raise _fail(where, "message has no content")
    raise _fail(where, f"content must be a string, not {type(value).__name__}")


def parse_message(raw: Any, where: str) -> ChatMessage:
    """One OpenAI-style message ``{"role", "content", "timestamp"?, "name"?}``."""
    if not isinstance(raw, dict):
        raise _fail(where, f"a message must be an object, not {type(raw).__name__}")
    if "role" not in raw:
        raise _fail(where, "message has no role")
    role = raw["role"]
    if not isinstance(role, str):
        raise _fail(where, f"role must be a string, not {type(role).__name__}")
    if role not in ROLES:
        raise _fail(where, f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if "content" not in raw:
        if raw.get("tool_calls") is not None:
            content = json.dumps(raw["tool_calls"], ensure_ascii=False)
        else:
            raise _fail(where, "message has no content")
    elif raw["content"] is None and raw.get("tool_calls") is not None:
        content = json.dumps(raw["tool_calls"], ensure_ascii=False)
    else:
        content = _content_text(raw["content"], where)
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise _fail(where, f"name must be a string, not {type(name).__name__}")
    timestamp = parse_timestamp(raw.get("timestamp"), f"{where}.timestamp")
    return ChatMessage(role=role, content=content, timestamp=timestamp, name=name)


def _parse_messages(raw: Any, where: str) -> list[ChatMessage]:
    if not isinstance(raw, list):
        raise _fail(where, f"messages must be a list, not {type(raw).__name__}")
    return [parse_message(item, f"{where}[{i}]") for i, item in enumerate(raw)]


def _session_key(raw: dict[str, Any], where: str) -> str | None:
    base = where.rstrip(". :")
    for key in ("session_id", "id"):
        if key in raw and raw[key] is not None:
            value = raw[key]
            place = f"{base}.{key}" if base.endswith("]") else f"{base}: {key}"
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise _fail(place, f"must be a string, not {type(value).__name__}")
            text = str(value).strip()
            if not text:
                raise _fail(place, "must not be empty")
            if len(text) > 256:
                raise _fail(place, "is longer than 256 characters")
            return text
    return None


def _native(raw: dict[str, Any], where: str) -> Conversation:
    messages = _parse_messages(raw["messages"], f"{where}messages")
    entries = raw.get("kv_entries", [])
    if entries is None:
        entries = []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _fail(f"{where}kv_entries", "must be a list of objects")
    for i, entry in enumerate(entries):
        _check_kv_entry(entry, f"{where}kv_entries[{i}]")
    return Conversation(_session_key(raw, where.rstrip(".") or "file"), messages, entries, where)


_KV_TEXT_FIELDS = ("key_data", "text", "value_data", "key_type", "key_hash")
_KV_INT_FIELDS = (
    "value_bytes",
    "layer_index",
    "head_index",
    "access_count",
    "size_bytes",
    "tokens",
    "message_index",
)


def _check_kv_entry(entry: dict[str, Any], where: str) -> None:
    """Check a ``kv_entries`` item's field types now, so a bad one writes nothing."""
    if entry.get("key_data") is None and entry.get("text") is None:
        raise _fail(where, "needs 'key_data' or 'text'")
    for name in _KV_TEXT_FIELDS:
        value = entry.get(name)
        if value is not None and not isinstance(value, str):
            raise _fail(f"{where}.{name}", f"must be a string, not {_json_type(value)}")
    for name in _KV_INT_FIELDS:
        value = entry.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _fail(f"{where}.{name}", f"must be a whole number >= 0, not {value!r}")
    score = entry.get("importance_score")
    bad_type = isinstance(score, bool) or not isinstance(score, (int, float))
    if score is not None and (bad_type or not 0 <= score <= 1):
        raise _fail(f"{where}.importance_score", f"must be a number between 0 and 1, not {score!r}")


def _each_item(
    items: list[Any], where: str, key: str, parse: Callable[[dict[str, Any], str], Conversation]
) -> list[Conversation]:
    """``parse`` each item of a list of conversations; an item without ``key`` is refused."""
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or key not in item:
            raise _fail(f"{where}[{i}]", f"item has no '{key}'")
        out.append(parse(item, f"{where}[{i}]."))
    return out


def _sharegpt_item(raw: dict[str, Any], where: str) -> Conversation:
    turns = raw["conversations"]
    if not isinstance(turns, list):
        raise _fail(f"{where}conversations", f"must be a list, not {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        place = f"{where}conversations[{i}]"
        if not isinstance(turn, dict):
            raise _fail(place, f"a turn must be an object, not {type(turn).__name__}")
        if "from" not in turn:
            raise _fail(place, "turn has no 'from'")
        speaker = turn["from"]
        if not isinstance(speaker, str) or speaker.lower() not in SHAREGPT_ROLES:
            raise _fail(place, f"unknown speaker {speaker!r}")
        if "value" not in turn:
            raise _fail(place, "turn has no 'value'")
        content = _content_text(turn["value"], place)
        messages.append(
            ChatMessage(
                role=SHAREGPT_ROLES[speaker.lower()],
                content=content,
                timestamp=parse_timestamp(turn.get("timestamp"), f"{place}.timestamp"),
            )
        )
    return Conversation(_session_key(raw, where.rstrip(".") or "file"), messages, [], where)


def _from_value(value: Any, where: str, fmt: str) -> list[Conversation]:
    """Conversations held by one JSON value (a whole file or one JSONL line)."""
    if isinstance(value, dict):
        if "conversations" in value and fmt in ("auto", "sharegpt", "jsonl"):
            return [_sharegpt_item(value, where)]
        if "messages" in value and fmt != "sharegpt":
            return [_native(value, where)]
        raise _fail(where.rstrip(". :") or "file", "object has neither 'messages' nor 'conversations'")
    if isinstance(value, list):
        if not value:
            return []
        first = value[0]
        if isinstance(first, dict) and "conversations" in first and fmt != "openai":
            return _each_item(value, where, "conversations", _sharegpt_item)
        if isinstance(first, dict) and "messages" in first and "role" not in first:
            return _each_item(value, where, "messages", _native)
        return [Conversation(None, _parse_messages(value, f"{where}messages"), [], where)]
    raise _fail(where.rstrip(". :") or "file", f"expected a JSON object or list, not {_json_type(value)}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string"}.get(type(value), "value")


def _read_text(path: Path) -> str:
    label = str(path)
    if path.is_dir():
        raise BadInputError(f"{label}: is a directory, not a conversation file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{label}: no such file") from None
    except OSError as exc:
        raise BadInputError(f"{label}: cannot read ({exc.strerror})") from None
    if not data.strip():
        raise BadInputError(f"{label}: file is empty")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\x00" in data[:4096]:
        raise BadInputError(f"{label}: binary file, not JSON")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        bad = data[exc.start : exc.start + 1].hex()
        raise BadInputError(
            f"{label}:{line}: invalid UTF-8 at byte {exc.start} (column {column}, byte 0x{bad})"
        ) from None


def _json_error(label: str, exc: json.JSONDecodeError, line_offset: int = 0) -> BadInputError:
    line = exc.lineno + line_offset
    return BadInputError(f"{label}:{line}:{exc.colno}: invalid JSON: {exc.msg}")


def _line_format(fmt: str) -> str:
    """The item format each JSON Lines line is read with (``jsonl`` means detect)."""
    return "auto" if fmt == "jsonl" else fmt


def _jsonl_conversations(lines: Iterable[tuple[int, str]], label: str, fmt: str) -> Iterator[Conversation]:
    """Conversations of numbered JSON Lines; loose one-message lines make one conversation."""
    fmt = _line_format(fmt)
    loose: list[ChatMessage] = []
    loose_line = 0
    for number, line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _json_error(label, exc, number - 1) from None
        where = f"{label}:{number}: "
        if fmt != "sharegpt" and isinstance(value, dict) and "role" in value and "messages" not in value:
            loose.append(parse_message(value, f"{label}:{number}: message"))
            loose_line = loose_line or number
            continue
        yield from _from_value(value, where, fmt)
    if loose:
        yield Conversation(None, loose, [], f"{label}:{loose_line}")


def _iter_jsonl(text: str, label: str, fmt: str) -> Iterator[Conversation]:
    return _jsonl_conversations(enumerate(text.splitlines(), start=1), label, fmt)


def detect_jsonl(path: Path, text: str, fmt: str) -> bool:
    """JSON Lines by ``--format jsonl`` or by extension (a forced item format applies per line)."""
    if fmt == "jsonl":
        return True
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    return False


def load_file(path: str | Path, fmt: str = "auto") -> list[Conversation]:
    """Parse and validate a whole conversation file; raises ``BadInputError``."""
    if fmt not in FORMATS:
        raise BadInputError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    file = Path(path)
    label = str(path)
    text = _read_text(file)
    if detect_jsonl(file, text, fmt):
        return list(_iter_jsonl(text, label, fmt))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several values: JSON Lines, read with the (forced) item format
            return list(_iter_jsonl(text, label, fmt))
        raise _json_error(label, exc) from None
    return _from_value(value, f"{label}: ", fmt)


def _iter_jsonl_stream(path: Path, label: str, fmt: str = "auto") -> Iterator[Conversation]:
    """Like ``_iter_jsonl`` but reading the file line by line (constant memory per line)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise BadInputError(f"{label}: no such file") from None
    except OSError as exc:
        raise BadInputError(f"{label}: cannot read ({exc.strerror})") from None
    seen = [False]

    def decoded() -> Iterator[tuple[int, str]]:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            seen[0] = True
            if b"\x00" in raw:
                raise BadInputError(f"{label}:{number}: binary data, not JSON")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadInputError(f"{label}:{number}: invalid UTF-8 at byte {exc.start}") from None
            yield number, line

    with handle:
        yield from _jsonl_conversations(decoded(), label, fmt)
    if not seen[0]:
        raise BadInputError(f"{label}: file is empty")


def iter_file(path: str | Path, fmt: str = "auto") -> Iterator[Conversation]:
    """Conversations of a file one at a time: JSON Lines files are streamed line by line.

    A plain JSON file is parsed whole (it is one value). Errors are ``BadInputError``
    naming ``file:line:col`` as ``load_file`` does; conversations before a bad line have
    been yielded already, so validate a whole file (iterate it once) before writing.
    """
    if fmt not in FORMATS:
        raise BadInputError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    file = Path(path)
    label = str(path)
    if file.is_dir():
        raise BadInputError(f"{label}: is a directory, not a conversation file")
    if detect_jsonl(file, "", fmt):
        yield from _iter_jsonl_stream(file, label, fmt)
        return
    yield from load_file(path, fmt)
