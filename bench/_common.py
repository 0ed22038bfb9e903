"""Shared helpers of the benchmark scripts: timing subprocesses, medians, machine facts."""

from __future__ import annotations

import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
KVCACHE = (
    str(Path(PYTHON).parent / "kvcache")
    if (Path(PYTHON).parent / "kvcache").exists()
    else (shutil.which("kvcache") or "kvcache")
)


PYCACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "kvbench-pycache")


def bench_env(home: Path) -> dict[str, str]:
    """The environment for a kvcache child: a private KVCACHE_HOME, no config, no server."""
    env = dict(os.environ)
    env["KVCACHE_HOME"] = str(home)
    # As installed for operators: bytecode cached (this sandbox sets PYTHONDONTWRITEBYTECODE,
    # which would recompile every module at each start). The cache lives outside the tree.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = PYCACHE
    for name in ("KVCACHE_DB", "KVCACHE_CONFIG"):
        env.pop(name, None)
    return env


def run_timed(cmd: Sequence[str], env: dict[str, str] | None = None, check: bool = True) -> float:
    """Wall seconds of one run of ``cmd`` (output discarded)."""
    started = time.perf_counter()
    proc = subprocess.run(list(cmd), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return elapsed


def install_python(kvcache: str) -> str:
    """The Python of the install whose ``kvcache`` script this is (the one beside it), else ours."""
    beside = Path(kvcache).parent / "python"
    return str(beside) if Path(kvcache).parent != Path() and beside.exists() else PYTHON


def create_store(db: Path | str, env: dict[str, str] | None = None, kvcache: str = KVCACHE) -> None:
    """Create and migrate an empty store at ``db`` with ``kvcache``'s own code and schema
    (read-only commands refuse a missing file). ``-P``: the package comes from that install,
    not from the current folder."""
    code = "import sys; from kvcache_cli.store.backend import open_store; open_store(sys.argv[1]).close()"
    subprocess.run([install_python(kvcache), "-P", "-c", code, str(db)], env=env, check=True)


def _run_child(cmd: Sequence[str], env: dict[str, str] | None, quiet_stderr: bool) -> resource.struct_rusage:
    """Fork and exec ``cmd`` with stdout (and, if ``quiet_stderr``, stderr) discarded;
    wait for it and return its ``resource`` usage (``RuntimeError`` if it failed)."""
    pid = os.fork()
    if pid == 0:  # child: exec with output discarded
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        if quiet_stderr:
            os.dup2(devnull, 2)
        try:
            os.execvpe(cmd[0], list(cmd), env or dict(os.environ))
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({os.waitstatus_to_exitcode(status)})")
    return usage


def run_rusage(cmd: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``cmd`` as a child process."""
    started = time.perf_counter()
    usage = _run_child(cmd, env, quiet_stderr=False)
    return time.perf_counter() - started, usage.ru_maxrss * 1024  # Linux: kilobytes


def run_wall_cpu(cmd: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run of ``cmd`` (output discarded)."""
    started = time.perf_counter()
    usage = _run_child(cmd, env, quiet_stderr=True)
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def run_cpu(cmd: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """CPU seconds (user + system, of ``cmd`` and the children it waited for) and peak
    RSS (bytes) of ``cmd``: on a shared machine these move far less with load than wall time."""
    usage = _run_child(cmd, env, quiet_stderr=True)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    """One line: cores, memory, Python, SQLite, CPU model."""
    import sqlite3

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GiB RAM, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, load {load:.1f}"
    )


def self_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


#: The line ``kvcache serve`` prints on stderr once it listens.
SERVE_LISTEN_RE = re.compile(r"listening on (http://\S+?),")


def start_serve(
    command: Sequence[str], env: dict[str, str], err: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``command`` (a ``kvcache ... serve --port 0`` line) with stderr to ``err``;
    wait for its listening line and return the process and its URL."""
    proc = subprocess.Popen(list(command), env=env, stdout=subprocess.DEVNULL, stderr=err.open("w"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = SERVE_LISTEN_RE.search(err.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"kvcache serve did not start: {err.read_text()}")
