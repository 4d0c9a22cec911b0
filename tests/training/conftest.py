from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from rapport.features.synthetic import SyntheticConfig, write_synthetic
from rapport.training.config import QUICK_OVERRIDES, ModelConfig, load_config
from rapport.training.pipeline import prepare_training_set, split_frame

#: Few, small trees: the tests check behaviour and plumbing, not accuracy.
FAST = QUICK_OVERRIDES


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2,500-customer synthetic world on disk (transactions + interactions)."""
    out = tmp_path_factory.mktemp("world")
    config = SyntheticConfig(n_customers=2_500, seed=7, start="2022-01-01", end="2024-12-31")
    summary = write_synthetic(config, out)
    return {"transactions": summary.transactions_path, "interactions": summary.interactions_path}


def _fast_config(task: str, **overrides: object) -> ModelConfig:
    values: dict[str, object] = dict(FAST)
    if task == "clv":
        values["horizon_days"] = 180
        values["cutoffs.every_months"] = 2
    values.update(overrides)
    return load_config(task, values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def fast_config() -> Callable[..., ModelConfig]:
    """Factory of configs with few small trees: ``fast_config("churn", seed=1)``."""
    return _fast_config


@pytest.fixture(scope="session")
def churn_frames(
    small_world: dict[str, Path],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    config = _fast_config("churn")
    frame, split = prepare_training_set(
        config, small_world["transactions"], small_world["interactions"]
    )
    return split_frame(frame, split)


@pytest.fixture(scope="session")
def clv_frames(small_world: dict[str, Path]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    config = _fast_config("clv")
    frame, split = prepare_training_set(
        config, small_world["transactions"], small_world["interactions"]
    )
    return split_frame(frame, split)
