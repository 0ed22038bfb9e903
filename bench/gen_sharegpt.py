"""Generate a deterministic ShareGPT JSON Lines file for the import benchmarks.

Usage: python bench/gen_sharegpt.py OUT.jsonl MESSAGES [CONVERSATIONS]

Each line ``{"id": "conv-N", "conversations": [{"from": "human"|"gpt", "value": ...}]}``;
messages alternate human/gpt, 8..60 words each (about 40 on average) drawn from a
Zipf-like vocabulary of 20,000 words, so the full-text index sees a realistic spread
of frequent and rare terms. The same arguments always give the same bytes.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

COMMON = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or "
    "had by hot word but what some we can out other were all there when up use your how said an each she "
    "which do their time if will way about many then them write would like so these her long make thing see "
    "him two has look more day could go come did number sound no most people my over know water than call "
    "first who may down side been now find any new work part take get place made live where after back "
    "little only round man year came show every good me give our under name very through just form sentence "
    "great think say help low line differ turn cause much mean before move right boy old too same tell does "
    "set three want air well also play small end put home read hand port large spell add even land here must "
    "big high such follow act why ask men change went light kind off need house picture try us again animal "
    "point mother world near build self earth father cache memory server model token query index database"
).split()


def vocabulary(size: int = 20_000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = list(COMMON)
    seen = set(words)
    while len(words) < size:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 10)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def generate(out: Path, messages: int, conversations: int = 2000, seed: int = 1) -> Path:
    """Write ``messages`` messages in ``conversations`` conversations to ``out``."""
    rng = random.Random(seed)
    words = vocabulary()
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    cum: list[float] = []
    total = 0.0
    for w in weights:
        total += w
        cum.append(total)
    per = messages // conversations
    extra = messages - per * conversations
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".part")
    with tmp.open("w", encoding="utf-8") as handle:
        for c in range(conversations):
            n = per + (1 if c < extra else 0)
            sample = rng.choices(words, cum_weights=cum, k=n * 40)
            turns = []
            pos = 0
            for i in range(n):
                length = rng.randint(8, 72)
                text = " ".join(sample[pos % len(sample) : pos % len(sample) + length]) or "ok"
                pos += length
                if i % 2 == 0:
                    text = text[0].upper() + text[1:] + "?"
                turns.append({"from": "human" if i % 2 == 0 else "gpt", "value": text})
            handle.write(json.dumps({"id": f"conv-{c + 1}", "conversations": turns}) + "\n")
    tmp.replace(out)
    return out


def cached(messages: int, conversations: int = 2000) -> Path:
    """The generated file in a cache folder (``$TMPDIR/kvbench-data``), made once."""
    import os

    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "kvbench-data"
    path = folder / f"sharegpt-{messages}-{conversations}.jsonl"
    if not path.exists():
        generate(path, messages, conversations)
    return path


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        sys.exit(2)
    generate(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2000)
