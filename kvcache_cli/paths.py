"""Where kvcache keeps its files: one function decides each location.

``KVCACHE_HOME`` overrides the data folder (handy for tests and for several stores
side by side); otherwise the XDG base-directory rules apply.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP_NAME = "kvcache"


def user_dir() -> Path:
    """The per-user data folder: ``$KVCACHE_HOME``, else the platform's data folder."""
    override = os.environ.get("KVCACHE_HOME")
    if override:
        return Path(override).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / APP_NAME
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / APP_NAME


def config_dir() -> Path:
    """The per-user config folder (``$KVCACHE_HOME`` when set, so one variable moves all)."""
    override = os.environ.get("KVCACHE_HOME")
    if override:
        return Path(override).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / APP_NAME
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / APP_NAME


def default_db_path() -> Path:
    """The embedded SQLite store used when nothing else is configured."""
    return user_dir() / "kvcache.db"


def default_config_path() -> Path:
    """Where ``kvcache`` looks for ``kvcache.toml`` when neither flag nor env names one."""
    return config_dir() / "kvcache.toml"


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and any missing parents) readable by the owner only."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):  # mkdir(parents=True) would give parents the umask's mode
        folder.mkdir(exist_ok=True, mode=0o700)
