"""Features from the grid's base aggregates: projected, scored and put into frames.

The grid (:mod:`rapport.features.grid`) aggregates every (customer, cutoff) in one pass over
the events; the features derive from those aggregates by the same SQL as the per-cutoff
queries, evaluated on numpy by :mod:`rapport.features.projection` and written straight into
a frame's blocks, or run by DuckDB where the evaluator refuses the SQL. The R, F, M and FM
scores and the segment are ranked within each cutoff here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from rapport.features import definitions as defs
from rapport.features import projection
from rapport.features.assembly import (
    BLOCK_TYPES,
    Stacker,
    block_layout,
    column_values,
    frame_of_blocks,
)
from rapport.features.duckdb_io import Input, arrow, bound
from rapport.features.segments import SCORED_FEATURES, SEGMENTS, rfm_scores

#: Rows per batch on the grid path: a projection streams, so batches can be bigger.
GRID_BATCH_ROWS = 4_000_000

_SCORES = ("r_score", "f_score", "m_score", "fm_score")

Blocks = dict[np.dtype, np.ndarray]
Slots = dict[str, tuple[np.dtype, int]]


def grid_feature_tables(
    tx: Input,
    ix: Input | None,
    spec: defs.FeatureSpec,
    cutoffs: Sequence[dt.date],
    connection: duckdb.DuckDBPyConnection | None,
    discover: bool = False,
    stack: bool = False,
) -> Iterator[tuple[pa.Table | pd.DataFrame, int]]:
    """Every cutoff from one pass over the events (:mod:`rapport.features.grid`).

    The base aggregates come from compiled kernels, the features from them by the same SQL;
    each table has the columns of :func:`~rapport.features.definitions.feature_columns` and
    comes with the rows of all tables together. With ``discover`` the interaction pairs are
    found as the grid reads the rows. With ``stack`` the batches are projected into one
    frame, yielded once: each batch writes its features into the result's blocks, where a
    frame per batch made and copied in took 2.3 GB a batch for 12 cutoffs at 10M.
    """
    from rapport.features.grid import gc_paused, grid_tables, small_pages

    unpacked = dataclasses.replace(spec, pack_counts=False)
    with bound(connection, cutoffs=[cutoffs[-1]], tx=tx, ix=ix) as con:
        features = _GridFeatures(con, stack)
        tables = grid_tables(
            con,
            unpacked,
            cutoffs,
            batch_rows=GRID_BATCH_ROWS,
            sources=(tx, ix),
            discover=discover,
        )
        while True:
            # 4 KiB pages and no cycle collection while the grid computes (see small_pages
            # and gc_paused), not while the caller runs
            with small_pages(), gc_paused():
                item = next(tables, None)
                if item is None:
                    break
                total_rows = item[1]
                batch = features.batch(*item)
                del item
            if batch is not None:
                yield batch, total_rows
            del batch  # before the next batch is computed
        frame = features.stacked()
        if frame is not None:
            yield frame, len(frame)


class _GridFeatures:
    """The features of the grid's batches, as frames or stacked into one.

    Each batch is projected on numpy; once the evaluator refuses one, it and (in a stacked
    result) every later batch run on DuckDB.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, stack: bool) -> None:
        self.con = con
        self.keep_order = con.execute(
            "SELECT current_setting('preserve_insertion_order')"
        ).fetchone()
        self.stack = stack
        self.stacker: Stacker | None = None
        self.projecting = True

    def batch(
        self, grid: pa.Table, total_rows: int, unpacked: defs.FeatureSpec
    ) -> pa.Table | pd.DataFrame | None:
        """The features of one grid batch; None once they are in the stacked result."""
        sql = defs.features_sql(unpacked, source="grid")
        columns = defs.feature_columns(unpacked)
        if self.stack and self.stacker is None and total_rows > grid.num_rows:
            self.stacker = Stacker(total_rows)
        try:
            if not self.projecting:
                raise projection.UnsupportedSQLError("a batch before went to DuckDB")
            # the same SQL on numpy arrays, written into the frame's blocks: DuckDB's
            # result conversion alone took as long as the whole evaluation here
            return grid_frame(sql, grid, columns, self.stacker)
        except projection.UnsupportedSQLError:
            pass
        table = duckdb_projection(self.con, sql, grid, self.keep_order)
        batch = with_scores(table).select(columns)
        del table
        if self.stacker is None:
            return batch
        # the stacked result keeps DuckDB's layout from here on
        self.projecting = False
        self.stacker.add(batch)
        return None

    def stacked(self) -> pd.DataFrame | None:
        """The stacked result once every batch is in; None when the batches came out."""
        stacker, self.stacker = self.stacker, None
        return None if stacker is None else stacker.frame()


def grid_frame(
    sql: str, grid: pa.Table, columns: list[str], into: Stacker | None = None
) -> pd.DataFrame | None:
    """The features of a grid batch as a frame of ``columns``, scores and segment included.

    :func:`rapport.features.projection.evaluate_columns` writes each numeric feature straight
    into its row of the 2-D block pandas keeps for its dtype, so every value is written once
    (through Arrow it was written twice more: DuckDB's result, then pandas' blocks). With
    ``into``, those are the blocks of the stacked result, at the rows after the batches
    before, and None comes back: no batch frame is made and copied.

    Raises
    ------
    rapport.features.projection.UnsupportedSQLError
        Where the evaluator refuses the SQL, or a feature comes out as no frame column can
        hold it (an integer with NULLs): run the query on DuckDB instead.
    """
    n = grid.num_rows
    at = 0 if into is None else into.done
    blocks: Blocks = {}
    slot: Slots = {}
    allocate = _allocator(columns, n, at, into, blocks, slot)
    computed = projection.evaluate_columns(sql, grid, source="grid", allocate=allocate)
    other = _unblocked_columns(computed, grid, set(columns), slot)
    inputs = {c: blocks[slot[c][0]][slot[c][1], at : at + n] for _, c, _ in SCORED_FEATURES}
    other.update(_scores_and_segment(grid.column("as_of").to_numpy(), inputs))
    if into is not None:
        into.add_rows(n, other)
        return None
    return frame_of_blocks(columns, n, blocks, slot, other)


def _allocator(
    columns: list[str], n: int, at: int, into: Stacker | None, blocks: Blocks, slot: Slots
) -> Callable[[dict[str, np.dtype]], dict[str, np.ndarray]]:
    """Where the evaluator writes each column: block rows for numeric features, else arrays.

    The blocks are new (no ``into``) or the stacked result's; ``blocks`` and ``slot`` are
    filled with them when the evaluator asks.
    """

    def allocate(dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
        numeric = {c: dtypes[c] for c in columns if c in dtypes and dtypes[c] in BLOCK_TYPES}
        if into is None:
            layout, places = block_layout(numeric, n)
        else:
            into.reserve({name: numeric.get(name) for name in columns})
            layout, places = into.blocks, into.slot
        blocks.update(layout)
        slot.update(places)
        return {
            name: blocks[slot[name][0]][slot[name][1], at : at + n]
            if name in slot
            else np.empty(n, dtype)
            for name, dtype in dtypes.items()
        }

    return allocate


def _unblocked_columns(
    computed: dict[str, projection.Column], grid: pa.Table, wanted: set[str], slot: Slots
) -> dict[str, Any]:
    """The wanted columns outside the blocks: kept grid columns and other computed ones.

    Raises
    ------
    rapport.features.projection.UnsupportedSQLError
        For NULLs in an integer feature, which no block can hold.
    """
    other: dict[str, Any] = {}
    for name, column in computed.items():
        if name not in wanted:
            continue
        if column.kept is not None:
            values = grid.column(column.kept)
            if name == "as_of":
                values = values.cast(pa.timestamp("us"))
            other[name] = column_values(values.to_pandas())
        elif name not in slot:
            other[name] = column_values(projection.arrow(column).to_pandas())
        elif column.null is not False:
            # a NULL double is NaN already (as pandas shows it); an integer has no such value
            data = column.data
            assert isinstance(data, np.ndarray)
            if data.dtype.kind != "f":
                raise projection.UnsupportedSQLError(f"NULLs in the integer feature {name}")
    return other


def _scores_and_segment(as_of: np.ndarray, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """The score columns (int32) and the segment (categorical) as frame columns."""
    scores = score_arrays(as_of, inputs)
    out: dict[str, Any] = {name: scores[name] for name in _SCORES}
    out["segment"] = pd.Categorical.from_codes(
        scores["segment"], categories=pd.Index(list(SEGMENTS))
    )
    return out


def duckdb_projection(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    grid: pa.Table,
    keep_order: tuple[Any, ...] | None,
) -> pa.Table:
    """The grid's feature projection run by DuckDB (for SQL the numpy evaluator refuses)."""
    from rapport.features.grid import widen_counts_sql

    con.register("grid_counts", grid)
    widened = widen_counts_sql(grid.schema, "grid_counts")
    con.execute(f"CREATE OR REPLACE TEMP VIEW grid AS {widened}")
    # the query is a projection: with insertion order kept, rows stay in grid order
    con.execute("SET preserve_insertion_order = true")
    try:
        return arrow(con.execute(sql))
    finally:
        con.execute(f"SET preserve_insertion_order = {bool(keep_order and keep_order[0])}")
        con.execute("DROP VIEW IF EXISTS grid")
        con.unregister("grid_counts")


def with_scores(table: pa.Table) -> pa.Table:
    """R, F, M, FM scores and segment, ranked within each cutoff of an ordered table."""
    as_of = table.column("as_of").to_numpy()
    inputs = {column: table.column(column).to_numpy() for _, column, _ in SCORED_FEATURES}
    scores = score_arrays(as_of, inputs)
    for name in _SCORES:
        table = table.append_column(name, pa.array(scores[name]))
    segment = pa.DictionaryArray.from_arrays(pa.array(scores["segment"]), pa.array(list(SEGMENTS)))
    return table.append_column("segment", segment)


def score_arrays(as_of: np.ndarray, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """R, F, M, FM scores (int32) and segment codes (int8), ranked within each cutoff.

    ``as_of`` is ordered; ``inputs`` holds the :data:`SCORED_FEATURES` columns.
    """
    bounds = np.flatnonzero(np.diff(as_of.astype("int64"))) + 1
    parts: dict[str, list[np.ndarray]] = {}
    for lo, hi in zip([0, *bounds], [*bounds, len(as_of)], strict=True):
        if hi == lo:  # no rows at all
            continue
        scores = rfm_scores({c: v[lo:hi] for c, v in inputs.items()})
        for name, values in scores.items():
            parts.setdefault(name, []).append(values)

    def joined(name: str, dtype: str) -> np.ndarray:
        if name not in parts:
            return np.zeros(0, dtype=dtype)
        return parts[name][0] if len(parts[name]) == 1 else np.concatenate(parts[name])

    scores = {name: joined(name, "int32") for name in _SCORES}
    return {**scores, "segment": joined("segment", "int8")}
