"""The grid engine (several cutoffs from one pass, by difference arrays) equals the SQL."""

from __future__ import annotations

import datetime as dt

import duckdb
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapport.features import definitions as defs
from rapport.features.build import build_features, iter_features
from rapport.features.contracts import validate_table
from rapport.features.segments import _below_within
from rapport.features.synthetic import SyntheticConfig, generate_synthetic

START = pd.Timestamp("2023-01-01")


def _both(tx, ix, cutoffs, **kwargs):
    """Features by the grid (the default for several cutoffs) and by the per-cutoff SQL."""
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
# cutoffs a day apart, and further apart than every window (exits before entries)
cutoff_days = st.lists(st.integers(0, 330), min_size=2, max_size=6, unique=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tx_rows=tx_events, ix_rows=ix_events, offsets=cutoff_days)
def test_grid_equals_sql_on_random_histories(tx_rows, ix_rows, offsets):
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
    grid, sql = _both(tx, ix, cutoffs, windows=(7, 30))
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
    from rapport.features import build

    cutoffs = ["2024-01-31", "2024-02-15", "2024-02-29", "2024-03-31", "2024-04-30"]
    monkeypatch.setattr(build, "GRID_BATCH_ROWS", 5)
    batches = list(iter_features(tiny_tx, tiny_ix, as_of=cutoffs))
    assert len(batches) > 1
    stacked = pd.concat(batches, ignore_index=True)
    assert stacked["as_of"].is_monotonic_increasing
    pd.testing.assert_frame_equal(stacked, build_features(tiny_tx, tiny_ix, as_of=cutoffs))


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
    with pytest.raises(ValueError, match="customer_id is string but transactions have int64"):
        build_features(
            tmp_path / "tx.parquet",
            tmp_path / "ix.parquet",
            as_of=["2024-02-29", "2024-03-31"],
            validate=False,
        )
