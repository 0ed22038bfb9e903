"""Writing results: JSON for scripts on stdout, or a Rich rendering for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any


def emit_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (non-JSON values as their ``str``)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def show(result: Any, as_json: bool, draw: Callable[[Any], None]) -> None:
    """``--json``: the result's ``to_dict()``; otherwise ``draw(result)``."""
    if as_json:
        emit_json(result.to_dict())
    else:
        draw(result)
