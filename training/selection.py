"""Honest model selection: every candidate family fitted, chosen on validation, compared on test.

:func:`evaluate_candidates` fits LightGBM and the baseline families of
:mod:`rapport.training.candidates` on the training rows, scores every one on the validation
and the test rows, and selects the candidate with the best validation value of the gate's
metric (the test rows never choose). A baseline that cannot be fitted or scored, or whose fit
is degenerate, is marked unusable with the reason instead of being scored (a constant score
would read as ROC-AUC 0.5). The best baseline on test, other than the selected model, is what
the gate and the paired bootstrap compare the selected model with.

Rows of the table, by role:

* ``model``: ``lightgbm``.
* ``baseline``: churn ``logistic``, ``bgnbd``, ``pnbd``; value ``bgnbd_gg``, ``two_part``.
  Any of them can be selected, registered and served.
* ``reference`` (churn): ``bgnbd_rank`` and ``pnbd_rank`` rank customers by minus their
  expected purchases. Ranks, not probabilities: shown for comparison, never selected and
  not part of the gate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import mlflow
import numpy as np
import pandas as pd

from rapport.training.bootstrap import PairedDifference, paired_bootstrap
from rapport.training.btyd import ConvergenceError
from rapport.training.candidates import (
    CHURN_FAMILIES,
    VALUE_FAMILIES,
    BGNBDChurnModel,
    Estimator,
    ParetoNBDChurnModel,
    constant_reason,
    predict,
)
from rapport.training.config import GATE_METRICS, ModelConfig
from rapport.training.metrics import churn_metrics, value_metrics
from rapport.training.models import ChurnModel, ValueModel

#: Metrics that only make sense for calibrated probabilities, dropped for rank-only scores.
PROBABILITY_METRICS = ("brier", "log_loss", "ece")
#: Reference rows: name -> the family whose expected purchases they rank by.
REFERENCES = {"bgnbd_rank": "bgnbd", "pnbd_rank": "pnbd"}
#: Paired resamples of the test customers for the gain's interval.
BOOTSTRAP_RESAMPLES = 1000
#: What a baseline family may raise when the data do not support it: unusable, not fatal.
FIT_ERRORS = (
    ValueError,
    ConvergenceError,
    RuntimeError,
    FloatingPointError,
    np.linalg.LinAlgError,
)


@dataclass
class Evaluation:
    """Every candidate's validation and test metrics, the selection and the gain on test.

    ``metrics`` and ``valid_table`` hold the usable rows only; ``unusable`` maps the others to
    why; ``predictions`` are the usable rows' test scores.
    """

    model: Estimator
    selected: str
    lightgbm: ChurnModel | ValueModel
    y_test: np.ndarray
    predictions: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]]
    valid_table: dict[str, dict[str, float]]
    roles: dict[str, str]
    gate_metric: str
    unusable: dict[str, str] = field(default_factory=dict)
    baseline: str | None = None
    gain: PairedDifference | None = None

    @property
    def valid_metrics(self) -> dict[str, float]:
        """The selected model's validation metrics."""
        return self.valid_table[self.selected]

    def table(self) -> pd.DataFrame:
        """Candidates as rows: test metrics, then the validation gate metric, role, status.

        The status is ``selected``, ``ok`` or ``unusable: <why>``.
        """
        rows = {}
        for name, role in self.roles.items():
            row: dict[str, object] = dict(self.metrics.get(name, {}))
            row[f"valid_{self.gate_metric}"] = self.valid_table.get(name, {}).get(
                self.gate_metric, math.nan
            )
            row["role"] = role
            row["status"] = (
                f"unusable: {self.unusable[name]}"
                if name in self.unusable
                else ("selected" if name == self.selected else "ok")
            )
            rows[name] = row
        return pd.DataFrame.from_dict(rows, orient="index")


def _families(task: str) -> dict[str, type]:
    return CHURN_FAMILIES if task == "churn" else VALUE_FAMILIES


def fit_candidates(
    config: ModelConfig, train: pd.DataFrame, valid: pd.DataFrame
) -> tuple[dict[str, Estimator], dict[str, str]]:
    """Fit every family of the task: the fitted models, and the unusable ones with why.

    LightGBM's failures are the run's (raised); a baseline that cannot be fitted on these
    rows, or is degenerate, is unusable.
    """
    fitted: dict[str, Estimator] = {}
    unusable: dict[str, str] = {}
    for name, family in _families(config.task).items():
        if name == "lightgbm":
            fitted[name] = family(config).fit(train, valid)
            continue
        try:
            model = family(config).fit(train, valid)
        except FIT_ERRORS as error:
            unusable[name] = f"cannot be fitted: {error}"
            continue
        reason = getattr(model, "degenerate_", None)
        if reason:
            unusable[name] = f"degenerate fit: {reason}"
        fitted[name] = model
    return fitted, unusable


def _scores(
    config: ModelConfig, models: dict[str, Estimator], frame: pd.DataFrame
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Each row's score on ``frame`` (references included), and rows that cannot score."""
    scores: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    for name, model in models.items():
        try:
            scores[name] = predict(model, frame)
        except FIT_ERRORS as error:
            failed[name] = f"cannot be scored: {error}"
    if config.task == "churn":
        for name, parent in REFERENCES.items():
            source = models.get(parent)
            if isinstance(source, BGNBDChurnModel | ParetoNBDChurnModel) and parent in scores:
                scores[name] = -np.asarray(source.expected_purchases(frame), dtype="float64")
    return scores, failed


def _rank_only(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Churn metrics for a score that ranks but is not a probability."""
    ranks = pd.Series(score).rank(method="average").to_numpy()
    out = churn_metrics(y, (ranks - 0.5) / len(ranks))
    return {k: v for k, v in out.items() if k not in PROBABILITY_METRICS}


def _metrics(
    config: ModelConfig, frame: pd.DataFrame, scores: dict[str, np.ndarray]
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Metrics of every usable score; the scores that carry no ranking, with why."""
    out: dict[str, dict[str, float]] = {}
    unusable: dict[str, str] = {}
    if config.task == "churn":
        y = frame[config.label].astype("int8").to_numpy()
    else:
        y = frame[config.label].to_numpy(dtype="float64")
    for name, score in scores.items():
        reason = constant_reason(score)
        if reason is not None:
            unusable[name] = reason
            continue
        try:
            if name in REFERENCES:
                out[name] = _rank_only(y, score)
            elif config.task == "churn":
                out[name] = churn_metrics(y, np.clip(score, 0.0, 1.0))
            else:
                out[name] = value_metrics(y, score)
        except ValueError as error:
            unusable[name] = f"cannot be scored: {error}"
    return out, unusable


def _best(metrics: dict[str, dict[str, float]], names: list[str], metric: str) -> str | None:
    """The name with the best finite ``metric`` (earliest on a tie), or None."""
    sign = 1.0 if GATE_METRICS[metric] else -1.0
    ranked = [
        (sign * metrics[n][metric], -i, n)
        for i, n in enumerate(names)
        if n in metrics and math.isfinite(metrics[n].get(metric, math.nan))
    ]
    return max(ranked)[2] if ranked else None


def evaluate_candidates(
    config: ModelConfig, train: pd.DataFrame, valid: pd.DataFrame, test: pd.DataFrame
) -> Evaluation:
    """Fit every candidate, select one on the validation rows, compare it on the test rows.

    Parameters
    ----------
    config
        Model config (task, label, gate metric, LightGBM parameters).
    train, valid, test
        Feature rows with the label ``config.label``. ``valid`` early-stops and calibrates
        LightGBM and selects the candidate; ``test`` only reports and feeds the gate.

    Returns
    -------
    Evaluation

    Raises
    ------
    ValueError
        When no candidate is usable on the validation rows.
    """
    if config.label not in test.columns:
        raise ValueError(f"test rows lack the label column {config.label!r}")
    metric = config.gate.metric
    models, unusable = fit_candidates(config, train, valid)
    tables: list[dict[str, dict[str, float]]] = []
    predictions: dict[str, np.ndarray] = {}
    for frame in (valid, test):
        usable = {n: m for n, m in models.items() if n not in unusable}
        scores, failed = _scores(config, usable, frame)
        unusable.update(failed)
        table, flat = _metrics(config, frame, scores)
        unusable.update(flat)
        tables.append(table)
        predictions = scores
    roles = {n: ("model" if n == "lightgbm" else "baseline") for n in models}
    if config.task == "churn":
        for name, parent in REFERENCES.items():
            roles[name] = "reference"
            if parent in unusable and name not in unusable:
                unusable[name] = f"as {parent}: {unusable[parent]}"
    valid_table, test_table = ({n: v for n, v in t.items() if n not in unusable} for t in tables)
    candidates = [n for n, role in roles.items() if role != "reference"]
    selectable = [n for n in candidates if config.selectable is None or n in config.selectable]
    selected = _best(valid_table, selectable, metric)
    if selected is None:
        raise ValueError(
            f"no selectable candidate ({', '.join(selectable)}) has a finite validation "
            f"{metric}; unusable: {unusable}"
        )
    baselines = [n for n in candidates if roles[n] == "baseline" and n != selected]
    baseline = _best(test_table, [n for n in baselines if n in test_table], metric)
    y_test = (
        test[config.label].astype("int8").to_numpy()
        if config.task == "churn"
        else test[config.label].to_numpy(dtype="float64")
    )
    lightgbm = models["lightgbm"]
    assert isinstance(lightgbm, ChurnModel | ValueModel)
    evaluation = Evaluation(
        model=models[selected],
        selected=selected,
        lightgbm=lightgbm,
        y_test=y_test,
        predictions={n: p for n, p in predictions.items() if n not in unusable},
        metrics=test_table,
        valid_table=valid_table,
        roles=roles,
        gate_metric=metric,
        unusable=unusable,
        baseline=baseline,
    )
    if baseline is not None and selected in test_table:
        evaluation.gain = paired_bootstrap(
            y_test,
            predictions[selected],
            predictions[baseline],
            metric="roc_auc" if config.task == "churn" else "gini",
            names=(selected, baseline),
            customers=test["customer_id"].to_numpy(),
            resamples=BOOTSTRAP_RESAMPLES,
            seed=config.seed,
        )
    return evaluation


def btyd_features_dropped(evaluation: Evaluation) -> str | None:
    """Why the LightGBM model's BTYD features were left out this run (None when they were not)."""
    btyd = getattr(evaluation.lightgbm, "btyd_", None)
    return None if btyd is None else btyd.dropped_reason_


def summary_lines(evaluation: Evaluation) -> list[str]:
    """What a person reads after training: the selection, unusable rows, the gain on test."""
    valid = evaluation.valid_metrics[evaluation.gate_metric]
    lines = [
        f"selected {evaluation.selected} on the validation rows "
        f"({evaluation.gate_metric} {valid:.4f})"
    ]
    lines += [f"{name} is unusable: {why}" for name, why in evaluation.unusable.items()]
    dropped = btyd_features_dropped(evaluation)
    if dropped:
        lines.append(f"lightgbm trained without its BTYD features this run: {dropped}")
    if evaluation.gain is not None:
        lines.append(evaluation.gain.describe())
    else:
        lines.append("no usable baseline to compare the selected model with on test")
    return lines


def _prefix(role: str, name: str) -> str:
    return f"candidate_{name}" if role == "model" else f"baseline_{name}"


def log_selection(evaluation: Evaluation, log: Callable[[str], None] | None = None) -> None:
    """Log the selection to the active MLflow run (and print it through ``log``).

    Metrics: every usable row's ``{candidate|baseline}_{name}_{test|valid}_{metric}``, the
    selected model's ``test_*`` and ``valid_*``, and ``gain_{metric}`` with ``_ci_low`` and
    ``_ci_high``. Params ``selected_model`` and ``best_baseline``; tags ``rapport.selected``
    and ``rapport.unusable.{name}`` (the reason); ``selection.txt`` and ``gain.txt``.
    """
    mlflow.log_params(
        {"selected_model": evaluation.selected, "best_baseline": evaluation.baseline or "none"}
    )
    tags = {"rapport.selected": evaluation.selected}
    tags.update({f"rapport.unusable.{n}": why[:4000] for n, why in evaluation.unusable.items()})
    dropped = btyd_features_dropped(evaluation)
    if dropped:
        tags["rapport.btyd_features_dropped"] = dropped[:4000]
    mlflow.set_tags(tags)
    for split, table in (("test", evaluation.metrics), ("valid", evaluation.valid_table)):
        for name, values in table.items():
            prefix = _prefix(evaluation.roles[name], name)
            mlflow.log_metrics({f"{prefix}_{split}_{k}": float(v) for k, v in values.items()})
    selected = evaluation.selected
    for split, table in (("test", evaluation.metrics), ("valid", evaluation.valid_table)):
        values = table.get(selected, {})
        mlflow.log_metrics({f"{split}_{k}": float(v) for k, v in values.items()})
    lines = summary_lines(evaluation)
    mlflow.log_text("\n".join(lines) + "\n", "selection.txt")
    gain = evaluation.gain
    if gain is not None:
        mlflow.log_metrics(
            {
                f"gain_{gain.metric}": gain.difference,
                f"gain_{gain.metric}_ci_low": gain.low,
                f"gain_{gain.metric}_ci_high": gain.high,
            }
        )
        mlflow.log_params({"gain_resamples": gain.resamples, "gain_seed": gain.seed})
        mlflow.log_text(gain.describe() + "\n", "gain.txt")
    if log is not None:
        for line in lines:
            log(line)
