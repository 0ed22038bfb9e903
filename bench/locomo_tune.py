"""Leave-one-file-out tuning of the keyword ranking on LoCoMo (not a test).

Usage: python bench/locomo_tune.py FILES... -- imports the files once (``importer``), then
for each candidate setting of ``search_sqlite.search_messages`` options computes
per-file recall@k; a parameter is chosen on four files and evaluated on the fifth.
"""

from __future__ import annotations

import itertools
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locomo import convert  # noqa: E402

from kvcache_cli import search_sqlite  # noqa: E402
from kvcache_cli.importer import import_file  # noqa: E402
from kvcache_cli.store.backend import open_store  # noqa: E402

KS = (5, 10)


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
    out: dict[str, list[float]] = {}
    for q in qs:
        sid = meta["sids"][q["session"]]
        hits = search_sqlite.search_messages(conn, q["q"], sid, 20, **opts)
        got = [meta["dias"][q["session"]].get(h.message_index, "") for h in hits]
        ev = set(q["ev"])
        row = out.setdefault(q["session"], [0.0] * (len(KS) + 1))
        for j, k in enumerate(KS):
            row[j] += len(ev & set(got[:k])) / len(ev)
        row[-1] += 1
    return out


def main() -> None:
    files = [Path(a) for a in sys.argv[1:]]
    conn, qs, meta = load(files)
    grid: dict[str, list[Any]] = {
        "speaker_boost": [0.5, 1.0, 1.5, 2.0],
        "context_weight": [0.4, 0.5, 0.6],
        "number_boost": [0.0, 0.5],
    }
    names = list(grid)
    results = {}
    for values in itertools.product(*grid.values()):
        opts = dict(zip(names, values, strict=True))
        results[values] = per_file(conn, qs, meta, **opts)
        allq = [
            sum(r[j] for r in results[values].values()) / sum(r[-1] for r in results[values].values())
            for j in range(len(KS))
        ]
        per = " ".join(f"{k}:{r[1] / r[-1]:.3f}" for k, r in sorted(results[values].items()))
        print(opts, "R@5 {:.3f} R@10 {:.3f}".format(*allq), per, flush=True)
    # leave one file out: pick the setting best on the other files (R@10), score the held-out one
    keys = sorted(meta["dias"])
    held = []
    for out in keys:

        def train(v: Any, out: str = out) -> float:
            rows = [r for k, r in results[v].items() if k != out]
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
