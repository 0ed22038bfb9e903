"""Tests of the keyword retrieval helpers (kvcache_cli.retrieval.textsearch, search_sqlite)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache_cli.retrieval import textsearch as ts
from kvcache_cli.store import search_sqlite as ss

HOSTILE = [
    "",
    "   ",
    '"',
    '""',
    "'",
    'say "hello',
    "C++",
    "don't",
    "node.js",
    "kv-cache",
    "foo:bar",
    "100%",
    "AND",
    "OR",
    "NOT",
    "AND cats",
    "OR dogs",
    "NOT birds",
    "NEAR(",
    "NEAR(a b, 2)",
    "(unbalanced",
    "unbalanced)",
    "((()))",
    "*",
    "a*",
    "^start",
    "-minus",
    "+plus",
    "e.g.",
    "HTTP/2",
    "#42",
    "why?",
    "🙂🚀",
    "the of and to",
    "what when where did",
    "sess:s1",
    "content:x",
    "{sess content}: x",
    "\x00\x01",
    "naïve café",
    "日本語のテキスト",
    "x" * 5000,
]

CONVERSATION = [
    ("Caroline", "Hey Mel! Good to see you! How have you been?"),
    ("Melanie", "Hey Caroline! I'm swamped with the kids and work."),
    ("Caroline", "I went to a LGBTQ support group yesterday and it was so powerful."),
    ("Melanie", "Wow, that sounds amazing. Tell me more!"),
    ("Caroline", "The transgender stories were inspiring. I felt accepted."),
    ("Melanie", "I painted a lake sunrise last year, it was so calming."),
    ("Caroline", "Your painting sounds lovely. I want to paint a sunrise too."),
    ("Melanie", "Painting is my therapy. Pottery class is next on my list."),
]


def make_db(sessions: dict[int, list[tuple[str, str]]]) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE sessions (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute(
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL "
        "REFERENCES sessions(id), message_index INTEGER NOT NULL, role TEXT, name TEXT, "
        "content TEXT, tokens INTEGER, timestamp TEXT, importance REAL, "
        "UNIQUE(session_id, message_index))"
    )
    for ddl in ss.SCHEMA:
        conn.execute(ddl)
    mid = 0
    conn.execute("BEGIN")
    for sid, turns in sessions.items():
        conn.execute("INSERT INTO sessions VALUES (?, ?)", (sid, f"s{sid}"))
        rows = []
        for idx, (speaker, text) in enumerate(turns):
            mid += 1
            content = f"{speaker}: {text}"
            conn.execute(
                "INSERT INTO messages VALUES (?, ?, ?, 'user', ?, ?, 0, '2023-05-08', 0.5)",
                (mid, sid, idx, speaker, content),
            )
            rows.append((mid, sid, content))
        ss.index_messages(conn, rows)
    conn.execute("COMMIT")
    return conn


@pytest.fixture()
def conn() -> Iterator[sqlite3.Connection]:
    other = [("Bob", "I went to a support group for painters."), ("Ann", "A sunrise hike!")]
    db = make_db({1: CONVERSATION, 2: other})
    yield db
    db.close()


# ---------------------------------------------------------------- text helpers
def test_tokenize_unicode_and_punctuation() -> None:
    assert ts.tokenize("Don't use C++ in node.js, naïve CAFÉ!") == [
        "don", "t", "use", "c", "in", "node", "js", "naive", "cafe",
    ]  # fmt: skip
    assert ts.tokenize("🙂 foo_bar") == ["foo", "bar"]


def test_porter_stem_matches_classic_examples() -> None:
    cases = {
        "caresses": "caress", "ponies": "poni", "running": "run", "hopping": "hop",
        "relational": "relat", "generalization": "gener", "painting": "paint",
        "happy": "happi", "sky": "sky", "adoption": "adopt", "agreed": "agre",
    }  # fmt: skip
    for word, expected in cases.items():
        assert ts.stem(word) == expected, word


def test_stemmer_agrees_with_fts5_porter() -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='porter unicode61 remove_diacritics 2')")
    db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'row')")
    words = "connected connecting generously hopefulness formality electrical adjustable"
    words += " communism irritant dependent adoption controlling rolling 1990s mp3s"
    for word in words.split():
        db.execute("DELETE FROM t")
        db.execute("INSERT INTO t VALUES (?)", (word,))
        assert [r[0] for r in db.execute("SELECT term FROM v")] == [ts.stem(word)], word


def test_query_terms_drop_question_and_stop_words() -> None:
    assert ts.query_terms("When did Caroline go to the LGBTQ support group?") == [
        "caroline", "go", "lgbtq", "support", "group",
    ]  # fmt: skip
    assert ts.query_terms("what when did the") == []
    assert ts.query_terms("") == []


def test_fts5_match_quotes_everything() -> None:
    assert ts.fts5_match([]) is None
    assert ts.fts5_match(["a", 'b"c']) == '"a" OR "b""c"'


def test_keyword_similarity_and_matched_keywords() -> None:
    terms = ts.query_terms("painting sunrise pottery")
    assert ts.matched_keywords(terms, "I painted a sunrise") == ["painting", "sunrise"]
    assert ts.keyword_similarity(terms, "I painted a sunrise") == pytest.approx(2 / 3)
    weighted = ts.keyword_similarity(terms, "pottery", idf={"potteri": 3.0, "paint": 1.0})
    assert weighted == pytest.approx(3.0 / 5.0)
    assert ts.keyword_similarity([], "anything") == 0.0


# ---------------------------------------------------------------- hostile queries
@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_never_raise(conn: sqlite3.Connection, query: str) -> None:
    for sid in (1, None, 99):
        hits = ss.search_messages(conn, query, sid, 10)
        assert isinstance(hits, list)
        if not ts.query_terms(query):
            assert hits == []
        for h in hits:
            assert 0.0 <= h.score <= 1.0
    assert isinstance(ss.rank_texts(query, [t for _, t in CONVERSATION]), list)


def test_nothing_searchable_gives_empty(conn: sqlite3.Connection) -> None:
    for query in ("", "the of", "what when did", "🙂", "?!"):
        assert ss.search_messages(conn, query, 1, 10) == []
        assert ss.rank_texts(query, ["the of what"]) == []


# ---------------------------------------------------------------- ranking
def test_centre_turn_outranks_neighbours(conn: sqlite3.Connection) -> None:
    hits = ss.search_messages(conn, "When did Caroline go to the LGBTQ support group?", 1, 5)
    assert hits[0].message_index == 2
    assert "lgbtq" in hits[0].matched_keywords
    assert hits[0].raw_score > hits[1].raw_score


def test_speaker_name_prefers_that_speaker(conn: sqlite3.Connection) -> None:
    hits = ss.search_messages(conn, "What did Melanie paint?", 1, 3)
    assert hits[0].message_index in (5, 7)
    by_idx = {h.message_index: h.raw_score for h in hits}
    assert hits[0].message_index != 6
    assert by_idx.get(6, 0.0) < hits[0].raw_score


def test_session_isolation(conn: sqlite3.Connection) -> None:
    hits2 = ss.search_messages(conn, "support group painters", 2, 10)
    assert hits2 and {h.session_id for h in hits2} == {2}
    hits1 = ss.search_messages(conn, "painters", 1, 10)
    assert all(h.session_id == 1 for h in hits1)
    everywhere = ss.search_messages(conn, "support group", None, 10)
    assert {h.session_id for h in everywhere} == {1, 2}
    assert ss.search_messages(conn, "support", 42, 10) == []


def test_session_token_is_not_content(conn: sqlite3.Connection) -> None:
    assert ss.search_messages(conn, "s1", None, 10) == []


def test_scores_in_unit_interval_and_sorted(conn: sqlite3.Connection) -> None:
    hits = ss.search_messages(conn, "sunrise painting pottery", None, 20)
    assert hits
    raws = [h.raw_score for h in hits]
    assert raws == sorted(raws, reverse=True)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_deterministic_ties_by_message_id() -> None:
    db = make_db({1: [("A", "apple"), ("B", "apple"), ("A", "zzz"), ("B", "apple")]})
    hits = ss.search_messages(db, "apple", 1, 10, context_window=0)
    assert [h.message_id for h in hits] == [1, 2, 4]


def test_delete_session_removes_from_index(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN")
    ss.delete_session(conn, 2)
    conn.execute("DELETE FROM messages WHERE session_id = 2")
    conn.execute("COMMIT")
    assert ss.search_messages(conn, "painters", None, 10) == []
    conn.execute(f"INSERT INTO {ss.FTS_TABLE}({ss.FTS_TABLE}, rank) VALUES ('integrity-check', 1)")
    assert ss.search_messages(conn, "sunrise", None, 10)


def test_rebuild_and_optimize(conn: sqlite3.Connection) -> None:
    before = [h.message_id for h in ss.search_messages(conn, "sunrise", None, 10)]
    ss.rebuild(conn)
    ss.optimize(conn)
    assert [h.message_id for h in ss.search_messages(conn, "sunrise", None, 10)] == before


def test_rank_texts() -> None:
    texts = ["I love pottery", "painting a sunrise", "sunrise sunrise walk", "nothing here"]
    ranked = ss.rank_texts("Where did they paint the sunrise?", texts)
    assert [i for i, _, _ in ranked][:1] == [1]
    assert {i for i, _, kw in ranked if kw} == {1, 2}
    # the neighbours that match nothing enter on context alone ("bridges"), below the matches
    bridges = [s for i, s, kw in ranked if not kw]
    assert bridges and max(bridges) < min(s for _, s, kw in ranked if kw)
    assert all(0.0 <= s <= 1.0 for _, s, _ in ranked)
    assert ranked[0][2] == ["paint", "sunrise"]


# ---------------------------------------------------------------- properties
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(max_size=80))
def test_search_never_raises(conn: sqlite3.Connection, query: str) -> None:
    for sid in (1, None):
        hits = ss.search_messages(conn, query, sid, 5)
        assert all(0.0 <= h.score <= 1.0 for h in hits)
    ss.rank_texts(query, [t for _, t in CONVERSATION])


@given(words=st.lists(st.text(min_size=1, max_size=12), max_size=6))
def test_fts5_match_always_valid(words: list[str]) -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize='porter unicode61 remove_diacritics 2')")
    expr = ts.fts5_match(words)
    if expr is not None:
        db.execute("SELECT * FROM t WHERE t MATCH ?", (expr,)).fetchall()


# ---------------------------------------------------------------- dates and proximity
def test_query_dates() -> None:
    assert ts.query_dates("What did Gina find on 1 February, 2023?") == [(2023, 2, 1)]
    assert ts.query_dates("What painting did she show on October 13, 2023?") == [(2023, 10, 13)]
    assert ts.query_dates("When did Melanie go camping in June?") == [(None, 6, None)]
    assert ts.query_dates("Who came over on May 3rd?") == [(None, 5, 3)]
    assert ts.query_dates("What happened in December 2023?") == [(2023, 12, None)]
    assert ts.query_dates("How many times in 2023?") == [(2023, None, None)]
    assert ts.query_dates("What may she do next?") == []  # the modal verb
    assert ts.query_dates("What is 45 plus 3?") == []


def test_date_matches() -> None:
    assert ts.date_matches("2023-02-01", [(2023, 2, 1)])
    assert ts.date_matches("2023-06-20T10:00:00"[:10], [(None, 6, None)])
    assert not ts.date_matches("2023-02-02", [(2023, 2, 1)])
    assert not ts.date_matches("", [(2023, 2, 1)])
    assert not ts.date_matches("2023-02-01", [])
    assert not ts.date_matches("not a date", [(2023, None, None)])


def test_stem_positions() -> None:
    f = ts.StemFilter([ts.stem("road"), ts.stem("trips")])
    assert f.positions(ts.tokenize("A road trip, then more road trips")) == {"road": [1, 5], "trip": [2, 6]}


def _dated_db(stamps: list[str], turns: list[tuple[str, str]]) -> sqlite3.Connection:
    db = make_db({1: turns})
    for i, stamp in enumerate(stamps):
        db.execute("UPDATE messages SET timestamp = ? WHERE message_index = ?", (stamp, i))
    return db


def test_question_date_prefers_turns_of_that_day() -> None:
    turns = [
        ("Gina", "The store has a supplier."),
        ("Jon", "Nice."),
        ("Jon", "Cool."),
        ("Jon", "Ok."),
        ("Jon", "Sure."),
        ("Gina", "I got new shelves and new lights for the store!"),
    ]
    stamps = ["2023-01-20"] * 5 + ["2023-02-01"]
    db = _dated_db(stamps, turns)
    try:
        q = "What did Gina find for her store on 1 February, 2023?"
        assert ss.search_messages(db, q, 1, 3)[0].message_index == 5
        assert ss.search_messages(db, q, 1, 3, date_boost=0.0)[0].message_index == 0
        assert all(0.0 <= h.score <= 1.0 for h in ss.search_messages(db, q, 1, 10))
    finally:
        db.close()


def test_adjacent_query_words_prefer_the_phrase() -> None:
    turns = [
        ("Ann", "The road was long, so the trip felt endless."),
        ("Bob", "Nice."),
        ("Bob", "Cool."),
        ("Bob", "Ok."),
        ("Bob", "Sure."),
        ("Ann", "Our road trip was endless."),
    ]
    db = make_db({1: turns})
    try:
        q = "When was the road trip?"
        hits = ss.search_messages(db, q, 1, 3, context_weight=0.0)
        assert hits[0].message_index == 5
        flat = ss.search_messages(db, q, 1, 3, context_weight=0.0, proximity_weight=0.0)
        assert hits[0].raw_score > flat[0].raw_score
        assert all(0.0 <= h.score <= 1.0 for h in hits)
    finally:
        db.close()


def test_pair_proximity_matches_the_quadratic_definition_and_scales() -> None:
    """``_near_count`` (one merge) counts what the all-pairs scan counts, in linear time."""
    import random

    from kvcache_cli.retrieval.documents import _near_count

    rng = random.Random(7)
    for _ in range(500):
        pa = sorted(rng.sample(range(300), rng.randint(1, 30)))
        pc = sorted(rng.sample(range(300), rng.randint(1, 30)))
        w = rng.randint(1, 5)
        slow = sum(1 for i in pa if any(0 < abs(j - i) <= w for j in pc))
        assert _near_count(pa, pc, w) == slow
    big = list(range(0, 2_000_000, 2))  # a huge message: a million occurrences each
    odd = [j + 1 for j in big]
    assert _near_count(big, odd, 1) == len(big)
    assert _near_count(big, big, 1) == 0  # a position is never near itself


def test_stem_filter_counts_and_positions_equal_stemming_every_token() -> None:
    """The result is what stemming every token gives (repeats, a stem shared by two
    words, one-letter words), for short texts read token by token and long ones counted
    first (either side of ``SHORT_TEXT_TOKENS``)."""
    import random

    words = ["running", "runs", "run", "ran", "trips", "trip", "a", "i", "roadmap", "road", "ROADS", "the"]
    rng = random.Random(3)
    short = ts.SHORT_TEXT_TOKENS
    for n in range(200):
        k = rng.randint(0, 60) if n % 2 else rng.randint(short - 2, short + 300)
        tokens = [w.lower() for w in rng.choices(words, k=k)]
        wanted = {ts.stem(w.lower()) for w in rng.sample(words, 4)}
        f = ts.StemFilter(wanted)
        naive_positions: dict[str, list[int]] = {}
        for pos, tok in enumerate(tokens):
            if ts.stem(tok) in wanted:
                naive_positions.setdefault(ts.stem(tok), []).append(pos)
        assert f.positions(tokens) == naive_positions
        assert f.counts(tokens) == {s: len(p) for s, p in naive_positions.items()}
