"""Convert LoCoMo conversation files into kvcache native conversation files.

Usage: python bench/locomo_to_conversations.py [--captions] OUT_DIR FILE.json [FILE.json ...]

One session per LoCoMo conversation; each dialog turn becomes a message
``"speaker: text"`` with role ``user`` for ``speaker_a`` and ``assistant`` for
``speaker_b``, timestamped with its session's ``session_N_date_time`` (e.g.
"1:56 pm on 8 May, 2023"; turns of one session get one second apart so order is
kept). A kvcache "turn" is a user message and its replies, so the number of turns
is the number of ``speaker_a`` messages (what ``kvcache process`` counts).
Only ``speaker``, ``text`` and the session dates are read; with ``--captions`` also a
shared photo's ``blip_caption``, written as LoCoMo's own evaluation writes it
(``speaker: text [shares a photo of ...]``). Off by default so that figures stay
comparable with the ones issue 18 measured (the captions move keyword R@10 on the dev
split from 0.774 to 0.778: docs/retrieval.md).
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

DATE_RE = re.compile(r"(\d{1,2}):(\d{2})\s*([ap]m)\s+on\s+(\d{1,2})\s+(\w+),?\s+(\d{4})", re.I)


def parse_locomo_date(text: str) -> datetime | None:
    """``"1:56 pm on 8 May, 2023"`` -> ``datetime(2023, 5, 8, 13, 56)``; None if unparsable."""
    match = DATE_RE.search(text or "")
    if not match:
        return None
    hour, minute, ampm, day, month, year = match.groups()
    h = int(hour) % 12 + (12 if ampm.lower() == "pm" else 0)
    try:
        month_no = datetime.strptime(month[:3].title(), "%b").month
        return datetime(int(year), month_no, int(day), h, int(minute))
    except ValueError:
        return None


def session_numbers(conv: dict[str, Any]) -> list[int]:
    nums = [int(m.group(1)) for k in conv if (m := re.fullmatch(r"session_(\d+)", k))]
    return sorted(n for n in nums if isinstance(conv[f"session_{n}"], list))


def turn_text(turn: dict[str, Any], captions: bool = False) -> str:
    """``"speaker: text"``, plus ``" [shares <caption>]"`` when the turn shared a photo.

    LoCoMo's own retrieval evaluation writes a turn that shared a photo the same way
    (snap-research/locomo ``task_eval/dpr_qa.py``: ``'[shares %s]' % blip_caption``): the
    caption is the photo as the conversation's text holds it. The image-search ``query``
    field is how the dataset was generated, not what was said, and is never read.
    """
    text = f"{turn['speaker']}: {turn['text']}"
    caption = str(turn.get("blip_caption") or "").strip()
    return f"{text} [shares {caption}]" if captions and caption else text


def convert(conv: dict[str, Any], session_id: str, captions: bool = False) -> dict[str, Any]:
    """A native kvcache conversation ``{"session_id", "messages"}`` from a LoCoMo dict."""
    if "conversation" in conv and isinstance(conv["conversation"], dict):
        conv = conv["conversation"]
    speaker_a = conv.get("speaker_a")
    messages: list[dict[str, Any]] = []
    for n in session_numbers(conv):
        start = parse_locomo_date(str(conv.get(f"session_{n}_date_time", "")))
        for i, turn in enumerate(conv[f"session_{n}"]):
            role = "user" if turn["speaker"] == speaker_a else "assistant"
            msg: dict[str, Any] = {
                "role": role,
                "content": turn_text(turn, captions),
                "name": turn["speaker"],
            }
            if start is not None:
                msg["timestamp"] = (start + timedelta(seconds=i)).isoformat()
            messages.append(msg)
    return {"session_id": session_id, "messages": messages}


def convert_file(src: Path, out_dir: Path, captions: bool = False) -> tuple[Path, int, int]:
    """Write ``out_dir/<stem>.json``; returns (path, messages, turns)."""
    data = convert(json.loads(src.read_text(encoding="utf-8")), src.stem, captions)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{src.stem}.json"
    target.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    turns = sum(1 for msg in data["messages"] if msg["role"] == "user")
    return target, len(data["messages"]), turns


def main(argv: list[str]) -> int:
    captions = "--captions" in argv
    argv = [arg for arg in argv if arg != "--captions"]
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    out = Path(argv[0])
    total_m = total_t = 0
    for name in argv[1:]:
        path, n_messages, n_turns = convert_file(Path(name), out, captions)
        total_m += n_messages
        total_t += n_turns
        print(f"{path}: {n_messages} messages, {n_turns} turns")
    print(f"total: {total_m} messages, {total_t} turns")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
