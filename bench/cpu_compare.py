"""CPU time and peak memory of two kvcache installs running the same commands.

Usage: python bench/cpu_compare.py BEFORE_BIN [AFTER_BIN] [--rounds N] [--messages N] [--json]

On a shared machine wall times swing with other jobs (``run_all.py --compare`` saw the
same reference vary 2x between runs); the CPU seconds a command uses (user + system,
its worker processes included) and its peak RSS hardly do. Each command runs for both
installs in every round, the order alternating, ``N`` rounds; medians are reported with
after/before ratios. The commands: ``--help``; ``stats`` on an empty store;
``process`` of the five LoCoMo dev conversations (default workers, and ``--jobs 1``);
``import`` of a generated ShareGPT file; ``stats``, ``stats --json`` and ``maintain``
(on a fresh copy) on ``scale_store.py``'s store of ``--messages`` messages, built by
each install. AFTER_BIN defaults to this interpreter's ``kvcache``.

A child's peak RSS (``wait4``) includes the pages it had when forked from this script,
so a row whose figure is not above this script's own peak RSS shows no RSS (not measured).
"""

# ruff: noqa: E501  (report lines)
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KVCACHE, bench_env, create_store, machine, median, run_cpu, self_peak_rss  # noqa: E402
from gen_sharegpt import cached  # noqa: E402
from locomo_to_conversations import convert_file  # noqa: E402
from process_replay import LOCOMO  # noqa: E402
from scale_store import build  # noqa: E402


def _fresh(db: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    return db


def measure(installs: dict[str, str], rounds: int, messages: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{command: {install: {"cpu_s", "rss_mb"}}}``, medians over ``rounds``."""
    with tempfile.TemporaryDirectory(prefix="kvbench-cpu-") as tmp:
        root = Path(tmp)
        files = [str(convert_file(src, root / "conv")[0]) for src in sorted(LOCOMO.glob("*.json"))]
        source = str(cached(messages))
        folders = {}
        for label, kvcache in installs.items():
            folder = folders[label] = root / label
            folder.mkdir()
            env = bench_env(folder / "home")
            create_store(folder / "empty.db", env, kvcache)
            build(folder, messages, 2000, env, kvcache)  # folder/scale.db
        samples: dict[str, dict[str, list[tuple[float, int]]]] = {}
        order = list(installs)
        for n in range(rounds):
            for label in order if n % 2 == 0 else order[::-1]:
                kv, folder = installs[label], folders[label]
                env = bench_env(folder / "home")
                shutil.copyfile(folder / "scale.db", _fresh(folder / "copy.db"))
                commands = {
                    "--help": [kv, "--help"],
                    "stats (empty store)": [kv, "--db", str(folder / "empty.db"), "stats"],
                    "process LoCoMo": [kv, "--db", str(_fresh(folder / "p.db")), "-q", "process", *files],
                    "process LoCoMo --jobs 1": [
                        kv,
                        "--db",
                        str(_fresh(folder / "p1.db")),
                        "-q",
                        "process",
                        "--jobs",
                        "1",
                        *files,
                    ],
                    f"import {messages:,} messages": [
                        kv,
                        "--db",
                        str(_fresh(folder / "imp.db")),
                        "-q",
                        "import",
                        source,
                    ],
                    "stats (scale store)": [kv, "--db", str(folder / "scale.db"), "stats"],
                    "stats --json (scale store)": [kv, "--db", str(folder / "scale.db"), "stats", "--json"],
                    "maintain (scale store)": [kv, "--db", str(folder / "copy.db"), "maintain"],
                }
                for name, cmd in commands.items():
                    samples.setdefault(name, {}).setdefault(label, []).append(run_cpu(cmd, env))
    return {
        name: {
            label: {"cpu_s": median([c for c, _ in runs]), "rss_mb": median([r / 2**20 for _, r in runs])}
            for label, runs in by_install.items()
        }
        for name, by_install in samples.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="The other install's kvcache script (e.g. a worktree's venv).")
    parser.add_argument("after", nargs="?", default=KVCACHE)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure({"before": args.before, "after": args.after}, args.rounds, args.messages)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    floor = self_peak_rss() / 2**20 * 1.02

    print(
        f"{machine()}; medians of {args.rounds} rounds; RSS at or below this script's {floor:.0f} MB not shown"
    )
    print(
        f"{'command':34s} {'CPU before':>10s} {'after':>8s} {'ratio':>6s}   {'RSS before':>10s} {'after':>8s} {'ratio':>6s}"
    )
    for name, r in result.items():
        b, a = r["before"], r["after"]
        print(
            f"{name:34s} {b['cpu_s']:9.3f}s {a['cpu_s']:7.3f}s {a['cpu_s'] / b['cpu_s']:6.2f}   "
            + (
                f"{b['rss_mb']:8.1f}MB {a['rss_mb']:6.1f}MB {a['rss_mb'] / b['rss_mb']:6.2f}"
                if min(b["rss_mb"], a["rss_mb"]) > floor
                else ""
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
