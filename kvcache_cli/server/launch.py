"""Start ``kvcache serve``: check the options, wire store, upstream and app, run uvicorn.

The socket is bound before the start-up line is printed, so the line (which carries
the real port, also for ``--port 0``) means the server is reachable. uvicorn's own
SIGINT/SIGTERM handling stops accepting, lets in-flight requests (streams included)
finish for up to ``GRACE_SECONDS``, then the store is closed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

from kvcache_cli.config import Config
from kvcache_cli.errors import BadInputError, ConfigError, KVCacheError

GRACE_SECONDS = 30
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class ServeOptions:
    """The command's options (defaults from ``[serve]`` of the config)."""

    upstream: str
    host: str = "127.0.0.1"
    port: int = 8088
    api_key_env: str | None = None
    insecure: bool = False
    trace: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    reply_reserve: int = 512
    verbose: int = 0
    quiet: bool = False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(options: ServeOptions) -> str | None:
    """Refuse unsafe or unusable options; returns the clients' API key (or None)."""
    if not options.upstream.startswith(("http://", "https://")):
        raise BadInputError(f"--upstream must be an http:// or https:// URL, not {options.upstream!r}")
    key = None
    if options.api_key_env:
        key = os.environ.get(options.api_key_env)
        if not key:
            raise ConfigError(f"--api-key-env {options.api_key_env}: that variable is not set or empty")
    if not is_loopback(options.host) and key is None and not options.insecure:
        raise BadInputError(
            f"refusing to listen on {options.host} without --api-key-env NAME "
            "(clients would reach the model and the store unauthenticated); add --insecure to do it anyway"
        )
    if not 0 <= options.port <= 65535:
        raise BadInputError(f"--port must be 0..65535, not {options.port}")
    return key


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise KVCacheError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _unknown_context(probe: Any) -> str:
    """Why the upstream's context size is unknown, for the start-up lines."""
    if probe.failure == "unreachable":
        return "the upstream was unreachable at start"
    if probe.failure == "loading":
        return "the upstream was still loading at start (HTTP 503)"
    return "the upstream gave no n_ctx (in /slots or /props)"


def _model_name(upstream: Any) -> str:
    """The loaded model (``/props`` ``model_path``, else the first of ``/v1/models``)."""
    props = upstream.get_json("/props")
    if isinstance(props, dict) and isinstance(props.get("model_path"), str):
        return str(props["model_path"])
    models = upstream.get_json("/v1/models")
    if isinstance(models, dict) and models.get("data"):
        return str(models["data"][0].get("id", "unknown"))
    return "unknown"


def embeddings_upstream_url(configured: str, upstream: str) -> str | None:
    """Where ``POST /v1/embeddings`` goes when it is not the upstream: ``[llm]
    embeddings_url`` (without a trailing ``/`` or ``/v1``), None when unset or the same."""
    url = configured.strip().rstrip("/").removesuffix("/v1")
    return url if url and url != upstream.rstrip("/") else None


def _say(message: str) -> None:
    sys.stderr.write(f"kvcache serve: {message}\n")
    sys.stderr.flush()


def run(options: ServeOptions, config: Config, store_url: str | None) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code."""
    client_key = check_options(options)
    import uvicorn

    from kvcache_cli.server.api_server import AppSettings, create_app
    from kvcache_cli.server.checkpoints import WalCheckpointer
    from kvcache_cli.server.metrics import Metrics
    from kvcache_cli.server.serving_chat import ChatService
    from kvcache_cli.server.slots import SlotPinning, probe_slot_files
    from kvcache_cli.server.trace import TraceWriter
    from kvcache_cli.server.upstream import Upstream
    from kvcache_cli.server.upstream_context import probe_n_ctx
    from kvcache_cli.services.llm_setup import llm_client
    from kvcache_cli.store.backend import open_store

    llm_cfg = dataclasses.replace(config.llm, base_url=options.upstream)
    upstream_key = None
    if llm_cfg.api_key_env:
        upstream_key = os.environ.get(llm_cfg.api_key_env)
        if not upstream_key:
            raise ConfigError(f"[llm] api_key_env: the variable {llm_cfg.api_key_env} is not set")
    sock = _bind(options.host, options.port)
    store = open_store(store_url, config.database.busy_timeout_ms, autocheckpoint=False)
    checkpointer: WalCheckpointer | None = None
    service: ChatService | None = None
    upstream = Upstream(options.upstream, upstream_key, llm_cfg.connect_timeout, llm_cfg.read_timeout)
    embeddings_url = embeddings_upstream_url(llm_cfg.embeddings_url, upstream.base_url)
    embeddings = (
        Upstream(embeddings_url, upstream_key, llm_cfg.connect_timeout, llm_cfg.read_timeout)
        if embeddings_url
        else None
    )
    llm = llm_client(llm_cfg, options.upstream, required=True)
    trace = TraceWriter(options.trace) if options.trace else None
    try:
        if store.is_sqlite:
            checkpointer = WalCheckpointer(store, on_error=_say).start()
        probe = probe_n_ctx(upstream)
        n_ctx, n_slots = probe.n_ctx, probe.slots
        metrics = Metrics()
        slots, swapping = None, f"slot swapping is off until restart: {_unknown_context(probe)}"
        if n_ctx and n_slots:
            why_not = probe_slot_files(llm)
            if why_not is None:
                model = _model_name(upstream)
                slots = SlotPinning(llm, n_slots, n_ctx, model, metrics, options.quiet, store=store)
                swapping = f"slot swapping is on: {n_slots} slot(s), files in the upstream's --slot-save-path"
            else:
                swapping = f"slot swapping is off: {why_not} (sessions share the upstream's own prompt cache)"
        service = ChatService(
            store,
            config,
            upstream,
            llm,
            metrics,
            n_ctx=n_ctx,
            trace=trace,
            default_reserve=options.reply_reserve,
            lock_timeout=2 * llm_cfg.read_timeout + 10,
            pg_url=None if store.is_sqlite else store.location.target,
            slots=slots,
        )
        settings = AppSettings(
            api_key=client_key,
            max_body_bytes=options.max_body_bytes,
            verbose=options.verbose,
            quiet=options.quiet,
            store_label=store.location.display,
        )
        app = create_app(service, upstream, metrics, settings, embeddings=embeddings)
        port = sock.getsockname()[1]
        shown_host = f"[{options.host}]" if ":" in options.host else options.host
        context = (
            f"n_ctx {n_ctx} per slot from {probe.source}, {n_slots} slot(s)"
            if n_ctx
            else f"{_unknown_context(probe)}: using [model] n_ctx {config.model.n_ctx} until the "
            "upstream's is known, asked again on chat turns"
        )
        if embeddings is not None:
            context += f"; embeddings to {embeddings.base_url}"
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="info" if options.verbose > 1 else "warning",
                access_log=False,
                timeout_graceful_shutdown=GRACE_SECONDS,
                lifespan="off",
            )
        )
        # uvicorn handles SIGINT/SIGTERM while it runs (graceful shutdown), then puts back
        # the handlers it found and raises the signal again: these record it, so the
        # process ends here normally (store closed, exit 0) instead of dying of it. One
        # that comes after the start-up line but before uvicorn takes over stops it too.
        stops: list[int] = []

        def stop(signum: int, _frame: object) -> None:
            stops.append(signum)
            server.should_exit = True

        previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
        sys.stderr.write(
            f"kvcache serve: listening on http://{shown_host}:{port}, managing {options.upstream} "
            f"({context}; store {store.location.display})\n"
        )
        if not options.quiet:  # -q: the listening line (scripts wait for it) and errors only
            sys.stderr.write(f"kvcache serve: {swapping}\n")
        sys.stderr.flush()
        try:
            server.run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if service is not None:  # a JSON turn stores its reply after its answer: let it end
            service.locks.wait_idle(GRACE_SECONDS)
        if trace is not None:
            trace.close()
        upstream.close()
        if embeddings is not None:
            embeddings.close()
        if llm is not None:
            llm.close()
        if checkpointer is not None:
            checkpointer.stop()
        store.close()
        sock.close()
    if not options.quiet:
        sys.stderr.write("kvcache serve: stopped\n")
    return 0
