"""Leave-one-conversation-out choice of keyword-ranking settings on LoCoMo (not a test).

Usage::

    python bench/locomo_loo.py FILES...                                   # defaults only
    python bench/locomo_loo.py --grid '{"answer_weight": [0, 0.5, 1]}' FILES...
    python bench/locomo_loo.py --grid '{...}' --json FILES...

The files are converted as ``bench/locomo_to_conversations.py`` does (what a user of
``kvcache`` would import: ``speaker: text``, speaker names, session dates) and stored
with ``kvcache import``'s code; each question is ranked by the store's tier-3 search
(``search_sqlite.search_messages``, the ranking of ``kvcache retrieve``; settings are
``ranking.RankParams`` fields). For every setting of the grid, recall@1/5/10/20 is
computed per conversation; then for each conversation the setting with the best
*criterion* on the other conversations (pooled over their questions) is chosen and
scored on the held-out one. The criterion is the mean of R@1, R@5 and R@10 (the three
targets); ties go to the earlier setting in grid order (list the current default first).
Reported: every setting's pooled and per-conversation figures, each fold's choice and
held-out figures, their question-weighted mean and the spread over folds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locomo import CATEGORIES  # noqa: E402
from locomo_cli import load_questions  # noqa: E402
from locomo_to_conversations import convert_file  # noqa: E402

from kvcache_cli.services.importing import import_file  # noqa: E402
from kvcache_cli.store import search_sqlite  # noqa: E402
from kvcache_cli.store.backend import open_store  # noqa: E402

KS = (1, 5, 10, 20)


def load(files: list[Path]) -> tuple[sqlite3.Connection, list[dict[str, Any]], dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="locomo-loo-"))
    db = tmp / "kv.db"
    store = open_store(str(db))
    dias: dict[str, dict[int, str]] = {}
    questions: list[dict[str, Any]] = []
    for f in files:
        target, _, _ = convert_file(f, tmp / "conv")
        import_file(store, target)
        dias[f.stem], qs = load_questions(f)
        questions += qs
    store.close()
    conn = sqlite3.connect(db)
    sids = dict(conn.execute("SELECT key, id FROM sessions").fetchall())
    return conn, questions, {"dias": dias, "sids": sids}


def sums_for(
    conn: sqlite3.Connection, qs: list[dict[str, Any]], meta: dict[str, Any], opts: dict[str, Any]
) -> dict[str, list[float]]:
    """Recall sums per conversation and per category (``catN``); the last item is the count."""
    out: dict[str, list[float]] = {}
    for q in qs:
        sid = meta["sids"][q["session"]]
        hits = search_sqlite.search_messages(conn, q["q"], sid, max(KS), **opts)
        got = [meta["dias"][q["session"]].get(h.message_index, "") for h in hits]
        ev = set(q["ev"])
        for key in (q["session"], f"cat{q['cat']}"):
            row = out.setdefault(key, [0.0] * (len(KS) + 1))
            for j, k in enumerate(KS):
                row[j] += len(ev & set(got[:k])) / len(ev)
            row[-1] += 1
    return out


def pooled(rows: list[list[float]]) -> list[float]:
    n = sum(r[-1] for r in rows)
    return [sum(r[j] for r in rows) / n for j in range(len(KS))]


def criterion(r: list[float]) -> float:
    return (r[0] + r[1] + r[2]) / 3


def fmt(r: list[float]) -> str:
    return " ".join(f"R@{k} {v:.3f}" for k, v in zip(KS, r, strict=False))


def spread(folds: list[list[float]]) -> str:
    """The spread of the held-out figures over the folds: range and sd per R@k."""
    return "spread over folds: " + "  ".join(
        f"R@{k} {min(f[j] for f in folds):.3f}-{max(f[j] for f in folds):.3f} "
        f"sd {statistics.pstdev(f[j] for f in folds):.3f}"
        for j, k in enumerate(KS)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--grid", default="{}", help="JSON object: RankParams field -> list of values")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    conn, qs, meta = load(args.files)
    grid: dict[str, list[Any]] = json.loads(args.grid)
    names = list(grid)
    convs = sorted(meta["dias"])
    results: dict[tuple[Any, ...], dict[str, list[float]]] = {}
    settings = list(itertools.product(*grid.values())) or [()]
    for values in settings:
        opts = dict(zip(names, values, strict=True))
        started = time.perf_counter()
        results[values] = sums_for(conn, qs, meta, opts)
        ms = (time.perf_counter() - started) * 1000 / len(qs)
        res = results[values]
        per = " ".join(f"{c[-2:]}:{res[c][2] / res[c][-1]:.3f}" for c in convs)
        cats = " ".join(
            f"{CATEGORIES[int(c[3:])][:6]}:{res[c][2] / res[c][-1]:.3f}"
            for c in sorted(res)
            if c.startswith("cat")
        )
        print(
            f"{opts} {fmt(pooled([res[c] for c in convs]))} | R@10 {per} | {cats} | {ms:.1f} ms/q", flush=True
        )
    held: list[tuple[str, tuple[Any, ...], list[float]]] = []
    for out in convs:
        best = max(
            settings,
            key=lambda v: (criterion(pooled([results[v][c] for c in convs if c != out])), -settings.index(v)),
        )
        row = results[best][out]
        held.append((out, best, row))
        print(f"fold {out}: chose {dict(zip(names, best, strict=True))}, held-out {fmt(pooled([row]))}")
    total = pooled([h[2] for h in held])
    print(f"leave-one-out (question-weighted): {fmt(total)}")
    folds = [pooled([h[2]]) for h in held]
    print(spread(folds))
    if args.json:
        print(
            json.dumps(
                {
                    "grid": grid,
                    "folds": [
                        {"held_out": o, "chose": dict(zip(names, b, strict=True)), "recall": pooled([r])}
                        for o, b, r in held
                    ],
                    "loo": total,
                }
            )
        )


if __name__ == "__main__":
    main()
