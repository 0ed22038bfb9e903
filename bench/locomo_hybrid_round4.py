"""Prototype, round 4 of the hybrid: what the message vector is made of, RRF, semantic PRF.

Usage::

    python bench/locomo_hybrid_round4.py --store STORE.db --vectors QUERIES.json \\
        --texts TEXTS.json [--embed URL --kinds D,S,S0] [--grid NAME] [--json-out OUT.json] FILES...

``STORE`` is the store ``bench/locomo_hybrid_loo.py`` builds (``kvcache process`` of the
files with ``[llm] embeddings_url`` set), ``QUERIES.json`` its query-vector cache;
``TEXTS.json`` maps a text to its vector (``--embed URL`` fills in what is missing, one
batch of 16 at a time). Vector kinds of a message:

``M``  the message as stored (``Caroline: ...``; identical to the stored vectors);
``D``  the session date after the speaker: ``Caroline (8 May 2023): ...``;
``S``  one vector per sentence (``Caroline: <sentence>``; a piece under 8 words is joined
       to the next), the message's cosine the largest of its sentences' (mean pooling
       dilutes a long turn's one matching sentence); a message of one sentence keeps its
       ``M`` vector; ``S0`` the same with every sentence on its own (no joining);
       ``max:M,S`` / ``max:M,D`` take the larger of the two kinds' cosines.

Grids (the shipped hybrid first: ``M``, weighted fusion, keyword 0.7, semantic context 0.25;
each crossed with keyword weights 0.6 / 0.7 / 0.8):

``date``      ``D``, ``max:M,D``;
``sentence``  ``S``, ``max:M,S``; ``sentence0`` the same with ``S0``;
``rrf``       reciprocal rank fusion, k = 60 (``strategies.fuse_rrf``), message vectors;
``rrf-t3``    both fusions with the history tier alone (``retrieve`` tiers 3): RRF without the
              merge of tiers, whose per-tier rank scores are not comparable (a diagnostic);
``rocchio``   semantic pseudo-relevance feedback: the query vector becomes
              ``unit(q) + b * mean(unit vectors of the top-3 keyword_only hits)``
              (b = 0.3, 0.5), message vectors; the keyword side is unchanged.

Every question is asked through the retrieve service (``KVCacheManager.retrieve``, as
``kvcache retrieve SESSION QUESTION -n 20``) with only the semantic side's cosines swapped
(``bench/locomo_window_loo.Prototype``, in memory: nothing stored). Each held-out
conversation gets the setting with the best mean of R@1/5/10 on the other four (ties to the
earlier setting); the leave-one-out figures are compared with the shipped hybrid, paired
per question, with standard errors and the per-fold held-out change, and the verdict of the
rule written before the round (kept only if the LOO mean of R@1/5/10 rises, the paired R@10
difference is positive and held-out R@10 is lower on at most one fold). Each setting's
per-question rows are kept in ``round4-rows.jsonl`` beside ``TEXTS.json`` and reused by
later runs: delete it after changing the code or the store.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locomo import KS  # noqa: E402
from locomo_cli import load_all_questions  # noqa: E402
from locomo_hybrid_loo import (  # noqa: E402
    category_means,
    conversation_rows,
    grid_rows,
    leave_one_out,
    mean_rows,
    paired_differences,
    per_conversation_r10,
    question_recall,
)
from locomo_loo import criterion, fmt, spread  # noqa: E402
from locomo_window_loo import Prototype, dot, prototype_arguments, session_rows, unit  # noqa: E402

Rows = dict[str, list[tuple[int, int, str, str]]]  # session key -> [(id, index, content, timestamp)]
Setting = tuple[str, float, str]  # semantic variant, keyword weight, fusion spec

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def speaker_and_body(content: str) -> tuple[str, str]:
    """``Caroline: text`` -> (``Caroline``, ``text``); no prefix -> ("", content)."""
    name, sep, body = content.partition(": ")
    return (name, body) if sep and 0 < len(name) <= 40 else ("", content)


MIN_WORDS = 8
KINDS = ("M", "D", "S", "S0")


def sentences(body: str, min_words: int = MIN_WORDS) -> list[str]:
    """A message body split after ``.``, ``!`` or ``?`` followed by space; a piece of fewer
    than ``min_words`` words ("Wow!", "Thanks!") is joined to the next one (the last to the
    one before), so every vector describes a statement rather than an exclamation."""
    out: list[str] = []
    carry = ""
    for piece in (p.strip() for p in SENTENCE_END.split(body)):
        if not piece:
            continue
        piece = f"{carry} {piece}" if carry else piece
        if len(piece.split()) < min_words:
            carry = piece
            continue
        out.append(piece)
        carry = ""
    if carry:
        if out:
            out[-1] = f"{out[-1]} {carry}"
        else:
            out.append(carry)
    return out or [body]


def texts_of(kind: str, content: str, timestamp: str) -> list[str]:
    """The text(s) embedded for one message under ``kind`` (``M``, ``D`` or ``S``)."""
    name, body = speaker_and_body(content)
    if kind == "M":
        return [content]
    if kind == "D":
        d = datetime.fromisoformat(timestamp[:19])
        date = f"{d.day} {d.strftime('%B %Y')}"
        return [f"{name} ({date}): {body}" if name else f"({date}) {body}"]
    if kind in ("S", "S0"):
        parts = sentences(body, MIN_WORDS if kind == "S" else 0)
        if len(parts) == 1:
            return [content]
        return [f"{name}: {s}" if name else s for s in parts]
    raise ValueError(f"unknown vector kind {kind!r}")


def embed(url: str, path: Path, rows: Rows, kinds: Sequence[str]) -> None:
    """Embed every text of ``kinds`` not yet in ``path`` (batches of 16, saved as it goes)."""
    import requests

    cache: dict[str, list[float]] = json.loads(path.read_text()) if path.exists() else {}
    todo = list(
        dict.fromkeys(
            t
            for kind in kinds
            for msgs in rows.values()
            for _, _, content, ts in msgs
            for t in texts_of(kind, content, ts)
            if t not in cache
        )
    )
    print(f"{len(todo)} texts to embed", file=sys.stderr, flush=True)
    started = time.perf_counter()

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)

    with requests.Session() as http:
        for i in range(0, len(todo), 16):
            batch = todo[i : i + 16]
            r = http.post(url + "/v1/embeddings", json={"input": batch}, timeout=600)
            r.raise_for_status()
            for t, d in zip(batch, sorted(r.json()["data"], key=lambda d: d["index"]), strict=True):
                cache[t] = d["embedding"]
            if i % 800 == 0:
                save()
                print(f"{i + len(batch)}/{len(todo)} {time.perf_counter() - started:.0f} s", file=sys.stderr)
    save()
    print(f"done: {len(todo)} texts in {time.perf_counter() - started:.0f} s", file=sys.stderr)


class Vectors:
    """Per (kind, query, session): each message's cosine with the query, memoised.

    Drop-in for ``locomo_window_loo.Semantic`` (``scores``), with the kinds above and
    ``rocchio:b`` (message vectors, the query moved towards its keyword hits' vectors).
    """

    def __init__(self, rows: Rows, path: Path) -> None:
        texts: dict[str, list[float]] = json.loads(path.read_text())
        self.rows = rows
        self.vec: dict[tuple[str, str], list[list[list[float]]]] = {}
        for kind in KINDS:
            for key, msgs in rows.items():
                got = [[texts.get(t) for t in texts_of(kind, c, ts)] for _, _, c, ts in msgs]
                if all(v is not None for per in got for v in per):
                    self.vec[(kind, key)] = [[unit(v) for v in per if v is not None] for per in got]
        self.memo: dict[tuple[str, str, str], list[float]] = {}
        self.feedback: dict[tuple[str, str], list[int]] = {}  # (query, session) -> top keyword indexes

    def ready(self, kind: str) -> bool:
        return all((kind, key) in self.vec for key in self.rows)

    def cosines(self, kind: str, query: str, qvec: list[float], key: str) -> list[float]:
        memo_key = (kind, query, key)
        if memo_key not in self.memo:
            if kind.startswith("rocchio:"):
                q = self.rocchio(float(kind.split(":")[1]), query, qvec, key)
                self.memo[memo_key] = [max(dot(q, v) for v in per) for per in self.vec[("M", key)]]
            else:
                q = unit(qvec)
                self.memo[memo_key] = [max(dot(q, v) for v in per) for per in self.vec[(kind, key)]]
        return self.memo[memo_key]

    def rocchio(self, b: float, query: str, qvec: list[float], key: str) -> list[float]:
        """``unit(q) + b * mean`` of the top keyword hits' unit message vectors, made unit."""
        hits = self.feedback[(query, key)]
        pos = {idx: j for j, (_, idx, _, _) in enumerate(self.rows[key])}
        vecs = [self.vec[("M", key)][pos[i]][0] for i in hits if i in pos]
        q = unit(qvec)
        if vecs:
            q = [x + b * sum(v[d] for v in vecs) / len(vecs) for d, x in enumerate(q)]
        return unit(q)

    def scores(self, variant: str, query: str, qvec: list[float], key: str) -> dict[int, tuple[int, float]]:
        if variant.startswith("max:"):
            cols = [self.cosines(k, query, qvec, key) for k in variant[4:].split(",")]
            cos = [max(c) for c in zip(*cols, strict=True)]
        else:
            cos = self.cosines(variant, query, qvec, key)
        return {idx: (mid, c) for (mid, idx, _, _), c in zip(self.rows[key], cos, strict=True)}


def recall_rows(
    proto: Prototype, setting: Setting, questions: list[dict[str, Any]], dia_of: dict[str, Any]
) -> list[list[float]]:
    """Per question: recall@k (k in KS) of the retrieve service under ``setting``."""
    variant, weight, fusion = setting
    manager = proto.manager
    cfg = manager.config.cache
    cfg.retrieval_strategy = "keyword_only" if variant == "keyword_only" else "hybrid"
    cfg.hybrid.keyword_weight, cfg.hybrid.semantic_weight = weight, 1.0 - weight
    fusion, _, only = fusion.partition("|")  # "...|t3": the history tier alone (no tier merge)
    manager.fusion = fusion
    tiers = (3,) if only == "t3" else (1, 2, 3)
    proto.variant = variant
    out = []
    for q in questions:
        proto.query = q["q"]
        out.append(question_recall(manager, q, dia_of, cfg.retrieval_strategy, setting, tiers))
    return out


def keyword_feedback(
    proto: Prototype, vectors: Vectors, questions: list[dict[str, Any]], top: int = 3
) -> None:
    """The ``top`` keyword_only results of every question (message indexes), for ``rocchio``."""
    cfg = proto.manager.config.cache
    cfg.retrieval_strategy = "keyword_only"
    for q in questions:
        res = proto.manager.retrieve(q["session"], q["q"], (1, 2, 3), max(KS))
        hits = [e.message_index for e in res.entries if e.message_index is not None]
        vectors.feedback[(q["q"], q["session"])] = hits[:top]


BASELINE: Setting = ("M", 0.7, "weighted,context=0.25")
WEIGHTS = (0.6, 0.7, 0.8)
GRIDS: dict[str, list[Setting]] = {
    "date": [(v, w, BASELINE[2]) for v in ("D", "max:M,D") for w in WEIGHTS],
    "sentence": [(v, w, BASELINE[2]) for v in ("S", "max:M,S") for w in WEIGHTS],
    "sentence0": [(v, w, BASELINE[2]) for v in ("S0", "max:M,S0") for w in WEIGHTS],
    "rrf": [("M", w, "rrf,k=60") for w in WEIGHTS],
    # diagnostic: both fusions over the history tier alone (every message, no merge of tiers)
    "rrf-t3": [("M", w, f) for f in ("weighted,context=0.25|t3", "rrf,k=60|t3") for w in WEIGHTS],
    "rocchio": [(f"rocchio:{b}", w, BASELINE[2]) for b in (0.3, 0.5) for w in WEIGHTS],
}


def label(s: Setting) -> str:
    return f"{s[0]} kw={s[1]} {s[2]}"


def report(
    name: str,
    grid: list[Setting],
    per: dict[Setting, list[list[float]]],
    questions: list[dict[str, Any]],
    convs: list[str],
    json_out: Path | None = None,
) -> dict[str, Any]:
    """LOO over ``grid`` (the baseline first) against the baseline: printed, returned, and
    written as JSON to ``json_out`` if given."""
    base = per[BASELINE]
    chosen, loo = leave_one_out(grid, per, questions, convs)
    out: dict[str, Any] = {"grid": name, "folds": [], "settings": {}}
    print(f"\n== {name}: pooled over {len(questions)} questions")
    for s in grid:
        r = mean_rows(per[s])
        out["settings"][label(s)] = r
        by_conv = per_conversation_r10(questions, per[s], convs)
        print(f"{label(s):<44} {fmt(r)} crit {criterion(r):.4f} | R@10 {by_conv}")
    folds, lower = [], 0
    for c in convs:
        held = mean_rows(conversation_rows(questions, per[chosen[c]], c))
        ref = mean_rows(conversation_rows(questions, base, c))
        folds.append(held)
        lower += held[2] < ref[2] - 1e-12
        diff = " ".join(f"{h - b:+.3f}" for h, b in zip(held[:3], ref[:3], strict=True))
        print(f"fold {c}: chose {label(chosen[c])}; held-out {fmt(held)}; change R@1/5/10 {diff}")
        out["folds"].append({"held_out": c, "chose": chosen[c], "recall": held, "baseline": ref})
    total, ref_all = mean_rows(loo), mean_rows(base)
    print(
        f"LOO {fmt(total)} crit {criterion(total):.4f}  baseline {fmt(ref_all)} crit {criterion(ref_all):.4f}"
    )
    print(spread(folds))
    paired = paired_differences(loo, base, f"{name} LOO minus baseline")
    keep = criterion(total) > criterion(ref_all) and paired[2]["diff"] > 0 and lower <= 1
    print(f"folds with lower R@10: {lower}; verdict: {'KEEP' if keep else 'drop'}")
    cats = category_means(questions, {"loo": loo, "baseline": base})
    out.update(loo=total, baseline=ref_all, paired=paired, lower_folds=lower, keep=keep, categories=cats)
    if json_out:
        json_out.write_text(json.dumps(out, indent=1))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = prototype_arguments((__doc__ or "").splitlines()[0])
    ap.add_argument("--texts", required=True, type=Path, help="text -> vector (JSON)")
    ap.add_argument("--embed", default=None, help="embeddings server: embed missing texts of --kinds first")
    ap.add_argument("--kinds", default="D,S")
    ap.add_argument("--grid", default=None, choices=sorted(GRIDS))
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = session_rows(args.store)
    if args.embed:
        embed(args.embed, args.texts, rows, args.kinds.split(","))
    if not args.grid:
        return 0
    vectors = Vectors(rows, args.texts)
    dia_of, questions = load_all_questions(args.files)
    convs = sorted(dia_of)
    grid = [BASELINE] + GRIDS[args.grid]
    for kind in {k for s in grid for k in s[0].removeprefix("max:").split(",") if k in KINDS}:
        if not vectors.ready(kind):
            raise SystemExit(f"vectors of kind {kind} are not all embedded yet (--embed)")
    proto = Prototype(args.store, args.vectors, vectors)  # type: ignore[arg-type]
    if args.grid == "rocchio":
        keyword_feedback(proto, vectors, questions)
    rows_file = args.texts.with_name("round4-rows.jsonl")  # per-setting rows of earlier runs (same code)
    per = grid_rows(grid, lambda setting: recall_rows(proto, setting, questions, dia_of), rows_file, label)
    report(args.grid, grid, per, questions, convs, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
