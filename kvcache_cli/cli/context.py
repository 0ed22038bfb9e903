"""The context object every command gets: the global options, built once per run.

``kvcache --db X -v stats`` and ``kvcache stats --db X -v`` fill the same
:class:`CliContext` (see ``cli/command.py``); a command reads it with
``cli_context(ctx)`` and asks it for the config, the store or the manager.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from kvcache_cli.config import Config
    from kvcache_cli.llm.client import LLMClient
    from kvcache_cli.services.manager import KVCacheManager
    from kvcache_cli.store.backend import Store


class CliContext:
    """Global options (``--db``, ``--config``, ``-v``, ``-q``) and what follows from them.

    A plain class, not a dataclass: every command makes one, and defining a dataclass
    (its generated ``__init__``, ``__repr__`` and ``__eq__``) costs start-up time that
    nothing here uses.
    """

    def __init__(
        self, db: str | None = None, config_path: str | None = None, verbose: int = 0, quiet: bool = False
    ) -> None:
        self.db = db
        self.config_path = config_path
        self.verbose = verbose
        self.quiet = quiet
        self._config: Config | None = None

    def add_options(self, db: str | None, config: str | None, verbose: int, quiet: bool) -> None:
        """Fold in global options given after the command name (they win; ``-v`` adds up)."""
        if db is not None:
            self.db = db
        if config is not None and config != self.config_path:
            self.config_path = config
            self._config = None
        self.verbose += verbose
        self.quiet = self.quiet or quiet

    def config(self) -> Config:
        """The configuration, loaded on first use (``--config``, then ``KVCACHE_CONFIG``...)."""
        if self._config is None:
            from kvcache_cli.config import load_config

            self._config = load_config(self.config_path)
        return self._config

    def db_url(self) -> str | None:
        """``--db``, then ``KVCACHE_DB``, then the config file, then the default path (None)."""
        return self.db or os.environ.get("KVCACHE_DB") or self.config().database.url or None

    def open_store(self, read_only: bool = False) -> Store:
        """The store; a read-only command on an explicit ``--db``/URL that names no
        existing database fails (a typo) instead of creating an empty one."""
        from kvcache_cli.store.backend import open_store

        url = self.db_url()
        return open_store(url, self.config().database.busy_timeout_ms, must_exist=read_only and bool(url))

    def llm_client(self, server: str | None = None, required: bool = False) -> LLMClient | None:
        """The LLM client for ``--server`` or ``[llm]`` (None when neither names one)."""
        from kvcache_cli.services.llm_setup import llm_client

        return llm_client(self.config().llm, server, required)

    def manager(
        self, server: str | None = None, need_server: bool = False, read_only: bool = False
    ) -> tuple[KVCacheManager, Store]:
        """The manager and its store (the caller closes the store)."""
        from kvcache_cli.services.manager import KVCacheManager

        config = self.config()
        llm = self.llm_client(server, need_server)
        store = self.open_store(read_only)
        return KVCacheManager(store, config, llm), store

    def info(self, message: str) -> None:
        """A diagnostic on stderr (hidden by ``--quiet``)."""
        if not self.quiet:
            error_line(message)

    def debug(self, message: str) -> None:
        """A diagnostic on stderr shown with ``-v``."""
        if self.verbose and not self.quiet:
            error_line(message)


def cli_context(ctx: typer.Context) -> CliContext:
    """The run's :class:`CliContext` (made by the app callback; a default one otherwise)."""
    root = ctx.find_root()
    if not isinstance(root.obj, CliContext):
        root.obj = CliContext()
    obj = ctx.obj
    if not isinstance(obj, CliContext):
        ctx.obj = obj = root.obj
    return obj


def error_line(message: str) -> None:
    """One line on stderr (always shown)."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
