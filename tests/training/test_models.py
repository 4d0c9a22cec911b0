from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from sklearn.isotonic import IsotonicRegression

from rapport.training.config import ModelConfig
from rapport.training.models import (
    ChurnModel,
    FeatureSchemaError,
    LogisticBaseline,
    Preprocessor,
    ValueModel,
    _Calibrator,
    input_columns,
    score_frame,
)

Frames = tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]


@pytest.fixture(scope="module")
def churn_model(churn_frames: Frames, fast_config: Callable[..., ModelConfig]) -> ChurnModel:
    train, valid, _ = churn_frames
    return ChurnModel(fast_config("churn")).fit(train, valid)


def test_churn_model_predicts_calibrated_probabilities(
    churn_model: ChurnModel, churn_frames: Frames
) -> None:
    _, _, test = churn_frames
    p = churn_model.predict_proba(test)
    assert p.shape == (len(test),)
    assert np.all((p >= 0) & (p <= 1))
    # Calibrated on validation: the mean predicted risk is near the observed test churn rate.
    assert abs(p.mean() - test["churned_90d"].mean()) < 0.1
    # And it ranks: churners get a higher mean risk than buyers.
    y = test["churned_90d"].to_numpy()
    assert p[y].mean() > p[~y].mean() + 0.1


def test_isotonic_calibration_keeps_the_raw_order() -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=2_000)
    y = rng.random(2_000) < 1 / (1 + np.exp(-2 * raw))
    calibrator = _Calibrator("isotonic").fit(raw, y)
    p = calibrator.transform(raw)
    iso = calibrator.model_
    assert isinstance(iso, IsotonicRegression)
    steps = iso.predict(raw)
    assert len(np.unique(steps)) < 100  # the step function ties most rows
    # ties broken in the raw order, and no probability moved by more than a billionth
    assert len(np.unique(p)) == len(np.unique(raw))
    order = np.argsort(raw)
    assert np.all(np.diff(p[order]) > 0)
    assert np.max(np.abs(p - steps)) <= 1e-9
    assert np.all((p >= 0) & (p <= 1))


def test_more_days_since_last_purchase_never_lowers_churn_risk(
    churn_model: ChurnModel, churn_frames: Frames
) -> None:
    _, _, test = churn_frames
    base = churn_model.predict_proba(test)
    for extra_days in (30, 90, 365):
        later = test.copy()
        later["recency_days"] = later["recency_days"] + extra_days
        # Other things equal (the monotone constraint makes this hold row by row).
        assert np.all(churn_model.predict_proba(later) >= base - 1e-12)
    assert churn_model.predict_proba(later).mean() > base.mean()


def test_more_recent_purchases_do_not_raise_risk_on_average(
    churn_model: ChurnModel, churn_frames: Frames
) -> None:
    # A behaviour check without a constraint behind it: a purchase in the last 30 days.
    _, _, test = churn_frames
    quiet = test[test["purchases_30d"] == 0]
    active = quiet.copy()
    active["purchases_30d"] += 1
    active["purchases_90d"] += 1
    active["purchases_365d"] += 1
    assert churn_model.predict_proba(active).mean() <= churn_model.predict_proba(quiet).mean()


def test_churn_model_is_deterministic_given_a_seed(
    churn_frames: Frames, fast_config: Callable[..., ModelConfig], churn_model: ChurnModel
) -> None:
    train, valid, test = churn_frames
    again = ChurnModel(fast_config("churn")).fit(train, valid)
    np.testing.assert_array_equal(again.predict_proba(test), churn_model.predict_proba(test))


def test_contributions_add_up_to_the_raw_score(
    churn_model: ChurnModel, churn_frames: Frames
) -> None:
    _, _, test = churn_frames
    rows = test.head(50)
    contrib = churn_model.contributions(rows)
    assert list(contrib.columns[:-1]) == churn_model.feature_names_
    np.testing.assert_allclose(contrib.sum(axis=1).to_numpy(), churn_model._raw(rows), atol=1e-6)


def test_scoring_ignores_extra_columns_and_order(
    churn_model: ChurnModel, churn_frames: Frames
) -> None:
    _, _, test = churn_frames
    rows = test.head(20)
    shuffled = rows[list(reversed(rows.columns))].assign(unrelated=1.0)
    pd.testing.assert_frame_equal(
        score_frame(churn_model, rows), score_frame(churn_model, shuffled)
    )
    scores = score_frame(churn_model, rows)
    assert set(scores["risk_tier"]) <= {"low", "medium", "high"}
    assert scores["p_alive"].between(0, 1).all()
    assert (scores["expected_purchases"] >= 0).all()


def test_missing_feature_is_named(churn_model: ChurnModel, churn_frames: Frames) -> None:
    _, _, test = churn_frames
    with pytest.raises(FeatureSchemaError, match="recency_days"):
        churn_model.predict_proba(test.drop(columns=["recency_days"]))
    assert "recency_days" in input_columns(churn_model)
    assert "p_alive" not in input_columns(churn_model)


def test_non_numeric_feature_is_named() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0], "segment": ["Lost", "New"]})
    pre = Preprocessor().fit(frame)
    with pytest.raises(FeatureSchemaError, match="'a'"):
        pre.transform(frame.assign(a=["x", "y"]))
    # Unseen categories become missing rather than failing.
    out = pre.transform(frame.assign(segment=["Lost", "Martian"]))
    assert out["segment"].isna().tolist() == [False, True]


def test_single_class_label_is_refused(
    churn_frames: Frames, fast_config: Callable[..., ModelConfig]
) -> None:
    train, valid, _ = churn_frames
    with pytest.raises(FeatureSchemaError, match="single class"):
        ChurnModel(fast_config("churn")).fit(train.assign(churned_90d=True), valid)


def test_logistic_baseline_ranks_better_than_chance(churn_frames: Frames) -> None:
    train, _, test = churn_frames
    p = LogisticBaseline("churned_90d").fit(train).predict_proba(test)
    y = test["churned_90d"].to_numpy()
    assert p[y].mean() > p[~y].mean()


@pytest.mark.parametrize("kind", ["tweedie", "two_part"])
def test_value_model_predicts_non_negative_currency(
    kind: str, clv_frames: Frames, fast_config: Callable[..., ModelConfig]
) -> None:
    train, valid, test = clv_frames
    model = ValueModel(fast_config("clv", value_model=kind)).fit(train, valid)
    pred = model.predict(test)
    actual = test["future_spend_180d"].to_numpy()
    assert np.all(pred >= 0)
    # Totals are in the right currency range (within a factor of 2 of the actual total).
    assert 0.5 < pred.sum() / actual.sum() < 2.0
    # Higher predictions go with higher actual spend.
    top = pred >= np.quantile(pred, 0.8)
    assert actual[top].mean() > 2 * actual[~top].mean()


def test_wrong_task_config_is_refused(fast_config: Callable[..., ModelConfig]) -> None:
    with pytest.raises(ValueError, match="churn config"):
        ChurnModel(fast_config("clv"))
    with pytest.raises(ValueError, match="clv config"):
        ValueModel(fast_config("churn"))


def test_expected_next_purchase_date_follows_the_cutoff(
    churn_model: ChurnModel, churn_frames: Frames
) -> None:
    _, _, test = churn_frames
    rows = test.head(100)
    scores = score_frame(churn_model, rows)
    days = scores["expected_days_to_next_purchase"]
    dates = scores["expected_next_purchase_date"]
    finite = np.isfinite(days) & (days < 36_500)
    assert finite.any()
    gap = (dates[finite] - pd.to_datetime(rows["as_of"])[finite]).dt.days
    np.testing.assert_array_equal(gap.to_numpy(), np.ceil(days[finite].to_numpy()))
    assert dates[~finite].isna().all()
    # Without the cutoff there is no date to anchor on, and no column.
    assert (
        "expected_next_purchase_date"
        not in score_frame(churn_model, rows.drop(columns=["as_of"])).columns
    )
