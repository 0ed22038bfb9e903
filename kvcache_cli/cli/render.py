"""Rich rendering of the core's results: tables on stdout, progress on stderr.

Rich drops colour and escape codes by itself when stdout is not a terminal.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from kvcache_cli.cli import render_served
from kvcache_cli.timefmt import parse_utc

if TYPE_CHECKING:
    from kvcache_cli.retrieval.fusion import RetrievalResult
    from kvcache_cli.services.manager import (
        ClearInfo,
        MaintenanceResult,
        ProcessResult,
        RestoreResult,
        SnapshotInfo,
    )

#: Width of piped output (no terminal, no COLUMNS): Rich's default 80 truncates tables.
PIPE_WIDTH = 160


def _pipe_width(stream: Any) -> int | None:
    """``PIPE_WIDTH`` when ``stream`` is not a terminal and COLUMNS is unset, else Rich's own."""
    if os.environ.get("COLUMNS"):
        return None
    try:
        return None if stream.isatty() else PIPE_WIDTH
    except (AttributeError, ValueError):
        return PIPE_WIDTH


class _TrimmedStdout:
    """``sys.stdout`` (looked up at each write, so test runners can swap it) with the
    spaces Rich pads table lines with cut off when it is not a terminal."""

    _TRAILING = re.compile(r"[ \t]+(?=\n)")

    def write(self, text: str) -> int:
        stream = sys.stdout
        if not self.isatty():
            text = self._TRAILING.sub("", text)
        return stream.write(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        try:
            return sys.stdout.isatty()
        except (AttributeError, ValueError):
            return False

    def fileno(self) -> int:
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:
        return getattr(sys.stdout, "encoding", None) or "utf-8"


# markup=False: stored text such as "[bold]" or "[/x]" is printed as it is.
console = Console(
    file=_TrimmedStdout(),  # type: ignore[arg-type]  # a minimal text stream
    highlight=False,
    markup=False,
    emoji=False,
    width=_pipe_width(sys.stdout),
)
err_console = Console(stderr=True, highlight=False, markup=False, emoji=False, width=_pipe_width(sys.stderr))

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: Any) -> str:
    """``text`` with control characters (but newline and tab) and bidi overrides made visible.

    NUL, ESC and the other C0/C1 controls become ``\\x00``-style escapes, the bidi
    embedding/override/isolate marks ``\\u202e``-style ones, so stored text cannot move
    the cursor, recolour or reorder the terminal. ``--json`` output does not use this.
    """
    value = "" if text is None else str(text)
    return _UNSAFE.sub(_escape_char, value)


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
        values = [
            max(values[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)]) for i in range(width)
        ]
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


def clear_result(result: ClearInfo) -> None:
    table = Table(title=f"cleared session {printable(result.session_id)}", title_justify="left")
    for name in ("reason", "entries cleared", "entries preserved", "snapshot", "summary"):
        table.add_column(name)
    table.add_row(
        printable(result.reason),
        str(result.entries_cleared),
        str(result.entries_preserved),
        str(result.snapshot_id or "-"),
        printable(result.summary_source or "-"),
    )
    console.print(table)
    if result.slot_erased is not None:
        console.print(f"slot erased: {plural(result.slot_erased, 'token')}")
    console.print(printable(result.bridge_message))


CONTEXT_ONLY = "holds no query word: scored by the matching messages around it, or by meaning"


def retrieval_result(result: RetrievalResult, verbose: bool = False) -> None:
    """The ranked results; ``verbose``: each result's whole text after the table."""
    if not result.entries:
        console.print(printable(f"nothing found for {result.query!r}"))
        return
    table = Table(title=printable(f"retrieved for {result.query!r}"), title_justify="left")
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
            printable(e.session_id),
            "-" if e.message_index is None else str(e.message_index),
            printable(", ".join(e.matched_keywords)),
            printable(snippet),
        )
    console.print(table)
    if verbose:  # where each score came from: the query words it holds, else its context
        for rank, e in enumerate(result.entries, start=1):
            why = "matched " + ", ".join(e.matched_keywords) if e.matched_keywords else CONTEXT_ONLY
            where = f"{e.role or 'entry'}, message {'-' if e.message_index is None else e.message_index}"
            console.print(printable(f"#{rank} tier {e.tier} score {e.score:.4f} ({where}; {why}): {e.text}"))
    if result.bridge_message:
        console.print(printable(result.bridge_message))


def snapshot_table(items: list[SnapshotInfo], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("id", "session", "type", "reason", "entries", "size", "created (UTC)", "slot file"):
        table.add_column(name, overflow="fold")
    for s in items:
        table.add_row(
            str(s.id),
            printable(s.session_id),
            s.snapshot_type,
            printable(s.reason),
            str(s.entry_count),
            human_bytes(s.size_bytes),
            s.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            printable(s.slot_filename or "-"),
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
        f"restore replaced the active cache of session {printable(result.session_id)} with snapshot "
        f"{result.snapshot_id}: {plural(result.entries_before, 'entry')} "
        f"({human_bytes(result.cache_bytes_before)}) before, "
        f"{plural(result.entries_restored, 'entry')} ({human_bytes(result.cache_size_bytes)}) after"
    )
    if result.slot_n_restored is not None:
        console.print(f"slot restored: {plural(result.slot_n_restored, 'token')}")
    console.print(f"bridge message: {printable(result.bridge_message)}")


def maintenance_result(result: MaintenanceResult, verbose: bool) -> None:
    """Nothing when nothing was (or would be) done, so cron mails nothing.

    A real run prints one summary line (the lists with ``-v``); ``--dry-run`` lists
    every session and snapshot that would go.
    """
    if result.integrity is not None:
        console.print(f"integrity check: {result.integrity}")
    if result.slot_files_deleted:
        console.print(f"deleted {plural(len(result.slot_files_deleted), 'slot file')} no longer needed")
    if result.slot_files_to_delete:  # said even on a quiet run: they fill the server's disk
        console.print(
            f"{plural(len(result.slot_files_to_delete), 'slot file')} no longer needed "
            f"{'would wait' if result.dry_run else 'wait'} in the server's --slot-save-path; set "
            "[llm] slot_save_path to delete them (maintain --json lists them)"
        )
    if not result.did_anything:
        if verbose:
            console.print("nothing to do")
        return
    detail = verbose or result.dry_run
    prefix = "would " if result.dry_run else ""
    if detail:
        for key in result.cleaned_sessions:
            console.print(f"{prefix}release idle session {printable(key)}")
        if result.pruned_snapshot_ids:
            console.print(f"{prefix}prune snapshots {', '.join(map(str, result.pruned_snapshot_ids))}")
        if result.operations_trimmed:
            console.print(f"{prefix}trim {plural(result.operations_trimmed, 'old operation record')}")
        return
    console.print(
        f"released {plural(result.sessions_cleaned, 'idle session')}, pruned "
        f"{plural(result.snapshots_pruned, 'snapshot')}, trimmed "
        f"{plural(result.operations_trimmed, 'operation record')}"
    )


# ----------------------------------------------------------------------------- shapes
STATE_STYLE = {"below": "green", "near": "yellow", "over": "bold red"}
CLEAR_MARK = {"ConversationLimit": "T", "MemoryThreshold": "M"}
MARK_STYLE = {"T": "cyan", "M": "magenta", "C": "blue", "*": "bold"}
EMPTY_SPARK = "·"


def spark_counts(values: list[int]) -> str:
    """Counts as a sparkline in which zero is ``·`` and any non-zero count shows."""
    top = max(values, default=0)
    if top <= 0:
        return EMPTY_SPARK * len(values)
    return "".join(
        EMPTY_SPARK if v <= 0 else SPARK[min(len(SPARK) - 1, max(0, int(v / top * len(SPARK) + 0.5) - 1))]
        for v in values
    )


def usage_bar(fill: float, threshold: float, state: str, width: int = 20) -> Text:
    """``████░░┆░░`` : the cache against its capacity, ``┆`` at the memory threshold."""
    filled = max(0, min(width, int(fill * width + 0.5)))
    if fill > 0 and filled == 0:
        filled = 1
    tick = int(threshold * width + 0.5) if 0 < threshold < 1 else -1
    bar = Text()
    bar.append("█" * filled, style=STATE_STYLE.get(state, ""))
    for i in range(filled, width):
        bar.append("┆" if i == tick else "░", style="dim")
    return bar


def _age(seconds: float) -> str:
    """``45s``, ``12m``, ``3h 20m``, ``2d 4h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _when(iso: str | None) -> str:
    """``2026-12-04 10:00 UTC`` (the store keeps UTC times)."""
    return "-" if not iso else iso[:16].replace("T", " ") + " UTC"


def _resample(values: list[int], marks: list[str], width: int) -> tuple[list[int], list[str], list[int]]:
    """At most ``width`` columns: the peak of each group, its clears merged, its first index."""
    if len(values) <= width:
        return values, marks, list(range(len(values)))
    step = len(values) / width
    out_v: list[int] = []
    out_m: list[str] = []
    firsts: list[int] = []
    for i in range(width):
        lo, hi = int(i * step), max(int((i + 1) * step), int(i * step) + 1)
        out_v.append(max(values[lo:hi]))
        kinds = {m for m in marks[lo:hi] if m != " "}
        out_m.append(" " if not kinds else kinds.pop() if len(kinds) == 1 else "*")
        firsts.append(lo)
    return out_v, out_m, firsts


def usage_chart(
    usage: list[int],
    reasons: list[str | None],
    capacity: int,
    threshold: float,
    width: int = 80,
    height: int = 6,
    first_turn: int = 1,
) -> Text:
    """The sawtooth: cache bytes turn by turn, the threshold line, and clear markers.

    Each column is one turn (or the peak of a few when there are more turns than
    columns): the usage when the turn was decided. A clear at that turn is marked
    below it, ``T`` for the turn limit, ``M`` for the memory threshold (``C`` other,
    ``*`` several kinds in one column); the next column shows the drop.
    """
    label_w = 10
    marks = [" " if r is None else CLEAR_MARK.get(r, "C") for r in reasons]
    cols = max(8, width - label_w - 2)
    values, marks, firsts = _resample(list(usage), marks, cols)
    scale = max(1, min(3, cols // max(1, len(values))))  # short replays: wider bars
    limit = int(capacity * threshold) if capacity > 0 and threshold > 0 else 0
    top = max(max(values, default=0), int(limit / 0.8), 1)  # the threshold line below the top row
    eighths = [int(v / top * height * 8 + 0.5) for v in values]
    line_row = height - 1 - max(0, (int(limit / top * height * 8 + 0.5) - 1) // 8) if limit else -1
    text = Text()
    for row in range(height):
        base = (height - 1 - row) * 8
        if row == 0:
            label = human_bytes(top)
        elif row == line_row:
            label = f"clear {threshold * 100:.0f}%"
        else:
            label = ""
        text.append(f"{label:>{label_w}} ", style="dim")
        text.append("┤" if label else "│", style="dim")
        for value, e in zip(values, eighths, strict=True):
            level = e - base
            style = "red" if limit and value >= limit else "cyan"
            if level >= 8:
                text.append("█" * scale, style=style)
            elif level > 0:
                text.append(SPARK[level - 1] * scale, style=style)
            elif row == line_row:
                text.append("╌" * scale, style="red")
            else:
                text.append(" " * scale)
        text.append("\n")
    text.append(f"{'0':>{label_w}} └", style="dim")
    for mark in marks:
        text.append("─" * (scale - 1))
        text.append("─" if mark == " " else mark, style=MARK_STYLE.get(mark, "dim"))
    text.append("\n")
    axis = [" "] * (len(values) * scale)
    every = 10 if scale == 1 else 5
    for index in range(0, len(values), every):
        label = str(first_turn + firsts[index])
        col = index * scale + scale - 1
        if col + len(label) <= len(axis) + 2:
            axis[col : col + len(label)] = list(label)
    text.append(" " * (label_w + 2) + "".join(axis).rstrip() + "  turn", style="dim")
    return text


def clear_summary(reasons: list[tuple[int, str]]) -> str:
    """``6 clears: 1 turn limit (turn 6), 5 memory (turns 8, 12, 16, 20, 24)``."""
    if not reasons:
        return "no clears"
    groups: dict[str, list[int]] = {}
    for turn, reason in reasons:
        groups.setdefault(reason, []).append(turn)
    names = {"ConversationLimit": "turn limit", "MemoryThreshold": "memory"}
    parts = []
    for reason in sorted(
        groups, key=lambda r: (r not in names, list(names).index(r) if r in names else 0, r)
    ):
        turns = groups[reason]
        shown = ", ".join(map(str, turns[:12])) + (", ..." if len(turns) > 12 else "")
        parts.append(
            f"{len(turns)} {names.get(reason, reason)} (turn{'s' if len(turns) > 1 else ''} {shown})"
        )
    total = len(reasons)
    return f"{total} clear{'s' if total != 1 else ''}: " + ", ".join(parts)


def _chart_title(capacity: int, threshold: float, peak: int, now: int | None = None) -> str:
    """``now``: the session's cache today (a turn's figure is the cache its question found)."""
    shown = f"peak {human_bytes(peak)}" + (f", now {human_bytes(now)}" if now is not None else "")
    return (
        f"cache usage by turn: {shown} of {human_bytes(capacity)}, "
        f"clear at {threshold * 100:.0f}% ({human_bytes(capacity * threshold)}); T turn limit, M memory"
    )


# ----------------------------------------------------------------------------- process
def simple_table(title: str | None = None) -> Table:
    """The compact table style of the stats and process views."""
    return Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
    )


def process_view(result: ProcessResult, threshold: float = 0.6, width: int = 100) -> Group:
    """One replayed conversation: totals, clears, and the sawtooth with its clears."""
    data = result.to_dict(with_turns=False)
    table = simple_table(
        f"replayed session {printable(result.session_id)} ({printable(result.source or '-')})"
    )
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
    parts: list[Any] = [table]
    if result.clears:
        clears = simple_table("clears")
        for name in ("turn", "reason", "cache before", "cleared", "preserved", "snapshot", "summary"):
            clears.add_column(name, justify="right" if name in ("turn", "cleared", "preserved") else "left")
        shown = result.clears if len(result.clears) <= 12 else result.clears[:6] + result.clears[-6:]
        for index, c in enumerate(shown):
            if len(result.clears) > 12 and index == 6:
                clears.add_row("...", f"{len(result.clears) - 12} more", "", "", "", "", "")
            clears.add_row(
                str(c.turn),
                printable(c.reason),
                human_bytes(c.cache_size_bytes_before),
                str(c.entries_cleared),
                str(c.entries_preserved),
                str(c.snapshot_id or "-"),
                c.summary_source or "-",
            )
        parts.append(clears)
    usage = [t.cache_size_bytes for t in result.turns]
    if usage:
        parts.append(Text(_chart_title(result.capacity_bytes, threshold, max(usage)), style="bold"))
        parts.append(
            usage_chart(
                usage,
                [t.clear.reason if t.clear else None for t in result.turns],
                result.capacity_bytes,
                threshold,
                width=width,
                first_turn=result.turns[0].turn,
            )
        )
        parts.append(Text(clear_summary([(c.turn, c.reason) for c in result.clears])))
    bridges = [b for t in result.turns for b in t.bridge_messages]
    if bridges:
        last = bridges[-1].splitlines()[0]
        parts.append(
            Text(
                f"bridge messages: {len(bridges)}; last: {printable(last)}", no_wrap=True, overflow="ellipsis"
            )
        )
    return Group(*parts)


def process_result(result: ProcessResult, threshold: float = 0.6, verbose: bool = False) -> None:
    """One replayed session; ``verbose``: its turns one by one after the summary."""
    console.print(process_view(result, threshold, console.width))
    if verbose:
        console.print(turns_table(result))


def turns_table(result: ProcessResult) -> Table:
    """Every turn: the cache after it and what happened at it (``process -v``)."""
    table = simple_table(f"turns of {printable(result.session_id)}")
    for name in ("turn", "msg", "entries", "cache", "clear", "snapshots", "retrieved"):
        table.add_column(name, justify="left" if name == "clear" else "right")
    for t in result.turns:
        table.add_row(
            str(t.turn),
            str(t.message_index),
            str(t.entry_count),
            human_bytes(t.cache_size_bytes),
            printable(t.clear.reason) if t.clear else "",
            ", ".join(map(str, t.snapshot_ids)),
            str(t.retrieved) if t.retrieval_tiers else "",
        )
    return table


def import_result(result: Any) -> None:
    """One row per imported file (stdout), the totals under it."""
    table = simple_table("imported")
    for name in ("file", "conversations", "new sessions", "messages added", "messages"):
        table.add_column(name, justify="left" if name == "file" else "right")
    for item in result.files:
        table.add_row(
            printable(item.path),
            str(item.conversations),
            str(item.sessions_created),
            str(item.messages_added),
            str(item.messages_total),
        )
    console.print(table)
    files = len(result.files)
    console.print(f"{plural(result.messages_added, 'message')} added from {plural(files, 'file')}")


def copy_result(result: Any) -> None:
    """Each table's copied rows and hash, and the total."""
    table = Table(title=f"copied {result.source} -> {result.destination}")
    for name in ("table", "rows", "sha256", "match"):
        table.add_column(name, justify="right" if name == "rows" else "left")
    for item in result.tables:
        table.add_row(item.table, str(item.dest_rows), item.dest_sha256[:16], "yes" if item.match else "NO")
    console.print(table)
    console.print(f"{plural(result.total_rows, 'row')} copied and verified")


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``1 entry``, ``2 entries``, ``0 sessions``."""
    if count == 1:
        return f"{count} {noun}"
    if plural_form is None:
        plural_form = noun[:-1] + "ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else noun + "s"
    return f"{count} {plural_form}"


# ----------------------------------------------------------------------------- stats
def _totals_panel(data: dict[str, Any], insights: dict[str, Any] | None) -> Panel:
    grid = Table.grid(padding=(0, 2))
    for _ in range(3):
        grid.add_column(style="dim")
        grid.add_column(justify="right")
    states = (insights or {}).get("threshold_states") or {}
    state_text = Text()
    for i, name in enumerate(("over", "near", "below")):
        if i:
            state_text.append(" / ")
        state_text.append(
            f"{states.get(name, 0)} {name}", style=STATE_STYLE[name] if states.get(name) else ""
        )
    used, capacity = data.get("cache_size_bytes", 0), data.get("capacity_bytes", 0)
    note = render_served.capacity_note(data.get("sessions") or [], capacity, human_bytes)
    rows: list[tuple[str, str | Text, str, str, str, str]] = [
        (
            "sessions",
            str(data.get("active_sessions")),
            "clears",
            str(data.get("total_clears")),
            "messages",
            f"{data.get('message_count', 0):,}",
        ),
        (
            "fill",
            state_text,
            "retrievals",
            str(data.get("total_retrievals")),
            "snapshots",
            str(data.get("snapshot_count")),
        ),
        (
            "cache",
            human_bytes(used),
            "preserved",
            str(data.get("entries_preserved")),
            "restores",
            str(data.get("total_restores", 0)),
        ),
        (
            "threshold",
            f"{data.get('memory_threshold_percent', 0) * 100:.0f}% of "
            + ("capacity" if note else human_bytes(capacity)),
            "cleared",
            str(data.get("entries_cleared")),
            "operations",
            f"{data.get('operation_history_count', 0):,}",
        ),
    ]
    for row in rows:
        grid.add_row(*row)
    where = f"{data.get('backend', 'sqlite')}, {human_bytes(data['database_size_bytes'])}"
    # Text, not str: Rich reads a str title as markup (a "[x]" in a path would vanish)
    title = Text(f"kvcache · {printable(data['database'])} ({where})")
    subtitle = Text(f"last operation {_when(data.get('last_operation'))}")
    return Panel(
        Group(grid, Text(note, style="dim")) if note else grid,
        title=title,
        title_align="left",
        subtitle=subtitle,
        subtitle_align="right",
        expand=False,
    )


def _sessions_table(data: dict[str, Any], insights: dict[str, Any], limit: int = 20) -> Table:
    from kvcache_cli.services.insights import NEAR_FRACTION

    threshold = insights.get("memory_threshold_percent", 0.6)
    by_key = {s["session_id"]: s for s in data["sessions"]}
    ordered = insights["sessions_by_fill"]
    table = simple_table("sessions by cache fill (fullest first)")
    table.add_column("session", overflow="ellipsis", max_width=48, no_wrap=True)
    table.add_column("cache vs capacity", no_wrap=True)
    table.add_column("fill", no_wrap=True)
    table.add_column("used", justify="right", no_wrap=True)
    table.add_column("turns", justify="right")
    table.add_column("clears", justify="right")
    table.add_column("idle", justify="right", no_wrap=True)
    served = any(render_served.served(by_key.get(s["session_id"], {})) for s in ordered[:limit])
    if served:  # what ``kvcache serve`` recorded: columns only when a shown session has it
        for name in ("slot", "prompt", "files"):
            table.add_column(name, justify="right", no_wrap=True)
    now = parse_utc(insights["generated_at"])
    for s in ordered[:limit]:
        state = by_key.get(s["session_id"], {})
        fill = Text(f"{s['fill'] * 100:3.0f}% ")
        fill.append(s["threshold_state"], style=STATE_STYLE[s["threshold_state"]])
        last = state.get("last_activity")
        cells: list[Text | str] = [
            printable(s["session_id"]),
            usage_bar(s["fill"], threshold, s["threshold_state"]),
            fill,
            human_bytes(s["cache_size_bytes"]),
            str(state.get("turn_count", "")),
            str(s["total_clears"]),
            _age((now - parse_utc(last)).total_seconds()) if last else "-",
        ]
        if served:
            cells += render_served.served_cells(render_served.served(state))
        table.add_row(*cells)
    caption = (
        f"┆ memory threshold {threshold * 100:.0f}% (a clear at the next turn); "
        f"near from {threshold * NEAR_FRACTION * 100:.0f}%"
    )
    if served:
        caption += "\nserved: last prompt tokens/n_ctx; slot files saved/restored"
    if len(ordered) > limit:
        caption += f"; {plural(len(ordered) - limit, 'more session')} not shown (--json lists all)"
    table.caption = caption
    table.caption_justify = "left"
    return table


def _top_tables(insights: dict[str, Any]) -> Table:
    size = simple_table("largest caches")
    size.add_column("session", overflow="ellipsis", max_width=48, no_wrap=True)
    size.add_column("cache", justify="right")
    size.add_column("fill", justify="right")
    for s in insights["top_by_size"]:
        size.add_row(
            printable(s["session_id"]), human_bytes(s["cache_size_bytes"]), f"{s['fill'] * 100:.0f}%"
        )
    clears = simple_table("most clears")
    clears.add_column("session", overflow="ellipsis", max_width=48, no_wrap=True)
    clears.add_column("clears", justify="right")
    for s in insights["top_by_clears"]:
        clears.add_row(printable(s["session_id"]), str(s["total_clears"]))
    if not insights["top_by_clears"]:
        clears.add_row("(none yet)", "")
    grid = Table.grid(padding=(0, 4))
    grid.add_row(size, clears)
    return grid


def _ops_panel(insights: dict[str, Any]) -> Group:
    """Operations per hour by type over the window, two columns an hour, hour labels below."""
    ops = insights["operations_per_hour"]
    hours = ops["hours"]
    title = Text(f"operations per hour, last {hours} h (UTC, hour starting at the label)", style="italic")
    table = simple_table()
    table.add_column("operation")
    table.add_column("per hour", no_wrap=True)
    table.add_column("total", justify="right")
    table.add_column("peak/h", justify="right")
    for kind, values in ops["series"].items():
        line = "".join(c * 2 for c in spark_counts(values))
        table.add_row(kind, Text(line, style="cyan"), str(sum(values)), str(max(values, default=0)))
    first_hour = int(ops["start"][11:13])
    axis = "".join(f"{(first_hour + h) % 24:02d}{' ' * 10}" for h in range(0, hours, 6))[: hours * 2]
    table.add_row("", Text(axis, style="dim"), "", "")
    return Group(title, table)


def _maintenance_line(insights: dict[str, Any]) -> Text:
    info = insights["maintenance"]
    line = Text("maintenance: ")
    overdue = info["overdue_sessions"]
    if info["keeps_up"]:
        line.append("keeps up", style="green")
        line.append(f"; no session idle over {info['inactive_hours']:g} h holds cache")
    else:
        line.append("behind", style="bold red")
        if overdue:
            line.append(
                f"; {len(overdue)} session{'s' if len(overdue) != 1 else ''} "
                f"idle over {info['inactive_hours']:g} h "
                f"still hold cache (oldest {_age((info['oldest_idle_hours'] or 0) * 3600)})"
            )
        if info["history_over_limit"]:
            line.append("; operation history over its limit")
        line.append("; run kvcache maintain")
    line.append(f"; history {info['operation_history_count']:,} of {info['history_limit']:,} operations")
    return line


def _recent_ops(data: dict[str, Any]) -> Table:
    ops = simple_table("recent operations")
    for name in ("time (UTC)", "operation", "session", "entries", "details"):
        ops.add_column(name, overflow="fold")
    for op in data["recent_operations"]:
        ops.add_row(
            op["timestamp"][:19].replace("T", " "),
            printable(op["operation_type"]),
            printable(op["session_id"]),
            str(op["entries_affected"]),
            printable(op["details"]),
        )
    return ops


def _session_view(data: dict[str, Any], insights: dict[str, Any] | None, width: int) -> list[Any]:
    state = data["sessions"][0]
    detail = data["session"]
    threshold = data.get("memory_threshold_percent", 0.6)
    capacity = state["capacity_bytes"] or data.get("capacity_bytes", 0)
    fill = state["cache_size_bytes"] / capacity if capacity else 0.0
    from kvcache_cli.services.insights import threshold_state

    level = threshold_state(fill, threshold)
    now = parse_utc(insights["generated_at"]) if insights else datetime.now(UTC).replace(tzinfo=None)
    bar = Text("cache  ", style="dim")
    bar.append_text(usage_bar(fill, threshold, level, width=40))
    bar.append(f"  {fill * 100:.0f}% ")
    bar.append(level, style=STATE_STYLE[level])
    bar.append(f"  {human_bytes(state['cache_size_bytes'])} of {human_bytes(capacity)}")
    bar.append(f", clear at {threshold * 100:.0f}%", style="dim")
    meta = state.get("metadata") or {}
    last_clear = _when(state["last_cleared_at"])
    if state["last_cleared_at"] and meta.get("last_clear_reason"):
        last_clear += f" ({printable(meta['last_clear_reason'])})"
    grid = Table.grid(padding=(0, 2))
    for style in ("dim", "", "dim", "", "dim", ""):
        grid.add_column(style=style)
    grid.add_row(
        "turns",
        str(state["turn_count"]),
        "since clear",
        str(state["conversation_count"]),
        "last clear",
        last_clear,
    )
    grid.add_row(
        "entries",
        str(state["entry_count"]),
        "messages",
        f"{detail['message_count']:,}",
        "last active",
        _when(state["last_activity"]),
    )
    grid.add_row(
        "clears", str(state["total_clears"]), "last snapshot", str(state["last_snapshot_id"] or "-"), "", ""
    )
    live = meta.get("serve")  # a session served live by ``kvcache serve``
    if isinstance(live, dict):
        slot = live.get("slot")
        prompt = f"{live.get('last_prompt_tokens', '?')} of n_ctx {live.get('n_ctx', '?')}"
        files = f"{live.get('slot_saves', 0)} saved, {live.get('slot_restores', 0)} restored"
        grid.add_row("slot", "-" if slot is None else str(slot), "last prompt", prompt, "slot files", files)
    parts: list[Any] = [
        Panel(
            Group(bar, grid),
            title=Text(f"session {printable(state['session_id'])}"),
            title_align="left",
            expand=False,
        )
    ]
    snaps = detail["snapshots"]
    if snaps:
        table = simple_table(f"snapshots ({len(snaps)})")
        for name in ("id", "type", "reason", "turn", "entries", "size", "age", "slot file"):
            table.add_column(
                name, justify="right" if name in ("id", "turn", "entries", "size", "age") else "left"
            )
        for s in snaps:
            age = _age((now - parse_utc(s["created_at"])).total_seconds())
            table.add_row(
                str(s["id"]),
                s["snapshot_type"],
                printable(s["reason"]),
                str(s["turn_index"]),
                str(s["entry_count"]),
                human_bytes(s["size_bytes"]),
                age,
                printable(s["slot_filename"] or "-"),
            )
        parts.append(table)
    else:
        parts.append(Text("snapshots: none"))
    sm = detail["summary"]
    if sm:
        parts.append(
            Text(
                f"summary: {sm['length']:,} chars, "
                f"{sm['clear_count']} clear{'s' if sm['clear_count'] != 1 else ''}, "
                f"{plural(sm['messages_summarized'], 'message')} summarized ({printable(sm['source'])})"
            )
        )
    else:
        parts.append(Text("summary: none yet (written at the first clear)"))
    usage = detail["usage"]
    if usage:
        values = [u["cache_size_bytes"] for u in usage]
        title = _chart_title(capacity, threshold, max(values), state["cache_size_bytes"])
        parts.append(Text(title, style="bold"))
        parts.append(
            usage_chart(
                values,
                [u["clear_reason"] if u["cleared"] else None for u in usage],
                capacity,
                threshold,
                width=width,
                first_turn=usage[0]["turn"],
            )
        )
        parts.append(
            Text(clear_summary([(u["turn"], u["clear_reason"] or "Manual") for u in usage if u["cleared"]]))
        )
    return parts


def stats_view(data: dict[str, Any], insights: dict[str, Any] | None = None, width: int = 100) -> Group:
    """Everything ``kvcache stats`` shows, as one renderable (printed, or refreshed live)."""
    return Group(*stats_sections(data, insights, width))


def stats_sections(
    data: dict[str, Any], insights: dict[str, Any] | None = None, width: int = 100
) -> list[Any]:
    """The sections of ``kvcache stats``, most important first."""
    parts: list[Any] = []
    if data.get("session"):
        parts += _session_view(data, insights, width)
    else:
        parts.append(_totals_panel(data, insights))
        if insights and insights["sessions_by_fill"]:
            parts.append(_sessions_table(data, insights))
            parts.append(_top_tables(insights))
        elif not data["sessions"]:
            parts.append(Text("no sessions yet: kvcache process FILE replays a conversation"))
        if insights:
            parts.append(_ops_panel(insights))
            parts.append(_maintenance_line(insights))
    if data.get("slots"):
        slots = simple_table("server slots")
        for name in ("id", "n_ctx", "cached tokens", "processing"):
            slots.add_column(name)
        for s in data["slots"]:
            cached = s.get("n_prompt_tokens")  # None: the slot has served no request yet
            slots.add_row(
                str(s["id"]),
                str(s["n_ctx"]),
                "-" if cached is None else str(cached),
                "yes" if s["is_processing"] else "no",
            )
        parts.append(slots)
    if data["recent_operations"]:
        parts.append(_recent_ops(data))
    return parts


def statistics(data: dict[str, Any], insights: dict[str, Any] | None = None) -> None:
    console.print(stats_view(data, insights, console.width))


def fit_sections(sections: list[Any], footer: Text, width: int, height: int) -> Group:
    """The leading ``sections`` that fit ``height`` lines with ``footer`` under them.

    Lower sections are dropped first (the footer says how many), so a small terminal
    still shows the top of the view and a live redraw never scrolls.
    """
    options = console.options.update(width=width, height=None)
    room = max(1, height - 1 - len(console.render_lines(footer, options, pad=False)))
    kept: list[Any] = []
    for section in sections:
        lines = len(console.render_lines(section, options, pad=False))
        if lines > room:
            break
        kept.append(section)
        room -= lines
    hidden = len(sections) - len(kept)
    if hidden:
        footer = footer.copy()
        footer.append(f" · {hidden} section{'s' if hidden != 1 else ''} hidden")
    return Group(*kept, footer)


def watch_statistics(fetch: Callable[[], tuple[dict[str, Any], dict[str, Any]]], interval: float) -> None:
    """Redraw ``fetch()`` in place every ``interval`` seconds until Ctrl-C (which propagates).

    Each frame fits the terminal as it is now: sections that do not fit are left out,
    lowest first, and anything still too tall is cropped rather than scrolled.
    """
    import time

    from rich.live import Live

    def frame() -> Group:
        data, insights = fetch()
        width, height = console.size
        stamp = Text(
            f"watching every {interval:g} s, Ctrl-C to stop · {time.strftime('%H:%M:%S')}", style="dim"
        )
        return fit_sections(stats_sections(data, insights, width), stamp, width, height)

    with Live(
        frame(),
        console=console,
        auto_refresh=False,
        screen=False,
        vertical_overflow="crop",
        redirect_stdout=False,  # the console writes to sys.stdout itself (see _TrimmedStdout)
        redirect_stderr=False,
    ) as live:
        while True:
            time.sleep(interval)
            live.update(frame(), refresh=True)
