"""Keep the fake llama-server faithful: replay recorded requests, compare answer shapes.

Each file in ``tests/fixtures/llama-server/`` is an exact request and response of a real
llama-server (commit 0c1e570). The same request is sent to :class:`FakeLlamaServer`
configured like the recording server; the status must match and the JSON key sets must
match at every level (values differ: the real model is random).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.fake_llama_server import FakeLlamaServer

FIXTURES = Path(__file__).parent / "fixtures" / "llama-server"

# Replayed on one server in the order they were recorded (state carries over).
MAIN_SEQUENCE = [
    "health",
    "slots_initial",
    "chat_completion",
    "slots_after_chat",
    "tokenize",
    "tokenize_with_pieces",
    "detokenize",
    "slot_save",
    "slot_erase",
    "slots_after_erase",
    "slot_restore",
    "slots_after_restore",
    "chat_completion_cached",
    "slots_after_chat2",
    "err_slot_id_out_of_range",
    "err_erase_out_of_range",
    "err_slot_id_negative",
    "err_slot_id_not_int",
    "err_bad_action",
    "err_save_dotdot",
    "err_save_subdir",
    "err_save_empty",
    "err_restore_dotdot",
    "err_save_missing_filename",
    "err_restore_nonexistent",
    "embeddings_single",
    "embeddings_batch",
    "embeddings_base64",
    "chat_after_embeddings",
    "chat_too_long",
    "slots_bad_json",
]

# Errors whose message text the fake reproduces word for word.
EXACT_ERRORS = {
    "err_slot_id_not_int",
    "err_bad_action",
    "err_save_dotdot",
    "err_save_subdir",
    "err_save_empty",
    "err_restore_dotdot",
    "err_save_missing_filename",
    "err_restore_nonexistent",
    "err_slots_action_without_save_path",
    "err_embeddings_without_flag",
    "err_embeddings_pooling_none",
}


@dataclass
class Transcript:
    name: str
    method: str
    path: str  # path + query
    headers: dict[str, str]
    body: bytes
    status: int
    response: Any


def _section(text: str, title: str) -> str:
    start = text.index(f"### {title}\n") + len(f"### {title}\n")
    end = text.find("\n### ", start)
    return text[start : end if end != -1 else len(text)]


def load(name: str) -> Transcript:
    text = (FIXTURES / f"{name}.txt").read_text(encoding="utf-8")
    request = _section(text, "REQUEST").strip("\n")
    head, _, body = request.partition("\n\n")
    first, *header_lines = head.splitlines()
    method, url = first.split(" ", 1)
    parts = urlsplit(url)
    headers = dict(line.split(": ", 1) for line in header_lines if ": " in line)
    status_line = _section(text, "RESPONSE (status + headers)").strip().splitlines()[0]
    raw = _section(text, "RESPONSE BODY (raw, exact)").strip()
    return Transcript(
        name=name,
        method=method,
        path=parts.path + (f"?{parts.query}" if parts.query else ""),
        headers=headers,
        body=body.strip().encode("utf-8"),
        status=int(status_line.split()[1]),
        response=json.loads(raw),
    )


def replay(srv: FakeLlamaServer, t: Transcript) -> tuple[int, Any]:
    resp = requests.request(t.method, srv.url + t.path, data=t.body or None, headers=t.headers, timeout=5)
    return resp.status_code, resp.json()


def shape(value: Any) -> Any:
    """The key structure of a JSON value: dict keys recursively, list items' shapes."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        if value and all(isinstance(v, (int, float)) for v in value):
            return "numbers"
        return [shape(v) for v in value]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def embedding_dim(name: str) -> int:
    return len(load(name).response["data"][0]["embedding"])


@pytest.fixture(scope="module")
def main_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLlamaServer]:
    save = tmp_path_factory.mktemp("slots")
    with FakeLlamaServer(
        n_slots=2,
        n_ctx=256,
        slot_save_path=save,
        embeddings=True,
        embedding_dim=embedding_dim("embeddings_single"),
        pooling="mean",
    ) as srv:
        yield srv


def test_fixtures_are_present() -> None:
    for name in [
        *MAIN_SEQUENCE,
        "minilm_embeddings",
        "slots_fresh_server_after_restore",
    ]:
        assert (FIXTURES / f"{name}.txt").is_file(), name


def test_main_sequence_matches_recorded_shapes(main_server: FakeLlamaServer) -> None:
    answers: dict[str, Any] = {}
    for name in MAIN_SEQUENCE:
        t = load(name)
        status, got = replay(main_server, t)
        answers[name] = got
        assert status == t.status, (name, got)
        assert shape(got) == shape(t.response), name
        if name in EXACT_ERRORS:
            assert got == t.response, name
        elif t.status >= 400:
            assert got["error"]["type"] == t.response["error"]["type"], name
            assert got["error"]["code"] == t.response["error"]["code"], name

    # The relations between answers hold as on the real server.
    saved = answers["slot_save"]["n_saved"]
    assert saved == answers["slots_after_chat"][0]["n_prompt_tokens"] > 0
    assert answers["slot_erase"]["n_erased"] == saved
    assert answers["slots_after_erase"][0]["n_prompt_tokens"] == 0
    assert answers["slot_restore"]["n_restored"] == saved
    assert answers["slot_restore"]["n_read"] == answers["slot_save"]["n_written"]
    assert answers["slots_after_restore"][0]["n_prompt_tokens"] == saved
    cached = answers["chat_completion_cached"]["usage"]["prompt_tokens_details"]
    assert cached["cached_tokens"] > 0
    assert "n_prompt_tokens" not in answers["slots_after_chat"][1]
    # Slot ids wrap around modulo the slot count and are echoed back.
    assert answers["err_slot_id_out_of_range"]["id_slot"] == 99
    assert answers["err_erase_out_of_range"] == {"id_slot": 5, "n_erased": 0}
    assert answers["err_slot_id_negative"] == {"id_slot": -1, "n_erased": 0}
    assert answers["tokenize_with_pieces"]["tokens"][0] == {"id": 1, "piece": "<s>"}
    assert len(answers["tokenize"]["tokens"]) == len(load("tokenize").response["tokens"])


def test_server_without_flags_answers_501(tmp_path: Path) -> None:
    with FakeLlamaServer(slot_save_path=None, embeddings=False) as srv:
        for name in (
            "err_slots_action_without_save_path",
            "err_embeddings_without_flag",
        ):
            t = load(name)
            assert replay(srv, t) == (t.status, t.response)


def test_pooling_none_server(tmp_path: Path) -> None:
    with FakeLlamaServer(pooling="none") as srv:
        t = load("err_embeddings_pooling_none")
        assert replay(srv, t) == (t.status, t.response)
        chat = load("chat_on_embeddings_pooling_none_server")
        status, got = replay(srv, chat)
        assert status == 200
        assert shape(got) == shape(chat.response)


def test_minilm_like_embeddings_are_unit_vectors() -> None:
    t = load("minilm_embeddings")
    real = t.response["data"][0]["embedding"]
    with FakeLlamaServer(embedding_dim=len(real)) as srv:
        status, got = replay(srv, t)
    assert status == 200
    assert shape(got) == shape(t.response)
    assert got["model"] == t.response["model"]
    vec = got["data"][0]["embedding"]
    assert len(vec) == 384
    assert abs(sum(x * x for x in vec) - 1.0) < 1e-6
    assert abs(sum(x * x for x in real) - 1.0) < 1e-4


def test_fresh_slot_after_restore_has_no_prompt_tokens(tmp_path: Path) -> None:
    """A restore on a slot that never ran a task does not add n_prompt_tokens."""
    t = load("slots_fresh_server_after_restore")
    with FakeLlamaServer(slot_save_path=tmp_path) as srv:
        body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "id_slot": 0})
        requests.post(srv.url + "/v1/chat/completions", data=body, timeout=5)
        requests.post(srv.url + "/slots/0?action=save", json={"filename": "s.bin"}, timeout=5)
    with FakeLlamaServer(slot_save_path=tmp_path) as fresh:
        r = requests.post(fresh.url + "/slots/0?action=restore", json={"filename": "s.bin"}, timeout=5)
        assert r.status_code == 200 and r.json()["n_restored"] > 0
        got = requests.get(fresh.url + "/slots", timeout=5).json()
    assert shape(got) == shape(t.response)
