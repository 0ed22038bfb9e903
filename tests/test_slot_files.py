"""Slot files of deleted snapshots (issue 17, item 7): deleted with ``[llm]
slot_save_path``, otherwise listed (``slot_files_to_delete``) and counted until they are."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kvcache_cli.cli.app import app
from tests.fake_llama_server import FakeLlamaServer
from tests.helpers import conversation, write_json


class Setup:
    def __init__(self, tmp_path: Path, server: FakeLlamaServer, save: Path) -> None:
        self.tmp_path, self.server, self.save = tmp_path, server, save
        self.db = tmp_path / "kv.db"
        self.config = tmp_path / "kvcache.toml"
        self.configure(slot_folder=False)

    def configure(self, slot_folder: bool) -> None:
        """Keep one snapshot per session; never idle; the slot folder set or not."""
        text = "[cache.snapshot]\nmax_snapshots = 1\n[maintenance]\ninactive_hours = 100000.0\n"
        if slot_folder:
            text += f"[llm]\nslot_save_path = {json.dumps(str(self.save))}\n"
        self.config.write_text(text, encoding="utf-8")

    def run(self, *args: str | Path) -> Any:
        argv = ["--db", self.db, "--config", self.config, *args]
        result = CliRunner().invoke(app, [str(a) for a in argv], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.stderr
        return result

    def snapshot_with_slot(self, session: str) -> str:
        data = json.loads(
            self.run("snapshot", session, "--slot", "0", "--server", self.server.url, "--json").stdout
        )
        name = str(data["slot_filename"])
        assert (self.save / name).exists()
        return name

    def files(self) -> set[str]:
        return {p.name for p in self.save.iterdir()}


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    save = tmp_path / "slots"
    save.mkdir()
    with FakeLlamaServer(n_slots=2, n_ctx=4096, slot_save_path=save) as server:
        s = Setup(tmp_path, server, save)
        for key in ("a", "b"):
            s.run("-q", "process", write_json(tmp_path / f"{key}.json", conversation(6, session_id=key)))
        yield s


def test_maintain_lists_waiting_slot_files_then_deletes_them_once_it_knows_the_folder(setup: Setup) -> None:
    old = [setup.snapshot_with_slot("a") for _ in range(2)]
    newest = setup.snapshot_with_slot("a")
    assert setup.files() == {*old, newest}

    dry = json.loads(setup.run("maintain", "--dry-run", "--json").stdout)
    assert sorted(dry["slot_files_to_delete"]) == sorted(old) and dry["slot_files_deleted"] == []
    first = json.loads(setup.run("maintain", "--json").stdout)
    assert sorted(first["slot_files_to_delete"]) == sorted(old)
    assert setup.files() == {*old, newest}  # no folder configured: nothing deleted
    again = setup.run("maintain")  # a later run, with nothing else to do, still says so
    assert "2 slot files no longer needed wait" in again.stdout
    assert sorted(json.loads(setup.run("maintain", "--json").stdout)["slot_files_to_delete"]) == sorted(old)

    setup.configure(slot_folder=True)
    done = json.loads(setup.run("maintain", "--json").stdout)
    assert sorted(done["slot_files_deleted"]) == sorted(old) and done["slot_files_to_delete"] == []
    assert setup.files() == {newest}  # the kept snapshot's file stays
    assert json.loads(setup.run("maintain", "--json").stdout)["slot_files_to_delete"] == []


def test_forget_deletes_or_lists_the_sessions_slot_files(setup: Setup) -> None:
    a_file = setup.snapshot_with_slot("a")
    b_file = setup.snapshot_with_slot("b")
    listed = json.loads(setup.run("forget", "a", "--yes", "--json").stdout)
    assert listed["slot_files_to_delete"] == [a_file] and a_file in setup.files()
    setup.configure(slot_folder=True)
    deleted = json.loads(setup.run("forget", "b", "--yes", "--json").stdout)
    assert deleted["slot_files_deleted"] == [b_file] and b_file not in setup.files()


def test_a_forgotten_sessions_slot_files_stay_listed_until_the_folder_is_known(setup: Setup) -> None:
    """forget without the folder keeps what it could not delete: maintain lists it, even
    after the history is trimmed, and deletes it once the folder is set."""
    a_file = setup.snapshot_with_slot("a")
    assert json.loads(setup.run("forget", "a", "--yes", "--json").stdout)["slot_files_to_delete"] == [a_file]
    assert json.loads(setup.run("maintain", "--json").stdout)["slot_files_to_delete"] == [a_file]
    setup.run("snapshot", "b")
    setup.run("snapshot", "b")  # history for maintain to trim
    setup.config.write_text(setup.config.read_text() + "history_limit = 1\n", encoding="utf-8")
    listed = json.loads(setup.run("maintain", "--json").stdout)
    assert listed["operations_trimmed"] > 0 and listed["slot_files_to_delete"] == [a_file]
    assert "1 slot file" in setup.run("maintain").stdout and a_file in setup.files()
    setup.configure(slot_folder=True)
    done = json.loads(setup.run("maintain", "--json").stdout)
    assert done["slot_files_deleted"] == [a_file] and a_file not in setup.files()
    assert json.loads(setup.run("maintain", "--json").stdout)["slot_files_to_delete"] == []
