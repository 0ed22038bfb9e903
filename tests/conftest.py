"""Suite-wide fixtures: every test gets its own kvcache home, never the user's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def kvcache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private KVCACHE_HOME (data and config) for the test; KVCACHE_DB/CONFIG unset."""
    home = tmp_path_factory.mktemp("kvhome")
    monkeypatch.setenv("KVCACHE_HOME", str(home))
    monkeypatch.delenv("KVCACHE_DB", raising=False)
    monkeypatch.delenv("KVCACHE_CONFIG", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    yield home
