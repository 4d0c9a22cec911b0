"""Many cutoffs at once: the base aggregates of every (customer, cutoff) by difference arrays.

The feature SQL (:mod:`rapport.features.definitions`) joins every event with every cutoff on
or after it and aggregates, so a training set of K cutoffs costs about K one-cutoff queries.
Here each event is read once. With the cutoffs sorted, the cutoffs that see an event form a
range of cutoff indices: it enters at the first cutoff on or after its day, ``k0``, and for a
window of ``W`` days it stays in that window until the first cutoff on or after ``day + W``,
``k_exit``. So each base aggregate of ``aggregate_columns`` is a difference array over
(customer, cutoff index): ``+value`` at ``k0``, ``-value`` at ``k_exit``, then a running sum
along the cutoffs (latest days: a running maximum). That is a handful of ``np.bincount`` passes
over the rows, whatever K is.

The result has exactly the columns of the SQL's ``tx_agg`` and ``ix_feat`` for the unpacked
spec, and every feature is then derived from it by the same SQL
(``features_sql(spec, source="grid")``), so the definitions stay in one place. The row marks
(new purchase day, gap, repeat day) and the interaction codes come from that SQL as well.
Tests prove the result equal to the per-cutoff SQL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator, Sequence

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from rapport.features import definitions as defs

_EPOCH = dt.date(1970, 1, 1)
_NO_DAY = np.iinfo(np.int32).min


@dataclasses.dataclass
class _Rows:
    """Event rows as arrays: dense customer code, day (days since 1970), first cutoff index."""

    code: np.ndarray
    day: np.ndarray
    k0: np.ndarray

    def subset(self, mask: np.ndarray) -> _Rows:
        return _Rows(self.code[mask], self.day[mask], self.k0[mask])


class _Grid:
    """Difference arrays over (customer code, cutoff index), ``n`` customers by ``k`` cutoffs.

    Results are kept per cutoff, for the customers present at it only (those who have bought
    by then, ``present[j]``): a training set's grid is as big as its feature rows, and each
    cutoff's arrays are dropped as soon as its rows are out.
    """

    def __init__(self, n: int, cutoff_days: np.ndarray, present: list[np.ndarray]) -> None:
        self.n, self.k, self.present = n, len(cutoff_days), present
        self.cutoff_days = cutoff_days

    def index(self, day: np.ndarray, shift: int = 0) -> np.ndarray:
        """First cutoff index on or after ``day + shift`` (``k`` when there is none)."""
        return _cutoff_index(self.cutoff_days, day, shift)

    def _split(self, full: np.ndarray, dtype: type) -> list[np.ndarray]:
        return [full[j][rows].astype(dtype, copy=False) for j, rows in enumerate(self.present)]

    def _bins(self, rows: _Rows, k: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        # customer-major: the rows come grouped by customer, so the counts land close together
        # (cutoff-major bins cost twice as much); one spare column past the last cutoff takes
        # the exits that never happen
        return np.bincount(
            rows.code * (self.k + 1) + k, weights=weights, minlength=self.n * (self.k + 1)
        )

    def _running(self, delta: np.ndarray, dtype: type) -> list[np.ndarray]:
        """Running sums along the cutoffs, kept per cutoff for its present customers.

        One accumulator adds a column at a time: half the time of transposing and running a
        cumsum (1.5M customers x 12 cutoffs), and never a second full-size array.
        """
        columns = delta.reshape(self.n, self.k + 1)
        acc = columns[:, 0].copy()
        out = [acc[self.present[0]].astype(dtype, copy=False)]
        for j in range(1, self.k):
            acc += columns[:, j]
            out.append(acc[self.present[j]].astype(dtype, copy=False))
        return out

    def total(
        self, rows: _Rows, weights: np.ndarray | None = None, *, window: int | None = None
    ) -> list[np.ndarray]:
        """Per cutoff, the sum of ``weights`` over the rows it sees (a count when None).

        With ``window``, only the rows within its last ``window`` days. Counts come as int32
        (int64 past 2**31 rows), sums as float64.
        """
        delta = self._bins(rows, rows.k0, weights)
        if window is not None:
            # day + window > day, so the exit is never before the entry; at the entry itself
            # (cutoffs further apart than the window) it cancels it
            delta -= self._bins(rows, self.index(rows.day, window), weights)
        # counts are stored as int32 when no count can reach 2**31 (fewer rows than that),
        # halving the grid; grid_tables hands them to the SQL as BIGINT like the aggregates
        # they replace
        if weights is not None:
            return self._running(delta, np.float64)
        return self._running(delta, np.int32 if len(rows.code) < 2**31 else np.int64)

    def latest(self, rows: _Rows) -> list[np.ndarray]:
        """Per cutoff, the latest day it sees (``_NO_DAY`` where none), int32."""
        out = np.full(self.k * self.n, _NO_DAY, dtype=np.int32)
        np.maximum.at(out, rows.k0 * self.n + rows.code, rows.day)
        return self._split(np.maximum.accumulate(out.reshape(self.k, self.n), axis=0), np.int32)


def _cutoff_index(cutoff_days: np.ndarray, day: np.ndarray, shift: int = 0) -> np.ndarray:
    """First cutoff index on or after ``day + shift`` (``len(cutoff_days)`` when none)."""
    lo = int(day.min()) + shift if len(day) else 0
    hi = int(day.max()) + shift if len(day) else 0
    # a lookup table over the days spanned: a gather instead of a binary search per row
    lut = np.searchsorted(cutoff_days, np.arange(lo, hi + 1), side="left")
    return lut[day.astype(np.int64) + (shift - lo)]


def _rounded(values: list[np.ndarray]) -> list[np.ndarray]:
    """Sums rounded to 1e-6, as the SQL rounds them."""
    return [np.round(v, 6) for v in values]


def _days(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.int32()).to_numpy().astype(np.int32, copy=False)


def _flags(column: pa.ChunkedArray) -> np.ndarray:
    return column.fill_null(False).to_numpy(zero_copy_only=False).astype(bool, copy=False)


def base_aggregates(
    con: duckdb.DuckDBPyConnection,
    spec: defs.FeatureSpec,
    cutoffs: Sequence[dt.date],
) -> tuple[pd.Index, list[np.ndarray], dict[str, list[np.ndarray]]]:
    """The base aggregates of every customer at every cutoff.

    Parameters
    ----------
    con
        A connection with ``tx`` (and ``ix`` when ``spec`` has interaction pairs) bound and
        ``cutoffs`` holding the last cutoff (the SQL marks rows up to it).
    spec
        An unpacked spec (``pack_counts=False``).
    cutoffs
        Sorted cutoff dates.

    Returns
    -------
    (pandas.Index, list, dict)
        The customer ids (sorted; a customer's code is its position); per cutoff the codes of
        the customers who have bought by then (ascending: one feature row each); and per
        column of :func:`~rapport.features.definitions.aggregate_columns` a list with one
        array per cutoff, aligned with those codes (days as days since 1970, ``_NO_DAY`` for
        none).
    """
    k = len(cutoffs)
    cutoff_days = np.array([(c - _EPOCH).days for c in cutoffs], dtype=np.int64)
    marked = con.execute(defs.marked_transactions_sql()).to_arrow_table()
    id_type = marked.schema.field("customer_id").type
    ids, code = _codes(marked.column("customer_id"))
    day = _days(marked.column("day"))
    k0 = _cutoff_index(cutoff_days, day)
    purchase = _flags(marked.column("is_purchase"))
    first_k = np.full(len(ids), k, dtype=np.int64)
    np.minimum.at(first_k, code[purchase], k0[purchase])
    present = [np.flatnonzero(first_k <= j) for j in range(k)]
    grid = _Grid(len(ids), cutoff_days, present)
    tx = _Rows(code, day, k0)
    amount = marked.column("amount").to_numpy().astype(np.float64, copy=False)
    gap = marked.column("gap").fill_null(0).to_numpy().astype(np.float64)
    new_day, repeat_day = _flags(marked.column("new_day")), _flags(marked.column("repeat_day"))
    del marked
    buys, spent = tx.subset(purchase), amount[purchase]

    first_day = np.full(len(ids), np.iinfo(np.int32).max, dtype=np.int32)
    np.minimum.at(first_day, buys.code, buys.day)
    out: dict[str, list[np.ndarray]] = {
        "first_day": [first_day[rows] for rows in present],
        "last_day": grid.latest(buys),
        "_counts": grid.total(tx.subset(new_day)),
        "_purchase_rows": grid.total(buys),
        "total_spend": grid.total(tx, amount),
        "repeat_spend": grid.total(tx.subset(repeat_day), amount[repeat_day]),
        "order_spend": grid.total(buys, spent),
        "order_spend_sq": grid.total(buys, spent * spent),
        "gap_sq": grid.total(tx, gap * gap),
    }
    for g, w in enumerate(spec.windows):
        out[f"_purchases_now_{g}"] = grid.total(buys, window=w)
        out[f"_purchases_two_{g}"] = grid.total(buys, window=2 * w)
        now = grid.total(tx, amount, window=w)
        two = grid.total(tx, amount, window=2 * w)
        out[f"spend_{w}d"] = _rounded(now)
        out[f"_spend_before_{w}d"] = _rounded([b - a for a, b in zip(now, two, strict=True)])
    for name in ("total_spend", "repeat_spend", "order_spend"):
        out[name] = _rounded(out[name])
    if spec.interaction_pairs:
        out.update(_interaction_aggregates(con, spec, ids, id_type, grid))
    return ids, present, out


def _codes(customer_id: pa.ChunkedArray) -> tuple[pd.Index, np.ndarray]:
    """Dense codes in customer-id order (so the grid comes out ordered like the SQL)."""
    codes, uniques = pd.factorize(customer_id.to_pandas(), sort=True)
    return pd.Index(uniques), codes.astype(np.int64, copy=False)


def _interaction_aggregates(
    con: duckdb.DuckDBPyConnection,
    spec: defs.FeatureSpec,
    ids: pd.Index,
    id_type: pa.DataType,
    grid: _Grid,
) -> dict[str, list[np.ndarray]]:
    coded = con.execute(defs.coded_interactions_sql(spec)).to_arrow_table()
    customer_id = coded.column("customer_id")
    if customer_id.type != id_type:
        # files typed differently (ids as text in one, numbers in the other): compare them as
        # the transactions' type, as the SQL's join would, rather than match nothing
        try:
            customer_id = customer_id.cast(id_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ValueError(
                f"interactions: customer_id is {customer_id.type} but transactions have "
                f"{id_type}, and the values do not convert: {err}"
            ) from err
    code = ids.get_indexer(customer_id.to_pandas())
    keep = code >= 0  # interactions of customers who never bought are never features
    day = _days(coded.column("day"))[keep]
    rows = _Rows(code[keep], day, grid.index(day))
    pair = coded.column("pair_id").fill_null(-1).to_numpy().astype(np.int8)[keep]
    channel = coded.column("channel_id").fill_null(-1).to_numpy().astype(np.int8)[keep]
    response = _flags(coded.column("is_response"))[keep]
    complaint = _flags(coded.column("is_complaint"))[keep]
    del coded, code, day, keep
    out: dict[str, list[np.ndarray]] = {}
    for p in range(len(spec.interaction_pairs)):
        of_pair = rows.subset(pair == p)
        for g, w in enumerate(spec.windows):
            out[f"_pair_{p}_{g}"] = grid.total(of_pair, window=w)
    for c in range(len(spec.channels)):
        out[f"_last_channel_{c}"] = grid.latest(rows.subset(channel == c))
    for kind, flag in (("response", response), ("complaint", complaint)):
        flagged = rows.subset(flag)
        for g, w in enumerate(spec.windows):
            out[f"_{kind}s_{g}"] = grid.total(flagged, window=w)
        out[f"_last_{kind}"] = grid.latest(flagged)
    for c in range(len(spec.channels)):
        out[f"_channel_responses_{c}"] = grid.total(
            rows.subset(response & (channel == c)), window=spec.longest
        )
    return out


def grid_tables(
    con: duckdb.DuckDBPyConnection,
    spec: defs.FeatureSpec,
    cutoffs: Sequence[dt.date],
    *,
    batch_rows: int,
) -> Iterator[pa.Table]:
    """Base-aggregate tables for batches of cutoffs, each within about ``batch_rows`` rows.

    Each table has ``customer_id``, ``as_of`` (date) and the columns of
    :func:`~rapport.features.definitions.aggregate_columns`, one row per customer who has
    bought by the cutoff, ordered by ``as_of`` then ``customer_id``: the ``grid`` relation
    of ``features_sql(spec, source="grid")``. A batch's arrays are freed once it is out.
    """
    ids, present, out = base_aggregates(con, spec, cutoffs)
    tx_cols, ix_cols = defs.aggregate_columns(spec)
    days = {"first_day", "last_day"} | {c for c in ix_cols if c.startswith("_last_")}
    start = 0
    while start < len(cutoffs):
        stop, rows = start + 1, len(present[start])
        while stop < len(cutoffs) and rows + len(present[stop]) <= batch_rows:
            rows += len(present[stop])
            stop += 1
        sizes = [len(p) for p in present[start:stop]]
        columns: dict[str, pa.Array] = {
            "customer_id": pa.Array.from_pandas(ids.take(np.concatenate(present[start:stop]))),
            "as_of": pa.array(
                np.repeat(np.array(cutoffs[start:stop], dtype="datetime64[D]"), sizes)
            ),
        }
        for name in tx_cols + ix_cols:
            values = np.concatenate(out[name][start:stop])
            out[name][start:stop] = [np.empty(0)] * (stop - start)
            if name in days:
                columns[name] = pa.array(values, mask=values == _NO_DAY).cast(pa.date32())
            elif values.dtype == np.int32:
                columns[name] = pa.array(values.astype(np.int64))
            else:
                columns[name] = pa.array(values)
        for j in range(start, stop):
            present[j] = np.empty(0, dtype=np.int64)
        yield pa.table(columns)
        start = stop
