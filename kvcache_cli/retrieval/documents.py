"""The documents keyword ranking scores: a message's stems, positions and speaker.

:func:`make_doc` turns a stored message (or an in-memory entry) into a :class:`Doc`:
its stem counts, length and token positions, the speaker's name kept apart, the
query-independent parts memoised per text (:func:`profile`, bounded). :func:`session_idf`
and :func:`_proximity` give the collection statistics and the word-pair term that
``ranking.rank_candidates`` combines.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
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


class Profile:
    """What ranking reads from one known text, worked out once.

    ``tokens`` and ``counts`` (every stem, speaker prefix included) are filled at once;
    per speaker name its base (:func:`_base`), per prefix length its stem positions
    and whether it holds a time expression are filled when first asked for.
    """

    __slots__ = ("bases", "counts", "positions", "temporal", "tokens")

    def __init__(self, tokens: list[str], counts: Counter[str]) -> None:
        self.tokens = tokens
        self.counts = counts
        self.bases: dict[str | None, tuple[Counter[str], int, frozenset[str], int]] = {}
        self.positions: dict[int, dict[str, list[int]]] = {}
        self.temporal: bool | None = None


class TextProfiles:
    """A bounded memo of :class:`Profile` by text, least recently used evicted first.

    A replay ranks the same session's messages thousands of times (and ``kvcache serve``
    the same live sessions for its whole life), so a text seen twice keeps its profile
    and a candidate then costs a few dict lookups instead of a pass over its tokens. A
    text seen once is not stemmed whole (one CLI call stays as cheap as ``StemFilter``
    makes it). Bounds: ``max_texts`` profiles and ``max_chars`` characters of text in
    all; a text longer than ``text_max`` is never kept. A profile costs about 50 bytes
    per character of its text (measured on the LoCoMo dev turns with a speaker base,
    positions and time flag), so the defaults hold at most about 200 MB; the replay's
    working set (its four most recent sessions, ``session_index``) is at most 40,000
    messages, which fit at 100 characters each. The memo changes speed only, never
    results.
    """

    def __init__(self, max_texts: int = 50_000, max_chars: int = 4_000_000, text_max: int = 200_000) -> None:
        self.max_texts = max_texts
        self.max_chars = max_chars
        self.text_max = text_max
        self._entries: OrderedDict[str, Profile] = OrderedDict()
        self._seen_once: set[int] = set()  # hashes of texts seen once (a collision only profiles early)
        self.chars = 0
        # serve ranks in several threads at once: sightings, insertions, evictions and the
        # character count change under this lock; a hit only reads and reorders (each one
        # atomic OrderedDict call), and tokenising and stemming a new text runs outside it
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def known(self, text: str) -> Profile | None:
        """The profile of ``text`` if it is kept (no admission, no reordering)."""
        return self._entries.get(text)

    def profile(self, text: str, remember: bool = False) -> Profile | None:
        """The profile of ``text`` if known, made now on its second sighting (or with
        ``remember``); else None, the sighting noted."""
        entries = self._entries
        prof = entries.get(text)
        if prof is not None:
            try:
                entries.move_to_end(text)
            except KeyError:  # evicted by another thread since the lookup: still a good profile
                pass
            return prof
        if len(text) > self.text_max or len(text) > self.max_chars:
            return None
        with self._lock:
            if not remember:
                key = hash(text)
                if key not in self._seen_once:
                    if len(self._seen_once) >= self.max_texts:
                        self._seen_once.clear()
                    self._seen_once.add(key)
                    return None
        tokens = ts.tokenize(text)
        made = Profile(tokens, Counter(ts.stem_all(tokens)))
        with self._lock:
            prof = entries.get(text)  # another thread may have made it meanwhile
            if prof is not None:
                entries.move_to_end(text)
                return prof
            while entries and (len(entries) >= self.max_texts or self.chars + len(text) > self.max_chars):
                old, _ = entries.popitem(last=False)
                self.chars -= len(old)
            entries[text] = made
            self.chars += len(text)
        return made

    def clear(self) -> None:
        """Forget every profile and sighting."""
        with self._lock:
            self._entries.clear()
            self._seen_once.clear()
            self.chars = 0


#: The process's text profiles (a bounded memo: see :class:`TextProfiles`).
PROFILES = TextProfiles()
PROFILE_TEXT_MAX = PROFILES.text_max


def profile(text: str, remember: bool = False) -> Profile | None:
    """``PROFILES.profile(text, remember)``. The returned profile is shared: do not modify it."""
    return PROFILES.profile(text, remember)


def clear_profiles() -> None:
    """Forget every memoised text profile (tests compare cold and warm ranking with it)."""
    PROFILES.clear()


@lru_cache(maxsize=1024)  # speaker names: a handful per session; each entry is a few words
def name_profile(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A speaker name's tokens and their stems."""
    tokens = ts.tokenize(name)
    return tuple(tokens), tuple(ts.stem_all(tokens))


def _tokens(text: str) -> list[str]:
    """``ts.tokenize(text)``, from the profile when the text is known (do not modify)."""
    prof = PROFILES.known(text)
    return prof.tokens if prof is not None else ts.tokenize(text)


def _has_temporal(text: str) -> bool:
    """``ts.has_temporal_expression(ts.tokenize(text))``, remembered for known texts."""
    prof = PROFILES.known(text)
    if prof is None:
        return ts.has_temporal_expression(ts.tokenize(text))
    if prof.temporal is None:
        prof.temporal = ts.has_temporal_expression(prof.tokens)
    return prof.temporal


def _positions(
    pfilter: ts.StemFilter, text: str, skip: int, held: Iterable[str] | None = None
) -> dict[str, list[int]]:
    """``pfilter.positions(ts.tokenize(text)[skip:])``, from the profile when known.

    ``held``: the filter's stems the text has after its first ``skip`` tokens (a
    known text then looks only those up).
    """
    prof = PROFILES.known(text)
    if prof is None:
        return pfilter.positions(ts.tokenize(text)[skip:])
    posmap = prof.positions.get(skip)
    if posmap is None:  # stem -> positions after the first ``skip`` tokens
        posmap = {}
        for i, tok in enumerate(prof.tokens[skip:]):
            posmap.setdefault(ts.stem(tok), []).append(i)
        if len(prof.positions) >= _PER_TEXT:
            prof.positions.clear()
        prof.positions[skip] = posmap
    stems = pfilter.stems if held is None else held
    return {st: posmap[st] for st in stems if st in posmap}


# A known text keeps a base and a position map per speaker name / prefix length: one
# or two in practice; past this many (the same text said by many speakers) they start over.
_PER_TEXT = 8


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
    prof = PROFILES.known(text)
    if prof is None:
        return ts.matched_keywords(terms, text)
    return [t for t in terms if ts.stem(t) in prof.counts]


def _base(text: str, name: str | None) -> tuple[Counter[str], int, frozenset[str], int] | None:
    """``(full stem counts, length, speaker stems, prefix length)`` of a known text, kept
    in its profile (a replay's candidates then cost one lookup); None for other texts."""
    prof = PROFILES.known(text)
    if prof is None:
        return None
    base = prof.bases.get(name)
    if base is None:
        stems = Counter(prof.counts)
        speaker, prefix_len = _speaker(name, text, prof.tokens, stems)
        if len(prof.bases) >= _PER_TEXT:
            prof.bases.clear()
        base = prof.bases[name] = (stems, len(prof.tokens), speaker, prefix_len)
    return base


def _speaker(
    name: str | None, text: str, tokens: list[str], stems: Counter[str]
) -> tuple[frozenset[str], int]:
    """Speaker stems and ``speaker:`` prefix length; takes the prefix off ``stems``."""
    if not name:
        return frozenset(), 0
    name_tokens, name_stems = name_profile(name)
    prefix_len = 0
    if ":" in text[: len(name) + 2] and tuple(tokens[: len(name_tokens)]) == name_tokens:
        prefix_len = len(name_tokens)
        for st in name_stems:
            if stems.get(st, 0) > 0:
                stems[st] -= 1
    return frozenset(name_stems), prefix_len


def is_profiled(text: str) -> bool:
    """Whether ``text``'s query-independent parts are memoised (cheap to rank again)."""
    return PROFILES.known(text) is not None


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
