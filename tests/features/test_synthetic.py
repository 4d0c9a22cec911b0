from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from rapport.features import synthetic
from rapport.features.synthetic import (
    INTERACTION_CHANNELS,
    INTERACTION_EVENTS,
    INTERACTION_PAIRS,
    SyntheticConfig,
    customers_for_transactions,
    expected_transactions_per_customer,
    generate_synthetic,
    iter_synthetic,
    write_synthetic,
)

SMALL = SyntheticConfig(n_customers=2_000, chunk_customers=500, seed=7)
TX_DTYPES = {
    "customer_id": "int64",
    "timestamp": "datetime64[us]",
    "amount": "float64",
    "order_id": "int64",
}
IX_COLUMNS = ["customer_id", "timestamp", "channel", "event"]


@pytest.fixture(scope="module")
def small() -> tuple[pd.DataFrame, pd.DataFrame]:
    return generate_synthetic(SMALL)


def _check_columns(tx: pd.DataFrame, ix: pd.DataFrame) -> None:
    assert {c: str(t) for c, t in tx.dtypes.items()} == TX_DTYPES
    assert list(ix.columns) == IX_COLUMNS
    assert str(ix["customer_id"].dtype) == "int64"
    assert str(ix["timestamp"].dtype) == "datetime64[us]"
    assert isinstance(ix["channel"].dtype, pd.CategoricalDtype)
    assert isinstance(ix["event"].dtype, pd.CategoricalDtype)
    assert list(ix["channel"].cat.categories) == list(INTERACTION_CHANNELS)
    assert list(ix["event"].cat.categories) == list(INTERACTION_EVENTS)


def test_deterministic_for_same_config(small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    tx, ix = generate_synthetic(SMALL)
    pd.testing.assert_frame_equal(tx, small[0])
    pd.testing.assert_frame_equal(ix, small[1])


def test_different_seed_differs(small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    tx, ix = generate_synthetic(SyntheticConfig(n_customers=2_000, chunk_customers=500, seed=8))
    assert not tx.equals(small[0])
    assert not ix.equals(small[1])


def test_transactions_do_not_depend_on_interactions_flag(
    small: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    config = SyntheticConfig(n_customers=2_000, chunk_customers=500, seed=7, interactions=False)
    tx, ix = generate_synthetic(config)
    pd.testing.assert_frame_equal(tx, small[0])
    assert ix.empty
    _check_columns(tx, ix)


@pytest.mark.parametrize("chunk", [500, 2_000])
def test_chunking_columns_and_ids(chunk: int) -> None:
    config = SyntheticConfig(n_customers=2_000, chunk_customers=chunk, seed=7)
    chunks = list(iter_synthetic(config))
    assert len(chunks) == 2_000 // chunk
    seen: set[int] = set()
    for tx, ix in chunks:
        _check_columns(tx, ix)
        ids = set(tx["customer_id"].unique())
        assert not ids & seen, "customer ids overlap between chunks"
        assert set(ix["customer_id"].unique()) <= ids
        seen |= ids
    assert seen == set(range(1, 2_001))  # every customer has at least its first purchase
    tx, ix = generate_synthetic(config)
    _check_columns(tx, ix)
    assert tx["order_id"].is_unique
    assert tx["order_id"].min() == 1 and tx["order_id"].max() == len(tx)
    assert tx["customer_id"].is_monotonic_increasing
    assert ix["customer_id"].is_monotonic_increasing


def test_invariants(small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    tx, ix = small
    start = pd.Timestamp(SMALL.start)
    stop = pd.Timestamp(SMALL.end) + pd.Timedelta(days=1)
    for frame in (tx, ix):
        assert frame["timestamp"].min() >= start
        assert frame["timestamp"].max() < stop
        assert frame["timestamp"].notna().all()
        # sorted by customer, then time
        assert (frame.groupby("customer_id")["timestamp"].diff().dropna() >= pd.Timedelta(0)).all()
    assert np.isfinite(tx["amount"]).all()
    assert (tx["amount"] == tx["amount"].round(2)).all()
    first = tx.groupby("customer_id").head(1)
    assert len(first) == SMALL.n_customers
    assert (first["amount"] >= 0).all()
    refunds = (tx["amount"] < 0).mean()
    assert 0.005 < refunds < 0.04
    # each customer's interactions start no earlier than its acquisition (first purchase)
    acquired = first.set_index("customer_id")["timestamp"]
    assert (ix["timestamp"].to_numpy() >= acquired.loc[ix["customer_id"]].to_numpy()).all()
    pairs = set(zip(ix["channel"].astype(str), ix["event"].astype(str), strict=True))
    assert pairs == set(INTERACTION_PAIRS)
    for column in ("channel", "event"):
        values = ix[column].astype(str)
        assert (values == values.str.lower()).all()


def test_volumes_are_in_the_documented_range(small: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    tx, ix = small
    per_customer = len(tx) / SMALL.n_customers
    assert 4 <= per_customer <= 8
    assert 1 / 1.5 <= len(ix) / len(tx) <= 1.5


def test_interactions_fade_for_lapsed_customers(
    small: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    tx, ix = small
    stop = pd.Timestamp(SMALL.end) + pd.Timedelta(days=1)
    last_purchase = tx[tx["amount"] > 0].groupby("customer_id")["timestamp"].max()
    recent = last_purchase.index[last_purchase >= stop - pd.Timedelta(days=90)]
    lapsed = last_purchase.index[last_purchase < stop - pd.Timedelta(days=270)]
    assert len(recent) > 200 and len(lapsed) > 200
    window = ix[(ix["timestamp"] >= stop - pd.Timedelta(days=90)) & (ix["event"] != "sent")]
    counts = window.groupby("customer_id").size()
    rate_recent = counts.reindex(recent, fill_value=0).mean()
    rate_lapsed = counts.reindex(lapsed, fill_value=0).mean()
    assert rate_recent > 2 * rate_lapsed
    # e-mails keep going to lapsed customers
    sends = ix[(ix["timestamp"] >= stop - pd.Timedelta(days=90)) & (ix["event"] == "sent")]
    assert sends["customer_id"].isin(lapsed).sum() > 0


def test_write_synthetic_round_trip(tmp_path: Path) -> None:
    config = SyntheticConfig(n_customers=1_500, chunk_customers=500, seed=3)
    summary = write_synthetic(config, tmp_path / "out", progress=True)
    assert summary.n_customers == 1_500
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "interactions.parquet",
        "transactions.parquet",
    ]
    tx_file = pq.ParquetFile(summary.transactions_path)
    ix_file = pq.ParquetFile(summary.interactions_path)
    assert tx_file.metadata.num_rows == summary.n_transactions
    assert ix_file.metadata.num_rows == summary.n_interactions
    assert tx_file.metadata.num_row_groups == 3
    assert ix_file.metadata.num_row_groups == 3
    tx = pd.read_parquet(summary.transactions_path)
    ix = pd.read_parquet(summary.interactions_path)
    expected_tx, expected_ix = generate_synthetic(config)
    pd.testing.assert_frame_equal(tx, expected_tx)
    assert list(ix.columns) == IX_COLUMNS
    assert len(ix) == len(expected_ix)
    assert (ix["channel"].astype(str) == expected_ix["channel"].astype(str)).all()
    assert (ix["event"].astype(str) == expected_ix["event"].astype(str)).all()
    assert str(ix["timestamp"].dtype) == "datetime64[us]"


def test_write_synthetic_failure_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = synthetic.iter_synthetic

    def failing(config: SyntheticConfig) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
        chunks = real(config)
        yield next(chunks)
        raise RuntimeError("boom")

    monkeypatch.setattr(synthetic, "iter_synthetic", failing)
    config = SyntheticConfig(n_customers=1_000, chunk_customers=500)
    with pytest.raises(RuntimeError, match="boom"):
        write_synthetic(config, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_customers_for_transactions() -> None:
    wanted = 50_000
    n = customers_for_transactions(wanted)
    assert n == round(wanted / expected_transactions_per_customer())
    tx, _ = generate_synthetic(SyntheticConfig(n_customers=n, interactions=False, seed=11))
    assert abs(len(tx) - wanted) <= 0.15 * wanted
    assert customers_for_transactions(0) == 0


def test_invalid_config() -> None:
    with pytest.raises(ValueError, match="chunk_customers"):
        SyntheticConfig(chunk_customers=0)
    with pytest.raises(ValueError, match="acquisition_cutoff_days"):
        SyntheticConfig(start="2025-01-01", end="2025-02-01")
    with pytest.raises(ValueError, match="refund_prob"):
        SyntheticConfig(refund_prob=1.5)
    tx, ix = generate_synthetic(SyntheticConfig(n_customers=0))
    assert tx.empty and ix.empty
    _check_columns(tx, ix)
