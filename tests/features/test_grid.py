"""The grid engine (every cutoff from one pass, by compiled kernels) equals the SQL."""

from __future__ import annotations

import datetime as dt

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapport.features import definitions as defs
from rapport.features import dispatch, duckdb_io, grid_features, projection
from rapport.features.assembly import Stacker
from rapport.features.build import build_features, iter_features
from rapport.features.contracts import validate_table
from rapport.features.grid import _Coder, _Ids
from rapport.features.segments import _below_within
from rapport.features.synthetic import SyntheticConfig, generate_synthetic

START = pd.Timestamp("2023-01-01")


@pytest.fixture(autouse=True, scope="module")
def _grid_at_any_size():
    """Default calls run the grid here however small their data: these tests are about it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatch, "GRID_MIN_ROW_CUTOFFS", 0)
        yield


def _both(tx, ix, cutoffs, **kwargs):
    """Features by the grid (the default) and by the per-cutoff SQL."""
    grid = build_features(tx, ix, as_of=cutoffs, validate=False, **kwargs)
    sql = build_features(tx, ix, as_of=cutoffs, validate=False, cutoff_batch=1, **kwargs)
    return grid, sql


def test_grid_equals_sql_on_the_hand_computed_fixtures(tiny_tx, tiny_ix):
    cutoffs = ["2024-01-01", "2024-01-31", "2024-02-11", "2024-02-29", "2024-03-01", "2024-12-31"]
    grid, sql = _both(tiny_tx, validate_table(tiny_ix, "interactions"), cutoffs)
    assert grid["as_of"].nunique() == len(cutoffs)
    pd.testing.assert_frame_equal(grid, sql)


def test_grid_equals_sql_on_a_synthetic_world():
    tx, ix = generate_synthetic(SyntheticConfig(n_customers=800, seed=11))
    cutoffs = [f"2025-{m:02d}-{d}" for m, d in ((1, 31), (2, 28), (3, 31), (4, 30), (6, 30))]
    grid, sql = _both(tx, ix, cutoffs)
    assert len(grid) > 2000
    pd.testing.assert_frame_equal(grid, sql, check_exact=False, rtol=1e-9)


@pytest.mark.parametrize("cutoffs", [["2025-06-30"], ["2025-03-31", "2025-06-30"]])
def test_grid_takes_windows_that_double_each_other(cutoffs):
    # (30, 60, 90): the 30-day trend's 60-day span is also a window; emptying a batch's
    # arrays once shared them between two columns and failed on the second
    tx, ix = generate_synthetic(SyntheticConfig(n_customers=300, seed=3))
    grid, sql = _both(tx, ix, cutoffs, windows=(30, 60, 90))
    assert {"purchases_60d", "purchases_trend_30d", "email_opens_60d"} <= set(grid.columns)
    pd.testing.assert_frame_equal(grid, sql, check_exact=False, rtol=1e-9)


CHANNEL_EVENTS = [
    ("email", "sent"),
    ("email", "open"),
    ("email", "click"),
    ("web", "visit"),
    ("phone", "complaint"),
    ("store", "visit"),
]

tx_events = st.lists(
    st.tuples(
        st.integers(0, 5),  # customer
        st.integers(0, 300),  # day offset
        st.sampled_from([-20.0, 0.0, 5.0, 12.25, 40.0]),
    ),
    min_size=1,
    max_size=50,
)
ix_events = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 300), st.sampled_from(CHANNEL_EVENTS)),
    max_size=40,
)
# one cutoff (the one-cutoff path: bands of age), cutoffs a day apart, and further apart
# than every window (exits before entries)
cutoff_days = st.lists(st.integers(0, 330), min_size=1, max_size=6, unique=True)
# window sets where one window is often twice another (a trend's doubled span is then also a
# window: one list of arrays serves two columns), or a window of a single day
window_sets = st.lists(
    st.sampled_from([1, 7, 14, 30, 45, 60, 90]), min_size=1, max_size=4, unique=True
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tx_rows=tx_events, ix_rows=ix_events, offsets=cutoff_days, windows=window_sets)
def test_grid_equals_sql_on_random_histories(tx_rows, ix_rows, offsets, windows):
    tx = pd.DataFrame(
        {
            "customer_id": [c for c, _, _ in tx_rows],
            "timestamp": [START + pd.Timedelta(days=d, hours=c) for c, d, _ in tx_rows],
            "amount": [a for _, _, a in tx_rows],
        }
    )
    ix = pd.DataFrame(
        {
            "customer_id": [c for c, _, _ in ix_rows] or [0],
            "timestamp": [START + pd.Timedelta(days=d) for _, d, _ in ix_rows] or [START],
            "channel": [ch for _, _, (ch, _) in ix_rows] or ["web"],
            "event": [ev for _, _, (_, ev) in ix_rows] or ["visit"],
        }
    )
    cutoffs = [(START + pd.Timedelta(days=d)).date() for d in sorted(offsets)]
    grid, sql = _both(tx, ix, cutoffs, windows=tuple(windows))
    if sql.empty:
        assert grid.empty and list(grid.columns) == list(sql.columns)
        return
    pd.testing.assert_frame_equal(grid, sql)


def test_aggregate_columns_are_the_sql_aggregates(tiny_tx, tiny_ix):
    spec = defs.FeatureSpec(
        windows=(7, 30, 90),
        interaction_pairs=(("email", "open"), ("web", "visit")),
        pack_counts=False,
    )
    tx_cols, ix_cols = defs.aggregate_columns(spec)
    with duckdb.connect() as con:
        con.register("tx", tiny_tx)
        con.register("ix", validate_table(tiny_ix, "interactions"))
        con.execute("CREATE TABLE cutoffs AS SELECT DATE '2024-03-01' AS as_of")
        tx_sql = f"WITH{defs._rows_sql()},{defs._transaction_sql(spec)} SELECT * FROM tx_agg"
        ix_sql = (
            f"WITH{defs._ix_rows_sql(spec)},{defs._interaction_sql(spec)} SELECT * FROM ix_feat"
        )
        for sql, expected in ((tx_sql, tx_cols), (ix_sql, ix_cols)):
            names = [d[0] for d in con.execute(sql + " LIMIT 0").description]
            assert names == ["customer_id", "as_of", *expected]
    with pytest.raises(ValueError, match="unpacked"):
        defs.aggregate_columns(defs.FeatureSpec())


def test_grid_batches_stream_in_cutoff_order(tiny_tx, tiny_ix, monkeypatch):
    cutoffs = ["2024-01-31", "2024-02-15", "2024-02-29", "2024-03-31", "2024-04-30"]
    monkeypatch.setattr(grid_features, "GRID_BATCH_ROWS", 5)
    batches = list(iter_features(tiny_tx, tiny_ix, as_of=cutoffs))
    assert len(batches) > 1
    stacked = pd.concat(batches, ignore_index=True)
    assert stacked["as_of"].is_monotonic_increasing
    # build_features projects each batch straight into the rows of one result
    written: list[int] = []
    add_rows = Stacker.add_rows
    monkeypatch.setattr(
        Stacker,
        "add_rows",
        lambda self, n, other: written.append(n) or add_rows(self, n, other),
    )
    whole = build_features(tiny_tx, tiny_ix, as_of=cutoffs)
    assert written == [len(b) for b in batches]
    pd.testing.assert_frame_equal(stacked, whole)
    sql = build_features(tiny_tx, tiny_ix, as_of=cutoffs, cutoff_batch=1)
    pd.testing.assert_frame_equal(whole, sql)
    whole.loc[0, "recency_days"] = -1  # a frame like any other: it takes writes
    assert whole.loc[0, "recency_days"] == -1


@pytest.mark.parametrize("kind", ["days", "money", "nan"])
def test_ranks_within_a_population_equal_a_sorted_search(kind):
    rng = np.random.default_rng(5)
    if kind == "days":
        x = rng.integers(0, 50, 500).astype("float64")
    else:
        x = rng.choice([-3.5, 0.0, 1.25, 7.0, 1e9], 500)
        if kind == "nan":
            x[::7] = np.nan
    expected = np.searchsorted(np.sort(x), x, side="left")
    np.testing.assert_array_equal(_below_within(x), expected)


def test_cutoff_dates_before_any_purchase_give_no_rows(tiny_tx):
    early = [dt.date(2020, 1, 31), dt.date(2020, 2, 29)]
    grid, sql = _both(tiny_tx, None, early)
    assert grid.empty and sql.empty
    assert list(grid.columns) == list(sql.columns)


def test_parquet_files_with_differently_typed_ids_match_like_the_sql(tmp_path):
    tx = pd.DataFrame(
        {
            "customer_id": [1, 1, 2, 3],
            "timestamp": pd.to_datetime(["2024-01-01", "2024-02-01", "2024-01-15", "2024-03-01"]),
            "amount": [10.0, 20.0, 5.0, 7.0],
        }
    )
    ix = pd.DataFrame(
        {
            "customer_id": ["1", "2", "2", "9"],  # text ids, numbers in the transactions
            "timestamp": pd.to_datetime(["2024-01-05", "2024-01-20", "2024-02-20", "2024-01-01"]),
            "channel": ["web"] * 4,
            "event": ["visit"] * 4,
        }
    )
    tx.to_parquet(tmp_path / "tx.parquet")
    ix.to_parquet(tmp_path / "ix.parquet")
    grid, sql = _both(
        tmp_path / "tx.parquet", tmp_path / "ix.parquet", ["2024-02-29", "2024-03-31"]
    )
    assert grid["web_visits_365d"].sum() == 6
    pd.testing.assert_frame_equal(grid, sql)

    ix.loc[0, "customer_id"] = "not-a-number"
    ix.to_parquet(tmp_path / "ix.parquet")
    with pytest.raises(
        ValueError, match=r"customer_id is (large_)?string but transactions have int64"
    ):
        build_features(
            tmp_path / "tx.parquet",
            tmp_path / "ix.parquet",
            as_of=["2024-02-29", "2024-03-31"],
            validate=False,
        )


def test_a_failure_on_the_transaction_side_ends_the_interaction_thread(
    tiny_tx, tiny_ix, monkeypatch
):
    # the interactions are read and aggregated in a second thread: when the transactions
    # fail, the error must come out rather than leave that thread running or waiting
    import threading

    from rapport.features import kernels

    def broken(*args, **kwargs):
        raise MemoryError("no room for the aggregates")

    monkeypatch.setattr(kernels, "transaction_kernel", broken)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            build_features(tiny_tx, tiny_ix, as_of="2024-02-29", validate=False)
        except BaseException as err:
            outcome.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "build_features hung after the transaction side failed"
    assert len(outcome) == 1 and isinstance(outcome[0], MemoryError)
    assert "no room for the aggregates" in str(outcome[0])


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 6), st.integers(-3, 3), st.booleans()), min_size=0, max_size=60
    ),
)
def test_kernel_grouping_is_a_stable_sort_by_customer_day_and_refund(rows):
    """The order the transaction kernel reads rows in: by (code, day, refund), ties kept."""
    from rapport.features import kernels

    code = np.array([c for c, _, _ in rows], dtype=np.int64)
    day = np.array([d for _, d, _ in rows], dtype=np.int32)
    refund = np.array([r for _, _, r in rows], dtype=bool)
    expected = np.lexsort((refund, day, code))
    assert kernels.is_grouped(code, day, ~refund) == bool(
        np.array_equal(expected, np.arange(len(rows)))
    )
    _assert_grouped(code, day, refund, int(code.max()) + 1 if len(rows) else 0, expected)


def _assert_grouped(code, day, refund, n, expected):
    """``by_code`` gives the rows in ``expected`` order, each row whole."""
    from rapport.features import kernels

    amount = np.arange(len(code), dtype=np.float64)  # each row's own number
    before = (code.copy(), day.copy(), amount.copy(), ~refund)
    out = kernels.by_code(code, day, amount, ~refund, n)
    np.testing.assert_array_equal(out[2], expected)
    for got, column in zip(out, before, strict=True):
        np.testing.assert_array_equal(got, column[expected])
    # the caller's arrays are read, never written
    np.testing.assert_array_equal(amount, before[2])
    np.testing.assert_array_equal(day, before[1])


@settings(max_examples=60, deadline=None)
@given(
    spans=st.lists(
        st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=1, max_size=8),
        max_size=8,
    ),
)
def test_sorting_within_customers_in_place_matches_the_stable_sort(spans):
    """Rows grouped by code come out as by_code sorts them, each row whole."""
    from rapport.features import kernels

    code = np.array([c for c, rows in enumerate(spans) for _ in rows], dtype=np.int64)
    day = np.array([d for rows in spans for d, _ in rows], dtype=np.int32)
    is_purchase = np.array([p for rows in spans for _, p in rows], dtype=bool)
    amount = np.arange(len(code), dtype=np.float64)  # each row's own number
    expected = np.lexsort((~is_purchase, day, code))
    disordered = len(
        {
            int(code[i])
            for i in range(1, len(code))
            if code[i] == code[i - 1]
            and (day[i], not is_purchase[i]) < (day[i - 1], not is_purchase[i - 1])
        }
    )
    if disordered:
        # past the limit, nothing moves and the caller orders the rows instead
        rows = (day.copy(), amount.copy(), is_purchase.copy())
        assert not kernels.sort_within(code, *rows, disordered - 1)
        for kept, before in zip(rows, (day, amount, is_purchase), strict=True):
            np.testing.assert_array_equal(kept, before)
    assert kernels.sort_within(code, day, amount, is_purchase, disordered)
    np.testing.assert_array_equal(amount, expected)
    assert kernels.is_grouped(code, day, is_purchase)


def test_sorting_within_customers_refuses_codes_that_fall():
    from rapport.features import kernels

    code = np.array([0, 2, 1], dtype=np.int64)
    day = np.array([3, 2, 1], dtype=np.int32)
    amount, is_purchase = np.array([1.0, 2.0, 3.0]), np.ones(3, dtype=bool)
    assert not kernels.sort_within(code, day, amount, is_purchase, 3)
    assert day.tolist() == [3, 2, 1] and amount.tolist() == [1.0, 2.0, 3.0]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(-1, 6), st.integers(-5, 5), st.integers(0, 40)), max_size=60
    ),
    wide=st.booleans(),
)
def test_interactions_by_customer_keep_known_rows_whole_in_a_stable_order(rows, wide):
    """Unknown customers (-1) dropped, the rest stably by code, packed or not."""
    from rapport.features import kernels

    code = np.array([c for c, _, _ in rows], dtype=np.int64)
    day = np.array([d for _, d, _ in rows], dtype=np.int32)
    combo = np.array([k for _, _, k in rows], dtype=np.uint16)
    if wide and len(rows):
        day[0] = np.iinfo(np.int32).min  # beside 2**16 customers, too wide to pack
        combo[0] = 65535
    n = 2**16 + 1 if wide else 7
    known = np.flatnonzero(code >= 0)
    expected = known[np.argsort(code[known], kind="stable")]
    out = kernels.by_customer(code, day, combo, n)
    for got, column in zip(out, (code, day, combo), strict=True):
        np.testing.assert_array_equal(got, column[expected])


@pytest.mark.parametrize(
    "layout", ["grouped", "one_out_of_order", "by_time", "shuffled", "one_customer", "wide_days"]
)
def test_kernel_grouping_takes_each_path_to_the_same_order(layout):
    """Rows in any layout, days spread to int32's ends included: one order."""
    from rapport.features import kernels

    rng = np.random.default_rng(4)
    n_customers, per = 500, 6
    code = np.repeat(np.arange(n_customers, dtype=np.int64), per)
    day = np.sort(rng.integers(0, 90, (n_customers, per)).astype(np.int32), axis=1).ravel()
    refund = np.zeros(len(code), dtype=bool)
    refund[per - 1 :: per] = True  # each customer's last row: still in (day, refund) order
    if layout == "one_out_of_order":
        day[7] = day[6] - 1  # customer 1's second row is a day before its first
    elif layout == "by_time":
        by_time = np.lexsort((refund, day))
        code, day, refund = code[by_time], day[by_time], refund[by_time]
    elif layout == "shuffled":
        mixed = rng.permutation(len(code))
        code, day, refund = code[mixed], day[mixed], refund[mixed]
    elif layout == "one_customer":
        code[:] = 0
        n_customers = 1
    elif layout == "wide_days":
        day[::7] = np.iinfo(np.int32).min + 1
        day[3::7] = np.iinfo(np.int32).max
        mixed = rng.permutation(len(code))
        code, day, refund = code[mixed], day[mixed], refund[mixed]
    expected = np.lexsort((refund, day, code))
    _assert_grouped(code, day, refund, n_customers, expected)
    if layout == "wide_days":
        # past 2**30 customers beside such days the key is too narrow: two stable sorts
        _assert_grouped(code, day, refund, 2**31, expected)
    if layout == "one_out_of_order":
        # the few customers out of order are sorted in place instead, to the same rows
        amount = np.arange(len(code), dtype=np.float64)
        assert kernels.sort_within(code, day, amount, ~refund, 5)
        np.testing.assert_array_equal(amount, expected)


@pytest.mark.parametrize(
    "ids",
    [
        [7, 3, 7, 12, 3],  # small integers: the lookup table
        pa.array([-100, 100, 6, -100], type=pa.int8()),  # offsets past int8's range
        [10**15, 3, 10**15, 2**40],  # spread out: hashed
        ["b", "a", "b", "c"],  # text: hashed
    ],
)
def test_customer_codes_follow_id_order_and_mark_unknown_ids(ids):
    coder = _Coder(_Ids.of(pa.chunked_array([pa.array(ids)])))
    ids = ids.to_pylist() if isinstance(ids, pa.Array) else ids
    assert list(coder.ids) == sorted(set(ids))
    assert list(coder.ids.take(coder.codes)) == ids
    others = _Ids.of(pa.chunked_array([pa.array([ids[1], ids[3]])]))
    assert list(coder.code_of(others)) == [coder.ids.get_loc(ids[1]), coder.ids.get_loc(ids[3])]
    if isinstance(ids[0], int):
        unknown = _Ids.of(pa.chunked_array([pa.array([-5, 5, 11, 2**41], type=pa.int64())]))
        assert list(coder.code_of(unknown)) == [-1, -1, -1, -1]


def test_integer_ids_of_other_widths_compare_as_integers(tmp_path):
    """int32 transaction ids against int64 interaction ids beyond int32: no error, as in SQL."""
    tx = pd.DataFrame(
        {
            "customer_id": np.array([1, 1, 2], dtype="int32"),
            "timestamp": pd.to_datetime(["2024-01-01", "2024-02-01", "2024-01-15"]),
            "amount": [10.0, 20.0, 5.0],
        }
    )
    ix = pd.DataFrame(
        {
            "customer_id": np.array([1, 2, 2**40], dtype="int64"),
            "timestamp": pd.to_datetime(["2024-01-05", "2024-01-20", "2024-01-21"]),
            "channel": ["web"] * 3,
            "event": ["visit"] * 3,
        }
    )
    tx.to_parquet(tmp_path / "tx.parquet")
    ix.to_parquet(tmp_path / "ix.parquet")
    grid, sql = _both(tmp_path / "tx.parquet", tmp_path / "ix.parquet", ["2024-02-29"])
    assert grid["web_visits_365d"].tolist() == [1, 1]
    pd.testing.assert_frame_equal(grid, sql)


@pytest.mark.parametrize("cutoff_batch", [None, 1])
def test_several_cutoffs_give_a_frame_that_takes_writes(tiny_tx, tiny_ix, cutoff_batch):
    """Batches are stacked into plain writeable columns, even where one batch is empty and a
    column comes from a single Arrow chunk that could have been taken over read-only."""
    cutoffs = ["2020-01-31", "2024-02-29"]  # nobody has bought by the first
    frame = build_features(tiny_tx, tiny_ix, as_of=cutoffs, cutoff_batch=cutoff_batch)
    assert frame["as_of"].nunique() == 1
    frame.loc[0, "recency_days"] = -1
    frame.loc[1, "total_spend"] = 3.5
    frame.loc[0, "as_of"] = pd.Timestamp("2000-01-01")
    assert frame.loc[0, "recency_days"] == -1 and frame.loc[1, "total_spend"] == 3.5


def _sql_rows(tx, ix, spec, last_cutoff):
    """The rows and codes as DuckDB's SQL selects them (the reference for the direct reads)."""
    from rapport.features import grid

    with duckdb_io.bound(None, cutoffs=[last_cutoff], tx=tx, ix=ix) as con:
        rows = grid._sql_transactions(con)
        coded = con.execute(defs.coded_interactions_sql(spec)).to_arrow_table()
    return rows, coded


def _awkward_inputs():
    """Inputs the direct readers must read as DuckDB does: zoned and pre-1970 timestamps,
    rows after the cutoff, upper-case and unknown channels, events outside the spec."""
    tx = pd.DataFrame(
        {
            "customer_id": [3, 1, 1, 2, 3, 2],
            "timestamp": pd.to_datetime(
                [
                    "1969-12-31 23:30",
                    "2024-01-01 00:00",
                    "2024-02-01 23:59:59",
                    "2024-02-02 10:00",
                    "2024-03-05",
                    "2024-04-01 00:00",  # after the cutoff
                ],
                format="ISO8601",
            ),
            "amount": [10.0, -5.0, 0.0, 12.0, 7.5, 3.0],
        }
    )
    ix = pd.DataFrame(
        {
            "customer_id": [1, 2, 9, 3, 1, 2, 3],
            "timestamp": pd.to_datetime(
                [
                    "2024-01-02 01:00+02:00",  # 2024-01-01 in UTC
                    "2024-02-01 12:00+00:00",
                    "2024-01-05 00:00+00:00",
                    "2024-03-31 23:00-02:00",  # after the cutoff in UTC
                    "2024-02-10 00:00+00:00",
                    "2024-02-11 00:00+00:00",
                    "1969-06-01 00:00+00:00",
                ],
                format="ISO8601",
                utc=True,
            ).tz_convert("Asia/Kolkata"),  # a wall clock whose dates are not UTC's
            "channel": ["email", "Email", "web", "email", "sms", "web", "phone"],
            "event": ["open", "open", "visit", "click", "reply", "bounce", "complaint"],
        }
    )
    spec = defs.FeatureSpec(
        windows=(30, 90),
        interaction_pairs=(("email", "click"), ("email", "open"), ("web", "visit")),
        pack_counts=False,
    )
    return tx, ix, spec, dt.date(2024, 3, 31)


@pytest.mark.parametrize("kind", ["frame", "parquet_file", "parquet_folder"])
def test_direct_reads_equal_the_sql_rows(tmp_path, kind):
    from rapport.features import grid

    tx, ix, spec, last = _awkward_inputs()

    def write(frame, path):
        # NaN kept as NaN (pandas' to_parquet writes it as a null): a NaN amount is a
        # purchase to DuckDB, which orders NaN above every number
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if "amount" in frame:
            at = table.schema.get_field_index("amount")
            table = table.set_column(at, "amount", pa.array(frame["amount"].to_numpy()))
        # rows in groups of two: read a group at a time, each with its own dictionaries
        pq.write_table(table, path, row_group_size=2)

    if kind != "frame":
        tx.loc[3, "amount"] = float("nan")  # a frame hands NaN to Arrow as a null: DuckDB reads it
    if kind == "parquet_file":
        write(tx, tmp_path / "tx.parquet")
        write(ix, tmp_path / "ix.parquet")
        tx, ix = tmp_path / "tx.parquet", tmp_path / "ix.parquet"
    elif kind == "parquet_folder":
        for name, frame in (("tx", tx), ("ix", ix)):
            (tmp_path / name).mkdir()
            write(frame.iloc[:3], tmp_path / name / "a.parquet")
            write(frame.iloc[3:], tmp_path / name / "b.parquet")
        tx, ix = tmp_path / "tx", tmp_path / "ix"
    sql_tx, sql_ix = _sql_rows(tx, ix, spec, last)

    direct_tx = grid._direct_transactions(tx)
    assert direct_tx is not None
    # the direct read keeps rows after the cutoff (the kernels never read them)
    upto = direct_tx.day <= (last - dt.date(1970, 1, 1)).days
    assert len(upto) == 6 and upto.sum() == len(sql_tx.day) == 5
    # rows in the input's order; DuckDB's scan of several row groups keeps none
    ids = direct_tx.customer_id.arrow().filter(pa.array(upto)).to_pylist()
    assert ids == [3, 1, 1, 2, 3]
    mine = (direct_tx.day[upto], direct_tx.amount[upto], direct_tx.is_purchase[upto])
    direct_rows = zip(ids, *mine, strict=True)
    theirs = (sql_tx.day, sql_tx.amount, sql_tx.is_purchase)
    sql_rows = zip(sql_tx.customer_id.arrow().to_pylist(), *theirs, strict=True)
    # NaN as text: NaN equals nothing, itself included
    assert sorted(map(str, direct_rows)) == sorted(map(str, sql_rows))
    assert direct_tx.day.min() == -1  # 1969-12-31, floored

    direct = grid._direct_interactions(ix, spec, last)
    assert direct is not None
    customer_id, coded, _ = direct
    assert coded is not None
    # the direct read keeps rows after the cutoff (the kernel skips them): compare the others
    keep = coded.day <= (last - dt.date(1970, 1, 1)).days
    assert keep.sum() == sql_ix.num_rows == 6
    n_pairs = len(spec.interaction_pairs)
    columns = {
        "customer_id": (
            customer_id.arrow().to_numpy(zero_copy_only=False),
            sql_ix["customer_id"].to_numpy(),
        ),
        "day": (coded.day, grid._days(sql_ix["day"])),
        # the codes are tables over the combinations
        "pair": (coded.pair[coded.combo], sql_ix["pair_id"].fill_null(n_pairs).to_numpy()),
        "channel": (coded.channel[coded.combo], sql_ix["channel_id"].fill_null(-1).to_numpy()),
        "response": (
            coded.response[coded.combo],
            sql_ix["is_response"].fill_null(False).to_numpy(),
        ),
        "complaint": (
            coded.complaint[coded.combo],
            sql_ix["is_complaint"].fill_null(False).to_numpy(),
        ),
    }
    direct_rows = sorted(zip(*(mine[keep].tolist() for mine, _ in columns.values()), strict=True))
    sql_rows = sorted(zip(*(theirs.tolist() for _, theirs in columns.values()), strict=True))
    assert direct_rows == sql_rows
    # 'Email' is not 'email' to the SQL, and neither is it here
    assert list(columns["pair"][0][keep][:2]) == [1, n_pairs]


def test_files_that_disagree_on_a_type_are_read_by_duckdb(tmp_path, tiny_tx, tiny_ix):
    from rapport.features import grid

    folder = tmp_path / "tx"
    folder.mkdir()
    tiny_tx.iloc[:4].to_parquet(folder / "a.parquet")
    tiny_tx.iloc[4:].astype({"amount": "float32"}).to_parquet(folder / "b.parquet")
    assert grid._direct_transactions(folder) is None
    ix = validate_table(tiny_ix, "interactions")
    grid_frame, sql = _both(folder, ix, ["2024-03-01"])
    pd.testing.assert_frame_equal(grid_frame, sql)
    assert grid_frame["n_purchases"].sum() > 0


def test_inputs_the_direct_readers_cannot_take_go_through_duckdb(tiny_tx, tiny_ix):
    from rapport.features import grid

    text_times = tiny_tx.assign(timestamp=tiny_tx["timestamp"].astype(str))
    assert grid._direct_transactions(text_times) is None
    with_null = tiny_tx.astype({"amount": "float64"})
    with_null.loc[0, "amount"] = np.nan
    assert (
        grid._direct_transactions(with_null.assign(amount=with_null["amount"].astype("Float64")))
        is None
    )
    coded_ids = tiny_tx.assign(customer_id=tiny_tx["customer_id"].astype("category"))
    assert grid._direct_transactions(coded_ids) is None
    # and the features still come, by DuckDB's reading, equal to the SQL's
    ix = validate_table(tiny_ix, "interactions")
    grid_frame, sql = _both(
        text_times, ix.assign(timestamp=ix["timestamp"].astype(str)), ["2024-03-01"]
    )
    pd.testing.assert_frame_equal(grid_frame, sql)
    assert len(grid_frame) > 0


def _hugepage_advice(enabled: bool | None = None) -> bool:
    """numpy's huge-page advice; set to ``enabled`` when given (the previous value back)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    if enabled is not None:
        return bool(multiarray._set_madvise_hugepage(enabled))
    return bool(multiarray._get_madvise_hugepage())


@pytest.fixture
def huge_page_advice():
    """numpy advising huge pages (its default on Linux) for the test, as it was afterwards."""
    previous = _hugepage_advice(True)
    yield
    _hugepage_advice(previous)


def test_the_grid_computes_on_small_pages_and_leaves_numpy_as_it_was(
    tiny_tx, tiny_ix, monkeypatch, huge_page_advice
):
    from rapport.features import grid

    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    seen: list[bool] = []
    kernel = grid._transaction_columns

    def spy(*args, **kwargs):
        seen.append(_hugepage_advice())
        return kernel(*args, **kwargs)

    monkeypatch.setattr(grid, "_transaction_columns", spy)
    monkeypatch.setattr(grid_features, "GRID_BATCH_ROWS", 1)  # one cutoff a batch
    batches = iter_features(tiny_tx, tiny_ix, as_of=["2024-01-31", "2024-02-29"])
    first = next(batches)
    # between batches the caller runs with numpy's own advice
    assert len(first) and seen == [False] and _hugepage_advice() is True
    assert len(list(batches)) == 1 and seen == [False, False]
    assert _hugepage_advice() is True
    with grid.small_pages(), grid.small_pages():
        assert _hugepage_advice() is False
    assert _hugepage_advice() is True

    # a user who chose the advice keeps it
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
    seen.clear()
    build_features(tiny_tx, tiny_ix, as_of="2024-02-29")
    assert seen == [True]


def test_the_grid_computes_without_cycle_collection_and_restores_it(tiny_tx, tiny_ix, monkeypatch):
    import gc

    from rapport.features import grid

    seen: list[bool] = []
    project = projection.evaluate_columns

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return project(*args, **kwargs)

    monkeypatch.setattr(projection, "evaluate_columns", spy)
    monkeypatch.setattr(grid_features, "GRID_BATCH_ROWS", 1)  # one cutoff a batch
    assert gc.isenabled()
    batches = iter_features(tiny_tx, tiny_ix, as_of=["2024-01-31", "2024-02-29"])
    first = next(batches)
    # between batches the caller runs with the collector on
    assert len(first) and seen == [False] and gc.isenabled()
    assert len(list(batches)) == 1 and seen == [False, False]
    assert gc.isenabled()
    with grid.gc_paused(), grid.gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()

    # a build that fails inside still turns the collector back on
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(projection, "evaluate_columns", broken)
    with pytest.raises(RuntimeError, match="boom"):
        build_features(tiny_tx, tiny_ix, as_of="2024-02-29")
    assert gc.isenabled()

    # a user who turned it off keeps it off
    gc.disable()
    try:
        monkeypatch.setattr(projection, "evaluate_columns", spy)
        seen.clear()
        build_features(tiny_tx, tiny_ix, as_of="2024-02-29")
        assert seen == [False] and not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("kind", ["direct", "duckdb"])
def test_the_grid_finds_the_interaction_pairs_as_it_reads(tiny_tx, tiny_ix, monkeypatch, kind):
    """No separate scan for the pairs: those of the rows, as discover_interaction_pairs finds."""
    ix = validate_table(tiny_ix, "interactions").astype({"channel": str})
    ix.loc[0, "channel"] = ix.loc[0, "channel"].upper()  # the same pair, in lower case
    if kind == "duckdb":
        ix = ix.assign(timestamp=ix["timestamp"].astype(str))  # text times: DuckDB reads them
    expected = duckdb_io.discover_interaction_pairs(ix)
    sql = build_features(tiny_tx, ix, as_of="2024-03-01", validate=False, cutoff_batch=1)

    def no_scan(_):
        raise AssertionError("the grid scanned the interactions for their pairs")

    monkeypatch.setattr(duckdb_io, "discover_interaction_pairs", no_scan)
    grid_frame = build_features(tiny_tx, ix, as_of="2024-03-01", validate=False)
    spec = defs.FeatureSpec(interaction_pairs=expected)
    assert list(grid_frame.columns) == defs.feature_columns(spec)
    pd.testing.assert_frame_equal(grid_frame, sql)

    # interactions with no rows: no interaction features, as the SQL gives
    empty = ix.iloc[:0]
    monkeypatch.undo()
    sql = build_features(tiny_tx, empty, as_of="2024-03-01", validate=False, cutoff_batch=1)
    monkeypatch.setattr(duckdb_io, "discover_interaction_pairs", no_scan)
    grid_frame = build_features(tiny_tx, empty, as_of="2024-03-01", validate=False)
    assert list(grid_frame.columns) == defs.feature_columns(defs.FeatureSpec())
    pd.testing.assert_frame_equal(grid_frame, sql)


def test_a_stacked_result_takes_batches_that_went_through_duckdb(tiny_tx, tiny_ix, monkeypatch):
    """The numpy projection refused on the second batch: it and those after run on DuckDB,
    their rows copied into the same result, equal to the SQL's."""
    cutoffs = ["2024-01-31", "2024-02-15", "2024-02-29", "2024-03-31", "2024-04-30"]
    monkeypatch.setattr(grid_features, "GRID_BATCH_ROWS", 5)
    evaluate, calls = projection.evaluate_columns, []

    def refuse_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise projection.UnsupportedSQLError("refused for the test")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(projection, "evaluate_columns", refuse_the_second)
    whole = build_features(tiny_tx, tiny_ix, as_of=cutoffs)
    batches = len(list(iter_features(tiny_tx, tiny_ix, as_of=cutoffs)))
    assert batches > 2 and len(calls) == 2 + batches  # the build projected two, then DuckDB
    sql = build_features(tiny_tx, tiny_ix, as_of=cutoffs, cutoff_batch=1)
    pd.testing.assert_frame_equal(whole, sql)


def test_rows_in_time_order_are_put_in_customer_order_first(monkeypatch):
    """Exports come in time order: both tables are put in customer order before their
    kernels (the interactions by a counting sort that drops unknown customers, the
    transactions by a radix sort), and the features equal the SQL's."""
    from rapport.features import kernels

    tx, ix = generate_synthetic(SyntheticConfig(n_customers=400, seed=5))
    tx = tx.sort_values("timestamp", kind="stable", ignore_index=True)
    ix = ix.sort_values("timestamp", kind="stable", ignore_index=True)
    ix = pd.concat([ix, ix.iloc[:3].assign(customer_id=10**9)], ignore_index=True)  # unknown
    called: list[str] = []
    for name in ("by_customer", "by_code"):
        kernel = getattr(kernels, name)

        def spy(*args, _kernel=kernel, _name=name):
            if len(args[0]) > 1:  # not the warm-up's one-row call
                called.append(_name)
            return _kernel(*args)

        monkeypatch.setattr(kernels, name, spy)
    cutoffs = ["2025-03-31", "2025-06-30"]
    grid, sql = _both(tx, ix, cutoffs)
    assert sorted(called) == ["by_code", "by_customer"]
    assert len(grid) > 500
    pd.testing.assert_frame_equal(grid, sql, check_exact=False, rtol=1e-9)
