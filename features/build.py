"""Point-in-time features and labels per (customer, cutoff), computed by DuckDB.

The definitions live in :mod:`rapport.features.definitions`; this module validates inputs,
registers them with an embedded DuckDB connection, runs the queries and hands back pandas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rapport.features import definitions as defs
from rapport.features import projection
from rapport.features.contracts import (
    SCHEMAS,
    DataValidationError,
    TableKind,
    TableSource,
    is_validated,
    read_table,
    validate_table,
)
from rapport.features.segments import SCORED_FEATURES, SEGMENTS, rfm_scores

try:  # pandas >= 2.3: a frame from ready-made blocks, without the constructor's consolidation
    from pandas.api.internals import create_dataframe_from_blocks as _from_blocks
except ImportError:  # pragma: no cover - older pandas
    _from_blocks = None

#: DuckDB's working-memory budget unless a caller sets one (``RAPPORT_DUCKDB_MEMORY_LIMIT``).
DEFAULT_MEMORY_LIMIT = "2GB"

CutoffsLike = str | dt.date | pd.Timestamp | np.datetime64 | Iterable[str | dt.date | pd.Timestamp]


def parse_cutoffs(as_of: CutoffsLike) -> list[dt.date]:
    """Turn one or several cutoffs into sorted unique dates.

    Parameters
    ----------
    as_of
        A date, a ``YYYY-MM-DD`` string, a comma-separated string of them, or an iterable.
        A datetime must be midnight: cutoffs are whole days (a date includes that whole day).

    Returns
    -------
    list of datetime.date
    """
    if isinstance(as_of, str):
        items: list[Any] = [part.strip() for part in as_of.split(",") if part.strip()]
    elif isinstance(as_of, dt.date | pd.Timestamp | np.datetime64):
        items = [as_of]
    else:
        items = list(as_of)
    if not items:
        raise ValueError("as_of must name at least one cutoff date")
    dates = []
    for item in items:
        try:
            ts = pd.Timestamp(item)
        except (ValueError, TypeError) as err:
            raise ValueError(f"as_of: {item!r} is not a date (use YYYY-MM-DD)") from err
        if ts.tzinfo is not None:
            ts = ts.tz_convert("UTC").tz_localize(None)
        if ts != ts.normalize():
            raise ValueError(
                f"as_of: {item!r} has a time of day; cutoffs are whole days (a date cutoff "
                "includes that whole day)"
            )
        dates.append(ts.date())
    return sorted(set(dates))


def connect(
    *, threads: int | None = None, memory_limit: str | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection set up for Rapport.

    ``TimeZone`` is UTC on every connection: with timezone-aware input and a non-UTC session,
    cutoff comparisons silently moved rows across days.
    """
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    # Insertion order is meaningless for aggregates; dropping it saves memory on big inputs.
    con.execute("SET preserve_insertion_order = false")
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    # DuckDB defaults to 80% of RAM; a fixed budget makes big aggregations spill to disk
    # instead, so peak memory stays bounded whatever the input size.
    con.execute(f"SET memory_limit = '{memory_limit or DEFAULT_MEMORY_LIMIT}'")
    # One spill directory per connection: DuckDB names its spill files alike in every process
    # and deletes the directory it created when it closes, so a shared directory let
    # concurrent Rapport processes read each other's spill files or lose theirs mid-query.
    spill = Path(tempfile.gettempdir()) / f"rapport_duckdb_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    con.execute(f"SET temp_directory = '{spill}'")
    return con


Input = pd.DataFrame | Path


def _is_parquet(source: object) -> bool:
    if isinstance(source, pd.DataFrame):
        return False
    path = Path(source)  # type: ignore[arg-type]
    return path.is_dir() or path.suffix.lower() in (".parquet", ".pq")


def _table(source: TableSource, kind: TableKind, *, validate: bool) -> Input:
    """Validated frame, or (trusted fast path) a Parquet path that DuckDB scans directly."""
    if not validate and _is_parquet(source):
        path = Path(source)  # type: ignore[arg-type]
        if not path.exists():
            raise DataValidationError(kind, None, f"file not found: {path}")
        return path
    df = read_table(source, kind=kind)
    if validate and not is_validated(df, kind):
        return validate_table(df, kind)
    missing = [c for c in SCHEMAS[kind].required if c not in df.columns]
    if missing:
        raise DataValidationError(kind, missing[0], "required column missing")
    return df


def _bind(con: duckdb.DuckDBPyConnection, name: str, kind: TableKind, table: Input) -> None:
    if isinstance(table, pd.DataFrame):
        con.register(name, table)
        return
    columns = ", ".join(SCHEMAS[kind].required)
    glob = str(table / "*.parquet") if table.is_dir() else str(table)
    quoted = glob.replace("'", "''")
    con.execute(
        f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT {columns} FROM read_parquet('{quoted}')"
    )


def _unbind(con: duckdb.DuckDBPyConnection, name: str, table: Input) -> None:
    if isinstance(table, pd.DataFrame):
        con.unregister(name)
    else:
        con.execute(f"DROP VIEW IF EXISTS {name}")


def _align_ids(tx: pd.DataFrame, ix: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Give both tables the same ``customer_id`` type so the join never silently misses."""
    tx_num = pd.api.types.is_numeric_dtype(tx["customer_id"].dtype)
    ix_num = pd.api.types.is_numeric_dtype(ix["customer_id"].dtype)
    if tx_num == ix_num:
        return tx, ix
    tx = tx.assign(customer_id=tx["customer_id"].astype("string"))
    ix = ix.assign(customer_id=ix["customer_id"].astype("string"))
    return tx, ix


def discover_interaction_pairs(interactions: Input) -> tuple[tuple[str, str], ...]:
    """The distinct ``(channel, event)`` pairs of an interactions table, sorted."""
    if isinstance(interactions, pd.DataFrame):
        pairs = interactions.groupby(["channel", "event"], observed=True).size()
        return defs.discover_pairs([(str(c), str(e)) for c, e in pairs.index])
    with connect() as con:
        _bind(con, "ix", "interactions", interactions)
        rows = con.execute(defs.DISTINCT_PAIRS_SQL).fetchall()
    return defs.discover_pairs(rows)


@contextlib.contextmanager
def _bound(
    connection: duckdb.DuckDBPyConnection | None,
    *,
    cutoffs: Sequence[dt.date],
    tx: Input,
    ix: Input | None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection with ``tx``, ``ix`` and the ``cutoffs`` table bound, for one query.

    Everything is unbound afterwards, and the connection closed when it was opened here.
    """
    con = connection or connect()
    _bind(con, "tx", "transactions", tx)
    if ix is not None:
        _bind(con, "ix", "interactions", ix)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE cutoffs AS SELECT CAST(UNNEST($dates) AS DATE) AS as_of",
        {"dates": [d.isoformat() for d in cutoffs]},
    )
    try:
        yield con
    finally:
        _unbind(con, "tx", tx)
        if ix is not None:
            _unbind(con, "ix", ix)
        con.execute("DROP TABLE IF EXISTS cutoffs")
        if connection is None:
            con.close()


def _prepare(
    transactions: TableSource,
    interactions: TableSource | None,
    *,
    windows: Sequence[int],
    interaction_pairs: Sequence[tuple[str, str]] | None,
    validate: bool,
    discover: bool = True,
) -> tuple[Input, Input | None, defs.FeatureSpec]:
    """Inputs ready to bind, and the spec: interaction pairs discovered unless pinned.

    With ``discover=False`` pairs that are not pinned are left to find (the spec has none,
    the interactions stay): the grid finds them as it reads the rows.
    """
    tx = _table(transactions, "transactions", validate=validate)
    ix = None if interactions is None else _table(interactions, "interactions", validate=validate)
    pairs: Sequence[tuple[str, str]] = ()
    if ix is not None:
        if isinstance(tx, pd.DataFrame) and isinstance(ix, pd.DataFrame):
            tx, ix = _align_ids(tx, ix)
        if interaction_pairs is None and not discover:
            return tx, ix, defs.FeatureSpec(windows=tuple(windows), interaction_pairs=())
        pairs = discover_interaction_pairs(ix) if interaction_pairs is None else interaction_pairs
        if not pairs:
            ix = None
    return tx, ix, defs.FeatureSpec(windows=tuple(windows), interaction_pairs=tuple(pairs))


def _typed(out: pd.DataFrame) -> pd.DataFrame:
    """The text columns as :func:`build_features` types them."""
    out["segment"] = pd.Categorical(out["segment"], categories=list(SEGMENTS))
    if "preferred_channel" in out.columns:
        out["preferred_channel"] = out["preferred_channel"].astype("string")
    return out


def _run(
    sql: str,
    *,
    cutoffs: Sequence[dt.date],
    tx: Input,
    ix: Input | None = None,
    connection: duckdb.DuckDBPyConnection | None = None,
) -> pa.Table:
    """Run one query; its result as Arrow, ``as_of`` as a timestamp."""
    with _bound(connection, cutoffs=cutoffs, tx=tx, ix=ix) as con:
        return _arrow(con.execute(sql))


def _arrow(result: duckdb.DuckDBPyConnection) -> pa.Table:
    """A query's whole result as Arrow, ``as_of`` as a timestamp."""
    # to_arrow_table from duckdb 1.5 on; fetch_arrow_table (deprecated there) before
    fetch = getattr(result, "to_arrow_table", None) or result.fetch_arrow_table
    table = fetch()
    as_of = table.schema.get_field_index("as_of")
    return table.set_column(as_of, "as_of", table.column(as_of).cast(pa.timestamp("us")))


def _frame(table: pa.Table | pd.DataFrame) -> pd.DataFrame:
    """An ordinary pandas frame holding ``table``, whose buffers are released as it converts.

    Columns are consolidated into 2-D blocks: 1.5M x 72 converted in 1.0 s against 2.1 s one
    block per column. A frame (the grid's batches) is one already.
    """
    if isinstance(table, pd.DataFrame):
        return table
    return _own_text(table).to_pandas(self_destruct=True)


def _own_text(table: pa.Table) -> pa.Table:
    """``table`` with its text columns copied into buffers of their own.

    pandas keeps Arrow-backed text as it is, and DuckDB frees a result's memory only when
    every column of a batch is released: one text column in a frame (``preferred_channel``,
    text ids) kept the whole result alive, 0.8 GB beside a 0.8 GB frame at 1.5M customers.
    """
    for i, field in enumerate(table.schema):
        kind = field.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
            chunks = table.column(i).chunks
            own = [pa.concat_arrays(chunks)] if chunks else []  # concat_arrays always copies
            table = table.set_column(i, field, pa.chunked_array(own, type=kind))
    return table


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
    stacker: _Stacker | None = None
    tables: list[pa.Table | pd.DataFrame] = []
    for table, total_rows in _feature_tables(
        transactions,
        interactions,
        as_of=as_of,
        windows=windows,
        interaction_pairs=interaction_pairs,
        validate=validate,
        cutoff_batch=cutoff_batch,
        connection=connection,
        stack=True,
    ):
        if stacker is None and total_rows is not None and total_rows > len(table):
            # several batches of a known total: each is copied into the result and freed
            # before the next is computed, rather than all held until the end
            stacker = _Stacker(total_rows)
        if stacker is not None:
            stacker.add(table)
        else:
            tables.append(table)
        del table  # the generator drops its reference when resumed: one batch alive at once
    if stacker is None:
        if len(tables) == 1:
            return _typed(_frame(tables.pop()))
        stacker = _Stacker(sum(len(t) for t in tables))
        while tables:
            stacker.add(tables.pop(0))
    return _typed(stacker.frame())


class _Stacker:
    """One frame from feature batches, each value copied once, each batch freed once copied.

    The frame's numeric columns (integers, floats, timestamps) are allocated up front as the
    2-D blocks a pandas frame keeps, one per dtype, and each batch's Arrow chunks are copied
    straight into them (or, from the grid, its features are projected into them: see
    :meth:`reserve`); text and categories are converted per batch and joined at the end.
    The blocks become the frame as they are (``create_dataframe_from_blocks``): no
    consolidation copy. Before, every batch was held until the last was out and the frame
    assembled beside them, and a frame built from separate columns is consolidated (copied)
    again: 12 cutoffs at 10M peaked at 14.9 GB for an 8 GB frame.
    """

    def __init__(self, total_rows: int) -> None:
        self.total_rows = total_rows
        self.done = 0
        self.names: list[str] = []
        self.blocks: dict[np.dtype, np.ndarray] = {}
        self.slot: dict[str, tuple[np.dtype, int]] = {}  # numeric column -> (block, row)
        self.other: dict[str, list[pd.Series]] = {}

    def _allocate(self, schema: pa.Schema) -> None:
        dtypes: dict[str, np.dtype | None] = {}
        for field in schema:
            kind = field.type
            if pa.types.is_integer(kind) or pa.types.is_floating(kind):
                dtypes[field.name] = np.dtype(kind.to_pandas_dtype())
            elif pa.types.is_timestamp(kind) and kind.tz is None:
                dtypes[field.name] = np.dtype(f"datetime64[{kind.unit}]")
            else:
                dtypes[field.name] = None
        self._allocate_for(dtypes)

    def _allocate_for(self, dtypes: dict[str, np.dtype | None]) -> None:
        """Blocks for the columns with a dtype; the others (None) are joined at the end."""
        self.names = list(dtypes)
        self.other = {name: [] for name, dtype in dtypes.items() if dtype is None}
        self.blocks, self.slot = _block_layout(
            {name: dtype for name, dtype in dtypes.items() if dtype is not None}, self.total_rows
        )

    def add(self, table: pa.Table) -> None:
        """Copy ``table`` into the result, its rows after the previous batch's."""
        if not self.names:
            self._allocate(table.schema)
        if table.column_names != self.names:
            raise ValueError(f"feature batches differ in columns: {table.column_names}")
        table = _own_text(table)
        if self.done + table.num_rows > self.total_rows:
            raise ValueError(f"feature batches hold more than the {self.total_rows} rows expected")
        for name in self.names:
            column = table.column(name)
            if name in self.other:
                self.other[name].append(column.to_pandas())
                continue
            dtype, row = self.slot[name]
            if column.null_count and dtype.kind in "iu":
                # an integer column with nulls would be floats with NaN (as to_pandas makes
                # it); no feature column is one, so this is a broken invariant, not data
                raise ValueError(f"feature column {name!r} has nulls in an integer type")
            target, at = self.blocks[dtype][row], self.done
            for chunk in column.chunks:
                # a chunk without nulls is a view: each value is copied once, into the frame
                target[at : at + len(chunk)] = chunk.to_numpy(zero_copy_only=False)
                at += len(chunk)
        self.done += table.num_rows

    def reserve(self, dtypes: dict[str, np.dtype | None]) -> None:
        """Blocks for these columns (None: joined at the end) unless an earlier batch made them.

        For batches that write their numeric columns into :attr:`blocks` themselves, at the
        rows from :attr:`done` (then :meth:`add_rows`).
        """
        if not self.names:
            self._allocate_for(dtypes)
            return
        same = list(dtypes) == self.names and all(
            (self.slot[name][0] == dtype) if name in self.slot else dtype is None
            for name, dtype in dtypes.items()
        )
        if not same:
            raise ValueError(f"feature batches differ in columns or types: {dtypes}")

    def add_rows(self, n: int, other: dict[str, Any]) -> None:
        """Count ``n`` rows written into the blocks, with the values of the other columns."""
        if self.done + n > self.total_rows:
            raise ValueError(f"feature batches hold more than the {self.total_rows} rows expected")
        if set(other) != set(self.other):
            raise ValueError(f"feature batches differ in columns: {sorted(other)}")
        for name, values in other.items():
            self.other[name].append(pd.Series(values))
        self.done += n

    def frame(self) -> pd.DataFrame:
        """The stacked frame, once every batch is in."""
        if self.done != self.total_rows:
            raise ValueError(f"feature batches hold {self.done} rows, {self.total_rows} expected")
        other = {
            name: _column_values(pd.concat(parts, ignore_index=True))
            for name, parts in self.other.items()
        }
        frame = _frame_of_blocks(self.names, self.total_rows, self.blocks, self.slot, other)
        self.blocks, self.other = {}, {}
        return frame


def _block_layout(
    dtypes: dict[str, np.dtype], n: int
) -> tuple[dict[np.dtype, np.ndarray], dict[str, tuple[np.dtype, int]]]:
    """2-D blocks of ``n`` rows, one per dtype, and each column's (dtype, row) in them.

    The blocks are untouched until written: their pages are taken as the values come in.
    """
    slot: dict[str, tuple[np.dtype, int]] = {}
    sizes: dict[np.dtype, int] = {}
    for name, dtype in dtypes.items():
        slot[name] = (dtype, sizes.get(dtype, 0))
        sizes[dtype] = sizes.get(dtype, 0) + 1
    return {dtype: np.empty((k, n), dtype) for dtype, k in sizes.items()}, slot


def _frame_of_blocks(
    names: list[str],
    n: int,
    blocks: dict[np.dtype, np.ndarray],
    slot: dict[str, tuple[np.dtype, int]],
    other: dict[str, Any],
) -> pd.DataFrame:
    """A frame of ``names`` without copying its columns.

    Numeric columns are rows of ``blocks`` (``slot``: column -> (block dtype, row)), the
    others 1-D arrays (numpy or extension) in ``other``.
    """
    position = {name: i for i, name in enumerate(names)}
    placed: list[tuple[Any, np.ndarray]] = []
    for dtype, block in blocks.items():
        rows = sorted((row, position[name]) for name, (d, row) in slot.items() if d == dtype)
        placed.append((block, np.array([p for _, p in rows], dtype=np.intp)))
    for name, values in other.items():
        # a numpy column is a block of one row
        block = values.reshape(1, -1) if isinstance(values, np.ndarray) else values
        placed.append((block, np.array([position[name]], dtype=np.intp)))
    index, columns = pd.RangeIndex(n), pd.Index(names)
    if _from_blocks is not None:
        return _from_blocks(placed, index=index, columns=columns)
    # pandas before create_dataframe_from_blocks: consolidated by the constructor (a copy)
    out = {}
    for values, places in placed:
        for i, p in enumerate(places):
            out[names[p]] = values[i] if isinstance(values, np.ndarray) else values
    return pd.DataFrame(out, index=index, columns=columns)


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
    for table, _ in _feature_tables(
        transactions,
        interactions,
        as_of=as_of,
        windows=windows,
        interaction_pairs=interaction_pairs,
        validate=validate,
        cutoff_batch=cutoff_batch,
        connection=connection,
    ):
        yield _typed(_frame(table))


def _feature_tables(
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
    tx, ix, spec = _prepare(
        transactions,
        interactions,
        windows=windows,
        interaction_pairs=interaction_pairs,
        validate=validate,
        discover=False,
    )
    discover = ix is not None and interaction_pairs is None
    if cutoff_batch is None:
        if _row_cutoffs(tx, ix, cutoffs) >= GRID_MIN_ROW_CUTOFFS:
            yield from _grid_feature_tables(tx, ix, spec, cutoffs, connection, discover, stack)
            return
        cutoff_batch = len(cutoffs)  # small enough for one query
    if discover:
        assert ix is not None
        spec = dataclasses.replace(spec, interaction_pairs=discover_interaction_pairs(ix))
        if not spec.interaction_pairs:
            ix = None
    columns = defs.feature_columns(spec)
    size = cutoff_batch
    done = 0
    while done < len(cutoffs):
        batch = cutoffs[done : done + size]
        try:
            # DuckDB sorts: gathering a wide Arrow or pandas result into order took 2.5 s
            # for 1.5M rows, ten times its ORDER BY
            sql = defs.features_sql(spec)
            table = _run(sql, cutoffs=batch, tx=tx, ix=ix, connection=connection)
        except (duckdb.ConversionException, duckdb.OutOfRangeException):
            # A window count too large for its packed field (over 2 million events of one
            # kind for one customer): count every window in its own integer instead.
            unpacked = dataclasses.replace(spec, pack_counts=False)
            sql = defs.features_sql(unpacked)
            table = _run(sql, cutoffs=batch, tx=tx, ix=ix, connection=connection)
        done += len(batch)
        yield table.select(columns), None
        del table


def _grid_feature_tables(
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
    frame per batch was made and copied in (2.3 GB a batch for 12 cutoffs at 10M).
    """
    from rapport.features.grid import gc_paused, grid_tables, small_pages

    unpacked = dataclasses.replace(spec, pack_counts=False)
    with _bound(connection, cutoffs=[cutoffs[-1]], tx=tx, ix=ix) as con:
        keep_order = con.execute("SELECT current_setting('preserve_insertion_order')").fetchone()
        tables = grid_tables(
            con,
            unpacked,
            cutoffs,
            batch_rows=GRID_BATCH_ROWS,
            sources=(tx, ix),
            discover=discover,
        )
        stacker: _Stacker | None = None
        projecting = True
        while True:
            batch: pa.Table | pd.DataFrame | None
            # 4 KiB pages and no cycle collection while the grid computes (see small_pages
            # and gc_paused), not while the caller runs
            with small_pages(), gc_paused():
                item = next(tables, None)
                if item is None:
                    break
                grid, total_rows, unpacked = item
                del item
                sql = defs.features_sql(unpacked, source="grid")
                columns = defs.feature_columns(unpacked)
                if stack and stacker is None and total_rows > grid.num_rows:
                    stacker = _Stacker(total_rows)
                try:
                    if not projecting:
                        raise projection.UnsupportedSQLError("a batch before went to DuckDB")
                    # the same SQL on numpy arrays, written into the frame's blocks: DuckDB's
                    # result conversion alone took as long as the whole evaluation here
                    batch = _grid_frame(sql, grid, columns, stacker)
                except projection.UnsupportedSQLError:
                    table = _duckdb_projection(con, sql, grid, keep_order)
                    batch = _with_scores(table).select(columns)
                    del table
                    if stacker is not None:
                        # the stacked result keeps DuckDB's layout from here on
                        projecting = False
                        stacker.add(batch)
                        batch = None
                del grid
            if batch is not None:
                yield batch, total_rows
            del batch  # before the next batch is computed
        if stacker is not None:
            frame = stacker.frame()
            del stacker
            yield frame, len(frame)


def _grid_frame(
    sql: str, grid: pa.Table, columns: list[str], into: _Stacker | None = None
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
    blocks: dict[np.dtype, np.ndarray] = {}
    slot: dict[str, tuple[np.dtype, int]] = {}
    at = 0 if into is None else into.done
    wanted = set(columns)

    def allocate(dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
        numeric = {c: dtypes[c] for c in columns if c in dtypes and dtypes[c] in _BLOCK_TYPES}
        if into is None:
            layout, places = _block_layout(numeric, n)
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

    computed = projection.evaluate_columns(sql, grid, source="grid", allocate=allocate)
    other: dict[str, Any] = {}
    for name, column in computed.items():
        if name not in wanted:
            continue
        if column.kept is not None:
            values = grid.column(column.kept)
            if name == "as_of":
                values = values.cast(pa.timestamp("us"))
            other[name] = _column_values(values.to_pandas())
        elif name not in slot:
            other[name] = _column_values(projection.arrow(column).to_pandas())
        elif column.null is not False:
            # a NULL double is NaN already (as pandas shows it); an integer has no such value
            data = column.data
            assert isinstance(data, np.ndarray)
            if data.dtype.kind != "f":
                raise projection.UnsupportedSQLError(f"NULLs in the integer feature {name}")
    as_of = grid.column("as_of").to_numpy()
    inputs = {c: blocks[slot[c][0]][slot[c][1], at : at + n] for _, c, _ in SCORED_FEATURES}
    scores = _score_arrays(as_of, inputs)
    for name in ("r_score", "f_score", "m_score", "fm_score"):
        other[name] = scores[name]
    other["segment"] = pd.Categorical.from_codes(
        scores["segment"], categories=pd.Index(list(SEGMENTS))
    )
    if into is not None:
        into.add_rows(n, other)
        return None
    return _frame_of_blocks(columns, n, blocks, slot, other)


def _column_values(series: pd.Series) -> Any:
    """What a frame block holds for ``series``: a numpy array, or its extension array.

    Arrays read-only on Arrow's buffers are copied: the frame must take writes.
    """
    if not isinstance(series.dtype, np.dtype):
        return series.array
    values = series.to_numpy()
    return values if values.flags.writeable else values.copy()


#: Feature dtypes the grid frame keeps in 2-D blocks.
_BLOCK_TYPES = (np.dtype(np.int64), np.dtype(np.float64))


def _duckdb_projection(
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
        return _arrow(con.execute(sql))
    finally:
        con.execute(f"SET preserve_insertion_order = {bool(keep_order and keep_order[0])}")
        con.execute("DROP VIEW IF EXISTS grid")
        con.unregister("grid_counts")


#: Rows per batch on the grid path: a projection streams, so batches can be bigger.
GRID_BATCH_ROWS = 4_000_000

#: Event rows times cutoffs from which the grid is the default engine. Its compiled kernels
#: cost about 0.6 s to import and load in a fresh process, which the feature SQL alone does
#: not spend. One cutoff, fresh processes, numba's import on the clock: 0.3M
#: transactions + 0.38M interactions, SQL 0.43-0.49 s against the grid 0.79-0.99 s; 0.6M +
#: 0.75M, 0.62-0.83 s against 0.67-1.02 s; 1M + 1.25M, 1.15-1.36 s against 0.82-1.07 s.
GRID_MIN_ROW_CUTOFFS = 2_000_000


def _row_cutoffs(tx: Input, ix: Input | None, cutoffs: Sequence[dt.date]) -> int:
    """Event rows (transactions and interactions) times cutoffs: the work either engine does.

    Parquet row counts come from the files' footers, without reading any rows.
    """

    def rows(table: Input) -> int:
        if isinstance(table, pd.DataFrame):
            return len(table)
        files = sorted(table.glob("*.parquet")) if table.is_dir() else [table]
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)

    return (rows(tx) + (0 if ix is None else rows(ix))) * len(cutoffs)


def _with_scores(table: pa.Table) -> pa.Table:
    """R, F, M, FM scores and segment, ranked within each cutoff of an ordered table."""
    as_of = table.column("as_of").to_numpy()
    inputs = {column: table.column(column).to_numpy() for _, column, _ in SCORED_FEATURES}
    scores = _score_arrays(as_of, inputs)
    for name in ("r_score", "f_score", "m_score", "fm_score"):
        table = table.append_column(name, pa.array(scores[name]))
    segment = pa.DictionaryArray.from_arrays(pa.array(scores["segment"]), pa.array(list(SEGMENTS)))
    return table.append_column("segment", segment)


def _score_arrays(as_of: np.ndarray, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
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

    scores = {name: joined(name, "int32") for name in ("r_score", "f_score", "m_score", "fm_score")}
    return {**scores, "segment": joined("segment", "int8")}


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
    tx, ix, spec = _prepare(
        transactions,
        interactions,
        windows=windows,
        interaction_pairs=interaction_pairs,
        validate=validate,
    )
    columns = defs.feature_columns(spec)
    with _bound(connection, cutoffs=cutoffs, tx=tx, ix=ix) as con:
        result = con.execute(defs.features_sql(spec, ordered=False))
        # to_arrow_reader is duckdb 1.5's name; 1.4 has only the one it deprecates
        fetch = getattr(result, "to_arrow_reader", None) or result.fetch_record_batch
        for batch in fetch(chunk_rows):
            out = batch.to_pandas()
            out["as_of"] = pd.to_datetime(out["as_of"]).astype("datetime64[us]")
            yield _typed(out)[columns]


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
    rows = 0
    last = pd.DataFrame()
    writer: pq.ParquetWriter | None = None
    try:
        for frame in frames:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table.cast(writer.schema))
            rows += len(frame)
            last = frame
        if writer is None:
            raise ValueError("no feature batches to write")
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
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
    tx = _table(transactions, "transactions", validate=validate)
    if not allow_incomplete:
        if isinstance(tx, pd.DataFrame):
            last = tx["timestamp"].max()
        else:
            with connect() as con:
                _bind(con, "tx", "transactions", tx)
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
    out = _frame(_run(defs.labels_sql(horizon_days), cutoffs=cutoffs, tx=tx, connection=connection))
    return out
