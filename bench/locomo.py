"""LoCoMo retrieval bench through the real store and the real retrieval path.

Usage::

    python bench/locomo.py ../shared/bench/locomo-dev/*.json
    python bench/locomo.py --server http://127.0.0.1:8089 --strategy all FILES...
    python bench/locomo.py --db postgresql://... --json FILES...

Each conversation is written as a native conversation file (one session named after the
file; each turn a message ``speaker: text`` with ``name`` = speaker, ``timestamp`` =
the session's date; the first speaker's turns are ``user``, the other's ``assistant``)
and stored with ``kvcache import``'s code (``importer.import_file``). Every question
with evidence (category 5 left out) is asked with ``KVCacheManager.retrieve`` (what
``kvcache retrieve SESSION QUESTION --json -n 20`` runs, all tiers), and
recall@k = |evidence & top-k dia_ids| / |evidence| is averaged, for k = 1, 5, 10, 20,
overall and per category. Evidence ids are cleaned (``D8:6; D9:17`` split, ``D:11:26``
-> ``D11:26``, malformed ids dropped). Only turns' ``speaker``, ``text``, ``dia_id``
and the session dates are read; never answers, observations or summaries.

Semantic strategies need an OpenAI-compatible ``/v1/embeddings`` server (``--server``,
e.g. ``bench/embed_server.py``); without one only ``keyword_only`` runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locomo_to_conversations import session_numbers  # noqa: E402

from kvcache_cli.config import RETRIEVAL_STRATEGIES, Config  # noqa: E402
from kvcache_cli.services.importing import import_file  # noqa: E402
from kvcache_cli.services.manager import KVCacheManager  # noqa: E402
from kvcache_cli.store.backend import open_store  # noqa: E402

KS = (1, 5, 10, 20)
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}


def parse_evidence(raw: Sequence[Any]) -> list[str]:
    """Normalise evidence ids: 'D8:6; D9:17' -> two ids, 'D:11:26' -> 'D11:26', junk dropped."""
    out: list[str] = []
    for item in raw:
        for part in re.split(r"[;,\s]+", str(item)):
            m = re.fullmatch(r"D:?(\d+):(\d+)", part.strip())
            if m:
                out.append(f"D{int(m.group(1))}:{int(m.group(2))}")
    return list(dict.fromkeys(out))


def iso_date(text: str) -> str | None:
    """'1:56 pm on 8 May, 2023' -> '2023-05-08T13:56:00' (None when unparsable)."""
    try:
        return datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").isoformat()
    except ValueError:
        return None


def convert(path: Path, out_dir: Path) -> tuple[str, Path, dict[int, str], list[dict[str, Any]]]:
    """A LoCoMo file as a native conversation file; (session, file, index -> dia_id, questions)."""
    data = json.loads(path.read_text())
    conv = data.get("conversation", data)
    key = path.stem
    first = conv.get("speaker_a")
    messages: list[dict[str, Any]] = []
    dia: dict[int, str] = {}
    for n in session_numbers(conv):
        stamp = iso_date(str(conv.get(f"session_{n}_date_time", "")))
        for turn in conv[f"session_{n}"]:
            speaker = str(turn.get("speaker", ""))
            if first is None:
                first = speaker
            msg: dict[str, Any] = {
                "role": "user" if speaker == first else "assistant",
                "name": speaker,
                "content": f"{speaker}: {turn.get('text', '')}",
            }
            if stamp:
                msg["timestamp"] = stamp
            dia[len(messages)] = str(turn.get("dia_id", ""))
            messages.append(msg)
    questions = []
    for qa in data.get("qa", []):
        cat = qa.get("category")
        ev = parse_evidence(qa.get("evidence") or [])
        if cat == 5 or not ev or not str(qa.get("question", "")).strip():
            continue
        questions.append({"q": str(qa["question"]), "cat": cat, "ev": ev, "session": key})
    file = out_dir / f"{key}.json"
    file.write_text(json.dumps({"session_id": key, "messages": messages}))
    return key, file, dia, questions


def evaluate(
    manager: KVCacheManager,
    dia_of: dict[str, dict[int, str]],
    questions: list[dict[str, Any]],
    tiers: tuple[int, ...],
) -> dict[str, Any]:
    """Recall@k per category for the manager's configured strategy."""
    kmax = max(KS)
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0] * (len(KS) + 1))
    notices: set[str] = set()
    strategy_used = manager.config.cache.retrieval_strategy
    started = time.perf_counter()
    for q in questions:
        result = manager.retrieve(q["session"], q["q"], tiers, kmax)
        notices.update(result.notices)
        strategy_used = result.strategy
        dias = dia_of[q["session"]]
        got = [dias.get(e.message_index, "") for e in result.entries if e.message_index is not None]
        ev = set(q["ev"])
        for key in ("all", f"cat{q['cat']}"):
            row = sums[key]
            for j, k in enumerate(KS):
                row[j] += len(ev & set(got[:k])) / len(ev)
            row[-1] += 1
    elapsed = time.perf_counter() - started
    table = {
        key: {**{f"R@{k}": round(row[j] / row[-1], 4) for j, k in enumerate(KS)}, "n": int(row[-1])}
        for key, row in sums.items()
    }
    return {
        "strategy": strategy_used,
        "ms_per_query": round(elapsed * 1000 / max(1, len(questions)), 2),
        "recall": table,
        "notices": sorted(notices),
    }


def print_table(name: str, res: dict[str, Any]) -> None:
    print(f"\n== {name}   ({res['ms_per_query']:.1f} ms/query)")
    for n in res["notices"]:
        print(f"   notice: {n}")
    print(f"{'subset':<22}{'n':>5}" + "".join(f"{'R@' + str(k):>8}" for k in KS))
    for key in ["all"] + [f"cat{c}" for c in sorted(CATEGORIES)]:
        if key not in res["recall"]:
            continue
        row = res["recall"][key]
        label = key if key == "all" else f"{key} {CATEGORIES[int(key[3:])]}"
        print(f"{label:<22}{row['n']:>5}" + "".join(f"{row['R@' + str(k)]:>8.3f}" for k in KS))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument(
        "--strategy",
        default="all",
        help="comma-separated strategies, or 'all' (those that can run: semantic ones need --server)",
    )
    ap.add_argument("--server", default=None, help="OpenAI-compatible embeddings server base URL")
    ap.add_argument("--embedding-model", default=None, help="model name sent to the server")
    ap.add_argument("--fusion", default="weighted", help="hybrid fusion: weighted, rrf or both")
    ap.add_argument(
        "--weights", default=None, help="hybrid keyword,semantic weights (default: the config's 0.5,0.5)"
    )
    ap.add_argument("--db", default=None, help="SQLite path or postgresql:// URL (default: a temp file)")
    ap.add_argument("--tiers", default="1,2,3", help="tiers to search (default all, as kvcache retrieve)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = ap.parse_args(argv)

    if args.strategy == "all":
        wanted = list(RETRIEVAL_STRATEGIES) if args.server else ["keyword_only"]
    else:
        wanted = [s.strip() for s in args.strategy.split(",") if s.strip()]
        bad = [s for s in wanted if s not in RETRIEVAL_STRATEGIES]
        if bad:
            ap.error(f"unknown strategy {bad[0]!r}; use {', '.join(RETRIEVAL_STRATEGIES)}")
    fusions = ["weighted", "rrf"] if args.fusion == "both" else [args.fusion]
    tiers = tuple(int(t) for t in args.tiers.split(","))

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        store = open_store(args.db or str(tmpdir / "locomo.db"))
        config = Config()
        config.cache.generate_cache_embeddings = bool(args.server)
        if args.weights:
            kw, sem = (float(x) for x in args.weights.split(","))
            config.cache.hybrid.keyword_weight, config.cache.hybrid.semantic_weight = kw, sem
        llm = None
        if args.server:
            from kvcache_cli.llm.client import LLMClient, LLMSettings

            llm = LLMClient(
                LLMSettings(
                    base_url=args.server,
                    embedding_model=args.embedding_model,
                    model=args.embedding_model or "default",
                    embedding_batch_size=64,
                )
            )
        manager = KVCacheManager(store, config, llm)
        dia_of: dict[str, dict[int, str]] = {}
        questions: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        for path in args.files:
            key, file, dia, qs = convert(path, tmpdir)
            import_file(store, file)
            dia_of[key] = dia
            questions.extend(qs)
        load_s = time.perf_counter() - t0
        turns = sum(len(d) for d in dia_of.values())
        report: dict[str, Any] = {
            "files": [str(p) for p in args.files],
            "turns": turns,
            "questions": len(questions),
            "import_seconds": round(load_s, 2),
            "server": args.server,
            "runs": [],
        }
        if not args.json:
            print(f"{len(args.files)} conversations, {turns} turns, {len(questions)} questions")
        for strategy in wanted:
            for fusion in fusions if strategy == "hybrid" else ["-"]:
                config.cache.retrieval_strategy = strategy
                manager.fusion = None if fusion == "-" else fusion
                res = evaluate(manager, dia_of, questions, tiers)
                res["requested"] = strategy
                if strategy == "hybrid":
                    res["fusion"] = fusion
                    res["weights"] = [config.cache.hybrid.keyword_weight, config.cache.hybrid.semantic_weight]
                report["runs"].append(res)
                if not args.json:
                    label = strategy if fusion == "-" else f"{strategy} ({fusion} fusion)"
                    print_table(label, res)
        store.close()
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
