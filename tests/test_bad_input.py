"""Issue 5.4: the bad-input corpus (``tests/bad_inputs``) and big or changing files.

Each bad file gets one stderr line naming the file and the place (line and column for
JSON) and exit 2, and nothing of it is written, while the other files of the same run
are still processed. Good-but-odd files (a BOM, duplicate session ids, a file that is
extended between runs, a 50 MB message, 100,000 messages) are processed correctly.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest

from kvcache_cli.errors import BadInputError
from kvcache_cli.loaders import load_file
from tests.helpers import connect, integrity, invoke, logical_state, uniform_conversation, write_json

CORPUS = Path(__file__).parent / "bad_inputs"
FULL = os.environ.get("KVCACHE_FULL_CORPUS") == "1"  # 100,000 messages end to end (about 35 s)

# file -> the place and reason its one error line must carry
BAD = {
    "truncated.json": r"truncated\.json:1:\d+: invalid JSON",
    "bad_line.jsonl": r"bad_line\.jsonl:3:29: invalid JSON",
    "top_number.json": r"top_number\.json: expected a JSON object or list, not number",
    "top_string.json": r"top_string\.json: expected a JSON object or list, not string",
    "messages_not_list.json": r"messages_not_list\.json: messages: messages must be a list",
    "message_not_object.json": r"message_not_object\.json: messages\[1\]: a message must be an object",
    "session_id_wrong_type.json": r"session_id_wrong_type\.json: session_id: must be a string",
    "role_wrong_type.json": r"role_wrong_type\.json: messages\[0\]: role must be a string",
    "timestamp_wrong_type.json": r"timestamp_wrong_type\.json: messages\[0\]\.timestamp: ",
    "no_role.json": r"no_role\.json: messages\[0\]: message has no role",
    "no_content.json": r"no_content\.json: messages\[1\]: message has no content",
    "unknown_role.json": r"unknown_role\.json: messages\[0\]: unknown role 'wizard'",
    "content_number.json": r"content_number\.json: messages\[0\]: content must be a string",
    "content_object.json": r"content_object\.json: messages\[0\]: content must be a string",
    "invalid_utf8.json": r"invalid_utf8\.json:2: invalid UTF-8 at byte 76 \(column 50",
    "empty.json": r"empty\.json: file is empty",
    "binary.json": r"binary\.json: binary file, not JSON",
}
GOOD = {"good.json": "good-plain", "bom.json": "good-bom"}


@pytest.mark.parametrize("name", sorted(BAD))
def test_loader_names_file_and_place(name: str) -> None:
    with pytest.raises(BadInputError) as info:
        load_file(CORPUS / name)
    text = str(info.value)
    assert "\n" not in text
    assert re.search(BAD[name], text), text


def _sessions(db: Path) -> dict[str, int]:
    conn = connect(db)
    try:
        return dict(
            conn.execute(
                "SELECT s.key, count(m.id) FROM sessions s LEFT JOIN messages m ON m.session_id = s.id GROUP BY s.key"  # noqa: E501
            ).fetchall()
        )
    finally:
        conn.close()


def test_one_run_over_the_whole_corpus(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = tmp_path / "kv.db"
    folder = tmp_path / "a_directory.json"
    folder.mkdir()
    missing = tmp_path / "missing.json"
    args = [str(CORPUS / "good.json")]
    args += [str(CORPUS / n) for n in sorted(BAD)] + [str(folder), str(missing), str(CORPUS / "bom.json")]
    result = invoke("-q", "--db", str(db), "process", *args, home=home)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(BAD) + 2, result.stderr
    assert "Traceback" not in result.stderr
    for name, pattern in BAD.items():
        assert sum(1 for line in lines if re.search(pattern, line)) == 1, (name, result.stderr)
    assert any(f"{folder}: is a directory" in line for line in lines)
    assert any(f"{missing}: no such file" in line for line in lines)
    assert all(line.startswith("kvcache: error: ") for line in lines)
    assert _sessions(db) == {"good-plain": 2, "good-bom": 2}  # nothing of a bad file was written


def test_duplicate_session_ids_across_files_in_one_run(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = tmp_path / "kv.db"
    names = ("dup_first.json", "dup_extends.json", "dup_rewrites.json")
    result = invoke("--db", str(db), "process", "--json", *(str(CORPUS / n) for n in names), home=home)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "dup_rewrites.json" in lines[0] and "message 1 differs" in lines[0], lines
    report = json.loads(result.stdout)
    assert [(s["source"].rsplit("/", 1)[-1], s["messages_added"]) for s in report["sessions"]] == [
        ("dup_first.json", 2),
        ("dup_extends.json", 2),
    ]
    assert _sessions(db) == {"dup": 4}


def test_file_extended_then_rewritten_between_runs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = tmp_path / "kv.db"
    data = uniform_conversation("grow", 6)
    src = write_json(
        tmp_path / "grow.json", {"session_id": "grow", "messages": data["messages"][:6]}, compact=True
    )
    assert invoke("-q", "--db", str(db), "process", str(src), home=home).returncode == 0
    write_json(src, data, compact=True)  # extended: only the new turns are replayed
    again = invoke("--db", str(db), "process", "--json", str(src), home=home)
    assert again.returncode == 0, again.stderr
    session = json.loads(again.stdout)["sessions"][0]
    assert (session["messages_added"], session["turns_processed"]) == (6, 3)
    before = logical_state(db)
    rewritten = json.loads(json.dumps(data))
    rewritten["messages"][4]["content"] = "an edited question?"
    write_json(src, rewritten, compact=True)
    refused = invoke("--db", str(db), "process", str(src), home=home)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert "grow.json" in refused.stderr and "message 4 differs" in refused.stderr
    assert logical_state(db) == before


def test_multi_conversation_file_with_a_conflict_writes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = tmp_path / "kv.db"
    first = write_json(tmp_path / "b.json", uniform_conversation("b", 2), compact=True)
    assert invoke("-q", "--db", str(db), "process", str(first), home=home).returncode == 0
    changed = uniform_conversation("b", 2)
    changed["messages"][1]["content"] = "rewritten answer"
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps(uniform_conversation("a", 3)) + "\n" + json.dumps(changed) + "\n")
    result = invoke("-q", "--db", str(db), "process", str(both), home=home)
    assert result.returncode == 2 and "message 1 differs" in result.stderr
    assert "a" not in _sessions(db)


@pytest.mark.slow
def test_fifty_megabyte_single_message(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = tmp_path / "kv.db"
    text = "lorem ipsum dolor sit amet consectetur " * (50 * 1024 * 1024 // 39)
    src = write_json(
        tmp_path / "big.json",
        {"session_id": "big", "messages": [{"role": "user", "content": text}]},
        compact=True,
    )
    assert src.stat().st_size >= 50 * 1024 * 1024
    started = time.monotonic()
    result = invoke("-q", "--db", str(db), "process", "--json", str(src), home=home)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    conn = connect(db)
    try:
        assert conn.execute("SELECT length(content) FROM messages").fetchall() == [(len(text),)]
    finally:
        conn.close()
    assert integrity(db) == "ok"
    print(f"\n50 MB message: {elapsed:.1f}s")


def _many_messages(path: Path, count: int, per_turn: int) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(count):
            role = "user" if i % per_turn == 0 else ("assistant" if i % 2 else "tool")
            handle.write(
                json.dumps({"role": role, "content": f"message {i} about item{i % 977} and topic{i % 31}"})
                + "\n"
            )


@pytest.mark.slow
def test_hundred_thousand_messages_load(tmp_path: Path) -> None:
    src = tmp_path / "many.jsonl"
    _many_messages(src, 100_000, 2)  # 50,000 turns
    started = time.monotonic()
    convs = load_file(src)
    assert [len(c.messages) for c in convs] == [100_000]
    print(f"\n100,000 messages loaded and validated in {time.monotonic() - started:.1f}s")


@pytest.mark.slow
def test_many_messages_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = tmp_path / "kv.db"
    count = 100_000 if FULL else 20_000
    src = tmp_path / "many.jsonl"
    _many_messages(src, count, 1000)
    started = time.monotonic()
    result = invoke("-q", "--db", str(db), "process", "--session", "many", str(src), home=home)
    assert result.returncode == 0, result.stderr
    assert _sessions(db) == {"many": count}
    conn = sqlite3.connect(str(db))
    assert conn.execute("SELECT turn_count FROM sessions").fetchone() == (count // 1000,)
    conn.close()
    print(f"\n{count} messages in {count // 1000} turns: {time.monotonic() - started:.1f}s")
