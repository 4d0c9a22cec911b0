"""Data contracts for the two event tables Rapport reads, and the loaders that enforce them.

Transactions
    ``customer_id`` (any hashable id, never null), ``timestamp`` (date or datetime; stored as
    timezone-free UTC), ``amount`` (float64 currency; refunds negative, zero allowed) and an
    optional ``order_id``: lines that share a customer and an ``order_id`` are one order, one
    row whose amount is the lines' total, at the first line's time.
Interactions (optional everywhere)
    ``customer_id``, ``timestamp``, ``channel`` (email, web, phone, store, app, ...) and ``event``
    (sent, open, click, visit, call, complaint, ...); channel and event are normalised to
    lower case.

Validation happens where data enters. Every failure raises :class:`DataValidationError`, which
names the table (and file) and the column and shows the first offending rows; nothing
downstream runs, so nothing is written. What a load drops or merges is counted in a
:class:`~rapport.features.load_report.LoadReport` (``LoadReport.of(frame)``): rows
identical to an earlier one in every source column (dropped by default), rows without a
customer id (an error by default, or dropped), order lines merged into their order.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from rapport.features.column_map import (
    ColumnMapError,
    evaluate_expressions,
    is_expression,
    parse_column_map,
)
from rapport.features.errors import DataValidationError
from rapport.features.load_report import ATTRS_KEY, Dropped, LoadReport
from rapport.features.parsing import to_amount, to_label, to_utc_naive
from rapport.features.reading import TableKind, TableSource, read_table


@dataclass(frozen=True)
class TableSchema:
    """The columns one event table must and may have."""

    kind: TableKind
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """Required then optional column names."""
        return self.required + self.optional


TRANSACTIONS = TableSchema("transactions", ("customer_id", "timestamp", "amount"), ("order_id",))
INTERACTIONS = TableSchema("interactions", ("customer_id", "timestamp", "channel", "event"))
SCHEMAS: dict[TableKind, TableSchema] = {"transactions": TRANSACTIONS, "interactions": INTERACTIONS}


class RowsDroppedWarning(UserWarning):
    """Rows were dropped on load (exact duplicates, rows without an id); counted in the text."""


#: The former name, for code that filters on it.
DuplicateRowsWarning = RowsDroppedWarning


def _contract_columns(
    df: pd.DataFrame, schema: TableSchema, mapping: Mapping[str, str], table: str
) -> pd.DataFrame:
    """The contract's columns of ``df``: mapped columns, evaluated expressions, or as named."""
    unknown = sorted(set(mapping) - set(schema.columns))
    if unknown:
        raise DataValidationError(
            table,
            unknown[0],
            f"column map names unknown Rapport column(s) {unknown}; "
            f"known columns are {list(schema.columns)}",
        )
    expressions = {ours: v for ours, v in mapping.items() if is_expression(v, df.columns)}
    absent = {o: v for o, v in mapping.items() if o not in expressions and v not in df.columns}
    if absent:
        ours, theirs = next(iter(absent.items()))
        raise DataValidationError(
            table,
            ours,
            f"mapped to '{theirs}', which is not in the data; columns are {list(df.columns)}",
        )
    try:
        evaluated = evaluate_expressions(df, expressions) if expressions else None
    except ColumnMapError as err:
        raise DataValidationError(table, err.target, str(err)) from err
    out: dict[str, pd.Series] = {}
    for name in schema.columns:
        if evaluated is not None and name in evaluated.columns:
            out[name] = evaluated[name]
        elif name in mapping:
            out[name] = df[mapping[name]]
        elif name in df.columns:
            out[name] = df[name]
    return pd.DataFrame(out, index=df.index)


def _check_not_null(df: pd.DataFrame, kind: str, column: str) -> None:
    nulls = df[column].isna().to_numpy()
    if nulls.any():
        raise DataValidationError(
            kind, column, f"{int(nulls.sum()):,} null value(s)", df.loc[nulls]
        )


def _duplicated(frame: pd.DataFrame) -> np.ndarray:
    """``frame.duplicated(keep="first")`` as a boolean array, exact, through a row hash first.

    pandas' own factorizes every column and combines the codes (5.5 s for 12.6M interaction
    rows). Equal rows have equal 64-bit hashes, so only rows whose hash repeats can be
    duplicates; those few go through the exact check.
    """
    hashes = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    # repeated hashes from a sorted copy, then a hash lookup of every row in that small set:
    # 1.2 s for 12.6M rows against 2.0 s for a hash table over all of them
    ordered = np.sort(hashes)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if not len(repeated):
        return np.zeros(len(frame), dtype=bool)
    candidates = np.flatnonzero(pd.Index(repeated).get_indexer(hashes) >= 0)
    out = np.zeros(len(frame), dtype=bool)
    out[candidates] = frame.iloc[candidates].duplicated(keep="first").to_numpy()
    return out


DuplicatePolicy = Literal["drop", "keep", "error"]
MissingIdPolicy = Literal["error", "drop"]


@dataclass(frozen=True)
class LoadOptions:
    """How to read one user table: column map, formats and what to do with bad rows.

    Parameters
    ----------
    columns
        Rapport column name -> a column of the source or a DuckDB expression over its columns
        (``{"amount": "Quantity * UnitPrice"}``), or the CLI form ``"amount=Quantity*UnitPrice"``.
    timestamp_format
        A ``strftime`` format for ``timestamp`` when pandas cannot infer it (e.g. ``%Y%m%d``).
    decimal
        The decimal mark of text amounts: ``"."`` or ``","`` (``1.234,50``).
    duplicates
        Rows identical in every source column: ``"drop"`` (reported), ``"keep"`` or ``"error"``.
    missing_ids
        Rows without a customer id: ``"error"`` or ``"drop"`` (reported with their amount).
    currency
        The data's currency code, for reports.
    dayfirst
        Read ``01/02/2025`` as 1 February (True) or 2 January (False); None refuses dates
        whose order of day and month no value shows.
    encoding
        The text encoding of delimited files (``utf-8``, with or without a byte-order mark,
        by default; ``latin-1``, ``cp1252``, ...).
    """

    columns: str | Mapping[str, str] | None = None
    timestamp_format: str | None = None
    decimal: str = "."
    duplicates: DuplicatePolicy = "drop"
    missing_ids: MissingIdPolicy = "error"
    currency: str | None = None
    dayfirst: bool | None = None
    encoding: str = "utf-8"


def _missing_ids(ids: pd.Series) -> np.ndarray:
    """Null ids, and text ids that are empty or blank (exports write guests as "")."""
    missing = ids.isna().to_numpy().copy()
    if ids.dtype == object or isinstance(ids.dtype, pd.StringDtype):
        text = ids.astype("string").str.strip()
        missing |= (text == "").fillna(False).to_numpy(dtype=bool)
    return missing


def _rows_to_drop(
    df: pd.DataFrame,
    mapped: pd.DataFrame,
    amount: pd.Series | None,
    options: LoadOptions,
    table: str,
) -> tuple[np.ndarray, list[Dropped], int]:
    """Rows without an id and exact duplicates, as the options say: (mask, drops, kept dups)."""
    drops: list[Dropped] = []

    def total(rows: np.ndarray) -> float | None:
        return None if amount is None else float(amount.to_numpy()[rows].sum())

    missing = _missing_ids(mapped["customer_id"])
    if missing.any():
        if options.missing_ids == "error":
            raise DataValidationError(
                table,
                "customer_id",
                f"{int(missing.sum()):,} row(s) without a customer id (guests?); pass "
                "--missing-ids drop (missing_ids='drop') to drop them, counted",
                df.loc[missing],
            )
        drops.append(Dropped("missing_ids", "no customer id", int(missing.sum()), total(missing)))
    # Judged on every source column: two lines of one invoice with equal totals map to equal
    # contract rows and are still two purchases; only a row repeated in full is a duplicate.
    duplicated = _duplicated(df) & ~missing
    n_duplicated = int(duplicated.sum())
    if n_duplicated and options.duplicates == "error":
        raise DataValidationError(
            table,
            None,
            f"{n_duplicated:,} row(s) identical to an earlier row in every column",
            df.loc[duplicated],
        )
    if n_duplicated and options.duplicates == "drop":
        drops.append(
            Dropped(
                "duplicates",
                "identical to an earlier row in every column",
                n_duplicated,
                total(duplicated),
            )
        )
        return missing | duplicated, drops, 0
    return missing, drops, n_duplicated


def merge_order_lines(tx: pd.DataFrame) -> pd.DataFrame:
    """One row per order: lines of a (customer, ``order_id``) summed, at their first time.

    Rows without ``order_id`` (or without the column) are purchases each, as given. An order
    whose lines net below zero is a refund row, as a cancellation invoice is.
    """
    if "order_id" not in tx.columns:
        return tx
    has_order = tx["order_id"].notna().to_numpy()
    keys = tx.loc[has_order, ["customer_id", "order_id"]]
    if not keys.duplicated().any():
        return tx
    orders = (
        tx.loc[has_order]
        .groupby(["customer_id", "order_id"], sort=False, observed=True)
        .agg(timestamp=("timestamp", "min"), amount=("amount", "sum"))
        .reset_index()
    )
    merged = pd.concat([orders, tx.loc[~has_order]], ignore_index=True)
    return merged[list(tx.columns)]


def validate_table(
    df: pd.DataFrame,
    kind: TableKind,
    options: LoadOptions | None = None,
    *,
    name: str | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Check one event table against its contract and return it in canonical form.

    Parameters
    ----------
    df
        Raw table.
    kind
        ``"transactions"`` or ``"interactions"``.
    options
        Column map, formats and bad-row policies (:class:`LoadOptions`; defaults: no map,
        drop exact duplicates, refuse rows without an id).
    **kwargs
        :class:`LoadOptions` fields given one by one (``columns=...``), over ``options``.
    name
        The source's file name, for messages.

    Returns
    -------
    pandas.DataFrame
        Transactions: ``customer_id``, ``timestamp`` (``datetime64[us]``, naive UTC),
        ``amount`` (float64) and ``order_id`` if given, one row per order when it is.
        Interactions: ``customer_id``, ``timestamp``, ``channel`` and ``event`` (lower-case
        categoricals). Other columns are dropped. ``LoadReport.of(frame)`` reads the
        :class:`~rapport.features.load_report.LoadReport`; ``attrs["duplicates_dropped"]``
        the number of exact duplicates dropped.

    Raises
    ------
    DataValidationError
        Empty table, missing column, bad column map expression, null id (unless dropped),
        null or unparsable timestamp, non-numeric or infinite amount, null channel or event,
        duplicates under ``duplicates="error"``.
    """
    options = replace(options or LoadOptions(), **kwargs)
    schema = SCHEMAS[kind]
    table = f"{kind} ({name})" if name else kind
    if len(df) == 0:
        raise DataValidationError(table, None, "the table is empty (no rows)")
    mapped = _contract_columns(df, schema, parse_column_map(options.columns), table)
    missing = [c for c in schema.required if c not in mapped.columns]
    if missing:
        raise DataValidationError(
            table,
            missing[0],
            f"required column missing; columns present are {list(df.columns)} "
            "(map your names with a column map, e.g. customer_id=CustID)",
        )
    for column in schema.required[1:]:
        _check_not_null(mapped, table, column)
    out: dict[str, pd.Series] = {
        "customer_id": mapped["customer_id"],
        "timestamp": to_utc_naive(
            mapped, table, options.timestamp_format, dayfirst=options.dayfirst
        ),
    }
    amount = None
    if kind == "transactions":
        amount = out["amount"] = to_amount(mapped, table, options.decimal)
        if "order_id" in mapped.columns:
            out["order_id"] = mapped["order_id"]
    else:
        out["channel"] = to_label(mapped, "channel")
        out["event"] = to_label(mapped, "event")
    drop, drops, duplicates_kept = _rows_to_drop(df, mapped, amount, options, table)
    clean = pd.DataFrame(out, index=df.index).loc[~drop]
    rows_kept_lines = len(clean)
    clean = merge_order_lines(clean).reset_index(drop=True)
    report = LoadReport(
        table=table,
        rows_read=len(df),
        rows_kept=len(clean),
        dropped=tuple(drops),
        amount_read=None if amount is None else float(amount.sum()),
        amount_kept=None if amount is None else float(clean["amount"].sum()),
        lines_merged=rows_kept_lines - len(clean),
        duplicates_kept=duplicates_kept,
        currency=options.currency,
    )
    if drops:
        warnings.warn(report.line(), RowsDroppedWarning, stacklevel=2)
    clean.attrs = {
        "duplicates_dropped": report.rows_dropped("duplicates"),
        "validated": kind,
        ATTRS_KEY: report.to_attrs(),
    }
    return clean


def load_transactions(
    source: TableSource,
    options: LoadOptions | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Read and validate a transactions table (see :func:`validate_table` for the columns out).

    ``options`` or its fields as keywords (``columns={"amount": "Quantity * UnitPrice"}``,
    ``missing_ids="drop"``, ...) say how; a frame that is already valid passes through.
    """
    return _load(source, "transactions", options, kwargs)


def load_interactions(
    source: TableSource,
    options: LoadOptions | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Read and validate an interactions table (see :func:`validate_table` for the columns out)."""
    return _load(source, "interactions", options, kwargs)


def _load(
    source: TableSource, kind: TableKind, options: LoadOptions | None, kwargs: dict[str, Any]
) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame) and is_validated(source, kind) and not kwargs:
        return source
    options = replace(options or LoadOptions(), **kwargs)
    name = None if isinstance(source, pd.DataFrame) else Path(source).name
    mapping = parse_column_map(options.columns)
    ids = [mapping.get(c, c) for c in ("customer_id", "order_id")]
    raw = read_table(source, kind=kind, text_columns=tuple(ids), encoding=options.encoding)
    return validate_table(raw, kind, options, name=name)


def is_validated(df: pd.DataFrame, kind: TableKind) -> bool:
    """Whether ``df`` came out of :func:`validate_table` for ``kind`` and still looks like it."""
    schema = SCHEMAS[kind]
    return (
        df.attrs.get("validated") == kind
        and all(c in df.columns for c in schema.required)
        and df["timestamp"].dtype == np.dtype("datetime64[us]")
    )


#: Parquet key-value metadata marking a file Rapport wrote in a contract (validated and
#: deduplicated, times naive UTC, labels normalised): the value is the table kind.
CONTRACT_KEY = b"rapport.contract"


def contract_metadata(kind: TableKind) -> dict[bytes, bytes]:
    """Schema metadata to write on a Parquet file that holds ``kind`` rows in the contract."""
    return {CONTRACT_KEY: kind.encode()}


def is_contract_parquet(path: str | os.PathLike[str], kind: TableKind) -> bool:
    """Whether ``path`` is a Parquet file Rapport wrote in the ``kind`` contract.

    Only then may a reader scan it as it is. Any other file, a user's own Parquet included,
    goes through :func:`validate_table`: nothing in a file's schema shows duplicate rows,
    labels in other cases or times in another zone.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix != ".parquet" or not path.is_file():
        return False
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return False
    return metadata.get(CONTRACT_KEY) == kind.encode()
