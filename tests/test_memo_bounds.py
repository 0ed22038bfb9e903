"""The ranking memos stay bounded in a long-running process and never change results.

``kvcache serve`` ranks for as long as it runs: a memo keyed by text that only grew
would hold every distinct message it ever saw. Each memo is either a
``functools.lru_cache`` with a maxsize or a :class:`documents.TextProfiles` with
count and size bounds; these tests push more distinct texts through the real
ranking path than each bound allows.
"""

from __future__ import annotations

import sys
import threading

import pytest

from kvcache_cli.engine import scoring
from kvcache_cli.retrieval import documents, ranking

WORDS = "violin roadmap marek budget sunset pottery camping painting adoption concert".split()


def _texts(count: int, start: int = 0) -> list[str]:
    """``count`` distinct turns that share words (so queries match several of them)."""
    return [
        f"turn {i}: the {WORDS[i % len(WORDS)]} and the {WORDS[(i * 7) % len(WORDS)]} #{i}"
        for i in range(start, start + count)
    ]


def test_text_profiles_evict_the_least_recently_used_within_both_bounds() -> None:
    memo = documents.TextProfiles(max_texts=20, max_chars=600, text_max=200)
    keep = "the one text asked for all along"
    assert memo.profile(keep, remember=True) is not None
    for i, text in enumerate(_texts(500)):
        assert memo.profile(text) is None  # a first sighting is only noted
        assert memo.profile(text) is not None  # the second makes a profile
        assert memo.profile(keep) is not None  # used all along: never the one evicted
        assert len(memo) <= 20 and memo.chars <= 600, i
    assert memo.chars == sum(len(t) for t in memo._entries)
    assert memo.known(keep) is not None and memo.known(_texts(1)[0]) is None
    assert memo.profile("x" * 201, remember=True) is None  # over text_max: never kept
    assert len(memo._seen_once) <= 20


def test_text_profiles_shared_by_threads_evict_without_errors_and_keep_their_count() -> None:
    """``kvcache serve`` ranks in several threads: one thread's eviction must not break
    another's lookup (a text evicted between its lookup and its move to the LRU's end
    raised KeyError), and the character count stays the sum of the kept texts."""
    memo = documents.TextProfiles(max_texts=20, max_chars=10_000)
    texts = _texts(60)
    errors: list[BaseException] = []

    def rank_some(offset: int) -> None:
        try:
            for _ in range(500):
                for text in texts[offset::4]:
                    memo.profile(text, remember=True)
        except BaseException as exc:  # noqa: BLE001 (reported by the assertion below)
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        threads = [threading.Thread(target=rank_some, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert len(memo) == 20
    assert memo.chars == sum(len(text) for text in texts if memo.known(text) is not None)


def test_ranking_many_distinct_texts_keeps_the_profile_memo_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through ``rank_texts`` (as tiers 1-2 and serve call it), with the bound lowered so the
    test pushes past it; results with the memo full and evicting equal cold results."""
    monkeypatch.setattr(documents.PROFILES, "max_texts", 60)
    documents.clear_profiles()
    queries = ["what about the violin roadmap?", "when was the pottery concert", "marek budget"]
    try:
        warm = []
        for batch in range(25):  # 25 x 40 distinct texts, each ranked twice: 1,000 profiled
            texts = _texts(40, start=batch * 40)
            for query in queries:
                ranking.rank_texts(query, texts)
                warm.append(ranking.rank_texts(query, texts))
            assert len(documents.PROFILES) <= 60
        cold = []
        for batch in range(25):
            texts = _texts(40, start=batch * 40)
            for query in queries:
                documents.clear_profiles()
                cold.append(ranking.rank_texts(query, texts))
        assert any(warm) and warm == cold
    finally:
        documents.clear_profiles()


def test_query_and_name_memos_are_lru_caches_that_stay_within_maxsize() -> None:
    texts = _texts(30)
    names = [f"Speaker{i}" for i in range(30)]
    for i in range(400):  # more distinct queries than either query memo holds
        ranking.rank_texts(f"the {WORDS[i % 10]} and {WORDS[(i * 3) % 10]} number{i}", texts, names=names)
    for memo in (ranking._query_kind, ranking._stem_filter):
        info = memo.cache_info()
        assert info.maxsize == 256 and info.currsize <= 256 and info.misses >= 400
    for i in range(1500):
        documents.make_doc(i, 1, i, f"Person {i}", f"Person {i}: hello there")
    info = documents.name_profile.cache_info()
    assert info.maxsize == 1024 and info.currsize <= 1024


def test_pattern_memo_is_bounded_and_matches_the_uncached_patterns() -> None:
    scoring._short_text_patterns.cache_clear()
    for i in range(9000):
        text = f"IMPORTANT: deploy step {i}" if i % 2 else f"def f{i}(): return {i}"
        assert scoring.pattern_matches(text) == scoring._pattern_matches(text)
    info = scoring._short_text_patterns.cache_info()
    assert info.maxsize == 8192 and info.currsize == 8192
    long_text = "x" * 5000 + " 42%"  # longer than the memo's limit: matched, not remembered
    assert scoring.pattern_matches(long_text) == ["numeric_data"]
    assert scoring._short_text_patterns.cache_info().currsize == 8192
