"""Conversation file formats: detection, parsing and the errors they name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvcache_cli.errors import BadInputError
from kvcache_cli.loaders import load_file
from tests.helpers import EXAMPLES

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
]


def write(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def test_native_form(tmp_path: Path) -> None:
    data = {
        "session_id": "s1",
        "messages": [dict(MSGS[1], timestamp="2025-01-02T03:04:05Z"), MSGS[2]],
        "kv_entries": [{"key_data": "the budget is 4200 euros", "message_index": 0}],
    }
    [conv] = load_file(write(tmp_path, "n.json", data))
    assert conv.session_key == "s1"
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[0].timestamp is not None and conv.messages[0].timestamp.hour == 3
    assert conv.kv_entries[0]["key_data"] == "the budget is 4200 euros"


def test_bare_openai_list_and_messages_object(tmp_path: Path) -> None:
    [bare] = load_file(write(tmp_path, "b.json", MSGS))
    [wrapped] = load_file(write(tmp_path, "w.json", {"messages": MSGS}))
    assert bare.session_key is None and wrapped.session_key is None
    assert (
        [m.content for m in bare.messages]
        == [m.content for m in wrapped.messages]
        == ["Be brief.", "Hi there", "Hello!"]
    )


def test_openai_content_parts(tmp_path: Path) -> None:
    data = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {}}],
        }
    ]
    [conv] = load_file(write(tmp_path, "p.json", data))
    assert conv.messages[0].content == "look\n[image]"  # a part without a URL is still shown


def test_sharegpt_one_session_per_item() -> None:
    convs = load_file(EXAMPLES / "sharegpt.json")
    assert [c.session_key for c in convs] == [
        "sharegpt-rust-lifetimes",
        "sharegpt-trip-lisbon",
        "sharegpt-sql-window",
    ]
    assert convs[1].messages[0].role == "system"
    assert {m.role for m in convs[0].messages} == {"user", "assistant"}


def test_jsonl_of_conversations_and_of_messages(tmp_path: Path) -> None:
    convs = load_file(EXAMPLES / "openai.jsonl")
    assert [c.session_key for c in convs] == ["jsonl-onboarding", "jsonl-invoice"]
    lines = "\n".join(json.dumps(m) for m in MSGS) + "\n"
    [loose] = load_file(write(tmp_path, "m.jsonl", lines))
    assert len(loose.messages) == 3
    mixed = (
        json.dumps([MSGS[1], MSGS[2]])
        + "\n\n"
        + json.dumps({"conversations": [{"from": "human", "value": "q"}]})
    )
    assert len(load_file(write(tmp_path, "x.jsonl", mixed))) == 2


def test_forced_formats(tmp_path: Path) -> None:
    lines = (json.dumps({"messages": [{"role": "user", "content": f"question {i}"}]}) for i in range(2))
    path = write(tmp_path, "a.txt", "\n".join(lines))
    assert len(load_file(path, "jsonl")) == 2
    assert len(load_file(path)) == 2  # auto: "Extra data" falls back to JSON Lines
    with pytest.raises(BadInputError, match="unknown format"):
        load_file(path, "yaml")


def test_examples_all_load() -> None:
    [support] = load_file(EXAMPLES / "support-chat.json")
    assert sum(1 for m in support.messages if m.role == "user") >= 45
    assert any("```" in m.content for m in support.messages)
    [long] = load_file(EXAMPLES / "long-messages.json")
    assert min(len(m.content) for m in long.messages if m.role != "system") > 1000


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ('{"messages": [\n {"role": "user",\n  "content": "x" oops}]}', r"x\.json:3:\d+: invalid JSON"),
        ('[{"content": "hello"}]', r"messages\[0\]: message has no role"),
        ('[{"role": "user"}]', r"messages\[0\]: message has no content"),
        (
            '[{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]',
            r"messages\[1\]: unknown role 'wizard'",
        ),
        ('[{"role": "user", "content": 5}]', "content must be a string"),
        ('{"foo": 1}', "neither 'messages' nor 'conversations'"),
        ("42", "expected a JSON object or list"),
        ("   \n", "file is empty"),
        (
            '[{"conversations": [{"from": "alien", "value": "x"}]}]',
            r"conversations\[0\]: unknown speaker 'alien'",
        ),
        ('{"session_id": "", "messages": []}', "must not be empty"),
    ],
)
def test_errors_name_the_place(tmp_path: Path, text: str, pattern: str) -> None:
    path = write(tmp_path, "x.json", text)
    with pytest.raises(BadInputError, match=pattern) as info:
        load_file(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_directory_binary_and_utf8(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such file"):
        load_file(tmp_path / "nope.json")
    with pytest.raises(BadInputError, match="is a directory"):
        load_file(tmp_path)
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\x00\x01\x02[]")
    with pytest.raises(BadInputError, match="binary"):
        load_file(binary)
    latin = tmp_path / "l.json"
    latin.write_bytes(b'[{"role": "user", "content": "caf\xe9"}]')
    with pytest.raises(BadInputError, match=r"l\.json:1: invalid UTF-8"):
        load_file(latin)


def test_bom_and_numeric_timestamp(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps([{"role": "user", "content": "a", "timestamp": 0}]).encode()
    )
    [conv] = load_file(path)
    assert conv.messages[0].timestamp is not None and conv.messages[0].timestamp.year == 1970


def test_jsonl_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "e.jsonl", json.dumps({"messages": MSGS}) + "\n" + '{"messages": [}\n')
    with pytest.raises(BadInputError, match=r"e\.jsonl:2:\d+: invalid JSON"):
        load_file(path)
    path = write(
        tmp_path,
        "r.jsonl",
        json.dumps({"messages": MSGS}) + "\n" + json.dumps({"messages": [{"role": "x", "content": "y"}]}),
    )
    with pytest.raises(BadInputError, match=r"r\.jsonl:2: messages\[0\]: unknown role"):
        load_file(path)


def test_bad_kv_entry_field_is_refused_at_load_time(tmp_path: Path) -> None:
    import json as _json

    from kvcache_cli.errors import BadInputError
    from kvcache_cli.loaders import load_file

    path = tmp_path / "kv.json"
    path.write_text(
        _json.dumps(
            {
                "session_id": "kv",
                "messages": [{"role": "user", "content": "hello"}],
                "kv_entries": [{"key_data": "x", "message_index": 5, "layer_index": "deep"}],
            }
        )
    )
    with pytest.raises(BadInputError, match=r"kv_entries\[0\]\.layer_index"):
        load_file(path)


def test_kv_entry_without_key_data_or_text_is_refused(tmp_path: Path) -> None:
    data = {
        "session_id": "kv",
        "messages": [{"role": "user", "content": "hello"}],
        "kv_entries": [{"text": "ok"}, {"key_hash": "abc", "message_index": 0}],
    }
    path = write(tmp_path, "kv.json", data)
    with pytest.raises(BadInputError, match=r"kv_entries\[1\]: needs 'key_data' or 'text'"):
        load_file(path)


def test_forced_sharegpt_on_json_lines(tmp_path: Path) -> None:
    from kvcache_cli.loaders import iter_file

    items = [
        {"id": f"g{i}", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
        for i in range(2)
    ]
    text = "\n".join(json.dumps(item) for item in items) + "\n"
    for name in ("share.jsonl", "share.txt"):  # by extension, and by content
        path = write(tmp_path, name, text)
        for loaded in (load_file(path, "sharegpt"), list(iter_file(path, "sharegpt"))):
            assert [c.session_key for c in loaded] == ["g0", "g1"]
            assert [m.role for m in loaded[0].messages] == ["user", "assistant"]
    bad = write(tmp_path, "bad.jsonl", json.dumps({"messages": MSGS}) + "\n")
    with pytest.raises(BadInputError, match=r"bad\.jsonl:1"):
        load_file(bad, "sharegpt")
