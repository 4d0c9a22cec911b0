"""Optuna search: seeded, scored on the validation cutoff, one nested MLflow run a trial."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from rapport.training import pipeline, tuning
from rapport.training.config import ModelConfig
from rapport.training.settings import TrainingSettings

Frames = tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]


def test_search_is_seeded_and_reports_its_best_trial(
    churn_frames: Frames, fast_config: Callable[..., ModelConfig]
) -> None:
    train, valid, _ = churn_frames
    config = fast_config("churn", **{"tuning.trials": 3})
    first = tuning.tune(config, train, valid)
    again = tuning.tune(config, train, valid)
    assert first.best_params == again.best_params
    assert first.metric == "roc_auc"
    assert len(first.trials) == 3 and (first.trials["state"] == "COMPLETE").all()
    assert first.best_value == pytest.approx(first.trials["value"].max())
    assert set(first.best_params) == {
        "learning_rate",
        "num_leaves",
        "min_data_in_leaf",
        "feature_fraction",
        "lambda_l2",
    }
    # the best trial's score is what its parameters give when fitted again
    tuned = tuning.with_params(config, first.best_params)
    assert tuning.validation_score(tuned, train, valid) == pytest.approx(first.best_value)


def test_a_search_where_no_trial_finishes_fails(
    churn_frames: Frames, fast_config: Callable[..., ModelConfig]
) -> None:
    train, valid, _ = churn_frames

    def broken(config: ModelConfig, train: pd.DataFrame, valid: pd.DataFrame) -> float:
        raise ValueError("no good")

    config = fast_config("churn", **{"tuning.trials": 2})
    with pytest.raises(ValueError, match="no tuning trial finished"):
        tuning.tune(config, train, valid, score=broken)


def test_tuning_metric_must_belong_to_the_task(fast_config: Callable[..., ModelConfig]) -> None:
    with pytest.raises(ValueError, match="not a churn metric"):
        fast_config("churn", **{"tuning.trials": 2, "tuning.metric": "gini"})
    with pytest.raises(ValueError, match="unknown tuning metric"):
        fast_config("clv", **{"tuning.trials": 2, "tuning.metric": "accuracy"})
    # without trials the metric is never used
    assert fast_config("churn", **{"tuning.metric": "gini"}).tuning.trials == 0


def test_training_with_a_search_logs_trials_as_nested_runs(
    tmp_path: Path, small_world: dict[str, Path], fast_config: Callable[..., ModelConfig]
) -> None:
    settings = TrainingSettings(home=tmp_path, mlflow_tracking_uri=None)
    config = fast_config("churn", **{"tuning.trials": 2})
    result = pipeline.train(
        config, small_world["transactions"], small_world["interactions"], settings=settings
    )
    client = MlflowClient(settings.tracking_uri)
    parent = client.get_run(result.run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert len(children) == 2
    scores = [c.data.metrics["valid_roc_auc"] for c in children]
    best = children[scores.index(max(scores))]
    assert parent.data.metrics["tuning_best_valid_roc_auc"] == pytest.approx(max(scores))
    for name, value in best.data.params.items():
        assert parent.data.params[f"tuned.lightgbm.params.{name}"] == value
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config_tuned.yaml", "tuning"} <= artifacts
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert "plots/tuning.png" in plots
    # the registered model is the one fitted with the best trial's parameters
    assert result.promoted and result.version == "1"
