"""Time ``StemFilter.counts`` per chat turn: the keyword re-score's inner loop.

Usage::

    python bench/stem_counts.py [LOCOMO_DIR]                       # this checkout
    PYTHONPATH=OTHER_CHECKOUT python -P bench/stem_counts.py        # another one, same data

Every turn of the LoCoMo files (default ``../shared/bench/locomo-dev``) is tokenized
once; then each of 20 questions' stem filters counts every turn, five times, and the
fastest pass is reported in microseconds per turn (the stem cache warm, as in a
running server). Compare two codes by running both, alternated, on the same machine.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if not sys.flags.safe_path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvcache_cli.retrieval import textsearch as ts  # noqa: E402

DEFAULT = Path(__file__).resolve().parent.parent.parent / "shared" / "bench" / "locomo-dev"


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else DEFAULT
    turns: list[list[str]] = []
    questions: list[str] = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        conv = data.get("conversation", data)
        for key, value in conv.items():
            if key.startswith("session_") and isinstance(value, list):
                turns += [ts.tokenize(turn["text"]) for turn in value]
        questions += [qa["question"] for qa in data.get("qa", [])[:4]]
    if not turns:
        print(f"no LoCoMo files in {folder}", file=sys.stderr)
        return 2
    filters = [ts.StemFilter(ts.stem(w) for w in ts.query_terms(q)) for q in questions[:20]]
    for f in filters:  # warm the stem cache
        for tokens in turns:
            f.counts(tokens)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for f in filters:
            for tokens in turns:
                f.counts(tokens)
        best = min(best, time.perf_counter() - started)
    mean_tokens = sum(map(len, turns)) / len(turns)
    per_turn = best / (len(filters) * len(turns)) * 1e6
    print(
        f"{ts.__file__}: {per_turn:.2f} us per turn ({len(turns)} turns, {mean_tokens:.0f} tokens on average)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
