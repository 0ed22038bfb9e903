"""Message embeddings: computed by the LLM server, stored as float32 blobs, searched by cosine.

Storage: table ``embeddings`` holds one row per (message, model name) with the vector's
size (``dim``) and the vector as little-endian float32 (``array('f')``, no numpy).

Network outside transactions: :class:`TurnEmbedder` embeds a conversation's new messages
*before* the turn's write transaction (looking ahead to fill a batch of
``llm.embedding_batch_size`` messages per request) and only inserts the ready vectors
inside it, so the SQLite write lock is never held during an HTTP call.
:func:`backfill_session` embeds a session's stored messages that lack a vector (a run
where the server was down, a store filled before embeddings were enabled) the same way:
HTTP first, then one short transaction per batch.

Model and dimension policy: vectors are keyed by the *configured* model name
(``[llm].embedding_model``, else ``[llm].model``), which llama-server echoes back. When
the server answers vectors of another size for a name that already has stored vectors,
the model behind that name has changed: the stale vectors of that name are deleted (a
notice says how many) and re-embedded as their sessions are processed again. Search only
compares vectors of the query's own size and model, so old and new are never mixed.

Failures are never fatal: a server error disables embeddings for the rest of the run
with one notice; the messages are stored without vectors and picked up by a later run.
"""

from __future__ import annotations

import heapq
import math
import operator
import sys
from array import array
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kvcache_cli.errors import ServerError
from kvcache_cli.llm.client import EmbeddingBatch
from kvcache_cli.store import vectors as vector_rows

if TYPE_CHECKING:
    from kvcache_cli.engine.entries import ChatMessage
    from kvcache_cli.llm.client import LLMClient
    from kvcache_cli.store.connection import Store

__all__ = [
    "MAX_EMBED_CHARS",
    "TurnEmbedder",
    "backfill_session",
    "cosine",
    "drop_stale_vectors",
    "embed_query",
    "embed_texts",
    "embedding_model_name",
    "pack_vector",
    "semantic_search",
    "store_vectors",
    "unpack_vector",
]

MAX_EMBED_CHARS = 1500
"""Texts are cut to this many characters before embedding: the head of a long message is
what its vector should describe."""

MAX_EMBED_UNITS = 500
"""...and to this many non-space characters. A 512-token embedding model (all-MiniLM,
bge-small, nomic-bert: WordPiece) rejects longer input with a 500, and WordPiece never
makes more tokens than a text has non-space characters (each piece is at least one
character; CJK, digits and punctuation are one each), so 500 of them plus the two
special tokens always fit. English runs about 4-5 characters per token, so this keeps
the first ~110 words: more than the ~128-256 word pieces MiniLM was trained to read.
A server with a smaller limit still answers "too large": :func:`embed_texts` then
retries the texts one at a time, each cut shorter until it fits."""

MIN_EMBED_CHARS = 32
"""The shortest cut :func:`embed_texts` tries before giving up on a text."""

_BIG_ENDIAN = sys.byteorder == "big"


# ----------------------------------------------------------------------------- blobs
def pack_vector(values: Sequence[float]) -> bytes:
    """A vector as little-endian float32 bytes."""
    arr = array("f", values)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


def unpack_vector(blob: bytes | memoryview) -> array[float]:
    """The float32 vector of a blob written by :func:`pack_vector`."""
    raw = bytes(blob)
    if len(raw) % 4:
        raise ValueError(f"embedding blob of {len(raw)} bytes is not float32 data")
    arr = array("f")
    arr.frombytes(raw)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two equal-size vectors (0.0 when either is all zeros)."""
    dot = sum(map(operator.mul, a, b))
    na = math.sqrt(sum(map(operator.mul, a, a)))
    nb = math.sqrt(sum(map(operator.mul, b, b)))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return dot / (na * nb)


def _clip(text: str) -> str:
    """The head of ``text`` that an embedding model of 512 tokens accepts (see MAX_EMBED_UNITS)."""
    text = text[:MAX_EMBED_CHARS]
    if len(text) <= MAX_EMBED_UNITS:
        return text
    seen = 0
    for pos, ch in enumerate(text):
        if not ch.isspace():
            seen += 1
            if seen > MAX_EMBED_UNITS:
                return text[:pos]
    return text


def _too_large(exc: ServerError) -> bool:
    """Whether the server refused an input for its length (llama-server: 500 "too large")."""
    return "too large" in str(exc).lower()


def embed_texts(llm: LLMClient, texts: Sequence[str]) -> EmbeddingBatch:
    """Vectors of ``texts`` (clipped by :func:`_clip`), in order; raises ServerError.

    When the server refuses a batch as too large (a model whose limit is under 512
    tokens), each text is sent alone, and one that is still refused is cut to half its
    length until it fits or is shorter than MIN_EMBED_CHARS (then the error stands).
    """
    clipped = [_clip(t) or " " for t in texts]
    try:
        return llm.embed(clipped)
    except ServerError as exc:
        if not _too_large(exc):
            raise
    vectors: list[list[float]] = []
    model, dim = "", 0
    for text in clipped:
        while True:
            try:
                one = llm.embed([text])
                break
            except ServerError as exc:
                if not _too_large(exc) or len(text) // 2 < MIN_EMBED_CHARS:
                    raise
                text = text[: len(text) // 2]
        if dim and one.dim != dim:
            raise ServerError(f"the server changed the embedding size ({dim} -> {one.dim})")
        model, dim = one.model, one.dim
        vectors.extend(one.vectors)
    return EmbeddingBatch(vectors=vectors, model=model, dim=dim)


def embedding_model_name(llm: LLMClient) -> str:
    """The name vectors are stored under: ``embedding_model``, else ``model``."""
    return llm.settings.embedding_model or llm.settings.model


def embed_query(llm: LLMClient, text: str) -> tuple[list[float], str]:
    """One query's vector and the model name to search with (raises ServerError).

    Call it *before* opening a transaction: it is an HTTP request.
    """
    batch = embed_texts(llm, [text])
    return batch.vectors[0], embedding_model_name(llm)


# ----------------------------------------------------------------------------- storage
def stored_dim(store: Store, model: str) -> int | None:
    """The size of the vectors stored under ``model``, or None when there are none."""
    return vector_rows.stored_dim(store, model)


def drop_stale_vectors(store: Store, model: str, dim: int) -> int:
    """Delete the vectors of ``model`` whose size is not ``dim``; return how many went."""
    return store.transaction(lambda: vector_rows.drop_other_sizes(store, model, dim))


def store_vectors(
    store: Store, model: str, rows: Iterable[tuple[int, Sequence[float]]], now: datetime
) -> int:
    """Insert ``(message_id, vector)`` rows under ``model`` (inside the caller's transaction).

    A message that already has a vector for ``model`` keeps it. Returns the rows offered.
    """
    data = [(mid, len(vec), pack_vector(vec)) for mid, vec in rows]
    vector_rows.insert(store, model, data, now)
    return len(data)


# ----------------------------------------------------------------------------- computing
class TurnEmbedder:
    """Embeds a run's messages ahead of the turn transactions and stores them inside them.

    ``prefetch`` does the HTTP (outside any transaction); ``store_for`` inserts the
    prepared vectors of freshly stored messages (inside the turn's transaction).
    """

    def __init__(self, llm: LLMClient, store: Store, notices: list[str]) -> None:
        self.llm = llm
        self.store = store
        self.model = embedding_model_name(llm)
        self.batch_size = max(1, llm.settings.embedding_batch_size)
        self.notices = notices
        self.vectors: dict[int, list[float]] = {}
        self.dim: int | None = None
        self.failed = False
        self.failure: str | None = None
        self.requests = 0
        self.stored = 0

    def _notice(self, text: str) -> None:
        if text not in self.notices:
            self.notices.append(text)

    def _fail(self, exc: ServerError) -> None:
        self.failed = True
        self.failure = str(exc)
        self._notice(f"embeddings: {exc}; messages are stored without vectors (a later run adds them)")

    def _embed(self, texts: list[str]) -> list[list[float]] | None:
        """One batch through the server, checked against the stored dimension."""
        try:
            batch = embed_texts(self.llm, texts)
        except ServerError as exc:
            self._fail(exc)
            return None
        self.requests += 1
        if self.dim is None:
            old = stored_dim(self.store, self.model)
            if old is not None and old != batch.dim:
                dropped = drop_stale_vectors(self.store, self.model, batch.dim)
                self._notice(
                    f"embeddings: model {self.model!r} now gives {batch.dim}-dim vectors "
                    f"(stored: {old}-dim); dropped {dropped} stale vectors, re-embedded as "
                    "their sessions are processed again"
                )
            self.dim = batch.dim
        elif batch.dim != self.dim:
            self._fail(
                ServerError(
                    f"the server changed the embedding size during the run ({self.dim} -> {batch.dim})"
                )
            )
            return None
        return batch.vectors

    def prefetch(self, messages: Sequence[ChatMessage], lo: int, hi: int) -> None:
        """Have vectors ready for messages ``lo..hi-1``, embedding ahead to fill a batch."""
        if self.failed:
            return
        need = [i for i in range(lo, hi) if i not in self.vectors and messages[i].content.strip()]
        if not need:
            return
        ahead = hi
        while len(need) < self.batch_size and ahead < len(messages):
            if ahead not in self.vectors and messages[ahead].content.strip():
                need.append(ahead)
            ahead += 1
        vectors = self._embed([messages[i].content for i in need])
        if vectors is not None:
            self.vectors.update(zip(need, vectors, strict=True))

    def store_for(self, stored: Iterable[tuple[int, int]], now: datetime) -> int:
        """Insert the prepared vectors of ``(message_id, message_index)`` rows (in a transaction)."""
        rows = [(mid, self.vectors[idx]) for mid, idx in stored if idx in self.vectors]
        if rows:
            self.stored += store_vectors(self.store, self.model, rows, now)
        return len(rows)

    def vector_for(self, message_index: int) -> list[float] | None:
        """The prepared vector of a message of this run (e.g. the turn's question)."""
        return self.vectors.get(message_index)


def backfill_session(
    embedder: TurnEmbedder, session_id: int, now: datetime, max_messages: int = 100_000
) -> int:
    """Embed a session's stored messages that lack a vector; HTTP outside transactions.

    Returns the number of vectors stored.
    """
    done = 0
    seen: set[int] = set()
    while not embedder.failed and done < max_messages:
        todo = [
            (mid, text)
            for mid, text in vector_rows.missing(
                embedder.store, session_id, embedder.model, embedder.batch_size + len(seen)
            )
            if mid not in seen
        ]
        todo = todo[: embedder.batch_size]
        if not todo:
            break
        seen.update(mid for mid, _ in todo)
        vectors = embedder._embed([text for _, text in todo])
        if vectors is None:
            break
        pairs: list[tuple[int, Sequence[float]]] = list(zip((mid for mid, _ in todo), vectors, strict=True))

        def work(pairs: list[tuple[int, Sequence[float]]] = pairs) -> int:
            return store_vectors(embedder.store, embedder.model, pairs, now)

        embedder.store.transaction(work)
        embedder.stored += len(pairs)
        done += len(pairs)
    return done


# ----------------------------------------------------------------------------- search
_sumprod: Any = getattr(math, "sumprod", None)  # Python 3.12+: one C loop


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    if _sumprod is not None:
        return float(_sumprod(a, b))
    return sum(map(operator.mul, a, b))


def _vector_and_norm(blob: bytes, dim: int) -> tuple[array[float], float] | None:
    """A stored vector and its L2 norm; None if it is not ``dim`` long or is all zeros."""
    vec = unpack_vector(blob)
    if len(vec) != dim:
        return None
    norm = math.sqrt(_dot(vec, vec))
    return (vec, norm) if norm != 0.0 else None


class _Matrix:
    """One session's unit vectors of one model/size: message ids, vectors, id watermark."""

    __slots__ = ("count", "ids", "last", "vectors")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.vectors: list[array[float]] = []
        self.count = 0  # embedding rows seen (zero vectors included, not kept)
        self.last = 0  # highest embeddings.id read

    def add(self, rows: Iterable[tuple[int, int, bytes]], dim: int) -> None:
        for eid, mid, blob in rows:
            self.count += 1
            self.last = max(self.last, int(eid))
            found = _vector_and_norm(blob, dim)
            if found is None:
                continue
            vec, norm = found
            self.ids.append(int(mid))
            self.vectors.append(array("f", [x / norm for x in vec]) if abs(norm - 1.0) > 1e-6 else vec)


_MATRIX_MAX = 8  # sessions whose matrices a store keeps (a process run reuses one)


def _session_matrix(store: Store, session_id: int, model: str, dim: int) -> _Matrix:
    """The session's vectors, L2-normalised, kept on the store (``Store.memo``) and
    brought up to date incrementally.

    The cache is checked against the session's row count and highest embeddings id on
    every call (one indexed query), so a vector stored by another process, a deleted
    message or a dropped model is never missed: new rows are appended, anything else
    reloads the matrix.
    """
    count, last = vector_rows.session_watermark(store, session_id, model, dim)
    kept: dict[tuple[int, str, int], _Matrix] = store.memo.setdefault("session_vectors", {})
    key = (int(session_id), model, dim)
    mat = kept.get(key)
    if mat is not None and mat.count == count and mat.last == last:
        return mat
    if mat is not None and mat.last <= last:
        new = list(vector_rows.session_vectors(store, session_id, model, dim, after_id=mat.last))
        if mat.count + len(new) == count:
            mat.add(new, dim)
            return mat
    mat = _Matrix()
    mat.add(vector_rows.session_vectors(store, session_id, model, dim), dim)
    if len(kept) >= _MATRIX_MAX:
        kept.pop(next(iter(kept)))
    kept[key] = mat
    return mat


def semantic_search(
    store: Store,
    session_id: int | None,
    query_vector: Sequence[float],
    model: str,
    limit: int,
) -> list[tuple[int, float]]:
    """The ``limit`` messages most similar to ``query_vector``: ``(message_id, cosine)``, best first.

    ``session_id`` None searches every session. Only vectors of ``model`` with the query's
    size are compared. Ties are broken by message id (older first). A session's vectors
    are kept L2-normalised in memory (:func:`_session_matrix`), so a query costs one
    dot product per message (``math.sumprod`` on 3.12+); see docs/retrieval.md.
    """
    if limit < 1 or not query_vector:
        return []
    dim = len(query_vector)
    qnorm = math.sqrt(_dot(query_vector, query_vector))
    if qnorm == 0.0:
        return []
    qvec = array("f", [x / qnorm for x in query_vector])
    scored: list[tuple[float, int]] = []
    if session_id is not None:
        mat = _session_matrix(store, int(session_id), model, dim)
        scored = [(_dot(qvec, vec), -mid) for mid, vec in zip(mat.ids, mat.vectors, strict=True)]
    else:
        for mid, blob in vector_rows.all_vectors(store, model, dim):
            found = _vector_and_norm(blob, dim)
            if found is not None:
                scored.append((_dot(qvec, found[0]) / found[1], -int(mid)))
    best = heapq.nlargest(limit, scored)
    return [(-neg_id, max(-1.0, min(1.0, sim))) for sim, neg_id in best]
