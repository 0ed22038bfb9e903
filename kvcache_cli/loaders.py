"""Conversation files for ``kvcache process``: detection, parsing and validation.

Accepted forms (detected, or forced with ``fmt``):

- ``native``: ``{"session_id", "messages": [{"role", "content", "timestamp"?}], "kv_entries"?}``
- ``openai``: a bare messages list, or ``{"messages": [...]}``
- ``sharegpt``: a list of ``{"id", "conversations": [{"from", "value"}]}`` (one session each)
- ``jsonl``: JSON Lines, each line one of the above (or one message per line, which
  makes the whole file one conversation). A chat-completions request log (each line a
  request whose ``messages`` repeat the history so far) is one conversation: a line
  without a session id whose messages start with all of the previous such line's
  messages continues that conversation instead of starting a new one.

A forced format (``--format``) refuses a file of another form and says what it found.
``-`` reads standard input. UTF-8 (with or without a byte-order mark) and UTF-16/UTF-32
with a byte-order mark are read. Image, audio and file content parts become a visible
placeholder such as ``[image: https://...]``; OpenAI's ``developer`` role is kept (it is
treated like ``system``); ShareGPT's top-level ``system`` text is the first message.

Errors are ``BadInputError`` naming the file and the place (line and column for JSON,
``messages[i]`` for a message). ``validate_file`` checks a whole file before anything is
written, so a bad file writes nothing.
"""

from __future__ import annotations

import json
import sys
import weakref
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


DATA_URL_SHOWN = 40
"""Characters of a ``data:`` URL kept in a placeholder (the rest is counted, not shown)."""


def _shorten_url(url: str) -> str:
    """A URL as shown in a placeholder: ``data:`` URLs cut to their type and size."""
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        return f"{head[:DATA_URL_SHOWN]}, {len(payload)} characters"
    return url


def _part_placeholder(part: dict[str, Any]) -> str | None:
    """``[image: URL]``, ``[audio: wav data]``, ``[file: name]`` for a non-text part."""
    kind = part.get("type")
    if not isinstance(kind, str) or kind in ("text", "input_text"):
        return None
    label = kind.removeprefix("input_").removesuffix("_url")
    value = next((part[k] for k in (kind, f"{label}_url", label) if part.get(k) is not None), None)
    if isinstance(value, dict):
        ref = value.get("url") or value.get("filename") or value.get("file_id")
        if ref is None and "data" in value:
            ref = f"{value.get('format') or 'inline'} data"
    else:
        ref = value if isinstance(value, str) else part.get("url") or part.get("source")
        if isinstance(ref, dict):  # e.g. {"type": "base64", "media_type": ...}
            ref = f"{ref.get('media_type') or ref.get('type') or 'inline'} data"
    if isinstance(ref, str) and ref:
        return f"[{label}: {_shorten_url(ref)}]"
    return f"[{label}]"


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
            elif isinstance(part, dict) and (placeholder := _part_placeholder(part)) is not None:
                parts.append(placeholder)
            else:
                raise _fail(f"{where}.content[{i}]", "content part has no text")
        return "\n".join(parts)
    if value is None:
        raise _fail(where, "message has no content")
    raise _fail(where, f"content must be a string, not {type(value).__name__}")


_ROLE_SET = frozenset(ROLES)


def parse_message(raw: Any, where: str) -> ChatMessage:
    """One OpenAI-style message ``{"role", "content", "timestamp"?, "name"?}``."""
    if (  # the common plain message (role and text): every check below passes, so skip them
        type(raw) is dict
        and len(raw) == 2
        and type(raw.get("content")) is str
        and raw.get("role") in _ROLE_SET
    ):
        return ChatMessage(role=raw["role"], content=raw["content"])
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
    system = raw.get("system")
    if system is not None:  # LLaMA-Factory's form keeps the system prompt beside the turns
        if not isinstance(system, str):
            raise _fail(f"{where}system", f"must be a string, not {_json_type(system)}")
        if system.strip():
            messages.append(ChatMessage(role="system", content=system))
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


# what each forced format reads, and the shapes (see ``_shape``) it accepts
_EXPECTS = {
    "native": ("an object with 'messages' (and 'session_id'), or a list of them", {"messages"}),
    "openai": ("a list of messages, or an object with 'messages'", {"messages", "message list"}),
    "sharegpt": ("ShareGPT: objects with 'conversations' of {from, value} turns", {"sharegpt"}),
}


def _shape(value: Any) -> str:
    """The form of a JSON value: ``sharegpt``, ``messages``, ``message list``, ``message``
    or ``other``."""
    first = value[0] if isinstance(value, list) and value else value
    if not isinstance(first, dict):
        return "message list" if isinstance(value, list) else "other"
    if "conversations" in first:
        return "sharegpt"
    if "messages" in first and "role" not in first:
        return "messages"
    if "role" in first:
        return "message list" if isinstance(value, list) else "message"
    return "message list" if isinstance(value, list) else "other"


def _found(value: Any) -> str:
    """What a JSON value looks like, in words, for an error."""
    many = isinstance(value, list)
    described = {
        "sharegpt": "a ShareGPT list (items with 'conversations')" if many else "a ShareGPT item",
        "messages": "a list of objects with 'messages'" if many else "an object with 'messages'",
        "message list": "a list of OpenAI messages (items with 'role')",
        "message": "a single message (an object with 'role')",
    }.get(_shape(value))
    if described:
        return described
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:6])
        return f"an object with keys {keys}" if keys else "an empty object"
    return _json_type(value)


def _check_format(value: Any, where: str, fmt: str) -> None:
    """A forced ``--format`` refuses a value of another form, naming what it found."""
    if fmt not in _EXPECTS:
        return
    expects, shapes = _EXPECTS[fmt]
    if _shape(value) not in shapes:
        place = where.rstrip(". :") or "file"
        raise _fail(place, f"--format {fmt} expects {expects}, but found {_found(value)}")


def _from_value(value: Any, where: str, fmt: str) -> list[Conversation]:
    """Conversations held by one JSON value (a whole file or one JSONL line)."""
    if isinstance(value, (dict, list)) and value:
        _check_format(value, where, fmt)
    if isinstance(value, dict):
        if "conversations" in value:
            return [_sharegpt_item(value, where)]
        if "messages" in value:
            return [_native(value, where)]
        raise _fail(
            where.rstrip(". :") or "file",
            f"object has neither 'messages' nor 'conversations' (found {_found(value)})",
        )
    if isinstance(value, list):
        if not value:
            return []
        shape = _shape(value)
        if shape == "sharegpt":
            return _each_item(value, where, "conversations", _sharegpt_item)
        if shape == "messages":
            return _each_item(value, where, "messages", _native)
        return [Conversation(None, _parse_messages(value, f"{where}messages"), [], where)]
    raise _fail(where.rstrip(". :") or "file", f"expected a JSON object or list, not {_json_type(value)}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string"}.get(type(value), "value")


STDIN = "-"
"""The file name that means standard input."""

_BOMS = (  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    (b"\xff\xfe\x00\x00", "utf-32-le", "UTF-32"),
    (b"\x00\x00\xfe\xff", "utf-32-be", "UTF-32"),
    (b"\xef\xbb\xbf", "utf-8", "UTF-8"),
    (b"\xff\xfe", "utf-16-le", "UTF-16"),
    (b"\xfe\xff", "utf-16-be", "UTF-16"),
)

_stdin_read: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def is_stdin(path: str | Path) -> bool:
    """Whether ``path`` is ``-`` (standard input)."""
    return str(path) == STDIN


def source_label(path: str | Path) -> str:
    """How errors name a file: its path, or ``<stdin>``."""
    return "<stdin>" if is_stdin(path) else str(path)


def file_stem(path: str | Path) -> str:
    """The session id a file's conversation gets when it names none: the file's stem
    (``stdin`` for ``-``)."""
    return "stdin" if is_stdin(path) else Path(path).stem


def no_conversations_notice(path: str | Path) -> str:
    """The warning for a file that holds no conversation (``[]``)."""
    return f"warning: {source_label(path)}: no conversations in this file; nothing to do"


def _stdin_bytes() -> bytes:
    """Standard input's bytes, read once per stream (``import`` reads a file twice)."""
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    if stream not in _stdin_read:
        data = stream.read()
        _stdin_read[stream] = data.encode("utf-8") if isinstance(data, str) else data
    return _stdin_read[stream]


def _bom(data: bytes) -> tuple[int, str, str] | None:
    """(length, codec, name) of the byte-order mark ``data`` starts with."""
    for mark, codec, name in _BOMS:
        if data.startswith(mark):
            return len(mark), codec, name
    return None


def _read_text(path: Path) -> str:
    label = source_label(path)
    if is_stdin(path):
        data = _stdin_bytes()
    else:
        if path.is_dir():
            raise BadInputError(f"{label}: is a directory, not a conversation file")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadInputError(f"{label}: no such file") from None
        except OSError as exc:
            raise BadInputError(f"{label}: cannot read ({exc.strerror})") from None
    bom = _bom(data)
    if bom is not None and bom[1] != "utf-8":
        size, codec, name = bom
        try:
            text = data[size:].decode(codec)
        except UnicodeDecodeError as exc:
            raise BadInputError(
                f"{label}: invalid {name} at byte {exc.start + size} (the file starts with a {name} mark)"
            ) from None
        if not text.strip():
            raise BadInputError(f"{label}: file is empty")
        return text
    if not data.strip():
        raise BadInputError(f"{label}: file is empty")
    if bom is not None:
        data = data[bom[0] :]
    if b"\x00" in data[:4096]:
        raise BadInputError(f"{label}: binary file, not JSON (UTF-16 or UTF-32 needs a byte-order mark)")
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


def _same_message(a: ChatMessage, b: ChatMessage) -> bool:
    return a.role == b.role and a.content == b.content and a.name == b.name


def _continues(previous: Conversation, conv: Conversation) -> bool:
    """``conv`` is a later request of ``previous``'s conversation: neither names a session
    or carries KV entries, and ``conv``'s messages start with all of ``previous``'s."""
    if previous.session_key is not None or conv.session_key is not None:
        return False
    if previous.kv_entries or conv.kv_entries or not previous.messages:
        return False
    if len(conv.messages) < len(previous.messages):
        return False
    return all(_same_message(a, b) for a, b in zip(previous.messages, conv.messages, strict=False))


def _reply(value: Any, where: str) -> ChatMessage | None:
    """The assistant reply a request-log line may carry (``response.choices[0].message``)."""
    response = value.get("response") if isinstance(value, dict) else None
    if not isinstance(response, dict):
        return None
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    if not isinstance(message, dict) or not message.get("content"):
        return None
    return parse_message(message, f"{where}response.choices[0].message")


def _jsonl_conversations(lines: Iterable[tuple[int, str]], label: str, fmt: str) -> Iterator[Conversation]:
    """Conversations of numbered JSON Lines; loose one-message lines make one conversation,
    and request-log lines that repeat a growing history make one (see ``_continues``)."""
    fmt = _line_format(fmt)
    loose: list[ChatMessage] = []
    loose_line = 0
    pending: Conversation | None = None  # an unnamed conversation a later line may continue
    for number, line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _json_error(label, exc, number - 1) from None
        where = f"{label}:{number}: "
        if (
            fmt in ("auto", "openai")
            and isinstance(value, dict)
            and "role" in value
            and "messages" not in value
        ):
            loose.append(parse_message(value, f"{label}:{number}: message"))
            loose_line = loose_line or number
            continue
        conversations = _from_value(value, where, fmt)
        reply = _reply(value, where)
        if reply is not None and len(conversations) == 1:
            conversations[0].messages.append(reply)
        for conv in conversations:
            if pending is not None and _continues(pending, conv):
                pending = conv
                continue
            if pending is not None:
                yield pending
                pending = None
            if conv.session_key is None and not conv.kv_entries:
                pending = conv
            else:
                yield conv
    if pending is not None:
        yield pending
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
    label = source_label(path)
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
    label = source_label(path)
    if not is_stdin(path) and file.is_dir():
        raise BadInputError(f"{label}: is a directory, not a conversation file")
    if not is_stdin(path) and detect_jsonl(file, "", fmt) and not _starts_with_wide_bom(file):
        yield from _iter_jsonl_stream(file, label, fmt)
        return
    yield from load_file(path, fmt)


def _starts_with_wide_bom(path: Path) -> bool:
    """A UTF-16/UTF-32 byte-order mark: such a file is decoded whole, not streamed by line."""
    try:
        with path.open("rb") as handle:
            bom = _bom(handle.read(4))
    except OSError:
        return False  # the streaming reader names the error
    return bom is not None and bom[1] != "utf-8"
