"""Fast multi-row inserts through one prepared statement (the replay's hot path)."""

from __future__ import annotations

from typing import Any

from kvcache_cli.store.connection import Store


def bulk_insert(store: Store, model: Any, rows: list[dict[str, Any]], batch: int = 100) -> None:
    """Insert ``rows`` (dicts of field names) into ``model``'s table of ``store``.

    Values go through each field's ``db_value`` exactly as ``insert_many`` does, but
    without building SQL per row (peewee's query building dominated big imports).
    """
    if not rows:
        return
    names = list(rows[0])
    if any(len(r) != len(names) or any(n not in r for n in names) for r in rows):
        for start in range(0, len(rows), batch):
            store.bind(model.insert_many(rows[start : start + batch])).execute()
        return
    meta = model._meta
    fields = [meta.fields[n] for n in names]
    defaults = [(f, d) for f, d in meta.defaults.items() if f.name not in rows[0]]
    fields += [f for f, _ in defaults]
    db = store.db
    quote_chars: Any = getattr(db, "quote", None) or '""'
    left, right = quote_chars[0], quote_chars[1]

    def quote(name: str) -> str:
        return f"{left}{name}{right}"

    columns = ", ".join(quote(f.column_name) for f in fields)
    marks = ", ".join([db.param] * len(fields))
    sql = f"INSERT INTO {quote(meta.table_name)} ({columns}) VALUES ({marks})"
    given = fields[: len(names)]
    params = [
        tuple(f.db_value(r[n]) for f, n in zip(given, names, strict=True))
        + tuple(f.db_value(d() if callable(d) else d) for f, d in defaults)
        for r in rows
    ]
    db.cursor().executemany(sql, params)
