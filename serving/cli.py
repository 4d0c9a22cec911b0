"""The ``rapport`` command: one Typer app with a sub-command per stage.

It lives in the top layer because the main job (``rapport demo``) strings every stage
together; the stage sub-apps themselves live beside their code.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import pandas as pd
import typer

from rapport.features.build import build_features, build_labels, connect
from rapport.features.cli import (
    console,
    data_app,
    features_app,
    print_feature_summary,
    step,
    write_parquet_atomic,
)
from rapport.features.contracts import load_interactions, load_transactions
from rapport.features.settings import RapportSettings
from rapport.training.cli import print_metrics, quiet_mlflow
from rapport.training.cli import register as register_training_commands
from rapport.training.config import load_config
from rapport.training.pipeline import train
from rapport.training.settings import TrainingSettings

app = typer.Typer(
    name="rapport",
    help="Rapport: customer scoring for relationship marketing.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")
register_training_commands(app)


def _month_end_before(day: dt.date, months_back: int = 0) -> dt.date:
    first = pd.Timestamp(day).to_period("M") - months_back
    return (first.to_timestamp() - pd.Timedelta(days=1)).date()


@app.command("demo")
def demo(
    customers: Annotated[int, typer.Option(help="Customers in the synthetic demo world.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed of the demo data.")] = 42,
    horizon_days: Annotated[int, typer.Option(help="Label horizon in days.")] = 90,
    train_models: Annotated[
        bool,
        typer.Option(
            "--train/--no-train", help="Train, evaluate and register the churn and value models."
        ),
    ] = True,
) -> None:
    """Run the main job end to end on embedded demo data.

    Generate data, build features and labels, summarise segments, then train the churn and
    value models, compare them with the baselines in MLflow and register them.
    """
    from rapport.features.synthetic import SyntheticConfig, write_synthetic

    settings = RapportSettings()
    out_dir = settings.demo_dir
    config = SyntheticConfig(n_customers=customers, seed=seed)
    with step(f"Generating {customers:,} synthetic customers into {out_dir}"):
        summary = write_synthetic(config, out_dir)
    with step("Loading and validating"):
        tx = load_transactions(summary.transactions_path)
        ix = load_interactions(summary.interactions_path)
    last_day = pd.Timestamp(tx["timestamp"].max()).date()
    # The latest cutoff whose label horizon is fully observed, and the 11 month-ends before it.
    latest = _month_end_before(last_day - dt.timedelta(days=horizon_days))
    cutoffs = [_month_end_before(latest, k) for k in range(10, -1, -1)] + [latest]
    con = connect(threads=settings.duckdb_threads, memory_limit=settings.duckdb_memory_limit)
    with step(f"Building features at {len(set(cutoffs))} monthly cutoffs"):
        feats = build_features(tx, ix, as_of=cutoffs, validate=False, connection=con)
    with step(f"Building {horizon_days}-day labels"):
        labels = build_labels(
            tx, as_of=cutoffs, horizon_days=horizon_days, validate=False, connection=con
        )
    con.close()
    with step("Writing features and labels"):
        write_parquet_atomic(feats, out_dir / "features.parquet")
        write_parquet_atomic(labels, out_dir / "labels.parquet")
    print_feature_summary(feats, title="Demo customers by segment")
    churn = labels.groupby("as_of")[f"churned_{horizon_days}d"].mean()
    console.print(
        f"{horizon_days}-day churn rate across cutoffs: {churn.min():.1%} - {churn.max():.1%}; "
        f"outputs in {out_dir}"
    )
    if not train_models:
        return
    train_settings = TrainingSettings()
    quiet_mlflow()
    console.print(f"MLflow store: {train_settings.tracking_uri}")
    for task in ("churn", "clv"):
        model_config = load_config(task)
        result = train(
            model_config,
            summary.transactions_path,
            summary.interactions_path,
            source=str(summary.transactions_path),
            settings=train_settings,
            step=step,
        )
        print_metrics(result.metrics, f"{task}: test cutoff {result.split.test}")
        verdict = "champion" if result.promoted else "challenger only"
        console.print(
            f"{result.registered_name} v{result.version}: {verdict} ({result.gate_reason})"
        )
    console.print(
        "Next: `rapport models` lists versions; `mlflow ui --backend-store-uri "
        f"{train_settings.tracking_uri}` browses the runs."
    )


def main() -> None:
    """Entry point of the ``rapport`` console script."""
    app()
