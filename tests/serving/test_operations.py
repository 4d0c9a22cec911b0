"""Operating the service: bounded metric labels, answers that name no server folders, a
corrupt snapshot that only scoring by id feels, and a killed worker logged and replaced."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from starlette.testclient import TestClient

from rapport.serving.api import create_app
from rapport.serving.core import ServiceState
from rapport.serving.metrics import UNMATCHED, RouteLabels
from rapport.serving.redact import redact, shown_path
from rapport.serving.settings import ServingSettings
from rapport.serving.workers import describe_exit


def _series(metrics: str) -> set[str]:
    """Names and labels of every sample in a Prometheus text page."""
    return {ln.rsplit(" ", 1)[0] for ln in metrics.splitlines() if ln and not ln.startswith("#")}


def _random_paths(n: int) -> list[str]:
    rng = random.Random(0)
    word = lambda: "".join(rng.choices(string.ascii_lowercase, k=10))  # noqa: E731
    return [f"/{word()}/{i}" if i % 2 else f"/v1/{word()}" for i in range(n)]


#: The BentoML app in a process of its own, set up as `bentoml serve` sets up a worker (the
#: multi-process metrics directory named before anything imports prometheus_client): a
#: few known routes, then 300 random 404 URLs; the /metrics page before and after them.
METRICS_PROCESS = """
import json, sys
from starlette.testclient import TestClient
from rapport.serving.service import Rapport

paths = json.loads(sys.argv[1])
with TestClient(Rapport.to_asgi()) as client:
    client.post("/v1/score/by-id", json={"customer_ids": ["1"]})
    client.get("/v1/info")
    for path in paths[:4]:
        client.get(path)
    before = client.get("/metrics").text
    statuses = sorted({client.get(path).status_code for path in paths[4:]})
    after = client.get("/metrics").text
print(json.dumps({"before": before, "after": after, "statuses": statuses}))
"""


def test_metrics_label_requests_by_route_and_404s_add_no_series(tmp_path):
    paths = _random_paths(304)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # no models in this home: scoring answers 503, labelled all the same
    env.update(RAPPORT_HOME=str(tmp_path / "home"), PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", METRICS_PROCESS, json.dumps(paths)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pages = json.loads(done.stdout.strip().splitlines()[-1])
    assert pages["statuses"] == [404]
    assert _series(pages["after"]) == _series(pages["before"])
    assert not any(f'"{path}"' in pages["after"] for path in paths)
    assert f'endpoint="{UNMATCHED}"' in pages["after"]
    assert 'endpoint="/v1/score/by-id"' in pages["after"]
    assert 'endpoint="/v1/info"' in pages["after"]


def test_route_labels_use_templates_and_static_folders():
    labels = RouteLabels(lambda: ["/v1/score", "/v1/items/{item_id}"], ["/static_content"])
    assert labels("/v1/score") == "/v1/score"
    assert labels("/v1/items/42") == "/v1/items/{item_id}"
    assert labels("/v1/items/42/more") == UNMATCHED
    assert labels("/static_content/app.js") == "/static_content/{path}"
    assert labels("/v1/score/") == UNMATCHED


def test_paths_in_answers_are_relative_to_home(tmp_path):
    home = tmp_path / "home"
    assert shown_path(home / "snapshot.parquet", home) == "snapshot.parquet"
    assert shown_path("/elsewhere/data/snap.parquet", home) == "snap.parquet"
    text = f"cannot open '{home}/a/b.parquet', '/srv/x/c.parquet' in sqlite:///{home}/mlflow.db"
    assert redact(text, home) == (
        "cannot open '$RAPPORT_HOME/a/b.parquet', 'c.parquet' in sqlite:///$RAPPORT_HOME/mlflow.db"
    )
    assert redact("see http://mlflow:5000/api/2.0/x", home) == "see http://mlflow:5000/api/2.0/x"


def _no_folders(body: str, *folders: Path) -> None:
    for folder in folders:
        assert str(folder) not in body and str(folder.resolve()) not in body, body


def test_a_failed_load_answers_503_naming_the_store_relative_to_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    state = ServiceState(ServingSettings(home=tmp_path)).load()
    client = TestClient(create_app(state))
    answer = client.post("/score/by-id", json={"customer_ids": ["1"]})
    assert answer.status_code == 503
    assert "$RAPPORT_HOME/mlflow.db" in answer.json()["detail"]
    info = client.get("/info")
    for body in (answer.text, info.text):
        _no_folders(body, tmp_path)


def test_a_corrupt_snapshot_fails_scoring_by_id_only(served, tmp_path, tmp_path_factory, json_row):
    corrupt = tmp_path / "snapshot.parquet"
    corrupt.write_bytes(b"PAR1 then nothing a parquet reader can use")
    state = ServiceState(served.settings(snapshot=corrupt)).load()
    client = TestClient(create_app(state))
    # (the app alone: BentoML mounts it under /v1)
    assert client.get("/ready").status_code == 200  # ready: the models are loaded
    by_id = client.post("/score/by-id", json={"customer_ids": ["1"]})
    assert by_id.status_code == 503
    detail = by_id.json()["detail"]
    assert "snapshot.parquet not loaded" in detail and "scoring by id" in detail
    rows = client.post("/score", json={"customers": [json_row(served.snapshot, 0)]})
    assert rows.status_code == 200, rows.text
    info = client.get("/info")
    assert info.status_code == 200 and info.json()["snapshot"] is None
    assert any("snapshot.parquet not loaded" in w for w in info.json()["warnings"])
    for body in (by_id.text, info.text):
        _no_folders(body, tmp_path_factory.getbasetemp(), served.home)


def test_info_names_the_snapshot_relative_to_home(state):
    info = state.info()
    assert info.snapshot is not None and info.snapshot.path == "snapshot.parquet"
    _no_folders(info.model_dump_json(), state.settings.home)


def test_exit_statuses_are_named():
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(None) == "an unknown status"


# -- a real server ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(url: str, body: dict | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def _poll(proc: subprocess.Popen, ok: object, seconds: float = 180) -> bool:
    """Call ``ok()`` until it is true, the server exits, or the deadline passes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if ok():  # type: ignore[operator]
            return True
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)
    return False


def _worker(root: int) -> psutil.Process:
    for child in psutil.Process(root).children(recursive=True):
        if any("_bentoml_impl.worker" in part for part in child.cmdline()):
            return child
    raise LookupError("no worker")


@pytest.mark.slow
def test_a_killed_worker_is_logged_and_replaced_from_the_cache(served, tmp_path):
    rapport = shutil.which("rapport", path=str(Path(sys.executable).parent))
    assert rapport, "the rapport console script is not installed"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RAPPORT_HOME"] = str(served.home)
    port, log = _free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [rapport, "serve", "--registry", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    scored = lambda: _status(f"{base}/v1/score/by-id", {"customer_ids": ["1"]}) == 200  # noqa: E731
    try:
        assert _poll(proc, scored), f"never served (exit code {proc.poll()})"
        first = _worker(proc.pid)
        first.kill()
        first.wait(timeout=30)
        assert _poll(proc, scored), "no worker served after the kill"
        assert _worker(proc.pid).pid != first.pid
        text = log.read_text()
        assert f"worker service (pid {first.pid}) died: signal SIGKILL" in text
        # The server recorded what it serves; the replacement loaded the local copies.
        assert list((served.home / "cache" / "servers").glob("*.json"))
        assert list((served.home / "cache" / "models").glob("*/rapport-churn/1/MLmodel"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
