"""What ``kvcache stats`` shows of sessions ``kvcache serve`` served: their cells and
the line that says whose capacity the overview's threshold is a share of."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def served(state: dict[str, Any]) -> dict[str, Any] | None:
    """What ``kvcache serve`` recorded on a session (``metadata.serve``), if anything."""
    live = (state.get("metadata") or {}).get("serve")
    return live if isinstance(live, dict) else None


def served_cells(live: dict[str, Any] | None) -> list[str]:
    """The slot, last prompt against n_ctx and slot files saved/restored of a served session."""
    if live is None:
        return ["-", "-", "-"]
    slot = live.get("slot")
    return [
        "-" if slot is None else str(slot),
        f"{live.get('last_prompt_tokens', '?')}/{live.get('n_ctx', '?')}",
        f"{live.get('slot_saves', 0)}/{live.get('slot_restores', 0)}",
    ]


def capacity_note(
    sessions: list[dict[str, Any]], configured: int, size: Callable[[float], str]
) -> str | None:
    """For a store with served sessions: the config's capacity is what ``process`` uses,
    served sessions have their own (the upstream's n_ctx less the reply reserve). None
    for a store serve never touched (its overview stays as it was)."""
    own = sorted({s["capacity_bytes"] for s in sessions if served(s) is not None and s.get("capacity_bytes")})
    if not own:
        return None
    shown = size(own[0]) if len(own) == 1 else f"{size(own[0])} to {size(own[-1])}"
    return (
        f"capacity: config {size(configured)} (process); served sessions {shown} (n_ctx less reply reserve)"
    )
