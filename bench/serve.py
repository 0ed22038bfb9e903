"""``kvcache serve``: the proxy's overhead against an upstream that answers at once,
and, with a real llama-server, the time to the first token of a returning session.

Usage: python bench/serve.py [--sessions S] [--turns T] [--big-messages N] [--keep DIR]
                             [--compare BIN] [--json]

Overhead: the fake llama-server of the test suite (it answers at once) serves both
paths; S sessions of T turns each are sent through ``kvcache serve`` (default config:
token counts by the upstream's ``/tokenize``, embeddings on) and, with the same body,
straight to the upstream. The overhead is the per-request difference (p50, p95), on an
empty store and on a store of N messages (``scale_store.py``'s store; ``--keep`` reuses
it). Targets: p50 <= 5 ms, p95 <= 20 ms. Each run also reports the upstream calls
kvcache made per turn besides the chat itself (``/tokenize``, ``/v1/embeddings``; in
all, and those made while the client waited: a turn embeds its messages after its
answer is sent) and,
from one in-process ``ChatService`` over the same conversation, the SQL statements and
store transactions per turn and the CPU time of the thread that handles the turn (until
the answer, and after it), and the CPU time the ``kvcache serve`` process spent per
turn: figures that a loaded machine does not blur (on an idle machine the overhead is
about that CPU time plus the upstream calls' round trips).

``--compare BIN``: another install's ``kvcache`` (e.g. a worktree of the previous
commit, run as ``python -P -m kvcache_cli`` by a wrapper) measured in the same run,
alternately with this one (before, after, after, before per store), so the figures
compare as same-run ratios on a shared machine.

Real server (when ``KVCACHE_BENCH_LLAMA_URL`` names a llama-server started with
``-np 2 --slot-save-path DIR``): 4 sessions of about 1,500 tokens over its 2 slots;
the returning session's ``timings.prompt_ms`` through kvcache against llama-server alone.
The full comparison (time to first token; llama-server's ``--cache-ram`` on and 0; an
upstream restart) is ``serve_real.py``, which starts llama-servers of its own.
"""

# ruff: noqa: E501  (report lines)
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import KVCACHE, bench_env, machine, start_serve  # noqa: E402

from tests.fake_llama_server import FakeLlamaServer  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Serve:
    """``kvcache serve --port 0`` as a child process (``kvcache``: which install)."""

    def __init__(self, db: Path, upstream: str, home: Path, kvcache: str = KVCACHE) -> None:
        self.err = home / f"serve-{time.monotonic_ns()}.err"
        self.proc, self.url = start_serve(
            [kvcache, "-q", "--db", str(db), "serve", "--upstream", upstream, "--port", "0"],
            bench_env(home),
            self.err,
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def conversation_turns(
    http: requests.Session, url: str, direct: str, sessions: int, turns: int, fake: Any = None
) -> dict[str, list[float]]:
    """Send every turn through kvcache and straight to the upstream; latencies in ms
    (and, given the ``fake`` upstream, the calls kvcache made to it per turn)."""
    through: list[float] = []
    alone: list[float] = []
    calls: list[float] = []
    for s in range(sessions):
        history: list[dict[str, str]] = [{"role": "system", "content": "You answer briefly."}]
        for t in range(turns):
            history.append(
                {"role": "user", "content": f"Session {s} turn {t}: tell me one thing about topic {t % 7}."}
            )
            body = {"model": "m", "messages": history, "max_tokens": 32}
            before = fake.request_count if fake is not None else 0
            started = time.perf_counter()
            resp = http.post(
                url + "/v1/chat/completions", json=body, headers={"X-Session-Id": f"bench-{s}"}, timeout=60
            )
            through.append((time.perf_counter() - started) * 1000)
            resp.raise_for_status()
            if fake is not None:
                calls.append(fake.request_count - before)
            reply = resp.json()["choices"][0]["message"]["content"]
            started = time.perf_counter()
            http.post(direct + "/v1/chat/completions", json=body, timeout=60).raise_for_status()
            alone.append((time.perf_counter() - started) * 1000)
            history.append({"role": "assistant", "content": reply})
    return {"through": through, "direct": alone, "calls": calls}


def overhead(
    db: Path, home: Path, sessions: int, turns: int, label: str, kvcache: str = KVCACHE, tag: str = "this"
) -> dict[str, Any]:
    with FakeLlamaServer(n_slots=2, n_ctx=8192) as fake:
        serve = Serve(db, fake.url, home, kvcache)
        try:
            with requests.Session() as http:
                conversation_turns(http, serve.url, fake.url, 1, 3)  # warm up
                time.sleep(0.5)  # the warm-up's last turn ends after its answer
                received = fake.request_count
                cpu = psutil.Process(serve.proc.pid).cpu_times()
                times = conversation_turns(http, serve.url, fake.url, sessions, turns, fake)
                time.sleep(0.5)  # so does the last turn's: its upstream calls and CPU count too
                after = psutil.Process(serve.proc.pid).cpu_times()
                received = fake.request_count - received
        finally:
            serve.stop()
    cpu_ms = ((after.user + after.system) - (cpu.user + cpu.system)) * 1000
    diff = [a - b for a, b in zip(times["through"], times["direct"], strict=True)]
    # kvcache's calls besides the chat: all the fake received, less the direct requests and
    # the chats (a turn may call the upstream after its answer, in the next turn's window)
    besides_chat = (received - 2 * len(diff)) / len(diff)
    return {
        "store": label,
        "install": tag,
        "requests": len(diff),
        "direct_p50_ms": round(statistics.median(times["direct"]), 2),
        "through_p50_ms": round(statistics.median(times["through"]), 2),
        "overhead_p50_ms": round(statistics.median(diff), 2),
        "overhead_p95_ms": round(percentile(diff, 0.95), 2),
        "upstream_calls_per_turn": round(besides_chat, 2),
        "upstream_calls_in_request": round(statistics.mean(times["calls"]) - 1, 2),  # of them
        "serve_cpu_ms_per_turn": round(cpu_ms / len(diff), 2),  # kvcache's own CPU time: load-independent
    }


def statements_per_turn(turns: int) -> dict[str, Any]:
    """SQL statements and transactions per turn of one in-process ``ChatService`` (this
    install), over a fresh store: the store work a turn costs, counted, not timed."""
    import dataclasses

    from kvcache_cli.config import Config
    from kvcache_cli.server.metrics import Metrics
    from kvcache_cli.server.protocol import ChatCompletionRequest
    from kvcache_cli.server.serving_chat import ChatService
    from kvcache_cli.server.upstream import Upstream
    from kvcache_cli.services.llm_setup import llm_client
    from kvcache_cli.store.backend import open_store

    with tempfile.TemporaryDirectory(prefix="kvbench-count-") as folder, FakeLlamaServer(n_ctx=8192) as fake:
        config = Config()
        store = open_store(str(Path(folder) / "count.db"))
        counts = {"statements": 0, "commits": 0}
        execute = store.db.execute_sql
        commit = store.db.commit

        def counted_execute(sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
            counts["statements"] += 1
            return execute(sql, params, *args, **kwargs)

        def counted_commit(*args: Any, **kwargs: Any) -> Any:
            counts["commits"] += 1
            return commit(*args, **kwargs)

        store.db.execute_sql = counted_execute  # type: ignore[method-assign]
        store.db.commit = counted_commit  # type: ignore[method-assign]
        llm = llm_client(dataclasses.replace(config.llm, base_url=fake.url), fake.url, required=True)
        service = ChatService(store, config, Upstream(fake.url, None, 5, 60), llm, Metrics(), n_ctx=8192)
        history: list[dict[str, Any]] = [{"role": "system", "content": "You answer briefly."}]
        per_turn: list[dict[str, int]] = []
        cpu: list[tuple[float, float]] = []  # the handling thread's CPU ms: until answered, after
        for t in range(turns):
            history.append({"role": "user", "content": f"Turn {t}: tell me one thing about topic {t % 7}."})
            body = {"model": "m", "messages": history, "max_tokens": 32}
            counts.update(statements=0, commits=0)
            started = time.thread_time()
            answer = service.handle(ChatCompletionRequest.model_validate(body), body, "count-0")
            answered = time.thread_time()
            if answer.after is not None:  # the part of the turn after the answer is sent
                answer.after()
            cpu.append(((answered - started) * 1000, (time.thread_time() - answered) * 1000))
            per_turn.append(dict(counts))
            assert answer.body is not None
            history.append({"role": "assistant", "content": answer.body["choices"][0]["message"]["content"]})
        store.close()
    steady = per_turn[1:]  # the first turn creates the session
    return {
        "turns": turns,
        "sql_statements_per_turn": round(statistics.mean(c["statements"] for c in steady), 1),
        "sql_statements_last_turn": per_turn[-1]["statements"],
        "transactions_per_turn": round(statistics.mean(c["commits"] for c in steady), 1),
        "cpu_ms_until_answered_p50": round(statistics.median(c for c, _ in cpu[1:]), 2),
        "cpu_ms_after_answer_p50": round(statistics.median(a for _, a in cpu[1:]), 2),
    }


def real_server(url: str, home: Path) -> dict[str, Any]:
    """4 sessions of about 1,500 tokens over 2 slots; the returning session's prompt_ms."""
    filler = " ".join(f"fact {i}: the harbour master logs ship {i} at berth {i % 13}." for i in range(110))

    def ask(target: str, session: str, history: list[dict[str, str]]) -> dict[str, Any]:
        resp = requests.post(
            target + "/v1/chat/completions",
            json={"messages": history, "max_tokens": 8, "cache_prompt": True},
            headers={"X-Session-Id": session},
            timeout=600,
        )
        resp.raise_for_status()
        return resp.json()

    histories = {f"real-{n}": [{"role": "user", "content": f"Session {n}. {filler}"}] for n in range(4)}
    db = home / "real.db"
    serve = Serve(db, url, home)
    try:
        for key, history in histories.items():
            answer = ask(serve.url, key, history)
            history.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
            history.append({"role": "user", "content": "And the next ship?"})
        back = ask(serve.url, "real-0", histories["real-0"])  # session 0 returns: its slot was swapped out
    finally:
        serve.stop()
    alone = ask(url, "", histories["real-1"])  # llama-server alone, the session's prefix evicted by others
    return {
        "returning_prompt_ms_through_kvcache": back.get("timings", {}).get("prompt_ms"),
        "returning_cache_n": back.get("timings", {}).get("cache_n"),
        "prompt_ms_llama_alone": alone.get("timings", {}).get("prompt_ms"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--big-messages", type=int, default=1_000_000, help="0 skips the big store")
    parser.add_argument(
        "--keep", type=Path, default=None, help="Build (or reuse) the big store in this folder."
    )
    parser.add_argument(
        "--compare", default=None, help="Another install's kvcache, measured alternately in the same run."
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="kvbench-serve-"))
    results: dict[str, Any] = {"machine": machine(), "overhead": []}
    installs = [("this", KVCACHE)]
    if args.compare:  # before, after, after, before: load drift hits both alike
        installs = [
            ("compared", args.compare),
            ("this", KVCACHE),
            ("this", KVCACHE),
            ("compared", args.compare),
        ]

    def measure(db: Path, label: str) -> None:
        for n, (tag, binary) in enumerate(installs):
            work = home / f"run-{n}.db"
            if db.exists():
                shutil.copy(db, work)
            results["overhead"].append(overhead(work, home, args.sessions, args.turns, label, binary, tag))
            work.unlink(missing_ok=True)

    try:
        measure(home / "empty.db", "empty")
        if args.big_messages:
            from scale_store import build

            folder = args.keep or home / "big"
            folder.mkdir(parents=True, exist_ok=True)
            big = folder / "scale.db"
            if not big.exists():
                started = time.perf_counter()
                big = build(folder, args.big_messages, max(1, args.big_messages // 500), bench_env(home))
                results["big_store_build_s"] = round(time.perf_counter() - started, 1)
            measure(big, f"{args.big_messages:,} messages")
        results["counts"] = statements_per_turn(args.turns)
        llama = os.environ.get("KVCACHE_BENCH_LLAMA_URL")
        if llama:
            results["real_server"] = real_server(llama.rstrip("/"), home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"machine: {results['machine']}")
    for row in results["overhead"]:
        print(
            f"store {row['store']} ({row['install']} install): {row['requests']} turns, direct p50 "
            f"{row['direct_p50_ms']} ms, through kvcache p50 {row['through_p50_ms']} ms; overhead p50 "
            f"{row['overhead_p50_ms']} ms (target <= 5), p95 {row['overhead_p95_ms']} ms (target <= 20); "
            f"{row['upstream_calls_per_turn']} upstream calls per turn besides the chat "
            f"({row['upstream_calls_in_request']} while the request was open); "
            f"kvcache serve's CPU time {row['serve_cpu_ms_per_turn']} ms per turn"
        )
    if args.compare:
        for store in dict.fromkeys(row["store"] for row in results["overhead"]):
            rows = [r for r in results["overhead"] if r["store"] == store]
            for field in ("overhead_p50_ms", "overhead_p95_ms", "serve_cpu_ms_per_turn"):
                this = statistics.mean(r[field] for r in rows if r["install"] == "this")
                other = statistics.mean(r[field] for r in rows if r["install"] == "compared")
                print(f"store {store}: {field} this/compared = {this / other:.2f} ({this:.1f} / {other:.1f})")
    counts = results["counts"]
    print(
        f"this install, in process, {counts['turns']} turns: {counts['sql_statements_per_turn']} SQL statements "
        f"and {counts['transactions_per_turn']} transactions per turn (last turn: {counts['sql_statements_last_turn']}); "
        f"CPU of the turn's thread p50 {counts['cpu_ms_until_answered_p50']} ms until answered, "
        f"{counts['cpu_ms_after_answer_p50']} ms after"
    )
    if "real_server" in results:
        print(f"real server: {results['real_server']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
