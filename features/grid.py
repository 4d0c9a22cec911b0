"""The default engine: base aggregates of every (customer, cutoff), one pass over the events.

The feature SQL (:mod:`rapport.features.definitions`) joins every event with every cutoff on
or after it and aggregates, so a training set of K cutoffs costs about K one-cutoff queries.
Here each event is read once, by compiled kernels (:mod:`rapport.features.kernels`):

- the transactions, grouped by customer and day (they mostly come so; a counting sort by
  customer puts them in order otherwise), are walked customer by customer while the cutoffs
  advance: the purchase-day marks of the SQL's window pass (a new purchase day, its gap from
  the one before, repeat-day rows) are made on the way, and every window's sums are
  differences of the customer's running sums;
- the interactions, in any order, add each row to every cutoff that sees it.

Both write each (customer, cutoff)'s aggregates straight into its column of the output: no
temporary array per aggregate, window or mark. On a 2-core VM those temporaries cost more in
fresh memory pages than in arithmetic (the numpy engine this replaced spent a quarter of its
time in the kernel zeroing pages).

The result has exactly the columns of the SQL's ``tx_agg`` and ``ix_feat`` for the unpacked
spec, and every feature is then derived from it by the same SQL
(``features_sql(spec, source="grid")``), so the feature definitions stay in one place; the
rows and the interaction codes come from that SQL too. Tests prove the result equal to the
per-cutoff SQL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from rapport.features import definitions as defs

_EPOCH = dt.date(1970, 1, 1)
#: Day value for "no such day" (no purchase or interaction of the kind by the cutoff).
NO_DAY = np.iinfo(np.int32).min
#: First-purchase day of a customer who never bought.
NO_PURCHASE = np.iinfo(np.int32).max


def _cutoff_index(cutoff_days: np.ndarray, day: np.ndarray, shift: int = 0) -> np.ndarray:
    """First cutoff index on or after ``day + shift`` (``len(cutoff_days)`` when none)."""
    lo = int(day.min()) + shift if len(day) else 0
    hi = int(day.max()) + shift if len(day) else 0
    # a lookup table over the days spanned: a gather instead of a binary search per row
    lut = np.searchsorted(cutoff_days, np.arange(lo, hi + 1), side="left")
    return lut[day.astype(np.int64) + (shift - lo)]


def _days(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.int32()).to_numpy().astype(np.int32, copy=False)


def _flags(column: pa.ChunkedArray) -> np.ndarray:
    return column.fill_null(False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


@dataclasses.dataclass
class _Transactions:
    """Transaction rows as arrays, with the order that groups them (empty: they come so)."""

    code: np.ndarray
    day: np.ndarray
    amount: np.ndarray
    is_purchase: np.ndarray
    order: np.ndarray


@dataclasses.dataclass
class _Interactions:
    """Interaction rows as arrays: customer code (-1: never bought), day and their codes."""

    code: np.ndarray
    day: np.ndarray
    pair: np.ndarray
    channel: np.ndarray
    response: np.ndarray
    complaint: np.ndarray


@dataclasses.dataclass
class _Events:
    """Everything the kernels read: the rows, the cutoffs and who is present at each.

    A customer has a feature row at every cutoff from ``first_k``, the first on or after
    their first purchase, on (``len(cutoff_days)`` when they never bought).
    """

    ids: pd.Index
    tx: _Transactions
    ix: _Interactions | None
    cutoff_days: np.ndarray
    first_k: np.ndarray

    def present(self, j: int) -> np.ndarray:
        """The codes of the customers with a feature row at cutoff ``j``, ascending."""
        return np.flatnonzero(self.first_k <= j)

    def sizes(self) -> np.ndarray:
        """Feature rows per cutoff."""
        k = len(self.cutoff_days)
        return np.cumsum(np.bincount(self.first_k, minlength=k + 1)[:k])


#: An input the engine can read itself: a pandas frame or a Parquet file or folder of files.
Source = pd.DataFrame | Path


@dataclasses.dataclass
class _TransactionRows:
    """Transaction rows as the SQL's ``transaction_rows_sql`` selects them, ids still Arrow."""

    customer_id: pa.ChunkedArray
    day: np.ndarray
    amount: np.ndarray
    is_purchase: np.ndarray


def _load_events(
    con: duckdb.DuckDBPyConnection,
    spec: defs.FeatureSpec,
    cutoffs: Sequence[dt.date],
    sources: tuple[Source, Source | None] | None = None,
) -> _Events:
    """The event rows, read by the SQL's own row and code definitions, ready for the kernels.

    ``sources`` (the transactions and interactions ``con`` has bound as ``tx`` and ``ix``)
    are read straight into Arrow where their types allow (:func:`_direct_transactions`),
    which is several times faster than fetching DuckDB's result; otherwise DuckDB reads
    them. The interactions are read in a second thread while the transactions are read,
    coded and grouped here; both release the GIL for most of their work, and the
    connection serves one of them at a time.
    """
    from rapport.features import kernels

    tx_source, ix_source = sources if sources is not None else (None, None)
    coder_ready: Future[_Coder] = Future()
    one_query = threading.Lock()
    with ThreadPoolExecutor(max_workers=1) as pool:
        ix: Future[_Interactions] | None = (
            pool.submit(
                _load_interactions, con, spec, coder_ready, ix_source, cutoffs[-1], one_query
            )
            if spec.interaction_pairs
            else None
        )
        try:
            rows = None if tx_source is None else _direct_transactions(tx_source)
            if rows is None:
                with one_query:
                    rows = _sql_transactions(con)
            coder = _Coder(rows.customer_id)
            coder_ready.set_result(coder)
            tx = _Transactions(
                code=coder.codes,
                day=rows.day,
                amount=rows.amount,
                is_purchase=rows.is_purchase,
                order=np.empty(0, dtype=np.int64),
            )
            del rows
            n = len(coder.ids)
            refund = ~tx.is_purchase
            if not kernels.is_grouped(tx.code, tx.day, refund):
                tx.order = kernels.group_order(tx.code, tx.day, refund, n)
            del refund
            cutoff_days = np.array([(c - _EPOCH).days for c in cutoffs], dtype=np.int64)
            first_day = kernels.first_purchase_days(tx.code, tx.day, tx.is_purchase, n)
        finally:
            if not coder_ready.done():
                # the transactions failed before their codes: the other thread must not wait
                coder_ready.set_exception(RuntimeError("the transactions could not be coded"))
        bought = np.flatnonzero(first_day < NO_PURCHASE)
        first_k = np.full(n, len(cutoffs), dtype=np.int64)
        first_k[bought] = _cutoff_index(cutoff_days, first_day[bought])
        return _Events(coder.ids, tx, None if ix is None else ix.result(), cutoff_days, first_k)


def _sql_transactions(con: duckdb.DuckDBPyConnection) -> _TransactionRows:
    """The transaction rows as DuckDB selects them (``transaction_rows_sql``)."""
    rows = con.execute(defs.transaction_rows_sql()).to_arrow_table()
    return _TransactionRows(
        customer_id=rows.column("customer_id"),
        day=_days(rows.column("day")),
        amount=rows.column("amount").to_numpy().astype(np.float64, copy=False),
        is_purchase=_flags(rows.column("is_purchase")),
    )


def _direct_transactions(source: Source) -> _TransactionRows | None:
    """The rows of ``transaction_rows_sql`` read without DuckDB; None where DuckDB must.

    The same rows by the same rules (a row's day is its timestamp's UTC date, floored; a
    purchase is ``amount >= 0``), except that rows after the last cutoff are kept: the
    kernels never read past a cutoff (a customer whose first purchase is later has no
    cutoff to appear at), and filtering 10M rows cost more than it saved. Tests prove the
    two readers equal up to the cutoff, and the features equal.
    """
    table = _read_arrow(source, ("customer_id", "timestamp", "amount"))
    if table is None or not _is_number(table.column("amount").type):
        return None
    day = _day_numbers(table.column("timestamp"))
    if day is None:
        return None
    amount = table.column("amount").cast(pa.float64()).to_numpy()
    # DuckDB orders NaN above every number, so `amount >= 0` holds for it there
    is_purchase = (amount >= 0) | np.isnan(amount)
    return _TransactionRows(table.column("customer_id"), day, amount, is_purchase)


def _read_arrow(
    source: Source, columns: Sequence[str], dictionary: Sequence[str] = ()
) -> pa.Table | None:
    """``columns`` of a frame or a Parquet file (or folder) as Arrow.

    ``dictionary`` columns come dictionary-encoded. None where there are nulls, the ids are
    categorical or the read fails: DuckDB reads the input then, and reports what it finds.
    """
    import pyarrow.dataset as ds

    try:
        if isinstance(source, pd.DataFrame):
            table = pa.Table.from_pandas(source[list(columns)], preserve_index=False)
        else:
            # the files DuckDB's read_parquet reads for the same path (see build._bind)
            files = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
            if not files:
                return None
            options = ds.ParquetReadOptions(dictionary_columns=list(dictionary))
            table = ds.dataset(
                [str(f) for f in files], format=ds.ParquetFileFormat(read_options=options)
            ).to_table(columns=list(columns), memory_pool=_read_pool())
    except (pa.ArrowException, KeyError, ValueError, TypeError, OSError):
        return None
    if any(table.column(c).null_count for c in columns):
        return None
    if "customer_id" in columns and pa.types.is_dictionary(table.column("customer_id").type):
        return None
    return table


def _read_pool() -> pa.MemoryPool:
    """The memory pool the event rows are read into: jemalloc where Arrow has it.

    Arrow's default, mimalloc, took 0.9-1.1 s of wall and twice that in CPU to read the
    10M + 12.6M benchmark rows on most runs, against a steady 0.42-0.55 s from jemalloc (the
    first reads of a process, into fresh memory; later reads were as fast in either).
    """
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:  # builds without jemalloc (Windows)
        return pa.default_memory_pool()


_pages_lock = threading.Lock()
_pages_users = 0
_pages_before = True


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """Allocate numpy arrays without ``madvise(MADV_HUGEPAGE)`` inside, unless the user chose.

    numpy advises transparent huge pages for its large arrays. On this project's 2-core VM
    the first touch of a fresh huge page cost 2.3 s per GiB (1.3-2.4 s), five times the
    0.43 s of 4 KiB pages, and nothing else here costs as much: the 10M-row build touches
    about 2.7 GB, and ran 4.6-4.9 s with huge pages against 3.3-3.7 s without them.
    (Huge pages that a process frees and touches again are cheap, but the grid's arrays
    are mostly touched once.) The advice is process-wide: it is turned off while the grid
    computes, never while its caller runs, and restored when the last concurrent user
    leaves. A user who set ``NUMPY_MADVISE_HUGEPAGE`` keeps their choice.
    """
    global _pages_users, _pages_before
    import importlib

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    set_advice = getattr(multiarray, "_set_madvise_hugepage", None)
    if set_advice is None or "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        yield
        return
    with _pages_lock:
        if _pages_users == 0:
            _pages_before = set_advice(False)
        _pages_users += 1
    try:
        yield
    finally:
        with _pages_lock:
            _pages_users -= 1
            if _pages_users == 0:
                set_advice(_pages_before)


def _is_number(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
    )


def _day_numbers(column: pa.ChunkedArray) -> np.ndarray | None:
    """Days since 1970-01-01 of a timestamp or date column; None for other types.

    As ``CAST(timestamp AS DATE)`` gives them in a UTC session: floored, and a zoned
    timestamp's UTC date.
    """
    kind = column.type
    if pa.types.is_timestamp(kind):
        if kind.tz is not None:
            # the UTC instant, not the zone's wall clock (Arrow's date of a zoned timestamp)
            column = column.cast(pa.int64()).cast(pa.timestamp(kind.unit))
        # Arrow floors to the day, three times faster than numpy's integer division
        return column.cast(pa.date32()).cast(pa.int32()).to_numpy()
    if pa.types.is_date32(kind):
        return column.cast(pa.int32()).to_numpy()
    if pa.types.is_date64(kind):
        return (column.cast(pa.int64()).to_numpy() // 86_400_000).astype(np.int32)
    return None


def _dictionary_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]] | None:
    """Each row's position in the column's distinct text values, and those values."""
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    values = column.type.value_type
    if not (pa.types.is_string(values) or pa.types.is_large_string(values)):
        return None
    column = column.unify_dictionaries()
    if column.num_chunks == 0:
        return np.empty(0, dtype=np.int32), []
    codes = [chunk.indices.to_numpy(zero_copy_only=False) for chunk in column.chunks]
    joined = codes[0] if len(codes) == 1 else np.concatenate(codes)
    return joined.astype(np.int32, copy=False), column.chunk(0).dictionary.to_pylist()


def _load_interactions(
    con: duckdb.DuckDBPyConnection,
    spec: defs.FeatureSpec,
    coder_ready: Future[_Coder],
    source: Source | None = None,
    last_cutoff: dt.date | None = None,
    one_query: threading.Lock | None = None,
) -> _Interactions:
    """The interaction rows, coded by the SQL, customers by the transactions' codes.

    Rows whose pair is not in ``spec`` get the pair code ``len(spec.interaction_pairs)``,
    rows whose channel is not, -1. Read without DuckDB where :func:`_direct_interactions`
    can; rows after the last cutoff are then kept, and the kernel, which adds a row to the
    cutoffs that see it, leaves them out.
    """
    direct = (
        None
        if source is None or last_cutoff is None
        else _direct_interactions(source, spec, last_cutoff)
    )
    if direct is not None:
        customer_id, ix = direct
        ix.code = coder_ready.result().code_of(customer_id)
        return ix
    with one_query or contextlib.nullcontext():
        coded = con.execute(defs.coded_interactions_sql(spec)).to_arrow_table()
    return _Interactions(
        code=coder_ready.result().code_of(coded.column("customer_id")),
        day=_days(coded.column("day")),
        **_codes(coded, spec),
    )


def _codes(coded: pa.Table, spec: defs.FeatureSpec) -> dict[str, np.ndarray]:
    """The kernel's codes of ``coded_interactions_sql`` rows.

    Pair (``len(spec.interaction_pairs)`` for none), channel (-1 for none), and the
    response and complaint flags.
    """
    return {
        # int32: the type the interaction kernel is compiled for
        "pair": _int32(coded.column("pair_id").fill_null(len(spec.interaction_pairs))),
        "channel": _int32(coded.column("channel_id").fill_null(-1)),
        "response": _flags(coded.column("is_response")),
        "complaint": _flags(coded.column("is_complaint")),
    }


def _direct_interactions(
    source: Source, spec: defs.FeatureSpec, last_cutoff: dt.date
) -> tuple[pa.ChunkedArray, _Interactions] | None:
    """Interaction rows read without DuckDB, their codes still by the SQL's definition.

    A row's codes depend on its channel and event alone, so ``coded_interactions_sql`` runs
    on every (channel, event) combination of the columns' distinct values (a few dozen rows)
    and each row takes its combination's codes: the definitions stay in the SQL, and 12.6M
    rows are not compared with strings one by one. None where DuckDB must read the rows.
    """
    table = _read_arrow(
        source, ("customer_id", "timestamp", "channel", "event"), dictionary=("channel", "event")
    )
    if table is None:
        return None
    day = _day_numbers(table.column("timestamp"))
    channels = _dictionary_codes(table.column("channel"))
    events = _dictionary_codes(table.column("event"))
    if day is None or channels is None or events is None:
        return None
    customer_id = table.column("customer_id")
    del table
    (channel_code, channel_values), (event_code, event_values) = channels, events
    combination = channel_code * max(len(event_values), 1) + event_code
    del channel_code, event_code
    codes = _combination_codes(spec, channel_values, event_values, last_cutoff)
    return customer_id, _Interactions(
        code=np.empty(0, dtype=np.int64),
        day=day,
        **{name: values[combination] for name, values in codes.items()},
    )


def _int32(column: pa.ChunkedArray) -> np.ndarray:
    return column.to_numpy().astype(np.int32, copy=False)


def _combination_codes(
    spec: defs.FeatureSpec, channels: list[str], events: list[str], last_cutoff: dt.date
) -> dict[str, np.ndarray]:
    """:func:`_codes` of every (channel, event) combination.

    Entry ``k * len(events) + e`` codes channel ``channels[k]`` with event ``events[e]``.
    """
    n = len(channels) * len(events)
    combos = pa.table(
        {
            # the position rides in the id: the query's order is its own
            "customer_id": pa.array(np.arange(n, dtype=np.int64)),
            "timestamp": pa.array(np.full(n, np.datetime64(last_cutoff, "us"))),
            "channel": pa.array([c for c in channels for _ in events], type=pa.string()),
            "event": pa.array([e for _ in channels for e in events], type=pa.string()),
        }
    )
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("ix", combos)
        con.execute(f"CREATE TEMP TABLE cutoffs AS SELECT DATE '{last_cutoff}' AS as_of")
        coded = con.execute(
            f"SELECT * FROM ({defs.coded_interactions_sql(spec)}) ORDER BY customer_id"
        ).to_arrow_table()
    finally:
        con.close()
    if coded.num_rows != n:
        raise RuntimeError("coded_interactions_sql dropped (channel, event) combinations")
    return _codes(coded, spec)


def _transaction_columns(
    events: _Events, spec: defs.FeatureSpec, j0: int, j1: int, offsets: np.ndarray
) -> dict[str, np.ndarray]:
    """The transaction aggregates of cutoffs ``j0 <= j < j1``, one value per feature row."""
    from rapport.features import kernels

    spans = sorted({*spec.windows, *(2 * w for w in spec.windows)})
    width = int(offsets[-1])
    # counts fit int32 below 2**31 rows (the SQL widens them to BIGINT: widen_counts_sql)
    count_type = np.int32 if len(events.tx.code) < 2**31 else np.int64
    ints = np.empty((4 + len(spans), width), dtype=count_type)
    floats = np.empty((5 + len(spans), width), dtype=np.float64)
    tx = events.tx
    kernels.transaction_kernel(
        tx.code,
        tx.day,
        tx.amount,
        tx.is_purchase,
        tx.order,
        events.first_k,
        events.cutoff_days,
        np.array(spans, dtype=np.int64),
        j0,
        j1,
        offsets,
        ints,
        floats,
    )
    out = {
        "first_day": ints[0].astype(np.int32, copy=False),
        "last_day": ints[1].astype(np.int32, copy=False),
        "_counts": ints[2],
        "_purchase_rows": ints[3],
        "total_spend": _rounded(floats[0]),
        "repeat_spend": _rounded(floats[1]),
        "order_spend": _rounded(floats[2]),
        "order_spend_sq": floats[3],
        "gap_sq": floats[4],
    }
    for g, w in enumerate(spec.windows):
        now, two = spans.index(w), spans.index(2 * w)
        out[f"_purchases_now_{g}"] = ints[4 + now]
        out[f"_purchases_two_{g}"] = ints[4 + two]
        out[f"spend_{w}d"] = _rounded(floats[5 + now].copy())
        out[f"_spend_before_{w}d"] = _rounded(floats[5 + two] - floats[5 + now])
    return out


def _rounded(values: np.ndarray) -> np.ndarray:
    """Sums rounded to 1e-6 in place, as the SQL rounds them."""
    return np.round(values, 6, out=values)


def _interaction_columns(
    events: _Events, spec: defs.FeatureSpec, j0: int, j1: int, offsets: np.ndarray
) -> dict[str, np.ndarray]:
    """The interaction aggregates of cutoffs ``j0 <= j < j1``, one value per feature row."""
    from rapport.features import kernels

    ix = events.ix
    assert ix is not None
    n_pairs, n_channels, n_windows = (
        len(spec.interaction_pairs),
        len(spec.channels),
        len(spec.windows),
    )
    names = [f"_pair_{p}_{g}" for p in range(n_pairs) for g in range(n_windows)]
    names += [f"_last_channel_{k}" for k in range(n_channels)]
    names += [f"_responses_{g}" for g in range(n_windows)]
    names += [f"_complaints_{g}" for g in range(n_windows)]
    names += ["_last_response", "_last_complaint"]
    names += [f"_channel_responses_{k}" for k in range(n_channels)]
    # counts fit int32 below 2**31 rows (as the transactions', see _transaction_columns)
    count_type = np.int32 if len(ix.code) < 2**31 else np.int64
    out = np.zeros((len(names), int(offsets[-1])), dtype=count_type)
    days = [i for i, name in enumerate(names) if name.startswith("_last_")]
    out[days] = NO_DAY
    kernels.interaction_kernel(
        ix.code,
        ix.day,
        ix.pair,
        ix.channel,
        ix.response,
        ix.complaint,
        events.first_k,
        kernels.positions(events.first_k, j0, j1, offsets),
        events.cutoff_days,
        np.array(spec.windows, dtype=np.int64),
        n_pairs,
        n_channels,
        j0,
        j1,
        out,
    )
    return {
        name: out[i].astype(np.int32, copy=False) if i in days else out[i]
        for i, name in enumerate(names)
    }


class _Coder:
    """Dense customer codes in id order (so the grid comes out ordered like the SQL).

    Integer ids spanning a range not much larger than the rows go through a lookup table (a
    gather, ten times faster than hashing); others through ``pandas.factorize``.
    """

    def __init__(self, customer_id: pa.ChunkedArray) -> None:
        self.type = customer_id.type
        self._lo, self._table = 0, None
        values = customer_id.to_numpy() if pa.types.is_integer(self.type) else None
        if values is not None and len(values) and customer_id.null_count == 0:
            lo, hi = int(values.min()), int(values.max())
            # offsets in int64 (ids of a narrow type would overflow their own); unsigned ids
            # past int64 are hashed
            if hi - lo < 4 * len(values) + 1024 and hi < 2**63:
                from rapport.features import kernels

                wide = values.astype(np.int64, copy=False)
                seen = np.zeros(hi - lo + 1, dtype=bool)
                kernels.mark_ids(wide, lo, seen)
                table = np.cumsum(seen, dtype=np.int64) - 1
                table[~seen] = -1
                self._lo, self._table = lo, table
                self.ids = pd.Index((np.flatnonzero(seen) + lo).astype(values.dtype))
                self.codes = kernels.lookup_ids(wide, lo, table)
                return
        codes, uniques = pd.factorize(customer_id.to_pandas(), sort=True)
        self.ids, self.codes = pd.Index(uniques), codes.astype(np.int64, copy=False)

    def code_of(self, customer_id: pa.ChunkedArray) -> np.ndarray:
        """Codes of other ids (-1 for ids never seen), compared as this coder's id type.

        Integers of another width are compared as integers, as SQL compares them.
        """
        both_integers = pa.types.is_integer(customer_id.type) and pa.types.is_integer(self.type)
        if customer_id.type != self.type and not both_integers:
            # files typed differently (ids as text in one, numbers in the other): compare them
            # as the transactions' type, as the SQL's join would, rather than match nothing
            try:
                customer_id = customer_id.cast(self.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise ValueError(
                    f"interactions: customer_id is {customer_id.type} but transactions have "
                    f"{self.type}, and the values do not convert: {err}"
                ) from err
        values = customer_id.to_numpy(zero_copy_only=False)
        if self._table is None or customer_id.null_count or values.dtype == np.uint64:
            return np.asarray(self.ids.get_indexer(customer_id.to_pandas()), dtype=np.int64)
        from rapport.features import kernels

        return kernels.lookup_ids(values.astype(np.int64, copy=False), self._lo, self._table)


def grid_tables(
    con: duckdb.DuckDBPyConnection,
    spec: defs.FeatureSpec,
    cutoffs: Sequence[dt.date],
    *,
    batch_rows: int,
    sources: tuple[Source, Source | None] | None = None,
) -> Iterator[tuple[pa.Table, int]]:
    """Base-aggregate tables for batches of cutoffs, each within about ``batch_rows`` rows.

    ``con`` has ``tx`` (and ``ix`` when ``spec`` has interaction pairs) bound and ``cutoffs``
    holding the last cutoff; ``spec`` is unpacked (``pack_counts=False``) and ``cutoffs`` are
    sorted. Each table has ``customer_id``, ``as_of`` (date) and the columns of
    :func:`~rapport.features.definitions.aggregate_columns`, one row per customer who has
    bought by the cutoff, ordered by ``as_of`` then ``customer_id``: the ``grid`` relation
    of ``features_sql(spec, source="grid")``; each comes with the rows of all tables together.
    ``sources``, the inputs bound as ``tx`` and ``ix``, are read without DuckDB where they can
    be (:func:`_load_events`).
    A batch is computed when the one before is out, the transaction and interaction kernels
    side by side, and its arrays are freed with its table.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        # numba's import and its first calls (about 0.5 s) overlap the reading of the rows
        warm = pool.submit(_warm_kernels)
        events = _load_events(con, spec, cutoffs, sources)
        warm.result()
        sizes = events.sizes()
        total_rows = int(sizes.sum())
        tx_cols, ix_cols = defs.aggregate_columns(spec)
        days = {"first_day", "last_day"} | {c for c in ix_cols if c.startswith("_last_")}
        start = 0
        while start < len(cutoffs):
            stop, rows = start + 1, int(sizes[start])
            while stop < len(cutoffs) and rows + int(sizes[stop]) <= batch_rows:
                rows += int(sizes[stop])
                stop += 1
            offsets = np.concatenate([[0], np.cumsum(sizes[start:stop])]).astype(np.int64)
            interactions = (
                pool.submit(_interaction_columns, events, spec, start, stop, offsets)
                if events.ix is not None
                else None
            )
            values = _transaction_columns(events, spec, start, stop, offsets)
            if interactions is not None:
                values.update(interactions.result())
            present = np.concatenate([events.present(j) for j in range(start, stop)])
            columns: dict[str, pa.Array] = {
                "customer_id": pa.Array.from_pandas(events.ids.take(present)),
                "as_of": pa.array(
                    np.repeat(
                        np.array(cutoffs[start:stop], dtype="datetime64[D]"), np.diff(offsets)
                    )
                ),
            }
            del present
            if stop == len(cutoffs):
                # the rows are not needed past the last batch: free them before the
                # consumer derives its features
                del events
            for name in tx_cols + ix_cols:
                v = values.pop(name)
                # each taken over from numpy without a copy (the SQL reads int32 counts
                # through widen_counts_sql)
                columns[name] = (
                    pa.array(v, mask=v == NO_DAY).cast(pa.date32()) if name in days else pa.array(v)
                )
                del v
            yield _table_of(columns), total_rows
            start = stop


def _warm_kernels() -> None:
    """Import the kernels and load (or compile) each for the types the engine passes."""
    from rapport.features import kernels

    kernels.warm()


def widen_counts_sql(schema: pa.Schema, source: str) -> str:
    """A projection of ``source``, a :func:`grid_tables` table, with int32 counts as BIGINT.

    BIGINT is the type of the SQL aggregates they replace, so the features keep their types;
    ``customer_id`` keeps its own.
    """
    widened = [
        f'CAST("{f.name}" AS BIGINT) AS "{f.name}"'
        for f in schema
        if f.type == pa.int32() and f.name not in ("customer_id", "as_of")
    ]
    replace = f" REPLACE ({', '.join(widened)})" if widened else ""
    return f"SELECT *{replace} FROM {source}"


def _table_of(columns: dict[str, pa.Array]) -> pa.Table:
    """A table of ``columns``, the dict emptied.

    A generator's local must not keep a batch alive while its consumer works on it.
    """
    table = pa.table(columns)
    columns.clear()
    return table
