"""Replay several new conversations at once, on worker processes (SQLite store).

A replay is CPU-bound Python: one conversation keeps one core busy, and SQLite lets
one writer in at a time. So each worker replays one whole conversation, with the same
``KVCacheManager.process_conversation`` as a sequential run, into a private scratch
SQLite file; the parent then copies the finished session into the store in **one
transaction** (``merge_session``), in the order the conversations were given.

Exactness: ids are shifted by the store's current maximum of each table (snapshots:
by ``max(max id, total_snapshots)``, the rule of ``_next_snapshot_id``), so a merged
session gets the very rows, ids included, that a sequential replay in the same order
would have written; wall-clock columns aside. Only conversations whose replay cannot
depend on anything outside their own session are sent to a worker (``eligible``):

- a SQLite file store (the merge is SQLite SQL; on PostgreSQL a replay stays in one
  process: not done, as the issue's target is the embedded default);
- no LLM server (summaries, embeddings and token counts then wait on the server, not
  the CPU, and a server's slots are shared);
- a session new to the store, named once in the command;
- at least ``MIN_WORKER_MESSAGES`` messages (a shorter replay costs less than a
  worker's scratch store and merge);
- small enough for the replay's in-memory tier-3 index (``session_index`` limits):
  a bigger session ranks with the store's full-text statistics, which span sessions.

Everything else is replayed in the parent, turn by turn, as before. So is a job whose
worker failed or died, or whose session another process stored meanwhile: the
parent's own replay then stores and reports exactly what a sequential run would.
Ctrl-C is held back while the workers are forked, so it never lands half-way there.

A scratch store keeps no full-text index (``KVCacheManager.index_history``): the
replay's tier 3 reads its in-memory index, and ``merge_session`` indexes the merged
rows in the real store. Scratch files live in a locked ``.kvcache-replay-*`` folder
beside the database; folders left by a killed run are removed by the next ``process``
(``remove_stale_scratch``), and workers die with their parent (``PR_SET_PDEATHSIG``).

Memory: the caller reads its files ahead in batches of ``READ_AHEAD_BYTES`` (at least
one file) and starts workers per batch, so it holds about one batch of input at a time.

Durability: a worker's conversation reaches the store at once when merged, not turn
by turn; an interrupted run keeps the conversations merged so far, and replaying the
same files again finishes the rest (stored sessions are then extended in the parent).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kvcache_cli.config import Config
from kvcache_cli.loaders import Conversation
from kvcache_cli.services.results import ProcessResult
from kvcache_cli.store import models as m
from kvcache_cli.store.backend import Store, open_store
from kvcache_cli.store.merge import merge_session, stored_keys

if TYPE_CHECKING:
    from kvcache_cli.services.manager import KVCacheManager

U = TypeVar("U")

#: Files are read ahead in batches of about this many bytes on disk (at least one
#: file): the parent must hold a batch's conversations to hand them to workers, so
#: this bounds what a parallel replay holds at once (a sequential one holds one file).
READ_AHEAD_BYTES = 64 * 1024 * 1024
#: Scratch folders are made beside the database, named with this prefix.
SCRATCH_PREFIX = ".kvcache-replay-"
#: A folder being set up (renamed to ``SCRATCH_PREFIX...`` once its lock is held).
_STAGING_PREFIX = ".kvcache-staging-"
#: Fewer messages stay in the parent: a worker's scratch store (~10 ms) and merge
#: (~4 ms) cost more than replaying a short conversation (~1.2 ms a message; 300
#: two-turn conversations took 4.5x longer on workers than in one process).
MIN_WORKER_MESSAGES = 40


@dataclass
class ReplayJob:
    """One conversation to replay and its session key."""

    conv: Conversation
    key: str


def worker_count(requested: int) -> int:
    """Workers for ``--jobs``: 0 means one per usable CPU core."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def can_fork() -> bool:
    """Workers are forked (no re-import, nothing to pickle but the conversation); Linux only."""
    return sys.platform.startswith("linux")


def _file_store(store: Store) -> bool:
    """A SQLite store in a file: what a merge writes to and scratch folders sit beside."""
    return store.is_sqlite and store.location.target != ":memory:"


def workers_for(manager: KVCacheManager, jobs: int) -> int:
    """Workers a replay with ``--jobs jobs`` may use: 0 when it must stay in one process
    (``--jobs 1``, one core, no ``fork``, not a SQLite file, an LLM server in use)."""
    workers = worker_count(jobs)
    if jobs == 1 or workers < 2 or not can_fork() or manager.llm is not None:
        return 0
    return workers if _file_store(manager.store) else 0


def read_ahead(units: Iterable[U], size_of: Callable[[U], int], budget: int) -> Iterator[list[U]]:
    """``units`` in consecutive batches of about ``budget`` (by ``size_of``), at least one
    unit each; ``budget`` 0 gives them one by one."""
    batch: list[U] = []
    total = 0
    for unit in units:
        batch.append(unit)
        total += size_of(unit)
        if total >= budget:
            yield batch
            batch, total = [], 0
    if batch:
        yield batch


def start(manager: KVCacheManager, jobs: Sequence[ReplayJob], workers: int) -> ParallelReplay | None:
    """Send the ``eligible`` jobs to ``workers`` processes; None when fewer than two are.

    Then call ``take`` for every job, in order (the others return None: replay them in
    the caller).
    """
    flags = eligible(manager.store, manager.llm, jobs)
    chosen = [job for job, ok in zip(jobs, flags, strict=True) if ok]
    if len(chosen) < 2:
        return None
    return ParallelReplay(manager.store, manager.config, chosen, workers)


def eligible(store: Store, manager_llm: Any, jobs: Sequence[ReplayJob]) -> list[bool]:
    """Which jobs may be replayed on a worker (see the module doc for the rules)."""
    if not _file_store(store) or manager_llm is not None:
        return [False] * len(jobs)
    from kvcache_cli.retrieval.session_index import MAX_INDEXED_MESSAGES, MAX_INDEXED_TEXT

    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.key] = counts.get(job.key, 0) + 1
    keys = [job.key for job in jobs if counts[job.key] == 1]
    stored = stored_keys(store, keys)
    return [
        counts[job.key] == 1
        and job.key not in stored
        and MIN_WORKER_MESSAGES <= len(job.conv.messages) <= MAX_INDEXED_MESSAGES
        and all(len(msg.content) <= MAX_INDEXED_TEXT for msg in job.conv.messages)
        for job in jobs
    ]


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Hold Ctrl-C back for the block: a SIGINT that arrives meanwhile is raised as
    KeyboardInterrupt when the block ends, never half-way through it."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _worker_setup(parent: int) -> None:
    """Workers leave Ctrl-C to the parent (which stops them) and die with it.

    Without the death signal a worker of a killed parent would go on replaying the
    remaining jobs into scratch files nobody merges.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(1)


def remove_stale_scratch(store: Store) -> int:
    """Remove the scratch folders that killed runs left beside the database; returns
    how many. A live run holds its folder's lock; a staging folder is a run killed
    while setting up, removed once it is a minute old."""
    if not can_fork() or not _file_store(store):
        return 0  # no workers, so no scratch folders, where processes are not forked
    import fcntl

    removed = 0
    beside = Path(store.location.target).parent
    for old in beside.glob(_STAGING_PREFIX + "*"):  # a run killed while setting up
        removed += _remove_if_old(old)
    for old in beside.glob(SCRATCH_PREFIX + "*"):
        try:
            fd = os.open(old / "lock", os.O_RDWR)
        except FileNotFoundError:  # half removed by a run killed while closing
            removed += _remove_if_old(old)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(old)
            removed += 1
        except OSError:
            pass  # a live run's folder (or one we may not remove)
        finally:
            os.close(fd)
    return removed


def _remove_if_old(folder: Path, seconds: float = 60) -> bool:
    """Remove ``folder`` if it was last changed over ``seconds`` ago (no live run's)."""
    import time

    with contextlib.suppress(OSError):
        if time.time() - folder.stat().st_mtime > seconds:
            shutil.rmtree(folder)
            return True
    return False


def _scratch_folder(beside: Path) -> tuple[str, int]:
    """A new private folder for scratch stores, locked while this run (or any of its
    workers) lives. It is made under a staging name and renamed once its lock is held,
    so ``remove_stale_scratch`` never sees it unlocked."""
    import fcntl

    staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=beside)
    fd = os.open(os.path.join(staging, "lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # inherited by the forked workers
        folder = os.path.join(beside, SCRATCH_PREFIX + os.path.basename(staging)[len(_STAGING_PREFIX) :])
        os.rename(staging, folder)
    except BaseException:
        os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder, fd


def _replay_in_worker(job: ReplayJob, config: Config, scratch: str) -> ProcessResult | None:
    """Replay one conversation into a fresh scratch store (runs in a worker process);
    None when it failed, for any reason: the parent then replays it and reports why."""
    from kvcache_cli.services.manager import KVCacheManager

    try:  # any failure (bad input, a full disk, no memory) sends the job back to the parent
        store = open_store(scratch)
        try:
            # a scratch file, thrown away if anything fails: no need to sync it to disk
            store.db.execute_sql("PRAGMA synchronous = OFF")
            manager = KVCacheManager(store, config, None)
            manager.index_history = False  # merge_session indexes the rows in the real store
            return manager.process_conversation(job.conv, job.key)
        finally:
            store.close()
    except Exception:
        return None


def _shift_snapshot_ids(result: ProcessResult, offset: int) -> None:
    """The worker's snapshot ids, as merged into the store."""
    for turn in result.turns:
        turn.snapshot_ids = [i + offset for i in turn.snapshot_ids]
        if turn.clear is not None and turn.clear.snapshot_id is not None:
            turn.clear.snapshot_id += offset


# ------------------------------------------------------------------------------ runner
#: Report records a worker writes on its pipe: (kind, job index), 8 bytes, so every
#: write is atomic (under ``PIPE_BUF``) and a killed worker never leaves half a record.
_RECORD = struct.Struct("<ii")
_STARTED, _REPLAYED, _FAILED = 1, 2, 3


def _claim(queue: int, count: int) -> int | None:
    """The next position in the job order, claimed from the shared ``queue`` file
    (an 8-byte counter under ``flock``, which the kernel releases if a worker dies)."""
    import fcntl

    fcntl.flock(queue, fcntl.LOCK_EX)
    try:
        position = int.from_bytes(os.pread(queue, 8, 0), "little")
        if position >= count:
            return None
        os.pwrite(queue, (position + 1).to_bytes(8, "little"), 0)
        return position
    finally:
        fcntl.flock(queue, fcntl.LOCK_UN)


def _work(jobs: list[ReplayJob], order: list[int], config: Config, folder: str, report: int) -> None:
    """A worker's loop: claim a job, replay it into ``folder/<index>.db``, leave the
    pickled result in ``folder/<index>.result`` and report it; until none is left."""
    queue = os.open(os.path.join(folder, "queue"), os.O_RDWR)
    while (position := _claim(queue, len(order))) is not None:
        index = order[position]
        os.write(report, _RECORD.pack(_STARTED, index))
        result = _replay_in_worker(jobs[index], config, os.path.join(folder, f"{index}.db"))
        if result is not None:
            path = os.path.join(folder, f"{index}.result")
            with open(path + ".tmp", "wb") as handle:
                pickle.dump(result, handle, pickle.HIGHEST_PROTOCOL)
            os.rename(path + ".tmp", path)
        os.write(report, _RECORD.pack(_REPLAYED if result is not None else _FAILED, index))


class ParallelReplay:
    """Replays ``jobs`` on worker processes; ``result(i)`` merges job ``i`` and returns it.

    Call ``result`` in the jobs' order (the store's ids then follow that order). The
    store's connection is closed while the workers are forked (a SQLite connection must
    not cross a fork); the store reconnects on its next query.

    The workers are forked once, share the jobs by fork (nothing is pickled to them),
    take them from a file counter, and hand results back as files. Each reports on its
    own pipe in atomic 8-byte records; the parent reads them on its main thread. No
    pool, no helper threads, no half-written message: ``close`` kills the workers and
    reaps them, and nothing is left that could wait on a dead one.
    """

    def __init__(self, store: Store, config: Config, jobs: Sequence[ReplayJob], workers: int) -> None:
        self.store = store
        self.jobs = list(jobs)
        self.workers = max(1, min(workers, len(self.jobs)))
        self.notices: list[str] = []
        self._by_conversation = {id(job.conv): index for index, job in enumerate(self.jobs)}
        self._dir, self._lock = "", -1
        self._pids: dict[int, int] = {}  # report pipe (read end) -> worker pid
        self._running: dict[int, int] = {}  # report pipe -> job index its worker replays
        self._pending: dict[int, bytes] = {}  # report pipe -> bytes of an unfinished record
        self._outcome: dict[int, int] = {}  # job index -> _REPLAYED or _FAILED
        # Ctrl-C is held back until the workers are forked: a KeyboardInterrupt inside a
        # fork would leave a worker half set up or be swallowed. Callers hold it too
        # until they hold the runner.
        with sigint_held():
            try:
                # beside the database: same disk, same private folder, never a shared /tmp
                self._dir, self._lock = _scratch_folder(Path(store.location.target).parent)
                with open(os.path.join(self._dir, "queue"), "wb") as queue:
                    queue.write(bytes(8))
                store.close()
                # longest first: the last conversation to finish is then a short one
                order = sorted(range(len(self.jobs)), key=lambda i: -len(self.jobs[i].conv.messages))
                for _ in range(self.workers):
                    self._fork(order, config)
            except BaseException:
                self.close()
                raise

    def _fork(self, order: list[int], config: Config) -> None:
        parent = os.getpid()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the caller's code
            code = 1
            try:
                for other in (read, *self._pids):  # only its own write end stays open
                    os.close(other)
                _worker_setup(parent)
                _work(self.jobs, order, config, self._dir, write)
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        self._pids[read] = pid

    def take(self, conv: Conversation) -> ProcessResult | None:
        """``result`` of the job replaying ``conv``; None if none does (or see ``result``)."""
        index = self._by_conversation.pop(id(conv), None)
        return None if index is None else self.result(index)

    def result(self, index: int) -> ProcessResult | None:
        """Job ``index``'s replay, merged into the store; None when the caller must replay
        it itself: the store gained its session meanwhile, or the worker's replay failed
        or its worker died (the caller's own replay then stores and reports exactly what
        a sequential run does, including the turns before a bad one)."""
        while index not in self._outcome and self._pids:
            self._read_reports()
        base = os.path.join(self._dir, str(index))  # the worker's <index>.db and .result
        try:
            outcome = self._outcome.pop(index, None)
            if outcome is None:  # its worker died, or every worker did before it started
                self._note_death()
                return None
            if outcome != _REPLAYED:  # the worker failed: the caller's replay reports why
                return None
            with open(base + ".result", "rb") as handle:
                replayed: ProcessResult = pickle.load(handle)
            offsets = merge_session(self.store, base + ".db", self.jobs[index].key)
            if offsets is None:
                return None
            _shift_snapshot_ids(replayed, offsets[m.Snapshot._meta.table_name])
            return replayed
        finally:
            for suffix in (".db", ".db-wal", ".db-shm", ".result"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(base + suffix)

    def _read_reports(self) -> None:
        """Wait for the next reports of any worker (a Ctrl-C interrupts the wait)."""
        import select

        poller = select.poll()
        for read in self._pids:
            poller.register(read, select.POLLIN)
        for read, _ in poller.poll():
            data = os.read(read, 4096)
            if not data:  # the worker ended: exited when done, or killed
                self._reap(read)
                continue
            data = self._pending.pop(read, b"") + data
            whole = len(data) - len(data) % _RECORD.size
            if whole < len(data):
                self._pending[read] = data[whole:]
            for kind, job in _RECORD.iter_unpack(data[:whole]):
                if kind == _STARTED:
                    self._running[read] = job
                else:
                    self._running.pop(read, None)
                    self._outcome[job] = kind

    def _reap(self, read: int) -> None:
        """A worker's pipe closed: collect the process; a job it was replaying is lost."""
        pid = self._pids.pop(read)
        os.close(read)
        self._pending.pop(read, None)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        if self._running.pop(read, None) is not None:
            self._note_death()

    def _note_death(self) -> None:
        notice = "a replay worker process died (out of memory?); replaying in the main process"
        if notice not in self.notices:
            self.notices.append(notice)

    def close(self) -> None:
        """Stop the workers (pending jobs are dropped) and remove the scratch files.

        Ctrl-C is held back meanwhile, so the workers, folder and lock always go.
        """
        if self._lock < 0:
            return
        with sigint_held():
            for pid in self._pids.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for read in list(self._pids):
                self._running.pop(read, None)  # no notice: the caller stopped them
                self._reap(read)
            shutil.rmtree(self._dir, ignore_errors=True)
            os.close(self._lock)
            self._lock = -1

    def __enter__(self) -> ParallelReplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
