from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pytest

from rapport.training.config import CutoffConfig, SplitConfig
from rapport.training.datasets import (
    build_training_set,
    holdout_draw,
    latest_complete_cutoff,
    resolve_cutoffs,
    split_cutoffs,
    split_rows,
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


def test_resolve_refuses_cutoffs_before_the_data() -> None:
    # three months of data and a 90-day horizon: the last cutoff with a whole horizon is
    # before the first transaction, so no customer could have a row
    with pytest.raises(
        ValueError, match=r"2023-12-31 is before the first transaction, on 2024-01-05"
    ):
        resolve_cutoffs(
            CutoffConfig(count=3),
            horizon_days=90,
            last_event_day=D(2024, 4, 1),
            first_event_day=D(2024, 1, 5),
        )
    assert resolve_cutoffs(
        CutoffConfig(count=1), horizon_days=30, last_event_day=D(2024, 4, 1),
        first_event_day=D(2024, 1, 5),
    ) == [D(2024, 2, 29)]  # fmt: skip
    # dates given by hand: the dates are what to change, not the horizon
    with pytest.raises(ValueError, match=r"cutoffs\.dates: the last cutoff 2023-12-31 is before"):
        resolve_cutoffs(
            CutoffConfig(dates=(D(2023, 12, 31),)), horizon_days=30,
            last_event_day=D(2024, 4, 1), first_event_day=D(2024, 1, 5),
        )  # fmt: skip


def test_empty_parts_say_what_to_change() -> None:
    split = split_cutoffs([D(2025, m, 28) for m in range(1, 8)], horizon_days=60)
    # customers who all started after the training cutoffs
    frame = pd.DataFrame(
        {"customer_id": [1, 2], "as_of": pd.to_datetime([split.valid, split.test])}
    )
    with pytest.raises(ValueError, match=r"train rows are empty .*split by customers"):
        split.parts(frame)


def test_split_keeps_the_test_horizon_out_of_training() -> None:
    cutoffs = [D(2025, m, 28) for m in range(1, 11)]
    split = split_cutoffs(cutoffs, horizon_days=90)
    assert split.test == D(2025, 10, 28)
    # Validation is the latest cutoff whose 90-day horizon ends by the test cutoff.
    assert split.valid == D(2025, 7, 28)
    # Training is every cutoff whose horizon ends by validation: no training label lies in
    # the validation horizon (2025-05-28 + 90 days is after 2025-07-28).
    assert split.train == tuple(D(2025, m, 28) for m in range(1, 5))
    assert all(c + dt.timedelta(days=90) <= split.valid for c in split.train)
    for c in (*split.train, split.valid):
        assert c + dt.timedelta(days=90) <= split.test
    assert split.role(D(2025, 8, 28)) == "unused"


def test_split_explains_when_cutoffs_are_too_close() -> None:
    with pytest.raises(ValueError, match="horizon ends by the test cutoff"):
        split_cutoffs([D(2025, 1, 31), D(2025, 2, 28), D(2025, 3, 31)], horizon_days=90)
    with pytest.raises(ValueError, match="no training cutoff"):
        split_cutoffs([D(2025, 1, 31), D(2025, 5, 31), D(2025, 6, 30)], horizon_days=90)
    with pytest.raises(ValueError, match="hold out customers instead"):
        split_cutoffs([D(2025, 1, 31), D(2025, 2, 28), D(2025, 3, 31)], horizon_days=90)


def test_holdout_draws_are_fixed_per_customer_and_seed() -> None:
    ids = pd.Series(np.arange(20_000))
    draw = holdout_draw(ids, seed=7)
    assert ((draw >= 0) & (draw < 1)).all()
    # uniform enough that a 20% holdout holds about 20% (4 standard errors: 0.011)
    assert abs((draw < 0.2).mean() - 0.2) < 0.011
    np.testing.assert_array_equal(draw, holdout_draw(ids, seed=7))
    assert not np.array_equal(draw, holdout_draw(ids, seed=8))
    # the same customer draws the same number at every row, as text or as a number
    twice = holdout_draw(pd.Series([5, 9, 5, 9]), seed=7)
    assert twice[0] == twice[2] and twice[1] == twice[3]
    as_text = holdout_draw(pd.Series(["5", "9"]), seed=7)
    np.testing.assert_array_equal(as_text, twice[:2])


def test_customer_split_holds_customers_out_at_the_last_cutoff() -> None:
    cutoffs = [D(2025, 1, 31), D(2025, 2, 28), D(2025, 3, 31)]
    frame = pd.DataFrame(
        {
            "customer_id": np.tile(np.arange(3000), 3),
            "as_of": np.repeat(pd.to_datetime(cutoffs), 3000),
        }
    )
    # a time split cannot have these (a 90-day horizon): the customer split can
    config = SplitConfig(by="customers", test_fraction=0.25, holdout_seed=1)
    split = split_rows(cutoffs, 90, config)
    train, valid, test = split.parts(frame)
    assert set(pd.to_datetime(test["as_of"]).dt.date) == {D(2025, 3, 31)}
    assert set(pd.to_datetime(valid["as_of"]).dt.date) == {D(2025, 3, 31)}
    assert set(pd.to_datetime(train["as_of"]).dt.date) == set(cutoffs)
    groups = [set(part["customer_id"]) for part in (train, valid, test)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert len(groups[0] | groups[1] | groups[2]) == 3000  # nobody is left out
    assert 0.22 < len(test) / 3000 < 0.28 and 0.17 < len(valid) / 3000 < 0.23
    # a training customer trains at every cutoff
    assert len(train) == 3 * len(groups[0])
    assert "25% of customers held out at 2025-03-31" in split.describe()


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


def test_seen_until_is_the_last_training_or_validation_cutoff_plus_the_horizon() -> None:
    from rapport.training.evaluate import seen_until

    params = {
        "train_cutoffs": "2025-01-31,2025-02-28",
        "valid_cutoff": "2025-03-31",
        "horizon_days": "30",
    }
    assert seen_until(params) == D(2025, 4, 30)
    # a customer split trains at its test cutoff too
    assert seen_until({**params, "train_cutoffs": "2025-01-31,2025-05-31"}) == D(2025, 6, 30)
    assert seen_until({"horizon_days": "30"}) is None  # a run that did not record them


def test_a_retrain_with_another_seed_holds_out_the_same_customers(small_world) -> None:
    # the gate scores the champion on the challenger's test rows: they must be customers the
    # champion did not train on either, so the draw is keyed by split.holdout_seed, not seed
    from rapport.training.config import load_config
    from rapport.training.pipeline import prepare_training_set, split_frame

    tests = []
    for seed in (1, 2):
        config = load_config("churn", {"split.by": "customers", "cutoffs.count": 2, "seed": seed})
        frame, split = prepare_training_set(config, small_world["transactions"])
        tests.append(set(split_frame(frame, split)[2]["customer_id"]))
    assert tests[0] == tests[1] and len(tests[0]) > 50
    other = load_config("churn", {"split.by": "customers", "split.holdout_seed": 5})
    assert other.split.holdout_seed == 5


def test_cutoffs_before_the_first_purchase_are_not_made() -> None:
    # twelve month-ends asked for, seven of them before the data begin: only the five with
    # customers are made, so a split counts those and nothing else
    made = resolve_cutoffs(
        CutoffConfig(count=12),
        horizon_days=30,
        last_event_day=D(2025, 12, 31),
        first_event_day=D(2025, 7, 15),
    )
    assert made == [
        (pd.Timestamp(2025, m, 1) + pd.offsets.MonthEnd(0)).date() for m in range(7, 12)
    ]
    split = split_cutoffs(made, horizon_days=30)
    assert split.describe().endswith(", 3 training cutoffs)")
    # a cutoff on the first purchase day has that customer: it stays
    kept = resolve_cutoffs(
        CutoffConfig(dates=(D(2025, 6, 30), D(2025, 7, 15), D(2025, 8, 31))),
        horizon_days=30,
        last_event_day=D(2025, 12, 31),
        first_event_day=D(2025, 7, 15),
    )
    assert kept == [D(2025, 7, 15), D(2025, 8, 31)]


def test_training_counts_only_cutoffs_with_customers(small_world) -> None:
    # the synthetic world starts on 2022-01-01; 48 month-ends reach back into 2021
    from rapport.training.config import load_config
    from rapport.training.pipeline import prepare_training_set

    config = load_config("churn", {"cutoffs.count": 48})
    frame, split = prepare_training_set(config, small_world["transactions"])
    made = sorted(pd.to_datetime(frame["as_of"]).dt.date.unique())
    assert made[0] >= D(2022, 1, 1)
    assert len(split.train) + 2 == len(made)  # every cutoff counted has rows
    assert f", {len(made) - 2} training cutoffs)" in split.describe()
