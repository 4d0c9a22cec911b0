"""Score tables on a real PostgreSQL (127.0.0.1:5432) and SQLite: bulk load, swap, leftovers."""

from __future__ import annotations

import datetime as dt
import inspect
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa

from rapport.serving import batch
from rapport.serving.batch import OUTPUT_COLUMNS, remove_stale_parts, score_batch
from rapport.serving.cli import score as score_command
from rapport.serving.db_output import (
    RUN_LOCK,
    DatabaseOutputError,
    TableOutput,
    lock_key,
    staging_name,
)

SERVER = "host=127.0.0.1 port=5432 user=postgres"
#: The most rows a multi-row INSERT of the 13 score columns can bind (65,535 parameters).
INSERT_LIMIT_ROWS = 65_535 // len(OUTPUT_COLUMNS)


@pytest.fixture(scope="module")
def pg_url():
    name = f"rapport_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(SERVER, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(SERVER, autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'scores.db'}"
    return request.getfixturevalue("pg_url")


def scores(n: int, *, seed: int = 0, run: str = "run-a") -> pd.DataFrame:
    """A score frame shaped like :func:`score_chunks`' output, with ``run`` as its models."""
    rng = np.random.default_rng(seed)
    days = rng.integers(0, 365, n).astype("timedelta64[D]")
    waiting = rng.exponential(40.0, n)
    waiting[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame(
        {
            "customer_id": [f"{run}-{i}" for i in range(n)],
            "as_of": pd.Series(pd.Timestamp("2024-12-31"), index=range(n)),
            "churn_probability": rng.random(n),
            "risk_tier": pd.Categorical(rng.choice(["low", "medium", "high"], n)),
            "predicted_value": rng.gamma(2.0, 50.0, n),
            "p_alive": rng.random(n),
            "expected_purchases": rng.random(n) * 3,
            "expected_days_to_next_purchase": waiting,
            "expected_next_purchase_date": pd.Series(
                np.where(
                    np.isnan(waiting), np.datetime64("NaT"), np.datetime64("2025-01-01") + days
                )
            ).astype("datetime64[s]"),
            "segment": rng.choice(["champions", "at risk", "new"], n),
            "currency": pd.Series("EUR", index=range(n), dtype="string"),
            "churn_model": run,
            "clv_model": "rapport-clv/1",
        }
    )


def read_table(url: str, table: str) -> pd.DataFrame:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            reflected = sa.Table(table, sa.MetaData(), autoload_with=conn)
            rows = conn.execute(sa.select(reflected)).all()
            # object columns keep NULL as None
            return pd.DataFrame(rows, columns=list(reflected.columns.keys()), dtype=object)
    finally:
        engine.dispose()


def table_names(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return sorted(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()


def gone_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_rows_read_back_exactly_with_nulls_as_null(url, tmp_path):
    frame = scores(6)
    frame["segment"] = ["tab\there", "line\nbreak\r", "back\\slash", "\\N", "", None]
    frame["customer_id"] = ["a", 'quote"d', "naïve ☃", "comma,sep", "x" * 300, "z"]
    frame["churn_probability"] = [0.1, 1e-300, np.inf, -np.inf, np.nan, 1 / 3]
    frame.loc[1, "currency"] = pd.NA
    score_batch([frame.iloc[:2], frame.iloc[2:]], tmp_path / "s.parquet", database_url=url)

    back = read_table(url, "rapport_scores").sort_values("customer_id").reset_index(drop=True)
    want = frame.sort_values("customer_id").reset_index(drop=True)
    assert list(back.columns) == list(OUTPUT_COLUMNS)
    assert back["customer_id"].tolist() == want["customer_id"].tolist()
    assert back["segment"].tolist() == [None if pd.isna(v) else v for v in want["segment"]]
    assert back["currency"].tolist() == [None if pd.isna(v) else v for v in want["currency"]]
    probability = back["churn_probability"].tolist()
    assert [v is None for v in probability] == want["churn_probability"].isna().tolist()
    assert [v for v in probability if v is not None] == want["churn_probability"].dropna().tolist()
    assert back["as_of"].tolist() == [dt.date(2024, 12, 31)] * 6
    dates = [None if pd.isna(v) else v.date() for v in want["expected_next_purchase_date"]]
    assert back["expected_next_purchase_date"].tolist() == dates


def test_postgres_columns_have_explicit_types(pg_url, tmp_path):
    score_batch([scores(10)], tmp_path / "s.parquet", database_url=pg_url, table="typed")
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            types = dict(
                conn.execute(
                    sa.text(
                        "SELECT column_name, data_type FROM information_schema.columns "
                        "WHERE table_name = 'typed'"
                    )
                ).all()
            )
    finally:
        engine.dispose()
    assert types == {
        **{c: "text" for c in ("customer_id", "risk_tier", "segment", "currency")},
        **{c: "text" for c in ("churn_model", "clv_model")},
        **{c: "date" for c in ("as_of", "expected_next_purchase_date")},
        **{c: "double precision" for c in ("churn_probability", "predicted_value", "p_alive")},
        **{c: "double precision" for c in ("expected_purchases", "expected_days_to_next_purchase")},
    }


def test_a_default_sized_chunk_over_the_insert_parameter_limit_loads(pg_url, tmp_path):
    # one chunk of `rapport score`'s default size, far past what a multi-row INSERT binds
    rows = inspect.signature(score_command).parameters["chunk_rows"].default
    assert rows > INSERT_LIMIT_ROWS
    frame = scores(rows, seed=3)
    result = score_batch([frame], tmp_path / "s.parquet", database_url=pg_url, table="big")
    assert result.rows == rows and result.chunks == 1
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            query = "SELECT count(*), count(DISTINCT customer_id), sum(predicted_value) FROM big"
            count, distinct, total = conn.execute(sa.text(query)).one()
    finally:
        engine.dispose()
    assert count == distinct == rows
    assert total == pytest.approx(frame["predicted_value"].sum(), rel=1e-12)


def test_sqlite_takes_chunks_over_its_parameter_limit(tmp_path):
    url = f"sqlite:///{tmp_path / 'scores.db'}"
    score_batch([scores(20_000)], tmp_path / "s.parquet", database_url=url)
    assert len(read_table(url, "rapport_scores")) == 20_000


def _race(url: str, runs: dict[str, pd.DataFrame], tmp_path: Path) -> dict[str, object]:
    """Run ``runs`` at once to one table: each loads a chunk, then all finish together."""
    started, finishing = (
        threading.Barrier(len(runs), timeout=60),
        threading.Barrier(len(runs), timeout=60),
    )
    outcome: dict[str, object] = {}

    def chunks(frame: pd.DataFrame):
        yield frame.iloc[:5_000]
        started.wait()
        for at in range(5_000, len(frame), 5_000):
            yield frame.iloc[at : at + 5_000]
        finishing.wait()

    def run(name: str) -> None:
        try:
            out = tmp_path / f"{name}.parquet"
            outcome[name] = score_batch(chunks(runs[name]), out, database_url=url, table="shared")
        except Exception as err:  # reported by the caller's assertion
            outcome[name] = err

    threads = [threading.Thread(target=run, args=(name,)) for name in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return outcome


def test_concurrent_runs_leave_one_whole_result(url, tmp_path):
    runs = {name: scores(20_000, seed=seed, run=name) for seed, name in enumerate(["a", "b"])}
    for _ in range(3):
        outcome = _race(url, runs, tmp_path)
        assert all(isinstance(outcome.get(n), batch.BatchResult) for n in runs), outcome
        table = read_table(url, "shared")
        winners = table["churn_model"].unique().tolist()
        assert len(winners) == 1, winners
        got = table.sort_values("customer_id")["churn_probability"].to_numpy(dtype=float)
        want = runs[winners[0]].sort_values("customer_id")["churn_probability"].to_numpy()
        np.testing.assert_array_equal(got, want)
        assert [n for n in table_names(url) if n.startswith("shared")] == ["shared"]


def test_leftovers_of_gone_runs_are_removed_and_live_runs_kept(pg_url, tmp_path):
    dead = f"left__staging_{gone_pid()}_deadbeef"
    live = staging_name("left")
    other = f"elsewhere__staging_{gone_pid()}_deadbeef"
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            for name in (dead, live, other, "left__staging"):
                conn.execute(sa.text(f'CREATE TABLE "{name}" (x int)'))
        # a live run holds its staging name's lock on its own connection
        with engine.connect() as holder:
            holder.execute(
                sa.text("SELECT pg_advisory_lock(:a, :b)"), {"a": RUN_LOCK, "b": lock_key(live)}
            )
            with TableOutput(pg_url, "left") as output:
                assert sorted(output.removed) == sorted([dead, "left__staging"])
    finally:
        engine.dispose()
    assert table_names(pg_url).count(live) == 1 and other in table_names(pg_url)
    assert dead not in table_names(pg_url)


def test_sqlite_leftovers_are_judged_by_their_process(tmp_path):
    url = f"sqlite:///{tmp_path / 'scores.db'}"
    dead = f"left__staging_{gone_pid()}_deadbeef"
    mine = f"left__staging_{os.getpid()}_cafef00d"
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for name in (dead, mine, "left__staging"):
                conn.execute(sa.text(f'CREATE TABLE "{name}" (x int)'))
    finally:
        engine.dispose()
    with TableOutput(url, "left") as output:
        assert sorted(output.removed) == sorted([dead, "left__staging"])
    assert table_names(url) == [mine]


def test_stale_temporary_parquet_files_are_removed(tmp_path):
    out = tmp_path / "scores.parquet"
    host = batch._HOST
    old = time.time() - batch.STALE_AFTER.total_seconds() - 60
    files = {
        "dead": f".scores.parquet.{host}.{gone_pid()}.0badf00d.tmp",
        "mine": f".scores.parquet.{host}.{os.getpid()}.0badf00d.tmp",
        "elsewhere": ".scores.parquet.otherhost.1.0badf00d.tmp",
        "elsewhere_old": ".scores.parquet.otherhost.2.0badf00d.tmp",
        "unnamed_old": f".scores.parquet.{uuid.uuid4().hex}.tmp",
        "unnamed": f".scores.parquet.{uuid.uuid4().hex}.tmp",
        "other_output": f".other.parquet.{host}.{gone_pid()}.0badf00d.tmp",
    }
    for key, name in files.items():
        (tmp_path / name).write_bytes(b"PAR1")
        if key.endswith("_old"):
            os.utime(tmp_path / name, (old, old))
    removed = {p.name for p in remove_stale_parts(out)}
    assert removed == {files[k] for k in ("dead", "elsewhere_old", "unnamed_old")}
    assert {p.name for p in tmp_path.iterdir()} == {
        files[k] for k in ("mine", "elsewhere", "unnamed", "other_output")
    }


KILLED_RUN = """
import sys
from pathlib import Path
from rapport.serving.batch import score_batch
sys.path.insert(0, {tests!r})
from test_db_output import scores

def chunks():
    yield scores(1_000, run="killed")
    Path({ready!r}).write_text("loaded")
    sys.stdin.read()  # waits for the kill
    yield scores(1_000, seed=9, run="killed")

score_batch(chunks(), Path({out!r}), database_url={url!r}, table="victim")
"""


def test_a_killed_run_is_cleaned_up_by_the_next(pg_url, tmp_path):
    out, ready = tmp_path / "scores.parquet", tmp_path / "ready"
    app = f"killed_{uuid.uuid4().hex[:8]}"
    script = KILLED_RUN.format(
        tests=str(Path(__file__).parent), ready=str(ready), out=str(out),
        url=f"{pg_url}?application_name={app}",
    )  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, "the run ended before loading a chunk"
            assert time.monotonic() < deadline, "the run did not load a chunk in time"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    staging = [n for n in table_names(pg_url) if n.startswith("victim__staging_")]
    parts = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(staging) == 1 and len(parts) == 1  # what the killed run left behind
    _wait_until_disconnected(app)

    score_batch([scores(500, run="next")], out, database_url=pg_url, table="victim")
    assert table_names(pg_url).count("victim") == 1
    assert not [n for n in table_names(pg_url) if n.startswith("victim__")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready", "scores.parquet"]
    assert read_table(pg_url, "victim")["churn_model"].unique().tolist() == ["next"]


def _wait_until_disconnected(app: str) -> None:
    """Wait until the server has ended the killed client's session (it notices the close)."""
    deadline = time.monotonic() + 30
    with psycopg.connect(SERVER, autocommit=True) as con:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        while con.execute(query, (app,)).fetchone() != (0,):
            assert time.monotonic() < deadline, "the killed run's session is still open"
            time.sleep(0.05)


def test_a_missing_database_is_one_short_line_without_the_password(tmp_path):
    url = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:5432/absent_{uuid.uuid4().hex[:8]}"
    with pytest.raises(DatabaseOutputError) as caught:
        score_batch([scores(10)], tmp_path / "s.parquet", database_url=url, table="t1")
    message = str(caught.value)
    assert "\n" not in message and len(message) < 500
    assert "'t1'" in message and url.rsplit("/", 1)[1] in message
    assert "hunter2" not in message
    assert list(tmp_path.iterdir()) == []


def test_a_refused_swap_is_one_line_and_keeps_the_old_outputs(pg_url, tmp_path):
    out = tmp_path / "s.parquet"
    score_batch([scores(100, run="first")], out, database_url=pg_url, table="viewed")
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE VIEW viewed_view AS SELECT * FROM viewed"))
        frame = scores(INSERT_LIMIT_ROWS + 1, seed=5, run="second")
        with pytest.raises(DatabaseOutputError) as caught:
            score_batch([frame], out, database_url=pg_url, table="viewed")
        message = str(caught.value)
        assert "\n" not in message and len(message) < 500
        assert "'viewed'" in message and "depend" in message
        assert not re.search(r"second-\d", message)  # no rows echoed
        assert read_table(pg_url, "viewed")["churn_model"].unique().tolist() == ["first"]
        assert pd.read_parquet(out)["churn_model"].unique().tolist() == ["first"]
        assert not [n for n in table_names(pg_url) if n.startswith("viewed__")]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.parquet"]
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP VIEW IF EXISTS viewed_view"))
        engine.dispose()
