"""Writing results for scripts: ``--json`` on stdout.

People's output (Rich tables) is ``cli/render.py``; a command imports it only in its
non-JSON branch, so ``--json`` runs do not pay for importing Rich.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def emit_json(data: Any) -> None:
    """``data`` as indented JSON on stdout (non-JSON values as their ``str``)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
