"""The inputs as DuckDB reads them: the connection, tables resolved and bound, queries to Arrow.

A table is a validated pandas frame, registered as it is, or (the trusted fast path) a
Parquet file or folder that DuckDB scans directly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from rapport.features import definitions as defs
from rapport.features.contracts import (
    SCHEMAS,
    DataValidationError,
    TableKind,
    TableSource,
    is_validated,
    read_table,
    validate_table,
)

#: DuckDB's working-memory budget unless a caller sets one (``RAPPORT_DUCKDB_MEMORY_LIMIT``).
DEFAULT_MEMORY_LIMIT = "2GB"

#: A table ready to bind: a validated frame, or a Parquet file or folder of files.
Input = pd.DataFrame | Path


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


def _is_parquet(source: object) -> bool:
    if isinstance(source, pd.DataFrame):
        return False
    path = Path(source)  # type: ignore[arg-type]
    return path.is_dir() or path.suffix.lower() in (".parquet", ".pq")


def resolve_table(source: TableSource, kind: TableKind, *, validate: bool) -> Input:
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


def bind(con: duckdb.DuckDBPyConnection, name: str, kind: TableKind, table: Input) -> None:
    """Make ``table`` readable as ``name``: a registered frame, or a view over its Parquet."""
    if isinstance(table, pd.DataFrame):
        con.register(name, table)
        return
    columns = ", ".join(SCHEMAS[kind].required)
    glob = str(table / "*.parquet") if table.is_dir() else str(table)
    quoted = glob.replace("'", "''")
    con.execute(
        f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT {columns} FROM read_parquet('{quoted}')"
    )


def unbind(con: duckdb.DuckDBPyConnection, name: str, table: Input) -> None:
    """Undo :func:`bind`."""
    if isinstance(table, pd.DataFrame):
        con.unregister(name)
    else:
        con.execute(f"DROP VIEW IF EXISTS {name}")


@contextlib.contextmanager
def bound(
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
    bind(con, "tx", "transactions", tx)
    if ix is not None:
        bind(con, "ix", "interactions", ix)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE cutoffs AS SELECT CAST(UNNEST($dates) AS DATE) AS as_of",
        {"dates": [d.isoformat() for d in cutoffs]},
    )
    try:
        yield con
    finally:
        unbind(con, "tx", tx)
        if ix is not None:
            unbind(con, "ix", ix)
        con.execute("DROP TABLE IF EXISTS cutoffs")
        if connection is None:
            con.close()


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
        bind(con, "ix", "interactions", interactions)
        rows = con.execute(defs.DISTINCT_PAIRS_SQL).fetchall()
    return defs.discover_pairs(rows)


def prepare_inputs(
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
    tx = resolve_table(transactions, "transactions", validate=validate)
    ix = None
    if interactions is not None:
        ix = resolve_table(interactions, "interactions", validate=validate)
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


def run(
    sql: str,
    *,
    cutoffs: Sequence[dt.date],
    tx: Input,
    ix: Input | None = None,
    connection: duckdb.DuckDBPyConnection | None = None,
) -> pa.Table:
    """Run one query; its result as Arrow, ``as_of`` as a timestamp."""
    with bound(connection, cutoffs=cutoffs, tx=tx, ix=ix) as con:
        return arrow(con.execute(sql))


def arrow(result: duckdb.DuckDBPyConnection) -> pa.Table:
    """A query's whole result as Arrow, ``as_of`` as a timestamp."""
    # to_arrow_table from duckdb 1.5 on; fetch_arrow_table (deprecated there) before
    fetch = getattr(result, "to_arrow_table", None) or result.fetch_arrow_table
    table = fetch()
    as_of = table.schema.get_field_index("as_of")
    return table.set_column(as_of, "as_of", table.column(as_of).cast(pa.timestamp("us")))
