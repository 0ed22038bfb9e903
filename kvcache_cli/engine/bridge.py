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


def restore_bridge(count: int, age_minutes: int | None) -> str:
    age = f" ({age_minutes} minutes old)" if age_minutes is not None else ""
    return (
        f"[Cache Restoration] Restored {count} entries from previous snapshot{age}. "
        "Context has been expanded."
    )


def summary_now(summary: str) -> str:
    return f"{SUMMARY_NOW}\n{summary}"


def summary_prior(summary: str) -> str:
    return f"{SUMMARY_PRIOR}\n{summary}"
