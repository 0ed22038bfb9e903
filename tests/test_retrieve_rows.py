"""``retrieve --json`` rows as a reviewer checks them through the CLI (issue 18 item 5).

Every row is one stored message: its exact stored content, message index and role,
whichever tier (active cache, snapshot, history) it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

from kvcache_cli.config import Config
from kvcache_cli.engine.entries import ChatMessage
from kvcache_cli.services import chat_turn
from kvcache_cli.store.backend import open_store
from tests.helpers import invoke

TURNS = [
    ("user", "Our nightly extract overlaps with the backup window."),
    ("assistant", "Move the extract to 01:30; the backup ends at 01:10."),
    ("user", "Who owns the roadmap doc?"),
    ("assistant", "From earlier messages I only know Tomás and Dana."),
    ("user", "It's Marek. He keeps the roadmap doc in the wiki."),
    ("assistant", "Noted: Marek owns the roadmap doc."),
]


def _stored(tmp_path: Path, db: Path, session: str) -> list[dict[str, str]]:
    rc, out, err = invoke("export", session, home=tmp_path, db=db)
    assert rc == 0, err
    messages: list[dict[str, str]] = json.loads(out)["messages"]
    return messages


def _imported(tmp_path: Path, session: str, turns: list[tuple[str, str]]) -> Path:
    """A store holding ``turns`` as ``session`` through ``kvcache import`` (no vectors)."""
    conv = tmp_path / f"{session}.json"
    conv.write_text(
        json.dumps({"session_id": session, "messages": [{"role": r, "content": t} for r, t in turns]})
    )
    db = tmp_path / "kv.db"
    assert invoke("import", conv, home=tmp_path, db=db)[0] == 0
    return db


def _embeddings_config(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "kvcache.toml"
    config.write_text(f'[llm]\nembeddings_url = "{url}"\n')
    return config


def test_cache_and_history_rows_carry_the_stored_role(tmp_path: Path) -> None:
    """After ``process`` the best rows come from the active cache (tier 1); they name
    their message's role as stored, like history rows do."""
    conv = tmp_path / "roadmap.json"
    conv.write_text(
        json.dumps({"session_id": "roadmap", "messages": [{"role": r, "content": t} for r, t in TURNS]})
    )
    db = tmp_path / "kv.db"
    rc, _, err = invoke("process", conv, "--json", home=tmp_path, db=db)
    assert rc == 0, err
    rc, out, err = invoke("retrieve", "roadmap", "who owns the roadmap doc", "--json", home=tmp_path, db=db)
    assert rc == 0, err
    rows = json.loads(out)["results"]
    assert {r["tier"] for r in rows} == {1}, rows  # the whole conversation is in the cache
    stored = _stored(tmp_path, db, "roadmap")
    for r in rows:
        message = stored[r["message_index"]]
        assert (r["text"], r["role"]) == (message["content"], message["role"]), r


def test_readme_names_every_json_field(tmp_path: Path) -> None:
    """Each field of ``retrieve --json`` (the object and a result row) is named in the
    README's ``retrieve`` section, so a script writer can look every one up."""
    conv = tmp_path / "c.json"
    conv.write_text(
        json.dumps({"session_id": "c", "messages": [{"role": r, "content": t} for r, t in TURNS]})
    )
    db = tmp_path / "kv.db"
    assert invoke("import", conv, home=tmp_path, db=db)[0] == 0
    rc, out, err = invoke("retrieve", "c", "roadmap doc", "--json", home=tmp_path, db=db)
    assert rc == 0, err
    data = json.loads(out)
    assert data["results"], data
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### retrieve SESSION QUERY", 1)[1].split("\n### ", 1)[0]
    missing = [key for key in [*data, *data["results"][0]] if f"`{key}`" not in section]
    assert not missing, f"README's retrieve section does not name {missing}"


# A live conversation whose question, after two clears, is answered by an assistant
# message that only the snapshots (tier 2) and the history still hold.
LIVE = [
    (
        "Which database hosts the events table?",
        "The events table lives on the Postgres cluster pg-analytics-2.",
    ),
    ("Thanks. How big is it?", "About 2.3 million rows, growing by forty thousand a day."),
    ("Any index on ip_prefix?", "No index on ip_prefix yet; the geo join scans it."),
    ("Let's add one tonight.", "Fine: CREATE INDEX CONCURRENTLY after the backup window."),
]


def test_serve_labels_retrieved_messages_with_their_stored_role(tmp_path: Path) -> None:
    """``serve`` writes each retrieved message into the prompt as ``(role, message N)``:
    an assistant message found in a snapshot is labelled assistant, not user."""
    store = open_store(str(tmp_path / "kv.db"))
    try:
        config = Config()
        config.cache.clear_after_conversations = 2
        manager = chat_turn.manager_for(store, config, None, 4096)
        messages: list[ChatMessage] = []
        for question, answer in LIVE:
            messages.append(ChatMessage("user", question))
            chat_turn.begin_turn(manager, "live", list(messages))
            chat_turn.finish_turn(manager, "live", ChatMessage("assistant", answer))
            messages.append(ChatMessage("assistant", answer))
        messages.append(ChatMessage("user", "Which cluster hosts the events table again?"))
        plan = chat_turn.begin_turn(manager, "live", list(messages))
    finally:
        store.close()
    assert plan.action == "retrieved" and plan.context_start > 1, plan
    assert plan.retrieved[0][0] == 1, plan.retrieved  # the answer naming the cluster
    for index, role, text in plan.retrieved:
        assert (role, text) == (messages[index].role, messages[index].content), (index, role)


def test_first_semantic_retrieve_says_it_embeds_the_session(tmp_path: Path) -> None:
    """An imported session has no vectors: the first retrieve with an embeddings server
    says on stderr, before the wait, how many messages it embeds; the next one is quiet."""
    from tests.fake_llama_server import FakeLlamaServer

    db = _imported(tmp_path, "c", TURNS)
    with FakeLlamaServer(embeddings=True) as server:
        config = _embeddings_config(tmp_path, server.url)
        runs = [
            invoke("--config", config, "retrieve", "c", "roadmap doc", "--json", home=tmp_path, db=db)
            for _ in range(2)
        ]
    (rc1, out1, err1), (rc2, out2, err2) = runs
    assert rc1 == rc2 == 0, (err1, err2)
    assert json.loads(out1)["strategy"] == "hybrid" and json.loads(out1)["notices"] == []
    want = f"kvcache: retrieval: embedding {len(TURNS)} stored message(s) of c that have no vector yet"
    assert err1.startswith(want), err1
    assert err2 == "" and json.loads(out2)["results"] == json.loads(out1)["results"]
    rc, _, err = invoke("-q", "--config", config, "retrieve", "c", "wiki", home=tmp_path, db=db)
    assert "embedding" not in err  # -q: only errors (the server is gone: keyword_only, quietly)


def test_readme_says_how_serve_puts_retrieved_messages_in_the_prompt() -> None:
    """The README's serve section shows the retrieved-context header and line as serve
    writes them (``server.context``), so a user can find them in a ``--trace`` file."""
    from kvcache_cli.server.context import RETRIEVED_HEADER, build_prompt
    from kvcache_cli.services.chat_turn import TurnPlan

    plan = TurnPlan(session_key="s", retrieved=[(3, "assistant", "It's Marek.")])
    prompt = build_prompt([{"role": "user", "content": "Who owns the roadmap?"}], plan)
    lines = prompt[0]["content"].split("\n")
    assert lines == [RETRIEVED_HEADER, "(assistant, message 3) It's Marek."]
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    serve = readme.split("## Serve", 1)[1].split("\n## ", 1)[0]
    assert f"`{RETRIEVED_HEADER}`" in serve and "`(role, message N) text`" in serve
    assert "`kvcache retrieve SESSION QUESTION`" in serve and "`retrieved`" in serve


# The roadmap case of issue 18 (examples/support-chat.json has it too): the user asks,
# the assistant does not know, the user answers it two messages later.
ROADMAP = [
    ("user", "Let's not do hourly yet. Put a 6-hourly load on the roadmap."),
    ("assistant", "Noted: a 6-hourly load as a roadmap item, to revisit in two weeks."),
    ("user", "Who owns the roadmap doc?"),
    ("assistant", "From earlier messages I only know Tomás and Dana. I do not have access to it."),
    ("user", "It's Marek. OK. Now the flaky API: the partner feed returns 502 twice a week."),
    ("assistant", "Is the extract retrying? A 502 from a gateway is often transient."),
]


def test_hybrid_keeps_the_answer_above_its_question(tmp_path: Path) -> None:
    """With an embeddings server (``auto`` runs hybrid) the semantic side favours the
    question that repeats the query; the answer still ranks first and both are shown."""
    from tests.fake_llama_server import FakeLlamaServer

    db = _imported(tmp_path, "roadmap", ROADMAP)
    with FakeLlamaServer(embeddings=True) as server:
        config = _embeddings_config(tmp_path, server.url)
        rc, out, err = invoke(
            "-q", "--config", config, "retrieve", "roadmap", "who owns the roadmap", "--json", "-n", "3",
            home=tmp_path, db=db,
        )  # fmt: skip
    assert rc == 0, err
    data = json.loads(out)
    order = [r["message_index"] for r in data["results"]]
    assert data["strategy"] == "hybrid" and order[:2] == [4, 2], order
    assert data["results"][0]["score"] >= data["results"][1]["score"]


def test_fusion_moves_an_answer_just_above_its_question() -> None:
    """``strategies.answers_first``: only a pair the keyword side ranked answer-first
    moves; a question whose next message the keyword side ranks lower stays put."""
    from kvcache_cli.retrieval import strategies as st
    from kvcache_cli.retrieval.fusion import RetrievedEntry

    def entry(index: int, score: float, text: str, matched: list[str]) -> RetrievedEntry:
        return RetrievedEntry(3, score, matched, text, "s", index, f"h{index}")

    question = entry(4, 0.81, "Who owns the roadmap doc?", ["owns", "roadmap"])
    answer = entry(6, 0.89, "It's Marek.", [])
    other_q = entry(10, 0.70, "Is the roadmap doc in the wiki?", ["roadmap"])
    other_next = entry(11, 0.40, "Yes, under Platform.", [])
    keyword = [answer, question, other_q, other_next]
    semantic = [
        entry(4, 0.95, question.text, []),
        entry(10, 0.90, other_q.text, []),
        entry(6, 0.10, answer.text, []),
        entry(11, 0.05, other_next.text, []),
    ]
    plain = st.fuse_weighted(keyword, semantic, 0.3, 0.7)
    assert [e.message_index for e in plain][:2] == [4, 10]  # the echoes first
    got = st.combine("hybrid", keyword, semantic, 4, None, 0.3, 0.7)
    assert [e.message_index for e in got] == [6, 4, 10, 11]
    assert got[0].score > got[1].score and got[0].text == "It's Marek."


def test_verbose_says_where_each_score_came_from(tmp_path: Path) -> None:
    """``retrieve -v`` (its help: "how its score was made"): each result's message, role
    and the query words it holds, or that it holds none (the answer ranked by its question)."""
    conv = tmp_path / "roadmap.json"
    conv.write_text(
        json.dumps({"session_id": "roadmap", "messages": [{"role": r, "content": t} for r, t in ROADMAP]})
    )
    db = tmp_path / "kv.db"
    assert invoke("import", conv, home=tmp_path, db=db)[0] == 0
    rc, out, err = invoke(
        "retrieve",
        "roadmap",
        "who owns the roadmap",
        "-n",
        "2",
        "-v",
        home=tmp_path,
        db=db,
        env={"COLUMNS": "400"},
    )
    assert rc == 0, err
    lines = [line for line in out.splitlines() if line.startswith("#")]
    assert lines[0].startswith("#1 tier 3 score ") and lines[1].startswith("#2 tier 3 score ")
    assert "(user, message 4; holds no query word: scored by the matching messages around it" in lines[0]
    assert lines[0].endswith(f"): {ROADMAP[4][1]}")
    assert "(user, message 2; matched owns, roadmap): Who owns the roadmap doc?" in lines[1]


def test_a_files_own_cache_entry_claims_no_role(tmp_path: Path) -> None:
    """A ``kv_entries`` entry of a conversation file points at a message but holds its own
    text: its row keeps role null instead of passing its text off as that message's."""
    conv = tmp_path / "kve.json"
    conv.write_text(
        json.dumps(
            {
                "session_id": "kve",
                "messages": [{"role": r, "content": t} for r, t in TURNS[:2]],
                "kv_entries": [{"message_index": 1, "key_data": "extract backup overlap gateway note"}],
            }
        )
    )
    db = tmp_path / "kv.db"
    assert invoke("process", conv, "--json", home=tmp_path, db=db)[0] == 0
    rc, out, err = invoke("retrieve", "kve", "gateway note", "--tiers", "1", "--json", home=tmp_path, db=db)
    assert rc == 0, err
    rows = {r["text"]: r for r in json.loads(out)["results"]}
    own = rows["extract backup overlap gateway note"]
    assert (own["message_index"], own["role"]) == (1, None), own
    stored = _stored(tmp_path, db, "kve")
    for text, r in rows.items():
        if r is not own:
            assert (text, r["role"]) == (
                stored[r["message_index"]]["content"],
                stored[r["message_index"]]["role"],
            )
