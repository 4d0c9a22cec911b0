"""Point-in-time features and labels per (customer, cutoff): the public API.

The definitions live in :mod:`rapport.features.definitions`. This module takes the inputs
and cutoffs and hands back pandas; the work is done by the modules named for each job:
:mod:`~rapport.features.duckdb_io` (the connection and the tables bound to it),
:mod:`~rapport.features.dispatch` (the grid or the feature SQL),
:mod:`~rapport.features.grid_features` (the grid's features, scores and segments) and
:mod:`~rapport.features.assembly` (pandas frames from the results).
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rapport.features import definitions as defs
from rapport.features import dispatch
from rapport.features.assembly import Stacker, to_frame, typed
from rapport.features.contracts import TableSource
from rapport.features.cutoffs import CutoffsLike, parse_cutoffs
from rapport.features.dispatch import GRID_MIN_ROW_CUTOFFS
from rapport.features.duckdb_io import (
    DEFAULT_MEMORY_LIMIT,
    Input,
    bind,
    bound,
    connect,
    discover_interaction_pairs,
    prepare_inputs,
    resolve_table,
    run,
)

__all__ = [
    "DEFAULT_MEMORY_LIMIT",
    "GRID_MIN_ROW_CUTOFFS",
    "CutoffsLike",
    "Input",
    "build_features",
    "build_labels",
    "connect",
    "discover_interaction_pairs",
    "iter_features",
    "parse_cutoffs",
    "stream_features",
    "stream_parquet",
    "write_features",
]


def build_features(
    transactions: TableSource,
    interactions: TableSource | None = None,
    *,
    as_of: CutoffsLike,
    windows: Sequence[int] = defs.DEFAULT_WINDOWS,
    interaction_pairs: Sequence[tuple[str, str]] | None = None,
    validate: bool = True,
    cutoff_batch: int | None = None,
    connection: duckdb.DuckDBPyConnection | None = None,
) -> pd.DataFrame:
    """Point-in-time RFM and interaction features per customer and cutoff.

    Nothing after a cutoff is read: a date cutoff includes that whole day, and an event on the
    next day changes nothing.

    Parameters
    ----------
    transactions
        DataFrame or path with ``customer_id``, ``timestamp``, ``amount`` (see
        :mod:`rapport.features.contracts`).
    interactions
        Optional DataFrame or path with ``customer_id``, ``timestamp``, ``channel``, ``event``.
    as_of
        One cutoff date or several (``"2024-01-31,2024-02-29"`` or a list): one row per
        (customer, cutoff).
    windows
        Window lengths in days for the windowed counts, sums and trends.
    interaction_pairs
        ``(channel, event)`` pairs to count; by default those present in ``interactions``.
        Pin them (a trained model does) to get the same columns on any data.
    validate
        Validate raw inputs (skipped for frames that came out of the loaders). With
        ``validate=False`` a Parquet path already in the contract is read directly (Arrow,
        or DuckDB's scan), never materialised in pandas: the fast path for large trusted data.
    cutoff_batch
        By default (``None``) every cutoff comes from one pass over the events
        (:mod:`rapport.features.grid`: the rows are read into Arrow, compiled kernels
        aggregate them, each event once whatever the number of cutoffs, and the features
        derive from those aggregates by the same SQL, evaluated on numpy by
        :mod:`rapport.features.projection`), unless event rows times cutoffs are below
        ``GRID_MIN_ROW_CUTOFFS``, where the feature SQL alone is faster and runs every
        cutoff in one query. A number runs the feature SQL alone, on that many cutoffs per
        query.
    connection
        A DuckDB connection to use (from :func:`connect`); a private one by default.

    Returns
    -------
    pandas.DataFrame
        ``customer_id``, ``as_of`` (``datetime64``), then the columns of
        :func:`rapport.features.definitions.feature_columns`: the BTYD summary
        (``frequency``, ``recency``, ``T``, ``monetary_value``), ``recency_days``,
        ``tenure_days``, ``n_purchases``, ``n_purchase_days``, ``total_spend``,
        ``avg_order_value``, ``spend_std``, ``ipt_mean_days``, ``ipt_std_days``,
        ``purchases_{W}d``, ``spend_{W}d``, ``purchases_trend_{W}d``, ``spend_trend_{W}d``;
        interaction columns when ``interactions`` is given; ``r_score``, ``f_score``,
        ``m_score``, ``fm_score`` and ``segment``. One row per customer whose first purchase
        is on or before the cutoff, ordered by ``as_of`` then ``customer_id``.
    """
    batches = dispatch.feature_tables(
        transactions,
        interactions,
        as_of=as_of,
        windows=windows,
        interaction_pairs=interaction_pairs,
        validate=validate,
        cutoff_batch=cutoff_batch,
        connection=connection,
        stack=True,
    )
    return typed(_stacked(batches))


def _stacked(batches: Iterator[tuple[pa.Table | pd.DataFrame, int | None]]) -> pd.DataFrame:
    """One frame of the feature batches, each batch freed as soon as it is copied in."""
    stacker: Stacker | None = None
    tables: list[pa.Table | pd.DataFrame] = []
    for table, total_rows in batches:
        if stacker is None and total_rows is not None and total_rows > len(table):
            # several batches of a known total: each is copied into the result and freed
            # before the next is computed, rather than all held until the end
            stacker = Stacker(total_rows)
        if stacker is not None:
            stacker.add(table)
        else:
            tables.append(table)
        del table  # the generator drops its reference when resumed: one batch alive at once
    if stacker is None:
        if len(tables) == 1:
            return to_frame(tables.pop())
        stacker = Stacker(sum(len(t) for t in tables))
        while tables:
            stacker.add(tables.pop(0))
    return stacker.frame()


def iter_features(
    transactions: TableSource,
    interactions: TableSource | None = None,
    *,
    as_of: CutoffsLike,
    windows: Sequence[int] = defs.DEFAULT_WINDOWS,
    interaction_pairs: Sequence[tuple[str, str]] | None = None,
    validate: bool = True,
    cutoff_batch: int | None = None,
    connection: duckdb.DuckDBPyConnection | None = None,
) -> Iterator[pd.DataFrame]:
    """:func:`build_features`, one batch of ``cutoff_batch`` cutoffs at a time.

    The frames come in cutoff order, with the columns and dtypes of :func:`build_features`, so a
    caller can write them out as they come and hold one batch in memory, not all of them.
    """
    for table, _ in dispatch.feature_tables(
        transactions,
        interactions,
        as_of=as_of,
        windows=windows,
        interaction_pairs=interaction_pairs,
        validate=validate,
        cutoff_batch=cutoff_batch,
        connection=connection,
    ):
        yield typed(to_frame(table))


def stream_features(
    transactions: TableSource,
    interactions: TableSource | None = None,
    *,
    as_of: dt.date | str,
    windows: Sequence[int] = defs.DEFAULT_WINDOWS,
    interaction_pairs: Sequence[tuple[str, str]] | None = None,
    validate: bool = True,
    chunk_rows: int = 100_000,
    connection: duckdb.DuckDBPyConnection | None = None,
) -> Iterator[pd.DataFrame]:
    """Features at one cutoff, ``chunk_rows`` customers at a time, in no particular order.

    The columns and values of :func:`build_features`; Python holds one chunk at a time while
    DuckDB keeps the query's working set inside its memory limit (spilling to disk), so
    batch scoring of millions of customers runs in memory bounded by the chunk size.
    """
    cutoffs = parse_cutoffs([as_of] if isinstance(as_of, dt.date) else as_of)
    if len(cutoffs) != 1:
        raise ValueError(f"stream_features takes one cutoff, got {len(cutoffs)}")
    tx, ix, spec = prepare_inputs(
        transactions,
        interactions,
        windows=windows,
        interaction_pairs=interaction_pairs,
        validate=validate,
    )
    columns = defs.feature_columns(spec)
    with bound(connection, cutoffs=cutoffs, tx=tx, ix=ix) as con:
        result = con.execute(defs.features_sql(spec, ordered=False))
        # to_arrow_reader is duckdb 1.5's name; 1.4 has only the one it deprecates
        fetch = getattr(result, "to_arrow_reader", None) or result.fetch_record_batch
        for batch in fetch(chunk_rows):
            out = batch.to_pandas()
            out["as_of"] = pd.to_datetime(out["as_of"]).astype("datetime64[us]")
            yield typed(out)[columns]


def write_features(frames: Iterable[pd.DataFrame], out: Path) -> tuple[int, pd.DataFrame]:
    """Stream feature batches into one Parquet file, atomically.

    Parameters
    ----------
    frames
        Batches from :func:`iter_features` (same columns and dtypes).
    out
        Target path; it appears only once every batch is written (a temporary file is
        renamed), so a failure never leaves a partial file.

    Returns
    -------
    (int, pandas.DataFrame)
        Rows written, and the last batch (it holds the latest cutoff, for summaries).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        rows, last = stream_parquet(frames, tmp, empty="no feature batches to write")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return rows, last


def stream_parquet(
    frames: Iterable[pd.DataFrame], path: Path, *, empty: str
) -> tuple[int, pd.DataFrame]:
    """Write ``frames`` one after another into one Parquet file at ``path``, as they come.

    Memory holds one frame. Later frames are cast to the first one's schema.

    Returns
    -------
    (int, pandas.DataFrame)
        Rows written, and the last frame.

    Raises
    ------
    ValueError
        With the message ``empty`` when there is no frame to write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    last = pd.DataFrame()
    writer: pq.ParquetWriter | None = None
    try:
        for frame in frames:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table.cast(writer.schema))
            rows += len(frame)
            last = frame
        if writer is None:
            raise ValueError(empty)
    finally:
        if writer is not None:
            writer.close()
    return rows, last


def build_labels(
    transactions: TableSource,
    *,
    as_of: CutoffsLike,
    horizon_days: int,
    validate: bool = True,
    allow_incomplete: bool = False,
    connection: duckdb.DuckDBPyConnection | None = None,
) -> pd.DataFrame:
    """Labels over the horizon after each cutoff, for the customers :func:`build_features` rows.

    Parameters
    ----------
    transactions
        DataFrame or path with ``customer_id``, ``timestamp``, ``amount``.
    as_of
        One or several cutoff dates.
    horizon_days
        ``H``: the labels look at days ``(as_of, as_of + H]``.
    validate
        Validate raw inputs (skipped for frames that came out of the loaders).
    allow_incomplete
        Allow a horizon that runs past the last transaction day (labels would be censored:
        everyone looks more churned than they are); refused by default.
    connection
        A DuckDB connection to use; a private one by default.

    Returns
    -------
    pandas.DataFrame
        ``customer_id``, ``as_of``, ``churned_{H}d`` (bool: no purchase in the horizon),
        ``future_spend_{H}d`` (float64, net), ``future_purchases_{H}d`` (int64).
    """
    cutoffs = parse_cutoffs(as_of)
    tx = resolve_table(transactions, "transactions", validate=validate)
    if not allow_incomplete:
        _check_horizon(tx, cutoffs, horizon_days)
    return to_frame(
        run(defs.labels_sql(horizon_days), cutoffs=cutoffs, tx=tx, connection=connection)
    )


def _check_horizon(tx: Input, cutoffs: Sequence[dt.date], horizon_days: int) -> None:
    """Refuse cutoffs whose horizon runs past the last transaction day (censored labels)."""
    if isinstance(tx, pd.DataFrame):
        last = tx["timestamp"].max()
    else:
        with connect() as con:
            bind(con, "tx", "transactions", tx)
            last = con.execute("SELECT MAX(timestamp) FROM tx").fetchone()[0]  # type: ignore[index]
    last_day = pd.Timestamp(last).date()
    late = [c for c in cutoffs if c + dt.timedelta(days=int(horizon_days)) > last_day]
    if late:
        raise ValueError(
            f"as_of {late[0]} + {horizon_days} days runs past the last transaction day "
            f"{last_day}: the labels would be censored. The latest cutoff with its whole "
            f"horizon in the data is {last_day - dt.timedelta(days=int(horizon_days))} "
            "(build_labels(..., allow_incomplete=True) accepts censored labels)"
        )
