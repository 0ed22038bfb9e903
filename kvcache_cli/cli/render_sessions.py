"""Rich rendering of ``sessions``, ``export`` and ``forget`` results (tables on stdout)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvcache_cli.cli.render import console, human_bytes, plural, printable, simple_table

if TYPE_CHECKING:
    from kvcache_cli.services.sessions import ForgetResult, SessionList


def _utc(value: object) -> str:
    """``2026-12-04 10:00`` from a stored naive-UTC time (the column says UTC)."""
    return "-" if value is None else str(value)[:16].replace("T", " ")


def session_list(result: SessionList) -> None:
    """One row per session: id, messages, turns, clears, cache used, last activity."""
    title = plural(len(result.sessions), "session")
    if result.idle_over_hours is not None:
        title += f" idle over {result.idle_over_hours:g} h"
    table = simple_table(title)
    table.add_column("session")
    for name in ("messages", "turns", "clears", "snapshots", "cache used"):
        table.add_column(name, justify="right")
    table.add_column("last activity (UTC)")
    for row in result.sessions:
        used = human_bytes(row.cache_bytes)
        if row.capacity_bytes:
            used += f" ({row.cache_bytes / row.capacity_bytes:.0%})"
        table.add_row(
            printable(row.key),
            str(row.messages),
            str(row.turns),
            str(row.clears),
            str(row.snapshots),
            used,
            _utc(row.last_activity),
        )
    console.print(table)


_KINDS = (
    ("messages", "message"),
    ("cache_entries", "cache entry"),
    ("snapshots", "snapshot"),
    ("snapshot_entries", "snapshot entry"),
    ("summaries", "summary"),
    ("embeddings", "embedding"),
    ("engagement", "engagement score"),
    ("turn_log", "turn-log row"),
    ("operations", "history record"),
)


def _what(rows: dict[str, int]) -> str:
    """``95 messages, 13 snapshots, 1 summary`` (kinds with rows only)."""
    return ", ".join(plural(rows[key], noun) for key, noun in _KINDS if rows.get(key)) or "no rows"


def forget_result(result: ForgetResult) -> None:
    """What went (or, with --dry-run, would go), session by session."""
    verb = "would forget" if result.dry_run else "forgot"
    table = simple_table(f"{verb} {plural(len(result.sessions), 'session')}")
    table.add_column("session")
    table.add_column("what goes" if result.dry_run else "what went")
    table.add_column("slot files", justify="right")
    for item in result.sessions:
        table.add_row(printable(item.session), _what(item.rows), str(len(item.slot_files)))
    console.print(table)
    if result.slot_files_deleted:
        console.print(f"deleted {plural(len(result.slot_files_deleted), 'slot file')}")
    if result.slot_files_to_delete:
        names = ", ".join(printable(n) for n in result.slot_files_to_delete)
        wait = "would wait" if result.dry_run else "wait"
        console.print(
            f"{plural(len(result.slot_files_to_delete), 'slot file')} {wait} to be deleted from the "
            f"server's --slot-save-path (set [llm] slot_save_path to delete them): {names}"
        )
