"""Replaying conversation files: load each file, refuse rewrites, replay turn by turn.

``replay_files`` is what ``kvcache process`` (and the server) call. It loads the files
in order, reads ahead a batch for worker processes when the store is a SQLite file
(``parallel_replay``), and replays each conversation through the manager. A file that
cannot be used is reported as a :class:`ReplayFailure` and the run goes on; an
operational error (exit code 1) ends it. Ctrl-C stops it at a turn boundary.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kvcache_cli.errors import KVCacheError

if TYPE_CHECKING:
    from kvcache_cli.loaders import Conversation
    from kvcache_cli.services.manager import KVCacheManager
    from kvcache_cli.services.parallel_replay import ParallelReplay
    from kvcache_cli.services.results import ProcessResult
    from kvcache_cli.store.backend import Store

OnTurn = Callable[[int, int], None]
_LINE_PLACE = re.compile(r":(\d+(?::\d+)?): ")


@dataclass(frozen=True)
class ReplayFailure:
    """A file (or conversation) that could not be replayed, and where."""

    file: str
    place: str
    message: str
    exit_code: int

    @classmethod
    def from_error(cls, path: Path | str, exc: KVCacheError) -> ReplayFailure:
        """Split ``exc``'s text (``FILE[:LINE[:COL]][: PLACE]: MESSAGE``) into its parts."""
        text, label = str(exc), str(path)
        place = ""
        if text.startswith(label):
            rest = text[len(label) :]
            line = _LINE_PLACE.match(rest)
            if line:
                place, rest = line.group(1), rest[line.end() :]
            elif rest.startswith(": "):
                rest = rest[2:]
                head, sep, tail = rest.partition(": ")
                if sep and tail:
                    place, rest = head, tail
            text = rest
        return cls(file=label, place=place, message=text, exit_code=exc.exit_code)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "place": self.place, "message": self.message, "exit_code": self.exit_code}


class ReplayEvents(Protocol):
    """What a replay tells its caller as it goes (see :class:`ReplayListener`)."""

    def progress(self, session_key: str) -> AbstractContextManager[OnTurn | None]: ...
    def session_done(self, result: ProcessResult) -> None: ...
    def failed(self, failure: ReplayFailure, exc: KVCacheError) -> None: ...
    def notice(self, text: str) -> None: ...
    def debug(self, text: str) -> None: ...


class ReplayListener:
    """:class:`ReplayEvents` that do nothing: subclass it and override what you need."""

    def progress(self, session_key: str) -> AbstractContextManager[OnTurn | None]:
        """A context giving a ``(done, total)`` turn callback, or None for no progress."""
        return contextlib.nullcontext(None)

    def session_done(self, result: ProcessResult) -> None:
        """A conversation was replayed."""

    def failed(self, failure: ReplayFailure, exc: KVCacheError) -> None:
        """A file or conversation was refused; the replay goes on."""

    def notice(self, text: str) -> None:
        """Something worth telling a person (e.g. a file already replayed)."""

    def debug(self, text: str) -> None:
        """Detail for ``-v``."""


@dataclass
class ReplayOutcome:
    """Every replayed conversation, every refused file, and whether Ctrl-C stopped the run."""

    results: list[ProcessResult] = field(default_factory=list)
    failures: list[ReplayFailure] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class _Loaded:
    path: Path
    conversations: list[Conversation]
    keys: list[str]
    error: KVCacheError | None


def session_keys(path: Path, conversations: Sequence[Conversation], session: str | None) -> list[str]:
    """Each conversation's session: its own id, else ``session``, else from the file name."""
    from kvcache_cli.loaders import file_stem

    return [
        conv.session_key
        or session
        or (file_stem(path) if len(conversations) == 1 else f"{file_stem(path)}-{index + 1}")
        for index, conv in enumerate(conversations)
    ]


def _load_all(files: Sequence[Path], fmt: str, session: str | None) -> Iterator[_Loaded]:
    from kvcache_cli.loaders import load_file

    for path in files:
        try:
            conversations = load_file(path, fmt)
        except KVCacheError as exc:
            yield _Loaded(path, [], [], exc)  # reported in file order, even when read ahead
            continue
        yield _Loaded(path, conversations, session_keys(path, conversations, session), None)


def _file_size(unit: _Loaded) -> int:
    try:
        return os.path.getsize(unit.path)
    except OSError:
        return 0


def replay_files(
    manager: KVCacheManager,
    store: Store,
    files: Sequence[Path],
    fmt: str = "auto",
    session: str | None = None,
    jobs: int = 0,
    listener: ReplayEvents | None = None,
) -> ReplayOutcome:
    """Replay ``files`` into ``manager``'s store; the caller opens and closes ``store``."""
    events: ReplayEvents = listener or ReplayListener()
    outcome = ReplayOutcome()

    def fail(path: Path, exc: KVCacheError) -> None:
        failure = ReplayFailure.from_error(path, exc)
        outcome.failures.append(failure)
        events.failed(failure, exc)

    def replay(unit: _Loaded, runner: ParallelReplay | None) -> None:
        if not unit.conversations:
            from kvcache_cli.loaders import no_conversations_notice

            events.notice(no_conversations_notice(unit.path))
        pairs = list(zip(unit.conversations, unit.keys, strict=True))
        try:  # a file that rewrites a stored conversation is refused before any write
            for conv, key in pairs:
                manager.check_prefix(key, conv.messages, conv.place.rstrip(": ") or str(unit.path))
        except KVCacheError as exc:
            if exc.exit_code == 1:
                raise
            fail(unit.path, exc)
            return
        for conv, key in pairs:
            try:
                with events.progress(key) as on_turn:
                    result = runner.take(conv) if runner is not None else None
                    if result is None:  # not sent to a worker, or stored meanwhile by another run
                        result = manager.process_conversation(conv, key, on_turn=on_turn)
            except KVCacheError as exc:
                if exc.exit_code == 1:
                    raise
                fail(unit.path, exc)
                continue
            for text in result.notices:
                events.notice(text)
            outcome.results.append(result)
            events.session_done(result)

    try:
        workers, budget = 0, 0
        if store.is_sqlite:
            from kvcache_cli.services import parallel_replay as par

            if par.remove_stale_scratch(store):
                events.debug("removed scratch files of an interrupted parallel replay")
            workers = par.workers_for(manager, jobs)
            budget = par.READ_AHEAD_BYTES if workers else 0
        from kvcache_cli.services.parallel_replay import read_ahead, sigint_held

        for batch in read_ahead(_load_all(files, fmt, session), _file_size, budget):
            runner = None
            try:
                if workers:
                    with sigint_held():  # a Ctrl-C waits until the runner is here to be closed
                        runner = _start_workers(manager, batch, workers, events)
                for unit in batch:
                    if unit.error is not None:
                        fail(unit.path, unit.error)
                    else:
                        replay(unit, runner)
            finally:
                if runner is not None:
                    runner.close()
                    for text in runner.notices:
                        events.notice(text)
    except KeyboardInterrupt:
        outcome.interrupted = True
    return outcome


def _start_workers(
    manager: KVCacheManager, batch: list[_Loaded], workers: int, events: ReplayEvents
) -> ParallelReplay | None:
    """Send a batch's conversations that may run on workers (``parallel_replay``) to them."""
    from kvcache_cli.services.parallel_replay import ReplayJob, start

    jobs = [
        ReplayJob(conv, key)
        for unit in batch
        for conv, key in zip(unit.conversations, unit.keys, strict=True)
    ]
    try:
        runner = start(manager, jobs, workers)
    except OSError as exc:  # no scratch folder beside the database, no processes: one process
        events.debug(f"replaying in one process: {exc}")
        return None
    if runner is not None:
        events.debug(f"replaying {len(runner.jobs)} new conversations on {runner.workers} worker processes")
    return runner
