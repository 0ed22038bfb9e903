"""Slot files ``kvcache serve`` saves are tied to their sessions (issue 16.5, 17.7):
``maintain`` (for a session idle beyond the retention) and ``forget`` delete them with
``[llm] slot_save_path``, otherwise list them under ``slot_files_to_delete`` and keep
listing them (a forgotten session's too) until the folder is known."""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from kvcache_cli.llm.client import LLMClient, LLMSettings  # noqa: E402
from kvcache_cli.server.slots import probe_slot_files  # noqa: E402
from kvcache_cli.services import slot_files  # noqa: E402
from kvcache_cli.store.backend import open_store  # noqa: E402
from tests.fake_llama_server import FakeLlamaServer  # noqa: E402
from tests.helpers import copy_sqlite, invoke, invoke_json  # noqa: E402
from tests.pg import BACKENDS, PG_URL, copy_database, empty_database, is_pg, release  # noqa: E402
from tests.serve_util import ServeProcess  # noqa: E402

REAL_LLAMA = "KVCACHE_TEST_LLAMA_URL"  # a real llama-server for the opt-in test (-np N --slot-save-path)


@dataclass
class Served:
    """A store in which ``serve`` saved slot files of three sessions into ``files``."""

    home: Path
    db: str  # a SQLite file or a PostgreSQL URL
    files: Path
    by_session: dict[str, str]  # session -> the file serve saved for it

    def configure(self, slot_folder: bool, folder: Path | None = None) -> Path:
        """Never idle, one snapshot kept; the slot folder (or ``folder``) set or not."""
        text = "[cache]\ngenerate_cache_embeddings = false\n[cache.snapshot]\nmax_snapshots = 1\n"
        text += "[maintenance]\ninactive_hours = 100000.0\n"
        if slot_folder:
            text += f"[llm]\nslot_save_path = {json.dumps(str(folder or self.files))}\n"
        path = self.home / "kvcache.toml"
        path.write_text(text, encoding="utf-8")
        return path

    def json(self, *args: str) -> Any:
        return invoke_json("--config", self.home / "kvcache.toml", *args, home=self.home, db=self.db)

    def on_disk(self) -> set[str]:
        return {p.name for p in self.files.iterdir()}


def _ask(api: Any, history: list[dict[str, str]], session: str, text: str) -> None:
    history.append({"role": "user", "content": text})
    reply = api.chat.completions.create(model="m", messages=history, extra_headers={"X-Session-Id": session})
    history.append({"role": "assistant", "content": reply.choices[0].message.content})


def _what_serve_did(saves: Any, serve: ServeProcess, fake: FakeLlamaServer, metrics: str) -> str:
    """The recorded saves, serve's stderr, its slot metrics and the upstream's requests (a
    failure of the fixture shows what happened)."""
    calls = []
    for r in fake.requests:
        body = r.body if isinstance(r.body, dict) else {}
        if r.path.startswith("/slots") or r.path.endswith("/chat/completions"):
            detail = f"{r.query.get('action', '')} {body.get('filename', '')} id_slot={body.get('id_slot')}"
            calls.append(f"{r.method} {r.path} {detail}")
    slot_metrics = [line for line in metrics.splitlines() if "slot" in line and not line.startswith("#")]
    return "\n".join(
        [f"saved: {saves}", "serve's stderr:", serve.stderr, "metrics:", *slot_metrics, "upstream:", *calls]
    )


def _serve_three_sessions(state: Served) -> None:
    """Three sessions over two slots, taking turns twice round: each is moved out of its
    slot (saved) at least once, A twice (the same file, overwritten)."""
    config = state.configure(slot_folder=False)
    histories: dict[str, list[dict[str, str]]] = {k: [] for k in ("A", "B", "C")}
    with FakeLlamaServer(n_slots=2, n_ctx=2048, slot_save_path=state.files) as fake:
        with ServeProcess(state.home, state.db, fake.url, config=config) as serve:  # type: ignore[arg-type]
            api = serve.openai()
            for key in ("A", "B", "C", "A", "B", "C", "A"):  # each arrival moves the oldest out
                _ask(
                    api, histories[key], f"slot-{key}", f"{key} turn {len(histories[key])}: harbours, ships?"
                )
            metrics = requests.get(serve.url + "/metrics", timeout=30).text
    saves = {}
    for key in ("A", "B", "C"):
        meta = state.json("stats", f"slot-{key}")["sessions"][0]["metadata"]
        saves[key] = meta.get("slot_files_saved", [])
    # one file per session, once
    assert all(len(names) == 1 for names in saves.values()), _what_serve_did(saves, serve, fake, metrics)
    state.by_session = {key: names[0] for key, names in saves.items()}
    assert set(state.by_session.values()) == state.on_disk()


@pytest.fixture(scope="module", params=BACKENDS)
def served_once(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The store and slot folder ``serve`` left (once per backend and module: a serve
    and its upstream take seconds to start; each test gets a copy, see ``served``)."""
    home = tmp_path_factory.mktemp("served")
    files = home / "slots"
    files.mkdir()
    if request.param == "sqlite":
        db = str(home / "kvcache.db")
    elif not PG_URL:
        pytest.skip("set KVCACHE_TEST_PG_URL to run the PostgreSQL tests")
    else:
        db = empty_database()
    try:
        state = Served(home, db, files, {})
        _serve_three_sessions(state)
        yield state
    finally:
        if is_pg(db):
            release(db)


@pytest.fixture
def served(served_once: Served, tmp_path: Path) -> Iterator[Served]:
    """A private copy of what ``serve`` left (store, slot files, config without the
    folder) for a test to change."""
    files = tmp_path / "slots"
    shutil.copytree(served_once.files, files)
    if is_pg(served_once.db):
        db = copy_database(served_once.db)
    else:
        db = str(tmp_path / "kvcache.db")
        copy_sqlite(served_once.db, db)
    state = Served(tmp_path, db, files, dict(served_once.by_session))
    state.configure(slot_folder=False)
    try:
        yield state
    finally:
        if is_pg(db):
            release(db)


def test_serve_files_of_a_live_session_stay_and_forget_lists_then_maintain_keeps_listing(
    served: Served,
) -> None:
    a_file, b_file, c_file = (served.by_session[k] for k in ("A", "B", "C"))
    # pruning snapshots never takes the file a live session restores from
    assert served.json("maintain")["slot_files_to_delete"] == []
    forgotten = served.json("forget", "slot-A", "--yes")
    assert forgotten["sessions"][0]["slot_files"] == [a_file]
    assert forgotten["slot_files_to_delete"] == [a_file] and a_file in served.on_disk()
    # the forgotten session's file is kept waiting: every later maintain lists it
    assert served.json("maintain")["slot_files_to_delete"] == [a_file]
    rc, out, err = invoke(
        "--config", served.home / "kvcache.toml", "maintain", home=served.home, db=served.db
    )
    assert rc == 0 and "1 slot file" in out, out + err
    # B and C idle beyond the retention: released, their serve files wait too (once each)
    idle = served.json("maintain", "--inactive-hours", "0")
    every = sorted([a_file, b_file, c_file])
    assert idle["slot_files_to_delete"] == every
    assert served.json("maintain")["slot_files_to_delete"] == every
    assert served.on_disk() == set(every)  # nothing deleted without the folder

    served.configure(slot_folder=True)
    done = served.json("maintain")
    assert sorted(done["slot_files_deleted"]) == every
    assert done["slot_files_to_delete"] == [] and served.on_disk() == set()
    assert served.json("maintain")["slot_files_to_delete"] == []


def test_forget_with_the_folder_deletes_the_serve_file(served: Served) -> None:
    served.configure(slot_folder=True)
    b_file = served.by_session["B"]
    done = served.json("forget", "slot-B", "--yes")
    assert done["slot_files_deleted"] == [b_file] and done["slot_files_to_delete"] == []
    assert served.on_disk() == {served.by_session["A"], served.by_session["C"]}
    assert served.json("maintain")["slot_files_to_delete"] == []


def test_maintain_with_the_folder_deletes_an_idle_sessions_serve_file(served: Served) -> None:
    served.configure(slot_folder=True)
    done = served.json("maintain", "--inactive-hours", "0")
    assert sorted(done["slot_files_deleted"]) == sorted(served.by_session.values())
    assert not served.on_disk() & set(served.by_session.values())
    # the sessions' history stays; the released sessions no longer name the files
    meta = served.json("stats", "slot-A")["sessions"][0]["metadata"]
    assert "slot_files_saved" not in meta


def test_a_file_saved_again_is_live_again(served: Served) -> None:
    """A released (or forgotten) session's file that serve saves anew leaves the waiting
    lists, so a later maintain with the folder does not delete what the session needs."""
    a_file = served.by_session["A"]
    assert a_file in served.json("maintain", "--inactive-hours", "0")["slot_files_to_delete"]
    store = open_store(served.db)
    try:
        slot_files.record_saved(store, "slot-A", a_file)
        slot_files.record_saved(store, "slot-A", a_file)  # overwritten: recorded once
    finally:
        store.close()
    others = sorted([served.by_session["B"], served.by_session["C"]])
    assert served.json("maintain")["slot_files_to_delete"] == others
    assert served.json("stats", "slot-A")["sessions"][0]["metadata"]["slot_files_saved"] == [a_file]
    served.configure(slot_folder=True)
    assert sorted(served.json("maintain")["slot_files_deleted"]) == others
    assert served.on_disk() == {a_file}
    # released while it was still in a slot (no cache left), saved again when it moved
    # out: a later maintain still finds it idle and lists its file
    served.configure(slot_folder=False)
    assert served.json("maintain", "--inactive-hours", "0")["slot_files_to_delete"] == [a_file]
    # forget then lists it (and only once) with the files of the forgotten session
    assert served.json("forget", "slot-A", "--yes")["slot_files_to_delete"] == [a_file]
    assert served.json("maintain")["slot_files_to_delete"] == [a_file]
    # forgotten while still in a slot: the file serve saves when it moves out waits too
    late = "kvcache-0123456789abcdef01234567-48cd7cd5-2048.bin"
    store = open_store(served.db)
    try:
        slot_files.record_saved(store, "slot-A", late)
    finally:
        store.close()
    assert served.json("maintain")["slot_files_to_delete"] == sorted([a_file, late])


def test_forget_keeps_the_files_it_could_not_delete_waiting(served: Served) -> None:
    served.configure(slot_folder=True, folder=served.home / "no-such-folder")
    b_file = served.by_session["B"]
    done = served.json("forget", "slot-B", "--yes")
    assert done["slot_files_deleted"] == [] and done["slot_files_to_delete"] == [b_file]
    assert served.json("maintain")["slot_files_to_delete"] == [b_file]
    served.configure(slot_folder=True)
    assert served.json("maintain")["slot_files_deleted"] == [b_file] and b_file not in served.on_disk()


def test_trimming_the_history_keeps_a_forgotten_sessions_files_listed(served: Served) -> None:
    a_file = served.by_session["A"]
    assert served.json("forget", "slot-A", "--yes")["slot_files_to_delete"] == [a_file]
    config = served.configure(slot_folder=False)
    config.write_text(config.read_text().replace("[maintenance]\n", "[maintenance]\nhistory_limit = 1\n"))
    trimmed = served.json("maintain")
    assert trimmed["operations_trimmed"] > 0 and trimmed["slot_files_to_delete"] == [a_file]
    assert served.json("maintain")["slot_files_to_delete"] == [a_file]


@contextmanager
def _three_sessions_over_two_slots(
    tmp_path: Path,
) -> Iterator[tuple[FakeLlamaServer, ServeProcess, Path, dict[str, list[dict[str, str]]]]]:
    """A fake upstream with 2 slots and a slot folder, ``kvcache serve`` in front of it,
    and empty histories for sessions A, B and C."""
    files = tmp_path / "slots"
    files.mkdir()
    histories: dict[str, list[dict[str, str]]] = {k: [] for k in ("A", "B", "C")}
    config = Served(tmp_path, str(tmp_path / "kv.db"), files, {}).configure(slot_folder=False)
    with FakeLlamaServer(n_slots=2, n_ctx=2048, slot_save_path=files) as fake:
        with ServeProcess(tmp_path, tmp_path / "kv.db", fake.url, config=config) as serve:
            yield fake, serve, files, histories


def test_a_restarted_upstream_is_noticed_by_a_resident_session_and_the_others_restore(
    tmp_path: Path,
) -> None:
    """After an upstream restart (its slots empty) the first resident session to return
    finds nothing cached: serve then stops taking the sessions of the emptied slots as
    resident, so the next one restores its file instead of a cold prompt."""
    with _three_sessions_over_two_slots(tmp_path) as (fake, serve, files, histories):
        api = serve.openai()
        for key in ("A", "B", "C", "A", "B"):  # A and B end in the slots, all three saved once
            _ask(api, histories[key], f"slot-{key}", f"{key} turn {len(histories[key])}: harbours, ships?")
        assert len(list(files.iterdir())) == 3
        with fake._lock:  # the upstream restarted: its slots are empty
            for slot in fake._slots:
                slot.tokens, slot.id_task = [], None
        _ask(api, histories["A"], "slot-A", "A after the restart")  # resident: nothing cached
        assert serve.traces()[-1]["timings"]["cache_n"] == 0
        _ask(api, histories["B"], "slot-B", "B after the restart")
        back = serve.traces()[-1]
        metrics = requests.get(serve.url + "/metrics", timeout=30).text
    assert back["session"] == "slot-B" and back["timings"]["cache_n"] > 20, serve.stderr
    assert 'kvcache_slot_actions_total{action="resident_check",result="lost"} 1.0' in metrics
    assert 'kvcache_slot_actions_total{action="restore_check",result="reused"} 3.0' in metrics
    assert "'slot-A' found nothing cached (upstream restarted?)" in serve.stderr


@pytest.mark.skipif(not os.environ.get(REAL_LLAMA), reason=f"{REAL_LLAMA} names no llama-server")
def test_a_real_llama_server_restores_a_swapped_out_session(tmp_path: Path) -> None:
    """Opt-in: ``KVCACHE_TEST_LLAMA_URL`` names a llama-server started with ``-np N
    --slot-save-path DIR``. N+1 short sessions over its N slots: the first is saved when
    the last moves in, and restored when it returns; its answer's ``timings`` show the
    restored tokens reused. (It pins that server's slots and leaves its files in DIR.)"""
    url = os.environ[REAL_LLAMA].rstrip("/")
    n_slots = len(requests.get(url + "/slots", timeout=30).json())
    files = tmp_path / "unused"
    files.mkdir()
    config = Served(tmp_path, str(tmp_path / "kv.db"), files, {}).configure(slot_folder=False)
    config.write_text(config.read_text() + "[llm]\nread_timeout = 600.0\n")
    run = uuid.uuid4().hex[:8]  # a file from an earlier run is never restored
    keys = [f"real-{run}-{n}" for n in range(n_slots + 1)]
    histories: dict[str, list[dict[str, str]]] = {k: [] for k in keys}
    first_prompt = 0  # tokens of the first session's first prompt: what its file holds
    with ServeProcess(tmp_path, tmp_path / "kv.db", url, config=config) as serve:
        assert f"slot swapping is on: {n_slots} slot(s)" in serve.stderr
        api = serve.openai(timeout=600)
        for n, key in enumerate([*keys, keys[0]]):
            entries = " ".join(f"Ship {key}-{i} docks at berth {i % 11} with timber." for i in range(8))
            histories[key].append({"role": "user", "content": f"Log {n}. {entries}"})
            reply = api.chat.completions.create(
                model="m", messages=histories[key], max_tokens=4, extra_headers={"X-Session-Id": key}
            )
            histories[key].append({"role": "assistant", "content": reply.choices[0].message.content})
            first_prompt = first_prompt or (reply.usage.prompt_tokens if reply.usage else 0)
        back = serve.traces()[-1]
        metrics = requests.get(serve.url + "/metrics", timeout=30).text
    assert back["session"] == keys[0], serve.stderr
    # more than any other session's prompt shares with it (the chat template's start)
    assert back["timings"]["cache_n"] >= first_prompt > 0, (back["timings"], serve.stderr)
    assert 'kvcache_slot_actions_total{action="restore_check",result="reused"} 1.0' in metrics, metrics
    saved = Served(tmp_path, str(tmp_path / "kv.db"), files, {}).json("stats", keys[0])
    assert len(saved["sessions"][0]["metadata"]["slot_files_saved"]) == 1


def test_the_slot_probe_reads_the_answers_status_not_the_url(tmp_path: Path) -> None:
    """The start-up probe of slot files on a server with ``--slot-save-path`` whose port
    holds "501": swapping stays on. It once searched the error's text, which names the
    URL, for "501", so such a port turned swapping off and no file was saved (the
    fixture above then found no ``slot_files_saved``, about once in eight suite runs)."""
    candidates = [p for p in range(10000, 65536) if "501" in str(p)]
    for port in random.sample(candidates, len(candidates)):
        fake = FakeLlamaServer(slot_save_path=tmp_path, port=port)
        try:
            fake.start()
        except OSError:  # in use
            continue
        break
    else:
        pytest.skip("no free port holding 501")
    try:
        with LLMClient(LLMSettings(base_url=fake.url)) as llm:
            assert probe_slot_files(llm) is None
        with FakeLlamaServer() as without, LLMClient(LLMSettings(base_url=without.url)) as llm:
            assert probe_slot_files(llm) == "the upstream has no --slot-save-path"
    finally:
        fake.stop()


def test_a_session_without_a_saved_file_is_not_restored(tmp_path: Path) -> None:
    """A session moving into a slot is restored only from a file the store records as
    saved for it: the first turns of A, B and C ask for no restore; A, moved out by C
    (its file saved), is restored when it returns. (Serve once asked the upstream to
    restore a file that did not exist on every new session's first turn.)"""
    with _three_sessions_over_two_slots(tmp_path) as (fake, serve, files, histories):
        fake.clear_requests()  # the start-up probe asks for a file that does not exist, on purpose
        api = serve.openai()
        for key in ("A", "B", "C", "A"):  # C moves A out (saved); A comes back (restored)
            _ask(api, histories[key], f"slot-{key}", f"{key} turn {len(histories[key])}: harbours?")
        metrics = requests.get(serve.url + "/metrics", timeout=30).text
    restores = [r.body.get("filename") for r in fake.requests if r.query.get("action") == "restore"]
    saved = {p.name for p in files.iterdir()}
    assert len(saved) == 2 and len(restores) == 1 and restores[0] in saved, (restores, saved)
    assert 'kvcache_slot_actions_total{action="restore",result="ok"} 1.0' in metrics
    assert 'kvcache_slot_actions_total{action="restore",result="no_file"} 3.0' in metrics
