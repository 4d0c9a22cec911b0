"""End to end: train with a real (temporary, SQLite) MLflow store, register, gate, fail."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from rapport.training import evaluate, pipeline, tracking
from rapport.training.config import ModelConfig
from rapport.training.settings import TrainingSettings


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> TrainingSettings:
    home = tmp_path_factory.mktemp("rapport_home")
    return TrainingSettings(home=home, mlflow_tracking_uri=None)


@pytest.fixture(scope="module")
def first_run(
    settings: TrainingSettings,
    small_world: dict[str, Path],
    fast_config: Callable[..., ModelConfig],
) -> pipeline.TrainingResult:
    return pipeline.train(
        fast_config("churn"),
        small_world["transactions"],
        small_world["interactions"],
        settings=settings,
    )


def test_first_run_is_tracked_registered_and_champion(
    first_run: pipeline.TrainingResult, settings: TrainingSettings
) -> None:
    assert first_run.promoted and first_run.version == "1"
    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(first_run.run_id)
    metrics = run.data.metrics
    for name in ("test_roc_auc", "test_brier", "test_ece", "valid_roc_auc"):
        assert 0 <= metrics[name] <= 1
    # Baselines are logged beside the model, on the same test rows.
    for baseline in ("logistic", "bgnbd", "bgnbd_rank", "pnbd_rank"):
        assert f"baseline_{baseline}_test_roc_auc" in metrics
    assert run.data.params["test_cutoff"] == str(first_run.split.test)
    assert run.data.params["horizon_days"] == "90"
    # Lineage: the three data sets, with their row counts.
    contexts = sorted(
        tag.value
        for inp in run.inputs.dataset_inputs
        for tag in inp.tags
        if tag.key == "mlflow.data.context"
    )
    assert contexts == ["test", "train", "valid"]
    artifacts = {a.path for a in client.list_artifacts(first_run.run_id)}
    assert {"config.yaml", "features.json", "metrics.csv", "plots", "gate.txt"} <= artifacts
    plots = {a.path for a in client.list_artifacts(first_run.run_id, "plots")}
    assert {"plots/calibration.png", "plots/gain.png", "plots/feature_importance.png"} <= plots
    mv = client.get_model_version_by_alias("rapport-churn", "champion")
    assert str(mv.version) == "1"
    assert str(client.get_model_version_by_alias("rapport-churn", "challenger").version) == "1"


def test_registered_model_scores_like_the_trained_one(
    first_run: pipeline.TrainingResult,
    settings: TrainingSettings,
    small_world: dict[str, Path],
    fast_config: Callable[..., ModelConfig],
) -> None:
    tracking.configure(settings)
    loaded = mlflow.pyfunc.load_model("models:/rapport-churn@champion")
    config = fast_config("churn")
    frame, split = pipeline.prepare_training_set(
        config, small_world["transactions"], small_world["interactions"], settings=settings
    )
    _, _, test = pipeline.split_frame(frame, split)
    # The client sends feature rows only: preprocessing and feature order travel with the model.
    wire = test[loaded.metadata.get_input_schema().input_names()].head(200).copy()
    for col in wire.select_dtypes("category").columns:  # text on the wire, as JSON sends it
        wire[col] = wire[col].astype("string").astype(object)
    scores = loaded.predict(wire)
    inner = loaded.unwrap_python_model().model
    np.testing.assert_allclose(
        scores["churn_probability"].to_numpy(), inner.predict_proba(test.head(200)), rtol=1e-12
    )
    metadata = loaded.metadata.metadata
    assert metadata["task"] == "churn" and metadata["horizon_days"] == 90


def test_gate_keeps_the_champion_when_the_challenger_is_not_better(
    first_run: pipeline.TrainingResult,
    settings: TrainingSettings,
    small_world: dict[str, Path],
    fast_config: Callable[..., ModelConfig],
) -> None:
    # Same data and seed: equal AUC, so demanding an improvement must fail the gate.
    strict = fast_config("churn", **{"gate.min_improvement": 0.01})
    second = pipeline.train(
        strict, small_world["transactions"], small_world["interactions"], settings=settings
    )
    assert not second.promoted
    assert "does not beat champion v1" in second.gate_reason
    client = MlflowClient(settings.tracking_uri)
    assert str(client.get_model_version_by_alias("rapport-churn", "champion").version) == "1"
    assert (
        str(client.get_model_version_by_alias("rapport-churn", "challenger").version)
        == second.version
    )
    # A threshold it cannot reach fails the gate too.
    high = fast_config("churn", **{"gate.min_value": 0.999})
    third = pipeline.train(
        high, small_world["transactions"], small_world["interactions"], settings=settings
    )
    assert not third.promoted and "misses the threshold" in third.gate_reason
    assert str(client.get_model_version_by_alias("rapport-churn", "champion").version) == "1"


def test_a_failed_run_leaves_the_champion_untouched(
    first_run: pipeline.TrainingResult,
    settings: TrainingSettings,
    small_world: dict[str, Path],
    fast_config: Callable[..., ModelConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = MlflowClient(settings.tracking_uri)
    before = str(client.get_model_version_by_alias("rapport-churn", "champion").version)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full while logging plots")

    monkeypatch.setattr(pipeline, "log_artifacts", broken)
    lenient = fast_config("churn", **{"gate.min_value": 0.0, "gate.min_improvement": -1.0})
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.train(
            lenient, small_world["transactions"], small_world["interactions"], settings=settings
        )
    assert str(client.get_model_version_by_alias("rapport-churn", "champion").version) == before
    failed = client.search_runs(
        [client.get_experiment_by_name("rapport").experiment_id],
        filter_string="attributes.status = 'FAILED'",
    )
    assert len(failed) == 1


def test_models_listing_and_manual_promotion(
    first_run: pipeline.TrainingResult, settings: TrainingSettings
) -> None:
    tracking.configure(settings)
    listing = tracking.list_versions(["rapport-churn"])
    assert listing["version"].iloc[0] == listing["version"].max()
    assert "roc_auc" in listing.columns and listing["roc_auc"].between(0, 1).all()
    champion_row = listing[listing["aliases"].str.contains("champion")]
    assert champion_row["version"].tolist() == [1]
    latest = str(listing["version"].max())
    tracking.promote("rapport-churn", latest, reason="test")
    client = MlflowClient(settings.tracking_uri)
    assert str(client.get_model_version_by_alias("rapport-churn", "champion").version) == latest
    assert client.get_model_version("rapport-churn", latest).tags["promoted_by"] == "test"
    tracking.promote("rapport-churn", "1", reason="test")


def test_value_model_trains_and_logs_its_baseline(
    settings: TrainingSettings,
    small_world: dict[str, Path],
    fast_config: Callable[..., ModelConfig],
) -> None:
    result = pipeline.train(
        fast_config("clv", max_train_rows=500),
        small_world["transactions"],
        small_world["interactions"],
        settings=settings,
    )
    table = result.metrics
    assert list(table.index) == ["lightgbm", "bgnbd_gg", "two_part"]
    assert {"gini", "decile_mape", "total_ratio", "spearman"} <= set(table.columns)
    client = MlflowClient(settings.tracking_uri)
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert "plots/deciles.png" in plots
    run = client.get_run(result.run_id)
    # The row cap samples the training cutoffs down, and says how many there were.
    assert run.data.metrics["rows_train"] == 500
    assert int(run.data.params["train_rows_available"]) > 500
    loaded = mlflow.pyfunc.load_model(f"models:/rapport-clv/{result.version}")
    assert loaded.metadata.metadata["horizon_days"] == 180


def test_evaluate_registered_scores_a_named_version(
    first_run: pipeline.TrainingResult,
    settings: TrainingSettings,
    small_world: dict[str, Path],
    fast_config: Callable[..., ModelConfig],
) -> None:
    config = fast_config("churn")
    table = evaluate.evaluate_registered(
        config,
        "models:/rapport-churn/1",
        small_world["transactions"],
        small_world["interactions"],
        as_of=str(first_run.split.test),
        settings=settings,
    )
    assert list(table.index) == ["registered", "bgnbd"]
    expected = first_run.metrics.loc[first_run.selected, "roc_auc"]
    assert table.loc["registered", "roc_auc"] == pytest.approx(expected, abs=1e-12)
    assert isinstance(table, pd.DataFrame)


def test_frame_digest_tracks_content_past_mlflows_first_10000_rows() -> None:
    frame = pd.DataFrame({"customer_id": np.arange(20_000), "spend": np.linspace(0, 1, 20_000)})
    digest = pipeline.frame_digest(frame)
    assert digest == pipeline.frame_digest(frame.copy())
    changed = frame.copy()
    changed.loc[15_000, "spend"] += 1.0  # beyond the rows MLflow's own digest looks at
    assert pipeline.frame_digest(changed) != digest
    assert pipeline.frame_digest(frame.rename(columns={"spend": "spend_90d"})) != digest


def test_gate_compares_a_champion_with_other_features_on_its_own_features(
    tmp_path: Path,
    small_world: dict[str, Path],
    fast_config: Callable[..., ModelConfig],
) -> None:
    """A config that changes the windows still meets the champion on the same test cutoff;
    a run without the interactions the champion reads keeps the champion."""
    settings = TrainingSettings(home=tmp_path, mlflow_tracking_uri=None)
    tx, ix = small_world["transactions"], small_world["interactions"]
    first = pipeline.train(fast_config("churn"), tx, ix, settings=settings)
    assert first.promoted
    lenient = {"gate.min_improvement": -1.0}
    # (30, 60): no 90- or 365-day columns for the champion in this run's rows
    second = pipeline.train(
        fast_config("churn", windows=[30, 60], **lenient), tx, ix, settings=settings
    )
    assert "scored on its own features of the test cutoff" in second.gate_reason
    assert "vs champion v1" in second.gate_reason and second.promoted
    client = MlflowClient(settings.tracking_uri)
    assert str(client.get_model_version_by_alias("rapport-churn", "champion").version) == "2"
    # no interactions: the champion (which reads them) cannot be scored, so it stays
    third = pipeline.train(fast_config("churn", **lenient), tx, None, settings=settings)
    assert not third.promoted
    assert "could not be compared" in third.gate_reason
    assert "reads interaction features and none were given" in third.gate_reason
    assert str(client.get_model_version_by_alias("rapport-churn", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("rapport-churn", "challenger").version) == "3"

    # evaluating version 2 under the default config (other windows) builds its own features
    # and reproduces its test metric; without the interactions it reads, a clear error
    def evaluated(interactions: Path | None) -> pd.DataFrame:
        return evaluate.evaluate_registered(
            fast_config("churn"),
            "models:/rapport-churn/2",
            tx,
            interactions,
            as_of=str(second.split.test),
            settings=settings,
        )

    table = evaluated(ix)
    expected = second.metrics.loc[second.selected, "roc_auc"]
    assert table.loc["registered", "roc_auc"] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="reads interaction features and none were given"):
        evaluated(None)


def test_champion_rows_rebuild_the_test_cutoff_faithfully(
    churn_frames: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
    small_world: dict[str, Path],
    fast_config: Callable[..., ModelConfig],
) -> None:
    from rapport.features.build import discover_interaction_pairs
    from rapport.features.contracts import load_interactions
    from rapport.training.models import ChurnModel
    from rapport.training.pyfunc import RapportModel

    train, valid, test = churn_frames
    config = fast_config("churn")
    model = ChurnModel(config).fit(train, valid)
    ix = load_interactions(small_world["interactions"])
    model.interaction_pairs_ = discover_interaction_pairs(ix)  # what training pinned
    rows = pipeline._champion_rows(
        RapportModel(model), config, small_world["transactions"], small_world["interactions"], test
    )
    assert len(rows) == len(test) and config.label in rows.columns
    shared = [c for c in rows.columns if c in test.columns]
    assert len(shared) == len(rows.columns) > 60
    expected = test[shared].sort_values("customer_id").reset_index(drop=True)
    got = rows[shared].sort_values("customer_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_categorical=False)


def test_what_loading_kept_and_dropped_and_the_currency_reach_mlflow(
    tmp_path: Path, small_world: dict[str, Path], fast_config: Callable[..., ModelConfig]
) -> None:
    from rapport.features.contracts import load_transactions

    raw = pd.read_parquet(small_world["transactions"])
    guests = raw.head(3).assign(customer_id=None)
    tx = load_transactions(
        pd.concat([raw, guests, raw.head(2)], ignore_index=True),
        missing_ids="drop",
        currency="GBP",
    )
    settings = TrainingSettings(home=tmp_path, mlflow_tracking_uri=None)
    result = pipeline.train(fast_config("churn"), tx, settings=settings)
    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(result.run_id)
    metrics = run.data.metrics
    assert metrics["tx_rows_read"] == len(raw) + 5
    assert metrics["tx_dropped_missing_ids"] == 3 and metrics["tx_dropped_duplicates"] == 2
    assert metrics["tx_amount_kept"] == pytest.approx(raw["amount"].sum())
    assert run.data.params["currency"] == "GBP"
    text = mlflow.artifacts.load_text(f"runs:/{result.run_id}/load.txt")
    assert "3 dropped: no customer id" in text and "GBP" in text
    info = mlflow.models.get_model_info(f"models:/rapport-churn/{result.version}")
    assert info.metadata["currency"] == "GBP"
    # serving reads it back with the model, and refuses data in another currency
    from rapport.serving.batch import _currency
    from rapport.serving.scoring import load_registered

    loaded = load_registered("rapport-churn", "challenger", tracking_uri=settings.tracking_uri)
    assert loaded.currency == "GBP"
    assert _currency(None, loaded.currency) == "GBP"
    with pytest.raises(ValueError, match="the data are in EUR but the models learnt from GBP"):
        _currency("EUR", loaded.currency)
