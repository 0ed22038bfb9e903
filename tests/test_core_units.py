"""The reference design's logic, piece by piece: scorer, extractor, bridges, keywords (docs/design.md)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from kvcache_cli.engine import bridge
from kvcache_cli.engine.entries import KVEntry, entries_hash
from kvcache_cli.engine.extractor import ExtractedEntry, classify, extract_entries, filter_preserved
from kvcache_cli.engine.scoring import (
    CacheEntryScorer,
    ScoringWeights,
    decayed_engagement,
    extract_keywords,
    next_engagement,
)

NOW = datetime(2025, 5, 1, 12, 0, 0)


def entry(text: str = "plain words here", **kw: object) -> KVEntry:
    fields: dict[str, object] = {
        "key_hash": "h-" + text[:20],
        "key_data": text,
        "value_bytes": 0,
        "last_accessed": NOW,
    }
    fields.update(kw)
    return KVEntry(**fields)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- scorer
def test_weights_are_the_reference_designs() -> None:
    w = ScoringWeights()
    assert (w.recency, w.access_count, w.key_pattern, w.layer, w.head, w.value_size) == (
        0.3,
        0.2,
        0.25,
        0.1,
        0.05,
        0.1,
    )
    assert w.engagement == 0.3


def test_score_parts_add_up() -> None:
    scorer = CacheEntryScorer()
    e = entry("plain words here", access_count=1, layer_index=0, value_bytes=5000)
    # recency 0.3 + access 0.2*0.01 + pattern 0.25*0.1 (attention key) + layer 0.1*0.9
    # + head 0 (none) + size 0.1*0.5 + engagement 0.3*0.3
    assert scorer.score(e, NOW) == pytest.approx(0.3 + 0.002 + 0.025 + 0.09 + 0.05 + 0.09)


def test_each_part() -> None:
    s = CacheEntryScorer()
    base = s.score(entry(), NOW)
    # recency halves after an hour
    assert s.score(entry(last_accessed=NOW - timedelta(hours=1)), NOW) == pytest.approx(base - 0.15)
    # access count saturates at 100
    assert s.score(entry(access_count=100), NOW) - base == pytest.approx(0.2 * 0.99)
    assert s.score(entry(access_count=500), NOW) == s.score(entry(access_count=100), NOW)
    # layers: <10 0.9, <20 0.7, else 0.5
    assert base - s.score(entry(layer_index=15), NOW) == pytest.approx(0.1 * 0.2)
    assert base - s.score(entry(layer_index=25), NOW) == pytest.approx(0.1 * 0.4)
    # heads: <4 0.8, else 0.5
    assert s.score(entry(head_index=2), NOW) - base == pytest.approx(0.05 * 0.8)
    assert s.score(entry(head_index=9), NOW) - base == pytest.approx(0.05 * 0.5)
    # value size saturates at 10,000 bytes
    assert s.score(entry(value_bytes=20000), NOW) - base == pytest.approx(0.1)
    # engagement x 0.3
    e = entry()
    assert s.score(e, NOW, {e.key_hash: 1.0}) - base == pytest.approx(0.3 * 0.7)
    # ffn key types get 0.05 instead of 0.1 of pattern score
    assert base - s.score(entry(key_type="ffn_key"), NOW) == pytest.approx(0.25 * 0.05)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("You are a kind bot", 0.8),
        ("def run(): pass", 0.7),
        ("this is crucial stuff", 0.9),
        ("Which way to go", 0.6),
        ("meet at 5 pm", 0.5),
    ],
)
def test_key_pattern_scores(text: str, pattern: float) -> None:
    s = CacheEntryScorer()
    assert s.key_pattern_score(entry(text)) == pytest.approx(min(1.0, 0.1 + pattern))


def test_pattern_score_is_capped_and_score_clamped() -> None:
    s = CacheEntryScorer()
    e = entry("You are required to fix the python code by 5 pm?")
    assert s.key_pattern_score(e) == 1.0
    big = entry("You are required to fix the python code?", access_count=100, value_bytes=10000, head_index=0)
    assert s.score(big, NOW, {big.key_hash: 1.0}) == 1.0


def test_engagement_steps() -> None:
    assert next_engagement(0.3, retrieved=True) == pytest.approx(0.45)
    assert next_engagement(0.3, retrieved=False) == pytest.approx(0.35)
    assert next_engagement(0.95, retrieved=True) == 1.0
    assert decayed_engagement(0.5) == pytest.approx(0.475)
    assert decayed_engagement(0.1) == 0.1


# ----------------------------------------------------------------------------- extractor
@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Your role is to review pull requests", "system_prompt"),
        ("Here is the fix:\n```\nx = 1\n```", "code_block"),
        ("import os and walk the tree", "code_block"),
        ("This is critical for the launch", "important_concept"),
        ("how do I reset it", "question"),
        ("Is that all?", "question"),
        ("The invoice was 1240 euros", "numeric_data"),
        ("plain chatter about the weather", "attention_key"),
    ],
)
def test_classification_first_match_wins(text: str, kind: str) -> None:
    assert classify(entry(text)) == kind


def test_classification_order_and_key_type() -> None:
    # system prompt beats code beats important beats question beats numbers
    assert classify(entry("You are a python expert, this is important?")) == "system_prompt"
    assert classify(entry("important: return 5?")) == "code_block"
    assert classify(entry("what is the key date, 5 May")) == "important_concept"
    assert classify(entry("plain", key_type="system_prompt")) == "system_prompt"
    assert classify(entry("plain words", key_type="attention_value")) == "attention_value"


def test_extraction_skips_tiny_and_huge_values_and_sorts() -> None:
    scorer = CacheEntryScorer()
    items = [
        entry("tiny", value_bytes=9),
        entry("huge", value_bytes=10001),
        entry("low entry", value_bytes=100, last_accessed=NOW - timedelta(hours=5)),
        entry("high entry", value_bytes=100),
        entry("edge ten", value_bytes=10),
        entry("edge max", value_bytes=10000),
    ]
    out = extract_entries(items, scorer, NOW)
    assert {e.entry.key_data for e in out} == {"low entry", "high entry", "edge ten", "edge max"}
    assert [e.importance for e in out] == sorted((e.importance for e in out), reverse=True)
    assert out[-1].entry.key_data == "low entry"
    assert out[0].keywords == extract_keywords(out[0].entry.key_data)


def extracted(kind: str, importance: float) -> ExtractedEntry:
    return ExtractedEntry(entry(f"{kind} {importance}"), kind, importance, [])


def test_preservation_rules() -> None:
    threshold = 0.7
    items = [
        extracted("system_prompt", 0.71),
        extracted("code_block", 0.71),
        extracted("important_concept", 0.71),
        extracted("attention_key", 0.71),
        extracted("attention_value", 0.71),
        extracted("question", 0.71),  # needs 0.84
        extracted("numeric_data", 0.83),  # needs 0.84
        extracted("numeric_data", 0.84),
        extracted("question", 0.9),
        extracted("important_concept", 0.69),  # under the threshold: never
        extracted("system_prompt", 0.5),
    ]
    kept = filter_preserved(items, threshold, True, True)
    assert [(k.entry_type, k.importance) for k in kept] == [
        ("system_prompt", 0.71),
        ("code_block", 0.71),
        ("important_concept", 0.71),
        ("attention_key", 0.71),
        ("attention_value", 0.71),
        ("numeric_data", 0.84),
        ("question", 0.9),
    ]
    no_sys_code = filter_preserved(items, threshold, False, False)
    assert {k.entry_type for k in no_sys_code} == {
        "important_concept",
        "attention_key",
        "attention_value",
        "numeric_data",
        "question",
    }


# ----------------------------------------------------------------------------- bridges
def test_clear_bridge_text() -> None:
    assert bridge.clear_bridge(12, 3, ["budget", "deadline", "python", "extra"]) == (
        "[Cache Management] Cleared 12 entries from cache, preserved 3 important entries related to: "
        "budget, deadline, python. Continuing with optimized context."
    )
    assert bridge.clear_bridge(5, 0, []) == (
        "[Cache Management] Cleared 5 entries from cache, preserved 0 important entries related to: "
        "various topics. Continuing with optimized context."
    )


def test_retrieval_bridge_text() -> None:
    expected = (
        "[Memory Retrieval] Retrieved {n} entries from {where} for 'alpha', 'beta', 'gamma' "
        "(similarity: 0.57). Integrating into current context."
    )
    for tier, where in ((1, "active cache"), (2, "recent snapshots"), (3, "long-term memory")):
        text = bridge.retrieval_bridge(4, tier, ["alpha", "beta", "gamma", "delta"], 0.5666)
        assert text == expected.format(n=4, where=where)


def test_restore_bridge_text() -> None:
    assert bridge.restore_bridge(7, 12) == (
        "[Cache Restoration] Restored 7 entries from previous snapshot (12 minutes old). "
        "Context has been expanded."
    )
    assert bridge.restore_bridge(7, None) == (
        "[Cache Restoration] Restored 7 entries from previous snapshot. Context has been expanded."
    )


def test_summary_bridge_texts() -> None:
    assert bridge.summary_now("S") == "[Memory compressed — conversation summary up to this point:]\nS"
    assert bridge.summary_prior("S") == "[Prior conversation summary — context before memory compression:]\nS"


# ----------------------------------------------------------------------------- keywords / hashes
def test_keyword_extraction() -> None:
    assert extract_keywords("The Budget budget budget is 4200 euros for the Lisbon trip in May") == [
        "budget",
        "4200",
        "euros",
        "lisbon",
        "trip",
    ]
    assert extract_keywords("a an the of to") == []
    assert extract_keywords(None) == []
    assert extract_keywords("alpha beta alpha", limit=5) == ["alpha", "beta", "alpha"]


def test_entries_hash_ignores_order_but_not_content() -> None:
    a, b = entry("first entry"), entry("second entry")
    assert entries_hash([a, b]) == entries_hash([b, a])
    changed = entry("first entry", access_count=2)
    assert entries_hash([changed, b]) != entries_hash([a, b])


def test_role_system_entries_always_kept_when_preserving_system_prompts() -> None:
    low = ExtractedEntry(entry("You are terse.", key_type="system_prompt"), "system_prompt", 0.2, [])
    assert filter_preserved([low], 0.7, True, True) == [low]
    assert filter_preserved([low], 0.7, False, True) == []


def test_fit_to_budget_keeps_system_then_most_important_within_bytes() -> None:
    from kvcache_cli.engine.extractor import fit_to_budget

    def sized(text: str, size: int, key_type: str = "attention_key", imp: float = 0.9) -> ExtractedEntry:
        e = entry(text, key_type=key_type)
        e.size_bytes = size
        return ExtractedEntry(e, key_type, imp, [])

    sys_ = sized("You are terse.", 500, "system_prompt", 0.2)
    big, mid, small = sized("big", 600, imp=0.95), sized("mid", 300, imp=0.9), sized("small", 100, imp=0.8)
    kept = fit_to_budget([big, mid, small, sys_], 1000)
    assert kept == [mid, small, sys_]  # input order kept; the system message first in line
    assert fit_to_budget([big, mid], 0) == [big, mid]  # no capacity known: no budget
