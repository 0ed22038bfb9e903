"""Regenerate the shell completion scripts in this folder from the Typer app.

Run ``python completions/generate.py`` after changing commands or options. Each script
is what ``_KVCACHE_COMPLETE=source_<shell> kvcache`` prints; the scripts call the
installed ``kvcache`` at completion time, so they stay valid as options change, but
they are regenerated here so that a stale copy is caught by the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHELLS = {"bash": "kvcache.bash", "zsh": "_kvcache", "fish": "kvcache.fish"}
_RUN_APP = "import sys; sys.argv = ['kvcache']; from kvcache_cli.cli import app; app(prog_name='kvcache')"


def render(shell: str) -> str:
    """The completion script for ``shell`` as the app prints it."""
    env = dict(os.environ, _KVCACHE_COMPLETE=f"source_{shell}")
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_APP], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"completion script for {shell} failed: {proc.stderr.strip()}")
    return proc.stdout.strip("\n") + "\n"


def write_all(folder: Path = HERE) -> list[Path]:
    """Write every shell's script into ``folder``; returns the paths written."""
    written = []
    for shell, name in SHELLS.items():
        path = folder / name
        path.write_text(render(shell), encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    for path in write_all():
        print(path)


if __name__ == "__main__":
    main()
