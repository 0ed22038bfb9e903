"""Two stores open in one process: each manager reads and writes only its own store.

The store's models are bound to no database (every query names its store), so a
second ``open_store`` cannot re-point the first manager's writes, and two threads
serving two stores (as ``kvcache serve``'s thread pool may) do not share a binding.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvcache_cli.config import Config
from kvcache_cli.loaders import load_file
from kvcache_cli.services.manager import KVCacheManager
from kvcache_cli.store.backend import open_store
from tests.helpers import conversation, dump_db, write_json


def _conv(tmp_path: Path, name: str, turns: int):  # type: ignore[no-untyped-def]
    [conv] = load_file(write_json(tmp_path / f"{name}.json", conversation(turns, session_id=name)))
    return conv


def _session_keys(path: Path) -> list[str]:
    return sorted(row[1] for row in dump_db(path)["sessions"])


def test_processing_on_the_first_of_two_open_stores_writes_only_there(tmp_path: Path) -> None:
    first = open_store(tmp_path / "first.db")
    second = open_store(tmp_path / "second.db")  # opened after the first: must not take it over
    try:
        one, two = KVCacheManager(first, Config()), KVCacheManager(second, Config())
        a = one.process_conversation(_conv(tmp_path, "alpha", 20), "alpha")
        b = two.process_conversation(_conv(tmp_path, "beta", 5), "beta")
        again = one.process_conversation(_conv(tmp_path, "gamma", 3), "gamma")
        assert len(a.turns) == 20 and a.clears  # a clear and its snapshot went to the first store
        assert len(b.turns) == 5 and len(again.turns) == 3
        assert one.statistics()["session_count"] == 2
        assert two.statistics()["session_count"] == 1
        assert one.retrieve("alpha", "what did we decide about the deadline?").tiers_searched
        assert {s.session_id for s in one.list_snapshots()} == {"alpha"}
        assert {s.session_id for s in two.list_snapshots()} == {"beta"}
    finally:
        first.close()
        second.close()
    assert _session_keys(tmp_path / "first.db") == ["alpha", "gamma"]
    assert _session_keys(tmp_path / "second.db") == ["beta"]
    first_rows = dump_db(tmp_path / "first.db")
    assert len(first_rows["messages"]) == (1 + 2 * 20) + (1 + 2 * 3)
    assert len(dump_db(tmp_path / "second.db")["messages"]) == 1 + 2 * 5


def test_two_threads_on_two_stores_keep_their_rows_apart(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def run(name: str, turns: int) -> None:
        try:
            store = open_store(tmp_path / f"{name}.db")
            try:
                manager = KVCacheManager(store, Config())
                for part in range(3):
                    key = f"{name}-{part}"
                    [conv] = load_file(
                        write_json(tmp_path / f"{key}.json", conversation(turns, session_id=key))
                    )
                    manager.process_conversation(conv, key)
                    manager.snapshot(key)
                    manager.clear(key)
            finally:
                store.close()
        except BaseException as exc:  # reported below, with the thread's name
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name, 12)) for name in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    for name in ("left", "right"):
        assert _session_keys(tmp_path / f"{name}.db") == [f"{name}-{part}" for part in range(3)]
        rows = dump_db(tmp_path / f"{name}.db")
        assert len(rows["messages"]) == 3 * (1 + 2 * 12)


def test_a_query_of_the_unbound_models_without_a_store_fails_loudly(tmp_path: Path) -> None:
    import peewee

    from kvcache_cli.store import models as m

    store = open_store(tmp_path / "s.db")
    try:
        with pytest.raises(peewee.InterfaceError):
            m.Session.select().count()  # no global binding to fall back on
        assert store.bind(m.Session.select()).count() == 0
    finally:
        store.close()
