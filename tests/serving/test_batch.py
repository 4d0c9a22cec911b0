from __future__ import annotations

import inspect
import uuid

import numpy as np
import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from rapport.serving.batch import OUTPUT_COLUMNS, score_batch, score_chunks
from rapport.serving.cli import app
from rapport.serving.cli import score as score_command

#: ``rapport score``'s chunk size.
DEFAULT_CHUNK_ROWS = inspect.signature(score_command).parameters["chunk_rows"].default


def _scores(served, state, chunk_rows):
    return list(
        score_chunks(
            served.transactions,
            served.interactions,
            as_of=served.as_of,
            scorer=state.scorer,
            chunk_rows=chunk_rows,
        )
    )


def test_chunks_cover_everyone_once_and_match_in_memory_scoring(served, state):
    chunks = _scores(served, state, chunk_rows=400)
    assert len(chunks) >= 3 and max(len(c) for c in chunks) <= 400
    out = pd.concat(chunks).sort_values("customer_id").reset_index(drop=True)
    assert list(out.columns) == list(OUTPUT_COLUMNS)
    assert out["customer_id"].is_unique
    snapshot = served.snapshot.sort_values("customer_id").reset_index(drop=True)
    assert out["customer_id"].tolist() == snapshot["customer_id"].tolist()
    expected = state.scorer.score_frame(snapshot)
    np.testing.assert_allclose(out["churn_probability"], expected.churn_probability, rtol=1e-12)
    np.testing.assert_allclose(out["predicted_value"], expected.predicted_value, rtol=1e-12)
    assert (out["churn_model"] == "rapport-churn/1").all()


def test_failure_midway_leaves_no_file(served, state, tmp_path):
    def broken():
        yield from _scores(served, state, chunk_rows=400)[:1]
        raise RuntimeError("disk on fire")

    out = tmp_path / "scores.parquet"
    with pytest.raises(RuntimeError, match="disk on fire"):
        score_batch(broken(), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture
def pg_url():
    name = f"rapport_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres", autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres", autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_postgres_table_is_swapped_in_whole_or_not_at_all(served, state, tmp_path, pg_url):
    chunks = _scores(served, state, chunk_rows=DEFAULT_CHUNK_ROWS)
    result = score_batch(iter(chunks), tmp_path / "a.parquet", database_url=pg_url, table="scores")
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            n = conn.execute(sa.text("SELECT count(*) FROM scores")).scalar_one()
            assert n == result.rows == sum(len(c) for c in chunks)

        def broken():
            yield chunks[0]
            raise RuntimeError("lost the connection")

        with pytest.raises(RuntimeError):
            score_batch(broken(), tmp_path / "b.parquet", database_url=pg_url, table="scores")
        with engine.connect() as conn:
            # The previous table is intact and the staging table is gone.
            assert conn.execute(sa.text("SELECT count(*) FROM scores")).scalar_one() == n
            tables = sa.inspect(conn).get_table_names()
            assert tables == ["scores"]
            # the run chose the column types, the dates are dates
            types = {c["name"]: str(c["type"]) for c in sa.inspect(conn).get_columns("scores")}
            assert types["as_of"] == types["expected_next_purchase_date"] == "DATE"
            assert types["churn_probability"] == "DOUBLE PRECISION"
        assert not (tmp_path / "b.parquet").exists()
    finally:
        engine.dispose()


def test_score_command(served, tmp_path, monkeypatch):
    monkeypatch.setenv("RAPPORT_HOME", str(served.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "scores.parquet"
    result = CliRunner().invoke(
        app,
        ["score", "--as-of", served.as_of.isoformat(), "--out", str(out), "--chunk-rows", "1000"],
    )
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(out)
    assert len(scores) == len(served.snapshot)
    assert scores["churn_probability"].between(0, 1).all()
    bad = CliRunner().invoke(app, ["score", "--as-of", "31/12/2024", "--out", str(out)])
    assert bad.exit_code == 2 and "YYYY-MM-DD" in bad.output
    # a cutoff before every purchase names the first one, instead of writing no batches
    tx = pd.read_parquet(served.transactions)
    first = tx.loc[tx["amount"] >= 0, "timestamp"].min().date()
    early = tmp_path / "early.parquet"
    before = CliRunner().invoke(app, ["score", "--as-of", "1990-01-01", "--out", str(early)])
    assert before.exit_code == 2, before.output
    assert f"before the first purchase in the transactions, on {first}" in " ".join(
        before.output.split()
    )
    assert not early.exists()

    # models chosen on the command line (a CDNOW model is not named rapport-churn)
    other = tmp_path / "challenger.parquet"
    chosen = CliRunner().invoke(
        app,
        ["score", "--as-of", served.as_of.isoformat(), "--out", str(other),
         "--alias", "challenger", "--clv-model", "rapport-clv"],
    )  # fmt: skip
    assert chosen.exit_code == 0, chosen.output
    assert (pd.read_parquet(other)["churn_model"] == "rapport-churn/1").all()

    # a user's own Parquet is validated like any other input, not scanned as it is: times in
    # another zone are converted, and a missing id is an error naming the column
    tx = pd.read_parquet(served.transactions)
    tx["timestamp"] = tx["timestamp"].dt.tz_localize("UTC").dt.tz_convert("Europe/Berlin")
    own = tmp_path / "own.parquet"
    tx.to_parquet(own)
    converted = CliRunner().invoke(
        app, ["score", "-t", str(own), "-i", str(served.interactions), "--out", str(other),
              "--as-of", served.as_of.isoformat()],
    )  # fmt: skip
    assert converted.exit_code == 0, converted.output

    def by_id(path):
        return pd.read_parquet(path).sort_values("customer_id").reset_index(drop=True)

    pd.testing.assert_frame_equal(by_id(other), by_id(out))
    tx["customer_id"] = tx["customer_id"].astype("float64")
    tx.loc[3, "customer_id"] = None
    tx.to_parquet(own)
    broken = CliRunner().invoke(app, ["score", "-t", str(own), "--out", str(other)])
    assert broken.exit_code == 2, broken.output
    assert "customer_id" in broken.output

    missing = CliRunner().invoke(
        app, ["score", "--out", str(other), "--churn-model", "rapport-cdnow-churn"]
    )
    assert missing.exit_code == 2, missing.output
    assert "rapport-cdnow-churn" in missing.output


def test_score_command_names_a_database_error_in_one_line(served, tmp_path, monkeypatch):
    monkeypatch.setenv("RAPPORT_HOME", str(served.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    absent = f"absent_{uuid.uuid4().hex[:8]}"
    url = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:5432/{absent}"
    out = tmp_path / "scores.parquet"
    result = CliRunner().invoke(
        app, ["score", "--as-of", served.as_of.isoformat(), "--out", str(out), "--db-url", url]
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.count("error:") == 1 and len(result.output) < 1_000, result.output
    assert "'rapport_scores'" in text and absent in text and "hunter2" not in text
    assert not out.exists() and list(tmp_path.iterdir()) == []
