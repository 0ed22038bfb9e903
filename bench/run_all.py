"""Run every kvcache benchmark and print one table (issue 6 targets).

Usage: python bench/run_all.py [--quick] [--json] [--kvcache BIN] [--compare BIN]

``--quick`` uses smaller sizes (100,000 messages instead of 1,000,000; fewer runs):
a smoke run of the scripts, not the figures of the issue. Each figure is reported
with the reference measured in the same run and their ratio (the machine is shared:
absolute times move with its load, ratios much less). The full run takes about
10-15 minutes on the 2-core machine (the 1M-message file is generated once and
cached in ``$TMPDIR/kvbench-data``).

``--kvcache BIN`` measures another install's ``kvcache`` script (its stores are created
by the ``python`` beside it, so with its own schema). ``--compare BIN`` measures BIN
("before", e.g. ``/tmp/base/.venv/bin/kvcache`` of a worktree of an older commit) and
this install ("after") in the same run, each benchmark for both in turn (the order
alternating from one benchmark to the next), and adds a table of after/before ratios:
raw, and of each figure's ratio to its own same-run reference (load-corrected).
"""

# ruff: noqa: E501  (long SQL and report lines)
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import import_memory  # noqa: E402
import import_throughput  # noqa: E402
import process_replay  # noqa: E402
import scale_store  # noqa: E402
import startup  # noqa: E402
from _common import KVCACHE, machine  # noqa: E402

BARE_TYPER_NOMINAL = 0.18  # s: the figure for the bare app on the target machine
RAW_IMPORT_NOMINAL = 64_000  # messages/s: the raw sqlite3 figure


Bench = Callable[[str], dict[str, Any]]


def benchmarks(quick: bool) -> list[tuple[str, Bench]]:
    """Each benchmark by name, as a function of the ``kvcache`` script it measures."""
    big = 100_000 if quick else 1_000_000
    runs = 1 if quick else 3
    # sizes of at least two import batches (50,000 messages) so the memory plateau shows
    small, large = (100_000, 200_000) if quick else (250_000, big)
    return [
        ("startup", lambda kv: startup.measure(runs=7 if quick else 15, kvcache=kv)),
        ("process", lambda kv: process_replay.measure(runs=runs, kvcache=kv)),
        ("import", lambda kv: import_throughput.measure(messages=big, runs=runs, kvcache=kv)),
        ("memory", lambda kv: import_memory.measure(small=small, large=large, kvcache=kv)),
        ("scale", lambda kv: scale_store.measure(messages=big, runs=runs, kvcache=kv)),
    ]


def measure(quick: bool, installs: list[str]) -> list[dict[str, Any]]:
    """The raw figures of every benchmark for each install; with several, each benchmark
    runs for all of them before the next starts, first-to-last then last-to-first."""
    raws: list[dict[str, Any]] = [{} for _ in installs]
    for n, (name, bench) in enumerate(benchmarks(quick)):
        order = list(range(len(installs)))
        for i in order if n % 2 == 0 else order[::-1]:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {installs[i]}", file=sys.stderr, flush=True)
            raws[i][name] = bench(installs[i])
    return raws


def rows(raw: dict[str, Any]) -> list[list[str]]:
    """The table of one install's figures, each with its reference, ratio and target."""
    table: list[list[str]] = []

    def ok(flag: bool) -> str:
        return "yes" if flag else "NO"

    s = raw["startup"]
    table.append(
        [
            "start-up: kvcache --help",
            f"{s['kvcache_help'] * 1000:.0f} ms",
            f"bare Typer command {s['bare_command'] * 1000:.0f} ms",
            f"{s['help_ratio']:.2f}x",
            "<= 1.2x",
            ok(s["help_ratio"] <= 1.2),
        ]
    )
    table.append(
        [
            "start-up: kvcache stats (empty)",
            f"{s['kvcache_stats'] * 1000:.0f} ms",
            f"bare Typer command {s['bare_command'] * 1000:.0f} ms",
            f"{s['stats_ratio']:.2f}x",
            "<= 1.2x",
            ok(s["stats_ratio"] <= 1.2),
        ]
    )
    p = raw["process"]
    table.append(
        [
            f"replay: process LoCoMo ({p['messages']} dialog / {p['turns']} kvcache turns)",
            f"{p['dialog_turns_per_s']:.0f} dialog turns/s ({p['kvcache_turns_per_s']:.0f} kvcache turns/s)",
            f"raw sqlite3 per-turn {p['reference_dialog_turns_per_s']:.0f}/s",
            f"{p['ratio_to_reference']:.2f}x",
            ">= 1,000 turns/s",
            ok(p["dialog_turns_per_s"] >= 1000),
        ]
    )
    table.append(
        [
            "  the same with --jobs 1 (one process)",
            f"{p['jobs1_dialog_turns_per_s']:.0f} dialog turns/s",
            f"raw sqlite3 per-turn {p['reference_dialog_turns_per_s']:.0f}/s",
            f"{p['reference_seconds'] / p['jobs1_seconds']:.2f}x",
            "(for reference)",
            "-",
        ]
    )
    i = raw["import"]
    big = int(i["messages"])
    # the 25,000/s target is 0.39x of the 64,000/s reference on the target machine
    target_ratio = 25_000 / RAW_IMPORT_NOMINAL
    table.append(
        [
            f"import: {big:,} messages (ShareGPT JSONL)",
            f"{i['kvcache_per_s']:,.0f} msg/s",
            f"raw sqlite3 + rebuild {i['reference_per_s']:,.0f} msg/s",
            f"{i['ratio_to_reference']:.2f}x",
            f">= 25,000/s (= {target_ratio:.2f}x)",
            ok(i["ratio_to_reference"] >= target_ratio),
        ]
    )
    mem = raw["memory"]
    table.append(
        [
            f"memory: import {mem['small_messages']:,.0f} vs {mem['large_messages']:,.0f} messages",
            f"{mem['small_rss_mb']:.0f} MB vs {mem['large_rss_mb']:.0f} MB peak RSS",
            f"kvcache --help {mem['baseline_rss_mb']:.0f} MB",
            f"{mem['large_to_baseline']:.1f}x; large/small {mem['large_to_small']:.2f}",
            "<= 300 MB, flat",
            ok(mem["large_rss_mb"] <= 300 and mem["large_to_small"] <= 1.2),
        ]
    )
    sc = raw["scale"]
    # targets as ratios to the bare Typer app (0.18 s on the target machine)
    table.append(
        [
            f"maintain: {sc['messages']:,.0f} msgs, {sc['sessions']:,.0f} sessions, {sc['snapshots']:,.0f} snapshots",
            f"{sc['maintain_seconds']:.2f} s",
            f"bare Typer --help {sc['bare_typer_seconds']:.2f} s",
            f"{sc['maintain_ratio_to_bare']:.1f}x",
            f"<= 5 s (= {5 / BARE_TYPER_NOMINAL:.0f}x)",
            ok(sc["maintain_ratio_to_bare"] <= 5 / BARE_TYPER_NOMINAL),
        ]
    )
    table.append(
        [
            "stats: same store",
            f"{sc['stats_seconds']:.2f} s (--json {sc['stats_json_seconds']:.2f} s)",
            f"bare Typer --help {sc['bare_typer_seconds']:.2f} s",
            f"{sc['stats_ratio_to_bare']:.1f}x",
            f"<= 0.5 s (= {0.5 / BARE_TYPER_NOMINAL:.1f}x)",
            ok(sc["stats_ratio_to_bare"] <= 0.5 / BARE_TYPER_NOMINAL),
        ]
    )
    return table


# (label, benchmark, figure, its same-run reference or None); all lower-is-better
COMPARED = [
    ("start-up: kvcache --help (s)", "startup", "kvcache_help", "bare_command"),
    ("start-up: kvcache stats, empty (s)", "startup", "kvcache_stats", "bare_command"),
    ("replay: process LoCoMo (s)", "process", "kvcache_seconds", "reference_seconds"),
    ("replay: process --jobs 1 (s)", "process", "jobs1_seconds", "reference_seconds"),
    ("import (s)", "import", "kvcache_seconds", "reference_seconds"),
    ("import: peak RSS (MB)", "import", "kvcache_peak_rss_mb", None),
    ("memory: --help peak RSS (MB)", "memory", "baseline_rss_mb", None),
    ("memory: small import peak RSS (MB)", "memory", "small_rss_mb", None),
    ("memory: large import peak RSS (MB)", "memory", "large_rss_mb", None),
    ("maintain (s)", "scale", "maintain_seconds", "bare_typer_seconds"),
    ("stats (s)", "scale", "stats_seconds", "bare_typer_seconds"),
    ("stats --json (s)", "scale", "stats_json_seconds", "bare_typer_seconds"),
]


def compare_rows(before: dict[str, Any], after: dict[str, Any]) -> list[list[str]]:
    """After/before of each figure (lower is better: above 1 is worse), raw and as a
    ratio to its same-run reference."""
    out = []
    for label, bench, key, ref in COMPARED:
        b, a = float(before[bench][key]), float(after[bench][key])
        raw_ratio = a / b
        if ref is None:
            norm_ratio, norm = raw_ratio, "-"
        else:
            norm_ratio = (a / float(after[bench][ref])) / (b / float(before[bench][ref]))
            norm = f"{norm_ratio:.2f}"
        verdict = "worse" if norm_ratio > 1.10 else "better" if norm_ratio < 0.90 else "same"
        out.append([label, f"{b:.3f}", f"{a:.3f}", f"{raw_ratio:.2f}", norm, verdict])
    return out


def print_table(head: list[str], table: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Smaller sizes, one run each.")
    parser.add_argument("--json", action="store_true", help="Print the raw figures as JSON too.")
    parser.add_argument("--kvcache", default=KVCACHE, help="The install to measure (its kvcache script).")
    parser.add_argument(
        "--compare",
        default=None,
        metavar="BIN",
        help="Another install's kvcache, measured in the same run (before).",
    )
    args = parser.parse_args()
    started = time.time()
    header = machine()
    installs = [args.kvcache] if args.compare is None else [args.compare, args.kvcache]
    raws = measure(args.quick, installs)
    head = ["benchmark", "kvcache", "reference (same run)", "ratio", "target", "met"]
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; {header}{' (quick)' if args.quick else ''}")
    for install, raw in zip(installs, raws, strict=True):
        if args.compare is not None:
            print(f"\n{'before' if install == args.compare else 'after'}: {install}")
        print_table(head, rows(raw))
    if args.compare is not None:
        print("\nafter / before (lower is better; 'vs reference': each figure over its same-run reference)")
        print_table(
            ["figure", "before", "after", "after/before", "vs reference", "verdict (10%)"],
            compare_rows(raws[0], raws[1]),
        )
    print(f"({time.time() - started:.0f} s)")
    if args.json:
        data: Any = raws[0] if args.compare is None else {"before": raws[0], "after": raws[1]}
        print(json.dumps(data, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
