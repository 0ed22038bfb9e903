"""The hybrid's fusion settings (``strategies.Fusion``) that bench/locomo_hybrid_loo.py compares."""

from __future__ import annotations

import pytest

from kvcache_cli.retrieval import strategies as st
from kvcache_cli.retrieval.fusion import RetrievedEntry


def _e(index: int, score: float) -> RetrievedEntry:
    return RetrievedEntry(
        tier=3,
        score=score,
        matched_keywords=[],
        text=f"t{index}",
        session_id="s",
        message_index=index,
        key_hash=f"h{index}",
    )


def test_parse_fusion_names_every_setting() -> None:
    assert st.parse_fusion(None) == st.DEFAULT_FUSION == st.Fusion("weighted", "max", 60.0, 0.25)
    assert st.parse_fusion("rrf,k=20") == st.Fusion(kind="rrf", k=20.0)
    assert st.parse_fusion(" weighted , normalise=median, context=0.5") == st.Fusion(
        normalise="median", context=0.5
    )
    fusion = st.Fusion(kind="rrf")
    assert st.parse_fusion(fusion) is fusion
    for bad in (
        "cosine",
        "rrf,k=0",
        "weighted,normalise=z",
        "weighted,depth=3",
        "weighted,k",
        "rrf,kind=weighted",
    ):
        with pytest.raises(ValueError):
            st.parse_fusion(bad)


def test_median_normalisation_counts_what_stands_above_the_session() -> None:
    kw = [_e(1, 0.9), _e(2, 0.5)]
    sem = [_e(3, 0.62), _e(2, 0.60), _e(1, 0.50)]
    # every message's semantic value: most sit near 0.5, message 3 and 2 stand out
    lookup = {("s", i): v for i, v in {1: 0.50, 2: 0.60, 3: 0.62, 4: 0.49, 5: 0.50, 6: 0.51}.items()}
    by_max = st.combine("hybrid", kw, sem, 3, semantic_lookup=lookup, fusion="weighted")
    by_median = st.combine("hybrid", kw, sem, 3, semantic_lookup=lookup, fusion="weighted,normalise=median")
    # max: message 1 keeps 0.5/0.62 of the semantic side although it is a typical message
    assert [e.message_index for e in by_max][:2] == [1, 2]
    # median (0.505): message 1 is at the median, so only message 2's and 3's similarity counts
    assert [e.message_index for e in by_median][:2] == [2, 1]
    assert 3 in {e.message_index for e in by_median}
    assert all(0.0 <= e.score <= 1.0 for e in by_median)


def test_rrf_takes_its_k_from_the_fusion_spec() -> None:
    kw = [_e(1, 0.9), _e(2, 0.1)]
    sem = [_e(1, 0.2), _e(3, 0.9)]
    out = {e.message_index: e.score for e in st.combine("hybrid", kw, sem, 3, fusion="rrf,k=20")}
    assert out[1] == pytest.approx(1.0)
    assert out[2] == pytest.approx((0.5 / 22) / (1 / 21))
