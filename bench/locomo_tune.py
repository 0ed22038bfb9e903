"""Leave-one-file-out tuning of the keyword ranking on LoCoMo (not a test).

Usage: python bench/locomo_tune.py [--grid JSON] FILES... -- imports the files once
(``importer``), then for each setting of the grid (``search_sqlite.search_messages``
options, e.g. ``'{"date_boost": [0, 0.5, 1]}'``) computes per-file and per-category
recall@k; a setting is chosen on four files and evaluated on the fifth (leave one out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locomo import convert  # noqa: E402

from kvcache_cli.services.importing import import_file  # noqa: E402
from kvcache_cli.store import search_sqlite  # noqa: E402
from kvcache_cli.store.backend import open_store  # noqa: E402

KS = (5, 10)
DEFAULT_GRID: dict[str, list[Any]] = {
    "speaker_boost": [0.5, 1.0, 1.5, 2.0],
    "context_weight": [0.4, 0.5, 0.6],
    "number_boost": [0.0, 0.5],
}


def load(files: list[Path]) -> tuple[sqlite3.Connection, list[dict[str, Any]], dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp())
    db = tmp / "kv.db"
    store = open_store(str(db))
    dias: dict[str, dict[int, str]] = {}
    questions: list[dict[str, Any]] = []
    for f in files:
        key, conv_file, dia, qs = convert(f, tmp)
        import_file(store, conv_file)
        dias[key] = dia
        questions += qs
    store.close()
    conn = sqlite3.connect(db)
    sids = dict(conn.execute("SELECT key, id FROM sessions").fetchall())
    return conn, questions, {"dias": dias, "sids": sids}


def per_file(
    conn: sqlite3.Connection, qs: list[dict[str, Any]], meta: dict[str, Any], **opts: Any
) -> dict[str, list[float]]:
    """Recall sums per file and per category (keys 'cat1'..), the last item the count."""
    out: dict[str, list[float]] = {}
    for q in qs:
        sid = meta["sids"][q["session"]]
        hits = search_sqlite.search_messages(conn, q["q"], sid, 20, **opts)
        got = [meta["dias"][q["session"]].get(h.message_index, "") for h in hits]
        ev = set(q["ev"])
        for key in (q["session"], f"cat{q['cat']}"):
            row = out.setdefault(key, [0.0] * (len(KS) + 1))
            for j, k in enumerate(KS):
                row[j] += len(ev & set(got[:k])) / len(ev)
            row[-1] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--grid", default=None, help="JSON object: option -> list of values")
    ap.add_argument("files", nargs="+", type=Path)
    args = ap.parse_args()
    conn, qs, meta = load(args.files)
    grid: dict[str, list[Any]] = json.loads(args.grid) if args.grid else DEFAULT_GRID
    names = list(grid)
    keys = sorted(meta["dias"])
    results = {}
    for values in itertools.product(*grid.values()):
        opts = dict(zip(names, values, strict=True))
        results[values] = per_file(conn, qs, meta, **opts)
        rows = [results[values][k] for k in keys]
        allq = [sum(r[j] for r in rows) / sum(r[-1] for r in rows) for j in range(len(KS))]
        per = " ".join(f"{k[-2:]}:{results[values][k][1] / results[values][k][-1]:.3f}" for k in keys)
        cats = " ".join(
            f"{c}:{r[1] / r[-1]:.3f}" for c, r in sorted(results[values].items()) if c.startswith("cat")
        )
        print(opts, "R@5 {:.3f} R@10 {:.3f}".format(*allq), per, "|", cats, flush=True)
    # leave one file out: pick the setting best on the other files (R@10), score the held-out one
    held = []
    for out in keys:

        def train(v: Any, out: str = out) -> float:
            rows = [r for k, r in results[v].items() if k != out and k in keys]
            return sum(r[1] for r in rows) / sum(r[-1] for r in rows)

        best = max(results, key=lambda v: (train(v), [-x for x in v]))
        r = results[best][out]
        held.append((r[0], r[1], r[-1]))
        print(f"held-out {out}: chose {best}, R@5 {r[0] / r[-1]:.3f} R@10 {r[1] / r[-1]:.3f}")
    n = sum(h[2] for h in held)
    print(
        f"leave-one-out (question-weighted): R@5 {sum(h[0] for h in held) / n:.3f} "
        f"R@10 {sum(h[1] for h in held) / n:.3f}"
    )


if __name__ == "__main__":
    main()
