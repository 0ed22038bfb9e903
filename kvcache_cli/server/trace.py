"""``kvcache serve --trace FILE``: what the model saw, one JSON line per turn."""

from __future__ import annotations

import json
import threading
from typing import Any

from kvcache_cli.errors import BadInputError


class TraceWriter:
    """``--trace FILE``: one JSON line per turn, appended and flushed as it ends."""

    def __init__(self, path: str) -> None:
        try:
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise BadInputError(f"--trace {path}: cannot write there ({exc.strerror or exc})") from None
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
