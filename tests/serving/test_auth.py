"""API keys: the keys file, `rapport keys`, the middleware in-process, and `rapport serve`."""

from __future__ import annotations

import json
import os
import stat

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from typer.testing import CliRunner

from rapport.serving.api import create_app
from rapport.serving.auth import (
    KeyChecker,
    ServerKeyMiddleware,
    create_key,
    read_keys,
    revoke_key,
    serve_check,
)
from rapport.serving.cli import app as cli
from rapport.serving.settings import ServingSettings, is_loopback


def test_keys_file_keeps_hashes_only_and_several_keys(tmp_path):
    path = tmp_path / "keys.json"
    first, key1 = create_key(path, "ci")
    second, key2 = create_key(path)
    assert key1 != key2 and key1.startswith("rk_") and len(key1) > 40
    assert [k.name for k in read_keys(path)] == ["ci", "key-1"]
    text = path.read_text()
    assert key1 not in text and key2 not in text
    assert first.sha256 in text and second.sha256 in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temporary file left
    with pytest.raises(ValueError, match="exists"):
        create_key(path, "ci")
    with pytest.raises(ValueError, match="letters"):
        create_key(path, "no spaces")
    assert revoke_key(path, "ci").name == "ci"
    assert [k.name for k in read_keys(path)] == ["key-1"]
    with pytest.raises(KeyError):
        revoke_key(path, "ci")


def test_checker_rereads_the_file_when_it_changes(tmp_path):
    path = tmp_path / "keys.json"
    checker = KeyChecker(path)
    assert not checker.valid("anything")  # no file: no key is valid
    _, key = create_key(path, "a")
    assert checker.valid(key) and not checker.valid(key + "x")
    _, other = create_key(path, "b")
    assert checker.valid(other)
    revoke_key(path, "a")
    assert not checker.valid(key) and checker.valid(other)
    path.write_text("{not json")
    assert not checker.valid(other)  # a broken file locks out, never opens up


def test_keys_are_required_off_loopback_unless_set():
    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "127.1.2.3"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.com"))
    assert not ServingSettings(host="127.0.0.1").keys_required
    assert ServingSettings(host="0.0.0.0").keys_required
    assert ServingSettings(host="127.0.0.1", require_api_key=True).keys_required
    assert not ServingSettings(host="0.0.0.0", require_api_key=False).keys_required


def test_serve_refuses_required_keys_without_any_and_warns_when_opened(tmp_path):
    keys = tmp_path / "keys.json"
    error, _ = serve_check(ServingSettings(host="0.0.0.0", api_keys_file=keys))
    assert error and "rapport keys create" in error
    create_key(keys, "a")
    assert serve_check(ServingSettings(host="0.0.0.0", api_keys_file=keys)) == (None, None)
    _, warning = serve_check(
        ServingSettings(host="0.0.0.0", api_keys_file=keys, require_api_key=False)
    )
    assert warning and "--no-require-api-key" in warning
    assert serve_check(ServingSettings(host="127.0.0.1", api_keys_file=keys)) == (None, None)


def test_keys_commands(tmp_path):
    runner = CliRunner()
    env = {"RAPPORT_HOME": str(tmp_path)}
    made = runner.invoke(cli, ["keys", "create", "--name", "dashboard"], env=env)
    assert made.exit_code == 0, made.output
    key = made.stdout.strip()
    assert key.startswith("rk_")
    assert KeyChecker(tmp_path / "api_keys.json").valid(key)
    listed = runner.invoke(cli, ["keys", "list"], env=env)
    assert listed.exit_code == 0 and "dashboard" in listed.stdout and key not in listed.output
    again = runner.invoke(cli, ["keys", "create", "--name", "dashboard"], env=env)
    assert again.exit_code == 2
    assert runner.invoke(cli, ["keys", "revoke", "dashboard"], env=env).exit_code == 0
    assert not KeyChecker(tmp_path / "api_keys.json").valid(key)
    assert runner.invoke(cli, ["keys", "revoke", "dashboard"], env=env).exit_code == 2


@pytest.fixture
def keyed(served, state, tmp_path):
    """The scoring app with keys required, and one key."""
    path = tmp_path / "keys.json"
    _, key = create_key(path, "test")
    settings = served.settings(require_api_key=True, api_keys_file=path)
    with TestClient(create_app(state, settings=settings)) as client:
        yield client, key, path


def test_scoring_and_info_need_a_key(keyed, served):
    client, key, _ = keyed
    ids = {"customer_ids": [str(served.snapshot["customer_id"].iloc[0])]}
    for method, path, body in (
        ("POST", "/score/by-id", ids),
        ("POST", "/score", {"customers": [{"customer_id": "x"}]}),
        ("POST", "/score/history", {"customers": []}),
        ("GET", "/info", None),
        ("GET", "/ready", None),
    ):
        r = client.request(method, path, json=body)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        bad = client.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and "invalid_token" in bad.headers["www-authenticate"]
    ok = client.post("/score/by-id", json=ids, headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["scores"]) == 1
    assert client.get("/info", headers={"Authorization": f"bearer {key}"}).status_code == 200
    # The API description stays readable: it holds no customer data.
    assert client.get("/openapi.json").status_code == 200


def test_revoking_a_key_takes_effect_without_a_restart(keyed, served):
    client, key, path = keyed
    _, spare = create_key(path, "spare")
    ids = {"customer_ids": ["1"]}
    for k in (key, spare):
        assert client.post(
            "/score/by-id", json=ids, headers={"Authorization": f"Bearer {k}"}
        ).is_success
    revoke_key(path, "test")
    r = client.post("/score/by-id", json=ids, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401
    r = client.post("/score/by-id", json=ids, headers={"Authorization": f"Bearer {spare}"})
    assert r.status_code == 200


def test_loopback_default_needs_no_key(served, state):
    with TestClient(create_app(state, settings=served.settings())) as client:
        assert client.post("/score/by-id", json={"customer_ids": ["1"]}).status_code == 200


def _server_app(settings: ServingSettings) -> Starlette:
    """BentoML's own routes, stood in for by plain ones behind the server middleware."""
    ok = PlainTextResponse("ok")
    routes = [Route(p, lambda _: ok) for p in ("/livez", "/readyz", "/metrics", "/v1/info")]
    return ServerKeyMiddleware(Starlette(routes=routes), settings)  # type: ignore[return-value]


def test_metrics_behind_the_key_health_open_by_default(tmp_path):
    path = tmp_path / "keys.json"
    _, key = create_key(path, "a")
    auth = {"Authorization": f"Bearer {key}"}
    required = ServingSettings(require_api_key=True, api_keys_file=path)
    with TestClient(_server_app(required)) as c:
        assert c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=auth).status_code == 200
        # The scoring app's routes are the scoring app's to guard.
        assert c.get("/v1/info").status_code == 200
    strict = ServingSettings(require_api_key=True, api_keys_file=path, health_needs_key=True)
    with TestClient(_server_app(strict)) as c:
        assert c.get("/livez").status_code == 401
        assert c.get("/livez", headers=auth).status_code == 200
    loose = ServingSettings(require_api_key=True, api_keys_file=path, metrics_need_key=False)
    with TestClient(_server_app(loose)) as c:
        assert c.get("/metrics").status_code == 200
    with TestClient(_server_app(ServingSettings(api_keys_file=path))) as c:
        assert c.get("/metrics").status_code == 200  # loopback: no keys unless asked


def test_401_body_is_json(keyed):
    client, _, _ = keyed
    r = client.get("/info")
    assert "rapport keys create" in json.loads(r.text)["detail"]
