"""Where training keeps its MLflow state, read from the environment when a command starts."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from rapport.features.settings import RapportSettings


class TrainingSettings(RapportSettings):
    """Rapport's settings plus MLflow's.

    ``MLFLOW_TRACKING_URI`` points everything at a tracking server (e.g.
    ``http://mlflow:5000`` backed by PostgreSQL); without it Rapport uses an embedded SQLite
    store, ``$RAPPORT_HOME/mlflow.db``, with artifacts in ``$RAPPORT_HOME/mlartifacts``.
    """

    model_config = SettingsConfigDict(env_prefix="RAPPORT_", frozen=True)

    mlflow_tracking_uri: str | None = Field(default=None, validation_alias="MLFLOW_TRACKING_URI")

    @property
    def tracking_uri(self) -> str:
        """The tracking URI in use."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> str | None:
        """Artifact location for new experiments (only for the embedded store)."""
        if self.mlflow_tracking_uri:
            return None
        return (self.home / "mlartifacts").resolve().as_uri()
