"""Same-behaviour check: the user-visible outputs of two kvcache installs, compared.

Usage:
    python bench/compare_outputs.py run KVCACHE_BIN OUT_DIR [LOCOMO_DIR]
    python bench/compare_outputs.py diff BEFORE_DIR AFTER_DIR

``run`` replays ``examples/*.json`` (and ``examples/*.jsonl``) and, when given, the
LoCoMo conversations of LOCOMO_DIR (converted with ``locomo_to_conversations.py``)
into a fresh SQLite store each, with ``process --json --turns``; then it writes
``stats --json`` and ``retrieve --json SESSION QUERY`` for a fixed set of queries.
Every output goes to one file in OUT_DIR. ``diff`` compares two such folders with
timestamps, durations, the database's size on disk and the scratch folder's name
masked, and prints the files that differ (exit 1 if any). Run it with the old
install for "before" and the new one for "after". KVCACHE_BIN is run from this
repository's root: to run a worktree's code, use a wrapper with ``python -P -m
kvcache_cli`` (else the current folder's package is imported first).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUERIES = [
    "what did we decide about the refund",
    "password reset",
    "how to install",
    "where did Caroline go last week?",
    "Melanie painting",
    "what is the deadline",
    "remember the error message",
    "support group",
    "camping trip with the kids",
    "favourite book",
]
# values that change from run to run: wall-clock times and durations
MASKS = [
    (re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?"), "<time>"),
    (re.compile(r'"(search_duration_ms|duration_ms|elapsed_s|seconds|elapsed)": [0-9.e-]+'), r'"\1": <dur>'),
    (re.compile(r'"(database_size_bytes|store_size_bytes)": \d+'), r'"\1": <size>'),
    (re.compile(r"kvcache-compare-[A-Za-z0-9_]+"), "<workdir>"),
]


def _run(kvcache: str, args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([kvcache, *args], capture_output=True, text=True, env=env, timeout=1800)
    return f"exit {proc.returncode}\n{proc.stdout}\n--stderr--\n{proc.stderr}"


def _sessions(process_out: str) -> list[str]:
    body = process_out.split("\n", 1)[1].split("\n--stderr--\n", 1)[0]
    try:
        data: Any = json.loads(body)
    except json.JSONDecodeError:
        return []
    items = data.get("sessions", []) if isinstance(data, dict) else data
    return [str(it["session_id"]) for it in items if isinstance(it, dict) and "session_id" in it]


def run(kvcache: str, out: Path, locomo: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kvcache-compare-"))
    config = work / "empty.toml"
    config.write_text("")
    env = {**os.environ, "HOME": str(work), "KVCACHE_CONFIG": str(config), "NO_COLOR": "1"}
    env.pop("KVCACHE_DB", None)
    inputs = sorted((ROOT / "examples").glob("*.json")) + sorted((ROOT / "examples").glob("*.jsonl"))
    if locomo is not None:
        conv_dir = work / "locomo"
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "locomo_to_conversations.py"), str(conv_dir)]
            + [str(p) for p in sorted(locomo.glob("*.json"))],
            check=True,
            capture_output=True,
        )
        inputs += sorted(conv_dir.glob("*.json"))
    for path in inputs:
        name = f"{path.parent.name}-{path.stem}"
        db = str(work / f"{name}.db")
        text = _run(kvcache, ["--db", db, "process", "--json", "--turns", str(path)], env)
        (out / f"{name}.process.txt").write_text(text)
        (out / f"{name}.stats.txt").write_text(_run(kvcache, ["--db", db, "stats", "--json"], env))
        for session in _sessions(text)[:3]:
            for n, query in enumerate(QUERIES):
                args = ["--db", db, "retrieve", "--json", session, query]
                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", session)[:40]
                (out / f"{name}.retrieve.{safe}.{n:02d}.txt").write_text(_run(kvcache, args, env))
    print(f"{len(list(out.iterdir()))} output files in {out}")


def _masked(text: str) -> str:
    for pattern, repl in MASKS:
        text = pattern.sub(repl, text)
    return text


def diff(before: Path, after: Path) -> int:
    names = sorted({p.name for p in before.iterdir()} | {p.name for p in after.iterdir()})
    bad = 0
    for name in names:
        a, b = before / name, after / name
        if not a.exists() or not b.exists():
            print(f"only in {'after' if not a.exists() else 'before'}: {name}")
            bad += 1
            continue
        left, right = _masked(a.read_text()), _masked(b.read_text())
        if left != right:
            bad += 1
            print(f"DIFFERS: {name}")
            lines = difflib.unified_diff(
                left.splitlines(), right.splitlines(), "before", "after", lineterm=""
            )
            print("\n".join(list(lines)[:40]))
    print(f"{len(names)} files compared, {bad} differ")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "run":
        run(argv[1], Path(argv[2]), Path(argv[3]) if len(argv) > 3 else None)
        return 0
    if len(argv) == 3 and argv[0] == "diff":
        return diff(Path(argv[1]), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
