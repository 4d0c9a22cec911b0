"""Command-line sub-apps for the feature stage: ``rapport data ...`` and ``rapport features ...``.

Thin wrappers: each command loads (and so validates) its inputs, calls one pure function,
writes its output atomically and prints a summary. Validation errors exit with status 2 and a
message naming the column and rows; nothing is written then.
"""

from __future__ import annotations

import datetime as dt
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypedDict, TypeVar, Unpack

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
from rapport.features.contracts import (
    DataValidationError,
    LoadOptions,
    RowsDroppedWarning,
    is_contract_parquet,
    load_interactions,
    load_transactions,
)
from rapport.features.load_report import LoadReport
from rapport.features.segments import segment_summary

console = Console(stderr=True)
T = TypeVar("T")

features_app = typer.Typer(help="Build point-in-time features and labels.", no_args_is_help=True)
data_app = typer.Typer(help="Bundled and synthetic data sets.", no_args_is_help=True)


def write_parquet_atomic(df: pd.DataFrame, out: Path) -> None:
    """Write ``df`` to ``out`` via a temporary file and a rename: never a partial file."""
    write_features([df], out)


@contextmanager
def step(message: str) -> Iterator[None]:
    """Show a spinner for one step and print how long it took."""
    start = time.perf_counter()
    with console.status(message):
        yield
    console.print(f"[green]✓[/] {message} ({time.perf_counter() - start:.1f} s)")


@contextmanager
def progress_bar(message: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A bar for one long step (counts without a total); yields the function that advances it.

    The bar is transient: when the step ends it gives way to the same ``✓`` line as
    :func:`step`, with how long the step took.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    start = time.perf_counter()
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(message, total=total)
        yield lambda n: bar.advance(task, n)
    console.print(f"[green]✓[/] {message} ({time.perf_counter() - start:.1f} s)")


def _counting_cutoffs(
    frames: Iterator[pd.DataFrame], advance: Callable[[int], None]
) -> Iterator[pd.DataFrame]:
    """Pass feature batches on, advancing a bar by the cutoffs each one holds."""
    for frame in frames:
        advance(frame["as_of"].nunique())
        yield frame


def run_or_exit(fn: Callable[[], T]) -> T:
    """Run ``fn``; turn input errors into a clean message and exit status 2.

    Warnings raised on the way are printed as one ``warning:`` line each once the recording
    has stopped (printed through :func:`warnings.showwarning` inside it, each would be
    recorded again, without end). Rows dropped on load are left out: the caller prints the
    load's accounting line, which says the same.
    """
    error: Exception | None = None
    with warnings.catch_warnings(record=True) as caught:
        try:
            result = fn()
        except (DataValidationError, ValueError) as err:
            error = err
    for w in caught:
        if not issubclass(w.category, RowsDroppedWarning):
            console.print(f"[yellow]warning:[/] {w.message}")
    if error is not None:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(code=2) from error
    return result


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


TransactionsOpt = Annotated[
    Path, typer.Option("--transactions", "-t", help="Transactions file (CSV or Parquet).")
]
InteractionsOpt = Annotated[
    Path | None,
    typer.Option("--interactions", "-i", help="Optional interactions file (CSV or Parquet)."),
]
AsOfOpt = Annotated[
    str,
    typer.Option(
        "--as-of", help="Cutoff date(s), YYYY-MM-DD, comma-separated; a date includes its day."
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write.")]
TxColumnsOpt = Annotated[
    str,
    typer.Option(
        "--tx-columns",
        help="Map your transaction column names: customer_id=CustID,timestamp=Date,amount=Total.",
    ),
]
IxColumnsOpt = Annotated[
    str,
    typer.Option(
        "--ix-columns",
        help="Map your interaction column names: customer_id=...,channel=...,event=...",
    ),
]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--timestamp-format",
        help="strftime format of the timestamps, e.g. %Y%m%d (default: parsed as dates or "
        "datetimes in ISO and the usual forms).",
    ),
]
DecimalCommaOpt = Annotated[
    bool,
    typer.Option(
        "--decimal-comma",
        help="Amounts are written with a decimal comma (1.234,50), as European exports do.",
    ),
]
IxFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--ix-timestamp-format",
        help="strftime format of the interactions' timestamps where it differs from "
        "--timestamp-format; 'auto' parses them as dates or datetimes.",
    ),
]


class DuplicatesChoice(StrEnum):
    """What ``--duplicates`` does with rows repeated in every source column."""

    drop = "drop"
    keep = "keep"
    error = "error"


class MissingIdsChoice(StrEnum):
    """What ``--missing-ids`` does with rows without a customer id."""

    error = "error"
    drop = "drop"


DuplicatesOpt = Annotated[
    DuplicatesChoice,
    typer.Option(
        "--duplicates",
        help="Rows identical to an earlier row in every source column: drop (counted), keep "
        "or error. Lines that differ in any column are never duplicates.",
    ),
]
MissingIdsOpt = Annotated[
    MissingIdsChoice,
    typer.Option(
        "--missing-ids",
        help="Transaction rows without a customer id (guest checkouts): error, or drop "
        "(counted, with their amount).",
    ),
]
DayFirstOpt = Annotated[
    bool | None,
    typer.Option(
        "--dayfirst/--monthfirst",
        help="Read dates such as 04/03/2025 day first (4 March) or month first (April 3). "
        "Default: as the values show (13/01/2025), else refused.",
    ),
]
EncodingOpt = Annotated[
    str,
    typer.Option(
        "--encoding",
        help="Text encoding of CSV files: utf-8 (a byte-order mark is read as such), "
        "latin-1, cp1252, ...",
    ),
]
CurrencyOpt = Annotated[
    str | None,
    typer.Option(
        "--currency",
        envvar="RAPPORT_CURRENCY",
        help="Currency code of the amounts (GBP, EUR, ...): carried into reports, training, "
        "scores and responses. Default: RAPPORT_CURRENCY, else unstated.",
    ),
]


def load_inputs(
    transactions: Path,
    interactions: Path | None,
    *,
    tx_columns: str = "",
    ix_columns: str = "",
    timestamp_format: str | None = None,
    ix_timestamp_format: str | None = None,
    decimal_comma: bool = False,
    duplicates: str = "drop",
    missing_ids: str = "error",
    currency: str | None = None,
    dayfirst: bool | None = None,
    encoding: str = "utf-8",
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Load and validate the event tables as the options say, with progress; exit 2 on errors.

    Each load prints its accounting line (rows read, kept, dropped by reason; amounts). The
    interactions take ``timestamp_format`` unless ``ix_timestamp_format`` gives theirs
    (``"auto"``: parsed as dates or datetimes): exports from two systems rarely share one.
    """
    tx_options = LoadOptions(
        columns=tx_columns,
        timestamp_format=timestamp_format,
        decimal="," if decimal_comma else ".",
        duplicates=DuplicatesChoice(duplicates).value,
        missing_ids=MissingIdsChoice(missing_ids).value,
        currency=currency,
        dayfirst=dayfirst,
        encoding=encoding,
    )
    with step(f"Loading transactions from {transactions}"):
        tx = run_or_exit(lambda: load_transactions(transactions, tx_options))
    print_load_report(tx)
    if interactions is None:
        return tx, None
    ix_format = timestamp_format if ix_timestamp_format is None else ix_timestamp_format
    ix_options = replace(
        tx_options,
        columns=ix_columns,
        timestamp_format=None if ix_format == "auto" else ix_format,
        missing_ids="error",
    )
    with step(f"Loading interactions from {interactions}"):
        ix = run_or_exit(lambda: load_interactions(interactions, ix_options))
    print_load_report(ix)
    return tx, ix


def print_load_report(frame: pd.DataFrame) -> None:
    """Print a loaded table's accounting line, in yellow when rows were dropped."""
    report = LoadReport.of(frame)
    if report is not None:
        colour = "yellow" if report.dropped else "green"
        console.print(f"[{colour}]=[/] {report.line()}")


@dataclass(frozen=True)
class Inputs:
    """The event tables as a command passes them on, and the days they span.

    ``transactions`` and ``interactions`` are paths where DuckDB may scan the files as they
    are, loaded and validated frames otherwise. ``first_purchase`` is None when every row is
    a refund; ``last_day`` is the last transaction's day.
    """

    transactions: Path | pd.DataFrame
    interactions: Path | pd.DataFrame | None
    first_purchase: dt.date | None
    last_day: dt.date | None


class ReadOptions(TypedDict, total=False):
    """How to read a user's files: the keyword options of :func:`load_inputs`."""

    tx_columns: str
    ix_columns: str
    timestamp_format: str | None
    ix_timestamp_format: str | None
    decimal_comma: bool
    duplicates: str
    missing_ids: str
    currency: str | None
    dayfirst: bool | None
    encoding: str


#: Options that change how a file's rows are read (the others are policies for bad rows,
#: which a file Rapport wrote in its contract cannot have, and the currency's name).
_READING = (
    "tx_columns",
    "ix_columns",
    "timestamp_format",
    "ix_timestamp_format",
    "decimal_comma",
    "dayfirst",
)


def open_inputs(
    transactions: Path, interactions: Path | None, **options: Unpack[ReadOptions]
) -> Inputs:
    """Pass Parquet that Rapport wrote in the contract on as paths; load and validate the rest.

    Files marked as in the contract (the demo, ``rapport data synth``) hold unique, naive UTC,
    lower-case rows already, so DuckDB scans them as they are: at 10M transactions loading
    them into pandas took 4 s against the 2 s the features take. Any other file, or any
    option that changes how a file is read (``options``, as :func:`load_inputs` takes them),
    goes through :func:`load_inputs`.
    """
    if (
        not any(options.get(k) for k in _READING)
        and is_contract_parquet(transactions, "transactions")
        and (interactions is None or is_contract_parquet(interactions, "interactions"))
    ):
        names = " and ".join(str(p) for p in (transactions, interactions) if p is not None)
        console.print(f"[green]✓[/] {names}: Parquet in Rapport's contract, read as it is")
        return Inputs(transactions, interactions, *_days_of_parquet(transactions))
    tx, ix = load_inputs(transactions, interactions, **options)
    purchases = tx.loc[tx["amount"] >= 0, "timestamp"]
    first = None if purchases.empty else pd.Timestamp(purchases.min()).date()
    return Inputs(tx, ix, first, pd.Timestamp(tx["timestamp"].max()).date())


def _days_of_parquet(path: Path) -> tuple[dt.date | None, dt.date | None]:
    """The first purchase day and last transaction day of a contract Parquet file.

    Times in the contract are naive UTC, so their dates are UTC days.
    """
    import duckdb

    quoted = str(path).replace("'", "''")
    row = duckdb.sql(
        "SELECT min(timestamp) FILTER (WHERE amount >= 0), max(timestamp) "
        f"FROM read_parquet('{quoted}')"
    ).fetchone()
    first, last = row if row else (None, None)
    return (
        None if first is None else pd.Timestamp(first).date(),
        None if last is None else pd.Timestamp(last).date(),
    )


def check_cutoffs_reach_purchases(first: dt.date | None, cutoffs: list[dt.date]) -> None:
    """Refuse cutoffs that all fall before the first purchase; warn of those that some do.

    An empty feature set is a valid answer for the API, but on the command line it almost
    always means a mistyped date or the wrong file, so it is an error (exit 2, nothing written).

    Raises
    ------
    ValueError
        When no purchase falls on or before the latest cutoff.
    """
    if first is None:
        raise ValueError("transactions: no purchase (amount >= 0), only refunds")
    early = [c for c in cutoffs if c < first]
    if len(early) == len(cutoffs):
        which = (
            f"as_of {cutoffs[0]} is"
            if len(cutoffs) == 1
            else f"as_of: every cutoff (latest {cutoffs[-1]}) is"
        )
        raise ValueError(
            f"{which} before the first purchase in the transactions, on {first}: "
            "no customer would have a row"
        )
    if early:
        console.print(
            f"[yellow]warning:[/] {len(early)} cutoff(s) before the first purchase ({first}) "
            "have no rows"
        )


@features_app.command("build")
def features_build(
    transactions: TransactionsOpt,
    as_of: AsOfOpt,
    out: OutOpt,
    interactions: InteractionsOpt = None,
    windows: Annotated[
        str, typer.Option(help="Window lengths in days, comma-separated.")
    ] = "30,90,365",
    tx_columns: TxColumnsOpt = "",
    ix_columns: IxColumnsOpt = "",
    timestamp_format: FormatOpt = None,
    ix_timestamp_format: IxFormatOpt = None,
    decimal_comma: DecimalCommaOpt = False,
    duplicates: DuplicatesOpt = DuplicatesChoice.drop,
    missing_ids: MissingIdsOpt = MissingIdsChoice.error,
    currency: CurrencyOpt = None,
    dayfirst: DayFirstOpt = None,
    encoding: EncodingOpt = "utf-8",
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
) -> None:
    """Build point-in-time RFM + interaction features per customer and cutoff."""
    cutoffs = run_or_exit(lambda: parse_cutoffs(as_of))
    window_days = _windows(windows)
    inputs = open_inputs(
        transactions,
        interactions,
        tx_columns=tx_columns,
        ix_columns=ix_columns,
        timestamp_format=timestamp_format,
        ix_timestamp_format=ix_timestamp_format,
        decimal_comma=decimal_comma,
        duplicates=duplicates.value,
        missing_ids=missing_ids.value,
        currency=currency,
        dayfirst=dayfirst,
        encoding=encoding,
    )
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
def features_labels(
    transactions: TransactionsOpt,
    as_of: AsOfOpt,
    out: OutOpt,
    horizon_days: Annotated[
        int, typer.Option("--horizon-days", help="Label horizon H: days (as_of, as_of + H].")
    ] = 90,
    tx_columns: TxColumnsOpt = "",
    timestamp_format: FormatOpt = None,
    decimal_comma: DecimalCommaOpt = False,
    duplicates: DuplicatesOpt = DuplicatesChoice.drop,
    missing_ids: MissingIdsOpt = MissingIdsChoice.error,
    currency: CurrencyOpt = None,
    dayfirst: DayFirstOpt = None,
    encoding: EncodingOpt = "utf-8",
) -> None:
    """Build churn / future-spend labels for a horizon after each cutoff."""
    cutoffs = run_or_exit(lambda: parse_cutoffs(as_of))
    inputs = open_inputs(
        transactions,
        None,
        tx_columns=tx_columns,
        timestamp_format=timestamp_format,
        decimal_comma=decimal_comma,
        duplicates=duplicates.value,
        missing_ids=missing_ids.value,
        currency=currency,
        dayfirst=dayfirst,
        encoding=encoding,
    )
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
