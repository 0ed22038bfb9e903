"""Rich rendering of the core's results: tables on stdout, progress on stderr.

Rich drops colour and escape codes by itself when stdout is not a terminal.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from .manager import ClearInfo, MaintenanceResult, ProcessResult, RestoreResult, SnapshotInfo
    from .retrieval import RetrievalResult

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

SPARK = "▁▂▃▄▅▆▇█"


def human_bytes(value: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def sparkline(values: list[float], width: int = 60) -> str:
    """Values as a one-line bar chart (resampled to ``width`` columns)."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [max(values[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)]) for i in range(width)]
    top = max(values) or 1
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))] for v in values)


@contextlib.contextmanager
def turn_progress(label: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr for a long replay, only when stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def process_result(result: ProcessResult) -> None:
    data = result.to_dict(with_turns=False)
    table = Table(title=f"session {result.session_id}", title_justify="left")
    table.add_column("turns", justify="right")
    table.add_column("messages added", justify="right")
    table.add_column("clears", justify="right")
    table.add_column("snapshots", justify="right")
    table.add_column("retrievals", justify="right")
    table.add_column("entries retrieved", justify="right")
    table.add_row(
        str(data["turns_processed"]),
        f"{data['messages_added']}/{data['messages_total']}",
        str(data["total_clears"]),
        str(data["snapshots_created"]),
        str(data["total_retrievals"]),
        str(data["entries_retrieved"]),
    )
    console.print(table)
    if result.clears:
        clears = Table(title="clears", title_justify="left")
        for name in ("turn", "reason", "cleared", "preserved", "snapshot", "summary"):
            clears.add_column(name)
        for c in result.clears:
            clears.add_row(
                str(c.turn),
                c.reason,
                str(c.entries_cleared),
                str(c.entries_preserved),
                str(c.snapshot_id or "-"),
                c.summary_source or "-",
            )
        console.print(clears)
    usage = [t.cache_size_bytes for t in result.turns]
    if usage:
        console.print(
            f"cache usage by turn (peak {human_bytes(max(usage))} of {human_bytes(result.capacity_bytes)}): "
            f"{sparkline([float(u) for u in usage])}"
        )
    bridges = [b for t in result.turns for b in t.bridge_messages]
    if bridges:
        console.print(f"bridge messages: {len(bridges)}; last: {bridges[-1].splitlines()[0]}")


def clear_result(result: ClearInfo) -> None:
    table = Table(title=f"cleared session {result.session_id}", title_justify="left")
    for name in ("reason", "entries cleared", "entries preserved", "snapshot", "summary"):
        table.add_column(name)
    table.add_row(
        result.reason,
        str(result.entries_cleared),
        str(result.entries_preserved),
        str(result.snapshot_id or "-"),
        result.summary_source or "-",
    )
    console.print(table)
    if result.slot_erased is not None:
        console.print(f"slot erased: {result.slot_erased} tokens")
    console.print(result.bridge_message)


def retrieval_result(result: RetrievalResult) -> None:
    if not result.entries:
        console.print(f"nothing found for {result.query!r}")
        return
    table = Table(title=f"retrieved for {result.query!r}", title_justify="left")
    for name in ("#", "tier", "score", "session", "msg", "matched", "text"):
        table.add_column(name, overflow="fold")
    for rank, e in enumerate(result.entries, start=1):
        snippet = " ".join(e.text.split())
        if len(snippet) > 120:
            snippet = snippet[:117] + "..."
        table.add_row(
            str(rank),
            str(e.tier),
            f"{e.score:.2f}",
            e.session_id,
            "-" if e.message_index is None else str(e.message_index),
            ", ".join(e.matched_keywords),
            snippet,
        )
    console.print(table)
    if result.bridge_message:
        console.print(result.bridge_message)


def snapshot_table(items: list[SnapshotInfo], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("id", "session", "type", "reason", "entries", "size", "created", "slot file"):
        table.add_column(name)
    for s in items:
        table.add_row(
            str(s.id),
            s.session_id,
            s.snapshot_type,
            s.reason,
            str(s.entry_count),
            human_bytes(s.size_bytes),
            s.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            s.slot_filename or "-",
        )
    return table


def snapshot_list(items: list[SnapshotInfo]) -> None:
    if not items:
        console.print("no snapshots")
        return
    console.print(snapshot_table(items, "snapshots"))


def snapshot_created(item: SnapshotInfo) -> None:
    console.print(snapshot_table([item], "snapshot created"))


def restore_result(result: RestoreResult) -> None:
    console.print(
        f"restored {result.entries_restored} entries from snapshot {result.snapshot_id} "
        f"into session {result.session_id} ({human_bytes(result.cache_size_bytes)})"
    )
    if result.slot_n_restored is not None:
        console.print(f"slot restored: {result.slot_n_restored} tokens")
    console.print(result.bridge_message)


def maintenance_result(result: MaintenanceResult, verbose: bool) -> None:
    """Prints nothing when nothing was (or would be) done: cron mails nothing."""
    if result.integrity is not None:
        console.print(f"integrity check: {result.integrity}")
    if not result.did_anything and not verbose:
        return
    verb = "would release" if result.dry_run else "released"
    for key in result.cleaned_sessions:
        console.print(f"{verb} idle session {key}")
    if result.pruned_snapshot_ids:
        verb2 = "would prune" if result.dry_run else "pruned"
        console.print(f"{verb2} snapshots {', '.join(map(str, result.pruned_snapshot_ids))}")
    if result.operations_trimmed:
        verb3 = "would trim" if result.dry_run else "trimmed"
        console.print(f"{verb3} {result.operations_trimmed} old operation records")
    if not result.did_anything:
        console.print("nothing to do")


def statistics(data: dict[str, Any]) -> None:
    totals = Table(title="kvcache statistics", title_justify="left", show_header=False)
    totals.add_column("key")
    totals.add_column("value", justify="right")
    for key in (
        "total_clears",
        "total_retrievals",
        "entries_preserved",
        "entries_cleared",
        "entries_retrieved",
        "active_sessions",
        "operation_history_count",
        "snapshot_count",
        "message_count",
        "last_operation",
    ):
        totals.add_row(key, str(data.get(key)))
    totals.add_row("database", f"{data['database']} ({human_bytes(data['database_size_bytes'])})")
    console.print(totals)
    if data["sessions"]:
        table = Table(title="sessions", title_justify="left")
        for name in ("session", "turns", "since clear", "clears", "entries", "used", "capacity", "last activity"):
            table.add_column(name)
        for s in data["sessions"]:
            table.add_row(
                s["session_id"],
                str(s["turn_count"]),
                str(s["conversation_count"]),
                str(s["total_clears"]),
                str(s["entry_count"]),
                human_bytes(s["cache_size_bytes"]),
                human_bytes(s["capacity_bytes"]),
                s["last_activity"][:19],
            )
        console.print(table)
    if data.get("slots"):
        slots = Table(title="server slots", title_justify="left")
        for name in ("id", "n_ctx", "cached tokens", "processing"):
            slots.add_column(name)
        for s in data["slots"]:
            slots.add_row(str(s["id"]), str(s["n_ctx"]), str(s.get("n_prompt_tokens")), str(s["is_processing"]))
        console.print(slots)
    if data["recent_operations"]:
        ops = Table(title="recent operations", title_justify="left")
        for name in ("time", "operation", "session", "entries", "details"):
            ops.add_column(name)
        for op in data["recent_operations"]:
            ops.add_row(op["timestamp"][:19], op["operation_type"], op["session_id"], str(op["entries_affected"]), op["details"])
        console.print(ops)
    detail = data.get("session")
    if detail:
        usage = [float(u["cache_size_bytes"]) for u in detail["usage"]]
        if usage:
            console.print(f"cache usage by turn: {sparkline(usage)}")
        if detail["summary"]:
            sm = detail["summary"]
            console.print(f"summary: {sm['length']} chars, {sm['clear_count']} clears, {sm['source']}")
