"""Issue 18 item 1: answers, not echoes.

A stored question that matches the query is evidence that its answer follows: the
answer ranks at least as high as the question, both are returned, and every row stays
one stored message (exact content, id, role).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvcache_cli.retrieval import ranking
from kvcache_cli.retrieval import textsearch as ts
from kvcache_cli.services.importing import import_file
from kvcache_cli.store import search
from kvcache_cli.store.backend import open_store
from tests.helpers import invoke

# The roadmap case of examples/support-chat.json (no speaker names, as there): the
# assistant does not know who owns the roadmap, the user then answers it himself.
ROADMAP = [
    ("user", "Our nightly extract overlaps with the backup window."),
    ("assistant", "Move the extract to 01:30; the backup ends at 01:10."),
    ("user", "Let's not do hourly yet. Maybe every 6 hours. Put that on the roadmap."),
    ("assistant", "Noted: a 6-hourly load as a roadmap item, to revisit in two weeks."),
    ("user", "Who owns the roadmap doc?"),
    ("assistant", "From earlier messages I only know Tomás and Dana. I do not have access to it."),
    ("user", "It's Marek. OK. Now the flaky API: the partner feed returns 502 twice a week."),
    ("assistant", "Is the extract retrying? A 502 from a gateway is often transient."),
    ("user", "No retries yet. We will add three with backoff."),
    ("assistant", "Good. Log each retry so the 502 rate stays visible."),
]
QUESTION, ANSWER = 4, 6

# The other speaker answers: "Bob, where ...?" then Alice's reply, which shares no word
# with the query except through its question.
HIKING = [
    ("Alice", "I finally fixed my bike after the crash."),
    ("Bob", "Nice! Did you ride it to work?"),
    ("Alice", "Not yet. Bob, where did you go hiking last weekend?"),
    ("Bob", "Mount Tamalpais, the view over the bay was great."),
    ("Alice", "I want to see it too someday."),
    ("Bob", "Let's plan it for spring then."),
]


def _write(path: Path, session: str, turns: list[tuple[str, str]], named: bool) -> Path:
    msgs: list[dict[str, Any]] = []
    for i, (who, text) in enumerate(turns):
        if named:
            msgs.append(
                {"role": "user" if i % 2 == 0 else "assistant", "name": who, "content": f"{who}: {text}"}
            )
        else:
            msgs.append({"role": who, "content": text})
    path.write_text(json.dumps({"session_id": session, "messages": msgs}))
    return path


def test_question_and_non_answer_detection() -> None:
    asked, told = ts.question_stems("Who owns the roadmap doc?", [ts.stem("roadmap"), ts.stem("owns")])
    assert asked == {ts.stem("roadmap"), ts.stem("owns")} and not told
    asked, told = ts.question_stems("Put that on the roadmap. Who owns it?", [ts.stem("roadmap")])
    assert not asked and told == {ts.stem("roadmap")}
    assert ts.is_non_answer("From earlier messages I only know Tomás and Dana.")
    assert ts.is_non_answer("I don\u2019t know, sorry.")
    assert ts.is_non_answer("Which doc? The old one?")
    assert not ts.is_non_answer("It's Marek.")
    assert not ts.is_non_answer("Mount Tamalpais! Have you been?")


def test_retrieve_ranks_the_answer_above_the_question(tmp_path: Path) -> None:
    """Through the CLI: ``It's Marek`` first, the question kept, rows exactly as stored."""
    conv = _write(tmp_path / "roadmap.json", "roadmap", ROADMAP, named=False)
    db = tmp_path / "kv.db"
    rc, _, err = invoke("import", conv, home=tmp_path, db=db)
    assert rc == 0, err
    rc, out, err = invoke(
        "retrieve", "roadmap", "who owns the roadmap", "--json", "-n", "3", home=tmp_path, db=db
    )
    assert rc == 0, err
    rows = json.loads(out)["results"]
    order = [r["message_index"] for r in rows]
    assert order[0] == ANSWER and QUESTION in order, order
    assert rows[0]["score"] >= rows[order.index(QUESTION)]["score"]
    for r in rows:  # the contract: each row one stored message, content and role as stored
        role, text = ROADMAP[r["message_index"]]
        assert r["text"] == text and r["role"] == role


OFF = {"answer_weight": 0.0, "answer_floor": False}


def _ranked(store_url: str, conv: Path, session: str, query: str) -> tuple[list[int], list[int]]:
    """Tier-3 order of ``query`` with the default ranking and with the answer step off."""
    store = open_store(store_url)
    try:
        import_file(store, conv)
        sid = store.query("SELECT id FROM sessions WHERE key = ?", (session,))[0][0]

        def order(**options: Any) -> list[int]:
            return [h.message_index for h in search.search_messages(store, query, sid, 4, **options)]

        return order(), order(**OFF)
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_other_speakers_reply_outranks_the_question(tmp_path: Path, backend: str) -> None:
    """Both backends: Bob's reply first, Alice's question kept; without the step, the question first."""
    from tests.pg import PG_URL, empty_database, release

    conv = _write(tmp_path / "hike.json", "hike", HIKING, named=True)
    if backend == "sqlite":
        url = str(tmp_path / "kv.db")
    elif PG_URL:
        url = empty_database()
    else:
        pytest.skip("set KVCACHE_TEST_PG_URL to run the PostgreSQL variant")
    try:
        got, flat = _ranked(url, conv, "hike", "Where did Bob go hiking?")
    finally:
        if backend != "sqlite":
            release(url)
    assert got[0] == 3 and 2 in got[:3], got
    assert flat.index(2) < flat.index(3), flat


def test_roadmap_question_wins_without_the_answer_step(tmp_path: Path) -> None:
    conv = _write(tmp_path / "roadmap.json", "roadmap", ROADMAP, named=False)
    got, flat = _ranked(str(tmp_path / "kv.db"), conv, "roadmap", "who owns the roadmap")
    assert got[:2] == [ANSWER, QUESTION] and flat[0] == QUESTION, (got, flat)


def test_in_memory_tiers_rank_the_answer_first() -> None:
    """Tiers 1-2 (cache and snapshot entries) use the same step."""
    texts = [text for _, text in ROADMAP]
    got = ranking.rank_texts("who owns the roadmap", texts, limit=3)
    assert [pos for pos, _, _ in got][:2] == [ANSWER, QUESTION]
