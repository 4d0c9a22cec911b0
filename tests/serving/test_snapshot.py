"""The serving snapshot: `rapport snapshot` on a user's files, and what the service says at
start about a snapshot that is missing, stale or lacks features the models read."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from rapport.features.build import build_features
from rapport.serving.cli import app
from rapport.serving.core import ServiceState
from rapport.serving.errors import SnapshotUnavailableError
from rapport.serving.schemas import ByIdRequest, ScoreRequest
from rapport.serving.snapshot import snapshot_staleness

runner = CliRunner()
#: Columns that depend on the customer alone (R/F/M scores rank within the population).
OWN_COLUMNS = ["frequency", "recency", "T", "monetary_value", "total_spend", "n_purchases"]


@pytest.fixture(scope="module")
def user_files(served, tmp_path_factory) -> tuple[Path, Path, list[int]]:
    """150 of the served world's customers as a user's export: German CSV, own names."""
    folder = tmp_path_factory.mktemp("user")
    tx = pd.read_parquet(served.transactions)
    ids = sorted(tx["customer_id"].unique())[:150]
    tx = tx[tx["customer_id"].isin(ids)]
    tx.rename(columns={"customer_id": "Kunde", "timestamp": "Datum", "amount": "Betrag"}).to_csv(
        folder / "umsatz.csv", sep=";", decimal=",", date_format="%d.%m.%Y %H:%M:%S", index=False
    )
    with (folder / "umsatz.csv").open("a") as f:
        f.write(";15.06.2024 12:00:00;5,00;999999\n")  # a guest checkout: no customer id
    ix = pd.read_parquet(served.interactions)
    ix = ix[ix["customer_id"].isin(ids)]
    ix.rename(columns={"customer_id": "Kunde", "timestamp": "Zeit"}).to_csv(
        folder / "kontakte.csv", index=False
    )
    return folder / "umsatz.csv", folder / "kontakte.csv", ids


def _snapshot_args(tx: Path, as_of: dt.date) -> list[str]:
    return [
        "snapshot", "-t", str(tx), "--as-of", as_of.isoformat(),
        "--tx-columns", "customer_id=Kunde,timestamp=Datum,amount=Betrag",
        "--timestamp-format", "%d.%m.%Y %H:%M:%S", "--decimal-comma", "--missing-ids", "drop",
    ]  # fmt: skip


def test_snapshot_of_a_user_csv_is_served_by_id(served, user_files, tmp_path, monkeypatch):
    tx, ix, ids = user_files
    target = tmp_path / "serving" / "snapshot.parquet"
    monkeypatch.setenv("RAPPORT_HOME", str(served.home))
    monkeypatch.setenv("RAPPORT_SNAPSHOT", str(target))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ix_args = ["-i", str(ix), "--ix-columns", "customer_id=Kunde,timestamp=Zeit"]
    result = runner.invoke(
        app, [*_snapshot_args(tx, served.as_of), *ix_args, "--ix-timestamp-format", "auto"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"Snapshot of 150 customers as of {served.as_of} -> {target}" in text
    assert "1 dropped" in text  # the loader's options reach the command (--missing-ids)
    # Each customer's own features are those of the pipeline's snapshot of the same data.
    # (a CSV's ids are text)
    written = pd.read_parquet(target).astype({"customer_id": str}).set_index("customer_id")
    expected = served.snapshot.astype({"customer_id": str}).set_index("customer_id")
    expected = expected.loc[written.index]
    pd.testing.assert_frame_equal(written[OWN_COLUMNS], expected[OWN_COLUMNS])

    state = ServiceState(served.settings(snapshot=target)).load()
    assert state.ready and state.snapshot is not None, state.error
    asked = [str(i) for i in ids[:10]] + ["nobody"]
    found = state.score_ids(ByIdRequest(customer_ids=asked))
    assert [s.customer_id for s in found.scores] == asked[:10]
    assert [m.customer_id for m in found.missing] == ["nobody"]
    assert found.snapshot_as_of == served.as_of


def test_snapshot_refuses_data_without_a_feature_the_models_read(
    served, user_files, tmp_path, monkeypatch
):
    """Models trained with interactions: without them nothing is written."""
    tx, _, _ = user_files
    monkeypatch.setenv("RAPPORT_HOME", str(served.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out" / "snapshot.parquet"
    result = runner.invoke(app, [*_snapshot_args(tx, served.as_of), "--out", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "the served models need features this data does not give" in text
    assert "give that file too" in text
    assert not out.exists() and list(out.parent.iterdir()) == []
    early = runner.invoke(app, [*_snapshot_args(tx, dt.date(1990, 1, 1)), "--out", str(out)])
    assert early.exit_code == 2 and "before the first purchase" in early.output
    assert not out.exists()


def test_stale_snapshot_is_named_at_start(served, caplog):
    age = (dt.datetime.now(dt.UTC).date() - served.as_of).days
    with caplog.at_level(logging.WARNING, logger="rapport.serving.core"):
        state = ServiceState(served.settings(snapshot_max_age_days=age - 1)).load()
    assert state.ready and state.snapshot is not None, state.error
    info = state.info()
    assert info.snapshot is not None and info.snapshot.age_days == age
    assert len(info.warnings) == 1 and f"{age} days ago" in info.warnings[0]
    assert f"RAPPORT_SNAPSHOT_MAX_AGE_DAYS={age - 1}" in info.warnings[0]
    # the log names the file in full, /v1/info relative to RAPPORT_HOME
    assert "$RAPPORT_HOME/snapshot.parquet" in info.warnings[0]
    assert info.warnings[0].replace("$RAPPORT_HOME", str(served.home)) in caplog.messages
    # within its maximum age: nothing to say
    assert snapshot_staleness(served.as_of, age, today=served.as_of + dt.timedelta(age)) is None


def test_snapshot_lacking_model_features_is_named_and_the_rest_serves(
    served, state, tmp_path, json_row, caplog
):
    partial = tmp_path / "partial.parquet"
    build_features(served.transactions, None, as_of=[served.as_of], windows=(30,)).to_parquet(
        partial
    )
    missing = tmp_path / "nothing-here.parquet"
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 not really a parquet file")
    cases = (
        (partial, "the served models need"),
        (missing, "no feature snapshot at"),
        (corrupt, "not loaded"),
    )
    for path, says in cases:
        with caplog.at_level(logging.WARNING, logger="rapport.serving.core"):
            loaded = ServiceState(served.settings(snapshot=path)).load()
        # Scoring posted rows needs no snapshot: the service is up.
        assert loaded.ready, loaded.error
        assert loaded.snapshot is None
        warnings = loaded.info().warnings
        assert len(warnings) == 1 and says in warnings[0] and path.name in warnings[0]
        # The log names the file in full; answers name it without the server's folders.
        assert str(tmp_path) not in warnings[0]
        assert any(str(path) in m and says in m for m in caplog.messages)
        # Scoring by id cannot work without it, and says why.
        with pytest.raises(SnapshotUnavailableError, match=says) as refused:
            loaded.score_ids(ByIdRequest(customer_ids=["1"]))
        assert path.name in str(refused.value)
        rows = ScoreRequest(customers=[json_row(served.snapshot, 0)])
        assert len(loaded.score_rows(rows).scores) == 1
