"""The idiomatic-pandas features (the tests' oracle) must equal build_features, value for value."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pandas_reference import pandas_features

from rapport.features.build import build_features
from rapport.features.contracts import validate_table
from rapport.features.datasets import CDNOW_CALIBRATION_END, load_cdnow
from rapport.features.synthetic import SyntheticConfig, generate_synthetic

SYNTHETIC_AS_OF = "2025-06-30"


def differences(ours: pd.DataFrame, theirs: pd.DataFrame, skip=()) -> dict[str, int]:
    """Number of differing rows per column (floats with tolerance, NaN/NA positions exact)."""
    assert list(ours.columns) == list(theirs.columns)
    assert ours["customer_id"].tolist() == theirs["customer_id"].tolist()
    out = {}
    for col in ours.columns:
        if col.startswith(skip):
            continue
        a, b = ours[col], theirs[col]
        missing_a, missing_b = a.isna().to_numpy(), b.isna().to_numpy()
        numeric = pd.api.types.is_numeric_dtype(a.dtype) and pd.api.types.is_numeric_dtype(b.dtype)
        if numeric and not isinstance(b.dtype, pd.CategoricalDtype):
            x = a.astype("float64").to_numpy(na_value=np.nan)
            y = b.astype("float64").to_numpy(na_value=np.nan)
            unequal = ~np.isclose(x, y, rtol=1e-9, atol=1e-6)
        else:
            unequal = (a.astype(object) != b.astype(object)).to_numpy()
        bad = (missing_a != missing_b) | (~missing_a & ~missing_b & unequal)
        if bad.any():
            out[col] = int(bad.sum())
    return out


@pytest.fixture(scope="module")
def synthetic() -> tuple[pd.DataFrame, pd.DataFrame]:
    tx, ix = generate_synthetic(SyntheticConfig(n_customers=2000, seed=3))
    return validate_table(tx, "transactions"), validate_table(ix, "interactions")


def test_cdnow_sample_matches_build_features():
    tx = load_cdnow("sample")
    theirs = build_features(tx, as_of=CDNOW_CALIBRATION_END)
    ours = pandas_features(tx, None, as_of=CDNOW_CALIBRATION_END)
    assert len(ours) == len(theirs) > 2000
    assert differences(ours, theirs) == {}


def test_synthetic_with_interactions_matches_build_features(synthetic):
    tx, ix = synthetic
    theirs = build_features(tx, ix, as_of=SYNTHETIC_AS_OF)
    ours = pandas_features(tx, ix, as_of=SYNTHETIC_AS_OF)
    assert len(ours) == len(theirs) > 1000
    assert "email_open_rate_365d" in ours.columns
    assert "preferred_channel" in ours.columns
    assert (ours["as_of"] == pd.Timestamp(SYNTHETIC_AS_OF)).all()
    assert differences(ours, theirs) == {}


def test_tiny_fixture_matches_build_features(tiny_tx, tiny_ix):
    # String ids, same-day purchases, refunds, a refund-only customer, events after the cutoff.
    tx, ix = validate_table(tiny_tx, "transactions"), validate_table(tiny_ix, "interactions")
    for windows in [(30, 90), (7,)]:
        theirs = build_features(tx, ix, as_of="2024-03-01", windows=windows)
        ours = pandas_features(tx, ix, as_of="2024-03-01", windows=windows)
        assert differences(ours, theirs) == {}


def test_email_rates_are_zero_without_opens(synthetic):
    tx, ix = synthetic
    theirs = build_features(tx, ix, as_of=SYNTHETIC_AS_OF)
    has_sends = theirs["email_sends_365d"] > 0
    assert theirs.loc[has_sends, "email_open_rate_365d"].notna().all()
    assert theirs.loc[has_sends, "email_click_rate_365d"].notna().all()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(
        st.tuples(
            st.integers(1, 4),  # customer
            st.integers(0, 8),  # day
            st.integers(0, 2),  # hour: several events on one day
            st.sampled_from([-7.5, -1.0, 0.0, 2.5, 10.0, 31.0]),  # refunds, zero, purchases
        ),
        min_size=1,
        max_size=30,
    )
)
def test_random_histories_match_build_features(events):
    # Same-day purchases, refunds on purchase days, refund-only days and refunds before the
    # first purchase: the windowed day logic must agree with the plain pandas roll-up.
    start = pd.Timestamp("2024-01-01")
    tx = pd.DataFrame(
        {
            "customer_id": [c for c, _, _, _ in events],
            "timestamp": [start + pd.Timedelta(days=d, hours=h) for _, d, h, _ in events],
            "amount": [a for _, _, _, a in events],
        }
    )
    tx["timestamp"] += pd.to_timedelta(np.arange(len(tx)), unit="s")  # no exact duplicates
    tx = validate_table(tx, "transactions")
    if not (tx["amount"] >= 0).any():
        return
    as_of = (start + pd.Timedelta(days=9)).date().isoformat()
    theirs = build_features(tx, as_of=as_of, windows=(2, 5))
    ours = pandas_features(tx, None, as_of=as_of, windows=(2, 5))
    assert differences(ours, theirs) == {}
