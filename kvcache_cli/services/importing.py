"""Bulk import of conversation files into the history (tier 3): ``kvcache import``.

``process`` replays a file turn by turn (cache entries, clears, snapshots, summaries,
retrievals: one transaction per turn). ``import`` is the bulk path for large archives:
it only stores the messages, their sessions and the full-text index, so they can be
retrieved (``retrieve``, tier 3) at once. It does NOT fill the active cache, clear,
snapshot, summarise, retrieve or write the turn log. It marks each session with where
the engine has not run (``imported_replay``): a later ``process`` of the conversation
runs those turns through the engine and stores every message once.

How it works, per file:

1. validate: the file is streamed once (JSON Lines line by line; plain JSON parsed
   whole) and every conversation checked, so a bad file writes nothing and the error
   names ``file:line:col``;
2. store: streamed again; messages go in with raw ``executemany`` in batches, ids
   assigned here so the index rows need no re-read; the index rows go in within the
   same transaction (one transaction per ``batch_messages`` messages, whole
   conversations), so at every commit the index matches the messages.

Session ids follow ``process``: the file's own id, else ``--session``, else the file
stem (``stem-N`` for the N-th conversation of a file with several). Re-importing adds
nothing: messages a session already stores (the same prefix, as ``process`` checks)
are skipped, and a file that rewrites a stored conversation is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcache_cli.engine.entries import stored_prefix
from kvcache_cli.engine.memory import estimate_tokens
from kvcache_cli.errors import BadInputError
from kvcache_cli.loaders import Conversation, file_stem, iter_file
from kvcache_cli.store import sessions, sessions_admin
from kvcache_cli.store.connection import Store
from kvcache_cli.store.history_import import HistoryWriter

DEFAULT_BATCH_MESSAGES = 50_000


@dataclass
class FileImport:
    """What one file's import did."""

    path: str
    conversations: int = 0
    messages_total: int = 0
    messages_added: int = 0
    sessions_created: int = 0
    sessions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "conversations": self.conversations,
            "messages_total": self.messages_total,
            "messages_added": self.messages_added,
            "sessions_created": self.sessions_created,
        }


@dataclass
class ImportResult:
    files: list[FileImport] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def messages_added(self) -> int:
        return sum(f.messages_added for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": [f.to_dict() for f in self.files],
            "messages_added": self.messages_added,
            "failed": self.failed,
        }


def session_key_for(conv: Conversation, session: str | None, path: Path, index: int, count: int) -> str:
    """The session id ``process`` would use for conversation ``index`` of ``count``."""
    stem = file_stem(path)
    return conv.session_key or session or (stem if count == 1 else f"{stem}-{index + 1}")


def validate(path: Path, fmt: str = "auto") -> tuple[int, int]:
    """Stream the whole file once; returns (conversations, messages) or raises ``BadInputError``."""
    conversations = messages = 0
    for conv in iter_file(path, fmt):
        conversations += 1
        messages += len(conv.messages)
    return conversations, messages


def _stored_prefix(store: Store, session_id: int, conv: Conversation, label: str, key: str) -> int:
    """How many of ``conv``'s messages the session stores already (``check_prefix``'s rule)."""
    return stored_prefix(sessions.history(store, session_id), conv.messages, label, key)


def import_file(
    store: Store,
    path: str | Path,
    fmt: str = "auto",
    session: str | None = None,
    batch_messages: int = DEFAULT_BATCH_MESSAGES,
    on_progress: Callable[[int, int], None] | None = None,
) -> FileImport:
    """Validate then import one file (see the module doc); returns its counts."""
    file = Path(path)
    count, total = validate(file, fmt)
    result = FileImport(path=str(path), conversations=count, messages_total=total)
    writer = HistoryWriter(store)
    numbered = enumerate(iter_file(file, fmt))
    done = 0
    while True:
        # the next whole conversations up to ``batch_messages`` messages, read before the
        # transaction so that a retried transaction sees the same ones
        chunk: list[tuple[str, Conversation]] = []
        taken = 0
        for index, conv in numbered:
            chunk.append((session_key_for(conv, session, file, index, count), conv))
            taken += len(conv.messages)
            if taken >= batch_messages:
                break
        if not chunk:
            break

        def work(chunk: list[tuple[str, Conversation]] = chunk) -> tuple[int, set[str], list[str]]:
            writer.reset()
            writer.begin()
            added = 0
            keys: list[str] = []
            pending: set[str] = set()
            ids, created = writer.session_ids([key for key, _ in chunk])
            for key, conv in chunk:
                if key in pending:  # the same session twice: its first part must be readable
                    writer.flush()
                    pending.clear()
                    start = _stored_prefix(store, ids[key], conv, str(path), key)
                elif key in created:
                    start = 0
                else:
                    start = _stored_prefix(store, ids[key], conv, str(path), key)
                pending.add(key)
                keys.append(key)
                if start < len(conv.messages):
                    if key not in created:  # the engine has not run what is appended (imported_replay)
                        sessions_admin.mark_engine_from(store, ids[key], start)
                    new = conv.messages[start:]
                    added += writer.add(ids[key], start, new, [estimate_tokens(msg.content) for msg in new])
            writer.flush()
            return added, created, keys

        added, created, keys = store.transaction(work)
        result.messages_added += added
        result.sessions_created += len(created)
        result.sessions.extend(keys)
        done += taken
        if on_progress is not None:
            on_progress(done, total)
    return result


def import_files(
    store: Store,
    paths: list[Path],
    fmt: str = "auto",
    session: str | None = None,
    batch_messages: int = DEFAULT_BATCH_MESSAGES,
    on_error: Callable[[str], None] | None = None,
) -> ImportResult:
    """Import each file; a bad file is reported (``on_error``) and the others go on."""
    result = ImportResult()
    for path in paths:
        try:
            result.files.append(import_file(store, path, fmt, session, batch_messages))
        except BadInputError as exc:
            result.failed.append(str(exc))
            if on_error is not None:
                on_error(str(exc))
    return result
