"""Which engine computes the features: the grid's one pass, or the feature SQL per batch.

The grid (:mod:`rapport.features.grid_features`) is the default from
:data:`GRID_MIN_ROW_CUTOFFS` event rows times cutoffs on; below it, or with a cutoff batch
size, DuckDB runs the feature SQL, its window counts unpacked where a packed field overflows.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator, Sequence

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rapport.features import definitions as defs
from rapport.features import duckdb_io, grid_features
from rapport.features.contracts import TableSource
from rapport.features.cutoffs import CutoffsLike, parse_cutoffs
from rapport.features.duckdb_io import Input

#: Event rows times cutoffs from which the grid is the default engine. Its compiled kernels
#: cost about 0.6 s to import and load in a fresh process, which the feature SQL alone does
#: not spend. One cutoff, fresh processes, numba's import on the clock: 0.3M
#: transactions + 0.38M interactions, SQL 0.43-0.49 s against the grid 0.79-0.99 s; 0.6M +
#: 0.75M, 0.62-0.83 s against 0.67-1.02 s; 1M + 1.25M, 1.15-1.36 s against 0.82-1.07 s.
GRID_MIN_ROW_CUTOFFS = 2_000_000


def feature_tables(
    transactions: TableSource,
    interactions: TableSource | None,
    *,
    as_of: CutoffsLike,
    windows: Sequence[int],
    interaction_pairs: Sequence[tuple[str, str]] | None,
    validate: bool,
    cutoff_batch: int | None,
    connection: duckdb.DuckDBPyConnection | None,
    stack: bool = False,
) -> Iterator[tuple[pa.Table | pd.DataFrame, int | None]]:
    """The feature query's result, one batch of cutoffs at a time (Arrow; a frame from the grid).

    With ``stack`` the grid projects its batches into one frame, yielded once.

    Each batch comes with the rows of all batches together where that is known before the
    first (the grid's), ``None`` where it is not (the SQL's).
    """
    cutoffs = parse_cutoffs(as_of)
    tx, ix, spec = duckdb_io.prepare_inputs(
        transactions,
        interactions,
        windows=windows,
        interaction_pairs=interaction_pairs,
        validate=validate,
        discover=False,
    )
    discover = ix is not None and interaction_pairs is None
    if cutoff_batch is None:
        if row_cutoffs(tx, ix, cutoffs) >= GRID_MIN_ROW_CUTOFFS:
            yield from grid_features.grid_feature_tables(
                tx, ix, spec, cutoffs, connection, discover, stack
            )
            return
        cutoff_batch = len(cutoffs)  # small enough for one query
    if discover:
        assert ix is not None
        pairs = duckdb_io.discover_interaction_pairs(ix)
        spec = dataclasses.replace(spec, interaction_pairs=pairs)
        if not spec.interaction_pairs:
            ix = None
    for batch in _batches(cutoffs, cutoff_batch):
        yield _sql_features(spec, batch, tx, ix, connection), None


def _batches(cutoffs: Sequence[dt.date], size: int) -> Iterator[Sequence[dt.date]]:
    """``cutoffs`` in consecutive batches of ``size``."""
    for start in range(0, len(cutoffs), size):
        yield cutoffs[start : start + size]


def _sql_features(
    spec: defs.FeatureSpec,
    cutoffs: Sequence[dt.date],
    tx: Input,
    ix: Input | None,
    connection: duckdb.DuckDBPyConnection | None,
) -> pa.Table:
    """The features at ``cutoffs`` by the feature SQL, in the columns of the spec."""
    try:
        # DuckDB sorts: gathering a wide Arrow or pandas result into order took 2.5 s
        # for 1.5M rows, ten times its ORDER BY
        sql = defs.features_sql(spec)
        table = duckdb_io.run(sql, cutoffs=cutoffs, tx=tx, ix=ix, connection=connection)
    except (duckdb.ConversionException, duckdb.OutOfRangeException):
        # A window count too large for its packed field (over 2 million events of one
        # kind for one customer): count every window in its own integer instead.
        unpacked = dataclasses.replace(spec, pack_counts=False)
        sql = defs.features_sql(unpacked)
        table = duckdb_io.run(sql, cutoffs=cutoffs, tx=tx, ix=ix, connection=connection)
    return table.select(defs.feature_columns(spec))


def row_cutoffs(tx: Input, ix: Input | None, cutoffs: Sequence[dt.date]) -> int:
    """Event rows (transactions and interactions) times cutoffs: the work either engine does.

    Parquet row counts come from the files' footers, without reading any rows.
    """

    def rows(table: Input) -> int:
        if isinstance(table, pd.DataFrame):
            return len(table)
        files = sorted(table.glob("*.parquet")) if table.is_dir() else [table]
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)

    return (rows(tx) + (0 if ix is None else rows(ix))) * len(cutoffs)
