"""Prototype, round 5 of the hybrid: a keyword weight read off each query, per-query semantic scales.

Usage::

    python bench/locomo_hybrid_round5.py --store STORE.db --vectors QUERIES.json \\
        --grid NAME [--json-out OUT.json] [--rows ROWS.jsonl] FILES...

``STORE`` is the store ``bench/locomo_hybrid_loo.py`` builds (``kvcache process`` of the
files with ``[llm] embeddings_url`` set), ``QUERIES.json`` its query-vector cache. The
shipped hybrid weighs the keyword side 0.7 for every query; here the weight ``w(q)``
(semantic ``1 - w(q)``) depends on the query:

``gap``   the vocabulary gap: ``g(q)`` = share of the query's IDF mass (distinct stems of
          ``query_terms``, BM25 IDF over the session's messages) held by stems that occur in
          *no* message of the session (the keyword side cannot find them at all);
          ``w(q) = clamp(w0 - a * g(q), 0.3, 0.9)``;
``conf``  the keyword side's confidence: ``c(q)`` = the history tier's best keyword hit's
          similarity (in [0, 1], comparable across queries); ``w(q) = lo + (hi - lo) * c(q)``.

and, apart from the weight, the semantic side's cosines can be rescaled per query over the
session's messages before context and fusion: ``minmax`` ``(c - min) / (max - min)``, or
``z`` ``1 / (1 + exp(-(c - mean) / sd))``.

Grids (the shipped hybrid first: keyword 0.7, weighted fusion, semantic context 0.25):

``gap``   ``w0`` {0.7, 0.8} x ``a`` {0, 0.3, 0.5};
``conf``  ``(lo, hi)`` in {(0.5, 0.8), (0.6, 0.8), (0.5, 0.9), (0.6, 0.9)};
``norm``  ``minmax``, ``z`` x keyword weight {0.6, 0.7, 0.8};
``combo`` ``--combo`` settings (``rule;scale`` pairs) chosen after the three above.

A setting is ``(scale, weight, rule)`` as in ``bench/locomo_hybrid_round4.py`` (whose
report and verdict it reuses): ``scale`` ``M`` (cosines as computed), ``minmax`` or ``z``;
``weight`` the fixed keyword weight, ``w0`` or ``lo``; ``rule`` ``weighted,context=0.25``
(fixed weight), ``gap,a=A`` or ``conf,hi=H``. Every question is asked through the retrieve
service (``KVCacheManager.retrieve``, as ``kvcache retrieve SESSION QUESTION -n 20``) with
only the hybrid's weights (per question) and the semantic side's cosines (rescaled)
changed, in memory (``bench/locomo_window_loo.Prototype``: nothing stored); the cosines
are the service's own. Per-setting rows are kept in ``--rows`` and reused (delete the file
after changing the code or the store). The fifth round's runs (``docs/retrieval.md``)::

    python bench/locomo_hybrid_round5.py --store STORE --vectors Q.json --rows R.jsonl --grid gap FILES...
    ... --grid conf; ... --grid norm
    ... --grid combo --combo 'minmax,0.7,gap:a=0.3;minmax,0.5,conf:hi=0.8;minmax,0.6,conf:hi=0.8'
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locomo import KS  # noqa: E402
from locomo_cli import load_all_questions  # noqa: E402
from locomo_hybrid_loo import grid_rows, question_recall  # noqa: E402
from locomo_hybrid_round4 import BASELINE, Setting, label, report  # noqa: E402
from locomo_window_loo import Prototype, prototype_arguments, session_rows  # noqa: E402

from kvcache_cli.retrieval import textsearch as ts  # noqa: E402
from kvcache_cli.services import retrieve as retrieve_service  # noqa: E402

SERVICE_COSINES = retrieve_service.semantic_scores  # before Prototype swaps it
FIXED = BASELINE[2]  # "weighted,context=0.25": the shipped fusion, fixed weight


def rescale(kind: str, cosines: list[float]) -> list[float]:
    """The session's cosines for one query, rescaled per query (``M``: as they are)."""
    if kind == "M" or not cosines:
        return cosines
    if kind == "minmax":
        lo, hi = min(cosines), max(cosines)
        return [(c - lo) / (hi - lo) if hi > lo else 0.0 for c in cosines]
    if kind == "z":
        mean, sd = statistics.fmean(cosines), statistics.pstdev(cosines)
        return [1.0 / (1.0 + math.exp(-(c - mean) / sd)) if sd > 0 else 0.5 for c in cosines]
    raise ValueError(f"unknown scale {kind!r}")


def vocabulary_gap(query: str, session_stems: list[set[str]]) -> float:
    """Share of the query's IDF mass (session BM25 IDF) in stems no message of the session holds."""
    stems = list(dict.fromkeys(ts.stem_all(ts.query_terms(query))))
    if not stems:
        return 0.0
    df = Counter(s for held in session_stems for s in held.intersection(stems))
    idf = {s: ts.bm25_idf(len(session_stems), df[s]) for s in stems}
    total = sum(idf.values())
    return sum(v for s, v in idf.items() if df[s] == 0) / total if total > 0 else 0.0


def keyword_weight(setting: Setting, gap: float, confidence: float) -> float:
    """The hybrid's keyword weight for one query under ``setting``."""
    _, weight, rule = setting
    kind, _, arg = rule.partition(",")
    if kind == "gap":
        return min(0.9, max(0.3, weight - float(arg.removeprefix("a=")) * gap))
    if kind == "conf":
        return weight + (float(arg.removeprefix("hi=")) - weight) * confidence
    return weight


class Round5(Prototype):
    """The retrieve service with per-query keyword weights and rescaled semantic cosines."""

    def __init__(self, store: Path, vectors: Path) -> None:
        super().__init__(store, vectors, sem=None)  # type: ignore[arg-type]
        self.raw: dict[tuple[str, int], dict[int, tuple[int, float]]] = {}

    def _semantic_scores(self, core: Any, session_id: int, semantic: tuple[list[float], str]) -> Any:
        key = (self.query, session_id)
        if key not in self.raw:
            self.raw[key] = SERVICE_COSINES(core, session_id, semantic)
        sims = self.raw[key]
        idxs = list(sims)
        scaled = rescale(self.variant, [sims[i][1] for i in idxs])
        return {i: (sims[i][0], c) for i, c in zip(idxs, scaled, strict=True)}

    def features(self, questions: list[dict[str, Any]], store: Path) -> list[tuple[float, float]]:
        """Per question: (vocabulary gap g, keyword confidence c)."""
        stems = {
            key: [set(ts.stem_all(ts.tokenize(content))) for _, _, content, _ in msgs]
            for key, msgs in session_rows(store).items()
        }
        cfg = self.manager.config.cache
        cfg.retrieval_strategy = "keyword_only"
        out = []
        for q in questions:
            res = self.manager.retrieve(q["session"], q["q"], (3,), max(KS))
            top = max((e.score for e in res.entries), default=0.0)
            out.append((vocabulary_gap(q["q"], stems[q["session"]]), top))
        return out

    def rows(
        self,
        setting: Setting,
        questions: list[dict[str, Any]],
        feats: list[tuple[float, float]],
        dia_of: dict[str, Any],
    ) -> list[list[float]]:
        """Per question: recall@k (k in KS) of the retrieve service under ``setting``."""
        cfg = self.manager.config.cache
        cfg.retrieval_strategy = "hybrid"
        self.manager.fusion = FIXED
        self.variant = setting[0]
        out = []
        for q, (gap, conf) in zip(questions, feats, strict=True):
            w = keyword_weight(setting, gap, conf)
            cfg.hybrid.keyword_weight, cfg.hybrid.semantic_weight = w, 1.0 - w
            self.query = q["q"]
            out.append(question_recall(self.manager, q, dia_of, "hybrid", setting))
        return out


WEIGHTS = (0.6, 0.7, 0.8)
GRIDS: dict[str, list[Setting]] = {
    "gap": [("M", w0, f"gap,a={a}") for w0 in (0.7, 0.8) for a in (0.0, 0.3, 0.5) if (w0, a) != (0.7, 0.0)],
    "conf": [("M", lo, f"conf,hi={hi}") for lo, hi in ((0.5, 0.8), (0.6, 0.8), (0.5, 0.9), (0.6, 0.9))],
    "norm": [(s, w, FIXED) for s in ("minmax", "z") for w in WEIGHTS],
}


def parse_combo(spec: str) -> list[Setting]:
    """``scale,weight,rule;...`` (rule with ``:`` for ``,``), e.g. ``z,0.8,gap:a=0.3``."""
    out: list[Setting] = []
    for item in filter(None, spec.split(";")):
        scale, weight, rule = item.split(",")
        out.append((scale, float(weight), rule.replace(":", ",")))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = prototype_arguments((__doc__ or "").splitlines()[0])
    ap.add_argument("--grid", required=True, choices=[*sorted(GRIDS), "combo"])
    ap.add_argument("--combo", default="", help="settings of the combo grid (see parse_combo)")
    ap.add_argument("--rows", type=Path, default=None, help="per-setting rows (JSON lines, reused)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    dia_of, questions = load_all_questions(args.files)
    convs = sorted(dia_of)
    grid = [BASELINE] + (parse_combo(args.combo) if args.grid == "combo" else GRIDS[args.grid])
    proto: Round5 | None = None
    feats: list[tuple[float, float]] = []

    def compute(setting: Setting) -> list[list[float]]:
        nonlocal proto, feats
        if proto is None:
            proto = Round5(args.store, args.vectors)
            feats = proto.features(questions, args.store)
            gaps, confs = [f[0] for f in feats], [f[1] for f in feats]
            print(
                f"features: gap > 0 for {sum(g > 0 for g in gaps)} of {len(gaps)} questions "
                f"(mean {statistics.fmean(gaps):.3f}); confidence mean {statistics.fmean(confs):.3f}, "
                f"median {statistics.median(confs):.3f}",
                file=sys.stderr,
            )
        return proto.rows(setting, questions, feats, dia_of)

    per = grid_rows(grid, compute, args.rows, label)
    report(args.grid, grid, per, questions, convs, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
