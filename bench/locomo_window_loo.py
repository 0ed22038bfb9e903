"""Prototype: does embedding a turn with its neighbours help the hybrid? Leave-one-out on LoCoMo.

Usage::

    python bench/locomo_window_loo.py --store STORE.db --vectors QUERIES.json \\
        --texts TEXTS.json FILES... [--json-out out.json]

``STORE`` is the store ``bench/locomo_hybrid_loo.py`` builds (``kvcache process`` of the
files with ``[llm] embeddings_url`` set); ``QUERIES.json`` its query-vector cache (model
-> text -> vector); ``TEXTS.json`` maps a text to its vector for every window text (made
by ``--embed URL``: the message as stored ``M``, previous+this ``P``, this+next ``N``,
previous+this+next ``PN``, joined by newlines; ``+D`` puts the session date in front).

Every question is asked through the retrieve service (``KVCacheManager.retrieve``, as
``kvcache retrieve SESSION QUESTION -n 20``) with the semantic side's cosines replaced by
the variant's, in memory: nothing is stored. The keyword side is the code's own and is
computed once per question (memoised; the variants only change the semantic side).
Semantic variants: one vector kind (``M``, ``P``, ...), or ``max:M,P`` (per message, the
larger cosine of the two kinds); ``|median`` after either uses the fusion's above-median
normalisation of the semantic side. Each is crossed with keyword weights and the semantic
neighbour-context weight. The first setting is the shipped default (``M``, keyword 0.7,
context 0.25). Choice and report as in ``bench/locomo_hybrid_loo.py``: each held-out
conversation gets the setting with the best mean of R@1/5/10 on the other four (ties to
the earlier setting); the leave-one-out figures are compared with the shipped default,
paired per question, with standard errors.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locomo_cli import load_all_questions  # noqa: E402
from locomo_hybrid_loo import (  # noqa: E402
    CachedEmbeddings,
    category_means,
    conversation_rows,
    leave_one_out,
    mean_rows,
    paired_differences,
    per_conversation_r10,
    question_recall,
    server_config,
)
from locomo_loo import fmt, spread  # noqa: E402

from kvcache_cli.services import retrieve as retrieve_service  # noqa: E402
from kvcache_cli.services.llm_setup import llm_client  # noqa: E402
from kvcache_cli.services.manager import KVCacheManager  # noqa: E402
from kvcache_cli.store.backend import open_store  # noqa: E402

KINDS = ("M", "P", "N", "PN", "M+D", "PN+D", "P+D")
Setting = tuple[str, float, float]  # semantic variant, keyword weight, context weight


def session_rows(store: Path) -> dict[str, list[tuple[int, int, str, str]]]:
    """Session key -> [(message id, index, content, timestamp)] in order."""
    db = sqlite3.connect(store)
    out: dict[str, list[tuple[int, int, str, str]]] = {}
    for key, mid, idx, content, ts in db.execute(
        "select s.key, m.id, m.message_index, m.content, m.timestamp from messages m "
        "join sessions s on s.id = m.session_id order by s.key, m.message_index"
    ):
        out.setdefault(key, []).append((mid, idx, content, str(ts)))
    db.close()
    return out


def window_text(kind: str, msgs: list[tuple[int, int, str, str]], j: int) -> str:
    """The text embedded for message ``j`` under ``kind`` (see the module docstring)."""
    base, _, flag = kind.partition("+")
    c = msgs[j][2]
    prev = msgs[j - 1][2] if j > 0 else None
    nxt = msgs[j + 1][2] if j + 1 < len(msgs) else None
    windows: dict[str, list[str | None]] = {"M": [c], "P": [prev, c], "N": [c, nxt], "PN": [prev, c, nxt]}
    parts = windows[base]
    text = "\n".join(p for p in parts if p)
    if flag == "D":
        d = datetime.fromisoformat(msgs[j][3][:19])
        text = f"[{d.day} {d.strftime('%B %Y')}] " + text
    return text


def unit(v: Sequence[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v] if n else list(v)


def dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(map(operator.mul, a, b))


class Semantic:
    """Per (kind, query text, session): message index -> (message id, cosine), memoised."""

    def __init__(self, rows: dict[str, list[tuple[int, int, str, str]]], paths: list[Path]):
        self.rows = rows
        self.paths = paths
        self.vec: dict[tuple[str, str], list[list[float]]] = {}
        self.load()
        self.memo: dict[tuple[str, str, str], list[float]] = {}

    def load(self) -> None:
        """(Re)read the text -> vector files; a kind is ready when all its texts are there."""
        texts: dict[str, list[float]] = {}
        for path in self.paths:
            if path.exists():
                texts.update(json.loads(path.read_text()))
        for kind in KINDS:
            for key, msgs in self.rows.items():
                got = [texts.get(window_text(kind, msgs, j)) for j in range(len(msgs))]
                if all(g is not None for g in got):
                    self.vec[(kind, key)] = [unit(g) for g in got if g is not None]

    def cosines(self, kind: str, query: str, qvec: list[float], key: str) -> list[float]:
        while (kind, key) not in self.vec:  # still being embedded (--embed elsewhere): wait
            print(f"waiting for {kind} vectors of {key}", file=sys.stderr, flush=True)
            time.sleep(60)
            self.load()
        memo_key = (kind, query, key)
        if memo_key not in self.memo:
            q = unit(qvec)
            self.memo[memo_key] = [dot(q, v) for v in self.vec[(kind, key)]]
        return self.memo[memo_key]

    def scores(self, variant: str, query: str, qvec: list[float], key: str) -> dict[int, tuple[int, float]]:
        if variant.startswith("max:"):
            kinds = variant[4:].split(",")
            cols = [self.cosines(k, query, qvec, key) for k in kinds]
            cos = [max(c) for c in zip(*cols, strict=True)]
        else:
            cos = self.cosines(variant, query, qvec, key)
        return {idx: (mid, c) for (mid, idx, _, _), c in zip(self.rows[key], cos, strict=True)}


def memoised(fn: Any, key_of: Any) -> Any:
    memo: dict[Any, Any] = {}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        k = key_of(*args, **kwargs)
        if k not in memo:
            memo[k] = fn(*args, **kwargs)
        return memo[k]

    return wrapper


class Prototype:
    """The retrieve service with the semantic side swapped per setting (in memory only)."""

    def __init__(self, store: Path, vectors: Path, sem: Semantic) -> None:
        copy = Path(tempfile.mkdtemp(prefix="locomo-window-")) / "store.db"
        src, dst = sqlite3.connect(store), sqlite3.connect(copy)
        src.backup(dst)
        src.close()
        dst.close()
        config = server_config("http://127.0.0.1:1")  # every query vector comes from the cache
        self.manager = KVCacheManager(
            open_store(str(copy)), config, CachedEmbeddings(llm_client(config.llm), vectors)
        )
        self.sem = sem
        db = sqlite3.connect(copy)
        self.keys = dict(db.execute("select id, key from sessions"))
        db.close()
        self.variant = "M"
        self.query = ""
        rs = retrieve_service
        rs.after_retrieval = lambda *a, **k: None  # no statistics: the store stays as built
        rs.rank_entries = memoised(
            rs.rank_entries,
            lambda q, entries, tier, key, snaps=None, names=None, limit=None: (
                q,
                tier,
                key,
                tuple(e.key_hash for e in entries),
                limit,
            ),
        )
        rs.search_history = memoised(
            rs.search_history,
            lambda core, q, session, limit, **o: (q, session.key, limit, tuple(sorted(o.items()))),
        )
        rs.semantic_scores = self._semantic_scores

    def _semantic_scores(self, core: Any, session_id: int, semantic: tuple[list[float], str]) -> Any:
        return self.sem.scores(self.variant, self.query, semantic[0], self.keys[session_id])

    def recalls(
        self, setting: Setting, questions: list[dict[str, Any]], dia_of: dict[str, Any]
    ) -> list[list[float]]:
        variant, weight, context = setting
        cfg = self.manager.config.cache
        cfg.retrieval_strategy = "hybrid"
        cfg.hybrid.keyword_weight, cfg.hybrid.semantic_weight = weight, 1.0 - weight
        kind, _, normalise = variant.partition("|")  # "P|median": above-median normalisation
        self.manager.fusion = f"weighted,context={context}" + (f",normalise={normalise}" if normalise else "")
        self.variant = kind
        out = []
        for q in questions:
            self.query = q["q"]
            out.append(question_recall(self.manager, q, dia_of, "hybrid", setting))
        return out


def embed(
    url: str, texts_path: Path, rows: dict[str, list[tuple[int, int, str, str]]], kinds: list[str]
) -> None:
    """Embed every window text of ``kinds`` not yet in ``texts_path`` (batches of 16)."""
    import requests

    cache: dict[str, list[float]] = json.loads(texts_path.read_text()) if texts_path.exists() else {}
    todo = list(
        dict.fromkeys(
            t
            for kind in kinds
            for msgs in rows.values()
            for t in (window_text(kind, msgs, j) for j in range(len(msgs)))
            if t not in cache
        )
    )
    print(f"{len(todo)} texts to embed", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with requests.Session() as http:
        for i in range(0, len(todo), 16):
            batch = todo[i : i + 16]
            r = http.post(url + "/v1/embeddings", json={"input": batch}, timeout=600)
            r.raise_for_status()
            for t, d in zip(batch, sorted(r.json()["data"], key=lambda d: d["index"]), strict=True):
                cache[t] = d["embedding"]
            if i % 800 == 0 or i + 16 >= len(todo):
                tmp = texts_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(cache))
                os.replace(tmp, texts_path)
                print(f"{i + len(batch)}/{len(todo)} {time.perf_counter() - started:.0f} s", file=sys.stderr)


def prototype_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every in-memory prototype takes: the LoCoMo files, the store
    ``kvcache process`` made of them with vectors, and the query-vector cache."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--store", required=True, type=Path)
    ap.add_argument("--vectors", required=True, type=Path, help="query-vector cache (locomo_hybrid_loo)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = prototype_arguments((__doc__ or "").splitlines()[0])
    ap.add_argument("--texts", required=True, type=Path, help="window text -> vector (JSON)")
    ap.add_argument("--more-texts", type=Path, nargs="*", default=[], help="further text -> vector files")
    ap.add_argument("--embed", default=None, help="embeddings server: embed missing window texts first")
    ap.add_argument("--kinds", default="M,P,N,PN", help="vector kinds to embed with --embed")
    ap.add_argument("--variants", default="M;P;N;PN;max:M,P;max:M,N;max:M,PN", help="';'-separated")
    ap.add_argument("--weights", default="0.6,0.7,0.8")
    ap.add_argument("--contexts", default="0.25,0")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument(
        "--rows", type=Path, default=None, help="per-question recalls of each setting (JSON lines, reused)"
    )
    args = ap.parse_args(argv)

    rows = session_rows(args.store)
    if args.embed:
        embed(args.embed, args.texts, rows, args.kinds.split(","))
    sem = Semantic(rows, [args.texts, *args.more_texts])
    print("vector kinds ready: " + ", ".join(sorted({k for k, _ in sem.vec})), file=sys.stderr)
    variants = args.variants.split(";")
    weights = [float(w) for w in args.weights.split(",")]
    contexts = [float(c) for c in args.contexts.split(",")]
    default: Setting = ("M", 0.7, 0.25)
    grid: list[Setting] = [default] + [
        (v, w, c) for v in variants for w in weights for c in contexts if (v, w, c) != default
    ]
    dia_of, questions = load_all_questions(args.files)
    convs = sorted(dia_of)
    per: dict[Setting, list[list[float]]] = {}
    done: dict[Setting, list[list[float]]] = {}
    if args.rows and args.rows.exists():  # settings an earlier run computed (same store and code)
        for line in args.rows.read_text().splitlines():
            item = json.loads(line)
            done[tuple(item["setting"])] = item["rows"]  # type: ignore[index]
    proto: Prototype | None = None
    for setting in grid:
        started = time.perf_counter()
        if setting in done:
            per[setting] = done[setting]
        else:
            proto = proto or Prototype(args.store, args.vectors, sem)
            per[setting] = proto.recalls(setting, questions, dia_of)
            if args.rows:
                with args.rows.open("a") as fh:
                    fh.write(json.dumps({"setting": setting, "rows": per[setting]}) + "\n")
        print(
            f"{setting[0]:<12} kw={setting[1]} ctx={setting[2]:<5} {fmt(mean_rows(per[setting]))} | R@10 "
            + per_conversation_r10(questions, per[setting], convs)
            + f" | {time.perf_counter() - started:.0f} s",
            flush=True,
        )

    def rows_of(setting: Setting, conv: str) -> list[list[float]]:
        return conversation_rows(questions, per[setting], conv)

    chosen, loo = leave_one_out(grid, per, questions, convs)
    base = per[default]
    report: dict[str, Any] = {"folds": [], "settings": {}, "categories": {}}
    folds = []
    for out in convs:
        held, ref = mean_rows(rows_of(chosen[out], out)), mean_rows(rows_of(default, out))
        folds.append(held)
        print(f"fold {out}: chose {chosen[out]}; held-out {fmt(held)} (default {fmt(ref)})")
        report["folds"].append({"held_out": out, "chose": chosen[out], "recall": held, "default": ref})
    print(f"window leave-one-out: {fmt(mean_rows(loo))}   shipped default: {fmt(mean_rows(base))}")
    print(spread(folds))
    paired = paired_differences(loo, base, "LOO minus default")
    report["categories"] = category_means(questions, {"loo": loo, "default": base})
    report.update(loo=mean_rows(loo), default=mean_rows(base), paired=paired)
    for setting, r in per.items():
        report["settings"][f"{setting[0]} kw={setting[1]} ctx={setting[2]}"] = {
            "all": mean_rows(r),
            **{c: mean_rows(rows_of(setting, c)) for c in convs},
        }
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
