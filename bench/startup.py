"""Start-up time: ``kvcache --help`` and ``kvcache stats`` (empty store) vs a bare Typer app.

Usage: python bench/startup.py [--runs N] [--kvcache BIN] [--before BIN] [--instructions] [--json]

The reference is a bare Typer app with seven no-op subcommands, written to a temp file,
run as ``python app.py --help`` and *running a command* (``python app.py stats S
--history 3``: Typer converts the parameters through pydantic, which kvcache's commands
pay too). All commands are run interleaved (one of each per round, so machine load hits
all alike) ``N`` times; the figures are medians of wall and of CPU time (user + system:
it moves far less with the machine's load) and the ratios kvcache / bare command.
Target: <= 1.2.

The floor: the same bare app whose ``stats`` also imports what ``kvcache stats`` cannot
do without (Rich's console, table and panel; peewee, with sqlite3), opens the store and
prints one Rich table in a panel. ``kvcache stats`` cannot start faster than that.

``--before BIN``: another install's ``kvcache stats`` in the same rounds (before/after).
``--instructions``: also count each command's CPU instructions once under valgrind's
cachegrind (exact and independent of the machine's load; needs ``valgrind``).
"""

# ruff: noqa: E501  (long SQL and report lines)
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    KVCACHE,
    bench_env,
    create_store,
    install_python,
    machine,
    median,
    run_wall_cpu,
)

BARE_APP = '''
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True)


@app.command()
def process() -> None:
    """No-op."""


@app.command()
def clear() -> None:
    """No-op."""


@app.command()
def retrieve() -> None:
    """No-op."""


@app.command()
def snapshot() -> None:
    """No-op."""


@app.command()
def restore() -> None:
    """No-op."""


@app.command()
def maintain() -> None:
    """No-op."""


@app.command()
def stats(session: Optional[str] = typer.Argument(None), history: int = typer.Option(10)) -> None:
    """No-op with parameters, as a real command has."""


@app.command()
def stats_full(
    session: Optional[str] = typer.Argument(None),
    history: int = typer.Option(10),
    server: Optional[str] = typer.Option(None),
    as_json: bool = typer.Option(False, "--json"),
    watch: bool = typer.Option(False),
    interval: float = typer.Option(2.0),
    db: Optional[str] = typer.Option(None),
    config: Optional[str] = typer.Option(None),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """No-op with the parameters of kvcache stats (its own six and the four global options)."""


if __name__ == "__main__":
    app()
'''

#: The bare app's ``stats`` doing the least ``kvcache stats`` must: import Rich and
#: peewee, open the SQLite store (argv: its path), print one table in a panel.
FLOOR_APP = BARE_APP.replace(
    "import typer\n",
    "import typer\nimport peewee\nfrom rich.console import Console\nfrom rich.panel import Panel\n"
    "from rich.table import Table\n",
    1,
).replace(
    '''    """No-op with parameters, as a real command has."""''',
    '''    """Open the store, count its tables, print one Rich table in a panel."""
    db = peewee.SqliteDatabase(session)
    count = db.execute_sql("SELECT count(*) FROM sqlite_master").fetchone()[0]
    db.close()
    table = Table("name", "value")
    table.add_row("objects", str(count))
    Console().print(Panel(table, title="floor"))''',
)
assert FLOOR_APP != BARE_APP


def commands(folder: Path, kvcache: str, before: str | None) -> dict[str, list[str]]:
    """The commands measured (apps written to ``folder``, stores made there)."""
    python = install_python(kvcache)  # the references run on the measured install's Python
    app, floor = folder / "app.py", folder / "floor.py"
    app.write_text(BARE_APP)
    floor.write_text(FLOOR_APP)
    env = bench_env(folder / "home")
    db = folder / "empty.db"
    create_store(db, env, kvcache)  # create + migrate
    out = {
        "bare_help": [python, str(app), "--help"],
        "bare_command": [python, str(app), "stats", "S", "--history", "3"],
        "bare_same_params": [python, str(app), "stats-full", "S", "--history", "3"],
        "bare_floor": [python, str(floor), "stats", str(db), "--history", "3"],
        "kvcache_help": [kvcache, "--help"],
        "kvcache_stats": [kvcache, "--db", str(db), "stats"],
        "kvcache_stats_json": [kvcache, "--db", str(db), "stats", "--json"],
    }
    if before:
        before_db = folder / "before.db"
        create_store(before_db, env, before)
        out["before_stats"] = [before, "--db", str(before_db), "stats"]
    return out


def instructions(cmd: list[str], env: dict[str, str]) -> int:
    """CPU instructions ``cmd`` executes (user space, valgrind's cachegrind ``I refs``)."""
    proc = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", *cmd],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind: {proc.stderr[-300:]}")
    return int(found.group(1).replace(",", ""))


#: ratio name -> (command, reference command)
RATIOS = {
    "help_ratio": ("kvcache_help", "bare_command"),
    "stats_ratio": ("kvcache_stats", "bare_command"),
    "stats_json_ratio": ("kvcache_stats_json", "bare_command"),
    "floor_ratio": ("bare_floor", "bare_command"),
    "before_stats_ratio": ("before_stats", "bare_command"),
    "help_ratio_to_bare_help": ("kvcache_help", "bare_help"),
    "stats_ratio_same_params": ("kvcache_stats", "bare_same_params"),
    "stats_ratio_to_floor": ("kvcache_stats", "bare_floor"),
}


def measure(
    runs: int = 15, kvcache: str = KVCACHE, before: str | None = None, count_instructions: bool = False
) -> dict[str, float]:
    """Median seconds (wall; ``_cpu``: CPU) of each command and the ratios to the bare
    app's command (``kvcache``: which install; ``before``: another one, compared in the
    same rounds; ``count_instructions``: also ``_instructions``, counted once each)."""
    with tempfile.TemporaryDirectory(prefix="kvbench-startup-") as tmp:
        folder = Path(tmp)
        cmds = commands(folder, kvcache, before)
        env = bench_env(folder / "home")
        for cmd in cmds.values():  # warm the page cache and the bytecode cache
            run_wall_cpu(cmd, env)
        walls: dict[str, list[float]] = {name: [] for name in cmds}
        cpus: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(runs):
            for name, cmd in cmds.items():
                wall, cpu = run_wall_cpu(cmd, env)
                walls[name].append(wall)
                cpus[name].append(cpu)
        out = {name: median(values) for name, values in walls.items()}
        out.update({f"{name}_cpu": median(values) for name, values in cpus.items()})
        if count_instructions:
            out.update({f"{name}_instructions": float(instructions(cmd, env)) for name, cmd in cmds.items()})
    out["load"] = os.getloadavg()[0]
    for suffix in ("", "_cpu", "_instructions") if count_instructions else ("", "_cpu"):
        for ratio, (name, reference) in RATIOS.items():
            if name + suffix in out:
                out[ratio + suffix] = out[name + suffix] / out[reference + suffix]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--kvcache", default=KVCACHE, help="the kvcache script to measure")
    parser.add_argument("--before", help="another install's kvcache script, measured in the same rounds")
    parser.add_argument("--instructions", action="store_true", help="also count instructions (valgrind)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.runs, args.kvcache, args.before, args.instructions)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(machine())
    columns: list[tuple[str, str, float]] = [("", "wall ms", 1000), ("_cpu", "CPU ms", 1000)]
    if args.instructions:
        columns.append(("_instructions", "instr. M", 1e-6))
    rows = [
        ("bare Typer app --help", "bare_help", None),
        ("bare Typer app stats S (reference)", "bare_command", None),
        ("bare app, stats's parameters", "bare_same_params", None),
        ("floor: bare + Rich + peewee + 1 table", "bare_floor", "floor_ratio"),
        ("kvcache --help", "kvcache_help", "help_ratio"),
        ("kvcache stats (empty db)", "kvcache_stats", "stats_ratio"),
        ("kvcache stats --json", "kvcache_stats_json", "stats_json_ratio"),
    ]
    if args.before:
        rows.append(("before: kvcache stats", "before_stats", "before_stats_ratio"))
    header = "".join(f"{label:>12} {'ratio':>6}" for _, label, _ in columns)
    print(f"{'':40}{header}")
    for title, key, ratio in rows:
        cells = ""
        for suffix, _, scale in columns:
            shown = f"{result[ratio + suffix]:.2f}x" if ratio else ""
            cells += f"{result[key + suffix] * scale:12.0f} {shown:>6}"
        print(f"{title:40}{cells}")
    print(
        f"ratios: to the bare app's command (target <= 1.2x); kvcache stats / floor: "
        f"{result['stats_ratio_to_floor']:.2f}x wall, {result['stats_ratio_to_floor_cpu']:.2f}x CPU"
        + (f", {result['stats_ratio_to_floor_instructions']:.2f}x instructions" if args.instructions else "")
        + f"; load {result['load']:.1f} at the end"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
