"""Write docs/cli.md from the commands' own help (run: python docs/generate_cli_md.py).

Walks the Typer app's click command tree and records each command's usage, help and
options as plain text at a fixed width, so the file is the same on every machine.
``tests/test_docs_cli.py`` fails when the committed file differs from a fresh render.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

WIDTH = 100
TARGET = Path(__file__).with_name("cli.md")


def command_help(command: Any, name: str, parent: Any | None) -> str:
    """One command's ``--help`` text, plain, at ``WIDTH`` columns."""
    ctx = command.make_context(  # with the app's context settings (-h as well as --help)
        name, [], parent=parent, resilient_parsing=True, terminal_width=WIDTH, max_content_width=WIDTH
    )
    return command.get_help(ctx).rstrip() + "\n"


def render() -> str:
    """The whole of docs/cli.md."""
    os.environ["COLUMNS"] = str(WIDTH)
    os.environ["TERMINAL_WIDTH"] = str(WIDTH)
    os.environ["NO_COLOR"] = "1"
    import typer

    from kvcache_cli.cli import app

    root: Any = typer.main.get_command(app)
    root_ctx = root.make_context(
        "kvcache", [], resilient_parsing=True, terminal_width=WIDTH, max_content_width=WIDTH
    )
    parts = [
        "# kvcache command line\n",
        "Generated from the commands' own `--help` by `docs/generate_cli_md.py`; do not edit by hand",
        "(`tests/test_docs_cli.py` fails when this file is stale: rerun the generator).\n",
        "## kvcache\n",
        "```text\n" + command_help(root, "kvcache", None) + "```\n",
    ]
    for name in root.list_commands(root_ctx):
        sub = root.get_command(root_ctx, name)
        if sub is None or getattr(sub, "hidden", False):
            continue
        parts.append(f"## kvcache {name}\n")
        parts.append("```text\n" + command_help(sub, name, root_ctx) + "```\n")
    return "\n".join(parts)


def main() -> int:
    TARGET.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {TARGET}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
