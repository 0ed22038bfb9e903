"""Redraw the screens in this folder from the installed ``kvcache`` and ``examples/``.

Run ``python docs/screens/generate.py [--kvcache BIN]``. Each command runs on a
pseudo-terminal 100 columns wide (so it draws what a person sees: bars, sparklines,
colour) with the default settings and no config file:

- ``process``: ``kvcache process examples/support-chat.json`` into a fresh store (the
  run the README shows);
- ``stats`` and ``stats-session``: ``kvcache stats`` and ``kvcache stats support-4821``
  over every example conversation, their timestamps moved into the last 20 hours (one
  conversation ending every few hours) so that the operations-per-hour chart has
  something to show.

Each screen is written as ``NAME.ansi`` (the raw terminal output), ``NAME.txt`` (the
same without escape codes) and ``NAME.svg`` (Rich's terminal export).
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
EXAMPLES = ROOT / "examples"
COLUMNS, ROWS = 100, 60
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def on_terminal(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """What ``cmd`` writes to stdout when stdout is a terminal of COLUMNS x ROWS."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode(errors='replace')}")
    return b"".join(chunks).decode("utf-8").replace("\r\n", "\n")


def shifted_examples(out: Path, now: datetime) -> list[Path]:
    """The example conversations as native files whose messages end in the last hours."""
    from kvcache_cli.loaders import load_file

    conversations = [conv for path in sorted(EXAMPLES.glob("*.json*")) for conv in load_file(str(path))]
    files = []
    for i, conv in enumerate(conversations):  # the last one processed ends 2 h ago
        end = now - timedelta(hours=2 + 3 * (len(conversations) - 1 - i))
        stamps = [m.timestamp for m in conv.messages if m.timestamp]
        shift = end - max(stamps) if stamps else timedelta(0)
        messages = []
        for n, m in enumerate(conv.messages):
            when = m.timestamp + shift if m.timestamp else end - timedelta(minutes=len(conv.messages) - n)
            messages.append({"role": m.role, "content": m.content, "timestamp": f"{when.isoformat()}Z"})
        path = out / f"{i}.json"
        path.write_text(json.dumps({"session_id": conv.session_key, "messages": messages}), encoding="utf-8")
        files.append(path)
    return files


def write_screen(name: str, text: str, title: str) -> None:
    """``NAME.ansi``, ``NAME.txt`` and ``NAME.svg`` of one screen."""
    from rich.console import Console
    from rich.text import Text

    (HERE / f"{name}.ansi").write_text(text, encoding="utf-8")
    plain = "\n".join(line.rstrip() for line in ESCAPE.sub("", text).split("\n"))
    (HERE / f"{name}.txt").write_text(plain, encoding="utf-8")
    console = Console(record=True, width=COLUMNS, file=io.StringIO(), force_terminal=True)
    console.print(Text.from_ansi(text), end="")
    console.save_svg(str(HERE / f"{name}.svg"), title=title)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(sys.executable).parent / "kvcache"
    parser.add_argument("--kvcache", default=str(default) if default.exists() else shutil.which("kvcache"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvcache-screens-") as tmp:
        folder = Path(tmp)
        env: dict[str, Any] = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("KVCACHE") and k not in ("COLUMNS", "LINES")
        }
        env.update(KVCACHE_HOME=str(folder / "home"), TERM="xterm-256color", COLORTERM="truecolor")
        env.pop("NO_COLOR", None)
        kv = args.kvcache
        process = on_terminal(
            [kv, "--db", str(folder / "demo.db"), "process", "examples/support-chat.json"], ROOT, env
        )
        write_screen("process", process, "kvcache process examples/support-chat.json")
        now = datetime.now(UTC).replace(microsecond=0, tzinfo=None)  # the loader's naive UTC
        files = shifted_examples(folder, now)
        subprocess.run(
            [kv, "--db", "kv.db", "-q", "process", *map(str, files)],
            cwd=folder,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        write_screen("stats", on_terminal([kv, "--db", "kv.db", "stats"], folder, env), "kvcache stats")
        session = on_terminal([kv, "--db", "kv.db", "stats", "support-4821"], folder, env)
        write_screen("stats-session", session, "kvcache stats support-4821")
    print(f"wrote process, stats and stats-session (.ansi, .txt, .svg) in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
