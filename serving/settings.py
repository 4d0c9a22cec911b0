"""Serving settings, read from the environment when the service or a command starts."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rapport.training.settings import TrainingSettings


class ServingSettings(TrainingSettings):
    """Training's settings (``RAPPORT_HOME``, ``MLFLOW_TRACKING_URI``) plus the service's.

    Environment variables (prefix ``RAPPORT_``): ``CHURN_MODEL`` and ``CLV_MODEL`` (registered
    model names), ``MODEL_ALIAS`` (default ``champion``), ``CHURN_BENTO_MODEL`` and
    ``CLV_BENTO_MODEL`` (BentoML model-store tags; set by a built Bento, they win over the
    registry), ``SNAPSHOT`` (the feature snapshot served by id), ``SNAPSHOT_MAX_AGE_DAYS``
    (days from the snapshot's as-of date to today past which the service warns that it is
    stale, default 7), ``MAX_BATCH`` (customers per request), ``MAX_EVENTS`` (events per
    posted history), ``CURRENCY`` (label of the predicted value), ``HOST``, ``PORT`` and
    ``STOP_GRACE_SECONDS`` (how long ``rapport serve`` lets the server stop on a signal before
    it kills it, default 20).
    """

    model_config = SettingsConfigDict(env_prefix="RAPPORT_", frozen=True)

    churn_model: str = Field(default="rapport-churn", description="Registered churn model name.")
    clv_model: str = Field(default="rapport-clv", description="Registered value model name.")
    model_alias: str = Field(default="champion", description="Registry alias to serve.")
    churn_bento_model: str | None = Field(default=None, description="BentoML model tag (churn).")
    clv_bento_model: str | None = Field(default=None, description="BentoML model tag (value).")
    snapshot: Path | None = Field(
        default=None,
        description="Feature snapshot (Parquet); default $RAPPORT_HOME/snapshot.parquet.",
    )
    snapshot_max_age_days: int = Field(
        default=7,
        ge=0,
        description="Days from the snapshot's as-of date to today past which it is stale.",
    )
    max_batch: int = Field(default=1000, ge=1, description="Most customers in one request.")
    max_events: int = Field(default=10_000, ge=1, description="Most events in one posted history.")
    currency: str | None = Field(
        default=None,
        description="Currency of predicted values when the served models do not state the "
        "currency of the data they learnt from (training records it).",
    )
    host: str = Field(default="127.0.0.1", description="Address the service binds to.")
    port: int = Field(default=3000, ge=1, le=65535, description="Port the service listens on.")
    stop_grace_seconds: float = Field(
        default=20.0,
        gt=0,
        description="Seconds the server has to stop on SIGINT/SIGTERM before it is killed.",
    )

    @property
    def snapshot_path(self) -> Path:
        """The feature snapshot served by customer id."""
        return self.snapshot if self.snapshot is not None else self.home / "snapshot.parquet"
