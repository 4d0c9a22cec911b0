from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapport.features.build import build_features
from rapport.features.segments import (
    SEGMENT_RULES,
    SEGMENTS,
    _below_within,
    _fifths_within,
    scores_against,
    segment_of,
    segment_summary,
)
from rapport.features.synthetic import SyntheticConfig, generate_synthetic


def test_every_cell_has_exactly_one_segment():
    cells = [(r, fm) for _, rs, fms in SEGMENT_RULES for r in rs for fm in fms]
    assert sorted(cells) == list(itertools.product(range(1, 6), repeat=2))
    assert segment_of(5, 5) == "Champions" and segment_of(1, 1) == "Lost"
    assert segment_of(1, 5) == "Can't lose them" and segment_of(5, 1) == "New"
    with pytest.raises(ValueError):
        segment_of(0, 3)


@pytest.fixture(scope="module")
def world():
    return generate_synthetic(SyntheticConfig(n_customers=3_000, seed=7))


def test_scores_are_quantiles_and_segments_match_rules(world):
    tx, ix = world
    feats = build_features(tx, ix, as_of="2025-06-30")
    # ranks by quantile: the most recent fifth gets R=5, ties share a score
    top = feats[feats["r_score"] == 5]["recency_days"].max()
    assert (feats.loc[feats["recency_days"] <= top, "r_score"] == 5).all()
    assert feats.groupby("r_score")["recency_days"].max().is_monotonic_decreasing
    assert feats.groupby("m_score")["total_spend"].min().is_monotonic_increasing
    expected = [
        segment_of(r, fm) for r, fm in zip(feats["r_score"], feats["fm_score"], strict=True)
    ]
    assert feats["segment"].astype(str).tolist() == expected
    assert set(feats["segment"].astype(str)) <= set(SEGMENTS)


def test_segments_stable_across_runs_and_row_order(world):
    tx, ix = world
    a = build_features(tx, ix, as_of="2025-06-30")
    b = build_features(tx.sample(frac=1.0, random_state=1), ix, as_of="2025-06-30")
    pd.testing.assert_series_equal(a["segment"], b["segment"])


def test_segment_summary(world):
    tx, ix = world
    feats = build_features(tx, ix, as_of=["2025-03-31", "2025-06-30"])
    summary = segment_summary(feats)
    assert summary.groupby("as_of")["share"].sum().round(9).eq(1).all()
    assert (
        summary.groupby("as_of")["customers"].sum().tolist()
        == feats.groupby("as_of").size().tolist()
    )
    champions = summary[summary["segment"] == "Champions"]["recency_days"].mean()
    lost = summary[summary["segment"] == "Lost"]["recency_days"].mean()
    assert champions < lost


def test_scores_against_the_population_reproduce_the_sql_scores(world):
    tx, ix = world
    feats = build_features(tx, ix, as_of="2025-06-30")
    scored = scores_against(feats, feats)
    for col in ("r_score", "f_score", "m_score", "fm_score"):
        assert scored[col].tolist() == feats[col].tolist(), col
    assert scored["segment"].astype(str).tolist() == feats["segment"].astype(str).tolist()


def test_scores_against_rank_a_newcomer_in_the_reference():
    reference = pd.DataFrame(
        {
            "recency_days": [1, 10, 50, 100, 400],
            "n_purchase_days": [9, 5, 3, 2, 1],
            "total_spend": [900.0, 300.0, 120.0, 40.0, 5.0],
        }
    )
    newcomer = pd.DataFrame({"recency_days": [0], "n_purchase_days": [1], "total_spend": [45.0]})
    # Nobody in the reference is more recent: percent rank 0 -> R=5; one has fewer purchase
    # days (none), so F=1; spend is above 2 of 5 -> rank 2/4 -> M=3; FM=ceil(4/2)=2.
    s = scores_against(newcomer, reference).iloc[0]
    assert (s["r_score"], s["f_score"], s["m_score"], s["fm_score"]) == (5, 1, 3, 2)
    assert s["segment"] == segment_of(5, 2)
    with pytest.raises(ValueError, match="empty"):
        scores_against(newcomer, reference.iloc[:0])


@settings(max_examples=80, deadline=None)
@given(
    n=st.one_of(st.integers(64, 400), st.sampled_from([1001, 2001, 5001, 64, 65, 66])),
    distinct=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_fifths_by_order_statistics_equal_the_ranked_rule(n, distinct, seed):
    # the partition and histogram shortcuts must give the bucket the sort-based rule gives,
    # ties and the boundaries where 5 * rank is a whole number in floating point included
    rng = np.random.default_rng(seed)
    days = rng.integers(0, distinct, n) * 3 - 40
    unsigned = (days + 40).astype("uint64")
    for x in (days.astype("float64") * 0.37, days, days.astype("int32"), unsigned):
        below = _below_within(x.astype("float64"))
        expected = np.minimum(4, np.floor(5 * (below / (n - 1)))).astype("int32")
        got = _fifths_within(x)
        assert got is not None
        np.testing.assert_array_equal(got, expected)
    # integers spread too wide for a histogram take the partition
    spread = days.astype("int64") * 10**9
    expected = np.minimum(4, np.floor(5 * (_below_within(spread * 1.0) / (n - 1))))
    np.testing.assert_array_equal(_fifths_within(spread), expected.astype("int32"))


def test_fifths_leave_nan_and_small_populations_to_the_sort():
    assert _fifths_within(np.arange(10.0)) is None
    with_nan = np.arange(100.0)
    with_nan[3] = np.nan
    assert _fifths_within(with_nan) is None
