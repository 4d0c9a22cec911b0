"""The main job on embedded demo data, as steps a command or a notebook can call.

:func:`make_demo_world` generates a seeded synthetic world and builds its features and labels,
:func:`train_demo_models` trains, registers and gates the churn and value models on it, and
:func:`score_demo_customers` writes the serving snapshot and every customer's scores with the
served models. ``rapport demo`` prints what each returns and then serves the champions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rapport.features.build import build_features, build_labels, connect, write_features
from rapport.features.contracts import load_interactions, load_transactions
from rapport.features.settings import RapportSettings
from rapport.serving.batch import BatchResult, score_batch, score_chunks
from rapport.serving.scoring import Scorer
from rapport.serving.settings import ServingSettings
from rapport.serving.snapshot import SnapshotSummary, write_snapshot
from rapport.training.config import load_config
from rapport.training.pipeline import TrainingResult, train
from rapport.training.settings import TrainingSettings

StepFn = Callable[[str], AbstractContextManager[object]]
#: Demo cutoffs: the latest whose label horizon is fully observed and the 11 month-ends before.
DEMO_CUTOFFS = 12


def _quiet(_: str) -> AbstractContextManager[object]:
    return nullcontext()


@dataclass(frozen=True)
class DemoWorld:
    """The generated demo data and what was built from it (all under ``folder``)."""

    folder: Path
    transactions: Path
    interactions: Path
    features: pd.DataFrame
    labels: pd.DataFrame
    horizon_days: int
    last_day: dt.date


def _month_end_before(day: dt.date, months_back: int = 0) -> dt.date:
    first = pd.Timestamp(day).to_period("M") - months_back
    return (first.to_timestamp() - pd.Timedelta(days=1)).date()


def demo_cutoffs(last_day: dt.date, horizon_days: int) -> list[dt.date]:
    """Month-end cutoffs whose ``horizon_days`` labels lie inside data ending ``last_day``."""
    latest = _month_end_before(last_day - dt.timedelta(days=horizon_days))
    return [_month_end_before(latest, k) for k in range(DEMO_CUTOFFS - 2, -1, -1)] + [latest]


def make_demo_world(
    customers: int = 20_000,
    seed: int = 42,
    horizon_days: int = 90,
    *,
    settings: RapportSettings | None = None,
    step: StepFn = _quiet,
) -> DemoWorld:
    """Generate the demo world under ``$RAPPORT_HOME/demo`` and build its features and labels.

    Features at :data:`DEMO_CUTOFFS` monthly cutoffs and ``horizon_days`` labels are written
    beside the data (``features.parquet``, ``labels.parquet``).
    """
    from rapport.features.synthetic import SyntheticConfig, write_synthetic

    settings = settings or RapportSettings()
    folder = settings.demo_dir
    # Four years: the value model's 365-day labels need training cutoffs whose horizon ends by
    # validation, itself a horizon before the test cutoff, a horizon before the data end.
    config = SyntheticConfig(n_customers=customers, seed=seed, start="2022-01-01")
    with step(f"Generating {customers:,} synthetic customers into {folder}"):
        summary = write_synthetic(config, folder)
    with step("Loading and validating"):
        tx = load_transactions(summary.transactions_path)
        ix = load_interactions(summary.interactions_path)
    last_day = pd.Timestamp(tx["timestamp"].max()).date()
    cutoffs = demo_cutoffs(last_day, horizon_days)
    con = connect(threads=settings.duckdb_threads, memory_limit=settings.duckdb_memory_limit)
    try:
        with step(f"Building features at {len(cutoffs)} monthly cutoffs"):
            feats = build_features(tx, ix, as_of=cutoffs, validate=False, connection=con)
        with step(f"Building {horizon_days}-day labels"):
            labels = build_labels(
                tx, as_of=cutoffs, horizon_days=horizon_days, validate=False, connection=con
            )
    finally:
        con.close()
    with step("Writing features and labels"):
        write_features([feats], folder / "features.parquet")
        write_features([labels], folder / "labels.parquet")
    return DemoWorld(
        folder,
        summary.transactions_path,
        summary.interactions_path,
        feats,
        labels,
        horizon_days,
        last_day,
    )


def train_demo_models(
    world: DemoWorld, *, settings: TrainingSettings | None = None, step: StepFn = _quiet
) -> list[TrainingResult]:
    """Train, register and gate the shipped churn and value configs on the demo world."""
    settings = settings or TrainingSettings()
    return [
        train(
            load_config(task),
            world.transactions,
            world.interactions,
            source=str(world.transactions),
            settings=settings,
            step=step,
        )
        for task in ("churn", "clv")
    ]


def score_demo_customers(
    world: DemoWorld, scorer: Scorer, settings: ServingSettings, *, step: StepFn = _quiet
) -> tuple[SnapshotSummary, BatchResult]:
    """Write the serving snapshot and every customer's scores as of the world's last day."""
    with step(f"Writing the serving snapshot (features as of {world.last_day})"):
        snapshot = write_snapshot(
            world.transactions,
            world.interactions,
            as_of=world.last_day,
            scorer=scorer,
            out=settings.snapshot_path,
            duckdb_threads=settings.duckdb_threads,
            duckdb_memory_limit=settings.duckdb_memory_limit,
        )
    with step("Scoring every customer"):
        scored = score_batch(
            score_chunks(
                world.transactions,
                world.interactions,
                as_of=world.last_day,
                scorer=scorer,
                validate=False,
            ),
            settings.home / "scores.parquet",
        )
    return snapshot, scored
