from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    roc_auc_score,
)

from rapport.training.metrics import (
    calibration_table,
    churn_metrics,
    decile_table,
    lift_table,
    value_metrics,
)

# --------------------------------------------------------------------------------------------
# Churn: one hand-worked example, already sorted by descending risk.
# --------------------------------------------------------------------------------------------

Y = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.7, 0.6, 0.45, 0.35, 0.3, 0.2, 0.1, 0.05])


def test_churn_metrics_by_hand():
    m = churn_metrics(Y, P)
    assert set(m) == {
        "roc_auc",
        "pr_auc",
        "brier",
        "log_loss",
        "ece",
        "lift_top_decile",
        "capture_top_decile",
        "churn_rate",
        "n",
    }
    # 3 churners x 7 stayers = 21 pairs; 0.9 and 0.8 beat all 7 stayers, 0.6 beats 6 (not 0.7).
    assert m["roc_auc"] == pytest.approx(20 / 21)
    # Walking down the ranking: hits at k=1 (P=1, R=1/3), k=2 (P=1, R=2/3), k=4 (P=3/4, R=1);
    # AP = 1/3 * 1 + 1/3 * 1 + 1/3 * 3/4 = 11/12.
    assert m["pr_auc"] == pytest.approx(11 / 12)
    # (p - y)^2: .01 + .04 + .49 + .16 + .2025 + .1225 + .09 + .04 + .01 + .0025 = 1.1675.
    assert m["brier"] == pytest.approx(0.11675)
    # -ln of the probability given to what happened, averaged.
    probs_of_outcome = [0.9, 0.8, 0.3, 0.6, 0.55, 0.65, 0.7, 0.8, 0.9, 0.95]
    assert m["log_loss"] == pytest.approx(-sum(math.log(q) for q in probs_of_outcome) / 10)
    # Bins of width 0.1: every row alone except 0.35 and 0.3 (bin 3: mean p .325, rate 0).
    # Singletons: |y - p| = .1 + .2 + .7 + .4 + .45 + .2 + .1 + .05 = 2.2, weight 1/10 each;
    # bin 3 adds 2/10 * .325 = .065. ECE = .22 + .065.
    assert m["ece"] == pytest.approx(0.285)
    # Top 10% = the single 0.9 row, a churner: rate 1 / overall 0.3; holds 1 of 3 churners.
    assert m["lift_top_decile"] == pytest.approx(10 / 3)
    assert m["capture_top_decile"] == pytest.approx(1 / 3)
    assert m["churn_rate"] == pytest.approx(0.3)
    assert m["n"] == 10.0


def test_churn_metrics_do_not_depend_on_row_order():
    perm = np.random.default_rng(3).permutation(10)
    assert churn_metrics(Y[perm], P[perm]) == pytest.approx(churn_metrics(Y, P))


def test_churn_metrics_agree_with_sklearn():
    rng = np.random.default_rng(0)
    y = rng.binomial(1, 0.25, 2_000)
    p = np.clip(0.25 + 0.35 * (y - 0.25) + rng.normal(0, 0.2, y.size), 0.001, 0.999)
    m = churn_metrics(y, p)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["log_loss"] == pytest.approx(log_loss(y, p))
    # sklearn's uniform calibration curve drops empty bins; its bins are right-closed but no
    # random probability lands exactly on an edge.
    rate, mean_p = calibration_curve(y, p, n_bins=10, strategy="uniform")
    table = calibration_table(y, p)
    filled = table[table["n"] > 0]
    np.testing.assert_allclose(filled["observed_rate"], rate)
    np.testing.assert_allclose(filled["mean_predicted"], mean_p)
    expected_ece = np.sum(filled["n"] / y.size * np.abs(rate - mean_p))
    assert m["ece"] == pytest.approx(expected_ece)


def test_churn_metrics_perfect_random_inverted():
    rng = np.random.default_rng(1)
    y = rng.binomial(1, 0.2, 5_000)
    # Perfect: every churner above every stayer, and the top decile is all churners.
    perfect = churn_metrics(y, 0.5 * y + 0.5 * rng.random(y.size) * 0.9)
    assert perfect["roc_auc"] == 1.0 and perfect["pr_auc"] == pytest.approx(1.0)
    assert perfect["lift_top_decile"] == pytest.approx(1 / y.mean())
    random = churn_metrics(y, rng.random(y.size))
    assert random["roc_auc"] == pytest.approx(0.5, abs=0.03)
    assert random["lift_top_decile"] == pytest.approx(1.0, abs=0.2)
    inverted = churn_metrics(y, 1 - (0.5 * y + 0.5 * rng.random(y.size) * 0.9))
    assert inverted["roc_auc"] == 0.0 and inverted["lift_top_decile"] == 0.0


def test_calibrated_probabilities_have_small_ece():
    rng = np.random.default_rng(2)
    p = rng.random(50_000)
    y = (rng.random(p.size) < p).astype(int)
    assert churn_metrics(y, p)["ece"] < 0.02
    # Predicting 1 - p is maximally miscalibrated for these labels.
    assert churn_metrics(y, 1 - p)["ece"] > 0.4


def test_log_loss_clips_certain_mistakes():
    y = np.array([1, 0] * 5)
    p = np.array([0.0, 1.0] * 5)  # certain and always wrong
    assert churn_metrics(y, p)["log_loss"] == pytest.approx(-math.log(1e-15))


def test_calibration_table_by_hand():
    p = [0.0, 0.05, 0.15, 0.15, 0.3, 0.55, 0.95, 1.0]
    y = [0, 0, 0, 1, 1, 1, 1, 1]
    t = calibration_table(y, p)
    assert list(t.columns) == ["bin", "lower", "upper", "n", "mean_predicted", "observed_rate"]
    assert t["n"].tolist() == [2, 2, 0, 1, 0, 1, 0, 0, 0, 2]
    # 0.3 sits on an edge and belongs to [0.3, 0.4); 1.0 belongs to the last bin.
    assert t.loc[3, "mean_predicted"] == pytest.approx(0.3)
    assert t.loc[0, "mean_predicted"] == pytest.approx(0.025)
    assert t.loc[1, "observed_rate"] == pytest.approx(0.5)
    assert t.loc[9, "mean_predicted"] == pytest.approx(0.975)
    assert t.loc[9, "observed_rate"] == 1.0
    assert t.loc[2, ["mean_predicted", "observed_rate"]].isna().all()
    assert t["lower"].tolist() == pytest.approx([k / 10 for k in range(10)])
    assert len(calibration_table(y, p, n_bins=4)) == 4


def test_lift_table_by_hand():
    t = lift_table(Y, P, n_bins=5)
    assert list(t.columns) == [
        "bin",
        "n",
        "rate",
        "lift",
        "cumulative_share",
        "cumulative_capture",
    ]
    # Pairs from the top: (1, 1), (0, 1), then stayers only; overall rate 0.3.
    assert t["bin"].tolist() == [1, 2, 3, 4, 5]
    assert t["n"].tolist() == [2] * 5
    assert t["rate"].tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0, 0.0])
    assert t["lift"].tolist() == pytest.approx([1 / 0.3, 0.5 / 0.3, 0, 0, 0])
    assert t["cumulative_share"].tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert t["cumulative_capture"].tolist() == pytest.approx([2 / 3, 1, 1, 1, 1])


def test_lift_table_uneven_bins_and_ties():
    # 23 rows into 10 bins: pd.qcut sizes, never empty, all rows used.
    y = np.array([1, 0] * 11 + [1])
    t = lift_table(y, np.arange(23.0), n_bins=10)
    assert t["n"].sum() == 23 and t["n"].min() >= 2 and t["n"].max() <= 3
    assert t["cumulative_capture"].iloc[-1] == pytest.approx(1.0)
    # A constant score still fills every bin; ties go by input position.
    tied = lift_table([1] + [0] * 9, np.full(10, 0.5), n_bins=10)
    assert tied["n"].tolist() == [1] * 10
    assert tied["rate"].tolist() == [1.0] + [0.0] * 9


# --------------------------------------------------------------------------------------------
# Value
# --------------------------------------------------------------------------------------------

V = np.arange(1.0, 11.0)  # actual values 1..10, total 55


def test_gini_by_hand():
    # Oracle order 10, 9, ..., 1: cumulative sums 10, 19, 27, 34, 40, 45, 49, 52, 54, 55
    # add to 385, raw = 2 * 385 / (10 * 55) - 1 = 0.4.
    assert value_metrics(V, V)["gini"] == 1.0
    # Inverted, order 1..10: cumulative sums 1, 3, 6, 10, 15, 21, 28, 36, 45, 55 add to 220,
    # raw = 440 / 550 - 1 = -0.2, normalised -0.2 / 0.4.
    assert value_metrics(V, -V)["gini"] == pytest.approx(-0.5)
    # Top two swapped, order 9, 10, 8, ...: first cumulative sum 9 instead of 10, total 384,
    # raw = 768 / 550 - 1 = 218 / 550, normalised 218 / 220.
    swapped = V.copy()
    swapped[[8, 9]] = swapped[[9, 8]]
    assert value_metrics(V, swapped)["gini"] == pytest.approx(218 / 220)


def test_value_metrics_by_hand():
    pred = np.array([2.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 12.0])
    m = value_metrics(V, pred)
    assert set(m) == {"gini", "spearman", "decile_mape", "total_ratio", "mae", "rmse", "n"}
    # Rows 0 and 1 tie at 2 and sit at the bottom in either order: cumulative sums 10, ..., 52
    # then 53 or 54, then 55, i.e. 384 or 385; their average is 384.5 (the tie's expectation),
    # raw = 769 / 550 - 1 = 219 / 550, normalised 219 / 220.
    assert m["gini"] == pytest.approx(219 / 220)
    # Ten rows, one per decile: |2 - 1| / 1 = 1, |12 - 10| / 10 = 0.2, the rest 0.
    assert m["decile_mape"] == pytest.approx(1.2 / 10)
    assert m["total_ratio"] == pytest.approx(58 / 55)
    assert m["mae"] == pytest.approx((1 + 2) / 10)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 4) / 10))
    assert m["spearman"] == pytest.approx(stats.spearmanr(V, pred).statistic)
    assert m["n"] == 10.0


def test_value_metrics_agree_with_sklearn_and_scipy():
    rng = np.random.default_rng(4)
    y = rng.lognormal(3, 1, 1_000) * (rng.random(1_000) < 0.4)
    pred = y * rng.lognormal(0, 0.5, y.size) + rng.random(y.size)
    m = value_metrics(y, pred)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, pred))
    assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(y, pred)))
    assert m["spearman"] == pytest.approx(stats.spearmanr(y, pred).statistic)


def test_gini_perfect_random_inverted():
    rng = np.random.default_rng(5)
    y = rng.lognormal(2, 1.2, 20_000)
    assert value_metrics(y, y)["gini"] == 1.0
    assert value_metrics(y, np.log1p(y))["gini"] == 1.0  # only the order matters
    assert value_metrics(y, rng.random(y.size))["gini"] == pytest.approx(0.0, abs=0.03)
    assert value_metrics(y, -y)["gini"] < -0.5


def test_gini_ties_do_not_depend_on_input_order():
    y = np.array([0, 0, 5, 1, 0, 9, 0, 2, 0, 3.0])
    pred = np.array([1, 1, 1, 2, 2, 2, 3, 3, 3, 3.0])
    perm = np.random.default_rng(6).permutation(10)
    assert value_metrics(y, pred)["gini"] == pytest.approx(
        value_metrics(y[perm], pred[perm])["gini"]
    )
    # A constant prediction is one big tie: a straight gain line, raw 1/n (right endpoints).
    oracle_cumsum = np.cumsum(np.sort(y)[::-1]) / y.sum()
    oracle_raw = 2 * oracle_cumsum.mean() - 1
    assert value_metrics(y, np.ones(10))["gini"] == pytest.approx((1 / 10) / oracle_raw)


def _reference_gini(y_true, y_pred):
    """google/lifetime_value, lifetime_value/metrics.py (cumulative_true, gini_from_gain),
    used as in notebooks/kdd_cup_98/regression.ipynb. ``raw[0]`` became ``raw.iloc[0]``:
    pandas 3 no longer falls back to positions on a string index."""

    def cumulative_true(y_true, y_pred):
        df = pd.DataFrame({"y_true": y_true, "y_pred": y_pred}).sort_values(
            by="y_pred", ascending=False
        )
        return (df["y_true"].cumsum() / df["y_true"].sum()).values

    def gini_from_gain(df):
        raw = df.apply(lambda x: 2 * x.sum() / df.shape[0] - 1.0)
        normalized = raw / raw.iloc[0]
        return pd.DataFrame({"raw": raw, "normalized": normalized})[["raw", "normalized"]]

    gain = pd.DataFrame(
        {"lorenz": cumulative_true(y_true, y_true), "model": cumulative_true(y_true, y_pred)}
    )
    return gini_from_gain(gain)["normalized"]["model"]


def _reference_decile_mape(y_true, y_pred):
    """google/lifetime_value decile_stats (pd.qcut on y_pred, per-bucket means,
    |pred_mean - label_mean| / label_mean) and the notebook's ``.mean()`` over deciles."""
    decile = pd.qcut(y_pred, q=10, labels=[f"{i}" for i in range(10)])
    df = pd.DataFrame({"y_true": y_true, "y_pred": y_pred, "decile": decile})
    means = df.groupby("decile", observed=True)[["y_true", "y_pred"]].mean()
    per_decile = np.abs(means["y_pred"] - means["y_true"]) / means["y_true"]
    return per_decile.mean(), means


@pytest.mark.parametrize("n", [10, 237, 1_000])
def test_matches_google_lifetime_value_without_ties(n):
    rng = np.random.default_rng(n)
    y = np.round(rng.lognormal(3, 1, n) * (rng.random(n) < 0.6), 2)
    pred = y * rng.lognormal(0, 0.7, n) + rng.random(n)  # distinct almost surely
    assert np.unique(pred).size == n
    m = value_metrics(y, pred)
    assert m["gini"] == pytest.approx(_reference_gini(y, pred), rel=1e-12)
    ref_mape, ref_means = _reference_decile_mape(y, pred)
    assert m["decile_mape"] == pytest.approx(ref_mape, rel=1e-12)
    table = decile_table(y, pred)
    np.testing.assert_allclose(table["mean_actual"], ref_means["y_true"], rtol=1e-12)
    np.testing.assert_allclose(table["mean_predicted"], ref_means["y_pred"], rtol=1e-12)


def test_decile_table_by_hand():
    y = np.arange(20.0)
    pred = y[::-1].copy()  # decile 0 (lowest predictions) holds the two largest actuals
    t = decile_table(y, pred)
    assert list(t.columns) == ["decile", "n", "mean_predicted", "mean_actual"]
    assert t["decile"].tolist() == list(range(10))
    assert t["n"].tolist() == [2] * 10
    assert t["mean_predicted"].tolist() == pytest.approx([0.5 + 2 * k for k in range(10)])
    assert t["mean_actual"].tolist() == pytest.approx([18.5 - 2 * k for k in range(10)])


def test_decile_mape_with_zero_actual_deciles():
    # Decile 0 has actual 0 and prediction 0 (0/0: skipped, as pandas' mean skips NaN);
    # the rest are exact, so the MAPE is 0.
    y = np.arange(10.0)
    assert value_metrics(y, y)["decile_mape"] == 0.0
    # A non-zero prediction for a zero-actual decile makes it infinite.
    pred = y.copy()
    pred[0] = 0.5
    assert value_metrics(y, pred)["decile_mape"] == math.inf


def test_constant_prediction_has_nan_spearman():
    assert math.isnan(value_metrics(V, np.ones(10))["spearman"])


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        (Y, P[:-1], "y_true and p_churn differ in length"),
        (np.r_[Y[:-1], 2], P, "y_true must hold binary labels"),
        (Y, np.r_[P[:-1], 1.5], r"p_churn must lie in \[0, 1\]"),
        (Y, np.r_[P[:-1], -0.1], r"p_churn must lie in \[0, 1\]"),
        (Y, np.r_[P[:-1], np.nan], "p_churn contains NaN"),
        (Y, np.r_[P[:-1], np.inf], "p_churn contains NaN or infinite"),
        (np.r_[Y[:-1], np.nan], P, "y_true contains NaN"),
        (np.zeros(10), P, "y_true holds only class 0"),
        (np.ones(10), P, "y_true holds only class 1"),
        (Y[:5], P[:5], "at least 10 rows"),
        (Y.reshape(2, 5), P.reshape(2, 5), "y_true must be one-dimensional"),
        ([], [], "y_true is empty"),
        (["a"] * 10, P, "y_true must be numeric"),
    ],
)
def test_churn_metrics_validation(y, p, match):
    with pytest.raises(ValueError, match=match):
        churn_metrics(y, p)


@pytest.mark.parametrize(
    ("y", "pred", "match"),
    [
        (V, V[:-1], "y_true and y_pred differ in length"),
        (V, np.r_[V[:-1], np.nan], "y_pred contains NaN"),
        (np.r_[V[:-1], np.inf], V, "y_true contains NaN or infinite"),
        (V[:9], V[:9], "at least 10 rows"),
        (np.zeros(10), V, "y_true must have a positive total"),
        (-V, V, "y_true must have a positive total"),
    ],
)
def test_value_metrics_validation(y, pred, match):
    with pytest.raises(ValueError, match=match):
        value_metrics(y, pred)


def test_table_validation():
    with pytest.raises(ValueError, match="y_true has no churners"):
        lift_table(np.zeros(10), P)
    with pytest.raises(ValueError, match="y_true must hold binary"):
        lift_table(V, P)
    with pytest.raises(ValueError, match="y_true and score differ in length"):
        lift_table(Y, P[:3])
    with pytest.raises(ValueError, match="score contains NaN"):
        lift_table(Y, np.r_[P[:-1], np.nan])
    with pytest.raises(ValueError, match="at least 20 rows"):
        lift_table(Y, P, n_bins=20)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n_bins must be a positive integer"):
            lift_table(Y, P, n_bins=bad)
        with pytest.raises(ValueError, match="n_bins must be a positive integer"):
            calibration_table(Y, P, n_bins=bad)
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\]"):
        calibration_table(Y, P * 2)
    with pytest.raises(ValueError, match="y_true must hold binary"):
        calibration_table(np.r_[Y[:-1], 3], P)
    with pytest.raises(ValueError, match="at least 10 rows"):
        decile_table(V[:9], V[:9])
    with pytest.raises(ValueError, match="y_true and y_pred differ in length"):
        decile_table(V, V[:3])
