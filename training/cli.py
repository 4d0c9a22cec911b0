"""Training commands: ``rapport train``, ``evaluate``, ``models`` and ``promote``.

Thin wrappers over :mod:`rapport.training.pipeline` and :mod:`rapport.training.tracking`;
settings (``RAPPORT_HOME``, ``MLFLOW_TRACKING_URI``) are read when a command starts.
"""

from __future__ import annotations

import logging
import math
import warnings
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from mlflow.exceptions import MlflowException
from rich.table import Table

from rapport.features.cli_inputs import ReadOptions, load_inputs, reads_inputs
from rapport.features.console import console, run_or_exit, step
from rapport.training import tracking
from rapport.training.config import ModelConfig, Task, load_config
from rapport.training.evaluate import evaluate_registered
from rapport.training.pipeline import TrainingResult, train
from rapport.training.settings import TrainingSettings


class SplitChoice(StrEnum):
    """How training rows are split."""

    time = "time"
    customers = "customers"


class TaskChoice(StrEnum):
    """Which model(s) to train."""

    churn = "churn"
    clv = "clv"
    all = "all"


TransactionsOpt = Annotated[
    Path | None,
    typer.Option(
        "--transactions",
        "-t",
        help="Transactions CSV/Parquet (default: the demo data in $RAPPORT_HOME/demo).",
    ),
]
InteractionsOpt = Annotated[
    Path | None,
    typer.Option(
        "--interactions",
        "-i",
        help="Interactions CSV/Parquet (default: the demo data, if present).",
    ),
]


def _data(
    transactions: Path | None, interactions: Path | None, settings: TrainingSettings
) -> tuple[Path, Path | None]:
    if transactions is not None:
        return transactions, interactions
    demo_tx = settings.demo_dir / "transactions.parquet"
    if not demo_tx.exists():
        console.print(
            "[red]error:[/] no --transactions given and no demo data in "
            f"{settings.demo_dir}: run `rapport demo` or pass --transactions"
        )
        raise typer.Exit(code=2)
    demo_ix = settings.demo_dir / "interactions.parquet"
    return demo_tx, interactions or (demo_ix if demo_ix.exists() else None)


def _task(name: str) -> Task:
    if name == "churn":
        return "churn"
    if name == "clv":
        return "clv"
    raise typer.BadParameter(f"task must be churn or clv, not {name!r}")


def _config_for(task: Task, config: Path | None, overrides: dict[str, Any]) -> ModelConfig:
    if config is None:
        return load_config(task, overrides)
    if config.is_dir():
        return load_config(config / f"{task}.yaml", overrides)
    return load_config(config, overrides)


#: Short headers so the metric tables fit an 80-column terminal.
SHORT_NAMES = {
    "roc_auc": "ROC-AUC",
    "pr_auc": "PR-AUC",
    "brier": "Brier",
    "log_loss": "log loss",
    "ece": "ECE",
    "lift_top_decile": "lift@10%",
    "capture_top_decile": "capture@10%",
    "gini": "Gini",
    "spearman": "Spearman",
    "decile_mape": "decile MAPE",
    "total_ratio": "pred/actual",
    "mae": "MAE",
    "rmse": "RMSE",
}


def quiet_mlflow() -> None:
    """Keep MLflow's info and pickling warnings out of command output."""
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"mlflow\..*")


def _number_column(table: Table, header: str) -> None:
    # a number is never cut (an 80-column terminal showed "0.7…"): the header folds instead
    table.add_column(header, justify="right", min_width=6, overflow="fold")


def _short(column: str) -> str | None:
    """A metric column's short header (``valid_roc_auc`` reads ``valid ROC-AUC``)."""
    if column in SHORT_NAMES:
        return SHORT_NAMES[column]
    if column.startswith("valid_") and column.removeprefix("valid_") in SHORT_NAMES:
        return f"valid {SHORT_NAMES[column.removeprefix('valid_')]}"
    return None


#: The training table's test metrics: with the validation column and the status, all of
#: them would not fit an 80-column terminal (metrics.csv in the run has every one).
SELECTION_COLUMNS = (
    "roc_auc",
    "brier",
    "ece",
    "lift_top_decile",
    "gini",
    "spearman",
    "decile_mape",
    "total_ratio",
)


def print_metrics(table: pd.DataFrame, title: str) -> None:
    """Print a models x metrics table; a training run's also shows each candidate's status.

    An unusable row shows no numbers and ``unusable`` as its status (the reason is printed
    below the table), never a score of 0.5.
    """
    out = Table(title=title)
    out.add_column("model", no_wrap=True)
    selection = "status" in table.columns
    columns = [
        c
        for c in table.columns
        if _short(c) is not None
        and (not selection or c.startswith("valid_") or c in SELECTION_COLUMNS)
    ]
    for col in columns:
        _number_column(out, str(_short(col)))
    if selection:
        out.add_column("status", no_wrap=True)
    for name, row in table.iterrows():
        cells = [
            "" if not math.isfinite(float(row[c])) else f"{float(row[c]):.4f}" for c in columns
        ]
        if selection:
            cells.append(str(row["status"]).split(":")[0])
        out.add_row(str(name), *cells)
    console.print(out)


def train_command(
    task: Annotated[TaskChoice, typer.Argument(help="churn, clv or all.")],
    config: Annotated[
        Path | None,
        typer.Option(
            help="Model YAML (or, with `all`, a folder holding churn.yaml and clv.yaml); "
            "default: the shipped configs."
        ),
    ] = None,
    transactions: TransactionsOpt = None,
    interactions: InteractionsOpt = None,
    horizon_days: Annotated[
        int | None, typer.Option(help="Override the label horizon in days.")
    ] = None,
    last_cutoff: Annotated[
        str | None, typer.Option(help="Override the test cutoff date (YYYY-MM-DD).")
    ] = None,
    cutoffs: Annotated[int | None, typer.Option(help="Override the number of cutoffs.")] = None,
    split: Annotated[
        SplitChoice | None,
        typer.Option(
            help="Override the split: `time` (out of time, by cutoff) or `customers` (seeded "
            "held-out customers at the last cutoff, for histories too short for `time`)."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override the random seed.")] = None,
    tune_trials: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Search LightGBM parameters with this many Optuna trials on the validation "
            "cutoff first (nested MLflow runs); 0 turns a config's search off.",
        ),
    ] = None,
    *,
    read: ReadOptions,
) -> None:
    """Train, evaluate out of time, track in MLflow, register, and gate the champion."""
    settings = TrainingSettings()
    quiet_mlflow()
    overrides = {
        "horizon_days": horizon_days,
        "cutoffs.last": last_cutoff,
        "cutoffs.count": cutoffs,
        "split.by": split.value if split is not None else None,
        "seed": seed,
        "tuning.trials": tune_trials,
    }
    tasks: list[Task] = ["churn", "clv"] if task is TaskChoice.all else [_task(task.value)]
    # configs first: a typo in one fails at once, not after the data are loaded
    configs = [run_or_exit(partial(_config_for, t, config, overrides)) for t in tasks]
    tx_path, ix_path = _data(transactions, interactions, settings)
    # loaded once here (with the column maps and formats) for every task trained
    tx, ix = load_inputs(tx_path, ix_path, **read)
    console.print(f"MLflow store: {settings.tracking_uri}")
    for cfg in configs:
        result: TrainingResult = run_or_exit(
            partial(train, cfg, tx, ix, source=str(tx_path), settings=settings, step=step)
        )
        print_metrics(result.metrics, f"{cfg.task}: {result.split.describe()}")
        for note in result.notes:
            console.print(note)
        verdict = "[green]champion[/]" if result.promoted else "[yellow]challenger only[/]"
        console.print(
            f"{result.registered_name} v{result.version}: {verdict} ({result.gate_reason}); "
            f"run {result.run_id}"
        )


def evaluate_command(
    task: Annotated[str, typer.Argument(help="churn or clv.")],
    as_of: Annotated[
        str, typer.Option(help="Cutoff to evaluate at (its horizon must be in the data).")
    ],
    alias: Annotated[str, typer.Option(help="Registered model alias to evaluate.")] = "champion",
    version: Annotated[
        str | None, typer.Option(help="A model version instead of the alias.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="Model YAML (label and horizon); default: shipped.")
    ] = None,
    transactions: TransactionsOpt = None,
    interactions: InteractionsOpt = None,
    *,
    read: ReadOptions,
) -> None:
    """Score a registered model on one cutoff beside the BTYD baseline."""
    settings = TrainingSettings()
    tx, ix = load_inputs(*_data(transactions, interactions, settings), **read)
    cfg = run_or_exit(partial(_config_for, _task(task), config, {}))
    ref = f"/{version}" if version else f"@{alias}"
    uri = f"models:/{cfg.registered_name}{ref}"
    try:
        table = run_or_exit(
            lambda: evaluate_registered(cfg, uri, tx, ix, as_of=as_of, settings=settings)
        )
    except MlflowException as err:
        console.print(f"[red]error:[/] {uri}: {err.message}")
        raise typer.Exit(code=2) from err
    print_metrics(table, f"{uri} at {as_of}")
    if "caveat" in table.attrs:
        console.print(f"[yellow]note:[/] {table.attrs['caveat']}")


def models_command(
    name: Annotated[
        str | None, typer.Option(help="Only this registered model (default: all).")
    ] = None,
) -> None:
    """List registered model versions, aliases and test metrics."""
    tracking.configure(TrainingSettings())
    frame = tracking.list_versions([name] if name else None)
    if frame.empty:
        console.print("no registered models yet: run `rapport train all`")
        return
    keep = [
        c
        for c in ("model", "version", "aliases", "test_cutoff", "roc_auc", "brier", "gini")
        if c in frame.columns
    ]
    out = Table(title="Registered models")
    for col in keep:
        if col == "model":
            out.add_column(col, no_wrap=True)  # whole names: people copy them into commands
        elif col == "version":
            out.add_column("v", justify="right", no_wrap=True)
        elif col == "aliases":
            out.add_column(col, overflow="fold")  # wraps between aliases, folds a long one
        elif col == "test_cutoff":
            out.add_column("test cutoff", no_wrap=True, min_width=10)
        else:
            _number_column(out, SHORT_NAMES.get(col, col))
    for _, row in frame[keep].iterrows():
        cells = []
        for name, value in zip(keep, row, strict=True):
            if isinstance(value, float):
                cells.append(f"{value:.4f}" if math.isfinite(value) else "")
            else:
                cells.append(str(value).replace(",", ", ") if name == "aliases" else str(value))
        out.add_row(*cells)
    console.print(out)


def promote_command(
    name: Annotated[str, typer.Argument(help="Registered model name, e.g. rapport-churn.")],
    version: Annotated[str, typer.Argument(help="Version to make champion.")],
) -> None:
    """Point the champion alias at a version by hand (recorded on the version)."""
    tracking.configure(TrainingSettings())
    try:
        tracking.promote(name, version)
    except MlflowException as err:
        console.print(f"[red]error:[/] {name} v{version}: {err.message}")
        raise typer.Exit(code=2) from err
    console.print(f"{name} v{version} is now the champion")


def register(app: typer.Typer) -> None:
    """Add the training commands to the root ``rapport`` app."""
    app.command("train")(reads_inputs()(train_command))
    app.command("evaluate")(reads_inputs()(evaluate_command))
    app.command("models")(models_command)
    app.command("promote")(promote_command)
