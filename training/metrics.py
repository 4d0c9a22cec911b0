"""Evaluation metrics for the churn classifier and the lifetime-value regressor.

Everything here is a pure function of arrays: no model objects, no global state, so the same
code scores a validation fold, a back-test cutoff or a served batch.

Conventions
-----------
* Ranking tables (:func:`lift_table`, :func:`decile_table`) cut rows into equal-sized groups
  by rank, the way ``pd.qcut`` cuts distinct values. Tied scores are ordered by input position
  so a constant score still fills every group; the groups then differ only in which actuals
  they hold.
* The value metrics follow google/lifetime_value (``lifetime_value/metrics.py`` and the
  KDD Cup 98 notebook), so figures are comparable with the ZILN paper; each docstring says
  where and why it departs.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: The log loss clips the probability given to the observed outcome below at this, so a
#: certain miss costs ``-ln(1e-15)``, about 34.5 nats, instead of infinity.
LOG_LOSS_EPS = 1e-15

__all__ = [
    "LOG_LOSS_EPS",
    "calibration_table",
    "churn_metrics",
    "decile_table",
    "lift_table",
    "value_metrics",
]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _as_1d(values: npt.ArrayLike, name: str) -> FloatArray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _pair(
    a: npt.ArrayLike, b: npt.ArrayLike, name_a: str, name_b: str
) -> tuple[FloatArray, FloatArray]:
    x, y = _as_1d(a, name_a), _as_1d(b, name_b)
    if x.size != y.size:
        raise ValueError(f"{name_a} and {name_b} differ in length: {x.size} != {y.size}")
    return x, y


def _check_binary(y: FloatArray, name: str) -> None:
    bad = np.unique(y[(y != 0.0) & (y != 1.0)])
    if bad.size:
        raise ValueError(f"{name} must hold binary labels 0/1, found {bad[:5].tolist()}")


def _check_probabilities(p: FloatArray, name: str) -> None:
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"{name} must lie in [0, 1], found [{p.min():g}, {p.max():g}]")


def _check_bins(n_bins: int, n: int, name: str = "n_bins") -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"{name} must be a positive integer, got {n_bins!r}")
    if n < n_bins:
        raise ValueError(f"need at least {n_bins} rows for {n_bins} bins, got {n}")


def _binary_inputs(
    y_true: npt.ArrayLike, p: npt.ArrayLike, p_name: str
) -> tuple[FloatArray, FloatArray]:
    y, prob = _pair(y_true, p, "y_true", p_name)
    _check_binary(y, "y_true")
    _check_probabilities(prob, p_name)
    return y, prob


# --------------------------------------------------------------------------------------------
# Binning
# --------------------------------------------------------------------------------------------


def _rank_bins(score: FloatArray, n_bins: int, *, descending: bool) -> IntArray:
    """Equal-sized bins 0..n_bins-1 by rank; ties ordered by input position.

    This is ``pd.qcut`` on ``rank(method="first")``: for distinct scores it puts every row in
    the same bucket as ``pd.qcut(score, n_bins)`` (google/lifetime_value's ``decile_stats``),
    and unlike ``qcut`` on the raw scores it never fails on duplicate edges.
    """
    ranks = pd.Series(score).rank(method="first", ascending=not descending)
    bins = pd.qcut(ranks, n_bins, labels=False)
    return np.asarray(bins, dtype=np.int64)


def _tie_averaged(y: FloatArray, key: FloatArray) -> tuple[FloatArray, IntArray]:
    """``y`` replaced by its mean within each group of equal ``key``, and the descending order.

    Within a tie the gain curve is a sum of cumulative sums, which is linear in the order of
    the tied rows, so averaging ``y`` over the tie gives exactly the expected gain over all
    orders of the tied rows: the result no longer depends on how the input was sorted.
    """
    _, inverse = np.unique(key, return_inverse=True)
    inverse = inverse.reshape(-1)
    sums = np.bincount(inverse, weights=y)
    counts = np.bincount(inverse)
    averaged = (sums / counts)[inverse]
    order = np.argsort(-inverse, kind="stable")
    return averaged, order.astype(np.int64)


def _raw_gini(y_true: FloatArray, y_pred: FloatArray) -> float:
    # google/lifetime_value: gain = cumsum(y_true sorted by y_pred desc) / sum(y_true),
    # raw = 2 * gain.sum() / n - 1 (a right-endpoint Riemann sum, so a random order scores
    # 1/n rather than 0).
    averaged, order = _tie_averaged(y_true, y_pred)
    gain = np.cumsum(averaged[order]) / y_true.sum()
    return float(2.0 * gain.sum() / gain.size - 1.0)


# --------------------------------------------------------------------------------------------
# Churn
# --------------------------------------------------------------------------------------------


def calibration_table(y_true: npt.ArrayLike, p: npt.ArrayLike, n_bins: int = 10) -> pd.DataFrame:
    """Observed churn rate against mean predicted probability in equal-width bins.

    Parameters
    ----------
    y_true
        Binary labels (1 = churned).
    p
        Predicted probabilities in ``[0, 1]``.
    n_bins
        Number of equal-width bins on ``[0, 1]``. Bin ``k`` holds ``k/n_bins <= p <
        (k+1)/n_bins``; the last bin also holds ``p == 1``.

    Returns
    -------
    pandas.DataFrame
        One row per bin, empty bins included (``n == 0``, NaN means): ``bin``, ``lower``,
        ``upper``, ``n``, ``mean_predicted``, ``observed_rate``.

    Raises
    ------
    ValueError
        On lengths that differ, labels other than 0/1, probabilities outside ``[0, 1]`` or not
        finite, or a bad ``n_bins``.
    """
    y, prob = _binary_inputs(y_true, p, "p")
    _check_bins(n_bins, n_bins)
    # floor(p * n) rather than searchsorted on linspace edges: linspace(0, 1, 11)[3] is
    # 0.30000000000000004, which would put p == 0.3 in the bin below.
    ids = np.minimum(np.floor(prob * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(ids, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(ids, weights=prob, minlength=n_bins) / counts
        rate = np.bincount(ids, weights=y, minlength=n_bins) / counts
    edges = np.arange(n_bins + 1) / n_bins
    return pd.DataFrame(
        {
            "bin": np.arange(n_bins),
            "lower": edges[:-1],
            "upper": edges[1:],
            "n": counts,
            "mean_predicted": mean_p,
            "observed_rate": rate,
        }
    )


def lift_table(y_true: npt.ArrayLike, score: npt.ArrayLike, n_bins: int = 10) -> pd.DataFrame:
    """Churn rate, lift and cumulative capture by bins of descending score.

    Parameters
    ----------
    y_true
        Binary labels (1 = churned); at least one must be 1.
    score
        Any risk score; higher means more likely to churn. Only its order matters.
    n_bins
        Number of equal-sized bins (deciles by default); needs at least ``n_bins`` rows.

    Returns
    -------
    pandas.DataFrame
        One row per bin, riskiest first:

        * ``bin``: 1 = highest scores,
        * ``n``: rows in the bin,
        * ``rate``: churn rate in the bin,
        * ``lift``: ``rate`` / overall churn rate,
        * ``cumulative_share``: share of all rows in this and riskier bins,
        * ``cumulative_capture``: share of all churners in this and riskier bins (the gain
          curve).

    Raises
    ------
    ValueError
        On lengths that differ, labels other than 0/1 or without a churner, scores that are
        not finite, or fewer rows than bins.
    """
    y, s = _pair(y_true, score, "y_true", "score")
    _check_binary(y, "y_true")
    _check_bins(n_bins, y.size)
    positives = y.sum()
    if positives == 0:
        raise ValueError("y_true has no churners (all 0): lift and capture are undefined")
    ids = _rank_bins(s, n_bins, descending=True)
    counts = np.bincount(ids, minlength=n_bins)
    hits = np.bincount(ids, weights=y, minlength=n_bins)
    rate = hits / counts
    return pd.DataFrame(
        {
            "bin": np.arange(1, n_bins + 1),
            "n": counts,
            "rate": rate,
            "lift": rate / (positives / y.size),
            "cumulative_share": np.cumsum(counts) / y.size,
            "cumulative_capture": np.cumsum(hits) / positives,
        }
    )


def churn_metrics(y_true: npt.ArrayLike, p_churn: npt.ArrayLike) -> dict[str, float]:
    """Discrimination, calibration and targeting metrics for churn probabilities.

    Parameters
    ----------
    y_true
        Binary labels (1 = churned); both classes must be present and there must be at least
        10 rows (for the top decile).
    p_churn
        Predicted churn probabilities in ``[0, 1]``.

    Returns
    -------
    dict[str, float]
        * ``roc_auc``: area under the ROC curve (ties count one half).
        * ``pr_auc``: average precision, ``sum_k (R_k - R_{k-1}) P_k`` over thresholds, as
          :func:`sklearn.metrics.average_precision_score` (no trapezoidal interpolation).
        * ``brier``: mean of ``(p - y)**2``.
        * ``log_loss``: mean negative log-likelihood in nats; the probability given to the
          observed outcome is clipped below at :data:`LOG_LOSS_EPS`.
        * ``ece``: expected calibration error over 10 equal-width bins of ``p``:
          ``sum_b n_b / n * |observed_rate_b - mean_predicted_b|``, empty bins contributing
          nothing (bins as :func:`calibration_table`).
        * ``lift_top_decile``: churn rate among the 10% with the highest ``p_churn`` divided by
          the overall churn rate (bin 1 of :func:`lift_table`).
        * ``capture_top_decile``: share of all churners found in that top 10%.
        * ``churn_rate``: mean of ``y_true``.
        * ``n``: number of rows.

    Raises
    ------
    ValueError
        On lengths that differ, labels other than 0/1, a single class, probabilities outside
        ``[0, 1]`` or not finite, or fewer than 10 rows.
    """
    y, p = _binary_inputs(y_true, p_churn, "p_churn")
    if y.min() == y.max():
        raise ValueError(
            f"y_true holds only class {int(y[0])}: ROC and PR AUC need both classes present"
        )
    if y.size < 10:
        raise ValueError(f"y_true needs at least 10 rows for the top decile, got {y.size}")

    # Clip the probability of what happened, not p itself: 1 - (1 - 1e-15) is not 1e-15 in
    # floating point, so clipping p would charge misses on the two sides differently.
    outcome_p = np.where(y == 1.0, p, 1.0 - p)
    log_loss = -np.mean(np.log(np.maximum(outcome_p, LOG_LOSS_EPS)))

    calib = calibration_table(y, p, n_bins=10)
    filled = calib[calib["n"] > 0]
    ece = float(
        np.sum(filled["n"] / y.size * np.abs(filled["observed_rate"] - filled["mean_predicted"]))
    )

    top = lift_table(y, p, n_bins=10).iloc[0]
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "brier": float(np.mean((p - y) ** 2)),
        "log_loss": float(log_loss),
        "ece": ece,
        "lift_top_decile": float(top["lift"]),
        "capture_top_decile": float(top["cumulative_capture"]),
        "churn_rate": float(y.mean()),
        "n": float(y.size),
    }


# --------------------------------------------------------------------------------------------
# Lifetime value
# --------------------------------------------------------------------------------------------


def decile_table(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> pd.DataFrame:
    """Mean predicted and mean actual value per decile of the prediction.

    As google/lifetime_value's ``decile_stats``: rows are cut into ten equal-sized buckets by
    ascending ``y_pred`` (``pd.qcut``), decile 0 holding the lowest predictions. Tied
    predictions are ordered by input position instead of making ``qcut`` fail on duplicate
    edges.

    Parameters
    ----------
    y_true
        Actual values; at least 10 rows.
    y_pred
        Predicted values.

    Returns
    -------
    pandas.DataFrame
        ``decile`` (0-9), ``n``, ``mean_predicted``, ``mean_actual``.

    Raises
    ------
    ValueError
        On lengths that differ, values that are not finite, or fewer than 10 rows.
    """
    y, pred = _pair(y_true, y_pred, "y_true", "y_pred")
    _check_bins(10, y.size)
    ids = _rank_bins(pred, 10, descending=False)
    counts = np.bincount(ids, minlength=10)
    return pd.DataFrame(
        {
            "decile": np.arange(10),
            "n": counts,
            "mean_predicted": np.bincount(ids, weights=pred, minlength=10) / counts,
            "mean_actual": np.bincount(ids, weights=y, minlength=10) / counts,
        }
    )


def _decile_mape(table: pd.DataFrame) -> float:
    pred = table["mean_predicted"].to_numpy(dtype=np.float64)
    actual = table["mean_actual"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.abs(pred - actual) / actual
    # The reference takes pandas' .mean(), which skips the NaN of a 0/0 decile but keeps the
    # inf of a decile with zero actual value and a non-zero prediction.
    kept = err[~np.isnan(err)]
    return float(kept.mean()) if kept.size else float("nan")


def value_metrics(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> dict[str, float]:
    """Ranking, calibration and error metrics for lifetime-value predictions.

    Parameters
    ----------
    y_true
        Actual values over the horizon; at least 10 rows and a positive total.
    y_pred
        Predicted values.

    Returns
    -------
    dict[str, float]
        * ``gini``: normalised Gini of google/lifetime_value (``cumulative_true`` +
          ``gini_from_gain``). The gain curve ``G_k`` is the share of total actual value in the
          ``k`` highest predictions; ``raw = 2 * mean(G) - 1`` and
          ``gini = raw(model) / raw(ordered by y_true)``. So 1 is a perfect ranking, about 0 a
          random one (exactly ``1/n / raw(ordered by y_true)`` in expectation, since the
          reference sums right endpoints), negative an inverted one. One departure: the
          reference sorts ties in ``y_pred`` in whatever order ``sort_values`` leaves them, so
          its value depends on input order; here the actual values within a tie are averaged,
          which is the reference's expectation over all orders of the tie. Without ties the
          two agree exactly.
        * ``spearman``: Spearman rank correlation (NaN when either input is constant).
        * ``decile_mape``: with :func:`decile_table`, the mean over the ten deciles of
          ``|mean_predicted - mean_actual| / mean_actual``, as ``decile_stats`` and the KDD Cup
          98 notebook (``df_decile['decile_mape'].mean()``). A decile whose mean actual value is
          0 makes it ``inf``, unless its mean prediction is 0 too (0/0, skipped as pandas
          skips NaN).
        * ``total_ratio``: ``sum(y_pred) / sum(y_true)``; 1 means the total is right.
        * ``mae``: mean absolute error.
        * ``rmse``: root mean squared error.
        * ``n``: number of rows.

    Raises
    ------
    ValueError
        On lengths that differ, values that are not finite, fewer than 10 rows, or a
        ``y_true`` total that is not positive (the gain curve and ``total_ratio`` divide
        by it).
    """
    y, pred = _pair(y_true, y_pred, "y_true", "y_pred")
    _check_bins(10, y.size)
    total = y.sum()
    if total <= 0:
        raise ValueError(f"y_true must have a positive total, got {total:g}")

    # The oracle's raw Gini is at least 1/n when the total is positive: the reference's
    # random-order expectation is 1/n and sorting by y_true maximises it.
    gini = _raw_gini(y, pred) / _raw_gini(y, y)

    if np.ptp(y) == 0 or np.ptp(pred) == 0:
        spearman = float("nan")
    else:
        spearman = float(stats.spearmanr(y, pred).statistic)

    err = pred - y
    return {
        "gini": gini,
        "spearman": spearman,
        "decile_mape": _decile_mape(decile_table(y, pred)),
        "total_ratio": float(pred.sum() / total),
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "n": float(y.size),
    }
