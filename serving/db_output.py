"""Score tables in a database, loaded in bulk and swapped in whole.

:class:`TableOutput` writes a frame, chunk by chunk, to a staging table unique to the run
(``{table}__staging_{pid}_{tag}``), created with explicit column types, then replaces the
target table with it in one transaction:

* PostgreSQL through psycopg 3 (``postgresql+psycopg://``) loads each chunk with
  ``COPY ... FROM STDIN``, so a chunk has no size limit (a multi-row ``INSERT`` with one
  parameter per cell stops at 65,535 parameters). Other databases and drivers (SQLite,
  ``postgresql://`` through psycopg2) get an ``executemany`` insert in bounded batches,
  which has no per-statement limit either.
* Swaps of one table are serialised: PostgreSQL takes a transaction advisory lock keyed on
  the table name, SQLite takes the database's write lock (``BEGIN IMMEDIATE``). Drop and
  rename commit together, so readers see the old table or the new one, and of runs that
  finish together the last one wins whole.
* A killed run leaves its staging table; the next run to the same table removes staging
  tables whose run is gone. On PostgreSQL a run holds a session advisory lock keyed on its
  staging name from before the table exists until it ends; the lock dies with the run's
  connection, so a staging table whose lock is free is a leftover, whichever host wrote
  it; the server notices a killed client's closed connection within moments, and a
  staging table still locked then waits for the run after. Elsewhere the owner's process
  id in the name is checked on this host (SQLite files are written from the host that
  holds them).

Database errors surface as :class:`DatabaseOutputError`: one line naming the table and
the database (password hidden) with the driver's first line, never the statement or rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from types import TracebackType
from typing import Any, Literal

import numpy as np
import pandas as pd
import sqlalchemy as sa

#: Column types a score table can hold, by their PostgreSQL names.
ColumnKind = Literal["text", "double", "bigint", "boolean", "date", "timestamp", "timestamptz"]

_SA_TYPES: dict[str, Any] = {
    "text": sa.Text(),
    "double": sa.Double(),
    "bigint": sa.BigInteger(),
    "boolean": sa.Boolean(),
    "date": sa.Date(),
    "timestamp": sa.DateTime(timezone=False),
    "timestamptz": sa.DateTime(timezone=True),
}

#: PostgreSQL cuts identifiers at 63 bytes, so staging names are kept within it.
PG_MAX_IDENTIFIER = 63
#: ``__staging_`` + a process id (at most 7 digits on Linux) + ``_`` + 8 hex digits.
_SUFFIX_BYTES = len("__staging_") + 7 + 1 + 8
#: First keys of the two-key advisory locks: a run's liveness and swaps of a table.
RUN_LOCK = 0x52415050
SWAP_LOCK = 0x52415051
#: Rows per ``executemany`` batch on databases without ``COPY``; each batch commits, so
#: SQLite's write lock is held for one batch at a time.
INSERT_BATCH_ROWS = 10_000
#: Rows per ``COPY`` write, to bound the text held in memory at once.
COPY_BATCH_ROWS = 50_000


class DatabaseOutputError(ValueError):
    """A database refused the scores; the message is one line naming table and database.

    It is a :class:`ValueError` so that the command line prints it as one ``error:`` line
    and exits 2, as for other bad arguments (a wrong ``--db-url`` is the common cause).
    """


def staging_prefix(table: str) -> str:
    """The part of ``table`` that starts its staging tables' names (cut to fit 63 bytes)."""
    cut = table.encode()[: PG_MAX_IDENTIFIER - _SUFFIX_BYTES]
    return cut.decode(errors="ignore")


def staging_name(table: str) -> str:
    """A staging table name unique to this run: the prefix, the process id, a random tag."""
    return f"{staging_prefix(table)}__staging_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def lock_key(name: str) -> int:
    """A signed 32-bit key for ``name`` (the second key of a two-key advisory lock)."""
    return int.from_bytes(
        hashlib.blake2b(name.encode(), digest_size=4).digest(), "big", signed=True
    )


def column_kinds(
    frame: pd.DataFrame, declared: Mapping[str, ColumnKind] | None = None
) -> dict[str, ColumnKind]:
    """The column type of each column of ``frame``: ``declared`` first, else from its dtype."""
    kinds: dict[str, ColumnKind] = {}
    for name, dtype in frame.dtypes.items():
        key = str(name)
        if declared and key in declared:
            kinds[key] = declared[key]
        elif pd.api.types.is_bool_dtype(dtype):
            kinds[key] = "boolean"
        elif pd.api.types.is_integer_dtype(dtype):
            kinds[key] = "bigint"
        elif pd.api.types.is_float_dtype(dtype):
            kinds[key] = "double"
        elif isinstance(dtype, pd.DatetimeTZDtype):
            kinds[key] = "timestamptz"
        elif pd.api.types.is_datetime64_dtype(dtype):
            kinds[key] = "timestamp"
        else:
            kinds[key] = "text"
    return kinds


def _instants(values: pd.Series, unit: str) -> np.ndarray:
    """``values`` as naive UTC ``datetime64[unit]`` (NaT for nulls)."""
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        values = values.dt.tz_convert("UTC").dt.tz_localize(None)
    elif not pd.api.types.is_datetime64_dtype(values.dtype):
        values = pd.Series(pd.to_datetime(values.astype(object)), index=values.index)
    return values.to_numpy().astype(f"datetime64[{unit}]")


# Backslash first, so the escapes added after it are not escaped again.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_fields(values: pd.Series, kind: ColumnKind) -> np.ndarray:
    r"""One column in ``COPY``'s text format: nulls as ``\\N``, text escaped, floats exact."""
    null = values.isna().to_numpy()
    if kind == "double":
        numbers = values.to_numpy(dtype="float64", na_value=np.nan)
        # repr is the shortest text that reads back to the same double (and fast)
        out = np.array(list(map(repr, numbers.tolist())), dtype=object)
        out[np.isposinf(numbers)] = "Infinity"
        out[np.isneginf(numbers)] = "-Infinity"
    elif kind in ("date", "timestamp", "timestamptz"):
        unit = "D" if kind == "date" else "us"
        out = np.datetime_as_string(_instants(values, unit)).astype(object)
        if kind == "timestamptz":
            out = out + "+00"
    elif kind == "boolean":
        out = np.where(values.fillna(False).to_numpy(dtype=bool), "t", "f").astype(object)
    else:
        # each distinct value is rendered once: ids, tiers, model names repeat a lot
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        out = np.array([*_texts(uniques, kind), "\\N"], dtype=object)[codes]
    out[null] = "\\N"
    return out


def _texts(values: Iterable[object], kind: ColumnKind) -> list[str]:
    """Distinct values as ``COPY`` text; escaped only when a special character occurs."""
    if kind == "bigint":
        return [str(int(v)) for v in values]  # type: ignore[call-overload]
    texts = [v if isinstance(v, str) else str(v) for v in values]
    joined = "".join(texts)
    if any(c in joined for c in "\\\t\n\r"):
        texts = [t.translate(_COPY_ESCAPES) for t in texts]
    return texts


def python_values(values: pd.Series, kind: ColumnKind) -> list[object]:
    """One column as Python values for ``executemany`` (``None`` for nulls)."""
    null = values.isna().to_numpy()
    out: np.ndarray
    if kind == "double":
        out = values.to_numpy(dtype="float64", na_value=np.nan).astype(object)
    elif kind in ("date", "timestamp", "timestamptz"):
        out = _instants(values, "D" if kind == "date" else "us").astype(object)
        if kind == "timestamptz":
            out = np.array([None if v is None else v.replace(tzinfo=dt.UTC) for v in out])
    elif kind == "boolean":
        out = values.fillna(False).to_numpy(dtype=bool).astype(object)
    elif kind == "bigint":
        out = values.astype(object).map(lambda v: v if pd.isna(v) else int(v)).to_numpy()
    else:
        out = values.astype(object).map(str).to_numpy()
    out[null] = None
    return list(out)


def _engine(url: str) -> sa.engine.Engine:
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":
        # pysqlite opens transactions lazily and not before DDL, so drop and rename would
        # commit one by one; emit BEGIN IMMEDIATE ourselves to take the write lock up front.
        @sa.event.listens_for(engine, "connect")
        def _manual(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _immediate(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _where(url: str) -> str:
    """The database of ``url`` for messages, password hidden."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "a database URL that SQLAlchemy cannot parse"


def _reason(err: BaseException) -> str:
    """The driver's first line about ``err``: never the statement or its parameters."""
    cause = getattr(err, "orig", None) or err
    lines = str(cause).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(cause).__name__}: {text[:300]}" if text else type(cause).__name__


class TableOutput:
    """A table written through a staging table unique to the run, then swapped in whole.

    Use it as a context manager: entering connects and removes leftovers of killed runs,
    :meth:`append` loads chunks, :meth:`swap` replaces the table; leaving without a swap
    drops the staging table (a killed run leaves it to the next run to remove).

    Parameters
    ----------
    url
        SQLAlchemy URL (``postgresql+psycopg://...`` loads through ``COPY``; any other,
        such as ``sqlite:///...``, through batched ``executemany``).
    table
        Target table: one name, in the connection's default schema.
    types
        Column types by column name; other columns get one from their dtype (see
        :func:`column_kinds`).

    Attributes
    ----------
    staging
        The run's staging table.
    removed
        Leftover staging tables of gone runs that entering dropped.
    """

    def __init__(
        self, url: str, table: str, *, types: Mapping[str, ColumnKind] | None = None
    ) -> None:
        self.table = table
        self.staging = staging_name(table)
        self.removed: list[str] = []
        self._types = dict(types or {})
        self._where = _where(url)
        self._sa_table: sa.Table | None = None
        self._conn: sa.Connection | None = None
        self._swapped = False
        with self._errors("opening the connection"):
            self._engine = _engine(url)
        self._pg = self._engine.dialect.name == "postgresql"
        self._copy = self._pg and self._engine.dialect.driver == "psycopg"

    @contextmanager
    def _errors(self, step: str) -> Iterator[None]:
        """Turn database errors into one :class:`DatabaseOutputError` line."""
        engine = getattr(self, "_engine", None)
        driver = (engine.dialect.loaded_dbapi.Error,) if engine is not None else ()
        try:
            yield
        except (sa.exc.SQLAlchemyError, ImportError, *driver) as err:
            raise DatabaseOutputError(
                f"could not write table {self.table!r} to {self._where} ({step}): {_reason(err)}"
            ) from None

    def __enter__(self) -> TableOutput:
        try:
            with self._errors("connecting"):
                if self._pg and len(self.table.encode()) > PG_MAX_IDENTIFIER:
                    raise sa.exc.ArgumentError(f"table names are at most {PG_MAX_IDENTIFIER} bytes")
                self._conn = self._engine.connect()
                if self._pg:
                    # Held from before the staging table exists: other runs see it as live.
                    self._advisory("SELECT pg_advisory_lock(:k1, :k2)", RUN_LOCK, self.staging)
            with self._errors("removing leftovers of killed runs"):
                self.removed = self._remove_leftovers()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connection(self) -> sa.Connection:
        if self._conn is None:
            raise RuntimeError("TableOutput is used outside its `with` block")
        return self._conn

    def _quote(self, name: str) -> str:
        return str(self._engine.dialect.identifier_preparer.quote(name))

    def _advisory(self, sql: str, first: int, name: str) -> bool:
        conn = self._connection()
        with conn.begin():
            got = conn.execute(sa.text(sql), {"k1": first, "k2": lock_key(name)}).scalar()
        return got is not False

    def _remove_leftovers(self) -> list[str]:
        """Drop this table's staging tables whose run is gone."""
        conn = self._connection()
        own = re.compile(rf"{re.escape(staging_prefix(self.table))}__staging_(\d+)_[0-9a-f]{{8}}")
        legacy = f"{self.table}__staging"  # the shared name of earlier versions
        with conn.begin():
            names = sa.inspect(conn).get_table_names()
        removed = []
        for name in names:
            found = own.fullmatch(name)
            if name == self.staging or (found is None and name != legacy):
                continue
            with conn.begin():
                if self._pg:
                    # free only when no live run's session holds it; released at commit
                    query = sa.text("SELECT pg_try_advisory_xact_lock(:k1, :k2)")
                    args = {"k1": RUN_LOCK, "k2": lock_key(name)}
                    gone = bool(conn.execute(query, args).scalar())
                else:
                    pid = int(found[1]) if found else None
                    gone = pid is None or (pid != os.getpid() and not pid_alive(pid))
                if gone:
                    conn.execute(sa.text(f"DROP TABLE IF EXISTS {self._quote(name)}"))
                    removed.append(name)
        return removed

    def append(self, frame: pd.DataFrame) -> None:
        """Load ``frame``'s rows into the staging table (created with the first frame)."""
        with self._errors("loading rows"):
            if self._sa_table is None:
                self._create(frame)
            if len(frame) == 0:
                return
            if self._copy:
                self._copy_rows(frame)
            else:
                self._insert_rows(frame)

    def _kinds(self) -> dict[str, ColumnKind]:
        assert self._sa_table is not None
        return {c.name: c.info["kind"] for c in self._sa_table.columns}

    def _create(self, frame: pd.DataFrame) -> None:
        columns = [
            sa.Column(name, _SA_TYPES[kind], info={"kind": kind})
            for name, kind in column_kinds(frame, self._types).items()
        ]
        table = sa.Table(self.staging, sa.MetaData(), *columns)
        conn = self._connection()
        with conn.begin():
            table.create(conn)
        self._sa_table = table

    def _copy_rows(self, frame: pd.DataFrame) -> None:
        """``COPY ... FROM STDIN`` in text format, in slices of :data:`COPY_BATCH_ROWS`."""
        kinds = self._kinds()
        columns = ", ".join(self._quote(c) for c in kinds)
        sql = f"COPY {self._quote(self.staging)} ({columns}) FROM STDIN"
        conn = self._connection()
        raw: Any = conn.connection.driver_connection  # a psycopg 3 connection
        with conn.begin(), raw.cursor() as cursor, cursor.copy(sql) as copy:
            for start in range(0, len(frame), COPY_BATCH_ROWS):
                part = frame.iloc[start : start + COPY_BATCH_ROWS]
                fields = [copy_fields(part[c], k) for c, k in kinds.items()]
                lines = map("\t".join, zip(*fields, strict=True))
                copy.write("".join(f"{line}\n" for line in lines))

    def _insert_rows(self, frame: pd.DataFrame) -> None:
        """``executemany`` in batches of :data:`INSERT_BATCH_ROWS`, one commit each."""
        assert self._sa_table is not None
        kinds = self._kinds()
        names = list(kinds)
        insert = self._sa_table.insert()
        conn = self._connection()
        for start in range(0, len(frame), INSERT_BATCH_ROWS):
            part = frame.iloc[start : start + INSERT_BATCH_ROWS]
            values = [python_values(part[c], k) for c, k in kinds.items()]
            with conn.begin():
                rows = [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]
                conn.execute(insert, rows)

    def swap(self) -> None:
        """Replace the table by the staging table, in one transaction serialised per table."""
        conn = self._connection()
        with self._errors("replacing the table"):
            if self._sa_table is None:
                raise sa.exc.InvalidRequestError("no rows were loaded")
            with conn.begin():
                if self._pg:
                    # Swaps of one table take turns; the last to finish wins whole.
                    query = sa.text("SELECT pg_advisory_xact_lock(:k1, :k2)")
                    conn.execute(query, {"k1": SWAP_LOCK, "k2": lock_key(self.table)})
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {self._quote(self.table)}"))
                conn.execute(
                    sa.text(
                        f"ALTER TABLE {self._quote(self.staging)} "
                        f"RENAME TO {self._quote(self.table)}"
                    )
                )
            self._swapped = True

    def close(self) -> None:
        """Drop the staging table unless swapped, release the run's lock, disconnect."""
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                # Best effort: the connection may be gone; the next run removes what stays.
                with suppress(Exception):
                    conn.rollback()
                    if self._sa_table is not None and not self._swapped:
                        with conn.begin():
                            drop = f"DROP TABLE IF EXISTS {self._quote(self.staging)}"
                            conn.execute(sa.text(drop))
                with suppress(Exception):
                    if self._pg:
                        with conn.begin():
                            query = sa.text("SELECT pg_advisory_unlock(:k1, :k2)")
                            conn.execute(query, {"k1": RUN_LOCK, "k2": lock_key(self.staging)})
                with suppress(Exception):
                    conn.close()
        finally:
            self._engine.dispose()
