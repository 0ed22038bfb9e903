"""Pure text helpers for keyword retrieval (no database).

Everything here mirrors what the SQLite FTS5 index does with the tokenizer
``porter unicode61 remove_diacritics 2`` so that Python-side scoring (in-memory
tiers, matched keywords, similarities) agrees with the index:

* :func:`tokenize` - lower-cased, diacritics removed, runs of Unicode letters and
  digits (``[^\\W_]+``); punctuation, symbols, emoji and ``_`` separate tokens,
  as in ``unicode61``.
* :func:`stem` - the original Porter (1980) algorithm, the one FTS5's ``porter``
  tokenizer implements, in pure Python (memoised).
* :func:`query_terms` - the searchable words of a free-text query: tokens minus
  stop words and question words, de-duplicated in order.
* :func:`fts5_match` - a MATCH expression that can never be a syntax error.
* :func:`keyword_similarity` - an IDF-weighted keyword coverage in ``[0, 1]``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from itertools import repeat

__all__ = [
    "QUESTION_WORDS",
    "STOP_WORDS",
    "StemFilter",
    "TEMPORAL_WORDS",
    "fts5_match",
    "is_temporal_question",
    "keyword_similarity",
    "matched_keywords",
    "query_terms",
    "stem",
    "stem_all",
    "tokenize",
]

_WORD_RE = re.compile(r"[^\W_]+")

#: Common English function words. They carry no topic, and in conversational text
#: they are frequent enough to drown the real keywords of an OR-ed query.
STOP_WORDS: frozenset[str] = frozenset(
    """
    a about above after again against all am an and any are aren as at be because been
    before being below between both but by can cannot could couldn d did didn do does
    doesn doing don down during each few for from further had hadn has hasn have haven
    having he her here hers herself him himself his i if in into is isn it its itself
    just ll m me more most mustn my myself no nor not now o of off on once only or other
    ought our ours ourselves out over own re s same shan she should shouldn so some such
    t than that the their theirs them themselves then there these they this those
    through to too under until up ve very was wasn we were weren what when where which
    while who whom why will with won would wouldn y you your yours yourself yourselves
    also get got really yeah oh hey hi ok okay thanks thank lot lots like well
    """.split()
)

#: Words that shape a question rather than name its topic ("What kind of ...",
#: "Would X likely ...", "How many times ..."). They are dropped from queries only.
QUESTION_WORDS: frozenset[str] = frozenset(
    """
    what when where which who whom whose why how whats whens wheres whos hows
    did does do is are was were has have had can could would should will shall may
    might must kind type sort likely probably possibly mention mentioned mentions
    say said tell told describe describes described name named many much often
    long ago time times ever specific particular
    """.split()
)

#: Words and patterns that date an event; a "when" question prefers a turn that has
#: one (the answer type of the question).
TEMPORAL_WORDS: frozenset[str] = frozenset(
    """
    yesterday today tonight tomorrow ago last next recently recent earlier later
    week weeks weekend month months year years day days morning evening night
    afternoon since january february march april may june july august september
    october november december monday tuesday wednesday thursday friday saturday
    sunday summer winter spring autumn fall christmas birthday
    """.split()
)

_YEAR_RE = re.compile(r"^(19|20)\d\d$")
_TEMPORAL_Q_RE = re.compile(
    r"\b(when|what\s+(year|month|day|date|time)|how\s+long|which\s+(year|month|day))\b",
    re.IGNORECASE,
)


#: Words that give a count; a "how many" question prefers a turn that has one.
NUMBER_WORDS: frozenset[str] = frozenset(
    """
    one two three four five six seven eight nine ten eleven twelve twenty thirty
    hundred thousand dozen couple few several both once twice first second third
    """.split()
)
_NUMBER_RE = re.compile(r"^\d+$")
_COUNT_Q_RE = re.compile(r"\bhow\s+(many|much|often|old)\b", re.IGNORECASE)


_MONTHS: dict[str, int] = {
    m: i
    for i, m in enumerate(
        "january february march april may june july august september october november december".split(),
        start=1,
    )
}
_MONTHS.update({m[:3]: i for m, i in list(_MONTHS.items()) if m != "may"})
_MONTHS.pop("mar", None)  # "mar" is a verb more often than March
_DAY_RE = re.compile(r"^(\d{1,2})(st|nd|rd|th)?$")


def query_dates(query: str) -> list[tuple[int | None, int | None, int | None]]:
    """Calendar dates named in ``query`` as ``(year, month, day)`` (unknown parts None).

    Recognised: ``13 October 2023``, ``October 13, 2023``, ``October 2023``,
    ``in October``, ``2023``. A bare ``may`` counts only before a day or a year
    (``May 3``, ``May 2023``); a bare year only when no fuller date names it.
    """
    tokens = tokenize(query)
    out: list[tuple[int | None, int | None, int | None]] = []
    used_years: set[int] = set()
    for i, tok in enumerate(tokens):
        month = _MONTHS.get(tok)
        if month is None:
            continue
        prev = tokens[i - 1] if i > 0 else ""
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        nxt2 = tokens[i + 2] if i + 2 < len(tokens) else ""
        day: int | None = None
        year: int | None = None
        if (m := _DAY_RE.match(prev)) and 1 <= int(m.group(1)) <= 31:
            day = int(m.group(1))
            if _YEAR_RE.match(nxt):
                year = int(nxt)
        elif (m := _DAY_RE.match(nxt)) and 1 <= int(m.group(1)) <= 31:
            day = int(m.group(1))
            if _YEAR_RE.match(nxt2):
                year = int(nxt2)
        elif _YEAR_RE.match(nxt):
            year = int(nxt)
        if tok == "may" and day is None and year is None:
            continue  # the modal verb
        if year is not None:
            used_years.add(year)
        out.append((year, month, day))
    for tok in tokens:
        if _YEAR_RE.match(tok) and int(tok) not in used_years:
            out.append((int(tok), None, None))
    return list(dict.fromkeys(out))


def date_words(query: str) -> list[str]:
    """The tokens of ``query`` that can be part of a date (month names, days, years)."""
    return [t for t in tokenize(query) if t in _MONTHS or _YEAR_RE.match(t) or _DAY_RE.match(t)]


def date_matches(day: str, dates: Sequence[tuple[int | None, int | None, int | None]]) -> bool:
    """True when ``day`` (``YYYY-MM-DD``, a message's date) fits one of ``dates``."""
    if len(day) < 10 or not dates:
        return False
    try:
        y, m, d = int(day[:4]), int(day[5:7]), int(day[8:10])
    except ValueError:
        return False
    return any(
        (yy is None or yy == y) and (mm is None or mm == m) and (dd is None or dd == d)
        for yy, mm, dd in dates
    )


def is_count_question(query: str) -> bool:
    """True when ``query`` asks for a number ("how many", "how much", "how often", "how old")."""
    return bool(_COUNT_Q_RE.search(query))


def has_number(tokens: Iterable[str]) -> bool:
    """True when the (unstemmed) tokens contain a number, in digits or in words."""
    return any(t in NUMBER_WORDS or _NUMBER_RE.match(t) for t in tokens)


def _fold(text: str) -> str:
    """Lower-case and strip diacritics (``remove_diacritics 2``)."""
    text = text.lower()
    if text.isascii():
        return text
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def tokenize(text: str) -> list[str]:
    """Split ``text`` into lower-case words the way ``unicode61`` does."""
    return _WORD_RE.findall(_fold(text))


# --------------------------------------------------------------------------- Porter
_VOWELS = frozenset("aeiou")


def _is_cons(word: str, i: int) -> bool:
    ch = word[i]
    if ch in _VOWELS:
        return False
    if ch == "y":
        return i == 0 or not _is_cons(word, i - 1)
    return True


def _measure(stem_: str) -> int:
    """Porter's m: the number of VC sequences in ``stem_``."""
    m = 0
    prev_vowel = False
    for i in range(len(stem_)):
        cons = _is_cons(stem_, i)
        if cons and prev_vowel:
            m += 1
        prev_vowel = not cons
    return m


def _has_vowel(stem_: str) -> bool:
    return any(not _is_cons(stem_, i) for i in range(len(stem_)))


def _ends_double_cons(word: str) -> bool:
    return len(word) >= 2 and word[-1] == word[-2] and _is_cons(word, len(word) - 1)


def _cvc(word: str) -> bool:
    if len(word) < 3:
        return False
    n = len(word)
    return (
        _is_cons(word, n - 3)
        and not _is_cons(word, n - 2)
        and _is_cons(word, n - 1)
        and word[-1] not in "wxy"
    )


_STEP2 = (
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"),
    ("izer", "ize"), ("bli", "ble"), ("alli", "al"), ("entli", "ent"), ("eli", "e"),
    ("ousli", "ous"), ("ization", "ize"), ("ation", "ate"), ("ator", "ate"),
    ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous"),
    ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"), ("logi", "log"),
)  # fmt: skip
_STEP3 = (
    ("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"),
    ("ful", ""), ("ness", ""),
)  # fmt: skip
_STEP4 = (
    "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent",
    "ion", "ou", "ism", "ate", "iti", "ous", "ive", "ize",
)  # fmt: skip


def _replace(word: str, table: Iterable[tuple[str, str]], min_m: int) -> str:
    for suffix, repl in table:
        if word.endswith(suffix):
            base = word[: -len(suffix)]
            return base + repl if _measure(base) > min_m else word
    return word


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """Porter-stem one lower-case token (the classic algorithm, as FTS5 ``porter``)."""
    if len(word) <= 2 or not word.isascii():
        return word
    w = word
    # Step 1a
    if w.endswith("sses"):
        w = w[:-2]
    elif w.endswith("ies"):
        w = w[:-2]
    elif w.endswith("ss"):
        pass
    elif w.endswith("s"):
        w = w[:-1]
    # Step 1b
    extra = False
    if w.endswith("eed"):
        if _measure(w[:-3]) > 0:
            w = w[:-1]
    elif w.endswith("ed") and _has_vowel(w[:-2]):
        w = w[:-2]
        extra = True
    elif w.endswith("ing") and _has_vowel(w[:-3]):
        w = w[:-3]
        extra = True
    if extra:
        if w.endswith(("at", "bl", "iz")):
            w += "e"
        elif _ends_double_cons(w) and w[-1] not in "lsz":
            w = w[:-1]
        elif _measure(w) == 1 and _cvc(w):
            w += "e"
    # Step 1c
    if w.endswith("y") and _has_vowel(w[:-1]):
        w = w[:-1] + "i"
    # Steps 2 and 3
    w = _replace(w, _STEP2, 0)
    w = _replace(w, _STEP3, 0)
    # Step 4
    for suffix in _STEP4:
        if w.endswith(suffix):
            base = w[: -len(suffix)]
            if _measure(base) > 1:
                if suffix == "ion":
                    if base.endswith(("s", "t")):
                        w = base
                else:
                    w = base
            break
    # Step 5a
    if w.endswith("e"):
        base = w[:-1]
        m = _measure(base)
        if m > 1 or (m == 1 and not _cvc(base)):
            w = base
    # Step 5b
    if _measure(w) > 1 and _ends_double_cons(w) and w.endswith("l"):
        w = w[:-1]
    return w


def stem_all(tokens: Iterable[str]) -> list[str]:
    """Stem every token."""
    return [stem(t) for t in tokens]


SHORT_TEXT_TOKENS = 256  # StemFilter.counts reads a text this short token by token


def _prefix_key(word: str) -> str:
    return word[:2].replace("y", "i")


class StemFilter:
    """Cheap pre-check: can a token's Porter stem be one of ``stems``?

    Porter only rewrites the end of a word; the first two letters of a token and
    of its stem agree up to ``y``/``i`` (step 1c), and a one-letter stem is a prefix
    of the token. Checked on 400,000 words. Stemming only the tokens that pass
    keeps a cold process (one CLI call, empty stem cache) fast.
    """

    def __init__(self, stems: Iterable[str]) -> None:
        self.stems = frozenset(stems)
        self._keys = frozenset(_prefix_key(s) for s in self.stems if len(s) >= 2)
        self._singles = frozenset(s for s in self.stems if len(s) < 2)

    def _stem_of(self, tok: str, seen: dict[str, str | None]) -> str | None:
        """``tok``'s stem when it is one of ``stems``, else None (remembered in ``seen``:
        a long text repeats few distinct words, so each is checked once)."""
        st: str | None = None
        if _prefix_key(tok) in self._keys or tok[:1] in self._singles:
            st = stem(tok)
            if st not in self.stems:
                st = None
        seen[tok] = st
        return st

    def positions(self, tokens: Iterable[str]) -> dict[str, list[int]]:
        """Token positions of each of ``stems`` among ``tokens``."""
        out: dict[str, list[int]] = {}
        seen: dict[str, str | None] = {}
        for pos, tok in enumerate(tokens):
            st = seen[tok] if tok in seen else self._stem_of(tok, seen)
            if st is not None:
                out.setdefault(st, []).append(pos)
        return out

    def counts(self, tokens: Sequence[str]) -> Counter[str]:
        """Occurrences of each of ``stems`` among ``tokens``.

        A short text (a chat turn) is read token by token, the ``stem`` cache answering
        repeats; a long one is counted first, so each distinct word is checked once.
        Both give the same counts; the first takes about a third less time on a chat turn
        (`bench/stem_counts.py`: 24.4 -> 15.7 µs on LoCoMo turns, 24 tokens on average).
        """
        keys, singles, stems = self._keys, self._singles, self.stems
        pairs = zip(tokens, repeat(1)) if len(tokens) <= SHORT_TEXT_TOKENS else Counter(tokens).items()
        out: Counter[str] = Counter()
        for tok, n in pairs:
            if _prefix_key(tok) in keys or tok[:1] in singles:
                st = stem(tok)
                if st in stems:
                    out[st] += n
        return out


# --------------------------------------------------------------------------- queries
def query_terms(query: str) -> list[str]:
    """The searchable words of ``query`` (unstemmed, lower-case, de-duplicated).

    Stop words and question words are dropped; a query made only of them ("what
    did you", "the of") has nothing searchable and gives ``[]``.
    """
    tokens = tokenize(query)
    seen: set[str] = set()
    out: list[str] = []
    for tok in tokens:
        if tok in STOP_WORDS or tok in QUESTION_WORDS or tok in seen:
            continue
        seen.add(tok)
        out.append(tok)
    return out


def fts5_match(terms: Sequence[str]) -> str | None:
    """A safe FTS5 MATCH expression ``"a" OR "b"``; ``None`` when ``terms`` is empty.

    Each token is double-quoted with inner quotes doubled, so operators (``AND``,
    ``NEAR``), column filters (``foo:bar``), ``*``, ``^``, ``-`` and parentheses are
    plain text to FTS5. NUL characters are removed.
    """
    # NUL would end the C string inside the quotes ("unterminated string")
    cleaned = (t.replace("\x00", "") for t in terms)
    parts = ['"' + t.replace('"', '""') + '"' for t in cleaned if t.strip()]
    if not parts:
        return None
    return " OR ".join(parts)


def is_temporal_question(query: str) -> bool:
    """True when ``query`` asks for a time ("when", "what year", "how long")."""
    return bool(_TEMPORAL_Q_RE.search(query))


def has_temporal_expression(tokens: Iterable[str]) -> bool:
    """True when the (unstemmed) tokens contain a date or a time word."""
    return any(t in TEMPORAL_WORDS or _YEAR_RE.match(t) for t in tokens)


def matched_keywords(query_terms_: Sequence[str], text: str) -> list[str]:
    """The query terms (as given) whose Porter stem occurs in ``text``."""
    found = StemFilter(stem(t) for t in query_terms_).counts(tokenize(text))
    return [t for t in query_terms_ if stem(t) in found]


def keyword_similarity(
    query_terms_: Sequence[str],
    text: str,
    idf: Mapping[str, float] | None = None,
) -> float:
    """IDF-weighted share of the query's keywords found in ``text``, in ``[0, 1]``.

    ``sum(idf(t) for matched t) / sum(idf(t) for all t)`` over distinct stems of
    ``query_terms_``; ``idf`` maps a *stem* to its weight (missing stems weigh 1.0,
    so without ``idf`` it is the plain matched-keyword fraction). 0.0 for no terms.
    """
    stems = list(dict.fromkeys(stem_all(query_terms_)))
    if not stems:
        return 0.0
    text_stems = StemFilter(stems).counts(tokenize(text))
    weights = {s: (idf.get(s, 1.0) if idf is not None else 1.0) for s in stems}
    total = sum(weights.values())
    if total <= 0.0:
        return 0.0
    got = sum(w for s, w in weights.items() if s in text_stems)
    return max(0.0, min(1.0, got / total))


def bm25_idf(n_docs: int, doc_freq: int) -> float:
    """The BM25 IDF FTS5 uses, ``ln((N - n + 0.5) / (n + 0.5))``, floored at 1e-6."""
    value = math.log((n_docs - doc_freq + 0.5) / (doc_freq + 0.5))
    return value if value > 1e-6 else 1e-6


# ------------------------------------------------------------------ questions and answers
_SENTENCE_RE = re.compile(r"[^.!?\n]*(?:[.!?]+|\n|$)")
_NOT_KNOWN_RE = re.compile(
    r"\b(?:(?:do|does|did)\s*(?:n[o']?t|not)\s+(?:know|remember|have\s+access)"
    r"|not\s+sure|no\s+idea|only\s+know|no\s+access|(?:can'?t|cannot|could\s*n'?t)\s+(?:tell|say|see|remember)"
    r"|not\s+aware|unknown\s+to\s+me)\b",
    re.IGNORECASE,
)


def question_stems(text: str, stems: Iterable[str]) -> tuple[set[str], set[str]]:
    """Which of ``stems`` the text holds in questions (sentences ending in ``?``) and elsewhere."""
    wanted = StemFilter(stems)
    asked: set[str] = set()
    told: set[str] = set()
    for sentence in _SENTENCE_RE.findall(text):
        if not sentence.strip():
            continue
        found = wanted.counts(tokenize(sentence))
        (asked if sentence.rstrip().endswith("?") else told).update(found)
    return asked, told


def asks_about(text: str, stems: Iterable[str]) -> bool:
    """Whether ``text`` asks about ``stems``: those it holds weigh at least as much in its
    questions (sentences ending in ``?``) as elsewhere. The answer step's test for a
    question whose answer should rank above it (keyword ranking and fusion alike)."""
    if "?" not in text:
        return False
    asked, told = question_stems(text, stems)
    return bool(asked) and len(asked) >= len(told)


def is_non_answer(text: str) -> bool:
    """True for a reply that answers nothing: every sentence a question, or "I don't know"."""
    folded = text.replace("\u2019", "'")
    if _NOT_KNOWN_RE.search(folded):
        return True
    sentences = [s.strip() for s in _SENTENCE_RE.findall(folded) if s.strip()]
    return bool(sentences) and all(s.endswith("?") for s in sentences)
