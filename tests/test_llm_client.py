"""The LLM client against a real local HTTP server that answers like llama-server.

No mocking of ``requests``: every test talks HTTP to :class:`FakeLlamaServer`.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_cli.errors import BadInputError, ConfigError, ServerError
from kvcache_cli.llm.client import (
    EmbeddingBatch,
    LLMClient,
    LLMSettings,
    SlotInfo,
    SlotRestoreResult,
    SlotSaveResult,
    make_slot_filename,
    validate_slot_filename,
)
from kvcache_cli.llm.summarize import build_summary_messages, summarize
from tests.fake_llama_server import FakeLlamaServer, embed_text, validate_filename

SECRET = "sk-test-Zq9Xv7Lm3Np1Rt5"
KEY_ENV = "KVCACHE_TEST_LLM_KEY"

SYSTEM_FIRST = (
    "You are a concise summarizer. Summarize the following conversation into key facts, "
    "decisions, code snippets, and figures. Be brief — target under 300 tokens. "
    "No commentary."
)
SYSTEM_UPDATE_HEAD = (
    "You are a concise summarizer. You will be given a running summary of a conversation "
    "followed by new messages that have occurred since that summary. Produce a single "
    "updated summary that covers EVERYTHING — the prior summary and the new messages "
    "combined. Be brief (target under 400 tokens). Include key facts, decisions, code, "
    "numbers, and names. No commentary.\n\n"
    "PRIOR SUMMARY (covers everything before these new messages):\n"
)
USER_FIRST = "Please summarize the above conversation now."
USER_UPDATE = (
    "Please produce the updated cumulative summary now, covering both the prior summary "
    "and these new messages."
)


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[FakeLlamaServer]:
    save = tmp_path / "slots"
    save.mkdir()
    with FakeLlamaServer(n_slots=2, n_ctx=256, slot_save_path=save, embedding_dim=384) as s:
        yield s


def make_client(url: str, **overrides: Any) -> LLMClient:
    values: dict[str, Any] = {
        "base_url": url,
        "connect_timeout": 1.0,
        "read_timeout": 2.0,
        "retries": 2,
        "backoff": 0.01,
    }
    values.update(overrides)
    return LLMClient(LLMSettings(**values))


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def posts(srv: FakeLlamaServer) -> list[str]:
    return [r.raw_path for r in srv.requests if r.method == "POST"]


def chat_bodies(srv: FakeLlamaServer) -> list[Any]:
    return [r.body for r in srv.requests if r.path == "/v1/chat/completions"]


# --------------------------------------------------------------------- basics


def test_importing_the_module_does_not_import_requests() -> None:
    code = "import sys, kvcache_cli.llm.client; sys.exit('requests' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


def test_settings_defaults() -> None:
    s = LLMSettings(base_url="http://h:1")
    assert s.embeddings_url == "http://h:1"
    assert (s.model, s.connect_timeout, s.read_timeout, s.retries) == (
        "default",
        3.0,
        120.0,
        2,
    )
    assert (s.backoff, s.summary_max_tokens, s.embedding_batch_size) == (0.5, 512, 32)
    other = LLMSettings(base_url="http://a:1", embeddings_url="http://b:2")
    assert other.embeddings_url == "http://b:2"


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigError):
        LLMClient(LLMSettings())
    with pytest.raises(ConfigError):
        LLMClient(LLMSettings(base_url="ftp://example.org"))
    with pytest.raises(ConfigError):
        LLMClient(LLMSettings(base_url="http://h:1", retries=-1))


def test_health(srv: FakeLlamaServer) -> None:
    with make_client(srv.url) as client:
        assert client.health() == {"status": "ok"}
    assert srv.count("GET", "/health") == 1


def test_base_url_with_v1_suffix_and_slash(srv: FakeLlamaServer) -> None:
    client = make_client(srv.url + "/v1/")
    assert client.chat([{"role": "user", "content": "hi there"}])
    assert srv.requests[-1].path == "/v1/chat/completions"


def test_keep_alive_reuses_one_connection(srv: FakeLlamaServer) -> None:
    client = make_client(srv.url)
    client.health()
    client.health()
    client.tokenize(["a b c"])
    client.tokenize(["d e"])
    assert srv.request_count == 4
    assert len({r.client_port for r in srv.requests}) == 1


# --------------------------------------------------------------------- chat


def test_chat_returns_content_and_sends_openai_payload(srv: FakeLlamaServer) -> None:
    client = make_client(srv.url, model="my-model")
    msgs = [{"role": "user", "content": "Tell me about the weather in Paris"}]
    text = client.chat(msgs, max_tokens=64, temperature=0.1)
    assert text.startswith("Summary of 1 messages") and "paris" in text
    body = chat_bodies(srv)[-1]
    assert body == {
        "model": "my-model",
        "messages": msgs,
        "temperature": 0.1,
        "stream": False,
        "max_tokens": 64,
    }
    assert "max_tokens" not in (client.chat(msgs) and chat_bodies(srv)[-1])


def test_chat_on_a_slot_checks_it_and_fills_it(srv: FakeLlamaServer) -> None:
    client = make_client(srv.url)
    client.chat([{"role": "user", "content": "fill slot one please"}], slot_id=1)
    assert chat_bodies(srv)[-1]["id_slot"] == 1
    slots = client.slots()
    assert slots[1].n_prompt_tokens and slots[1].n_prompt_tokens > 0
    assert slots[0].n_prompt_tokens is None
    with pytest.raises(BadInputError, match="slot 2 does not exist"):
        client.chat([{"role": "user", "content": "x"}], slot_id=2)
    assert len(chat_bodies(srv)) == 1


@pytest.mark.parametrize(
    "answer",
    [
        {"choices": []},
        {"choices": [{"message": {"content": None}}]},
        {"nope": 1},
        [1, 2],
    ],
)
def test_chat_malformed_answer(srv: FakeLlamaServer, answer: Any) -> None:
    srv.fail_next(200, answer)
    with pytest.raises(ServerError, match=r"POST /v1/chat/completions gave an unexpected"):
        make_client(srv.url).chat([{"role": "user", "content": "hi"}])


def test_chat_too_long_has_hint(srv: FakeLlamaServer) -> None:
    with pytest.raises(ServerError) as info:
        make_client(srv.url).chat([{"role": "user", "content": "hello world " * 200}])
    msg = str(info.value)
    assert "400 exceed_context_size_error" in msg and "larger -c" in msg
    assert srv.count("POST", "/v1/chat/completions") == 1


# --------------------------------------------------------------------- embeddings


def test_embed_batches_in_order(srv: FakeLlamaServer) -> None:
    texts = [f"text number {i} about topic {i % 7}" for i in range(70)]
    client = make_client(srv.url, embedding_model="minilm", embedding_batch_size=32)
    batch = client.embed(texts)
    assert isinstance(batch, EmbeddingBatch)
    assert srv.count("POST", "/v1/embeddings") == 3
    sizes = [len(r.body["input"]) for r in srv.requests if r.path == "/v1/embeddings"]
    assert sizes == [32, 32, 6]
    assert all(r.body["model"] == "minilm" for r in srv.requests)
    assert batch.dim == 384 and batch.model == "minilm" and len(batch.vectors) == 70
    for text, vec in zip(texts, batch.vectors, strict=True):
        assert vec == pytest.approx(embed_text(text, 384))


def test_embed_similar_texts_are_closer(srv: FakeLlamaServer) -> None:
    a, b, c = (
        make_client(srv.url)
        .embed(
            [
                "the cat sat on the mat",
                "a cat sat on a mat",
                "quarterly revenue grew strongly",
            ]
        )
        .vectors
    )

    def cos(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y, strict=True))

    assert cos(a, b) > cos(a, c) + 0.2
    assert math.isclose(cos(a, a), 1.0, rel_tol=1e-9)


def test_embed_model_name_falls_back_to_server_answer(srv: FakeLlamaServer) -> None:
    batch = make_client(srv.url, model="chat-model").embed(["hello"])
    assert batch.model == "chat-model"  # the server echoes the requested model
    srv.fail_next(200, {"data": [{"embedding": [1.0, 0.0], "index": 0}]})
    assert make_client(srv.url, model="m2").embed(["x"]).model == "m2"


def test_embed_empty_list_makes_no_request(srv: FakeLlamaServer) -> None:
    assert make_client(srv.url).embed([]) == EmbeddingBatch(vectors=[], model="default", dim=0)
    assert srv.request_count == 0


def test_embed_sorts_by_index_and_decodes_base64(srv: FakeLlamaServer) -> None:
    srv.fail_next(
        200,
        {
            "model": "m",
            "data": [
                {"embedding": [0.0, 1.0], "index": 1},
                {"embedding": "AACAPwAAAAA=", "index": 0, "encoding_format": "base64"},
            ],
        },
    )
    batch = make_client(srv.url).embed(["first", "second"])
    assert batch.vectors == [[1.0, 0.0], [0.0, 1.0]] and batch.dim == 2


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (
            {
                "data": [
                    {"embedding": [1.0, 0.0], "index": 0},
                    {"embedding": [1.0], "index": 1},
                ]
            },
            "dimensions differ",
        ),
        ({"data": [{"embedding": [1.0], "index": 0}]}, "expected 2 embeddings"),
        (
            {
                "data": [
                    {"embedding": ["x"], "index": 0},
                    {"embedding": [1], "index": 1},
                ]
            },
            "numbers",
        ),
        ({"result": []}, "no 'data' list"),
    ],
)
def test_embed_malformed_answers(srv: FakeLlamaServer, answer: Any, why: str) -> None:
    srv.fail_next(200, answer)
    with pytest.raises(ServerError, match=why):
        make_client(srv.url).embed(["a", "b"])


def test_embed_dimension_checked_across_batches(srv: FakeLlamaServer) -> None:
    srv.fail_next(200, {"data": [{"embedding": [1.0, 0.0], "index": 0}]})
    with pytest.raises(ServerError, match=r"dimensions differ \(2 and 384\)"):
        make_client(srv.url, embedding_batch_size=1).embed(["a", "b"])


def test_embed_without_embeddings_flag_has_hint() -> None:
    with FakeLlamaServer(embeddings=False) as srv, pytest.raises(ServerError) as info:
        make_client(srv.url).embed(["hello"])
    msg = str(info.value)
    assert f"llama-server at {srv.url}: POST /v1/embeddings failed: 501 not_supported_error" in msg
    assert "start llama-server with --embeddings" in msg
    assert srv.request_count == 1  # 501 is not retried


def test_embed_pooling_none_has_hint() -> None:
    with FakeLlamaServer(pooling="none") as srv, pytest.raises(ServerError) as info:
        make_client(srv.url).embed(["hello"])
    assert "Pooling type 'none'" in str(info.value)
    assert "--pooling mean" in str(info.value)
    assert srv.request_count == 1


def test_embeddings_url_can_be_another_server(srv: FakeLlamaServer) -> None:
    with FakeLlamaServer(embedding_dim=8) as emb:
        client = make_client(srv.url, embeddings_url=emb.url)
        assert client.embed(["hi"]).dim == 8
        assert emb.count("POST", "/v1/embeddings") == 1
    assert srv.request_count == 0


# --------------------------------------------------------------------- tokenize


def test_tokenize_counts_and_caches(srv: FakeLlamaServer) -> None:
    client = make_client(srv.url)
    assert client.tokenize(["Hello, how are you today?", "one two", "one two"]) == [
        7,
        2,
        2,
    ]
    assert srv.count("POST", "/tokenize") == 2
    assert [r.body for r in srv.requests] == [
        {"content": "Hello, how are you today?"},
        {"content": "one two"},
    ]
    assert client.tokenize(["one two", "Hello, how are you today?"]) == [2, 7]
    assert srv.count("POST", "/tokenize") == 2
    assert client.tokenize([]) == []


# --------------------------------------------------------------------- slots


def test_slots_shapes(srv: FakeLlamaServer) -> None:
    client = make_client(srv.url)
    assert client.slots() == [
        SlotInfo(id=0, n_ctx=256, n_prompt_tokens=None, is_processing=False),
        SlotInfo(id=1, n_ctx=256, n_prompt_tokens=None, is_processing=False),
    ]
    client.chat([{"role": "user", "content": "Hello, how are you today?"}], slot_id=0)
    slot0 = client.check_slot(0)
    assert slot0.n_prompt_tokens == srv.slot_tokens(0) > 0


def test_save_erase_restore_round_trip(srv: FakeLlamaServer) -> None:
    assert srv.slot_save_path is not None
    client = make_client(srv.url)
    client.chat([{"role": "user", "content": "remember the number 42 please"}], slot_id=0)
    held = client.check_slot(0).n_prompt_tokens
    assert held
    name = make_slot_filename("session-a", "snap1")
    saved = client.slot_save(0, name)
    assert saved == SlotSaveResult(filename=name, n_saved=held, n_written=saved.n_written)
    assert (srv.slot_save_path / name).stat().st_size == saved.n_written
    assert client.slot_erase(0) == held
    assert client.check_slot(0).n_prompt_tokens == 0
    restored = client.slot_restore(0, name)
    assert restored == SlotRestoreResult(filename=name, n_restored=held, n_read=saved.n_written)
    assert client.check_slot(0).n_prompt_tokens == held


def test_restore_of_missing_file_is_a_server_error(srv: FakeLlamaServer) -> None:
    with pytest.raises(ServerError, match="400 invalid_request_error: Unable to restore slot"):
        make_client(srv.url).slot_restore(0, "does-not-exist.bin")
    assert srv.count("POST") == 1  # 4xx: no retry


@pytest.mark.parametrize("action", ["save", "restore", "erase"])
@pytest.mark.parametrize("slot_id", [2, 99, -1])
def test_out_of_range_slot_refused_before_any_post(srv: FakeLlamaServer, action: str, slot_id: int) -> None:
    client = make_client(srv.url)
    with pytest.raises(BadInputError) as info:
        if action == "erase":
            client.slot_erase(slot_id)
        elif action == "save":
            client.slot_save(slot_id, "x.bin")
        else:
            client.slot_restore(slot_id, "x.bin")
    assert str(info.value) == (
        f"slot {slot_id} does not exist on llama-server at {srv.url} (it has slots 0..1)"
    )
    assert posts(srv) == []
    assert srv.count("GET", "/slots") == 1


def test_slot_actions_without_save_path_have_hint() -> None:
    with (
        FakeLlamaServer(slot_save_path=None) as srv,
        pytest.raises(ServerError) as info,
    ):
        make_client(srv.url).slot_save(0, "a.bin")
    assert str(info.value) == (
        f"llama-server at {srv.url}: POST /slots/0?action=save failed: 501 "
        "not_supported_error: This server does not support slots action. Start it with "
        "`--slot-save-path` (start llama-server with --slot-save-path to enable slot "
        "save/restore)"
    )
    assert srv.count("POST") == 1


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../evil.bin",
        "sub/x.bin",
        ".hidden",
        "a..b",
        "a b.bin",
        "x\\y",
        "é.bin",
        "a" * 201,
    ],
)
def test_bad_filenames_refused_without_any_request(srv: FakeLlamaServer, name: str) -> None:
    client = make_client(srv.url)
    with pytest.raises(BadInputError, match="invalid slot file name"):
        client.slot_save(0, name)
    with pytest.raises(BadInputError, match="invalid slot file name"):
        client.slot_restore(0, name)
    assert srv.request_count == 0


def test_make_slot_filename_shape() -> None:
    a = make_slot_filename("session-1", "snap/../42 x")
    b = make_slot_filename("session-1", "")
    pattern = r"kvcache-[0-9a-f]{16}-\d{8}T\d{6}Z-[0-9a-f]{8}(-[A-Za-z0-9]{1,24})?\.bin"
    assert re.fullmatch(pattern, a) and re.fullmatch(pattern, b)
    assert a.endswith("-snap42x.bin")
    assert a.split("-")[1] == b.split("-")[1]
    assert make_slot_filename("session-1") != make_slot_filename("session-1")
    assert LLMClient.make_slot_filename("s").startswith("kvcache-")


@settings(max_examples=30, deadline=None)
@given(session=st.text(max_size=50), hint=st.text(max_size=80))
def test_generated_filenames_are_always_valid(session: str, hint: str) -> None:
    name = make_slot_filename(session, hint)
    assert validate_slot_filename(name) == name
    assert validate_filename(name)  # and llama-server's own check accepts it


# --------------------------------------------------------------------- failures and retries


def test_retries_while_model_loads_then_gives_up(srv: FakeLlamaServer) -> None:
    srv.set_mode("loading")
    with pytest.raises(ServerError) as info:
        make_client(srv.url, retries=2).health()
    msg = str(info.value)
    assert srv.count("GET", "/health") == 3
    assert f"llama-server at {srv.url}: GET /health failed: 503 unavailable_error: " in msg
    assert "Loading model" in msg and "still loading" in msg and "tried 3 times" in msg


def test_retry_succeeds_after_loading(srv: FakeLlamaServer) -> None:
    srv.fail_next(
        503,
        {
            "error": {
                "code": 503,
                "message": "Loading model",
                "type": "unavailable_error",
            }
        },
        count=2,
    )
    assert make_client(srv.url, retries=2).slots()[0].id == 0
    assert srv.count("GET", "/slots") == 3


def test_retry_on_500_then_success(srv: FakeLlamaServer) -> None:
    srv.fail_next(500)
    assert make_client(srv.url).tokenize(["abc"]) == [1]
    assert srv.count("POST", "/tokenize") == 2


def test_backoff_is_exponential(srv: FakeLlamaServer) -> None:
    srv.fail_next(500, count=3)
    start = time.monotonic()
    with pytest.raises(ServerError, match="tried 3 times"):
        make_client(srv.url, retries=2, backoff=0.1).health()
    assert time.monotonic() - start >= 0.1 + 0.2
    assert srv.request_count == 3


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_no_retry_on_4xx(srv: FakeLlamaServer, status: int) -> None:
    srv.fail_next(status, count=5)
    with pytest.raises(ServerError, match=f"GET /health failed: {status}"):
        make_client(srv.url, retries=3).health()
    assert srv.request_count == 1


def test_connection_refused() -> None:
    port = closed_port()
    start = time.monotonic()
    with pytest.raises(ServerError) as info:
        make_client(f"http://127.0.0.1:{port}", retries=1).health()
    msg = str(info.value)
    assert msg.startswith(f"cannot connect to llama-server at http://127.0.0.1:{port}")
    assert "connection refused" in msg and "tried 2 times" in msg
    assert time.monotonic() - start < 2


def test_read_timeout(srv: FakeLlamaServer) -> None:
    srv.set_mode("slow", seconds=1.0)
    start = time.monotonic()
    with pytest.raises(ServerError) as info:
        make_client(srv.url, read_timeout=0.2, retries=1).slots()
    assert time.monotonic() - start < 1.0
    assert srv.count("GET", "/slots") == 2
    msg = str(info.value)
    assert f"llama-server at {srv.url}: GET /slots failed: no answer within" in msg
    assert "0.2s" in msg


def test_invalid_json_answer(srv: FakeLlamaServer) -> None:
    srv.set_mode("garbage")
    with pytest.raises(ServerError, match=r"GET /slots answered with invalid JSON"):
        make_client(srv.url).slots()
    assert srv.request_count == 1


def test_error_body_that_is_not_json(srv: FakeLlamaServer) -> None:
    srv.fail_next(502, "<html>bad gateway</html>", count=3)
    with pytest.raises(ServerError, match=r"failed: 502 <html>bad gateway</html> \(tried 3"):
        make_client(srv.url).health()


def test_404_on_tokenize_has_hint(srv: FakeLlamaServer) -> None:
    srv.fail_next(404)
    with pytest.raises(ServerError, match="no /tokenize endpoint"):
        make_client(srv.url).tokenize(["x"])


# --------------------------------------------------------------------- API key


def test_api_key_sent_but_never_shown(srv: FakeLlamaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    srv.api_key = SECRET
    settings_ = LLMSettings(base_url=srv.url, api_key_env=KEY_ENV, retries=1, backoff=0.01, read_timeout=0.3)
    client = LLMClient(settings_)
    client.slot_save(0, "k.bin")
    assert {r.headers.get("authorization") for r in srv.requests} == {f"Bearer {SECRET}"}
    assert SECRET not in repr(settings_) and SECRET not in repr(client)
    assert SECRET not in str(vars(settings_))

    messages: list[str] = []

    def failure(action: Any) -> None:
        with pytest.raises(ServerError) as info:
            action()
        messages.append(str(info.value))
        messages.append(repr(info.value))

    srv.fail_next(400, {"error": {"code": 400, "message": f"bad key {SECRET}"}})
    failure(client.health)
    srv.fail_next(500, f"echo Bearer {SECRET}", count=2)
    failure(client.health)
    srv.set_mode("garbage")
    failure(client.slots)
    srv.set_mode("slow", seconds=0.6)
    failure(client.health)
    srv.set_mode("normal")
    srv.api_key = "another-key"
    failure(client.slots)
    failure(
        LLMClient(
            LLMSettings(
                base_url=f"http://127.0.0.1:{closed_port()}",
                api_key_env=KEY_ENV,
                retries=0,
            )
        ).health
    )
    assert len(messages) == 12
    for msg in messages:
        assert SECRET not in msg
    assert "401" in messages[8] and "API key" in messages[8]
    assert "***" in messages[0]


def test_missing_api_key_variable(srv: FakeLlamaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    client = make_client(srv.url, api_key_env=KEY_ENV)
    with pytest.raises(ConfigError, match=KEY_ENV):
        client.health()
    assert srv.request_count == 0


def test_credentials_and_query_are_not_shown(srv: FakeLlamaServer) -> None:
    host = srv.url.removeprefix("http://")
    client = make_client(f"http://user:hunter2@{host}/?token=abc#frag")
    assert client.health() == {"status": "ok"}
    srv.fail_next(400)
    with pytest.raises(ServerError) as info:
        client.health()
    msg = str(info.value)
    assert msg.startswith(f"llama-server at {srv.url}: GET /health failed: 400")
    for secret in ("hunter2", "user", "token", "abc", "frag"):
        assert secret not in msg
    assert "hunter2" not in repr(client)


# --------------------------------------------------------------------- summarize


def conversation(n: int) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": f"message {i} about kubernetes"} for i in range(n)]


def test_summarize_needs_four_messages(srv: FakeLlamaServer) -> None:
    assert summarize(make_client(srv.url), None, conversation(3)) is None
    assert srv.request_count == 0


def test_summarize_first_time_uses_seed_prompt() -> None:
    msgs = conversation(45)
    with FakeLlamaServer(n_ctx=4096) as srv:
        text = summarize(make_client(srv.url, summary_max_tokens=300), None, msgs)
    assert text and "kubernetes" in text
    body = chat_bodies(srv)[-1]
    assert body["max_tokens"] == 300
    sent = body["messages"]
    assert sent[0] == {"role": "system", "content": SYSTEM_FIRST}
    assert sent[1:-1] == msgs[-40:]
    assert sent[-1] == {"role": "user", "content": USER_FIRST}
    assert len(sent) == 42


def test_summarize_with_prior_summary(srv: FakeLlamaServer) -> None:
    msgs = conversation(6)
    summarize(make_client(srv.url), "User runs k8s 1.29 on 3 nodes.", msgs)
    sent = chat_bodies(srv)[-1]["messages"]
    assert sent[0]["content"] == SYSTEM_UPDATE_HEAD + "User runs k8s 1.29 on 3 nodes."
    assert sent[1:-1] == msgs
    assert sent[-1] == {"role": "user", "content": USER_UPDATE}
    assert build_summary_messages("  ", msgs)[0]["content"] == SYSTEM_FIRST


def test_summarize_keeps_only_role_and_content() -> None:
    msgs = [{"role": "user", "content": "c", "tokens": 3, "id": 9}] * 4
    assert build_summary_messages(None, msgs)[1] == {"role": "user", "content": "c"}


def test_summarize_empty_answer_is_an_error(srv: FakeLlamaServer) -> None:
    srv.chat_reply = "   "
    with pytest.raises(ServerError, match="empty summary"):
        summarize(make_client(srv.url), None, conversation(5))


def test_request_bodies_are_json(srv: FakeLlamaServer) -> None:
    make_client(srv.url).chat([{"role": "user", "content": "é ü"}])
    req = srv.requests[-1]
    assert req.headers["content-type"] == "application/json"
    assert json.loads(req.raw_body)["messages"][0]["content"] == "é ü"
