"""The BentoML service: the class in-process, its ASGI app, a real `bentoml serve` of a built
Bento on loopback, and the TimeoutMiddleware fix."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from starlette.testclient import TestClient

from rapport.serving.auth import create_key
from rapport.serving.patches import patch_timeout_middleware


def _env(served, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"RAPPORT_HOME": str(served.home), **extra})
    return env


def test_service_class_in_process(served, state, monkeypatch):
    monkeypatch.setenv("RAPPORT_HOME", str(served.home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from rapport.serving.service import RapportService

    service = RapportService()
    assert service.state._loaded.wait(60)
    assert service.__is_ready__(), service.state.error
    ids = [str(c) for c in served.snapshot["customer_id"].head(5)]
    from rapport.serving.schemas import ByIdRequest

    result = service.state.score_ids(ByIdRequest(customer_ids=ids))
    expected = state.scorer.score_frame(served.snapshot.head(5))
    np.testing.assert_allclose(
        [s.churn_probability for s in result.scores], expected.churn_probability, rtol=1e-12
    )


def test_bentoml_asgi_app(served, state, monkeypatch, json_row, tmp_path):
    """The whole BentoML app (its middlewares, health, metrics, OpenAPI) in-process."""
    monkeypatch.setenv("RAPPORT_HOME", str(served.home))
    # `bentoml serve` sets this up for its workers; in-process the test does.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from rapport.serving.service import Rapport, app

    asgi = Rapport.to_asgi()
    with TestClient(asgi) as client:
        assert app.state.rapport._loaded.wait(60)
        assert client.get("/readyz").status_code == 200, app.state.rapport.error
        assert client.get("/livez").status_code == 200
        rows = [json_row(served.snapshot, i) for i in range(10)]
        r = client.post("/v1/score", json={"customers": rows})
        assert r.status_code == 200, r.text
        expected = state.scorer.score_frame(served.snapshot.head(10))
        got = [s["predicted_value"] for s in r.json()["scores"]]
        np.testing.assert_allclose(got, expected.predicted_value, rtol=1e-12)
        bad = client.post("/v1/score", json={"customers": [{"customer_id": "x"}]})
        assert bad.status_code == 422
        # Rapport's own counters show under a real server (multi-process registry), below.
        assert client.get("/metrics").status_code == 200
        spec = client.get("/docs.json").json()
        assert {"/v1/score", "/v1/score/by-id", "/v1/score/history", "/v1/info"} <= set(
            spec["paths"]
        )
        # Validation errors are documented as what they are: a list of located errors.
        ref = spec["paths"]["/v1/score"]["post"]["responses"]["422"]["content"]["application/json"][
            "schema"
        ]["$ref"]
        detail = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]["detail"]
        assert detail["type"] == "array"
        # BentoML's InvalidArgument schema (a 400 whose detail is a string, BentoML issue
        # 4232) describes its own @bentoml.api errors; no Rapport route answers with it.
        assert "#/components/schemas/InvalidArgument" not in json.dumps(spec)
        # (tests/serving/test_api.py fuzzes these routes with schemathesis; through BentoML's
        # ASGI app each fuzz call would start a fresh service instance.)


# -- the TimeoutMiddleware fix ------------------------------------------------------------------


async def _ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _failing_app(scope, receive, send):
    raise RuntimeError("boom before any response")


async def _never_app(scope, receive, send):
    await asyncio.Event().wait()


def _run(middleware, timeout_check=None):
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    async def main():
        loop = asyncio.get_running_loop()
        await middleware({"type": "http", "path": "/"}, receive, send)
        pending = [h for h in getattr(loop, "_scheduled", []) if not h.cancelled()]
        return pending

    return asyncio.run(main()), sent


def test_timeout_middleware_cancels_its_timer():
    patch_timeout_middleware()
    assert patch_timeout_middleware() is False  # idempotent
    pending, sent = _run(TimeoutMiddleware(_ok_app, timeout=60))
    assert sent[0]["status"] == 200
    # Upstream leaves a 60 s timer (holding the request) on the loop for every request.
    assert pending == []


def test_timeout_middleware_still_times_out_and_fails_fast():
    patch_timeout_middleware()
    _, sent = _run(TimeoutMiddleware(_never_app, timeout=0.05))
    assert sent[0]["status"] == 504
    # An app that fails before responding no longer parks the client for the whole timeout.
    with pytest.raises(RuntimeError, match="boom"):
        _run(TimeoutMiddleware(_failing_app, timeout=3600))
    gc.collect()


# -- a real server ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers or {}), timeout=timeout
        ) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_ready(proc: subprocess.Popen, url: str, seconds: float = 120) -> int:
    """Poll ``url`` until it answers 200, the process dies, or the deadline passes.

    The deadline is generous: a cold start imports MLflow and LightGBM.
    """
    status, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        status, _ = _get(url, timeout=1)
        if status == 200:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)  # returns at once if the server dies
    return status


def _running(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_built_bento_served_by_bentoml_on_loopback(served, state, tmp_path):
    rapport = shutil.which("rapport", path=str(Path(sys.executable).parent))
    assert rapport, "the rapport console script is not installed"
    env = _env(served, BENTOML_HOME=str(tmp_path / "bentoml"))
    build = subprocess.run(
        [rapport, "serve", "build", "--build-dir", str(tmp_path / "build")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    bentofile = yaml.safe_load((tmp_path / "build" / "bentofile.yaml").read_text())
    assert bentofile["labels"] == {"churn_model": "rapport-churn/1", "clv_model": "rapport-clv/1"}
    assert [m.split(":")[0] for m in bentofile["models"]] == ["rapport-churn", "rapport-clv"]
    assert any(p.startswith("lightgbm==") for p in bentofile["python"]["packages"])

    port = _free_port()
    # Keys asked for on loopback too: the Bento's service guards its routes like the package's.
    _, key = create_key(tmp_path / "keys.json", "test")
    auth = {"Authorization": f"Bearer {key}"}
    env["RAPPORT_API_KEYS_FILE"] = str(tmp_path / "keys.json")
    proc = subprocess.Popen(
        [rapport, "serve", "--port", str(port), "--require-api-key"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        status = _wait_ready(proc, f"{base}/readyz")
        assert status == 200, f"server not ready (exit code {proc.poll()})"
        status, info = _post(f"{base}/v1/score/by-id", {"customer_ids": ["1"]})
        assert status == 401, info
        assert _get(f"{base}/metrics")[0] == 401
        status, info = _post(
            f"{base}/v1/score/by-id", {"customer_ids": ["1", "nobody"]}, headers=auth
        )
        assert status == 200, info
        assert info["missing"] == [
            {"customer_id": "nobody", "reason": "not in the feature snapshot"}
        ]
        ids = [str(c) for c in served.snapshot["customer_id"].head(20)]
        status, body = _post(f"{base}/v1/score/by-id", {"customer_ids": ids}, headers=auth)
        assert status == 200
        expected = state.scorer.score_frame(served.snapshot.head(20))
        np.testing.assert_allclose(
            [s["churn_probability"] for s in body["scores"]], expected.churn_probability
        )
        np.testing.assert_allclose(
            [s["predicted_value"] for s in body["scores"]], expected.predicted_value
        )
        _, raw = _get(f"{base}/v1/info", headers=auth)
        models = json.loads(raw)["models"]
        # The snapshot (as of 2024-12-31) is older than RAPPORT_SNAPSHOT_MAX_AGE_DAYS' 7 days.
        assert "days ago" in " ".join(json.loads(raw)["warnings"])
        assert [(m["name"], m["version"]) for m in models] == [
            ("rapport-churn", "1"),
            ("rapport-clv", "1"),
        ]
        # Served from the Bento's pinned copies, not from the registry.
        assert [m["source"].split(":")[0] for m in models] == ["bentoml"] * 2
        status, metrics = _get(f"{base}/metrics", headers=auth)
        assert status == 200 and b"rapport_customers_scored_total" in metrics
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_the_whole_server_on_a_signal(served, signum, tmp_path):
    """`rapport serve` passes the signal to `bentoml serve` and its workers, and waits."""
    import psutil

    rapport = shutil.which("rapport", path=str(Path(sys.executable).parent))
    assert rapport, "the rapport console script is not installed"
    port = _free_port()
    log = tmp_path / "serve.log"
    # Its own session, as a shell would start it: the signal goes to `rapport serve` alone.
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [rapport, "serve", "--registry", "--port", str(port)],
            env=_env(served),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        status = _wait_ready(proc, f"http://127.0.0.1:{port}/readyz")
        assert status == 200, f"server not ready (exit code {proc.poll()})"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2  # `bentoml serve` and its worker
        os.kill(proc.pid, signum)
        assert proc.wait(timeout=60) == 0
        alive = [c for c in children if _running(c)]
        assert alive == [], [c.cmdline() for c in alive]
        assert not _answers(port)
        # The service said at start that the snapshot (as of 2024-12-31) is stale.
        assert "RAPPORT_SNAPSHOT_MAX_AGE_DAYS=7" in log.read_text()
    finally:
        # Whatever is left (the old behaviour), so that it does not outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.pid != proc.pid:
                    child.kill()
        proc.wait(timeout=30)
