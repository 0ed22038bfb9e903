"""``kvcache serve`` in front of a real llama-server: a returning session's time to first token.

Usage: python bench/serve_real.py [--binary PATH] [--model PATH] [--tokens N] [--cache-ram MIB ...]
                                  [--threads T] [--alone-only] [--keep DIR] [--json]

Starts its own llama-server (``-np 2 -c 8192 --slot-save-path DIR --slots --metrics`` on a
free port: never a shared one) once per ``--cache-ram`` value (default: its own default of
8192 MiB, then 0, its RAM prompt cache off), and per run:

1. llama-server alone: 4 sessions of about ``--tokens`` tokens (1,500) each, one after
   the other over its 2 slots, then session 0 returns with a short question;
2. through ``kvcache serve --upstream`` (a store of its own, embeddings off): 4 other
   sessions the same way, then session 0 returns (kvcache swaps its slot file in);
3. llama-server restarts with the same slot folder (kvcache keeps running), then
   session 1 returns through kvcache (its file restored into the empty server) and
   session 1 of step 1 returns to llama-server alone.

Each returning request is streamed: the time to its first event (time to first token)
and the final chunk's ``timings`` (``prompt_ms``, ``cache_n`` against ``prompt_n``: a
restore that took leaves ``prompt_n`` small). Also kvcache's ``kvcache_slot_actions``
counters (saves, restores, restores checked as reused or unused) and its notes.
Target (issue 16): after a restart, at least 10x less time to the first token through
kvcache than llama-server alone. On a loaded machine the cold prompts dominate the
run time (minutes each); ``--tokens`` smaller gives the same comparison faster.

The binary and model default to ``$PEER/llama.cpp/build/bin/llama-server`` and
``$PEER/models/SmolLM2-135M-Instruct.Q4_1.gguf`` (``PEER`` defaults to ``/tmp/peer``:
see ../shared/llama-server/peer.md for how they are built).
"""

# ruff: noqa: E501  (report lines)
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import KVCACHE, bench_env, machine, start_serve  # noqa: E402

PEER = Path(os.environ.get("PEER", "/tmp/peer"))
MAX_TOKENS = 4  # the reply: short, the prompt is what is measured
QUESTION = "Which berth did the last vessel use?"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Llama:
    """This run's own llama-server; ``restart`` keeps its port and slot folder."""

    def __init__(
        self, binary: Path, model: Path, slots: Path, cache_ram: int | None, threads: int, log: Path
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
            "-np", "2", "-c", "8192", "--slot-save-path", str(slots), "--slots", "--metrics",
        ]  # fmt: skip
        if cache_ram is not None:
            self.command += ["--cache-ram", str(cache_ram)]
        if threads:
            self.command += ["-t", str(threads), "-tb", str(threads)]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited {self.proc.returncode}; see {self.log}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"llama-server did not come up; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class Serve:
    """``kvcache serve --upstream`` as a child process, on a store and config of its own."""

    def __init__(self, upstream: str, home: Path) -> None:
        config = home / "kvcache.toml"
        # embeddings off (the chat server has none); a cold prompt may take minutes on a loaded machine
        config.write_text("[cache]\ngenerate_cache_embeddings = false\n[llm]\nread_timeout = 3600.0\n")
        self.err = home / "serve.err"
        command = [KVCACHE, "--db", str(home / "serve.db"), "--config", str(config)]
        self.proc, self.url = start_serve(
            [*command, "serve", "--upstream", upstream, "--port", "0"], bench_env(home), self.err
        )

    def slot_metrics(self) -> dict[str, float]:
        """``kvcache_slot_actions_total`` by ``action:result``."""
        out = {}
        for line in requests.get(self.url + "/metrics", timeout=30).text.splitlines():
            found = re.match(r'kvcache_slot_actions_total\{action="(\w+)",result="(\w+)"\} (\S+)', line)
            if found:
                out[f"{found.group(1)}:{found.group(2)}"] = float(found.group(3))
        return out

    def notes(self) -> list[str]:
        """kvcache's own notes on stderr (slot saves and restores that failed or reused nothing)."""
        lines = self.err.read_text().splitlines()
        return [line for line in lines if re.match(r"kvcache serve: slot \d", line)]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def session_text(llama_url: str, n: int, tokens: int) -> str:
    """A session's first message of about ``tokens`` tokens (its own from the first words)."""
    cargo = ["timber", "grain", "coal", "salt", "wool", "copper", "tea", "rice"]
    lines = [f"Harbour log {n} of vessel line {chr(65 + n)}. Keep these entries in mind."]
    i = 0
    while True:
        lines.append(
            f"Entry {i}: the {cargo[(i + n) % 8]} ship {chr(65 + n)}-{i * 7 + n} docks at berth {(i * 5 + n) % 17}."
        )
        i += 1
        if i % 10 == 0:
            text = " ".join(lines)
            counted = requests.post(llama_url + "/tokenize", json={"content": text}, timeout=120).json()
            if len(counted["tokens"]) >= tokens:
                return text


def ask(url: str, history: list[dict[str, str]], session: str | None) -> dict[str, Any]:
    """One streamed turn: time to the first event, total time, the final ``timings``;
    the reply and the next question are added to ``history``."""
    headers = {"X-Session-Id": session} if session else {}
    body = {"model": "m", "messages": history, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    started = time.perf_counter()
    first = None
    text, timings = "", {}
    with requests.post(
        url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=3600
    ) as resp:
        resp.raise_for_status()
        for raw in resp.iter_lines():
            if not raw.startswith(b"data: ") or raw == b"data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter()
            event = json.loads(raw[len(b"data: ") :])
            if "error" in event:
                raise RuntimeError(f"{url}: {event['error']}")
            for choice in event.get("choices") or []:
                text += (choice.get("delta") or {}).get("content") or ""
            timings = event.get("timings") or timings
    done = time.perf_counter()
    history += [{"role": "assistant", "content": text}, {"role": "user", "content": QUESTION}]
    return {
        "ttft_ms": round(((first or done) - started) * 1000, 1),
        "total_ms": round((done - started) * 1000, 1),
        "prompt_ms": round(float(timings.get("prompt_ms", 0.0)), 1),
        "prompt_n": timings.get("prompt_n"),
        "cache_n": timings.get("cache_n"),
    }


def run(args: argparse.Namespace, cache_ram: int | None, home: Path) -> dict[str, Any]:
    """One llama-server lifetime (and a restart): the returning sessions' figures."""
    home.mkdir(parents=True, exist_ok=True)
    slots = home / "slots"
    slots.mkdir(exist_ok=True)
    llama = Llama(args.binary, args.model, slots, cache_ram, args.threads, home / "llama.log")
    out: dict[str, Any] = {"cache_ram": "default" if cache_ram is None else cache_ram}
    serve = None
    try:
        alone = {n: [{"role": "user", "content": session_text(llama.url, n, args.tokens)}] for n in range(4)}
        out["first_turns_alone"] = [ask(llama.url, alone[n], None) for n in range(4)]
        out["alone_return"] = ask(llama.url, alone[0], None)
        if args.alone_only:
            return out
        served = {
            n: [{"role": "user", "content": session_text(llama.url, 4 + n, args.tokens)}] for n in range(4)
        }
        serve = Serve(llama.url, home)
        out["first_turns_kvcache"] = [ask(serve.url, served[n], f"bench-{n}") for n in range(4)]
        out["kvcache_return"] = ask(serve.url, served[0], "bench-0")
        llama.restart()
        out["kvcache_after_restart"] = ask(serve.url, served[1], "bench-1")
        out["alone_after_restart"] = ask(llama.url, alone[1], None)
        out["kvcache_slot_actions"] = serve.slot_metrics()
        out["kvcache_notes"] = serve.notes()
        out["slot_files"] = sorted(p.name for p in slots.iterdir())
    finally:
        if serve is not None:
            serve.stop()
        llama.stop()
    return out


def summary(row: dict[str, Any]) -> list[str]:
    lines = [f"llama-server --cache-ram {row['cache_ram']}:"]
    for key in ("alone_return", "kvcache_return", "alone_after_restart", "kvcache_after_restart"):
        if key in row:
            r = row[key]
            lines.append(
                f"  {key:22} ttft {r['ttft_ms']:>10.1f} ms  prompt_ms {r['prompt_ms']:>10.1f}  "
                f"prompt_n {r['prompt_n']}  cache_n {r['cache_n']}"
            )
    first = row.get("first_turns_alone") or []
    if first:
        lines.append(
            f"  first turns alone (cold): prompt_n {[r['prompt_n'] for r in first]}, ttft ms {[r['ttft_ms'] for r in first]}"
        )
    if "kvcache_after_restart" in row:
        ratio = row["alone_after_restart"]["ttft_ms"] / max(row["kvcache_after_restart"]["ttft_ms"], 0.001)
        lines.append(
            f"  after the restart: llama-server alone / through kvcache ttft = {ratio:.1f}x (target >= 10x)"
        )
        lines.append(f"  kvcache_slot_actions: {row['kvcache_slot_actions']}")
        lines += [f"  {note}" for note in row["kvcache_notes"]]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", type=Path, default=PEER / "llama.cpp/build/bin/llama-server")
    parser.add_argument("--model", type=Path, default=PEER / "models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--tokens", type=int, default=1500, help="Tokens of each session's first message.")
    parser.add_argument(
        "--cache-ram", type=int, action="append", default=None,
        help="llama-server's --cache-ram in MiB (repeatable; default: its own default, then 0).",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="llama-server -t/-tb (0: its default).")
    parser.add_argument(
        "--alone-only", action="store_true", help="Only llama-server alone (no kvcache, no restart)."
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="Keep logs, slot files and stores in this folder."
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.binary.exists() or not args.model.exists():
        print(f"serve_real: no llama-server at {args.binary} or model at {args.model}", file=sys.stderr)
        return 2
    home = args.keep or Path(tempfile.mkdtemp(prefix="kvbench-serve-real-"))
    settings: list[int | None] = args.cache_ram if args.cache_ram else [None, 0]
    results: dict[str, Any] = {"machine": machine(), "tokens": args.tokens, "runs": []}
    for n, cache_ram in enumerate(settings):
        results["runs"].append(run(args, cache_ram, home / f"run-{n}"))
        if args.keep is not None:  # what is done so far, for a run that is stopped
            (home / "results.json").write_text(json.dumps(results, indent=2))
    results["machine_after"] = machine()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(
            f"machine: {results['machine']} (after: load {results['machine_after'].rsplit('load ', 1)[-1]})"
        )
        print(f"sessions of about {args.tokens} tokens, 4 over 2 slots, replies of {MAX_TOKENS} tokens")
        for row in results["runs"]:
            print("\n".join(summary(row)))
    if args.keep is None:
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
