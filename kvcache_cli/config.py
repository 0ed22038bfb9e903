"""Configuration: the cache manager's settings (``[cache]``) plus model, database, LLM and maintenance.

``kvcache.toml`` is read with the standard library (``tomllib``). Lookup order:
``--config``, then ``$KVCACHE_CONFIG``, then the user config folder; a missing default
file means built-in defaults. An unknown key or a bad value raises ``ConfigError``
naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcache_cli.errors import ConfigError
from kvcache_cli.paths import default_config_path

SNAPSHOT_KINDS = ("none", "full", "incremental", "adaptive")
RETRIEVAL_STRATEGIES = (
    "auto",
    "keyword_only",
    "semantic_only",
    "keyword_then_semantic",
    "semantic_then_keyword",
    "hybrid",
)


@dataclass
class SnapshotConfig:
    """``snapshot_strategy``: when snapshots are taken and how many are kept per session."""

    strategy: str = "incremental"
    interval_conversations: int = 4
    max_snapshots: int = 4
    min_importance_threshold: float = 0.7


@dataclass
class HybridConfig:
    """Weights of the ``hybrid`` retrieval strategy (normalised to sum to 1)."""

    keyword_weight: float = 0.7
    semantic_weight: float = 0.3


@dataclass
class CacheConfig:
    """The cache manager's settings, with the reference design's defaults (docs/design.md)."""

    enabled: bool = True
    retrieval_enabled: bool = True
    clear_after_conversations: int = 16
    memory_threshold_percent: float = 0.6
    bridge_enabled: bool = True
    max_cache_entries: int = 1000
    min_importance_to_preserve: float = 0.7
    generate_cache_embeddings: bool = True
    retrieval_strategy: str = "auto"  # hybrid with an embeddings server, else keyword_only
    preserve_system_prompts: bool = True
    preserve_code_entries: bool = True
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)


@dataclass
class ModelConfig:
    """Geometry of the served model: what one cached token costs in KV bytes."""

    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    bytes_per_element: int = 2
    n_ctx: int = 4096
    max_cache_bytes: int = 0

    @property
    def bytes_per_token(self) -> int:
        """K and V for every layer and KV head: layers x heads x dim x 2 x bytes."""
        return self.layers * self.kv_heads * self.head_dim * 2 * self.bytes_per_element


@dataclass
class DatabaseConfig:
    """Where the store lives: a file path, ``sqlite:///path`` or ``postgresql://...``."""

    url: str = ""
    busy_timeout_ms: int = 30000


@dataclass
class LLMConfig:
    """The OpenAI-compatible / llama-server endpoint; empty ``base_url`` means none."""

    base_url: str = ""
    embeddings_url: str = ""
    api_key_env: str = ""
    model: str = "default"
    embedding_model: str = ""
    connect_timeout: float = 3.0
    read_timeout: float = 120.0
    retries: int = 2
    backoff: float = 0.5
    summary_max_tokens: int = 512
    embedding_batch_size: int = 32
    use_tokenize: bool = True
    slot_save_path: str = ""


@dataclass
class MaintenanceConfig:
    """What ``kvcache maintain`` does by default."""

    inactive_hours: float = 24.0
    history_limit: int = 10000


@dataclass
class ServeConfig:
    """``kvcache serve``: where it listens, the model server it manages, its limits."""

    host: str = "127.0.0.1"
    port: int = 8088
    upstream: str = ""
    api_key_env: str = ""
    max_body_bytes: int = 8 * 1024 * 1024
    reply_reserve: int = 512


@dataclass
class Config:
    """Everything kvcache can be told; ``source`` is the file it came from, if any."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    source: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """The configuration as TOML-ready nested tables (no ``source``)."""
        data = dataclasses.asdict(self)
        data.pop("source", None)
        return data


_SECTIONS: dict[str, type] = {
    "cache": CacheConfig,
    "model": ModelConfig,
    "database": DatabaseConfig,
    "llm": LLMConfig,
    "maintenance": MaintenanceConfig,
    "serve": ServeConfig,
}


def _check_value(name: str, value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} must be true or false, not {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {name} must be a whole number, not {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: {name} must not be negative, not {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {name} must be a number, not {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: {name} must not be negative, not {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {name} must be a string, not {value!r}")
        return value
    raise ConfigError(f"{where}: {name} has an unsupported value {value!r}")


def _suggestion(key: str, known: Iterable[str], prefix: str | None) -> str:
    """`` (did you mean X?)``: the nearest known key (difflib), or the section that has
    ``key``; empty when nothing is close."""
    import difflib  # only for a config with a mistake

    names = list(known)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key.lower().replace("-", "_"), names, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {f'{prefix}.' if prefix else ''}{close[0]}?)"
    for section, cls in _SECTIONS.items():
        if section != prefix and key in {f.name for f in dataclasses.fields(cls)}:
            return f" (it belongs in [{section}])"
    return ""


def _build(cls: type, table: Any, prefix: str, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [{prefix}] must be a table")
    defaults = cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key {name}{_suggestion(key, known, prefix)}")
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default):
            values[key] = _build(type(default), value, name, where)
        else:
            values[key] = _check_value(name, value, default, where)
    return cls(**values)


def validate(config: Config, where: str = "configuration") -> Config:
    """Check cross-field rules; raise ``ConfigError`` naming the key."""
    cache = config.cache
    if cache.retrieval_strategy not in RETRIEVAL_STRATEGIES:
        raise ConfigError(
            f"{where}: cache.retrieval_strategy must be one of "
            f"{', '.join(RETRIEVAL_STRATEGIES)}, not {cache.retrieval_strategy!r}"
        )
    if cache.snapshot.strategy not in SNAPSHOT_KINDS:
        raise ConfigError(
            f"{where}: cache.snapshot.strategy must be one of {', '.join(SNAPSHOT_KINDS)}, "
            f"not {cache.snapshot.strategy!r}"
        )
    for name, value in (
        ("cache.memory_threshold_percent", cache.memory_threshold_percent),
        ("cache.min_importance_to_preserve", cache.min_importance_to_preserve),
        ("cache.snapshot.min_importance_threshold", cache.snapshot.min_importance_threshold),
    ):
        if not 0.0 <= value <= 1.0:
            hint = f"; {value:g}% is {value / 100:g}" if 1.0 < value <= 100.0 else ""
            raise ConfigError(
                f"{where}: {name} is a fraction between 0 and 1 (0.6 = 60%), not {value!r}{hint}"
            )
    if cache.clear_after_conversations < 1:
        raise ConfigError(f"{where}: cache.clear_after_conversations must be at least 1")
    if cache.hybrid.keyword_weight + cache.hybrid.semantic_weight <= 0:
        raise ConfigError(f"{where}: cache.hybrid weights must not both be 0")
    model = config.model
    for name in ("layers", "kv_heads", "head_dim", "bytes_per_element"):
        if getattr(model, name) < 1:
            raise ConfigError(f"{where}: model.{name} must be at least 1")
    if config.maintenance.history_limit < 1:
        raise ConfigError(f"{where}: maintenance.history_limit must be at least 1")
    _validate_llm(config.llm, where)
    _validate_database_url(config.database.url, where)
    serve = config.serve
    if not 0 <= serve.port <= 65535:
        raise ConfigError(f"{where}: serve.port must be 0..65535, not {serve.port!r}")
    if serve.upstream and not _is_http_url(serve.upstream):
        raise ConfigError(f"{where}: serve.upstream must be an http(s) URL, not {serve.upstream!r}")
    if serve.max_body_bytes < 1024 or serve.reply_reserve < 1:
        raise ConfigError(
            f"{where}: serve.max_body_bytes must be at least 1024 and serve.reply_reserve at least 1"
        )
    return config


def _is_http_url(text: str) -> bool:
    """``http://host[...]`` or ``https://host[...]``."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _validate_llm(llm: LLMConfig, where: str) -> None:
    """Endpoint URLs must be http(s) URLs; timeouts must be positive seconds."""
    for name in ("base_url", "embeddings_url"):
        value = getattr(llm, name)
        if value and not _is_http_url(value.strip()):
            raise ConfigError(f"{where}: llm.{name} must be an http:// or https:// URL, not {value!r}")
    for name in ("connect_timeout", "read_timeout"):
        value = getattr(llm, name)
        if not value > 0 or value == float("inf"):  # also refuses NaN
            raise ConfigError(f"{where}: llm.{name} must be a positive number of seconds, not {value!r}")


def _validate_database_url(url: str, where: str) -> None:
    """A file path, ``sqlite:///path`` or ``postgresql://...`` (credentials never echoed)."""
    text = url.strip()
    if "://" not in text:
        return
    scheme = text.split("://", 1)[0].lower()
    if scheme == "sqlite":
        if not text[len("sqlite://") :].startswith("/"):
            raise ConfigError(
                f"{where}: database.url must be sqlite:///relative.db or sqlite:////absolute.db"
            )
    elif scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"{where}: database.url has unsupported scheme {scheme!r} "
            "(use a file path, sqlite:///path or postgresql://...)"
        )


def parse_config(data: dict[str, Any], where: str) -> Config:
    """Build a ``Config`` from parsed TOML, rejecting unknown keys and bad values."""
    sections: dict[str, Any] = {}
    for key, table in data.items():
        if key not in _SECTIONS:
            raise ConfigError(f"{where}: unknown section or key {key}{_suggestion(key, _SECTIONS, None)}")
        sections[key] = _build(_SECTIONS[key], table, key, where)
    return validate(Config(**sections), where)


def find_config_path(explicit: str | Path | None) -> tuple[Path | None, bool]:
    """The config file to read and whether it must exist (named by flag or env)."""
    if explicit:
        return Path(explicit).expanduser(), True
    env = os.environ.get("KVCACHE_CONFIG")
    if env:
        return Path(env).expanduser(), True
    return default_config_path(), False


def load_config(explicit: str | Path | None = None) -> Config:
    """Read the configuration by the lookup order; defaults when no file is found."""
    path, required = find_config_path(explicit)
    if path is None or (not required and not path.exists()):
        return Config()
    where = str(path)
    if path.is_dir():
        raise ConfigError(f"{where}: is a directory, not a config file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read config file ({exc.strerror})") from None
    import tomllib  # only when there is a file to read

    try:
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: config file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    config = parse_config(data, where)
    config.source = path
    return config


EXAMPLE_RESOURCE = "data/kvcache.toml.example"
"""The commented example configuration shipped in the package (every key, its default)."""


def starter_toml() -> str:
    """The commented ``kvcache.toml`` that ``init-config`` writes (every key at its default)."""
    from importlib.resources import files

    return files("kvcache_cli").joinpath(EXAMPLE_RESOURCE).read_text(encoding="utf-8")
