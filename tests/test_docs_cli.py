"""docs/cli.md is generated from the commands' own help and must not be stale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_md_is_current() -> None:
    code = "import sys; sys.path.insert(0, 'docs'); import generate_cli_md as g; sys.stdout.write(g.render())"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert proc.stdout == committed, "docs/cli.md is stale: run `python docs/generate_cli_md.py`"


def test_cli_md_documents_every_command() -> None:
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for name in ("process", "clear", "retrieve", "snapshot", "restore", "maintain", "stats", "init-config"):
        assert f"## kvcache {name}\n" in text
    assert "--watch" in text and "--interval" in text
    assert "\x1b[" not in text


def test_readme_test_command_is_what_ci_runs() -> None:
    """The README's test command line is the one ``.ci/run`` runs, word for word."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    command = next(line for line in readme if line.startswith("python3 -m venv") and "[test]" in line)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in ci
    assert ci[-1] == command  # run last, after the PostgreSQL set-up
