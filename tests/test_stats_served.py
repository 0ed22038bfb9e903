"""``kvcache stats`` (the overview) shows what ``kvcache serve`` recorded on a session:
its slot, the last prompt's size against the slot's context, its slot files, and whose
capacity the threshold is a share of (the config's for ``process``, served sessions
their own). A store serve never touched looks as it always did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvcache_cli.services.chat_turn import record_live
from tests.helpers import build_support_store, invoke


def served_stats(tmp_path: Path, live: dict[str, Any]) -> str:
    """``kvcache stats`` of the support store after serve recorded ``live`` on ``billing``."""
    db = tmp_path / "kv.db"
    store, _ = build_support_store(db)
    try:
        record_live(store, "billing", live)
    finally:
        store.close()
    rc, out, err = invoke("stats", home=tmp_path, db=db)
    assert rc == 0, err
    return out


def test_the_overview_shows_the_slot_and_last_prompt_of_served_sessions(tmp_path: Path) -> None:
    live = {"slot": 1, "last_prompt_tokens": 1834, "n_ctx": 4096, "slot_saves": 3, "slot_restores": 2}
    lines = served_stats(tmp_path, live).splitlines()
    header = next(line for line in lines if line.startswith("session ") and "idle" in line)
    assert header.split()[-3:] == ["slot", "prompt", "files"]
    billing = next(line for line in lines if line.startswith("billing "))
    assert billing.split()[-3:] == ["1", "1834/4096", "3/2"]
    other = next(line for line in lines if line.startswith("quick "))
    assert other.split()[-3:] == ["-", "-", "-"]
    assert "served: last prompt tokens/n_ctx; slot files saved/restored" in lines


def test_the_overview_header_of_a_served_store_says_whose_capacity(tmp_path: Path) -> None:
    out = served_stats(tmp_path, {"slot": 0, "last_prompt_tokens": 900, "n_ctx": 4096})
    assert "threshold" in out and "60% of capacity" in out and "60% of 512.0 MiB" not in out
    note = next(line for line in out.splitlines() if "capacity: config" in line)
    # the config's capacity is process's; the served session's own is the one it recorded
    assert "capacity: config 512.0 MiB (process); served sessions 2.0 MiB (n_ctx less reply reserve)" in note


def test_a_store_serve_never_touched_keeps_its_overview(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    build_support_store(db)[0].close()
    rc, out, err = invoke("stats", home=tmp_path, db=db)
    assert rc == 0, err
    header = next(line for line in out.splitlines() if line.startswith("session ") and "idle" in line)
    assert header.split()[-1] == "idle" and "slot" not in header
    assert "60% of 512.0 MiB" in out and "capacity: config" not in out
