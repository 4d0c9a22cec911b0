from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from rapport.features.build import build_features
from rapport.features.synthetic import SyntheticConfig, write_synthetic
from rapport.serving.core import ServiceState
from rapport.serving.settings import ServingSettings
from rapport.training.config import QUICK_OVERRIDES, load_config
from rapport.training.pipeline import train
from rapport.training.settings import TrainingSettings


@dataclass(frozen=True)
class Served:
    """A Rapport home with both models registered as champions and a feature snapshot."""

    home: Path
    transactions: Path
    interactions: Path
    as_of: dt.date
    snapshot: pd.DataFrame

    def settings(self, **overrides: object) -> ServingSettings:
        return ServingSettings(home=self.home, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    home = tmp_path_factory.mktemp("served")
    world = write_synthetic(
        SyntheticConfig(n_customers=1_500, seed=11, start="2022-01-01", end="2024-12-31"),
        home / "demo",
    )
    settings = TrainingSettings(home=home)
    for task in ("churn", "clv"):
        overrides = dict(QUICK_OVERRIDES)
        if task == "clv":
            overrides.update({"horizon_days": 180, "cutoffs.every_months": 2})
        config = load_config(task, overrides)  # type: ignore[arg-type]
        result = train(config, world.transactions_path, world.interactions_path, settings=settings)
        assert result.promoted, result.gate_reason
    as_of = dt.date(2024, 12, 31)
    snapshot = build_features(world.transactions_path, world.interactions_path, as_of=[as_of])
    snapshot.to_parquet(home / "snapshot.parquet", index=False)
    return Served(home, world.transactions_path, world.interactions_path, as_of, snapshot)


@pytest.fixture(scope="session")
def state(served: Served) -> ServiceState:
    loaded = ServiceState(served.settings()).load()
    assert loaded.ready, loaded.error
    return loaded


@pytest.fixture(scope="session")
def json_row():
    return _json_row


def _json_row(frame: pd.DataFrame, i: int) -> dict[str, object]:
    """One feature row as a client would send it (NaN as null, dates as ISO text)."""
    row = frame.iloc[i]
    out: dict[str, object] = {}
    for key, value in row.items():
        if key == "as_of":
            out[key] = pd.Timestamp(value).date().isoformat()
        elif key == "customer_id":
            out[key] = str(value)
        elif pd.isna(value):
            out[key] = None
        elif isinstance(value, str):
            out[key] = value
        else:
            out[key] = float(value)
    return out


@pytest.fixture(scope="session")
def fuzz():
    return _fuzz


def _fuzz(schema, examples: int) -> None:
    """Schemathesis over every operation of ``schema``: no 5xx, answers as documented."""
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            response = case.call()
            assert response.status_code < 500, (case.path, case.body, response.text)
            # Feature fields depend on the served models, so a schema-valid row may lack
            # one: that 422 is the intended answer (every other check runs).
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        check()
