"""Suite-wide set-up: every test gets its own kvcache home, never the user's, and ends
every kvcache process it started."""

from __future__ import annotations

import os
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
