"""Compare Python Porter stemmers with SQLite FTS5's ``porter`` tokenizer (not a test).

Usage: python bench/stemmer_compare.py FILES...  (LoCoMo files or native conversations)

The vocabulary is every ``unicode61`` token (``textsearch.tokenize``) of the turns'
text. FTS5's stem of each word is read back through an ``fts5vocab`` ``instance``
table (one word per row), then compared with ``textsearch.stem`` (ours),
snowballstemmer's ``porter`` and PyStemmer's ``porter`` (each when installed).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvcache_cli.retrieval import textsearch as ts  # noqa: E402


def texts(path: Path) -> list[str]:
    data: Any = json.loads(path.read_text(encoding="utf-8"))
    conv = data.get("conversation", data)
    if "messages" in conv:
        return [str(m.get("content", "")) for m in conv["messages"]]
    return [
        str(t.get("text", ""))
        for k, v in conv.items()
        if k.startswith("session_") and isinstance(v, list)
        for t in v
    ]


def fts5_stems(words: list[str]) -> dict[str, str]:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE VIRTUAL TABLE w USING fts5(x, tokenize='porter unicode61 remove_diacritics 2')")
    db.execute("CREATE VIRTUAL TABLE v USING fts5vocab(w, 'instance')")
    db.executemany("INSERT INTO w(rowid, x) VALUES (?, ?)", list(enumerate(words, 1)))
    return {words[doc - 1]: term for term, doc in db.execute("SELECT term, doc FROM v")}


def main(argv: list[str]) -> int:
    vocab = sorted({tok for f in argv for text in texts(Path(f)) for tok in ts.tokenize(text)})
    ref = fts5_stems(vocab)
    stemmers: dict[str, Any] = {"textsearch.stem": ts.stem}
    try:
        import snowballstemmer

        stemmers["snowballstemmer porter"] = snowballstemmer.stemmer("porter").stemWord
    except ImportError:
        pass
    try:
        import Stemmer

        stemmers["PyStemmer porter"] = Stemmer.Stemmer("porter").stemWord
    except ImportError:
        pass
    print(f"{len(vocab)} distinct words")
    for name, fn in stemmers.items():
        diff = [(w, ref[w], fn(w)) for w in vocab if fn(w) != ref.get(w)]
        print(f"{name}: {len(vocab) - len(diff)} / {len(vocab)} identical to FTS5 porter; {len(diff)} differ")
        for w, a, b in diff[:40]:
            print(f"   {w}: fts5 {a!r}  {name.split()[0]} {b!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
