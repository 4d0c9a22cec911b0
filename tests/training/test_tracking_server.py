"""Training against a real MLflow tracking server backed by PostgreSQL (on loopback).

The server is what a team runs (``mlflow server`` on PostgreSQL, artifacts proxied by the
server); Rapport only sees ``MLFLOW_TRACKING_URI``. The test makes its own database and drops
it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import psycopg
import pytest
from mlflow import MlflowClient

from rapport.training import pipeline
from rapport.training.config import ModelConfig
from rapport.training.settings import TrainingSettings

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_db() -> Iterator[str]:
    name = f"rapport_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:  # pragma: no cover - the CI machine has one
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is not reachable: {err}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def tracking_server(postgres_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    artifacts = tmp_path_factory.mktemp("server_artifacts")
    log = (tmp_path_factory.mktemp("server_log") / "mlflow.log").open("w")
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen(
        [
            mlflow_bin, "server",
            "--backend-store-uri", postgres_db,
            "--artifacts-destination", str(artifacts),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: see {log.name}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"mlflow server did not start in 120 s: {log.name}"
                    ) from None
                # Wait on the process itself between polls: it returns at once if it dies.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_training_tracks_and_registers_on_a_postgres_backed_server(
    tracking_server: str,
    postgres_db: str,
    small_world: dict[str, Path],
    fast_config: Callable[..., ModelConfig],
    tmp_path: Path,
) -> None:
    settings = TrainingSettings(home=tmp_path / "home", mlflow_tracking_uri=tracking_server)
    result = pipeline.train(
        fast_config("churn"), small_world["transactions"], small_world["interactions"],
        settings=settings,
    )  # fmt: skip
    assert result.promoted
    client = MlflowClient(tracking_server)
    assert str(client.get_model_version_by_alias("rapport-churn", "champion").version) == "1"
    assert client.get_run(result.run_id).data.metrics["test_roc_auc"] > 0.5
    # Nothing went to the embedded store: the server holds it all.
    assert not (tmp_path / "home" / "mlflow.db").exists()
    # The model comes back through the server's artifact proxy and scores.
    mlflow.set_tracking_uri(tracking_server)
    loaded = mlflow.pyfunc.load_model("models:/rapport-churn@champion")
    assert loaded.metadata.metadata["task"] == "churn"
    # And the runs are rows in PostgreSQL, not files.
    with psycopg.connect(postgres_db.replace("+psycopg", "")) as conn:
        (runs,) = conn.execute("SELECT count(*) FROM runs").fetchone() or (0,)
    assert runs == 1
