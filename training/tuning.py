"""Hyper-parameter search for the LightGBM models, one nested MLflow run per trial.

A model config with ``tuning.trials > 0`` searches LightGBM's main parameters with Optuna's
seeded TPE sampler before the final fit. Each trial fits the task's own model (with its
calibration, class weights, monotone constraints and BTYD features) on the training rows,
early-stopped on the validation cutoff, and is scored on that validation cutoff; the test
cutoff is never looked at, so the final test metrics stay honest. Inside an active MLflow run
each trial is logged as a nested run (its parameters, its validation metric, the trees it kept).

Search space (log scales where the effect is multiplicative):

``learning_rate``
    0.02 to 0.2
``num_leaves``
    7 to 127
``min_data_in_leaf``
    20 to 1000
``feature_fraction``
    0.5 to 1.0
``lambda_l2``
    0.001 to 10
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import optuna
import pandas as pd

from rapport.training.config import GATE_METRICS, ModelConfig
from rapport.training.metrics import churn_metrics, value_metrics
from rapport.training.models import ChurnModel, ValueModel


def suggest(trial: optuna.Trial) -> dict[str, Any]:
    """One point of the search space (see the module docstring)."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.2, log=True),
        "num_leaves": trial.suggest_int("num_leaves", 7, 127, log=True),
        "min_data_in_leaf": trial.suggest_int("min_data_in_leaf", 20, 1000, log=True),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
        "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
    }


def with_params(config: ModelConfig, params: dict[str, Any]) -> ModelConfig:
    """``config`` with ``params`` merged into its LightGBM parameters."""
    merged = {**config.lightgbm.params, **params}
    return config.model_copy(
        update={"lightgbm": config.lightgbm.model_copy(update={"params": merged})}
    )


def tuning_metric(config: ModelConfig) -> str:
    """The validation metric the search optimises: ``tuning.metric``, else the gate's."""
    return config.tuning.metric or config.gate.metric


def validation_score(config: ModelConfig, train: pd.DataFrame, valid: pd.DataFrame) -> float:
    """Fit the task's model on ``train`` and score it on ``valid`` (the tuning metric)."""
    metric = tuning_metric(config)
    if config.task == "churn":
        churn = ChurnModel(config).fit(train, valid)
        y = valid[config.label].astype("int8").to_numpy()
        return float(churn_metrics(y, churn.predict_proba(valid))[metric])
    value = ValueModel(config).fit(train, valid)
    y_value = valid[config.label].to_numpy(dtype="float64")
    return float(value_metrics(y_value, value.predict(valid))[metric])


@dataclass(frozen=True)
class TuningResult:
    """What a search found.

    Attributes
    ----------
    best_params
        The LightGBM parameters of the best trial.
    best_value
        Its validation metric.
    metric
        The metric's name (higher is better unless ``GATE_METRICS`` says otherwise).
    trials
        One row per trial: ``number``, ``value``, ``state`` and the parameters.
    """

    best_params: dict[str, Any]
    best_value: float
    metric: str
    trials: pd.DataFrame


def tune(
    config: ModelConfig,
    train: pd.DataFrame,
    valid: pd.DataFrame,
    *,
    score: Callable[[ModelConfig, pd.DataFrame, pd.DataFrame], float] = validation_score,
) -> TuningResult:
    """Search LightGBM parameters for ``config`` on the validation cutoff.

    Parameters
    ----------
    config
        The model config; ``config.tuning`` gives the number of trials, an optional time
        budget and the metric. The search is seeded with ``config.seed``.
    train, valid
        Labelled feature rows (``config.label``): the models fit on ``train``, early-stop on
        and are scored on ``valid``.
    score
        How a trial is scored (the default fits the task's model; tests may pass another).

    Returns
    -------
    TuningResult

    Raises
    ------
    ValueError
        ``tuning.trials`` is 0, or no trial finished (each failure is logged as a failed
        trial and nested run).
    """
    if config.tuning.trials <= 0:
        raise ValueError("tuning.trials is 0: nothing to search")
    metric = tuning_metric(config)
    direction = (
        optuna.study.StudyDirection.MAXIMIZE
        if GATE_METRICS[metric]
        else optuna.study.StudyDirection.MINIMIZE
    )
    parent = mlflow.active_run()

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial)
        if parent is None:
            return score(with_params(config, params), train, valid)
        # the parent's experiment, named: a nested run otherwise lands in the default one
        with mlflow.start_run(
            run_name=f"trial-{trial.number}",
            nested=True,
            experiment_id=parent.info.experiment_id,
        ):
            mlflow.set_tag("rapport.tuning_trial", str(trial.number))
            mlflow.log_params(params)
            value = score(with_params(config, params), train, valid)
            if not math.isfinite(value):
                raise ValueError(f"trial {trial.number}: {metric} is {value}")
            mlflow.log_metric(f"valid_{metric}", value)
            return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=config.seed)
    study = optuna.create_study(direction=direction, sampler=sampler)
    study.optimize(
        objective,
        n_trials=config.tuning.trials,
        timeout=config.tuning.timeout_seconds,
        catch=(ValueError, ArithmeticError, np.linalg.LinAlgError),
    )
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ValueError(f"no tuning trial finished ({len(study.trials)} failed)")
    frame = pd.DataFrame(
        [
            {"number": t.number, "value": t.value, "state": t.state.name, **t.params}
            for t in study.trials
        ]
    )
    return TuningResult(
        best_params=dict(study.best_trial.params),
        best_value=float(study.best_value),
        metric=metric,
        trials=frame,
    )
