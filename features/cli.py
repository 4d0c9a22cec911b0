"""Command-line sub-apps for the feature stage: ``rapport data ...`` and ``rapport features ...``.

Thin wrappers: each command loads (and so validates) its inputs, calls one pure function,
writes its output atomically and prints a summary. Validation errors exit with status 2 and a
message naming the column and rows; nothing is written then.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from rapport.features import definitions as defs
from rapport.features.build import (
    GRID_MIN_ROW_CUTOFFS,
    build_labels,
    iter_features,
    parse_cutoffs,
    write_features,
)
from rapport.features.cli_inputs import (
    AsOfOpt,
    InteractionsOpt,
    OutOpt,
    ReadOptions,
    TransactionsOpt,
    check_cutoffs_reach_purchases,
    open_inputs,
    reads_inputs,
)
from rapport.features.console import console, progress_bar, run_or_exit, step
from rapport.features.segments import segment_summary

features_app = typer.Typer(help="Build point-in-time features and labels.", no_args_is_help=True)
data_app = typer.Typer(help="Bundled and synthetic data sets.", no_args_is_help=True)


def write_parquet_atomic(df: pd.DataFrame, out: Path) -> None:
    """Write ``df`` to ``out`` via a temporary file and a rename: never a partial file."""
    write_features([df], out)


def _counting_cutoffs(
    frames: Iterator[pd.DataFrame], advance: Callable[[int], None]
) -> Iterator[pd.DataFrame]:
    """Pass feature batches on, advancing a bar by the cutoffs each one holds."""
    for frame in frames:
        advance(frame["as_of"].nunique())
        yield frame


def _windows(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError as err:
        raise typer.BadParameter(
            f"windows must be whole days like 30,90,365, not {text!r}"
        ) from err


def print_feature_summary(
    features: pd.DataFrame,
    title: str = "Customers by segment",
    *,
    total_rows: int | None = None,
    n_cutoffs: int | None = None,
) -> None:
    """Print the segment table of the last cutoff and the size of the whole set.

    ``features`` must hold the last cutoff's rows; ``total_rows`` and ``n_cutoffs`` describe the
    whole set when only its last batch is at hand (streamed writes).
    """
    summary = segment_summary(features)
    last = summary[summary["as_of"] == summary["as_of"].max()]
    table = Table(title=f"{title} as of {pd.Timestamp(last['as_of'].iloc[0]).date()}")
    for name in ("segment", "customers", "share", "mean recency (days)", "mean purchase days"):
        table.add_column(name, justify="left" if name == "segment" else "right")
    table.add_column("mean spend", justify="right")
    for row in last.itertuples(index=False):
        table.add_row(
            str(row.segment),
            f"{row.customers:,}",
            f"{row.share:.1%}",
            f"{row.recency_days:,.0f}",
            f"{row.n_purchase_days:,.2f}",
            f"{row.total_spend:,.2f}",
        )
    Console().print(table)
    counts = features.groupby("as_of").size()
    rows = len(features) if total_rows is None else total_rows
    console.print(
        f"{rows:,} rows x {features.shape[1]} columns; "
        f"{n_cutoffs or len(counts)} cutoff(s), {counts.iloc[-1]:,} customers at the last one"
    )


@features_app.command("build")
@reads_inputs()
def features_build(
    transactions: TransactionsOpt,
    as_of: AsOfOpt,
    out: OutOpt,
    interactions: InteractionsOpt = None,
    windows: Annotated[
        str, typer.Option(help="Window lengths in days, comma-separated.")
    ] = "30,90,365",
    cutoff_batch: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Run the feature SQL alone on this many cutoffs per query. By default "
            "every cutoff comes from one pass over the events (the grid), written in "
            "batches of about 4M rows; inputs under "
            f"{GRID_MIN_ROW_CUTOFFS / 1e6:g}M event rows x cutoffs go to the feature SQL "
            "alone, in one query.",
        ),
    ] = None,
    *,
    read: ReadOptions,
) -> None:
    """Build point-in-time RFM + interaction features per customer and cutoff."""
    cutoffs = run_or_exit(lambda: parse_cutoffs(as_of))
    window_days = _windows(windows)
    inputs = open_inputs(transactions, interactions, **read)
    run_or_exit(lambda: check_cutoffs_reach_purchases(inputs.first_purchase, cutoffs))
    # Batches of cutoffs stream into the Parquet file: memory holds one batch, not the set.
    with progress_bar(
        f"Building features at {len(cutoffs)} cutoff(s) into {out}", len(cutoffs)
    ) as advance:
        rows, last = run_or_exit(
            lambda: write_features(
                _counting_cutoffs(
                    iter_features(
                        inputs.transactions,
                        inputs.interactions,
                        as_of=cutoffs,
                        windows=window_days,
                        validate=False,
                        cutoff_batch=cutoff_batch,
                    ),
                    advance,
                ),
                out,
            )
        )
    print_feature_summary(last, total_rows=rows, n_cutoffs=len(cutoffs))


@features_app.command("labels")
@reads_inputs(interactions=False)
def features_labels(
    transactions: TransactionsOpt,
    as_of: AsOfOpt,
    out: OutOpt,
    horizon_days: Annotated[
        int, typer.Option("--horizon-days", help="Label horizon H: days (as_of, as_of + H].")
    ] = 90,
    *,
    read: ReadOptions,
) -> None:
    """Build churn / future-spend labels for a horizon after each cutoff."""
    cutoffs = run_or_exit(lambda: parse_cutoffs(as_of))
    inputs = open_inputs(transactions, None, **read)
    run_or_exit(lambda: check_cutoffs_reach_purchases(inputs.first_purchase, cutoffs))
    with step(f"Building {horizon_days}-day labels at {len(cutoffs)} cutoff(s)"):
        labels = run_or_exit(
            lambda: build_labels(
                inputs.transactions, as_of=cutoffs, horizon_days=horizon_days, validate=False
            )
        )
    with step(f"Writing {out}"):
        write_parquet_atomic(labels, out)
    rate = labels.groupby("as_of")[f"churned_{horizon_days}d"].mean()
    for cutoff, share in rate.items():
        console.print(f"as of {pd.Timestamp(str(cutoff)).date()}: churn rate {share:.1%}")


@features_app.command("columns")
def features_columns(
    windows: Annotated[
        str, typer.Option(help="Window lengths in days, comma-separated.")
    ] = "30,90,365",
) -> None:
    """List the transaction feature columns for the given windows."""
    spec = defs.FeatureSpec(windows=_windows(windows))
    for name in defs.feature_columns(spec):
        typer.echo(name)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the two Parquet files.")],
    customers: Annotated[
        int | None, typer.Option(help="Number of customers (default: from --transactions).")
    ] = None,
    transactions: Annotated[
        int, typer.Option(help="About how many transactions to generate.")
    ] = 100_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    start: Annotated[str, typer.Option(help="First day of the data.")] = "2023-01-01",
    end: Annotated[str, typer.Option(help="Last day of the data.")] = "2025-12-31",
) -> None:
    """Generate a seeded synthetic world (transactions + interactions) as Parquet."""
    from rapport.features.synthetic import (
        SyntheticConfig,
        customers_for_transactions,
        write_synthetic,
    )

    base = SyntheticConfig(start=start, end=end, seed=seed)
    n = customers if customers is not None else customers_for_transactions(transactions, base)
    config = SyntheticConfig(n_customers=n, start=start, end=end, seed=seed)
    summary = write_synthetic(config, out, progress=True)
    console.print(
        f"{summary.n_customers:,} customers, {summary.n_transactions:,} transactions, "
        f"{summary.n_interactions:,} interactions -> {out}"
    )


@data_app.command("cdnow")
def data_cdnow(
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV or Parquet file to write.")],
    part: Annotated[str, typer.Option(help="'master' (23,570 customers) or 'sample'.")] = "master",
) -> None:
    """Export the bundled CDNOW transactions in Rapport's contract."""
    from rapport.features.datasets import load_cdnow

    df = run_or_exit(lambda: load_cdnow(part))  # type: ignore[arg-type]
    if out.suffix.lower() == ".csv":
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
    else:
        write_parquet_atomic(df, out)
    console.print(
        f"CDNOW {part}: {len(df):,} transactions, {df['customer_id'].nunique():,} -> {out}"
    )
