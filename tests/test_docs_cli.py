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


def _console_block(command: str) -> str:
    """The output the README shows under ``$ COMMAND`` in a console block."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(f"$ {command}") + 1
    end = lines.index("```", start)
    return "\n".join(lines[start:end]) + "\n"


def test_readme_examples_are_what_the_commands_print(tmp_path: Path) -> None:
    """The README's ``process`` and ``retrieve`` examples, run as shown on a 100-column
    screen, print exactly what the README says they print. The installed script, not
    ``invoke``: the output's width is fixed when the CLI is first imported in a process."""
    from tests.helpers import run_kvcache

    process = "kvcache --db demo.db process examples/support-chat.json"
    question = "which index did we create on geo_lookup?"
    retrieve = f'kvcache --db demo.db retrieve support-4821 "{question}" --limit 3'
    db = tmp_path / "demo.db"
    runs = []
    for args in (
        ["process", "examples/support-chat.json"],
        ["retrieve", "support-4821", question, "--limit", "3"],
    ):
        rc, out, err = run_kvcache(*args, home=tmp_path, db=db, cwd=ROOT, env={"COLUMNS": "100"})
        assert rc == 0, err
        runs.append(out)
    assert runs[0] == _console_block(process), "README's process example is stale"
    assert runs[1] == _console_block(retrieve), "README's retrieve example is stale"
