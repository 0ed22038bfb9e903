"""Bridge messages: the texts that tell the LLM what happened to its context."""

from __future__ import annotations

TIER_NAMES = {1: "active cache", 2: "recent snapshots", 3: "long-term memory"}
SUMMARY_NOW = "[Memory compressed — conversation summary up to this point:]"
SUMMARY_PRIOR = "[Prior conversation summary — context before memory compression:]"


def clear_bridge(cleared: int, preserved: int, keywords: list[str]) -> str:
    topics = ", ".join(keywords[:3]) if keywords else "various topics"
    return (
        f"[Cache Management] Cleared {cleared} entries from cache, preserved {preserved} "
        f"important entries related to: {topics}. Continuing with optimized context."
    )


def retrieval_bridge(count: int, tier: int, keywords: list[str], similarity: float) -> str:
    where = TIER_NAMES.get(tier, "long-term memory")
    quoted = ", ".join(f"'{k}'" for k in keywords[:3])
    return (
        f"[Memory Retrieval] Retrieved {count} entries from {where} for {quoted} "
        f"(similarity: {similarity:.2f}). Integrating into current context."
    )


def age_text(minutes: int) -> str:
    """``1 minute``, ``5 hours``, ``633 days``: the largest whole unit, as people say it."""
    for unit, size in (("day", 1440), ("hour", 60)):
        if minutes >= size:
            count = minutes // size
            return f"{count} {unit}" + ("" if count == 1 else "s")
    return f"{minutes} minute" + ("" if minutes == 1 else "s")


def restore_bridge(count: int, age_minutes: int | None, replaced: int | None = None) -> str:
    """The restore's bridge; with ``replaced`` (entries the cache held before) it says the
    snapshot replaced the context, which is what ``restore`` does."""
    age = f" ({age_text(age_minutes)} old)" if age_minutes is not None else ""
    if replaced is not None:
        return (
            f"[Cache Restoration] Restored {count} entries from previous snapshot{age}. "
            f"Context has been replaced by the snapshot ({replaced} entries before)."
        )
    return (
        f"[Cache Restoration] Restored {count} entries from previous snapshot{age}. "
        "Context has been expanded."
    )


def summary_now(summary: str) -> str:
    return f"{SUMMARY_NOW}\n{summary}"


def summary_prior(summary: str) -> str:
    return f"{SUMMARY_PRIOR}\n{summary}"
