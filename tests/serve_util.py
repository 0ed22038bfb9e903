"""Run ``kvcache serve`` as a real process on a free port for the serve tests."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import requests

from tests.helpers import cli_env, kvcache_command

LISTEN_RE = re.compile(r"listening on (http://\S+?),")


class ServeProcess:
    """``kvcache serve --port 0`` in front of ``upstream``; ``url`` is read from its start-up line."""

    def __init__(
        self,
        home: Path,
        db: Path | str,
        upstream: str,
        *extra: str,
        config: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.trace = home / "trace.jsonl"
        self.db = db
        command = [*kvcache_command(), "--db", str(db)]
        if config is not None:
            command += ["--config", str(config)]
        command += ["serve", "--upstream", upstream, "--port", "0", "--trace", str(self.trace), *extra]
        self.stderr_path = home / f"serve-{time.monotonic_ns()}.err"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(
            command,
            env=cli_env(home, **(env or {})),
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            cwd=home,
        )
        self.url = self._wait_for_start()

    def _wait_for_start(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTEN_RE.search(self.stderr_path.read_text())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"kvcache serve exited {self.proc.returncode}: {self.stderr_path.read_text()}"
                )
            time.sleep(0.01)
        self.stop()
        raise AssertionError(f"kvcache serve did not start: {self.stderr_path.read_text()}")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        """POST ``body``; a chat answer returns once its turn has ended (see ``settle``)."""
        resp = requests.post(self.url + path, json=body, timeout=60, **kwargs)
        if path == "/v1/chat/completions":
            self.settle()
        return resp

    def stream(self, session: str, text: str, timeout: float = 60) -> requests.Response:
        """A streamed chat turn of one user message, as raw events (``with`` it; read
        ``iter_lines()``): for the tests that leave or stop mid-stream."""
        body: dict[str, Any] = {"messages": [{"role": "user", "content": text}], "stream": True}
        return requests.post(
            self.url + "/v1/chat/completions",
            json=body,
            headers={"X-Session-Id": session},
            stream=True,
            timeout=timeout,
        )

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until no turn is in progress (``/health``'s ``turns_in_progress``): a JSON
        answer's reply is stored just after the answer went out, so a test that reads the
        store right after an answer waits for that first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                health = requests.get(self.url + "/health", timeout=30).json()
            except (requests.RequestException, ValueError):
                return  # the server is gone: nothing is in progress
            if health.get("kvcache", {}).get("turns_in_progress", 0) == 0:
                return
            time.sleep(0.005)
        raise AssertionError(f"kvcache serve still had turns in progress after {timeout} s")

    def openai(self, settle: bool = True, **kwargs: Any) -> Any:
        """An official ``openai`` client of this server (no retries) whose JSON answers
        return once their turn has ended (``settle``: many clients at once would wait for
        each other, so they pass False and settle once); streams are left as they arrive."""
        import openai

        def settled(response: Any) -> None:
            if response.request.url.path.endswith("/chat/completions") and not response.headers.get(
                "content-type", ""
            ).startswith("text/event-stream"):
                self.settle()

        kwargs.setdefault("api_key", "unused")
        kwargs.setdefault("max_retries", 0)
        hooks = {"response": [settled]} if settle else {}
        http_client = openai.DefaultHttpxClient(event_hooks=hooks, timeout=kwargs.pop("timeout", 60))
        return openai.OpenAI(base_url=self.url + "/v1", http_client=http_client, **kwargs)

    def traces(self) -> list[dict[str, Any]]:
        if not self.trace.exists():
            return []
        return [json.loads(line) for line in self.trace.read_text().splitlines() if line.strip()]

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._stderr.close()

    def stop(self) -> None:
        """End the process whatever its state (a test that fails must not leave it running)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if not self._stderr.closed:
            self._stderr.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
