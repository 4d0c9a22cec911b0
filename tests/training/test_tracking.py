"""MLflow plumbing that needs no trained model."""

from __future__ import annotations

import os

import mlflow

from rapport.training.settings import TrainingSettings
from rapport.training.tracking import configure


def test_pointing_mlflow_leaves_the_environment_alone(tmp_path, monkeypatch):
    # MLflow 3 copies the URI into MLFLOW_TRACKING_URI, which the settings read as the
    # user's server: a second store in the same process must not resolve to the first
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    first = TrainingSettings(home=tmp_path / "a")
    configure(first)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert "MLFLOW_REGISTRY_URI" not in os.environ
    second = TrainingSettings(home=tmp_path / "b")
    assert second.tracking_uri != first.tracking_uri
    assert configure(second) == second.tracking_uri == mlflow.get_tracking_uri()
    # a server the user named stays named
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    configure(TrainingSettings(home=tmp_path / "c"))
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
