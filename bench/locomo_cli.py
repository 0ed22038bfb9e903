"""LoCoMo recall through the installed ``kvcache``, as a reviewer measures it.

Usage::

    python bench/locomo_cli.py ../shared/bench/locomo-dev/*.json
    python bench/locomo_cli.py --via inprocess FILES...       # same commands, no process start-up
    python bench/locomo_cli.py --embeddings http://127.0.0.1:8090 --strategy hybrid FILES...
    python bench/locomo_cli.py --json FILES...

Steps: each LoCoMo file becomes a native conversation file
(``bench/locomo_to_conversations.py``: ``speaker: text``, ``name`` = speaker, the
session's date as the timestamp, one second apart); ``kvcache --db DB process FILES``
replays them (one session per file); every question with evidence (category 5 left out)
is asked with ``kvcache --db DB retrieve SESSION QUESTION --json -n 20`` (default
settings unless ``--strategy`` is given). A result row's ``message_index`` is the turn's
position in the conversation, so it maps back to a ``dia_id``.

recall@k = |evidence & top-k dia_ids| / |evidence|, averaged over questions, for
k = 1, 5, 10, 20: overall, per category (1 multi-hop, 2 temporal, 3 open-domain,
4 single-hop) and per conversation, with the spread over conversations.

``--via subprocess`` (default) starts ``kvcache`` once per question, as a user would;
``--via inprocess`` runs the same command lines through Typer's ``CliRunner`` in this
process (the same parsing, service and JSON, without the ~0.2-3 s start-up of each).
Only turns' ``speaker``, ``text``, ``dia_id`` and the session dates are read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locomo import CATEGORIES, KS, parse_evidence  # noqa: E402
from locomo_to_conversations import convert_file, session_numbers  # noqa: E402


def load_questions(path: Path) -> tuple[dict[int, str], list[dict[str, Any]]]:
    """(message index -> dia_id, questions) of one LoCoMo file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    conv = data.get("conversation", data)
    dia: dict[int, str] = {}
    for n in session_numbers(conv):
        for turn in conv[f"session_{n}"]:
            dia[len(dia)] = str(turn.get("dia_id", ""))
    questions = []
    for qa in data.get("qa", []):
        ev = parse_evidence(qa.get("evidence") or [])
        if qa.get("category") == 5 or not ev or not str(qa.get("question", "")).strip():
            continue
        questions.append(
            {"q": str(qa["question"]), "cat": qa.get("category"), "ev": ev, "session": path.stem}
        )
    return dia, questions


def load_all_questions(files: Sequence[Path]) -> tuple[dict[str, dict[int, str]], list[dict[str, Any]]]:
    """``({conversation: {message index: dia_id}}, questions)`` of several LoCoMo files."""
    dia_of: dict[str, dict[int, str]] = {}
    questions: list[dict[str, Any]] = []
    for path in files:
        dia_of[path.stem], qs = load_questions(path)
        questions += qs
    return dia_of, questions


class Runner:
    """Runs ``kvcache`` command lines as a subprocess or through Typer's CliRunner."""

    def __init__(self, via: str, env: dict[str, str]) -> None:
        self.via = via
        self.env = env
        script = Path(sys.executable).parent / "kvcache"
        self.command = [str(script)] if script.exists() else [sys.executable, "-m", "kvcache_cli"]
        if via == "inprocess":
            from typer.testing import CliRunner

            from kvcache_cli.cli.app import app

            self.app = app
            self.cli = CliRunner()

    def run(self, args: list[str]) -> Any:
        if self.via == "subprocess":
            proc = subprocess.run(
                self.command + args, env=self.env, capture_output=True, text=True, check=False, timeout=600
            )
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        else:
            old = {k: os.environ.get(k) for k in self.env if k.startswith("KVCACHE_")}
            os.environ.update({k: v for k, v in self.env.items() if k.startswith("KVCACHE_")})
            try:
                res = self.cli.invoke(self.app, args, catch_exceptions=False)
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            out, err, rc = res.stdout, "", res.exit_code
        if rc != 0:
            raise SystemExit(f"kvcache {' '.join(args[:4])}... failed ({rc}): {err or out}"[:2000])
        return json.loads(out)


def recall_table(rows: list[tuple[dict[str, Any], list[str]]]) -> dict[str, dict[str, float]]:
    """R@k overall, per category and per conversation for (question, ranked dia_ids) pairs."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0] * (len(KS) + 1))
    for q, got in rows:
        ev = set(q["ev"])
        for key in ("all", f"cat{q['cat']}", q["session"]):
            row = sums[key]
            for j, k in enumerate(KS):
                row[j] += len(ev & set(got[:k])) / len(ev)
            row[-1] += 1
    return {
        key: {**{f"R@{k}": round(row[j] / row[-1], 4) for j, k in enumerate(KS)}, "n": int(row[-1])}
        for key, row in sorted(sums.items())
    }


def spread(table: dict[str, dict[str, float]], sessions: list[str]) -> dict[str, dict[str, float]]:
    """Min, max and population standard deviation of each R@k over conversations."""
    out = {}
    for k in KS:
        vals = [table[s][f"R@{k}"] for s in sessions if s in table]
        if vals:
            out[f"R@{k}"] = {
                "min": round(min(vals), 4),
                "max": round(max(vals), 4),
                "sd": round(statistics.pstdev(vals), 4),
            }
    return out


def print_report(report: dict[str, Any]) -> None:
    table = report["recall"]
    print(
        f"{report['questions']} questions, {report['via']}, strategy {report['strategy']}, "
        f"{report['ms_per_query']:.0f} ms/query wall"
    )
    print(f"{'subset':<22}{'n':>5}" + "".join(f"{'R@' + str(k):>8}" for k in KS))
    keys = ["all"] + [f"cat{c}" for c in CATEGORIES] + report["sessions"]
    for key in keys:
        if key not in table:
            continue
        row = table[key]
        label = f"{key} {CATEGORIES[int(key[3:])]}" if key.startswith("cat") else key
        print(f"{label:<22}{row['n']:>5}" + "".join(f"{row['R@' + str(k)]:>8.3f}" for k in KS))
    sp = report["spread"]
    print(
        f"{'spread (min-max, sd)':<27}"
        + "".join(f"  {k} {v['min']:.3f}-{v['max']:.3f} sd {v['sd']:.3f}" for k, v in sp.items())
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--via", choices=("subprocess", "inprocess"), default="subprocess")
    ap.add_argument("--strategy", default=None, help="retrieve --strategy (default: the config's)")
    ap.add_argument(
        "--embeddings", default=None, help="embeddings server URL written to [llm] embeddings_url"
    )
    ap.add_argument("--db", default=None, help="reuse this store if it exists (else built here and kept)")
    ap.add_argument("--limit", type=int, default=max(KS))
    ap.add_argument("--no-timestamps", action="store_true", help="drop the session dates from the files")
    ap.add_argument(
        "--captions", action="store_true", help="a shared photo's caption in its turn ([shares ...])"
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument(
        "--rows", type=Path, default=None, help="write each question's ranked dia_ids here (JSON)"
    )
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="locomo-cli-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
    env["KVCACHE_HOME"] = str(work / "home")
    if args.embeddings:
        cfg = work / "kvcache.toml"
        cfg.write_text(f'[llm]\nembeddings_url = "{args.embeddings}"\n')
        env["KVCACHE_CONFIG"] = str(cfg)
    runner = Runner(args.via, env)
    db = Path(args.db) if args.db else work / "locomo.db"
    dia_of: dict[str, dict[int, str]] = {}
    questions: list[dict[str, Any]] = []
    files = []
    for path in args.files:
        target, _, _ = convert_file(path, work / "conv", args.captions)
        if args.no_timestamps:
            data = json.loads(target.read_text())
            for msg in data["messages"]:
                msg.pop("timestamp", None)
            target.write_text(json.dumps(data))
        files.append(str(target))
        dia_of[path.stem], qs = load_questions(path)
        questions += qs
    if not db.exists():
        started = time.perf_counter()
        runner.run(["--db", str(db), "process", *files, "--json"])
        print(f"process: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    rows: list[tuple[dict[str, Any], list[str]]] = []
    used: set[str] = set()
    started = time.perf_counter()
    extra = ["--strategy", args.strategy] if args.strategy else []
    for q in questions:
        out = runner.run(
            ["--db", str(db), "retrieve", q["session"], q["q"], "--json", "-n", str(args.limit), *extra]
        )
        used.add(out["strategy"])
        dias = dia_of[q["session"]]
        rows.append(
            (
                q,
                [
                    dias.get(r["message_index"], "")
                    for r in out["results"]
                    if r.get("message_index") is not None
                ],
            )
        )
    elapsed = time.perf_counter() - started
    if args.rows:
        args.rows.write_text(json.dumps([{**q, "ranked": ranked} for q, ranked in rows]))
    table = recall_table(rows)
    sessions = sorted(dia_of)
    report = {
        "files": [str(p) for p in args.files],
        "via": args.via,
        "strategy": ",".join(sorted(used)),
        "questions": len(questions),
        "ms_per_query": round(elapsed * 1000 / max(1, len(questions)), 1),
        "sessions": sessions,
        "recall": table,
        "spread": spread(table, sessions),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    if not args.db:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
