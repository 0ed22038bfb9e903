"""Run every kvcache benchmark and print one table (issue 6 targets).

Usage: python bench/run_all.py [--quick] [--json]

``--quick`` uses smaller sizes (100,000 messages instead of 1,000,000; fewer runs):
a smoke run of the scripts, not the figures of the issue. Each figure is reported
with the reference measured in the same run and their ratio (the machine is shared:
absolute times move with its load, ratios much less). The full run takes about
10-15 minutes on the 2-core machine (the 1M-message file is generated once and
cached in ``$TMPDIR/kvbench-data``).
"""

# ruff: noqa: E501  (long SQL and report lines)
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import import_memory  # noqa: E402
import import_throughput  # noqa: E402
import process_replay  # noqa: E402
import scale_store  # noqa: E402
import startup  # noqa: E402
from _common import machine  # noqa: E402

BARE_TYPER_NOMINAL = 0.18  # s: the figure for the bare app on the target machine
RAW_IMPORT_NOMINAL = 64_000  # messages/s: the raw sqlite3 figure


def rows(quick: bool) -> tuple[list[list[str]], dict[str, Any]]:
    big = 100_000 if quick else 1_000_000
    runs = 1 if quick else 3
    raw: dict[str, Any] = {}
    table: list[list[str]] = []

    def ok(flag: bool) -> str:
        return "yes" if flag else "NO"

    s = startup.measure(runs=7 if quick else 15)
    raw["startup"] = s
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
    p = process_replay.measure(runs=runs)
    raw["process"] = p
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
    i = import_throughput.measure(messages=big, runs=runs)
    raw["import"] = i
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
    # sizes of at least two import batches (50,000 messages) so the plateau shows
    mem = import_memory.measure(small=100_000 if quick else 250_000, large=200_000 if quick else big)
    raw["memory"] = mem
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
    sc = scale_store.measure(messages=big, runs=runs)
    raw["scale"] = sc
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
    return table, raw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Smaller sizes, one run each.")
    parser.add_argument("--json", action="store_true", help="Print the raw figures as JSON too.")
    args = parser.parse_args()
    started = time.time()
    header = machine()
    table, raw = rows(args.quick)
    head = ["benchmark", "kvcache", "reference (same run)", "ratio", "target", "met"]
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; {header}{' (quick)' if args.quick else ''}")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(f"({time.time() - started:.0f} s)")
    if args.json:
        print(json.dumps(raw, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
