"""Input people have (issue 17, item 3): roles, encodings, stdin, media parts, ShareGPT's
``system``, forced formats that refuse other forms, empty files and request logs."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from kvcache_cli.cli.app import app
from kvcache_cli.errors import BadInputError
from kvcache_cli.loaders import iter_file, load_file

MSGS = [
    {"role": "developer", "content": "Answer in French."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Bonjour"},
]


def write(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def cli(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=stdin, env={"COLUMNS": "200"})


def stored_messages(db: Path, session: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT m.role, m.content FROM messages m JOIN sessions s ON s.id = m.session_id "
            "WHERE s.key = ? ORDER BY m.message_index",
            (session,),
        ).fetchall()


def test_developer_role_is_kept_and_treated_as_system(tmp_path: Path) -> None:
    [conv] = load_file(write(tmp_path / "d.json", MSGS))
    assert [m.role for m in conv.messages] == ["developer", "user", "assistant"]
    db = tmp_path / "kv.db"
    result = cli("--db", str(db), "-q", "process", "--session", "dev", str(tmp_path / "d.json"))
    assert result.exit_code == 0, result.stderr
    assert stored_messages(db, "dev")[0] == ("developer", "Answer in French.")
    with sqlite3.connect(db) as conn:  # a system-like message is a system-prompt entry
        kinds = conn.execute("SELECT key_type FROM cache_entries ORDER BY message_index").fetchall()
    assert kinds[0] == ("system_prompt",)


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_utf16_and_utf32_with_a_bom(tmp_path: Path, codec: str, suffix: str) -> None:
    text = json.dumps({"messages": MSGS}, ensure_ascii=False).replace("Bonjour", "Bonjour ☕")
    path = tmp_path / f"wide{suffix}"
    bom = {
        "utf-16": "",  # Python's utf-16 / utf-32 codecs write a little-endian BOM themselves
        "utf-32": "",
        "utf-16-be": "\ufeff",
        "utf-32-be": "\ufeff",
    }[codec]
    path.write_bytes((bom + text + "\n").encode(codec))
    for loaded in (load_file(path), list(iter_file(path))):
        assert [m.content for m in loaded[0].messages][-1] == "Bonjour ☕"


def test_utf16_without_a_bom_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "nobom.json"
    path.write_bytes(json.dumps(MSGS).encode("utf-16-le"))
    with pytest.raises(BadInputError, match="byte-order mark"):
        load_file(path)


def test_dash_reads_standard_input_for_process_and_import(tmp_path: Path) -> None:
    db = tmp_path / "kv.db"
    data = json.dumps({"session_id": "piped", "messages": MSGS})
    result = cli("--db", str(db), "-q", "process", "-", stdin=data)
    assert result.exit_code == 0, result.stderr
    assert [c for _, c in stored_messages(db, "piped")] == ["Answer in French.", "Hello", "Bonjour"]
    lines = "\n".join(json.dumps({"id": f"imp{i}", "messages": MSGS}) for i in range(2)) + "\n"
    result = cli("--db", str(db), "import", "--json", "-", stdin=lines)  # read twice: validate, store
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["messages_added"] == 6
    assert len(stored_messages(db, "imp1")) == 3
    result = cli("--db", str(db), "process", "-", stdin="[{oops")
    assert result.exit_code == 2 and "<stdin>:1:" in result.stderr


def test_media_parts_become_visible_placeholders(tmp_path: Path) -> None:
    png = "data:image/png;base64," + "A" * 5000
    data = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        },
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}]},
        {
            "role": "user",
            "content": [{"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}}],
        },
    ]
    [conv] = load_file(write(tmp_path / "m.json", data))
    first, image_only, audio = (m.content for m in conv.messages)
    assert first == "What is this?\n[image: https://example.com/cat.jpg]"
    assert image_only.startswith("[image: data:image/png;base64") and len(image_only) < 100
    assert "5000" in image_only  # the size of what was left out is said
    assert audio == "[audio: wav data]"


def test_sharegpt_top_level_system_is_the_first_message(tmp_path: Path) -> None:
    data = [
        {
            "system": "You are a pirate.",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "arr"}],
        }
    ]
    [conv] = load_file(write(tmp_path / "lf.json", data))
    assert [(m.role, m.content) for m in conv.messages] == [
        ("system", "You are a pirate."),
        ("user", "hi"),
        ("assistant", "arr"),
    ]


SHAREGPT = [{"conversations": [{"from": "human", "value": "hi"}]}]


@pytest.mark.parametrize(
    ("fmt", "data", "found"),
    [
        ("sharegpt", MSGS, "found a list of OpenAI messages"),
        ("sharegpt", {"messages": MSGS}, "found an object with 'messages'"),
        ("native", SHAREGPT, "found a ShareGPT list"),
        ("native", SHAREGPT[0], "found a ShareGPT item"),
        ("openai", SHAREGPT, "found a ShareGPT list"),
    ],
)
def test_a_forced_format_refuses_other_forms(tmp_path: Path, fmt: str, data: object, found: str) -> None:
    path = write(tmp_path / "f.json", data)
    with pytest.raises(BadInputError, match=f"--format {fmt} expects .*{found}") as info:
        load_file(path, fmt)
    assert str(path) in str(info.value)


def test_an_object_of_neither_form_says_what_it_has(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"neither 'messages' nor 'conversations' .*'model', 'prompt'"):
        load_file(write(tmp_path / "x.json", {"model": "m", "prompt": "p"}))


def test_a_file_without_conversations_says_so(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.json", "[]")
    db = tmp_path / "kv.db"
    for command in ("process", "import"):
        result = cli("--db", str(db), command, str(empty))
        assert result.exit_code == 0, result.stderr
        assert f"{empty}: no conversations" in result.stderr


def request_log(tmp_path: Path) -> Path:
    """A chat-completions request log: each request repeats the history so far."""
    history: list[dict[str, str]] = [{"role": "system", "content": "Be brief."}]
    lines = []
    for turn in range(3):
        history.append({"role": "user", "content": f"question {turn}"})
        reply = {"role": "assistant", "content": f"answer {turn}"}
        lines.append({"model": "m", "messages": list(history), "response": {"choices": [{"message": reply}]}})
        history.append(reply)
    other = [{"role": "user", "content": "another chat"}]
    lines.append({"model": "m", "messages": other})
    return write(tmp_path / "requests.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n")


def test_a_request_log_is_one_conversation_per_chat(tmp_path: Path) -> None:
    path = request_log(tmp_path)
    for loaded in (load_file(path), list(iter_file(path))):
        assert len(loaded) == 2
        assert [m.content for m in loaded[0].messages] == [
            "Be brief.",
            "question 0",
            "answer 0",
            "question 1",
            "answer 1",
            "question 2",
            "answer 2",  # the last reply comes from the line's response
        ]
        assert [m.content for m in loaded[1].messages] == ["another chat"]
    db = tmp_path / "kv.db"
    result = cli("--db", str(db), "-q", "process", str(path))
    assert result.exit_code == 0, result.stderr
    assert len(stored_messages(db, "requests-1")) == 7 and len(stored_messages(db, "requests-2")) == 1


def test_responses_api_and_anthropic_image_parts(tmp_path: Path) -> None:
    data = [
        {
            "role": "user",
            "content": [
                {"type": "input_image", "image_url": "https://example.com/a.png"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "input_file", "input_file": {"filename": "report.pdf"}},
            ],
        }
    ]
    [conv] = load_file(write(tmp_path / "r.json", data))
    assert conv.messages[0].content.splitlines() == [
        "[image: https://example.com/a.png]",
        "[image: image/png data]",
        "[file: report.pdf]",
    ]
