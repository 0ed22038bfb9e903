"""Leave-one-conversation-out choice of the hybrid fusion on LoCoMo, with a real embeddings server.

Usage::

    python bench/locomo_hybrid_loo.py --server http://127.0.0.1:8090 --store /tmp/x/emb.db FILES...
    python bench/locomo_hybrid_loo.py ... --vectors /tmp/x/queries.json --json-out /tmp/x/loo.json
    python bench/locomo_hybrid_loo.py ... --grid '[["hybrid", "weighted", 0.5], ...]'

The store is what a reviewer builds: when ``--store`` does not exist, the files are
converted (``bench/locomo_to_conversations.py``) and replayed with ``kvcache --db STORE
process FILES`` (in-process CliRunner, ``[llm] embeddings_url`` = ``--server``), which
stores every message's vector. Every question with evidence (category 5 left out) is
then asked through the retrieve service (``KVCacheManager.retrieve``: what ``kvcache
retrieve SESSION QUESTION --json -n 20`` runs) once per grid setting: a strategy, a
fusion spec (``strategies.parse_fusion``: ``weighted``, ``weighted,normalise=median``,
``rrf,k=60``, ``...,context=0.5``) and the keyword weight (semantic = 1 - keyword).
Query vectors come from the server once and are kept in ``--vectors`` (JSON, keyed by
model and text), so grid points do not re-embed.

For each held-out conversation the hybrid setting with the best criterion (mean of R@1,
R@5, R@10, pooled over the other four conversations' questions) is chosen and scored on
it; ties go to the earlier setting in grid order. Reported: every setting's pooled and
per-conversation figures; each fold's choice and held-out R@k; the question-weighted
leave-one-out figures, their spread over folds and per category; and the paired
per-question difference hybrid-LOO minus keyword_only with its standard error.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locomo import CATEGORIES, KS  # noqa: E402
from locomo_cli import Runner, load_all_questions  # noqa: E402
from locomo_loo import criterion, fmt, spread  # noqa: E402
from locomo_to_conversations import convert_file  # noqa: E402

from kvcache_cli.config import Config  # noqa: E402
from kvcache_cli.llm.client import EmbeddingBatch  # noqa: E402
from kvcache_cli.services.llm_setup import llm_client  # noqa: E402
from kvcache_cli.services.manager import KVCacheManager  # noqa: E402
from kvcache_cli.store.backend import open_store  # noqa: E402

Setting = tuple[str, str, float]  # strategy, fusion spec, keyword weight
S = TypeVar("S")  # a grid setting of either leave-one-out script

GRID: list[Setting] = [
    # the fusion in use first (ties go to the earlier setting), then the alternatives
    ("hybrid", "weighted", 0.5),
    *[("hybrid", "weighted", w) for w in (0.6, 0.7, 0.8, 0.9)],
    *[("hybrid", f"weighted,context={c}", w) for c in (0.0, 0.5) for w in (0.7, 0.8, 0.9)],
    *[("hybrid", "weighted,normalise=median", w) for w in (0.7, 0.8, 0.9)],
    *[("hybrid", "rrf,k=60", w) for w in (0.5, 0.7, 0.9)],
]
REFERENCES: list[Setting] = [("keyword_only", "-", 1.0), ("semantic_only", "-", 0.0)]


class CachedEmbeddings:
    """The LLM client's ``embed`` with the answers kept in a JSON file (model -> text -> vector)."""

    def __init__(self, llm: Any, path: Path) -> None:
        self.llm = llm
        self.settings = llm.settings
        self.embeddings_only = True
        self.path = path
        self.data: dict[str, dict[str, list[float]]] = json.loads(path.read_text()) if path.exists() else {}
        self.calls = 0

    def embed(self, texts: list[str]) -> EmbeddingBatch:
        model = self.settings.embedding_model or self.settings.model
        known = self.data.setdefault(model, {})
        missing = [t for t in dict.fromkeys(texts) if t not in known]
        if missing:
            self.calls += 1
            got = self.llm.embed(missing)
            known.update(zip(missing, got.vectors, strict=True))
        vectors = [known[t] for t in texts]
        return EmbeddingBatch(vectors=vectors, model=model, dim=len(vectors[0]) if vectors else 0)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


def build_store(files: list[Path], store: Path, server: str, work: Path) -> None:
    """``kvcache --db STORE process FILES`` with the embeddings server, as a reviewer runs it."""
    cfg = work / "kvcache.toml"
    cfg.write_text(f'[llm]\nembeddings_url = "{server}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
    env.update(KVCACHE_HOME=str(work / "home"), KVCACHE_CONFIG=str(cfg))
    targets = [str(convert_file(path, work / "conv")[0]) for path in files]
    started = time.perf_counter()
    Runner("inprocess", env).run(["--db", str(store), "process", *targets, "--json"])
    print(f"process: {time.perf_counter() - started:.0f} s", file=sys.stderr)


def recalls(
    manager: KVCacheManager, setting: Setting, questions: list[dict[str, Any]], dia_of: dict[str, Any]
) -> list[list[float]]:
    """Per question: recall@k for k in KS under ``setting``."""
    strategy, fusion, weight = setting
    cfg = manager.config.cache
    cfg.retrieval_strategy = strategy
    cfg.hybrid.keyword_weight, cfg.hybrid.semantic_weight = weight, 1.0 - weight
    manager.fusion = None if fusion == "-" else fusion
    return [question_recall(manager, q, dia_of, strategy, setting) for q in questions]


def question_recall(
    manager: KVCacheManager,
    q: dict[str, Any],
    dia_of: dict[str, Any],
    strategy: str,
    setting: object,
    tiers: tuple[int, ...] = (1, 2, 3),
) -> list[float]:
    """Recall@k (k in KS) of one question through the retrieve service, which must have
    run ``strategy`` (a silent fall-back to keyword_only would make a grid meaningless)."""
    res = manager.retrieve(q["session"], q["q"], tiers, max(KS))
    if res.strategy != strategy:
        raise SystemExit(f"{setting}: ran as {res.strategy} ({res.notices})")
    got = [dia_of[q["session"]].get(e.message_index, "") for e in res.entries]
    ev = set(q["ev"])
    return [len(ev & set(got[:k])) / len(ev) for k in KS]


def grid_rows(
    grid: Sequence[S],
    compute: Callable[[S], list[list[float]]],
    rows_file: Path | None,
    label: Callable[[S], str],
) -> dict[S, list[list[float]]]:
    """Each setting's per-question recall rows: read back from ``rows_file`` (JSON lines
    of earlier runs of the same code) or computed and appended to it; one line per setting
    on stderr."""
    done: dict[S, list[list[float]]] = {}
    if rows_file and rows_file.exists():
        for line in rows_file.read_text().splitlines():
            item = json.loads(line)
            done[tuple(item["setting"])] = item["rows"]  # type: ignore[index]
    per: dict[S, list[list[float]]] = {}
    for setting in grid:
        started = time.perf_counter()
        if setting not in done:
            done[setting] = compute(setting)
            if rows_file:
                with rows_file.open("a") as fh:
                    fh.write(json.dumps({"setting": setting, "rows": done[setting]}) + "\n")
        per[setting] = done[setting]
        print(
            f"{label(setting):<44} {fmt(mean_rows(per[setting]))} | {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
        )
    return per


def server_config(server: str) -> Config:
    config = Config()
    config.llm.embeddings_url = server
    return config


_WORKER: dict[str, KVCacheManager] = {}


def run_setting(
    store: Path,
    server: str,
    vectors: Path,
    questions: list[dict[str, Any]],
    dia_of: dict[str, Any],
    setting: Setting,
) -> tuple[Setting, list[list[float]], float]:
    """One grid setting in a worker process: (setting, per-question recalls, ms per query).

    The worker copies the store once (a retrieval records statistics: workers must not
    share one SQLite file) and reads query vectors from the cache only.
    """
    manager = _WORKER.get("manager")
    if manager is None:
        copy = Path(tempfile.mkdtemp(prefix="locomo-hybrid-w-")) / "store.db"
        src = sqlite3.connect(store)
        dst = sqlite3.connect(copy)
        src.backup(dst)
        src.close()
        dst.close()
        config = server_config(server)
        manager = _WORKER["manager"] = KVCacheManager(
            open_store(str(copy)), config, CachedEmbeddings(llm_client(config.llm), vectors)
        )
    started = time.perf_counter()
    rows = recalls(manager, setting, questions, dia_of)
    return setting, rows, (time.perf_counter() - started) * 1000 / len(questions)


def mean_rows(rows: Sequence[list[float]]) -> list[float]:
    return [sum(r[j] for r in rows) / len(rows) for j in range(len(KS))] if rows else [0.0] * len(KS)


def conversation_rows(
    questions: list[dict[str, Any]], rows: list[list[float]], conv: str, inside: bool = True
) -> list[list[float]]:
    """The rows of ``conv``'s questions (``inside``), or of every other conversation's."""
    return [r for q, r in zip(questions, rows, strict=True) if (q["session"] == conv) == inside]


def per_conversation_r10(questions: list[dict[str, Any]], rows: list[list[float]], convs: list[str]) -> str:
    """``26:0.787 30:0.823 ...``: each conversation's R@10 over its questions' rows."""
    return " ".join(f"{c[-2:]}:{mean_rows(conversation_rows(questions, rows, c))[2]:.3f}" for c in convs)


def choose_per_fold(
    grid: list[S], per: dict[S, list[list[float]]], questions: list[dict[str, Any]], convs: list[str]
) -> dict[str, S]:
    """For each held-out conversation, the grid setting with the best criterion on the
    other conversations' questions (pooled); ties go to the earlier setting."""

    def score(setting: S, out: str) -> tuple[float, int]:
        others = conversation_rows(questions, per[setting], out, inside=False)
        return criterion(mean_rows(others)), -grid.index(setting)

    return {out: max(grid, key=lambda s: score(s, out)) for out in convs}


def leave_one_out(
    grid: list[S], per: dict[S, list[list[float]]], questions: list[dict[str, Any]], convs: list[str]
) -> tuple[dict[str, S], list[list[float]]]:
    """Each held-out conversation's chosen setting (:func:`choose_per_fold`), and every
    question's row under the setting its own fold chose."""
    chosen = choose_per_fold(grid, per, questions, convs)
    return chosen, [per[chosen[q["session"]]][i] for i, q in enumerate(questions)]


def category_means(
    questions: list[dict[str, Any]], named: dict[str, list[list[float]]]
) -> dict[str, dict[str, Any]]:
    """Per LoCoMo category: its question count and each named row set's mean (printed)."""
    out: dict[str, dict[str, Any]] = {}
    for cat in sorted(CATEGORIES):
        idx = [i for i, q in enumerate(questions) if q["cat"] == cat]
        cells = {name: mean_rows([rows[i] for i in idx]) for name, rows in named.items()}
        out[CATEGORIES[cat]] = {"n": len(idx), **cells}
        print(
            f"{CATEGORIES[cat]:<12} n={len(idx):<4} " + "  ".join(f"{n} {fmt(v)}" for n, v in cells.items())
        )
    return out


def paired_differences(a: list[list[float]], b: list[list[float]], name: str) -> list[dict[str, Any]]:
    """Per k, the mean per-question difference ``a - b`` and its standard error (printed)."""
    out = []
    for j, k in enumerate(KS):
        d = [x[j] - y[j] for x, y in zip(a, b, strict=True)]
        se = statistics.stdev(d) / math.sqrt(len(d))
        out.append({"k": k, "diff": sum(d) / len(d), "se": se})
        print(f"paired {name} R@{k}: {sum(d) / len(d):+.4f} (SE {se:.4f})")
    return out


def label(s: Setting) -> str:
    return s[0] if s[1] == "-" else f"{s[0]} {s[1]} kw={s[2]}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--server", required=True, help="embeddings server URL (llama-server --embeddings)")
    ap.add_argument("--store", required=True, type=Path, help="SQLite store (built here when missing)")
    ap.add_argument("--vectors", type=Path, default=None, help="query-vector cache (JSON)")
    ap.add_argument("--grid", default=None, help="JSON list of [strategy, fusion, keyword_weight]")
    ap.add_argument("--json-out", type=Path, default=None, help="write every figure here")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (each copies the store)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="locomo-hybrid-"))
    if not args.store.exists():
        build_store(args.files, args.store, args.server, work)
    dia_of, questions = load_all_questions(args.files)
    vectors = args.vectors or args.store.with_suffix(".queries.json")
    llm = CachedEmbeddings(llm_client(server_config(args.server).llm), vectors)
    for start in range(0, len(questions), 32):  # every query vector once, before the grid
        llm.embed([q["q"] for q in questions[start : start + 32]])
    llm.save()
    grid: list[Setting] = [tuple(s) for s in json.loads(args.grid)] if args.grid else GRID  # type: ignore[misc]
    convs = sorted(dia_of)
    per: dict[Setting, list[list[float]]] = {}
    task = partial(run_setting, args.store, args.server, vectors, questions, dia_of)
    with multiprocessing.Pool(args.jobs) as pool:  # each worker on its own copy of the store
        for setting, rows, ms in pool.imap(task, REFERENCES + grid):
            per[setting] = rows
            print(
                f"{label(setting):<46} {fmt(mean_rows(per[setting]))} | R@10 "
                + per_conversation_r10(questions, per[setting], convs)
                + f" | {ms:.0f} ms/q",
                flush=True,
            )

    def rows_of(setting: Setting, conv: str) -> list[list[float]]:
        return conversation_rows(questions, per[setting], conv)

    chosen, loo = leave_one_out(grid, per, questions, convs)
    kw = per[REFERENCES[0]]
    report: dict[str, Any] = {"settings": {}, "folds": [], "categories": {}}
    print()
    folds = []
    for out in convs:
        held = mean_rows(rows_of(chosen[out], out))
        base = mean_rows(rows_of(REFERENCES[0], out))
        folds.append(held)
        print(f"fold {out}: chose {label(chosen[out])}; held-out {fmt(held)} (keyword_only {fmt(base)})")
        report["folds"].append({"held_out": out, "chose": chosen[out], "recall": held, "keyword_only": base})
    total = mean_rows(loo)
    print(f"hybrid leave-one-out: {fmt(total)}   keyword_only: {fmt(mean_rows(kw))}")
    print(spread(folds))
    diffs = paired_differences(loo, kw, "hybrid-LOO minus keyword_only")
    report["categories"] = category_means(
        questions, {"hybrid_loo": loo, "keyword_only": kw, "semantic_only": per[REFERENCES[1]]}
    )
    report.update(loo=total, keyword_only=mean_rows(kw), paired=diffs, questions=len(questions))
    for setting, rows in per.items():
        report["settings"][label(setting)] = {
            "all": mean_rows(rows),
            **{c: mean_rows(conversation_rows(questions, rows, c)) for c in convs},
        }
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
