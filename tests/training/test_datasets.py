from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from rapport.training.config import CutoffConfig
from rapport.training.datasets import (
    build_training_set,
    latest_complete_cutoff,
    resolve_cutoffs,
    split_cutoffs,
)

D = dt.date


def test_latest_complete_cutoff_is_a_month_end_with_the_whole_horizon() -> None:
    # 2025-12-31 - 90 days = 2025-10-02: September's end is the last month-end that fits.
    assert latest_complete_cutoff(D(2025, 12, 31), 90) == D(2025, 9, 30)
    assert latest_complete_cutoff(D(2025, 12, 31), 0) == D(2025, 12, 31)


def test_resolve_monthly_and_quarterly_cutoffs() -> None:
    monthly = resolve_cutoffs(
        CutoffConfig(count=3), horizon_days=90, last_event_day=D(2025, 12, 31)
    )
    assert monthly == [D(2025, 7, 31), D(2025, 8, 31), D(2025, 9, 30)]
    quarterly = resolve_cutoffs(
        CutoffConfig(count=3, every_months=3, last=D(2024, 12, 31)),
        horizon_days=365,
        last_event_day=D(2025, 12, 31),
    )
    assert quarterly == [D(2024, 6, 30), D(2024, 9, 30), D(2024, 12, 31)]


def test_resolve_refuses_a_censored_horizon() -> None:
    with pytest.raises(ValueError, match="censored"):
        resolve_cutoffs(
            CutoffConfig(dates=(D(2025, 1, 31), D(2025, 2, 28), D(2025, 11, 30))),
            horizon_days=90,
            last_event_day=D(2025, 12, 31),
        )


def test_split_keeps_the_test_horizon_out_of_training() -> None:
    cutoffs = [D(2025, m, 28) for m in range(1, 11)]
    split = split_cutoffs(cutoffs, horizon_days=90)
    assert split.test == D(2025, 10, 28)
    # Validation is the latest cutoff whose 90-day horizon ends by the test cutoff.
    assert split.valid == D(2025, 7, 28)
    assert split.train == tuple(D(2025, m, 28) for m in range(1, 7))
    for c in (*split.train, split.valid):
        assert c + dt.timedelta(days=90) <= split.test
    assert split.role(D(2025, 8, 28)) == "unused"


def test_split_explains_when_cutoffs_are_too_close() -> None:
    with pytest.raises(ValueError, match="horizon ends by the test cutoff"):
        split_cutoffs([D(2025, 1, 31), D(2025, 2, 28), D(2025, 3, 31)], horizon_days=90)
    with pytest.raises(ValueError, match="no training cutoff"):
        split_cutoffs([D(2025, 1, 31), D(2025, 5, 31), D(2025, 6, 30)], horizon_days=90)


def test_training_rows_never_see_events_after_their_cutoff(tiny_tx_training: pd.DataFrame) -> None:
    tx = tiny_tx_training
    base = build_training_set(tx, cutoffs=["2024-02-29", "2024-03-31"], horizon_days=30)
    # Events added after the first cutoff must not change its features, only its labels.
    later = pd.DataFrame(
        {"customer_id": ["A"], "timestamp": [pd.Timestamp("2024-03-10")], "amount": [99.0]}
    )
    grown = build_training_set(
        pd.concat([tx, later], ignore_index=True),
        cutoffs=["2024-02-29", "2024-03-31"],
        horizon_days=30,
    )
    first = pd.Timestamp("2024-02-29")
    feature_cols = [c for c in base.columns if not c.startswith(("churned", "future"))]
    pd.testing.assert_frame_equal(
        base.loc[base["as_of"] == first, feature_cols].reset_index(drop=True),
        grown.loc[grown["as_of"] == first, feature_cols].reset_index(drop=True),
    )
    a_first = grown[(grown["as_of"] == first) & (grown["customer_id"] == "A")].iloc[0]
    assert a_first["future_spend_30d"] == pytest.approx(99.0)
    assert not a_first["churned_30d"]


@pytest.fixture
def tiny_tx_training() -> pd.DataFrame:
    rows = [
        ("A", "2024-01-05", 10.0),
        ("A", "2024-02-10", 20.0),
        ("B", "2024-02-01", 30.0),
        ("B", "2024-03-15", 5.0),
        ("C", "2024-04-30", 1.0),
    ]
    df = pd.DataFrame(rows, columns=["customer_id", "timestamp", "amount"])
    df["timestamp"] = pd.to_datetime(df["timestamp"])
    return df
