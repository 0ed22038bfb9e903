"""``kvcache serve``'s option errors, which need no server stack to be checked."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import invoke


def test_serve_without_an_upstream_names_every_place_one_can_come_from(tmp_path: Path) -> None:
    """--upstream, [serve] upstream and [llm] base_url (kvcache.toml.example: an empty
    [serve] upstream means [llm] base_url) are each enough, so the error names all three."""
    rc, out, err = invoke("serve", home=tmp_path, db=tmp_path / "kv.db")
    assert rc == 2 and out == ""
    assert err.strip() == (
        "kvcache: error: kvcache serve needs --upstream URL "
        "(or [serve] upstream or [llm] base_url in the config)"
    )
