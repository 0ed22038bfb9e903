"""How many LoCoMo evidence turns share a word with their question, and how many are found.

Usage::

    python bench/locomo_cli.py --via inprocess --rows /tmp/rows.json ../shared/bench/locomo-dev/*.json
    python bench/locomo_reach.py /tmp/rows.json ../shared/bench/locomo-dev/*.json

An evidence turn is *lexically reachable* when its text (the speaker's name aside) holds
at least one of the question's ``query_terms`` stems, the words the keyword side searches
for. The others can only be found through context (neighbours, answers to a matching
question, the session date) or by the semantic side. Printed: how many evidence turns are
of each kind, and the share of each found in the top k of the ranked rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from locomo_to_conversations import session_numbers  # noqa: E402

from kvcache_cli.retrieval.textsearch import query_terms, stem_all, tokenize  # noqa: E402


def turn_stems(files: list[Path]) -> dict[tuple[str, str], set[str]]:
    """``{(conversation, dia_id): stems of the turn's text}``."""
    out: dict[tuple[str, str], set[str]] = {}
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        conv = data.get("conversation", data)
        for n in session_numbers(conv):
            for turn in conv[f"session_{n}"]:
                out[(path.stem, str(turn.get("dia_id", "")))] = set(stem_all(tokenize(turn["text"])))
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print((__doc__ or "").strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    rows = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    stems = turn_stems([Path(name) for name in argv[1:]])
    counts = {True: 0, False: 0}
    found = {(kind, k): 0 for kind in (True, False) for k in (1, 5, 10, 20)}
    for row in rows:
        words = set(query_terms(row["q"]))
        for ev in row["ev"]:
            kind = bool(stems.get((row["session"], ev), set()) & words)
            counts[kind] += 1
            for k in (1, 5, 10, 20):
                found[(kind, k)] += ev in row["ranked"][:k]
    total = sum(counts.values())
    for kind, label in ((True, "share a query word"), (False, "share none")):
        shares = "  ".join(f"top {k}: {found[(kind, k)] / max(1, counts[kind]):.3f}" for k in (1, 5, 10, 20))
        print(
            f"{label:20s} {counts[kind]:5d} of {total} ({counts[kind] / max(1, total):.3f})  found {shares}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
