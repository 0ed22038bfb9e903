"""Copy a whole store between backends (SQLite <-> PostgreSQL), verified.

Every model table is copied in dependency order with its ids, in one destination
transaction (a failure leaves the destination as it was); PostgreSQL sequences are
moved past the copied ids; the full-text index is rebuilt on the destination. Then
both sides are read back: per table, the row count and a SHA-256 over the rows in id
order, each value in a backend-neutral form. Any difference is an error.

Stop the writers of the source while copying: rows written meanwhile may be missed
(the verification then fails).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvcache_cli.errors import BadInputError, IntegrityError
from kvcache_cli.store import copying
from kvcache_cli.store.backend import open_store, parse_location


@dataclass
class TableCopy:
    """One table's result: rows and content hashes on both sides."""

    table: str
    source_rows: int
    dest_rows: int
    source_sha256: str
    dest_sha256: str

    @property
    def match(self) -> bool:
        return self.source_rows == self.dest_rows and self.source_sha256 == self.dest_sha256

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "rows": self.dest_rows,
            "source_rows": self.source_rows,
            "sha256": self.dest_sha256,
            "source_sha256": self.source_sha256,
            "match": self.match,
        }


@dataclass
class CopyResult:
    """What ``copy-store`` did, for the table and ``--json``."""

    source: str
    destination: str
    source_backend: str
    dest_backend: str
    tables: list[TableCopy] = field(default_factory=list)
    dry_run: bool = False

    @property
    def verified(self) -> bool:
        return all(t.match for t in self.tables)

    @property
    def total_rows(self) -> int:
        return sum(t.dest_rows for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "source_backend": self.source_backend,
            "dest_backend": self.dest_backend,
            "total_rows": self.total_rows,
            "verified": self.verified,
            "tables": [t.to_dict() for t in self.tables],
        }


def copy_store(source_url: str, dest_url: str, force: bool = False) -> CopyResult:
    """Copy every row of the store at ``source_url`` into ``dest_url`` and verify it.

    The destination is created and migrated if needed; one that already holds data is
    refused unless ``force`` (then its rows are replaced). Raises ``IntegrityError``
    when the verification finds a difference.
    """
    src_loc = parse_location(source_url)
    dst_loc = parse_location(dest_url)
    if (src_loc.backend, src_loc.target) == (dst_loc.backend, dst_loc.target):
        raise BadInputError("source and destination are the same store")
    source = open_store(source_url, must_exist=True)
    try:
        dest = open_store(dest_url)
        try:
            result = CopyResult(
                source=src_loc.display,
                destination=dst_loc.display,
                source_backend=src_loc.backend,
                dest_backend=dst_loc.backend,
            )
            if not force and not copying.is_empty(dest):
                raise BadInputError(
                    f"{dst_loc.display}: destination store is not empty (use --force to replace it)"
                )
            dest.transaction(lambda: copying.copy_into(source, dest))
            for model in copying.COPIED:
                src_rows, src_hash = copying.table_digest(source.db, model)
                dst_rows, dst_hash = copying.table_digest(dest.db, model)
                result.tables.append(
                    TableCopy(model._meta.table_name, src_rows, dst_rows, src_hash, dst_hash)
                )
            bad = [t.table for t in result.tables if not t.match]
            if bad:
                raise IntegrityError(
                    f"copy verification failed for {', '.join(bad)} (was the source written meanwhile?)"
                )
            return result
        finally:
            dest.close()
    finally:
        source.close()
