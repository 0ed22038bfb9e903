"""Timestamps as kvcache shows them: the store keeps naive UTC, JSON says so (``+00:00``)."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_iso(value: datetime) -> str:
    """ISO 8601 with the UTC offset; a naive ``value`` is taken as UTC (what the store keeps)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def parse_utc(text: str) -> datetime:
    """ISO 8601 text (with or without an offset) as naive UTC, for arithmetic with stored times."""
    value = datetime.fromisoformat(text)
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value
