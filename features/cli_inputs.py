"""How commands read a user's files: the shared options, and loading with printed accounting.

:func:`reads_inputs` gives a command the whole set of reading options (column maps, formats,
day order, decimal comma, encoding, duplicate and missing-id policies, currency);
:func:`open_inputs` loads what the options say, or passes Rapport's own contract Parquet on
as paths for DuckDB to scan.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypedDict, TypeVar, Unpack, cast

import pandas as pd
import typer

from rapport.features.console import console, run_or_exit, step
from rapport.features.contracts import (
    LoadOptions,
    is_contract_parquet,
    load_interactions,
    load_transactions,
)
from rapport.features.load_report import LoadReport

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
        help="Map your transaction columns, or expressions over them: "
        "customer_id=CustomerID,timestamp=InvoiceDate,order_id=InvoiceNo,"
        "amount=Quantity*UnitPrice.",
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


#: The reading options a command gets from :func:`reads_inputs`, in the order ``--help`` lists.
_OPTIONS: tuple[tuple[str, object, object], ...] = (
    ("tx_columns", TxColumnsOpt, ""),
    ("ix_columns", IxColumnsOpt, ""),
    ("timestamp_format", FormatOpt, None),
    ("ix_timestamp_format", IxFormatOpt, None),
    ("dayfirst", DayFirstOpt, None),
    ("decimal_comma", DecimalCommaOpt, False),
    ("encoding", EncodingOpt, "utf-8"),
    ("duplicates", DuplicatesOpt, DuplicatesChoice.drop),
    ("missing_ids", MissingIdsOpt, MissingIdsChoice.error),
    ("currency", CurrencyOpt, None),
)
_INTERACTION_ONLY = ("ix_columns", "ix_timestamp_format")
F = TypeVar("F", bound=Callable[..., Any])


def reads_inputs(*, interactions: bool = True) -> Callable[[F], F]:
    """Give a command every option that says how to read the user's files, as one argument.

    The decorated command declares ``read: ReadOptions`` instead of a dozen options; Typer
    sees the options themselves (with their help), and the command passes ``**read`` on to
    :func:`open_inputs` or :func:`load_inputs`. One list of options, so every command that
    reads files reads them alike.
    """
    names = [n for n, _, _ in _OPTIONS if interactions or n not in _INTERACTION_ONLY]

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "read"]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
            for name, a, d in _OPTIONS
            if name in names
        ]

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            read = {n: kwargs.pop(n) for n in names}
            for choice in ("duplicates", "missing_ids"):
                read[choice] = str(read[choice])
            return command(*args, read=ReadOptions(**read), **kwargs)  # type: ignore[typeddict-item]

        wrapper.__signature__ = signature.replace(parameters=[*own, *added])  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return decorate
