"""Configuration: defaults, lookup order, validation errors naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcache_cli.config import Config, load_config, parse_config, starter_toml
from kvcache_cli.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "kvcache.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reference_defaults() -> None:
    cache = Config().cache
    assert (cache.enabled, cache.retrieval_enabled, cache.bridge_enabled) == (True, True, True)
    assert cache.clear_after_conversations == 16
    assert cache.memory_threshold_percent == 0.6
    assert cache.max_cache_entries == 1000
    assert cache.min_importance_to_preserve == 0.7
    assert cache.retrieval_strategy == "auto"  # hybrid with an embeddings server (issue 18)
    assert (cache.preserve_system_prompts, cache.preserve_code_entries) == (True, True)
    assert (cache.snapshot.strategy, cache.snapshot.interval_conversations, cache.snapshot.max_snapshots) == (
        "incremental",
        4,
        4,
    )


def test_values_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[cache]\nclear_after_conversations = 8\nmemory_threshold_percent = 0.5\n"
        "[cache.snapshot]\nstrategy = 'full'\n[model]\nn_ctx = 8192\n",
    )
    config = load_config(path)
    assert config.cache.clear_after_conversations == 8
    assert config.cache.memory_threshold_percent == 0.5
    assert config.cache.snapshot.strategy == "full"
    assert config.model.n_ctx == 8192
    assert config.source == path


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[cache]\nclear_after_turns = 3\n", "cache.clear_after_turns"),
        ("[cahce]\nenabled = true\n", "cahce"),
        ("[cache.snapshot]\nevery = 2\n", "cache.snapshot.every"),
        ("[cache]\nenabled = 'yes'\n", "cache.enabled"),
        ("[cache]\nclear_after_conversations = 'ten'\n", "cache.clear_after_conversations"),
        ("[cache]\nclear_after_conversations = 0\n", "cache.clear_after_conversations"),
        ("[cache]\nmemory_threshold_percent = 1.5\n", "cache.memory_threshold_percent"),
        ("[cache]\nmin_importance_to_preserve = -0.1\n", "cache.min_importance_to_preserve"),
        ("[cache]\nretrieval_strategy = 'magic'\n", "cache.retrieval_strategy"),
        ("[cache.snapshot]\nstrategy = 'weekly'\n", "cache.snapshot.strategy"),
        ("[model]\nlayers = 0\n", "model.layers"),
        ("[llm]\nread_timeout = 'slow'\n", "llm.read_timeout"),
        ("[llm]\nbase_url = 'notaurl'\n", "llm.base_url must be an http:// or https:// URL, not 'notaurl'"),
        ("[llm]\nbase_url = 'http://'\n", "llm.base_url"),
        ("[llm]\nembeddings_url = 'ftp://host/x'\n", "llm.embeddings_url"),
        ("[llm]\nconnect_timeout = 0\n", "llm.connect_timeout"),
        ("[llm]\nread_timeout = 0\n", "llm.read_timeout"),
        ("[llm]\nread_timeout = nan\n", "llm.read_timeout"),
        ("[database]\nurl = 'mysql://u:secret@x/y'\n", "database.url has unsupported scheme 'mysql'"),
        ("[database]\nurl = 'sqlite://rel.db'\n", "database.url"),
    ],
)
def test_bad_key_or_value_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert "secret" not in message
    assert info.value.exit_code == 2


def test_good_urls_and_timeouts_load(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[llm]\nbase_url = 'http://127.0.0.1:8080'\nembeddings_url = 'https://e.example/v1'\n"
        "connect_timeout = 0.5\n[database]\nurl = 'postgresql://u@h/db'\n",
    )
    assert load_config(path).llm.connect_timeout == 0.5


def test_invalid_toml_and_missing_named_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[cache\nenabled = true\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("KVCACHE_HOME", str(home))
    monkeypatch.delenv("KVCACHE_CONFIG", raising=False)
    assert load_config().source is None  # no default file: built-in defaults
    write(home, "[cache]\nclear_after_conversations = 3\n")
    assert load_config().cache.clear_after_conversations == 3
    env_file = write(tmp_path, "[cache]\nclear_after_conversations = 5\n", "env.toml")
    monkeypatch.setenv("KVCACHE_CONFIG", str(env_file))
    assert load_config().cache.clear_after_conversations == 5
    flag_file = write(tmp_path, "[cache]\nclear_after_conversations = 7\n", "flag.toml")
    assert load_config(flag_file).cache.clear_after_conversations == 7
    monkeypatch.setenv("KVCACHE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="not found"):
        load_config()


def test_starter_toml_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path, starter_toml())
    assert load_config(path).to_dict() == Config().to_dict()
    import tomllib

    assert parse_config(tomllib.loads(starter_toml()), "x").to_dict() == Config().to_dict()


def test_init_config_writes_the_commented_example(tmp_path: Path) -> None:
    import tomllib

    from typer.testing import CliRunner

    from kvcache_cli.cli.app import app

    target = tmp_path / "conf" / "kvcache.toml"
    result = CliRunner().invoke(app, ["init-config", str(target)])
    assert result.exit_code == 0, result.stderr
    text = target.read_text(encoding="utf-8")
    assert text == starter_toml()
    assert "# Clear a session's cache when its turn count" in text  # the comments are kept
    assert tomllib.loads(text) == Config().to_dict()  # every key, each at its default
    assert load_config(target).to_dict() == Config().to_dict()


def test_the_shipped_example_is_the_repository_one() -> None:
    repo_copy = Path(__file__).resolve().parents[1] / "kvcache.toml.example"
    assert repo_copy.read_text(encoding="utf-8") == starter_toml()


@pytest.mark.parametrize(("value", "hint"), [("60", "; 60% is 0.6"), ("150", "")])
def test_a_percentage_is_explained_as_a_fraction(tmp_path: Path, value: str, hint: str) -> None:
    path = write(tmp_path, f"[cache]\nmemory_threshold_percent = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "cache.memory_threshold_percent is a fraction between 0 and 1 (0.6 = 60%)" in str(info.value)
    assert str(info.value).endswith(f"not {float(value)!r}{hint}")


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        ("[cache]\nclear_after_conversation = 3\n", "(did you mean cache.clear_after_conversations?)"),
        ("[cache]\nMemory-Threshold-Percent = 0.5\n", "(did you mean cache.memory_threshold_percent?)"),
        ("[cahce]\nenabled = true\n", "(did you mean cache?)"),
        ("[cache.snapshot]\nmax_snapshot = 2\n", "(did you mean cache.snapshot.max_snapshots?)"),
        ("[cache]\nbase_url = 'http://h'\n", "(it belongs in [llm])"),
    ],
)
def test_an_unknown_key_suggests_the_nearest(tmp_path: Path, text: str, suggestion: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).endswith(suggestion)
