"""Start-up: what a command imports. Each module a command does not use costs every run
(bench/startup.py measures the time; these tests keep the savings from regressing).

Each case runs the installed script with ``PYTHONPROFILEIMPORTTIME=1``, so the modules
it imported are listed on stderr; nothing is patched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcache_cli.store.backend import open_store
from tests.helpers import EXAMPLES, run_kvcache

#: Never needed by a command that talks to no server and draws no progress bar.
NETWORK_AND_SYSTEM = {
    "requests",
    "urllib3",
    "psutil",
    "typer.rich_utils",
    "rich.progress",
    "rich.live",
}
#: Rich: drawing tables, which ``--json`` output does not do.
RICH = {"rich", "rich.console", "rich.table"}


def imported_modules(*args: str, home: Path, db: Path) -> set[str]:
    """The modules ``kvcache --db DB ARGS`` imports (it must succeed)."""
    rc, _out, err = run_kvcache(*args, home=home, db=db, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert rc == 0, err
    names = {line.rsplit("|", 1)[1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert "kvcache_cli.cli.app" in names  # the listing is there
    return names


@pytest.fixture
def empty_store(tmp_path: Path) -> Path:
    db = tmp_path / "empty.db"
    open_store(str(db)).close()
    return db


@pytest.mark.parametrize(
    ("args", "absent"),
    [
        (("stats",), NETWORK_AND_SYSTEM),
        (("stats", "--json"), NETWORK_AND_SYSTEM | RICH),
        (("maintain",), NETWORK_AND_SYSTEM | {"kvcache_cli.services.manager"}),
        (("maintain", "--json"), NETWORK_AND_SYSTEM | RICH | {"kvcache_cli.services.manager"}),
        (("sessions", "--json"), NETWORK_AND_SYSTEM | RICH),
    ],
)
def test_a_command_imports_only_what_it_uses(
    args: tuple[str, ...], absent: set[str], empty_store: Path, tmp_path: Path
) -> None:
    names = imported_modules(*args, home=tmp_path / "home", db=empty_store)
    assert names & absent == set()


def test_maintain_builds_no_llm_client_even_with_a_server_configured(
    empty_store: Path, tmp_path: Path
) -> None:
    """``maintain`` talks to no server: an ``[llm]`` section does not make it import an HTTP client."""
    config = tmp_path / "kvcache.toml"
    config.write_text('[llm]\nbase_url = "http://127.0.0.1:9"\n')
    names = imported_modules(
        "--config", str(config), "maintain", "--json", home=tmp_path / "home", db=empty_store
    )
    assert "kvcache_cli.services.maintain" in names
    assert names & {"requests", "kvcache_cli.llm.client"} == set()


def test_json_output_of_a_replay_and_a_search_imports_no_rich(empty_store: Path, tmp_path: Path) -> None:
    """``process``, ``retrieve`` and ``snapshot --list`` with ``--json`` draw nothing."""
    home = tmp_path / "home"
    chat = EXAMPLES / "support-chat.json"
    for args in (
        ("process", str(chat), "--json"),
        ("retrieve", "support-4821", "refund", "--json"),
        ("snapshot", "support-4821", "--list", "--json"),
    ):
        names = imported_modules(*args, home=home, db=empty_store)
        assert names & (NETWORK_AND_SYSTEM | RICH) == set(), args
