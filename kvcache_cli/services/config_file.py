"""Writing a starter ``kvcache.toml`` (owner-only, never over an existing file unasked)."""

from __future__ import annotations

import os
from pathlib import Path

from kvcache_cli.errors import BadInputError


def write_starter_config(path: Path | None = None, force: bool = False) -> Path:
    """Write the starter config to ``path`` (default: the user config file); returns where."""
    from kvcache_cli.config import starter_toml
    from kvcache_cli.paths import default_config_path, ensure_private_dir

    target = path or default_config_path()
    if target.exists() and not force:
        raise BadInputError(f"{target}: already exists (use --force to overwrite)")
    ensure_private_dir(target.parent)
    fd = os.open(target, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(starter_toml())
    return target
