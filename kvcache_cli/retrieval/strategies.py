"""Retrieval strategies: keyword, semantic, the two cascades and the hybrid fusion.

Every tier produces two ranked lists of :class:`RetrievedEntry` for a query:

* keyword: BM25 (``search_sqlite``), ``score`` = ``1 - exp(-bm25 / ideal)`` in [0, 1];
* semantic: cosine of the query's embedding and the message's stored embedding,
  ``score`` = ``max(0, cos)`` in [0, 1].

:func:`combine` turns them into one list per tier, by ``cache.retrieval_strategy``:

``auto`` (the default)
    ``hybrid`` when an embeddings server gave the query a vector, else ``keyword_only``
    (silently: see :func:`resolve`).
``keyword_only`` / ``semantic_only``
    that list alone.
``keyword_then_semantic`` / ``semantic_then_keyword``
    the first list; when it has fewer than ``need`` results (after the tier's
    threshold), the other list fills the rest. Fill results carry ``stage = 1`` so
    :func:`retrieval.merge_results` ranks them after every first-stage result.
``hybrid``
    normalised weighted fusion (see :func:`fuse_weighted`) with ``[cache.hybrid]``
    weights (scaled to sum to 1). Reciprocal rank fusion (:func:`fuse_rrf`) and the
    other fusion settings (:class:`Fusion`, named by :func:`parse_fusion`) are kept for
    comparison; ``bench/locomo_hybrid_loo.py`` chooses among them (docs/retrieval.md).

All scores stay in [0, 1].
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from kvcache_cli.retrieval import textsearch as ts
from kvcache_cli.retrieval.fusion import RetrievedEntry

__all__ = [
    "DEFAULT_FUSION",
    "FUSIONS",
    "answers_first",
    "Fusion",
    "SEMANTIC_STRATEGIES",
    "combine",
    "fuse_rrf",
    "fuse_weighted",
    "ident",
    "needs_semantic",
    "parse_fusion",
    "resolve",
    "semantic_context",
    "semantic_entries",
    "semantic_score",
]

SEMANTIC_STRATEGIES = ("auto", "semantic_only", "keyword_then_semantic", "semantic_then_keyword", "hybrid")
QUIET_FALLBACK = ("auto", "keyword_then_semantic")
"""Strategies whose run without an embeddings server is no news (no notice): ``auto`` (the
default) and ``keyword_then_semantic`` (its keyword stage stands on its own)."""
FUSIONS = ("weighted", "rrf")
RRF_K = 60.0
NORMALISATIONS = ("max", "median")


@dataclass(frozen=True)
class Fusion:
    """How ``hybrid`` fuses a tier's keyword and semantic lists.

    ``kind``: ``weighted`` (:func:`fuse_weighted`) or ``rrf`` (:func:`fuse_rrf`, with
    ``k``). ``normalise`` (weighted): ``max`` divides each side by its best score for
    the query; ``median`` first subtracts the side's median over the session's messages
    (a keyword side's median is 0: most messages match no word), so the semantic side
    counts how far a message stands above the session's typical similarity instead of
    its raw cosine. ``context``: weight of the semantic side's neighbour context
    (:func:`semantic_context`).
    """

    kind: str = "weighted"
    normalise: str = "max"
    k: float = RRF_K
    context: float = 0.25

    def __post_init__(self) -> None:
        if self.kind not in FUSIONS:
            raise ValueError(f"unknown fusion {self.kind!r} (use {', '.join(FUSIONS)})")
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalise!r} (use {', '.join(NORMALISATIONS)})")
        if self.k <= 0 or self.context < 0:
            raise ValueError("fusion k must be > 0 and context >= 0")


#: the fusion ``hybrid`` uses (``bench/locomo_hybrid_loo.py`` compares; see docs/retrieval.md)
DEFAULT_FUSION = Fusion()


def parse_fusion(spec: str | Fusion | None) -> Fusion:
    """A :class:`Fusion` from ``kind[,field=value...]``, e.g. ``rrf,k=20`` or
    ``weighted,normalise=median,context=0.5`` (None: :data:`DEFAULT_FUSION`)."""
    if spec is None:
        return DEFAULT_FUSION
    if isinstance(spec, Fusion):
        return spec
    kind, *rest = [part.strip() for part in spec.split(",")]
    known = {f.name for f in fields(Fusion)}
    values: dict[str, Any] = {"kind": kind}
    for item in rest:
        name, eq, value = item.partition("=")
        if not eq or name not in known or name == "kind":
            raise ValueError(f"bad fusion setting {item!r} (use normalise=, k= or context=)")
        values[name] = value if name == "normalise" else float(value)
    return replace(DEFAULT_FUSION, **values)


def needs_semantic(strategy: str) -> bool:
    """Whether the strategy uses embeddings at all."""
    return strategy in SEMANTIC_STRATEGIES


def resolve(strategy: str, have_vector: bool) -> str:
    """The strategy that runs: a semantic one without the query's vector runs as
    ``keyword_only``; ``auto`` with it runs as ``hybrid`` (it won leave-one-out on the
    LoCoMo dev split with all-MiniLM on llama-server: docs/retrieval.md)."""
    if needs_semantic(strategy) and not have_vector:
        return "keyword_only"
    return "hybrid" if strategy == "auto" else strategy


def semantic_score(cos: float) -> float:
    """Cosine similarity as a score in [0, 1]: negative (opposite) counts as unrelated."""
    return max(0.0, min(1.0, float(cos)))


def ident(entry: RetrievedEntry) -> tuple[str, Any]:
    """One message: session and index (or the entry's hash when it has no index)."""
    return (entry.session_id, entry.message_index if entry.message_index is not None else entry.key_hash)


def _weights(keyword_weight: float, semantic_weight: float) -> tuple[float, float]:
    wk, ws = max(0.0, keyword_weight), max(0.0, semantic_weight)
    total = wk + ws
    if total <= 0:
        return 0.5, 0.5
    return wk / total, ws / total


def _normalised(items: Sequence[RetrievedEntry]) -> dict[tuple[str, Any], float]:
    """Scores divided by the list's best score (the best becomes 1, zero stays zero)."""
    best = max((e.score for e in items), default=0.0)
    if best <= 0:
        return {ident(e): 0.0 for e in items}
    return {ident(e): e.score / best for e in items}


def _above_median(values: dict[tuple[str, Any], float]) -> dict[tuple[str, Any], float]:
    """``max(0, v - median) / (best - median)``: how far each value stands above the typical one."""
    if not values:
        return {}
    mid = statistics.median(values.values())
    top = max(values.values())
    if top <= mid:
        return {i: 0.0 for i in values}
    return {i: max(0.0, v - mid) / (top - mid) for i, v in values.items()}


def semantic_context(
    cosines: dict[int, float], window: int = 3, weight: float = 0.25, decay: float = 0.8
) -> dict[int, float]:
    """``s(i) = c(i) + weight * sum_d decay**(d-1) * (c(i-d) + c(i+d))``, ``c = max(0, cos)``.

    The keyword side already scores turns with their neighbours (search_sqlite); this
    gives the semantic side the same view of a conversation, with a smaller weight.
    """
    c = {i: semantic_score(v) for i, v in cosines.items()}
    out: dict[int, float] = {}
    for i, v in c.items():
        total = 0.0
        for d in range(1, window + 1):
            total += decay ** (d - 1) * (c.get(i - d, 0.0) + c.get(i + d, 0.0))
        out[i] = v + weight * total
    return out


def fuse_weighted(
    keyword: Sequence[RetrievedEntry],
    semantic: Sequence[RetrievedEntry],
    keyword_weight: float = 0.5,
    semantic_weight: float = 0.5,
    semantic_lookup: dict[tuple[str, Any], float] | None = None,
    normalise: str = "max",
) -> list[RetrievedEntry]:
    """Normalised weighted score fusion.

    Each side's scores are divided by that side's best score for this query (max
    normalisation: both sides then run 0..1 with the best hit at 1, whatever the raw
    scales), and ``fused = wk * kw + ws * sem`` with ``wk + ws = 1``; a message missing
    from one list has 0 on that side. Ordering uses ``fused``; the entry's ``score`` is
    ``fused * (wk * best_kw + ws * best_sem)``, so a query whose best matches are weak
    keeps low similarities (thresholds stay meaningful), still in [0, 1].
    ``normalise="median"`` (with ``semantic_lookup``): the semantic side is
    ``max(0, v - median) / (best - median)`` over the session's messages instead.
    Ties: keyword rank, then message.
    """
    wk, ws = _weights(keyword_weight, semantic_weight)
    kn, sn = _normalised(keyword), _normalised(semantic)
    if semantic_lookup:  # semantic values of every message, not only the listed ones
        if normalise == "median":
            sn = _above_median(semantic_lookup)
        else:
            top = max(semantic_lookup.values())
            sn = {i: (v / top if top > 0 else 0.0) for i, v in semantic_lookup.items()}
    best_k = max((e.score for e in keyword), default=0.0)
    best_s = max((e.score for e in semantic), default=0.0)
    scale = wk * best_k + ws * best_s
    by_id: dict[tuple[str, Any], RetrievedEntry] = {}
    kw_rank: dict[tuple[str, Any], int] = {}
    for rank, e in enumerate(keyword):
        by_id.setdefault(ident(e), e)
        kw_rank.setdefault(ident(e), rank)
    for e in semantic:
        i = ident(e)
        if i not in by_id:
            by_id[i] = e
        elif not by_id[i].matched_keywords and e.matched_keywords:
            by_id[i] = replace(by_id[i], matched_keywords=e.matched_keywords)
    fused = {i: wk * kn.get(i, 0.0) + ws * sn.get(i, 0.0) for i in by_id}
    order = sorted(by_id, key=lambda i: (-fused[i], kw_rank.get(i, len(kw_rank)), str(i)))
    return [replace(by_id[i], score=max(0.0, min(1.0, fused[i] * scale))) for i in order if fused[i] > 0]


def fuse_rrf(
    keyword: Sequence[RetrievedEntry],
    semantic: Sequence[RetrievedEntry],
    keyword_weight: float = 0.5,
    semantic_weight: float = 0.5,
    k: float = RRF_K,
) -> list[RetrievedEntry]:
    """Weighted reciprocal rank fusion: ``sum_side w / (k + rank)`` (rank from 1).

    Divided by its maximum ``sum w / (k + 1)`` (first in both lists), so in [0, 1].
    """
    wk, ws = _weights(keyword_weight, semantic_weight)
    top = wk / (k + 1.0) + ws / (k + 1.0)
    by_id: dict[tuple[str, Any], RetrievedEntry] = {}
    fused: dict[tuple[str, Any], float] = {}
    kw_rank: dict[tuple[str, Any], int] = {}
    for weight, items in ((wk, keyword), (ws, semantic)):
        seen: set[tuple[str, Any]] = set()
        for rank, e in enumerate(items, start=1):
            i = ident(e)
            if i in seen:
                continue
            seen.add(i)
            by_id.setdefault(i, e)
            if items is keyword:
                kw_rank[i] = rank
            fused[i] = fused.get(i, 0.0) + weight / (k + rank)
    order = sorted(by_id, key=lambda i: (-fused[i], kw_rank.get(i, len(kw_rank) + 1), str(i)))
    return [replace(by_id[i], score=max(0.0, min(1.0, fused[i] / top))) for i in order if fused[i] > 0]


def answers_first(fused: Sequence[RetrievedEntry], keyword: Sequence[RetrievedEntry]) -> list[RetrievedEntry]:
    """Keep the keyword ranking's "answers, not echoes" through a fusion.

    A keyword result that asks the query's words and, one or two messages later, its
    answer that the keyword ranking placed at least as high (the next message, or the
    one after when the next answers nothing): when the fused order puts the question
    first (the semantic side likes a question that repeats the query), the answer moves
    just above it. Everything else keeps its fused place and score.
    """
    kw = {ident(e): e for e in keyword}
    out = list(fused)
    for q in keyword:
        if q.message_index is None or not ts.asks_about(q.text, [ts.stem(k) for k in q.matched_keywords]):
            continue
        for step in (1, 2):
            nxt = kw.get((q.session_id, q.message_index + step))
            if nxt is None or (step == 1 and ts.is_non_answer(nxt.text)):
                continue  # not listed, or answers nothing: the asker may answer it next
            if nxt.score >= q.score:
                _lift(out, ident(nxt), ident(q))
            break
    return out


def _lift(items: list[RetrievedEntry], answer: tuple[str, Any], question: tuple[str, Any]) -> None:
    """Move ``answer`` just above ``question`` in ``items`` (best first) when it is below."""
    pos = {ident(e): n for n, e in enumerate(items)}
    if answer not in pos or question not in pos or pos[answer] < pos[question]:
        return
    a, q = pos[answer], pos[question]
    entry = items.pop(a)
    score = max(entry.score, min(1.0, math.nextafter(items[q].score, math.inf)))
    items.insert(q, replace(entry, score=score))


def combine(
    strategy: str,
    keyword: Sequence[RetrievedEntry],
    semantic: Sequence[RetrievedEntry] | None,
    need: int,
    keep: Callable[[RetrievedEntry], bool] | None = None,
    keyword_weight: float = 0.5,
    semantic_weight: float = 0.5,
    fusion: str | Fusion | None = None,
    semantic_lookup: dict[tuple[str, Any], float] | None = None,
) -> list[RetrievedEntry]:
    """One tier's results for ``strategy`` (``semantic`` None: no embeddings, keyword only).

    ``keep`` filters results (thresholds, excluded turns) before a cascade decides
    whether the first list found enough; ``need`` is how many it should find.
    ``fusion``: the hybrid's :class:`Fusion` or its spec (:func:`parse_fusion`).
    """
    ok = keep or (lambda _e: True)
    kw = [e for e in keyword if ok(e)] if strategy != "hybrid" else list(keyword)
    if semantic is None or strategy == "keyword_only":
        return kw if strategy != "hybrid" else [e for e in kw if ok(e)]
    sem = [e for e in semantic if ok(e)] if strategy != "hybrid" else list(semantic)
    if strategy == "semantic_only":
        return sem
    if strategy in ("keyword_then_semantic", "semantic_then_keyword"):
        first, second = (kw, sem) if strategy == "keyword_then_semantic" else (sem, kw)
        if len(first) >= need:
            return first
        have = {ident(e) for e in first}
        fill = [replace(e, stage=1) for e in second if ident(e) not in have]
        return first + fill[: max(0, need - len(first))]
    if strategy == "hybrid":
        how = parse_fusion(fusion)
        if how.kind == "rrf":
            fused = fuse_rrf(kw, sem, keyword_weight, semantic_weight, how.k)
        else:
            fused = fuse_weighted(kw, sem, keyword_weight, semantic_weight, semantic_lookup, how.normalise)
        return [e for e in answers_first(fused, kw) if ok(e)]
    raise ValueError(f"unknown retrieval strategy {strategy!r}")


def semantic_entries(
    entries: Sequence[Any],
    sims: dict[int, tuple[int, float]] | None,
    tier: int,
    session_key: str,
    terms: Sequence[str],
    snapshot_ids: Sequence[int | None] | None = None,
) -> list[RetrievedEntry] | None:
    """Cache/snapshot entries (``KVEntry``) ranked by their message's cosine, best first.

    ``sims``: message index -> (message id, cosine), None without embeddings (then None).
    Entries without a message index, or whose message has no vector, are left out.
    """
    if sims is None:
        return None
    from kvcache_cli.retrieval.textsearch import matched_keywords

    out: list[tuple[float, int, RetrievedEntry]] = []
    for pos, entry in enumerate(entries):
        idx = entry.message_index
        if idx is None or idx not in sims:
            continue
        score = semantic_score(sims[idx][1])
        text = entry.key_data or ""
        role = entry.extra.get("role")
        out.append(
            (
                score,
                pos,
                RetrievedEntry(
                    tier=tier,
                    score=score,
                    matched_keywords=matched_keywords(list(terms), text),
                    text=text,
                    session_id=session_key,
                    message_index=idx,
                    key_hash=entry.key_hash,
                    role=str(role) if role else None,
                    snapshot_id=snapshot_ids[pos] if snapshot_ids else None,
                ),
            )
        )
    out.sort(key=lambda x: (-x[0], x[1]))
    return [e for _, _, e in out]
