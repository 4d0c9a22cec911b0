"""Honest selection: chosen on validation, baselines in the gate, gains with intervals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from rapport.training import pipeline, selection, tracking
from rapport.training.bootstrap import paired_bootstrap
from rapport.training.btyd import BetaGeoModel
from rapport.training.config import GateConfig, ModelConfig
from rapport.training.metrics import churn_metrics, value_metrics
from rapport.training.settings import TrainingSettings

Frames = tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]
#: A LightGBM of one two-leaf tree without BTYD features: a step function any baseline beats.
STUMP = {
    "lightgbm.num_boost_round": 1,
    "lightgbm.params.num_leaves": 2,
    "btyd_features": False,
}


def test_a_baseline_that_beats_lightgbm_on_validation_is_selected(
    churn_frames: Frames, fast_config: Callable[..., ModelConfig]
) -> None:
    train, valid, test = churn_frames
    evaluation = selection.evaluate_candidates(fast_config("churn", **STUMP), train, valid, test)
    valid_auc = {n: m["roc_auc"] for n, m in evaluation.valid_table.items()}
    assert evaluation.selected != "lightgbm"
    candidates = ("lightgbm", "logistic", "bgnbd", "pnbd")
    assert evaluation.selected == max(candidates, key=lambda n: valid_auc.get(n, -1.0))
    assert valid_auc[evaluation.selected] > valid_auc["lightgbm"]
    # the selected model is the object that is registered: its own method gives the scores
    np.testing.assert_allclose(
        evaluation.predictions[evaluation.selected], evaluation.model.predict_proba(test)
    )
    table = evaluation.table()
    assert table.loc[evaluation.selected, "status"] == "selected"
    assert table.loc["bgnbd_rank", "role"] == "reference"


def test_a_selected_baseline_is_registered_and_scores_through_the_pyfunc(
    tmp_path: Path, small_world: dict[str, Path], fast_config: Callable[..., ModelConfig]
) -> None:
    settings = TrainingSettings(home=tmp_path, mlflow_tracking_uri=None)
    config = fast_config("churn", **STUMP)
    result = pipeline.train(
        config, small_world["transactions"], small_world["interactions"], settings=settings
    )
    assert result.selected != "lightgbm"
    loaded = mlflow.pyfunc.load_model(f"models:/rapport-churn/{result.version}")
    inner = loaded.unwrap_python_model()
    assert inner.family == result.selected == loaded.metadata.metadata["family"]
    frame, split = pipeline.prepare_training_set(
        config, small_world["transactions"], small_world["interactions"], settings=settings
    )
    test = pipeline.split_frame(frame, split)[2].head(100)
    wire = test[loaded.metadata.get_input_schema().input_names()]
    scores = loaded.predict(wire)
    np.testing.assert_allclose(
        scores["churn_probability"].to_numpy(), inner.model.predict_proba(test), rtol=1e-12
    )
    run = MlflowClient(settings.tracking_uri).get_run(result.run_id)
    assert run.data.params["selected_model"] == result.selected
    assert run.data.tags["rapport.selected"] == result.selected


def test_the_gate_refuses_a_version_the_best_baseline_beats_on_test(
    tmp_path: Path,
    small_world: dict[str, Path],
    fast_config: Callable[..., ModelConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only LightGBM may be registered here, and the stump loses to the baselines: no
    champion, even without one to beat; its gain over the best baseline is logged with its
    interval; a run that fails after registering moves no alias."""
    settings = TrainingSettings(home=tmp_path, mlflow_tracking_uri=None)
    config = fast_config("churn", selectable=["lightgbm"], **STUMP)
    tx, ix = small_world["transactions"], small_world["interactions"]
    result = pipeline.train(config, tx, ix, settings=settings)
    best = result.metrics.loc[result.metrics["role"] == "baseline", "roc_auc"].idxmax()
    assert result.selected == "lightgbm" and not result.promoted
    assert f"does not beat baseline {best}" in result.gate_reason
    client = MlflowClient(settings.tracking_uri)
    assert tracking.version_by_alias("rapport-churn", tracking.CHAMPION) is None
    assert str(client.get_model_version_by_alias("rapport-churn", "challenger").version) == "1"
    # the gain over the best baseline: logged with its paired bootstrap interval
    run = client.get_run(result.run_id)
    gain, low, high = (
        run.data.metrics[f"gain_roc_auc{suffix}"] for suffix in ("", "_ci_low", "_ci_high")
    )
    expected = result.metrics.loc["lightgbm", "roc_auc"] - result.metrics.loc[best, "roc_auc"]
    assert gain == pytest.approx(expected, abs=1e-12)
    assert low <= gain <= high and high < 0  # a stump is really worse
    text = mlflow.artifacts.load_text(f"runs:/{result.run_id}/gain.txt")
    assert f"lightgbm adds {gain:+.4f} roc_auc over {best}" in text
    assert run.data.params["best_baseline"] == best
    assert any(f"over {best}" in note for note in result.notes)

    def unreachable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("registry unreachable")

    monkeypatch.setattr(tracking, "champion_value_on", unreachable)
    with pytest.raises(RuntimeError, match="registry unreachable"):
        pipeline.train(config, tx, ix, settings=settings)
    assert str(client.get_model_version_by_alias("rapport-churn", "challenger").version) == "1"


def test_the_gate_names_the_baseline_and_the_champion() -> None:
    gate = GateConfig(metric="roc_auc", min_value=0.6, min_improvement=0.0)
    refused = tracking.decide(gate, 0.74, None, None, baseline=("logistic", 0.75))
    assert not refused.promote
    assert refused.reason == "roc_auc 0.7400 does not beat baseline logistic 0.7500 by 0.0"
    both = tracking.decide(gate, 0.74, 0.76, "3", baseline=("logistic", 0.75))
    assert "champion v3 0.7600" in both.reason and "baseline logistic" in both.reason
    passed = tracking.decide(gate, 0.77, 0.76, "3", baseline=("logistic", 0.75))
    assert passed.promote
    assert passed.reason == "roc_auc 0.7700 vs champion v3 0.7600 and baseline logistic 0.7500"


def test_a_degenerate_baseline_is_unusable_not_scored(
    churn_frames: Frames,
    fast_config: Callable[..., ModelConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fit = BetaGeoModel.fit

    def degenerate(self: BetaGeoModel, *args: object, **kwargs: object) -> BetaGeoModel:
        fitted = fit(self, *args, **kwargs)  # type: ignore[arg-type]
        fitted.degenerate_ = "a and b at the optimiser's bounds"  # type: ignore[attr-defined]
        return fitted

    monkeypatch.setattr(BetaGeoModel, "fit", degenerate)
    train, valid, test = churn_frames
    evaluation = selection.evaluate_candidates(fast_config("churn"), train, valid, test)
    reason = evaluation.unusable["bgnbd"]
    assert "a and b at the optimiser's bounds" in reason
    assert "bgnbd" in evaluation.unusable["bgnbd_rank"]
    table = evaluation.table()
    for name in ("bgnbd", "bgnbd_rank"):
        assert np.isnan(table.loc[name, "roc_auc"]), "never scored as 0.5"
        assert table.loc[name, "status"].startswith("unusable: ")
        assert name not in evaluation.predictions
    assert evaluation.selected != "bgnbd" and evaluation.baseline != "bgnbd"
    assert any("bgnbd is unusable" in line for line in selection.summary_lines(evaluation))
    tracking.configure(TrainingSettings(home=tmp_path, mlflow_tracking_uri=None))
    with mlflow.start_run() as run:
        selection.log_selection(evaluation)
    logged = MlflowClient().get_run(run.info.run_id).data
    assert logged.tags["rapport.unusable.bgnbd"] == reason
    assert not any(k.startswith("baseline_bgnbd_") for k in logged.metrics)
    # the LightGBM model's BTYD features come from the same fit: left out, and said so
    assert "a and b at the optimiser's bounds" in logged.tags["rapport.btyd_features_dropped"]
    assert not any(c.startswith("p_alive") for c in evaluation.lightgbm.feature_names_)
    assert any(
        line.startswith("lightgbm trained without its BTYD features")
        for line in selection.summary_lines(evaluation)
    )


def test_a_constant_score_is_unusable(
    churn_frames: Frames, fast_config: Callable[..., ModelConfig]
) -> None:
    # a BG/NBD fit that ranks nobody above anybody: the 0.5000 that used to be reported
    _, valid, _ = churn_frames
    scores = {"bgnbd": np.full(len(valid), 0.25), "logistic": np.linspace(0, 1, len(valid))}
    metrics, unusable = selection._metrics(fast_config("churn"), valid, scores)
    assert list(metrics) == ["logistic"] and "same value (0.25)" in unusable["bgnbd"]


def test_paired_bootstrap_matches_the_metrics_and_brackets_the_difference() -> None:
    rng = np.random.default_rng(3)
    n = 600
    y = (rng.random(n) < 0.3).astype(float)
    good, weak = np.round(y + rng.normal(0, 1.2, n), 1), np.round(y + rng.normal(0, 2.0, n), 1)
    gain = paired_bootstrap(y, good, weak, metric="roc_auc", resamples=300, seed=1)

    def auc(score: np.ndarray) -> float:
        return churn_metrics(y, (score - score.min()) / np.ptp(score))["roc_auc"]

    assert gain.model_value == pytest.approx(auc(good), abs=1e-12)
    assert gain.difference == pytest.approx(auc(good) - auc(weak), abs=1e-12)
    assert gain.low <= gain.difference <= gain.high
    assert gain == paired_bootstrap(y, good, weak, metric="roc_auc", resamples=300, seed=1)
    value = np.where(rng.random(n) < 0.5, 0.0, rng.gamma(2.0, 50.0, n))
    pred = np.round(value * 0.5 + rng.gamma(2.0, 30.0, n))
    noise = rng.gamma(2.0, 30.0, n)
    gini = paired_bootstrap(value, pred, noise, metric="gini", resamples=300, seed=1)
    assert gini.model_value == pytest.approx(value_metrics(value, pred)["gini"], abs=1e-12)
    assert gini.baseline_value == pytest.approx(value_metrics(value, noise)["gini"], abs=1e-12)
    assert gini.low <= gini.difference <= gini.high and gini.low > 0
    # a customer with two rows is drawn with both: the interval still brackets the point
    customers = np.arange(n) // 2
    paired = paired_bootstrap(y, good, weak, metric="roc_auc", customers=customers, resamples=200)
    assert paired.low <= paired.difference <= paired.high
