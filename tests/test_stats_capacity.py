"""``kvcache stats`` of a store ``kvcache serve`` served: the overview says whose capacity
its threshold is a share of (the config's for ``process``, served sessions their own)."""

from __future__ import annotations

from pathlib import Path

from kvcache_cli.services.chat_turn import record_live
from tests.helpers import build_support_store, invoke


def test_the_overview_header_of_a_served_store_says_whose_capacity(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    store, _ = build_support_store(db)
    try:
        record_live(store, "billing", {"slot": 0, "last_prompt_tokens": 900, "n_ctx": 4096})
    finally:
        store.close()
    rc, out, err = invoke("stats", home=tmp_path, db=db)
    assert rc == 0, err
    assert "threshold" in out and "60% of capacity" in out and "60% of 512.0 MiB" not in out
    note = next(line for line in out.splitlines() if "capacity: config" in line)
    # the config's capacity is process's; the served session's own is the one it recorded
    assert "capacity: config 512.0 MiB (process); served sessions 2.0 MiB (n_ctx less reply reserve)" in note


def test_the_overview_header_of_a_store_never_served_is_unchanged(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    build_support_store(db)[0].close()
    rc, out, err = invoke("stats", home=tmp_path, db=db)
    assert rc == 0, err
    assert "60% of 512.0 MiB" in out and "capacity: config" not in out
