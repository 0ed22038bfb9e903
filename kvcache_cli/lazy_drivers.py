"""Start-up speed: import peewee without its PostgreSQL driver until one is needed.

peewee imports ``psycopg2`` (and through it ``ssl``) when it is first imported, about
20-40 ms of every ``kvcache`` start even on SQLite. ``import_peewee()`` installs a
one-shot import hook: the first ``import peewee`` runs with ``psycopg2`` hidden (and
``--help``, which never imports peewee, stays as it was), then
``PostgresqlDatabase.init`` is wrapped so that the first PostgreSQL database created
(by kvcache or by anyone else in the process) imports the driver and gives peewee
exactly the names its own import would have set.

If peewee was already imported, or psycopg2 was, nothing is changed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from typing import Any

_DRIVER = "psycopg2"


def _attach_psycopg2(peewee: Any) -> None:
    """Set what peewee's module import sets when psycopg2 is installed (once)."""
    if getattr(peewee, "psycopg2", None) is not None:
        return
    try:
        import psycopg2
        from psycopg2 import extensions
        from psycopg2.extras import Json, register_uuid
    except ImportError:
        return  # peewee reports the missing driver itself
    register_uuid()
    peewee.psycopg2 = psycopg2
    peewee.pg_extensions = extensions
    peewee.pg_register_uuid = register_uuid
    peewee.Json_pg2 = Json
    adapter = getattr(peewee, "Psycopg2Adapter", None)
    if adapter is not None:
        adapter.txn_idle = extensions.TRANSACTION_STATUS_IDLE
        adapter.txn_inerror = extensions.TRANSACTION_STATUS_INERROR
        adapter.txn_unknown = extensions.TRANSACTION_STATUS_UNKNOWN


def _patch(peewee: Any) -> None:
    """Wrap ``PostgresqlDatabase.init`` to attach the driver first (peewee imported without it)."""
    database = getattr(peewee, "PostgresqlDatabase", None)
    original = getattr(database, "init", None)
    if database is None or original is None or getattr(peewee, "psycopg2", 0) is not None:
        return

    def init(self: Any, *args: Any, **kwargs: Any) -> Any:
        _attach_psycopg2(peewee)
        return original(self, *args, **kwargs)

    database.init = init


class _PeeweeFinder:
    """On the first ``import peewee``: load it with psycopg2 hidden, then patch it.

    A plain meta path finder and loader (the import system only needs their methods):
    ``importlib.abc`` would cost every start ~8 ms of imports.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "peewee":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once
        spec = importlib.util.find_spec("peewee")
        if spec is None or spec.loader is None or _DRIVER in sys.modules:
            return spec
        inner = spec.loader

        class Loader:
            def create_module(self, spec: Any) -> Any:
                return inner.create_module(spec)

            def exec_module(self, module: Any) -> None:
                hidden = _DRIVER not in sys.modules
                if hidden:
                    sys.modules[_DRIVER] = None  # type: ignore[assignment]  # `import psycopg2` fails
                try:
                    inner.exec_module(module)
                finally:
                    if hidden and sys.modules.get(_DRIVER, 0) is None:
                        del sys.modules[_DRIVER]
                _patch(module)

        spec.loader = Loader()  # type: ignore[assignment]  # duck-typed loader
        return spec


def import_peewee() -> None:
    """Arrange for peewee to be imported without psycopg2 (when it is first imported)."""
    if "peewee" in sys.modules or _DRIVER in sys.modules:
        return
    if not any(isinstance(f, _PeeweeFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeeweeFinder())
