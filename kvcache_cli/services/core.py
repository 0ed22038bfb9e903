"""What every turn service shares for one store and config: the run's state.

``Core`` is built once per open store (the CLI's command, the server's process, a
library user's ``KVCacheManager``) and passed to the service functions. It holds no
SQL: the store modules do; it holds what lives as long as a run: the config, the
LLM client, the token counter, the notices for the user, the embedder, the replay's
in-memory indexes and the flags that stop asking a server that is down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvcache_cli.config import Config
from kvcache_cli.engine.memory import TokenCounter, capacity_bytes
from kvcache_cli.errors import NotFoundError, ServerError, StoreError
from kvcache_cli.store import models as m
from kvcache_cli.store import sessions
from kvcache_cli.store.connection import Store

if TYPE_CHECKING:  # made on first use: commands that never replay do not import them
    from kvcache_cli.engine.scoring import CacheEntryScorer
    from kvcache_cli.retrieval.session_index import SessionIndexes
    from kvcache_cli.store.fts_lengths import SessionLengths


class Core:
    """The shared state of the turn, cache, retrieval and report services of one store."""

    def __init__(self, store: Store, config: Config | None = None, llm: Any = None) -> None:
        self.store = store
        self.config = config or Config()
        self.llm = llm
        # A client made from [llm].embeddings_url alone serves embeddings only: no chat
        # summaries and no /tokenize (that server's tokenizer is the embedding model's).
        self.chat_llm = None if llm is None or getattr(llm, "embeddings_only", False) else llm
        self._scorer: CacheEntryScorer | None = None  # see ``scorer``
        self.tokens = TokenCounter(
            self.chat_llm.tokenize if self.chat_llm is not None and self.config.llm.use_tokenize else None
        )
        self._server_n_ctx: int | None = None
        self.notices: list[str] = []
        self.embedder: Any = None  # embeddings.TurnEmbedder while turns are processed
        self.fusion: str | None = None  # hybrid fusion override (strategies.FUSIONS), for benches
        self._replay_indexes: SessionIndexes | None = None  # see ``replay_indexes``
        self._fts_lengths: SessionLengths | None = None  # see ``fts_lengths``
        self.llm_down = False  # set after "cannot connect": no more server calls this run
        self.ready_summary: tuple[tuple[Any, ...], str | None] | None = None
        self.snapshot_cache: dict[tuple[int, str], Any] = {}  # tier 2: (id, hash) -> entries
        # False only in a parallel replay's worker (parallel_replay): its scratch store
        # keeps no full-text index (the merge indexes the rows in the real store), so a
        # search there is refused and the worker's conversation is replayed in the parent
        self.index_history = True

    @property
    def scorer(self) -> CacheEntryScorer:
        """The cache entries' importance scorer (made on first use: reports never score)."""
        if self._scorer is None:
            from kvcache_cli.engine.scoring import CacheEntryScorer

            self._scorer = CacheEntryScorer()
        return self._scorer

    @property
    def replay_indexes(self) -> SessionIndexes:
        """A replay's per-session tier-3 indexes (made on first use)."""
        if self._replay_indexes is None:
            from kvcache_cli.retrieval.session_index import SessionIndexes

            self._replay_indexes = SessionIndexes()
        return self._replay_indexes

    @property
    def fts_lengths(self) -> SessionLengths:
        """Big sessions' average FTS5 lengths, followed during a replay (made on first use)."""
        if self._fts_lengths is None:
            from kvcache_cli.store.fts_lengths import SessionLengths

            self._fts_lengths = SessionLengths()
        return self._fts_lengths

    # -------------------------------------------------------------- capacity
    def capacity(self) -> int:
        return capacity_bytes(self.config.model, self.config.cache, self._server_n_ctx)

    def set_server_n_ctx(self, n_ctx: int | None) -> None:
        """Use a slot's ``n_ctx`` (from the server's ``/slots``) for the capacity."""
        self._server_n_ctx = n_ctx

    def use_server_context(self, slot: int | None = None) -> None:
        """Take the capacity's ``n_ctx`` from the server's ``GET /slots`` when asked to.

        ``slot`` given (``process --slot N``): that slot's ``n_ctx`` (an unknown id is an
        error). Else ``[model] n_ctx = 0`` with a server: the smallest slot ``n_ctx``; when
        the server cannot say, a notice and the built-in estimate. A positive
        ``model.max_cache_bytes`` still wins over both.
        """
        if self.llm is None:
            return
        if slot is not None:
            self.set_server_n_ctx(self.llm.check_slot(slot).n_ctx)
            return
        if self.config.model.n_ctx != 0:
            return
        try:
            slots = self.llm.slots()
        except ServerError as exc:
            self.notices.append(f"capacity: {exc}; using the built-in estimate instead")
            return
        if slots:
            self.set_server_n_ctx(min(s.n_ctx for s in slots))

    # -------------------------------------------------------------- sessions
    def session(self, key: str) -> m.Session:
        """The session called ``key`` (NotFoundError if there is none)."""
        row = sessions.find(self.store, key)
        if row is None:
            raise NotFoundError(f"unknown session {key!r}")
        return row

    def session_for_update(self, key: str, create: bool, now: Any) -> m.Session:
        """The session locked for this transaction, created when ``create``."""
        row = sessions.find(self.store, key, for_update=True)
        if row is None:
            if not create:
                raise NotFoundError(f"unknown session {key!r}")
            row = sessions.create(self.store, key, now, self.capacity())
        return row

    # -------------------------------------------------------------- server state
    def notice(self, text: str) -> None:
        """Tell the user ``text`` once (notices are printed after the run)."""
        if text not in self.notices:
            self.notices.append(text)

    def server_down(self) -> bool:
        """Whether a call this run found the server unreachable (then it is not asked again)."""
        if self.tokens.failure and not any(n.startswith("token counts:") for n in self.notices):
            self.notices.append(f"token counts: {self.tokens.failure}; estimated from characters instead")
        failures = (self.tokens.failure, getattr(self.embedder, "failure", None))
        if any(f and f.startswith("cannot connect") for f in failures):
            self.llm_down = True
        return self.llm_down

    def forget_replay_state(self) -> None:
        """A transaction rolled back: drop what the replay kept from inside it."""
        if self._replay_indexes is not None:
            self._replay_indexes.forget()
        if self._fts_lengths is not None:
            self._fts_lengths.forget()

    def require_history_index(self) -> None:
        if not self.index_history:
            raise StoreError("this store keeps no full-text index (a parallel replay's scratch store)")
