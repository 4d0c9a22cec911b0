"""Serving settings, read from the environment when the service or a command starts."""

from __future__ import annotations

import ipaddress
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
    it kills it, default 20). Request bounds: ``MAX_BODY_BYTES``, ``MAX_ID_LENGTH``,
    ``MAX_REQUEST_EVENTS``, ``HISTORY_TIMEOUT_SECONDS`` and ``HISTORY_CONCURRENCY``. API keys:
    ``REQUIRE_API_KEY`` (unset: required unless ``HOST`` is loopback), ``API_KEYS_FILE``,
    ``METRICS_NEED_KEY`` and ``HEALTH_NEEDS_KEY`` (docs/security.md).
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
    max_body_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, description="Largest request body accepted (bytes)."
    )
    max_id_length: int = Field(
        default=200, ge=1, description="Longest customer id or order id (characters)."
    )
    max_request_events: int = Field(
        default=100_000, ge=1, description="Most events in one history request, all customers."
    )
    history_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Time budget of one history request; past it the work stops (503).",
    )
    history_concurrency: int = Field(
        default=2, ge=1, description="History requests computed at once (others wait)."
    )
    require_api_key: bool | None = Field(
        default=None,
        description="Require an API key on every route but health; unset: required unless "
        "the service binds a loopback address.",
    )
    api_keys_file: Path | None = Field(
        default=None, description="Hashed API keys (JSON); default $RAPPORT_HOME/api_keys.json."
    )
    metrics_need_key: bool = Field(
        default=True, description="/metrics needs a key too (when keys are required)."
    )
    health_needs_key: bool = Field(
        default=False, description="/livez, /healthz and /readyz need a key too (when required)."
    )

    @property
    def snapshot_path(self) -> Path:
        """The feature snapshot served by customer id."""
        return self.snapshot if self.snapshot is not None else self.home / "snapshot.parquet"

    @property
    def keys_path(self) -> Path:
        """The API keys file (hashes only)."""
        return self.api_keys_file if self.api_keys_file is not None else self.home / "api_keys.json"

    @property
    def keys_required(self) -> bool:
        """Whether requests need an API key: as set, else unless bound to loopback only."""
        if self.require_api_key is not None:
            return self.require_api_key
        return not is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
