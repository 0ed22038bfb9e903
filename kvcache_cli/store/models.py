"""Peewee models of the store: the live schema, bound to no database.

Every query names its store (``Store.bind(query)``; raw SQL goes through
``Store.query``), so two stores open in one process never share a binding. The same
models serve SQLite and PostgreSQL: nothing here is backend-specific. Times are naive
UTC. The full-text index is not a model: each backend's search module owns
its own DDL (``search_sqlite`` / ``search_postgres``).
"""

from __future__ import annotations

from typing import Any

from peewee import (
    AutoField,
    BigIntegerField,
    BlobField,
    BooleanField,
    DateTimeField,
    FloatField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)


class BaseModel(Model):
    class Meta:
        database = None  # each query is bound to its store: Store.bind
        legacy_table_names = False


class SchemaMigration(BaseModel):
    """One applied migration: the schema's version history."""

    version = IntegerField(primary_key=True)
    name = TextField()
    applied_at = DateTimeField()

    class Meta:
        table_name = "schema_migrations"


class Session(BaseModel):
    """A conversation and its persisted cache state."""

    id = AutoField()

    key = TextField(unique=True)
    created_at = DateTimeField()
    last_activity = DateTimeField(index=True)
    conversation_count = IntegerField(default=0)
    turn_count = IntegerField(default=0)
    last_cleared_at = DateTimeField(null=True)
    last_snapshot_id = IntegerField(null=True)
    cache_size_bytes = BigIntegerField(default=0)
    capacity_bytes = BigIntegerField(default=0)
    entry_count = IntegerField(default=0)
    total_clears = IntegerField(default=0)
    metadata = TextField(default="{}")

    class Meta:
        table_name = "sessions"


class Message(BaseModel):
    """The full history (tier 3): every message, once, in order."""

    id = AutoField()
    session_id: int

    session = ForeignKeyField(Session, on_delete="CASCADE", index=False)
    message_index = IntegerField()
    role = TextField()
    name = TextField(null=True)
    content = TextField()
    tokens = IntegerField(default=0)
    timestamp = DateTimeField(null=True)
    importance = FloatField(default=0.5)

    class Meta:
        table_name = "messages"
        indexes = ((("session", "message_index"), True),)


class CacheEntry(BaseModel):
    """The active cache (tier 1): what the model's KV cache holds now."""

    id = AutoField()
    session_id: int

    session = ForeignKeyField(Session, on_delete="CASCADE", index=False)
    key_hash = TextField()
    key_data = TextField(null=True)
    key_type = TextField(default="attention_key")
    value_bytes = IntegerField(default=0)
    layer_index = IntegerField(default=0)
    head_index = IntegerField(null=True)
    importance = FloatField(default=0.5)
    access_count = IntegerField(default=1)
    last_accessed = DateTimeField(null=True)
    size_bytes = BigIntegerField(default=0)
    tokens = IntegerField(default=0)
    message_index = IntegerField(null=True)
    position = IntegerField(default=0)

    class Meta:
        table_name = "cache_entries"
        indexes = ((("session", "key_hash"), True),)


class Snapshot(BaseModel):
    """A saved copy of a session's cache (tier 2), with its integrity hash."""

    id = AutoField()
    session_id: int

    session = ForeignKeyField(Session, on_delete="CASCADE", index=False)
    turn_index = IntegerField(default=0)
    snapshot_type = TextField()
    reason = TextField(default="")
    state_hash = TextField()
    entry_count = IntegerField(default=0)
    size_bytes = BigIntegerField(default=0)
    created_at = DateTimeField()
    slot_id = IntegerField(null=True)
    slot_filename = TextField(null=True)
    slot_n_saved = IntegerField(null=True)
    slot_n_written = BigIntegerField(null=True)

    class Meta:
        table_name = "snapshots"
        indexes = ((("session", "created_at"), False),)


class SnapshotEntry(BaseModel):
    """One entry of a snapshot (same fields as ``CacheEntry``)."""

    id = AutoField()
    snapshot_id: int

    snapshot = ForeignKeyField(Snapshot, on_delete="CASCADE", index=True)
    key_hash = TextField()
    key_data = TextField(null=True)
    key_type = TextField(default="attention_key")
    value_bytes = IntegerField(default=0)
    layer_index = IntegerField(default=0)
    head_index = IntegerField(null=True)
    importance = FloatField(default=0.5)
    access_count = IntegerField(default=1)
    last_accessed = DateTimeField(null=True)
    size_bytes = BigIntegerField(default=0)
    tokens = IntegerField(default=0)
    message_index = IntegerField(null=True)
    position = IntegerField(default=0)

    class Meta:
        table_name = "snapshot_entries"


class Summary(BaseModel):
    """The one cumulative summary of a session, replaced at each clear."""

    id = AutoField()
    session_id: int

    session = ForeignKeyField(Session, on_delete="CASCADE", unique=True)
    text = TextField()
    token_count = IntegerField(default=0)
    messages_summarized = IntegerField(default=0)
    clear_count = IntegerField(default=0)
    source = TextField(default="extractive")
    updated_at = DateTimeField()

    class Meta:
        table_name = "summaries"


class Embedding(BaseModel):
    """A message's vector from one model (float32 little-endian blob)."""

    id = AutoField()
    message_id: int

    message = ForeignKeyField(Message, on_delete="CASCADE", index=False)
    model = TextField()
    dim = IntegerField()
    vector = BlobField()
    created_at = DateTimeField()

    class Meta:
        table_name = "embeddings"
        indexes = ((("message", "model"), True),)


class Engagement(BaseModel):
    """A key's engagement: starts at 0.3, +0.15 when retrieved, the others x0.95."""

    id = AutoField()
    session_id: int

    session = ForeignKeyField(Session, on_delete="CASCADE", index=False)
    key_hash = TextField()
    score = FloatField(default=0.3)

    class Meta:
        table_name = "engagement"
        indexes = ((("session", "key_hash"), True),)


class Operation(BaseModel):
    """The operation history (clears, snapshots, restores, retrievals), kept across restarts."""

    id = AutoField()

    session_key = TextField(index=True)
    operation_type = TextField()
    timestamp = DateTimeField(index=True)
    entries_affected = IntegerField(default=0)
    details = TextField(default="")

    class Meta:
        table_name = "operations"


class Statistics(BaseModel):
    """Global counters of the store's operations; one row, id 1."""

    id = AutoField()

    total_clears = IntegerField(default=0)
    total_retrievals = IntegerField(default=0)
    total_snapshots = IntegerField(default=0)
    total_restores = IntegerField(default=0)
    entries_preserved = BigIntegerField(default=0)
    entries_cleared = BigIntegerField(default=0)
    entries_retrieved = BigIntegerField(default=0)
    last_operation = DateTimeField(null=True)

    class Meta:
        table_name = "statistics"


class TurnLog(BaseModel):
    """Cache usage after each processed turn: the sawtooth that clears cut."""

    id = AutoField()
    session_id: int

    session = ForeignKeyField(Session, on_delete="CASCADE", index=False)
    turn_index = IntegerField()
    message_index = IntegerField()
    cache_size_bytes = BigIntegerField(default=0)
    entry_count = IntegerField(default=0)
    cleared = BooleanField(default=False)
    clear_reason = TextField(null=True)
    retrieved = IntegerField(default=0)

    class Meta:
        table_name = "turn_log"
        indexes = ((("session", "turn_index"), True),)


def rows_of(query: Any) -> list[tuple[Any, ...]]:
    """The rows of a ``.tuples()`` query (peewee's hints call them model instances)."""
    return list(query)


ALL_MODELS: list[type[BaseModel]] = [
    SchemaMigration,
    Session,
    Message,
    CacheEntry,
    Snapshot,
    SnapshotEntry,
    Summary,
    Embedding,
    Engagement,
    Operation,
    Statistics,
    TurnLog,
]
