"""The word-set fast paths of scoring and summary agree with the reference design's regexes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_cli.engine import scoring, summary

WORDS = sorted(
    scoring.SYSTEM_WORDS | scoring.CODE_WORDS | scoring.IMPORTANT_WORDS | scoring.NUMERIC_WORDS
) + [
    "you are",
    "your role",
    "c++",
    "c#",
    "o'clock",
    "decided",
    "let's",
    "going to",
    "needs",
    "Alice",
    "plan",
    "fixing",
    "agreed",
    "x",
    "class_",
    "_main",
    "key2",
    "Day",
    "ΣYSTEM",
    "ſystem",
]
PIECES = st.sampled_from(WORDS) | st.text(alphabet=" .,!?'\n#+_-%:3Ab", max_size=4)
TEXTS = st.lists(PIECES, max_size=12).map("".join) | st.text(max_size=40)


@pytest.mark.slow
@settings(max_examples=600, deadline=None)
@given(TEXTS)
def test_pattern_probes_match_the_regexes(text: str) -> None:
    probe = scoring.probe_words(text, scoring._PATTERN_WORDS)
    assert scoring.system_prompt_match(text, probe) == bool(scoring.SYSTEM_PROMPT_RE.search(text))
    assert scoring.code_match(text, probe) == bool(scoring.CODE_RE.search(text))
    assert scoring.important_match(text, probe) == bool(scoring.IMPORTANT_RE.search(text))
    assert scoring.numeric_match(text, probe) == bool(scoring.NUMERIC_RE.search(text))
    probe = scoring.probe_words(text, summary._SENTENCE_WORDS)
    assert summary._decision_match(text, probe) == bool(summary._DECISION_RE.search(text))


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_summary_regex_rewrites_match_the_reference(text: str) -> None:
    import re

    reference_split = re.compile(r"(?<=[.!?])\s+|\n+")
    reference_name = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]{2,}\b")
    assert summary._SENTENCE_RE.split(text) == reference_split.split(text)
    assert summary._NAME_RE.findall(text) == reference_name.findall(text)
