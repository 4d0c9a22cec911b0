"""Evaluation plots for churn and lifetime-value models.

Every function builds a :class:`matplotlib.figure.Figure` with its own Agg canvas and never
touches ``pyplot``: no global figure registry, no GUI backend, so plots can be drawn from
worker threads or a server and saved with ``fig.savefig(path)`` or logged with
``mlflow.log_figure``. The numbers come from :mod:`rapport.training.metrics`, so a plot always
shows what the metrics report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rapport.training.metrics import calibration_table, decile_table, lift_table

__all__ = ["calibration_plot", "decile_plot", "gain_plot", "importance_plot", "tuning_plot"]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: PNG output without pyplot
    return fig


def _require_models(models: Mapping[str, npt.ArrayLike], name: str) -> None:
    if not models:
        raise ValueError(f"{name} must name at least one model")


def calibration_plot(
    y_true: npt.ArrayLike, probs: Mapping[str, npt.ArrayLike], n_bins: int = 10
) -> Figure:
    """Reliability curves: observed churn rate against mean predicted probability.

    Parameters
    ----------
    y_true
        Binary labels (1 = churned).
    probs
        Model name to predicted probabilities, one curve each.
    n_bins
        Equal-width probability bins, as :func:`~rapport.training.metrics.calibration_table`;
        empty bins are left out of a curve.

    Returns
    -------
    matplotlib.figure.Figure
        One axes: a line per model plus the dashed diagonal of perfect calibration.

    Raises
    ------
    ValueError
        If ``probs`` is empty, or on inputs that ``calibration_table`` rejects.
    """
    _require_models(probs, "probs")
    fig = _new_figure(6.0, 5.5)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    for name, p in probs.items():
        table = calibration_table(y_true, p, n_bins=n_bins)
        filled = table[table["n"] > 0]
        ax.plot(filled["mean_predicted"], filled["observed_rate"], marker="o", label=name)
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="Mean predicted churn probability",
        ylabel="Observed churn rate",
        title="Calibration",
    )
    ax.set_aspect("equal")
    ax.legend(loc="upper left")
    return fig


def gain_plot(
    y_true: npt.ArrayLike, scores: Mapping[str, npt.ArrayLike], n_bins: int = 10
) -> Figure:
    """Cumulative gain curves and lift per bin, side by side.

    Parameters
    ----------
    y_true
        Binary labels (1 = churned).
    scores
        Model name to risk score (higher = riskier).
    n_bins
        Equal-sized bins of descending score, as :func:`~rapport.training.metrics.lift_table`.

    Returns
    -------
    matplotlib.figure.Figure
        Left axes: share of churners captured against share of customers contacted, a line per
        model from the origin plus the dashed random-targeting diagonal. Right axes: lift per
        bin, a bar group per model, with a dashed line at lift 1.

    Raises
    ------
    ValueError
        If ``scores`` is empty, or on inputs that ``lift_table`` rejects.
    """
    _require_models(scores, "scores")
    fig = _new_figure(11.0, 4.8)
    gain_ax, lift_ax = fig.subplots(1, 2)
    gain_ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="random")

    width = 0.8 / len(scores)
    bins = np.arange(1, n_bins + 1)
    for i, (name, score) in enumerate(scores.items()):
        table = lift_table(y_true, score, n_bins=n_bins)
        share = np.r_[0.0, table["cumulative_share"].to_numpy()]
        capture = np.r_[0.0, table["cumulative_capture"].to_numpy()]
        gain_ax.plot(share, capture, marker="o", label=name)
        offset = (i - (len(scores) - 1) / 2) * width
        lift_ax.bar(bins + offset, table["lift"], width=width, label=name)

    gain_ax.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="Share of customers (highest risk first)",
        ylabel="Share of churners captured",
        title="Cumulative gain",
    )
    gain_ax.legend(loc="lower right")
    lift_ax.axhline(1.0, linestyle="--", color="grey", label="no lift")
    lift_ax.set(
        xticks=bins,
        xlabel="Bin (1 = highest risk)",
        ylabel="Lift (bin churn rate / overall)",
        title="Lift by bin",
    )
    lift_ax.legend(loc="upper right")
    return fig


def decile_plot(y_true: npt.ArrayLike, preds: Mapping[str, npt.ArrayLike]) -> Figure:
    """Mean predicted and mean actual value per decile of each model's prediction.

    Deciles are cut on each model's own prediction (google/lifetime_value's decile chart), so
    every model gets its own panel, sharing the value axis.

    Parameters
    ----------
    y_true
        Actual values.
    preds
        Model name to predicted values.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per model, each with ten "actual" and ten "predicted" bars (decile 0 = lowest
        predictions).

    Raises
    ------
    ValueError
        If ``preds`` is empty, or on inputs that ``decile_table`` rejects.
    """
    _require_models(preds, "preds")
    n = len(preds)
    fig = _new_figure(max(6.0, 4.5 * n), 4.5)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    fig.suptitle("Mean value by predicted decile")
    for ax, (name, pred) in zip(axes, preds.items(), strict=True):
        table = decile_table(y_true, pred)
        deciles = table["decile"].to_numpy()
        ax.bar(deciles - 0.2, table["mean_actual"], width=0.4, label="actual")
        ax.bar(deciles + 0.2, table["mean_predicted"], width=0.4, label="predicted")
        ax.set(
            xticks=deciles,
            xlabel="Predicted decile (0 = lowest)",
            title=name,
        )
        ax.legend(loc="upper left")
    axes[0].set_ylabel("Mean value per customer")
    return fig


def importance_plot(
    names: Sequence[str],
    importances: npt.ArrayLike,
    top: int = 20,
    label: str = "importance",
) -> Figure:
    """Horizontal bars of the largest feature importances, largest at the top.

    Parameters
    ----------
    names
        Feature names.
    importances
        One finite importance per name (gain, split count, permutation drop...).
    top
        How many features to show at most; ranked by importance, ties by input order.
    label
        What the importance measures: x-axis label and legend entry.

    Returns
    -------
    matplotlib.figure.Figure
        One axes with ``min(top, len(names))`` bars.

    Raises
    ------
    ValueError
        If the lengths differ, there are no features, an importance is not finite, or ``top``
        is not a positive integer.
    """
    values = np.asarray(importances, dtype=np.float64)
    if values.ndim != 1 or values.size != len(names):
        raise ValueError(
            f"importances must be one value per name: {values.shape} for {len(names)} names"
        )
    if values.size == 0:
        raise ValueError("names is empty")
    if not np.all(np.isfinite(values)):
        raise ValueError("importances contains NaN or infinite values")
    if isinstance(top, bool) or not isinstance(top, int | np.integer) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")

    order = np.argsort(-values, kind="stable")[:top]
    shown = [str(names[i]) for i in order]
    fig = _new_figure(7.0, 1.0 + 0.3 * len(shown))
    ax = fig.add_subplot()
    # barh draws the first bar at the bottom; reverse so the largest is on top.
    ax.barh(shown[::-1], values[order][::-1], label=label)
    ax.set(xlabel=label, ylabel="Feature", title=f"Top {len(shown)} features by {label}")
    ax.legend(loc="lower right")
    return fig


def tuning_plot(values: npt.ArrayLike, *, metric: str, higher_is_better: bool) -> Figure:
    """Validation metric per tuning trial, with the best so far as a step line.

    Parameters
    ----------
    values
        The metric of each trial in trial order (NaN for a failed trial: not drawn).
    metric
        The metric's name, for the axis label.
    higher_is_better
        Whether the best so far is the running maximum (else the minimum).

    Returns
    -------
    matplotlib.figure.Figure
    """
    v = np.asarray(values, dtype="float64")
    if v.size == 0:
        raise ValueError("values must hold at least one trial")
    trials = np.arange(v.size)
    filled = np.where(np.isnan(v), -np.inf if higher_is_better else np.inf, v)
    best = np.maximum.accumulate(filled) if higher_is_better else np.minimum.accumulate(filled)
    fig = _new_figure(6, 4)
    ax = fig.add_subplot()
    ax.plot(trials, v, "o", label="trial")
    ax.step(trials, np.where(np.isfinite(best), best, np.nan), where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.legend()
    return fig
