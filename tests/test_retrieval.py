"""Issue 3: retrieval strategies, fusion, hostile queries and the ``retrieve`` CLI contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvcache_cli.config import RETRIEVAL_STRATEGIES, Config
from kvcache_cli.retrieval import strategies as st
from kvcache_cli.retrieval.fusion import RetrievedEntry, merge_results
from kvcache_cli.services.manager import KVCacheManager
from kvcache_cli.store.backend import open_store
from tests.fake_llama_server import FakeLlamaServer
from tests.helpers import invoke

TURNS = [
    ("Alice", "I adopted a golden retriever puppy named Biscuit last week."),
    ("Bob", "Congratulations! Dogs are great company. What breed did you say?"),
    ("Alice", "A golden retriever. She loves chasing tennis balls in the park."),
    ("Bob", "I started learning to play the violin in March."),
    ("Alice", "The violin is hard! How is the practice going?"),
    ("Bob", "Slowly. My teacher says my bowing improved a lot."),
    ("Alice", "We are planning a trip to Lisbon for the summer holidays."),
    ("Bob", "Lisbon is lovely, try the pastel de nata near the river."),
    ("Alice", "Our database migration to PostgreSQL finished yesterday."),
    ("Bob", "Did the kv-cache warmup after the migration work on node.js?"),
]

FIELDS = {"rank", "tier", "score", "matched_keywords", "session_id", "message_index", "text"}

NOTHING_SEARCHABLE = ["", "   ", "🙂🔥", "the of and", "AND", "OR NOT", "(((", ")", '"', "*", "-", "^", "??"]
HOSTILE = [
    '"unbalanced quote about violin',
    "C++",
    "don't",
    "node.js",
    "kv-cache",
    "foo:bar",
    "100%",
    "AND violin",
    "OR puppy",
    "NOT lisbon",
    "NEAR(violin, puppy)",
    "NEAR(",
    "(violin",
    "violin))",
    "puppy 🐶",
    "sess : s1",
    "content:violin",
]


def _conversation(path: Path, session: str, turns: list[tuple[str, str]]) -> Path:
    msgs = [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "name": who,
            "content": f"{who}: {text}",
            "timestamp": f"2025-03-{1 + i:02d}T10:00:00",
        }
        for i, (who, text) in enumerate(turns)
    ]
    path.write_text(json.dumps({"session_id": session, "messages": msgs}))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One store imported (no vectors), one processed with the fake server (vectors)."""
    base = tmp_path_factory.mktemp("retrieval")
    home = base / "home"
    home.mkdir()
    conv = _conversation(base / "chat.json", "chat", TURNS)
    other = _conversation(base / "other.json", "other", [("Carol", "My violin teacher moved to Lisbon.")] * 2)
    plain = base / "plain.db"
    for f in (conv, other):
        rc, _, err = invoke("-q", "import", f, home=home, db=plain)
        assert rc == 0, err
    return {"home": home, "plain": plain, "base": base, "conv": conv, "other": other}


def _retrieve(home: Path, db: Path, *args: str) -> tuple[int, Any, str]:
    rc, out, err = invoke("retrieve", *args, "--json", home=home, db=db)
    return rc, (json.loads(out) if rc == 0 and out.strip() else None), err


# ----------------------------------------------------------------------------- CLI contract
def test_hostile_queries_through_the_cli(stores: dict[str, Any]) -> None:
    home, db = stores["home"], stores["plain"]
    queries = [(q, True) for q in NOTHING_SEARCHABLE] + [(q, False) for q in HOSTILE]
    outs = [(qe, _retrieve(home, db, "chat", qe[0], "--strategy", "keyword_only")) for qe in queries]
    for (query, empty), (rc, data, err) in outs:
        assert rc == 0, f"{query!r}: {err}"
        assert "Traceback" not in err and "fts5" not in err.lower(), (query, err)
        assert data is not None, query
        if empty:
            assert data["results"] == [], query
        for r in data["results"]:
            assert 0.0 <= r["score"] <= 1.0
    found = {q: d for (q, _), (_, d, _) in outs}
    assert found["node.js"]["results"][0]["message_index"] == 9
    assert found["kv-cache"]["results"] and found["(violin"]["results"]


def test_json_fields_and_all_sessions(stores: dict[str, Any]) -> None:
    home, db = stores["home"], stores["plain"]
    rc, data, err = _retrieve(home, db, "chat", "golden retriever puppy", "--strategy", "keyword_only")
    assert rc == 0, err
    results = data["results"]
    assert results and FIELDS <= set(results[0])
    assert [r["rank"] for r in results] == list(range(1, len(results) + 1))
    assert results[0]["message_index"] in (0, 2) and results[0]["tier"] == 3
    assert "retriever" in results[0]["matched_keywords"]
    assert all(r["session_id"] == "chat" for r in results)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)

    rc, data, err = _retrieve(home, db, "--all-sessions", "violin Lisbon", "--strategy", "keyword_only")
    assert rc == 0, err
    assert {r["session_id"] for r in data["results"]} == {"chat", "other"}
    assert all(FIELDS <= set(r) for r in data["results"])


def test_semantic_strategy_without_server_falls_back_with_a_notice(stores: dict[str, Any]) -> None:
    home, db = stores["home"], stores["plain"]
    for strategy in ("semantic_only", "hybrid"):
        rc, data, err = _retrieve(home, db, "chat", "violin practice", "--strategy", strategy)
        assert rc == 0, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "keyword_only" in lines[0] and "embeddings" in lines[0], err
        assert data["strategy"] == "keyword_only" and data["results"]
    rc, data, err = _retrieve(home, db, "chat", "violin practice", "--strategy", "keyword_only")
    assert rc == 0 and err.strip() == ""
    # the default (auto) and keyword_then_semantic ask for nothing a server must give: no notice
    for extra in ((), ("--strategy", "keyword_then_semantic")):
        rc, data, err = _retrieve(home, db, "chat", "violin practice", *extra)
        assert rc == 0 and err.strip() == "" and data["results"]


def test_every_strategy_with_a_server(stores: dict[str, Any]) -> None:
    """Vectors are computed at retrieve time for imported messages (batches), then used."""
    home, db = stores["home"], stores["plain"]
    with FakeLlamaServer(embeddings=True) as server:
        for strategy in RETRIEVAL_STRATEGIES:
            rc, data, err = _retrieve(
                home, db, "chat", "violin teacher", "--strategy", strategy, "--server", server.url
            )
            assert rc == 0, err
            assert "keyword_only used instead" not in err, err
            assert data["strategy"] == st.resolve(strategy, have_vector=True)  # auto: hybrid
            assert data["results"], strategy
            assert all(0.0 <= r["score"] <= 1.0 for r in data["results"])
            assert all(FIELDS <= set(r) for r in data["results"])
        rc, data, err = _retrieve(
            home, db, "--all-sessions", "violin teacher", "--strategy", "hybrid", "--server", server.url
        )
        assert rc == 0, err
        assert data["strategy"] == "hybrid" and data["results"]
        embedded = [r for r in server.requests if "embeddings" in r.path]
        assert embedded
    store = open_store(str(db))
    try:
        n_vec = store.db.execute_sql("SELECT count(*) FROM embeddings").fetchone()[0]
        n_msg = store.db.execute_sql(
            "SELECT count(*) FROM messages m JOIN sessions s ON s.id = m.session_id WHERE s.key = 'chat'"
        ).fetchone()[0]
        assert n_vec >= n_msg == len(TURNS)
    finally:
        store.close()


def test_semantic_only_finds_paraphrase_the_keywords_miss(tmp_path: Path) -> None:
    """In-process, with the process path storing vectors; semantic ranks by similarity."""
    conv = _conversation(tmp_path / "c.json", "s", TURNS)
    from kvcache_cli.llm.client import LLMClient, LLMSettings
    from kvcache_cli.loaders import load_file  # noqa: PLC0415

    store = open_store(str(tmp_path / "kv.db"))
    try:
        with FakeLlamaServer(embeddings=True) as server:
            llm = LLMClient(LLMSettings(base_url=server.url))
            config = Config()
            config.cache.retrieval_strategy = "semantic_only"
            manager = KVCacheManager(store, config, llm)
            for c in load_file(conv):
                manager.process_conversation(c, "s")
            # the exact text of a stored turn is its own nearest neighbour
            res = manager.retrieve("s", "Lisbon is lovely, try the pastel de nata near the river.", (3,), 3)
            assert res.strategy == "semantic_only" and not res.notices
            assert res.entries[0].message_index == 7
            assert all(0.0 <= e.score <= 1.0 for e in res.entries)
            config.cache.retrieval_strategy = "hybrid"
            res = manager.retrieve("s", "pastel de nata river", (1, 2, 3), 5)
            assert res.entries[0].message_index == 7
    finally:
        store.close()


# ----------------------------------------------------------------------------- fusion math
def _e(index: int, score: float, keywords: list[str] | None = None, tier: int = 3) -> RetrievedEntry:
    return RetrievedEntry(
        tier=tier,
        score=score,
        matched_keywords=keywords or [],
        text=f"t{index}",
        session_id="s",
        message_index=index,
        key_hash=f"h{index}",
    )


def test_weighted_fusion_normalises_each_side_by_its_best() -> None:
    kw = [_e(1, 0.8, ["a"]), _e(2, 0.4, ["b"])]
    sem = [_e(2, 0.6), _e(3, 0.3)]
    out = st.fuse_weighted(kw, sem, 1.0, 1.0)  # weights scaled to 0.5 / 0.5
    fused = {e.message_index: e for e in out}
    # normalised: kw 1 -> 1.0, 2 -> 0.5; sem 2 -> 1.0, 3 -> 0.5
    # fused: 1 -> 0.5, 2 -> 0.75, 3 -> 0.25; scale = 0.5 * 0.8 + 0.5 * 0.6 = 0.7
    assert [e.message_index for e in out] == [2, 1, 3]
    assert fused[2].score == pytest.approx(0.75 * 0.7)
    assert fused[1].score == pytest.approx(0.5 * 0.7)
    assert fused[3].score == pytest.approx(0.25 * 0.7)
    assert fused[2].matched_keywords == ["b"]
    assert all(0.0 <= e.score <= 1.0 for e in out)
    only_kw = st.fuse_weighted(kw, sem, 1.0, 0.0)
    assert [e.message_index for e in only_kw] == [1, 2]
    assert only_kw[0].score == pytest.approx(0.8)


def test_rrf_fusion_is_rank_based_and_bounded() -> None:
    kw = [_e(1, 0.9), _e(2, 0.1)]
    sem = [_e(1, 0.2), _e(3, 0.9)]
    out = st.fuse_rrf(kw, sem, 0.5, 0.5)
    assert out[0].message_index == 1 and out[0].score == pytest.approx(1.0)
    second = {e.message_index: e.score for e in out}
    assert second[2] == pytest.approx(second[3])  # both second in one list
    assert second[2] == pytest.approx((0.5 / 62) / (1 / 61))
    assert all(0.0 <= e.score <= 1.0 for e in out)


def test_cascades_fill_after_the_first_list() -> None:
    kw = [_e(1, 0.9)]
    sem = [_e(2, 0.95), _e(1, 0.5), _e(3, 0.4)]
    out = st.combine("keyword_then_semantic", kw, sem, need=3)
    assert [e.message_index for e in out] == [1, 2, 3]
    assert [e.stage for e in out] == [0, 1, 1]
    merged = merge_results(out, 10)  # fill results rank after the first stage despite scores
    assert [e.message_index for e in merged] == [1, 2, 3]
    enough = st.combine("keyword_then_semantic", kw, sem, need=1)
    assert [e.message_index for e in enough] == [1]
    rev = st.combine("semantic_then_keyword", kw, sem, need=5)
    assert [e.message_index for e in rev] == [2, 1, 3]
    assert st.combine("semantic_only", kw, None, need=3) == kw  # no embeddings: keyword
    kept = st.combine("keyword_only", kw + [_e(4, 0.1)], sem, 5, keep=lambda e: e.score > 0.2)
    assert [e.message_index for e in kept] == [1]
    hy = st.combine("hybrid", kw, sem, need=3, keep=lambda e: e.score > 0.0)
    assert {e.message_index for e in hy} == {1, 2, 3}


def test_semantic_score_is_clipped() -> None:
    assert st.semantic_score(-0.3) == 0.0
    assert st.semantic_score(1.2) == 1.0
    assert st.semantic_score(0.42) == pytest.approx(0.42)


# ----------------------------------------------------------------------------- determinism
def _replay(db: Path, files: list[Path]) -> tuple[list[int], list[tuple[int | None, float]]]:
    """Process ``files`` in order; the LAST one's per-turn retrieval counts and a retrieve()."""
    from kvcache_cli.loaders import load_file  # noqa: PLC0415

    store = open_store(str(db))
    try:
        manager = KVCacheManager(store, Config())
        counts: list[int] = []
        for f in files:
            for conv in load_file(f):
                result = manager.process_conversation(conv, conv.session_key or f.stem)
                counts = [t.retrieved for t in result.turns]
        found = manager.retrieve("support-4821", "When did Tomás move the backfill job?", limit=10)
        return counts, [(e.message_index, round(e.score, 12)) for e in found.entries]
    finally:
        store.close()


def test_session_results_do_not_depend_on_other_sessions(tmp_path: Path) -> None:
    """Per-session statistics: another session's messages change nothing for this one."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    alone = _replay(tmp_path / "alone.db", [examples / "support-chat.json"])
    crowded = _replay(
        tmp_path / "crowded.db", [examples / "long-messages.json", examples / "support-chat.json"]
    )
    assert alone == crowded
    assert sum(alone[0]) > 0 and alone[1]


def _dated_hits(
    url: str, conv: Path, queries: list[str], **options: Any
) -> list[list[tuple[int, float, float]]]:
    from kvcache_cli.services.importing import import_file
    from kvcache_cli.store import search

    store = open_store(url)
    try:
        import_file(store, conv)
        sql = "SELECT id FROM sessions WHERE key = " + store.db.param
        sid = store.db.execute_sql(sql, ("chat",)).fetchone()[0]
        hits = [search.search_messages(store, q, sid, 5, **options) for q in queries]
        return [[(h.message_index, round(h.raw_score, 9), h.score) for h in row] for row in hits]
    finally:
        store.close()


def test_dates_and_phrases_rank_identically_on_both_backends(tmp_path: Path) -> None:
    """Session-date and word-pair features live in the shared scorer: same hits on both."""
    from tests.pg import PG_URL, empty_database, release

    conv = _conversation(tmp_path / "chat.json", "chat", TURNS)
    queries = [
        "What about the violin on March 5, 2025?",  # turn 4's day (turn 3 says "March")
        "golden retriever puppy",
        "trip to Lisbon in March",
    ]
    got = _dated_hits(str(tmp_path / "kv.db"), conv, queries)
    assert got[0][0][0] == 4
    assert _dated_hits(str(tmp_path / "nodate.db"), conv, queries[:1], date_boost=0.0)[0][0][0] == 3
    assert all(0.0 <= s <= 1.0 for hits in got for _, _, s in hits)
    if PG_URL:
        url = empty_database()
        try:
            assert _dated_hits(url, conv, queries) == got
        finally:
            release(url)


# Turn 1 is Bob's and says "Lisbon"; turn 7 is Bob's and says "ferry" and "Lisbon";
# turn 0 repeats "ferry" four times.
FERRY = [
    ("Alice", "Ferry, ferry, ferry: the ferry is all Bob talks about now."),
    ("Bob", "We are planning a trip to Lisbon for the summer holidays."),
    ("Alice", "Which breed was the puppy again?"),
    ("Bob", "A golden retriever. She loves chasing tennis balls in the park."),
    ("Alice", "I started learning to play the violin in March."),
    ("Bob", "The violin is hard! How is the practice going?"),
    ("Alice", "Slowly. My teacher says my bowing improved a lot and I practise every evening after dinner."),
    (
        "Bob",
        "On our last holiday we walked along the river, ate far too many pastries and took "
        "the old ferry across to the other side of Lisbon at sunset.",
    ),
    ("Alice", "Our database migration to PostgreSQL finished yesterday."),
    ("Bob", "Did the warmup after the migration work?"),
]


def test_turn_covering_more_of_the_question_ranks_first_on_both_backends(tmp_path: Path) -> None:
    """Coordination (``coverage``): holding both query words beats a shorter turn holding one.

    The best-covering turn keeps its score; the others are scaled down, not up.
    """
    from tests.pg import PG_URL, empty_database, release

    conv = _conversation(tmp_path / "ferry.json", "chat", FERRY)
    query = ["Which ferry did Bob take in Lisbon?"]
    got = _dated_hits(str(tmp_path / "kv.db"), conv, query)
    flat = _dated_hits(str(tmp_path / "flat.db"), conv, query, coverage=0.0)
    assert got[0][0][0] == 7
    assert flat[0][0][0] == 1  # without it, Bob's shorter "Lisbon" turn wins
    best = {idx: raw for idx, raw, _ in flat[0]}
    assert got[0][0][1] == best[7]
    assert all(raw <= best.get(idx, raw) + 1e-9 for idx, raw, _ in got[0])
    if PG_URL:
        url = empty_database()
        try:
            assert _dated_hits(url, conv, query) == got
        finally:
            release(url)
