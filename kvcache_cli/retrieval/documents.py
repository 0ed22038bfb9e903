"""The documents keyword ranking scores: a message's stems, positions and speaker.

:func:`make_doc` turns a stored message (or an in-memory entry) into a :class:`Doc`:
its stem counts, length and token positions, the speaker's name kept apart, the
query-independent parts memoised per text (:func:`profile`, bounded). :func:`session_idf`
and :func:`_proximity` give the collection statistics and the word-pair term that
``ranking.rank_candidates`` combines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvcache_cli.retrieval import textsearch as ts

# BM25 constants of FTS5's bm25() (fixed in SQLite's source).
BM25_K1 = 1.2
BM25_B = 0.75


@dataclass
class Doc:
    """A candidate message: the query stems it holds, its length and its speaker."""

    message_id: int
    session_id: int
    index: int
    name: str | None
    content: str
    day: str
    stems: Counter[str]
    length: int
    speaker_stems: frozenset[str]
    prefix_len: int = 0  # tokens of the ``speaker:`` prefix (not part of the text)
    # which stems ``stems`` holds a key for (every stem of the text if ``all_stems``):
    # a stem counted there is in the text iff it is a key (speaker prefix included)
    counted: frozenset[str] = frozenset()
    all_stems: bool = False


# Text profiles: a replay queries the same session's messages thousands of times, so a
# text seen twice keeps its tokens and full stem counts (bounded), and a candidate then
# costs a few dict lookups instead of a pass over its tokens. A text seen once is not
# stemmed whole (the cold path, one CLI call, stays as cheap as StemFilter makes it).
# The caches change speed only, never results.
# Bounded by count and by size: a text longer than PROFILE_TEXT_MAX is never kept, and
# the caches start over past _PROFILE_MAX texts or _PROFILE_CHARS characters in all.
_PROFILES: dict[str, tuple[list[str], Counter[str]]] = {}
_SEEN_ONCE: set[int] = set()  # hashes of texts seen once (a collision only profiles early)
_PROFILE_MAX = 50_000
_PROFILE_CHARS = 20_000_000
PROFILE_TEXT_MAX = 200_000
_profiled_chars = 0
# per known text (same lifetime as _PROFILES): stem -> token positions; has a time word
_POSITIONS: dict[tuple[str, int], dict[str, list[int]]] = {}
_TEMPORAL: dict[str, bool] = {}


def profile(text: str, remember: bool = False) -> tuple[list[str], Counter[str]] | None:
    """``(tokens, stem counts)`` of ``text`` if known (or ``remember``); else None, noted.

    The returned objects are shared: callers must not modify them.
    """
    global _profiled_chars
    prof = _PROFILES.get(text)
    if prof is not None:
        return prof
    if len(text) > PROFILE_TEXT_MAX:
        return None
    if not remember and hash(text) not in _SEEN_ONCE:
        if len(_SEEN_ONCE) >= _PROFILE_MAX:
            _SEEN_ONCE.clear()
        _SEEN_ONCE.add(hash(text))
        return None
    tokens = ts.tokenize(text)
    prof = (tokens, Counter(ts.stem_all(tokens)))
    if len(_PROFILES) >= _PROFILE_MAX or _profiled_chars + len(text) > _PROFILE_CHARS:
        _PROFILES.clear()
        _POSITIONS.clear()
        _TEMPORAL.clear()
        _BASES.clear()
        _profiled_chars = 0
    _PROFILES[text] = prof
    _profiled_chars += len(text)
    return prof


_NAMES: dict[str, tuple[list[str], list[str]]] = {}


def name_profile(name: str) -> tuple[list[str], list[str]]:
    """A speaker name's tokens and their stems (few distinct names: cached)."""
    prof = _NAMES.get(name)
    if prof is None:
        tokens = ts.tokenize(name)
        prof = (tokens, ts.stem_all(tokens))
        if len(_NAMES) >= 10_000:
            _NAMES.clear()
        _NAMES[name] = prof
    return prof


def _tokens(text: str) -> list[str]:
    """``ts.tokenize(text)``, from the profile cache when the text is known (do not modify)."""
    prof = _PROFILES.get(text)
    return prof[0] if prof is not None else ts.tokenize(text)


def _has_temporal(text: str) -> bool:
    """``ts.has_temporal_expression(ts.tokenize(text))``, remembered for known texts."""
    flag = _TEMPORAL.get(text)
    if flag is None:
        flag = ts.has_temporal_expression(_tokens(text))
        if text in _PROFILES:
            _TEMPORAL[text] = flag
    return flag


def _positions(
    pfilter: ts.StemFilter, text: str, skip: int, held: Iterable[str] | None = None
) -> dict[str, list[int]]:
    """``pfilter.positions(ts.tokenize(text)[skip:])``, from a per-text map when known.

    ``held``: the filter's stems the text has after its first ``skip`` tokens (a
    known text then looks only those up).
    """
    prof = _PROFILES.get(text)
    if prof is None:
        return pfilter.positions(ts.tokenize(text)[skip:])
    key = (text, skip)
    posmap = _POSITIONS.get(key)
    if posmap is None:  # stem -> positions after the first ``skip`` tokens
        posmap = {}
        for i, tok in enumerate(prof[0][skip:]):
            posmap.setdefault(ts.stem(tok), []).append(i)
        _POSITIONS[key] = posmap
    stems = pfilter.stems if held is None else held
    return {st: posmap[st] for st in stems if st in posmap}


def _doc_matched(
    terms: Sequence[str], d: Doc, term_stems: list[tuple[str, str]], stem_set: frozenset[str]
) -> list[str]:
    """``matched(terms, d.content)`` read from the doc's stem counts when they cover the terms.

    ``term_stems`` pairs each term with its stem; ``stem_set`` is the set of those stems.
    """
    if not d.all_stems and not stem_set <= d.counted:
        return matched(terms, d.content)
    held = d.stems
    return [t for t, st in term_stems if st in held]


def matched(terms: Sequence[str], text: str) -> list[str]:
    """``ts.matched_keywords`` through the profile cache when the text is known."""
    prof = _PROFILES.get(text)
    if prof is None:
        return ts.matched_keywords(terms, text)
    return [t for t in terms if ts.stem(t) in prof[1]]


# Per known text and speaker: its full stem counts (speaker prefix taken off), length,
# speaker stems and prefix length. Filled with _PROFILES (a text seen twice), so a
# replay's candidates cost one lookup; cleared with it.
_BASES: dict[tuple[str, str | None], tuple[Counter[str], int, frozenset[str], int]] = {}


def _base(text: str, name: str | None) -> tuple[Counter[str], int, frozenset[str], int] | None:
    """Cached ``(full stem counts, length, speaker stems, prefix length)`` of a known text."""
    key = (text, name)
    base = _BASES.get(key)
    if base is not None:
        return base
    prof = _PROFILES.get(text)
    if prof is None:
        return None
    tokens, full = prof
    stems = Counter(full)
    speaker, prefix_len = _speaker(name, text, tokens, stems)
    if len(_BASES) >= _PROFILE_MAX:
        _BASES.clear()
    base = _BASES[key] = (stems, len(tokens), speaker, prefix_len)
    return base


def _speaker(
    name: str | None, text: str, tokens: list[str], stems: Counter[str]
) -> tuple[frozenset[str], int]:
    """Speaker stems and ``speaker:`` prefix length; takes the prefix off ``stems``."""
    if not name:
        return frozenset(), 0
    name_tokens, name_stems = name_profile(name)
    prefix_len = 0
    if ":" in text[: len(name) + 2] and tokens[: len(name_tokens)] == name_tokens:
        prefix_len = len(name_tokens)
        for st in name_stems:
            if stems.get(st, 0) > 0:
                stems[st] -= 1
    return frozenset(name_stems), prefix_len


def is_profiled(text: str) -> bool:
    """Whether ``text``'s query-independent parts are memoised (cheap to rank again)."""
    return text in _PROFILES


def make_doc(
    mid: int,
    sid: int,
    idx: int,
    name: str | None,
    content: str | None,
    stamp: Any = None,
    only: ts.StemFilter | None = None,
) -> Doc:
    """A candidate: counts of the stems in ``only`` (all stems if None) and length.

    The ``speaker:`` prefix counts in the length (as FTS5 sees it) but not as a
    mention of the speaker's name. A known text (see :func:`profile`) gets its cached
    full counts whatever ``only`` says: ranking reads the same values from either.
    """
    text = content or ""
    base = _base(text, name) if profile(text) is not None else None
    counted: frozenset[str] = frozenset()  # stems ``stems`` was counted for (all if all_stems)
    if base is not None:
        stems, length, speaker, prefix_len = base
        all_stems = True
    else:
        tokens = ts.tokenize(text)
        stems = only.counts(tokens) if only is not None else Counter(ts.stem_all(tokens))
        speaker, prefix_len = _speaker(name, text, tokens, stems)
        length = len(tokens)
        all_stems = only is None
        if only is not None:
            counted = only.stems
    day = str(stamp or "")[:10]
    return Doc(
        int(mid), int(sid), int(idx), name, text, day, stems, length, speaker, prefix_len, counted, all_stems
    )


def session_idf(
    docs: Sequence[Doc], stems: Sequence[str], n_rows: int, more: dict[str, int] | None = None
) -> dict[str, float]:
    """IDF of ``stems`` with ``docs`` = every match of a collection of ``n_rows`` rows.

    ``more``: document frequencies of matches left out of ``docs``.
    """
    wanted = frozenset(stems)
    df = {s: (more.get(s, 0) if more else 0) for s in stems}
    for d in docs:  # set intersections: a doc costs its matches, not the query's length
        held = d.stems.keys() & wanted
        if d.speaker_stems:
            held |= d.speaker_stems & wanted
        for s in held:
            df[s] += 1
    return {s: ts.bm25_idf(int(n_rows), df[s]) for s in stems}


def _near_count(first: list[int], second: list[int], window: int) -> int:
    """How many positions of ``first`` have a position of ``second`` (not the same one)
    within ``window``: one merge of the two sorted lists."""
    count, j, n = 0, 0, len(second)
    for i in first:
        while j < n and second[j] < i - window:
            j += 1
        k = j
        while k < n and second[k] <= i + window:
            if second[k] != i:
                count += 1
                break
            k += 1
    return count


def _proximity(
    positions: dict[str, list[int]],
    pairs: Sequence[tuple[str, str, float]],
    window: int,
    doc_len: int,
    avg_len: float,
    b: float,
) -> float:
    """BM25-like score of query-adjacent word pairs found within ``window`` tokens.

    Each pair ``(a, b, w)`` seen ``tf`` times close together (either order) counts as
    a pseudo-term of weight ``w``: ``w * tf * (k1 + 1) / (tf + k1 * norm)``.
    """
    score = 0.0
    norm = BM25_K1 * (1.0 - b + b * doc_len / (avg_len if avg_len > 0 else 1.0))
    for a, c, w in pairs:
        pa, pc = positions.get(a), positions.get(c)
        if not pa or not pc:
            continue
        tf = _near_count(pa, pc, window)
        if tf:
            score += w * tf * (BM25_K1 + 1.0) / (tf + norm)
    return score
