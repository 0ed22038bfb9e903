"""``kvcache stats`` (the overview) shows what ``kvcache serve`` recorded on a session:
its slot, the last prompt's size against the slot's context, its slot files."""

from __future__ import annotations

from pathlib import Path

from kvcache_cli.services.chat_turn import record_live
from tests.helpers import build_support_store, invoke


def test_the_overview_shows_the_slot_and_last_prompt_of_served_sessions(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    store, _ = build_support_store(db)
    try:
        live = {"slot": 1, "last_prompt_tokens": 1834, "n_ctx": 4096, "slot_saves": 3, "slot_restores": 2}
        record_live(store, "billing", live)
    finally:
        store.close()
    rc, out, err = invoke("stats", home=tmp_path, db=db)
    assert rc == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("session ") and "idle" in line)
    assert header.split()[-3:] == ["slot", "prompt", "files"]
    billing = next(line for line in lines if line.startswith("billing "))
    assert billing.split()[-3:] == ["1", "1834/4096", "3/2"]
    other = next(line for line in lines if line.startswith("quick "))
    assert other.split()[-3:] == ["-", "-", "-"]
    assert "served: last prompt tokens/n_ctx; slot files saved/restored" in lines


def test_a_store_serve_never_touched_keeps_its_overview(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    build_support_store(db)[0].close()
    rc, out, err = invoke("stats", home=tmp_path, db=db)
    assert rc == 0, err
    header = next(line for line in out.splitlines() if line.startswith("session ") and "idle" in line)
    assert header.split()[-1] == "idle" and "slot" not in header
