"""Request bounds: body size, id lengths, event counts, the history time budget, health checks
during history scoring, and 4xx (never 5xx) for NaN, infinities and lone surrogates."""

from __future__ import annotations

import copy
import json
import threading
import time

import pandas as pd
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from rapport.serving import history
from rapport.serving.api import create_app
from rapport.serving.core import ServiceState
from rapport.serving.limits import BudgetExceededError, Deadline, safe_errors
from rapport.serving.schemas import HistoryRequest


def _strict(text: str):
    """JSON as a strict parser reads it: NaN or Infinity in a body is an error."""

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _app_state(served, state, **settings) -> ServiceState:
    """A state with its own settings (and DuckDB connection) sharing the loaded models."""
    mine = ServiceState(served.settings(**settings))
    mine.scorer, mine.snapshot, mine.reference = state.scorer, state.snapshot, state.reference
    return mine


@pytest.fixture(scope="module")
def client(state):
    with TestClient(create_app(state)) as c:
        yield c


def _history(served, n: int = 3) -> dict:
    """Real histories of the first ``n`` snapshot customers, as a client posts them."""
    tx = pd.read_parquet(served.transactions)
    end = pd.Timestamp(served.as_of) + pd.Timedelta(days=1)
    tx = tx[tx["timestamp"] < end]
    customers = []
    for cid in served.snapshot["customer_id"].head(n):
        mine = tx[tx["customer_id"] == cid]
        events = [
            {"timestamp": t.isoformat(), "amount": float(a)}
            for t, a in zip(mine["timestamp"], mine["amount"], strict=True)
        ]
        customers.append({"customer_id": str(cid), "transactions": events})
    return {"customers": customers, "as_of": served.as_of.isoformat()}


# -- body size -----------------------------------------------------------------------------------


def test_body_over_the_limit_is_413_before_it_is_parsed(served, state):
    small = _app_state(served, state, max_body_bytes=4096)
    with TestClient(create_app(small)) as c:
        # Not even JSON: refused on its declared length, never parsed (a parse gives 422).
        big = b"{" + b"x" * 5000
        r = c.post("/score/by-id", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert "RAPPORT_MAX_BODY_BYTES" in r.json()["detail"]

        # No Content-Length (chunked): counted while it streams in.
        def chunks():
            for _ in range(10):
                yield b" " * 1000

        for route in ("/score/by-id", "/score/history"):
            r = c.post(route, content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413, (route, r.text)
        ok = c.post("/score/by-id", json={"customer_ids": ["1"]})
        assert ok.status_code == 200, ok.text


# -- ids and counts --------------------------------------------------------------------------------


def test_long_ids_are_refused_and_not_echoed(client, served, json_row):
    huge = "x" * 1_000_000
    r = client.post("/score/by-id", json={"customer_ids": ["1", "y" * 201, huge]})
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [
        ["body", "customer_ids", 1],
        ["body", "customer_ids", 2],
    ]
    assert len(r.content) < 2_000
    assert client.post("/score/by-id", json={"customer_ids": ["y" * 200]}).status_code == 200
    row = json_row(served.snapshot, 0)
    row["customer_id"] = huge
    r = client.post("/score", json={"customers": [row]})
    assert r.status_code == 422 and len(r.content) < 2_000
    assert r.json()["detail"][0]["loc"] == ["body", "customers", 0, "customer_id"]
    body = _history(served, 1)
    body["customers"][0]["customer_id"] = huge
    body["customers"][0]["transactions"][0]["order_id"] = huge
    r = client.post("/score/history", json=body)
    assert r.status_code == 422 and len(r.content) < 2_000
    assert [e["loc"] for e in r.json()["detail"]] == [
        ["body", "customers", 0, "customer_id"],
        ["body", "customers", 0, "transactions", 0, "order_id"],
    ]


def test_events_per_request_are_bounded(served, state):
    body = _history(served, 3)
    total = sum(len(c["transactions"]) for c in body["customers"])
    with TestClient(create_app(_app_state(served, state, max_request_events=total - 1))) as c:
        r = c.post("/score/history", json=body)
        assert r.status_code == 422, r.text
        assert "RAPPORT_MAX_REQUEST_EVENTS" in r.json()["detail"][0]["msg"]
        assert r.json()["detail"][0]["loc"] == ["body", "customers"]
        assert c.get("/info").json()["max_request_events"] == total - 1


# -- NaN, infinities, lone surrogates: 422 with a body that serialises ------------------------


def _one(customer: str = '"a"', tx: str = '{"timestamp": "2024-06-01", "amount": 10}', **top):
    """A one-customer history body with raw JSON tokens put in as given."""
    extra = "".join(f', "{k}": {v}' for k, v in top.items())
    return f'{{"customers": [{{"customer_id": {customer}, "transactions": [{tx}]}}]{extra}}}'


def _tx(timestamp='"2024-06-01"', amount="1", order_id="null"):
    return f'{{"timestamp": {timestamp}, "amount": {amount}, "order_id": {order_id}}}'


_IX = '{"timestamp": "2024-06-01", "channel": "\\ud800x", "event": "open"}'
_BAD_BODIES = [
    ("/score/history", _one(explain="NaN")),
    ("/score/history", _one(as_of="1e999")),
    ("/score/history", _one(as_of="NaN")),
    ("/score/history", _one(tx=_tx(amount="Infinity"))),
    ("/score/history", _one(tx=_tx(amount="NaN"))),
    ("/score/history", _one(tx=_tx(amount="-1e999"))),
    ("/score/history", _one(tx=_tx(order_id="NaN"))),
    ("/score/history", _one(tx=_tx(order_id="-Infinity"))),
    ("/score/history", _one(tx=_tx(order_id='"\\udfff"'))),
    ("/score/history", _one(tx=_tx(timestamp="NaN"))),
    ("/score/history", _one(tx=_tx(timestamp="1e999"))),
    ("/score/history", _one(customer='"\\ud800"')),
    ("/score/history", _one(customer="1e999")),
    ("/score/history", _one(customer='"a\\udfffb"')),
    ("/score/history", _one()[:-3] + f', "interactions": [{_IX}]}}]}}'),
    ("/score/history", _one()[:-3] + ', "\\ud800": 1}]}'),
    ("/score/by-id", '{"customer_ids": ["1"], "explain": NaN}'),
    ("/score/by-id", '{"customer_ids": [NaN, Infinity, 1e999]}'),
    ("/score/by-id", '{"customer_ids": ["\\ud800"]}'),
    ("/score/by-id", '{"customer_ids": ["1"], "explain": Infinity}'),
    ("/score", '{"customers": [{"customer_id": "\\udbff"}]}'),
    ("/score", '{"customers": [{"customer_id": "a", "\\ud800": 1}], "explain": 1e999}'),
    ("/score", '{"customers": [{"customer_id": "a", "segment": "\\ud800"}]}'),
    ("/score", '{"customers": [{"customer_id": "a", "as_of": NaN}]}'),
]


@pytest.mark.parametrize(("path", "text"), _BAD_BODIES)
def test_non_finite_numbers_and_lone_surrogates_are_422(client, path, text):
    r = client.post(path, content=text.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = _strict(r.content.decode("utf-8"))["detail"]
    assert detail and all({"loc", "msg", "type"} <= set(e) for e in detail)


def test_the_422_echo_is_short_and_always_serialises():
    errors = safe_errors(
        [
            {"loc": ("body", "x"), "msg": "m", "type": "t", "input": float("nan")},
            {"loc": ("body", "\ud800"), "msg": "m", "type": "t", "input": "\ud800" * 5000},
            {"loc": ("body",), "msg": "m", "type": "t", "input": {"a": [1, float("-inf")]}},
            {"loc": ("body",), "msg": "m", "type": "t", "input": list(range(10_000))},
            {"loc": ("body",), "msg": "m", "type": "t", "ctx": {"error": ValueError("no")}},
        ]
    )
    text = json.dumps(errors, allow_nan=False)
    text.encode("utf-8")  # no lone surrogate left
    assert errors[0]["input"] == "NaN"
    assert errors[2]["input"] == {"a": [1, "-Infinity"]}
    assert "10000 items" in errors[3]["input"]
    assert errors[4]["ctx"] == {"error": "no"}
    assert all(len(json.dumps(e.get("input", ""))) < 250 for e in errors)


# -- the time budget of history scoring ----------------------------------------------------------


def test_a_spent_budget_stops_before_the_feature_work(served, state, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the feature code ran past the budget")

    monkeypatch.setattr(history, "build_features", never)
    request = HistoryRequest.model_validate(_history(served, 3))
    with pytest.raises(BudgetExceededError, match="RAPPORT_HISTORY_TIMEOUT_SECONDS"):
        _app_state(served, state).score_history(request, Deadline(0.0))


def test_the_budget_interrupts_the_feature_query_and_answers_503(served, state, monkeypatch):
    """The work itself stops (its DuckDB query is interrupted), not only the wait for it."""
    real = history.build_features
    ended = threading.Event()

    def slow(*args, connection, **kwargs):
        try:
            # Seconds of work in DuckDB, as a very large history would take.
            connection.execute("select sum(i) from range(3000000000) t(i)").fetchall()
            return real(*args, connection=connection, **kwargs)
        finally:
            ended.set()

    monkeypatch.setattr(history, "build_features", slow)
    mine = _app_state(served, state, history_timeout_seconds=0.3)
    with TestClient(create_app(mine)) as c:
        start = time.perf_counter()
        r = c.post("/score/history", json=_history(served, 2))
        took = time.perf_counter() - start
        assert r.status_code == 503, r.text
        assert "RAPPORT_HISTORY_TIMEOUT_SECONDS" in r.json()["detail"]
        # Answered once the work had stopped, and nothing holds the connection.
        assert ended.is_set()
        assert mine.history.lock.acquire(blocking=False)
        mine.history.lock.release()
        print(f"history request stopped and answered 503 after {took:.2f} s (budget 0.3 s)")
        monkeypatch.setattr(history, "build_features", real)
        after = c.post("/score/history", json=_history(served, 2))
        assert after.status_code == 200, after.text


def test_health_answers_while_a_history_request_computes(served, monkeypatch, tmp_path):
    """BentoML's /livez and /readyz answer while history scoring holds its thread."""
    monkeypatch.setenv("RAPPORT_HOME", str(served.home))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from rapport.serving.service import Rapport, app

    real = history.build_features
    entered, release = threading.Event(), threading.Event()

    def held(*args, **kwargs):
        entered.set()
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(history, "build_features", held)
    # Rapport.to_asgi() without BentoML's metrics middleware: it registers its histograms in
    # the process-wide registry, which a second app in one test session would duplicate.
    from _bentoml_impl.server.app import ServiceAppFactory

    Rapport.inject_config()
    asgi = ServiceAppFactory(Rapport, is_main=True, enable_metrics=False)()
    with TestClient(asgi) as client:
        assert app.state.rapport._loaded.wait(60)
        answer: dict[str, object] = {}
        worker = threading.Thread(
            target=lambda: answer.update(r=client.post("/v1/score/history", json=_history(served)))
        )
        worker.start()
        try:
            assert entered.wait(60), "the history request never reached the feature code"
            start = time.perf_counter()
            live, ready = client.get("/livez"), client.get("/readyz")
            took = time.perf_counter() - start
            assert live.status_code == 200 and ready.status_code == 200
            assert worker.is_alive() and not answer  # still computing
            print(f"/livez and /readyz answered in {took * 1000:.1f} ms during history scoring")
        finally:
            release.set()
            worker.join(60)
        assert answer["r"].status_code == 200, answer["r"].text


def test_health_answers_while_a_history_body_is_validated(state, served, monkeypatch):
    """The body is validated on a worker thread: the event loop answers meanwhile."""
    real = HistoryRequest.model_validate_json
    entered, release = threading.Event(), threading.Event()

    def held(raw, *args, **kwargs):
        entered.set()
        release.wait(60)
        return real(raw, *args, **kwargs)

    monkeypatch.setattr(HistoryRequest, "model_validate_json", held)
    app = create_app(state)

    async def livez() -> dict[str, bool]:
        return {"live": True}

    # Async, so it is answered on the event loop, as BentoML's /livez is.
    app.add_api_route("/livez", livez)
    body = _history(served, 40)
    with TestClient(app) as client:
        answer: dict[str, object] = {}
        worker = threading.Thread(
            target=lambda: answer.update(r=client.post("/score/history", json=body))
        )
        worker.start()
        try:
            assert entered.wait(60), "the history body never reached validation"
            assert client.get("/livez").status_code == 200
            assert worker.is_alive() and not answer  # still validating
        finally:
            release.set()
            worker.join(60)
        assert answer["r"].status_code == 200, answer["r"].text
        scored = [s["customer_id"] for s in answer["r"].json()["scores"]]
        assert scored == [c["customer_id"] for c in body["customers"]]


# -- fuzzing with NaN, infinities and lone surrogates ---------------------------------------------

#: Raw JSON tokens that Python clients send and strict JSON forbids, or that no UTF-8 carries.
_POISON = ["NaN", "Infinity", "-Infinity", "1e999", '"\\ud800"', '"a\\udfffb"', '"\\udc00\\ud800"']
#: Cases per route, as generated and poisoned: 2,000 in all. A history case that reaches the
#: feature code costs ~0.1 s, a by-id case ~7 ms: ~45 s on two busy cores.
_FUZZ_EXAMPLES = {"/score/history": (150, 450), "/score/by-id": (700, 700)}


def _paths(value, path=()):
    """Every place in a JSON value: the value itself, then what it holds."""
    yield path
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, inner in items:
        yield from _paths(inner, (*path, key))


def _poisoned(body, places, as_key: bool) -> str:
    """``body`` as JSON text with a poison token at each of ``places`` (as a new key if
    ``as_key`` and the place is an object)."""
    body = copy.deepcopy(body)
    tokens = {}
    for n, (path, token) in enumerate(places):
        marker = f"@@poison{n}@@"
        if not path:
            return token
        parent = body
        try:
            for key in path[:-1]:
                parent = parent[key]
            if not isinstance(parent, dict | list):
                raise TypeError
            target = parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier poison replaced the way there
        if as_key and isinstance(target, dict) and token.startswith('"'):
            target[marker] = 1
        else:
            parent[path[-1]] = marker
        tokens[json.dumps(marker)] = token
    text = json.dumps(body)  # ensure_ascii: any surrogate elsewhere goes out escaped too
    for marker, token in tokens.items():
        text = text.replace(marker, token)
    return text


def _check_answer(response, label) -> None:
    assert response.status_code < 500, (label, response.text)
    assert response.status_code in (200, 401, 413, 422, 503), (label, response.text)
    body = _strict(response.content.decode("utf-8"))
    if response.status_code == 422:
        assert all(isinstance(e["loc"], list) and isinstance(e["msg"], str) for e in body["detail"])
        assert all(len(json.dumps(e.get("input", ""))) < 250 for e in body["detail"]), label


_SETTINGS = settings(
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


def _fuzz_route(operation, client) -> int:
    """Run both kinds of cases against one route; how many ran."""
    route, ran = operation.path, [0]
    generated, poisoned_ = _FUZZ_EXAMPLES[route]

    @given(case=operation.as_strategy())
    @settings(_SETTINGS, max_examples=generated)
    def as_generated(case):
        ran[0] += 1
        response = case.call()
        assert response.status_code < 500, (route, case.body, response.text)
        case.validate_response(response, excluded_checks=[positive_data_acceptance])

    @given(case=operation.as_strategy(), data=st.data())
    @settings(_SETTINGS, max_examples=poisoned_)
    def poisoned(case, data):
        ran[0] += 1
        place = st.tuples(st.sampled_from(list(_paths(case.body))), st.sampled_from(_POISON))
        places = data.draw(st.lists(place, min_size=1, max_size=3))
        text = _poisoned(case.body, places, data.draw(st.booleans()))
        response = client.post(
            route, content=text.encode(), headers={"content-type": "application/json"}
        )
        _check_answer(response, (route, text[:300]))

    for run in (as_generated, poisoned):
        start = time.perf_counter()
        run()
        print(f"{route} {run.__name__}: {time.perf_counter() - start:.1f} s")
    return ran[0]


def test_fuzz_history_and_by_id_with_nan_infinity_and_surrogates(state):
    """Schemathesis' cases for the history and by-id routes, as generated and with NaN,
    infinities, 1e999 and lone surrogates put in anywhere: never a 5xx, always JSON."""
    app = create_app(state)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = {r.ok().path: r.ok() for r in schema.get_all_operations()}
    with TestClient(app) as client:
        cases = sum(_fuzz_route(operations[p], client) for p in ("/score/history", "/score/by-id"))
    assert cases >= 2_000
