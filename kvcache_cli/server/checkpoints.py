"""The write-ahead log of a SQLite store, checkpointed by a thread of ``serve``'s own.

With SQLite's automatic checkpoints, the commit that crosses the threshold copies the
log into the database file and syncs it: on a store of a million messages that commit
took 90-240 ms (1-2% of turns), inside some client's request. ``serve`` opens its store
with ``autocheckpoint=False`` and this thread checkpoints every ``interval`` seconds
instead (``PASSIVE``: it waits for no reader or writer), so no request pays for it;
once more when the server stops. Other processes on the store (``process``,
``maintain``) keep their automatic checkpoints, and serve's commits still checkpoint
past a backstop of 100,000 pages (``store.connection.BACKSTOP_PAGES``) should this
thread fail; its first failure is reported once through ``on_error``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from kvcache_cli.store.backend import Store

INTERVAL_SECONDS = 1.0


class WalCheckpointer:
    """Checkpoints ``store`` every ``interval`` seconds until :meth:`stop`."""

    def __init__(
        self, store: Store, interval: float = INTERVAL_SECONDS, on_error: Callable[[str], None] | None = None
    ) -> None:
        self.store = store
        self.interval = interval
        self.on_error = on_error
        self.failures = 0
        self.last = (0, 0)  # the last checkpoint's (frames in the log, frames checkpointed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvcache-wal-checkpoint", daemon=True)

    def start(self) -> WalCheckpointer:
        self._thread.start()
        return self

    def run_once(self) -> tuple[int, int]:
        """One checkpoint: (frames in the log, frames checkpointed); a busy or failing
        store is tried again next time."""
        try:
            self.last = self.store.checkpoint()
        except Exception as exc:  # best effort: the next round retries, the backstop bounds the log
            self.failures += 1
            if self.failures == 1 and self.on_error is not None:
                self.on_error(
                    f"checkpointing the store's write-ahead log failed ({exc}); retrying every second"
                )
            return 0, 0
        return self.last

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.run_once()
            self.run_once()
        finally:
            with contextlib.suppress(Exception):
                self.store.db.close()  # this thread's connection

    def stop(self) -> None:
        """Checkpoint once more and end the thread."""
        self._stop.set()
        self._thread.join(timeout=30)
