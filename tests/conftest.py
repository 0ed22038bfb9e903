"""Suite-wide set-up: every test gets its own kvcache home, never the user's, and ends
every kvcache process it started."""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

# In-process runs (tests.helpers.invoke) print through consoles made when the CLI is
# first imported: give them the width a subprocess run gets from cli_env.
os.environ["COLUMNS"] = "200"


@pytest.fixture(autouse=True)
def kvcache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private KVCACHE_HOME (data and config) for the test; KVCACHE_DB/CONFIG unset."""
    home = tmp_path_factory.mktemp("kvhome")
    monkeypatch.setenv("KVCACHE_HOME", str(home))
    monkeypatch.delenv("KVCACHE_DB", raising=False)
    monkeypatch.delenv("KVCACHE_CONFIG", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    yield home


def _sigint_state() -> tuple[object, bool]:
    return signal.getsignal(signal.SIGINT), signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.fixture(autouse=True)
def _default_ctrl_c(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts with Ctrl-C at its default (Python's handler, not blocked).

    A process inherits an ignored or blocked SIGINT through exec: kvcache runs that a
    test interrupts would then never see the signal. Under pytest-xdist a worker was
    seen in that state once; a test that leaves it so is named in a warning.
    """
    if _sigint_state() != (signal.default_int_handler, False):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    yield
    if _sigint_state() != (signal.default_int_handler, False):
        warnings.warn(f"{request.node.nodeid} left SIGINT ignored, handled or blocked", stacklevel=1)


@pytest.fixture(autouse=True)
def _stop_leftover_runs() -> Iterator[None]:
    """Background runs (``start_kvcache``) a test left running are killed when it ends."""
    from tests.helpers import stop_leftovers

    yield
    stop_leftovers()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow cases first (stable order otherwise): with workers (``-n``) they start at once
    instead of finishing the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Drop the PostgreSQL test databases this process kept for reuse (``tests/pg.py``)."""
    from tests.pg import drop_spares

    drop_spares()
