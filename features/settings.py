"""Environment settings, read when a command starts (never at import time)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class RapportSettings(BaseSettings):
    """Where Rapport keeps its embedded state.

    Environment variables: ``RAPPORT_HOME`` (default ``./.rapport``), ``RAPPORT_DUCKDB_THREADS``
    and ``RAPPORT_DUCKDB_MEMORY_LIMIT`` (e.g. ``4GB``).
    """

    model_config = SettingsConfigDict(env_prefix="RAPPORT_", frozen=True)

    home: Path = Path(".rapport")
    duckdb_threads: int | None = None
    duckdb_memory_limit: str | None = None

    @property
    def demo_dir(self) -> Path:
        """Folder for the generated demo data and outputs."""
        return self.home / "demo"
