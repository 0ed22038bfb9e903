"""Shell completion scripts: committed copies are current, and bash really completes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import REPO, cli_env

COMPLETIONS = REPO / "completions"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kvcache_completions_generate", COMPLETIONS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_scripts_are_current(tmp_path: Path) -> None:
    gen = generator()
    written = gen.write_all(tmp_path)
    assert len(written) == 3
    for path in written:
        committed = COMPLETIONS / path.name
        assert committed.exists(), f"{committed} missing: run python completions/generate.py"
        assert committed.read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
            f"{committed.name} is stale: run python completions/generate.py"
        )


def test_scripts_name_the_program() -> None:
    assert "complete -o default -F _kvcache_completion kvcache" in (COMPLETIONS / "kvcache.bash").read_text()
    assert "#compdef kvcache" in (COMPLETIONS / "_kvcache").read_text()
    assert "complete --command kvcache" in (COMPLETIONS / "kvcache.fish").read_text()


def bash_complete(words: list[str], tmp_path: Path) -> list[str]:
    """Source the committed bash script and run its completion function on ``words``."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "kvcache").exists():
        pytest.skip("the kvcache script is not installed beside this interpreter")
    quoted = " ".join(f"'{w}'" for w in words)
    script = (
        f"source '{COMPLETIONS / 'kvcache.bash'}'\n"
        f"COMP_WORDS=({quoted})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_kvcache_completion kvcache\n"
        "printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    env = cli_env(tmp_path)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_a_command(tmp_path: Path) -> None:
    assert bash_complete(["kvcache", "pro"], tmp_path) == ["process"]
    assert set(bash_complete(["kvcache", "s"], tmp_path)) == {"serve", "sessions", "snapshot", "stats"}
    assert "--json" in bash_complete(["kvcache", "stats", "--j"], tmp_path)
