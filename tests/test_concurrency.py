"""Issue 5.1: concurrent writers (real processes, one store; SQLite file and PostgreSQL).

8 ``kvcache process`` replay different files into one database while 8 more replay the
same session; all exit 0, nothing is stored twice, no "database is locked" reaches the
user, and the result equals a sequential run of the same files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import (
    check_turn_boundaries,
    integrity,
    invoke,
    logical_state,
    start_kvcache,
    uniform_conversation,
    write_json,
)
from tests.pg import is_pg, store_factory  # noqa: F401  (fixture)

#: every case here starts many processes or kills them: seconds each
pytestmark = pytest.mark.slow

WRITERS = 8
TURNS = 12


def _files(folder: Path) -> tuple[list[Path], Path, dict[str, dict]]:
    folder.mkdir()
    convs = {
        f"own-{i}": uniform_conversation(f"own-{i}", TURNS, topic=f"topic{i}", seed=i) for i in range(WRITERS)
    }
    shared = uniform_conversation("shared", TURNS, topic="shared", seed=99)
    files = [write_json(folder / f"{key}.json", data, compact=True) for key, data in convs.items()]
    convs["shared"] = shared
    return files, write_json(folder / "shared.json", shared, compact=True), convs


def test_sixteen_concurrent_writers_equal_a_sequential_run(
    tmp_path: Path,
    store_factory: Callable[[str], str],  # noqa: F811
) -> None:
    files, shared, convs = _files(tmp_path / "in")
    home = tmp_path / "home"

    seq_db = store_factory("seq")
    # the sequential reference in-process (-j 1: no workers forked from pytest)
    result = invoke("-q", "--db", seq_db, "process", "-j", "1", *map(str, files), str(shared), home=home)
    assert result.returncode == 0, result.stderr

    db = store_factory("conc")
    started = time.monotonic()
    procs = [start_kvcache("-q", "--db", str(db), "process", str(f), "--json", home=home) for f in files]
    procs += [
        start_kvcache("-q", "--db", str(db), "process", str(shared), "--json", home=home)
        for _ in range(WRITERS)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    elapsed = time.monotonic() - started

    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "locked" not in err.lower() and "busy" not in err.lower(), err
    if not is_pg(db):
        assert integrity(Path(db)) == "ok"
    check_turn_boundaries(db, convs)

    expected = sum(len(c["messages"]) for c in convs.values())
    conc, seq = logical_state(db), logical_state(seq_db)
    assert len(conc["messages"]) == expected  # each message exactly once (unique index holds too)
    for part in seq:
        assert conc[part] == seq[part], part
    print(f"\n16 writers: {elapsed:.1f}s wall, {len(conc['messages'])}/{expected} messages stored")
