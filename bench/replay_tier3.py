"""Recall and cost of the replay's tier-3 lookup (``session_index``) against ranking every match.

Usage: python bench/replay_tier3.py [FILES...]   (default: the 5 LoCoMo dev conversations)

Stores the conversations as ``bench/locomo.py`` does, builds each session's in-memory
index and asks every LoCoMo question (evidence known, category 5 left out) with
``SessionIndex.search``: first with every match a candidate (which is exactly the
store's ``search_messages``, i.e. ``kvcache retrieve``'s tier 3), then with the
candidate cap and bridge pool ``kvcache process`` uses, and a few others.
Prints recall@5/@10 and milliseconds per question for each setting.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import locomo  # noqa: E402

from kvcache_cli.retrieval.session_index import SessionIndex  # noqa: E402
from kvcache_cli.services.importing import import_file  # noqa: E402
from kvcache_cli.services.retrieve import REPLAY_BRIDGE_TOP, REPLAY_CANDIDATES  # noqa: E402
from kvcache_cli.store.backend import open_store  # noqa: E402

LOCOMO = Path("/work/shared/bench/locomo-dev")
SETTINGS = [(None, 50), (200, 50), (100, 50), (50, 50), (50, 10), (30, 10), (20, 10)]


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or sorted(LOCOMO.glob("*.json"))
    if not files:
        raise SystemExit(f"no LoCoMo files in {LOCOMO}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = open_store(str(folder / "replay.db"))
        dia_of: dict[str, dict[int, str]] = {}
        questions: list[dict] = []
        for path in files:
            key, file, dia, qs = locomo.convert(path, folder)
            import_file(store, file)
            dia_of[key] = dia
            questions += qs
        indexes = {}
        for sid, key in store.query("SELECT id, key FROM sessions"):
            indexes[key] = SessionIndex(sid)
            indexes[key].sync(store)
        print(f"{len(files)} conversations, {len(questions)} questions")
        print(f"{'candidates':>10} {'bridge pool':>11} {'R@5':>6} {'R@10':>6} {'ms/question':>12}")
        for cap, pool in SETTINGS:
            r5 = r10 = 0.0
            started = time.perf_counter()
            for q in questions:
                hits = indexes[q["session"]].search(q["q"], 20, cap or 10**9, bridge_top=pool)
                got = [dia_of[q["session"]].get(h.message_index, "") for h in hits]
                ev = set(q["ev"])
                r5 += len(ev & set(got[:5])) / len(ev)
                r10 += len(ev & set(got[:10])) / len(ev)
            ms = (time.perf_counter() - started) * 1000 / len(questions)
            mark = "  <- kvcache process" if (cap, pool) == (REPLAY_CANDIDATES, REPLAY_BRIDGE_TOP) else ""
            label = "all" if cap is None else str(cap)
            n = len(questions)
            print(f"{label:>10} {pool:>11} {r5 / n:6.3f} {r10 / n:6.3f} {ms:12.2f}{mark}")
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
