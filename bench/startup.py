"""Start-up time: ``kvcache --help`` and ``kvcache stats`` (empty store) vs a bare Typer app.

Usage: python bench/startup.py [--runs N] [--json]

The reference is a bare Typer app with seven no-op subcommands, written to a temp file,
run as ``python app.py --help`` and *running a command* (``python app.py stats S
--history 3``: Typer converts the parameters through pydantic, which kvcache's commands
pay too). All commands are run interleaved (one of each per round, so machine load hits
all alike) ``N`` times; the figures are medians and the ratios kvcache / bare command.
Target: <= 1.2.
"""

# ruff: noqa: E501  (long SQL and report lines)
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KVCACHE, PYTHON, bench_env, create_store, machine, median, run_timed  # noqa: E402

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


def measure(runs: int = 15, kvcache: str = KVCACHE) -> dict[str, float]:
    """Median seconds of each command and the ratios to the bare app (``kvcache``: which install)."""
    with tempfile.TemporaryDirectory(prefix="kvbench-startup-") as tmp:
        folder = Path(tmp)
        app = folder / "app.py"
        app.write_text(BARE_APP)
        env = bench_env(folder / "home")
        db = folder / "empty.db"
        create_store(db, env, kvcache)  # create + migrate
        commands = {
            "bare_help": [PYTHON, str(app), "--help"],
            "bare_command": [PYTHON, str(app), "stats", "S", "--history", "3"],
            "bare_same_params": [PYTHON, str(app), "stats-full", "S", "--history", "3"],
            "kvcache_help": [kvcache, "--help"],
            "kvcache_stats": [kvcache, "--db", str(db), "stats"],
        }
        for cmd in commands.values():  # warm the page cache
            run_timed(cmd, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):
            for name, cmd in commands.items():
                times[name].append(run_timed(cmd, env))
    out = {name: median(values) for name, values in times.items()}
    out["help_ratio"] = out["kvcache_help"] / out["bare_command"]
    out["help_ratio_to_bare_help"] = out["kvcache_help"] / out["bare_help"]
    out["stats_ratio"] = out["kvcache_stats"] / out["bare_command"]
    out["stats_ratio_same_params"] = out["kvcache_stats"] / out["bare_same_params"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(machine())
    print(f"bare Typer app --help      {result['bare_help'] * 1000:7.0f} ms")
    print(f"bare Typer app stats S     {result['bare_command'] * 1000:7.0f} ms  (reference)")
    print(
        f"kvcache --help             {result['kvcache_help'] * 1000:7.0f} ms  {result['help_ratio']:.2f}x  (target <= 1.2x; {result['help_ratio_to_bare_help']:.2f}x bare --help)"
    )
    print(
        f"kvcache stats (empty db)   {result['kvcache_stats'] * 1000:7.0f} ms  {result['stats_ratio']:.2f}x  (target <= 1.2x)"
    )
    print(
        f"bare app, stats's params   {result['bare_same_params'] * 1000:7.0f} ms  kvcache stats is {result['stats_ratio_same_params']:.2f}x this"
        " (Typer builds a pydantic adapter per parameter)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
