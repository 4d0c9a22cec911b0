"""The FastAPI app in-process (TestClient): real predictions, every bad-input class, fuzzing."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from rapport.serving.api import create_app
from rapport.serving.core import THREAD_THRESHOLD, ServiceState
from rapport.serving.schemas import HistoryRequest, ScoreResponse


@pytest.fixture(scope="module")
def client(state):
    with TestClient(create_app(state)) as c:
        yield c


def _loc(response) -> list[tuple]:
    assert response.status_code == 422, response.text
    return [tuple(e["loc"]) for e in response.json()["detail"]]


def test_score_rows_equal_the_registered_models(client, served, state, json_row):
    rows = [json_row(served.snapshot, i) for i in range(25)]
    r = client.post("/score", json={"customers": rows})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["models"]["churn"]["name"] == "rapport-churn"
    assert body["models"]["churn"]["version"] == "1"
    assert body["models"]["clv"]["alias"] == "champion"
    expected = state.scorer.score_frame(served.snapshot.head(25))
    got = pd.DataFrame(body["scores"])
    assert got["customer_id"].tolist() == [r["customer_id"] for r in rows]
    np.testing.assert_allclose(got["churn_probability"], expected.churn_probability, rtol=1e-9)
    np.testing.assert_allclose(got["predicted_value"], expected.predicted_value, rtol=1e-9)
    assert got["segment"].tolist() == served.snapshot["segment"].head(25).astype(str).tolist()
    assert got["risk_tier"].isin(["low", "medium", "high"]).all()
    assert (got["value_horizon_days"] == 180).all() and (got["churn_horizon_days"] == 90).all()
    assert got["reasons"].isna().all()


def test_explain_returns_top_reasons(client, served, json_row):
    r = client.post("/score", json={"customers": [json_row(served.snapshot, 3)], "explain": 3})
    assert r.status_code == 200, r.text
    reasons = r.json()["scores"][0]["reasons"]
    assert len(reasons["churn"]) == 3 and len(reasons["value"]) == 3
    sizes = [abs(x["contribution"]) for x in reasons["churn"]]
    assert sizes == sorted(sizes, reverse=True)


def test_by_id_answers_unknown_ids_per_id(client, served, state):
    known = [str(c) for c in served.snapshot["customer_id"].head(3)]
    r = client.post("/score/by-id", json={"customer_ids": [*known, "no-such-customer", 10**9]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["customer_id"] for s in body["scores"]] == known
    assert [m["customer_id"] for m in body["missing"]] == ["no-such-customer", str(10**9)]
    assert body["snapshot_as_of"] == served.as_of.isoformat()
    expected = state.scorer.score_frame(served.snapshot.head(3))
    got = [s["churn_probability"] for s in body["scores"]]
    np.testing.assert_allclose(got, expected.churn_probability, rtol=1e-9)


def _history(served, customer_id) -> dict:
    tx = pd.read_parquet(served.transactions)
    ix = pd.read_parquet(served.interactions)
    end = pd.Timestamp(served.as_of) + pd.Timedelta(days=1)
    mine = tx[(tx["customer_id"] == customer_id) & (tx["timestamp"] < end)]
    events = ix[(ix["customer_id"] == customer_id) & (ix["timestamp"] < end)]
    return {
        "customer_id": str(customer_id),
        "transactions": [
            {"timestamp": t.isoformat(), "amount": float(a)}
            for t, a in zip(mine["timestamp"], mine["amount"], strict=True)
        ],
        "interactions": [
            {"timestamp": t.isoformat(), "channel": str(c), "event": str(e)}
            for t, c, e in zip(events["timestamp"], events["channel"], events["event"], strict=True)
        ],
    }


def test_history_scores_equal_the_snapshot_scores(client, served):
    """Online features from a raw history equal the offline snapshot's: same code."""
    ids = served.snapshot["customer_id"].head(4).tolist()
    histories = [_history(served, c) for c in ids]
    assert any(h["interactions"] for h in histories)
    r = client.post(
        "/score/history",
        json={"customers": histories, "as_of": served.as_of.isoformat(), "explain": 2},
    )
    assert r.status_code == 200, r.text
    online = r.json()["scores"]
    by_id = client.post("/score/by-id", json={"customer_ids": [str(c) for c in ids]}).json()
    assert [s["customer_id"] for s in online] == [str(c) for c in ids]
    for a, b in zip(online, by_id["scores"], strict=True):
        assert math.isclose(a["churn_probability"], b["churn_probability"], rel_tol=1e-9)
        assert math.isclose(a["predicted_value"], b["predicted_value"], rel_tol=1e-9)
        assert a["segment"] == b["segment"]


def test_history_of_a_new_customer_without_interactions(client, served):
    body = {
        "as_of": served.as_of.isoformat(),
        "customers": [
            {
                "customer_id": "brand-new",
                "transactions": [{"timestamp": "2024-12-20T10:00:00+01:00", "amount": 30}],
            }
        ],
    }
    r = client.post("/score/history", json=body)
    assert r.status_code == 200, r.text
    score = r.json()["scores"][0]
    assert score["customer_id"] == "brand-new" and 0 <= score["churn_probability"] <= 1


def test_info_lists_inputs_and_versions(client, served, state):
    info = client.get("/info").json()
    assert info["ready"] is True and info["error"] is None
    assert info["snapshot"]["customers"] == served.snapshot["customer_id"].nunique()
    assert set(info["inputs"]) == set(state.scorer.inputs)
    assert {m["task"] for m in info["models"]} == {"churn", "clv"}
    assert client.get("/ready").status_code == 200


# -- bad input: 422 naming the field, never a 500 ---------------------------------------------


def test_missing_and_unknown_fields_are_named(client, served, json_row):
    row = json_row(served.snapshot, 0)
    del row["recency_days"]
    row["shoe_size"] = 44
    locs = _loc(client.post("/score", json={"customers": [row]}))
    assert ("body", "customers", 0, "recency_days") in locs
    assert ("body", "customers", 0, "shoe_size") in locs


def test_wrong_types_nan_inf_and_negative_counts(client, served, json_row):
    rows = [json_row(served.snapshot, i) for i in range(4)]
    rows[0]["recency_days"] = "ten"
    rows[1]["n_purchases"] = -2
    rows[2]["customer_id"] = ""
    body = {"customers": rows}
    locs = _loc(client.post("/score", json=body))
    assert ("body", "customers", 1, "n_purchases") in locs or ("body", "customers", 2) in [
        loc[:3] for loc in locs
    ]
    # Field-level: text for a number, then a negative count, each named.
    rows[2]["customer_id"] = "ok"
    locs = _loc(client.post("/score", json={"customers": rows}))
    assert ("body", "customers", 0, "recency_days") in locs
    assert ("body", "customers", 1, "n_purchases") in locs
    for bad in ("NaN", "Infinity", "-Infinity"):
        text = (
            '{"customers": [{"customer_id": "x", "recency_days": ' + bad + "}]}"
        )  # not valid JSON numbers, but Python clients send them
        r = client.post("/score", content=text, headers={"content-type": "application/json"})
        assert r.status_code == 422, (bad, r.text)
        assert ["body", "customers", 0, "recency_days"] in [e["loc"] for e in r.json()["detail"]]


def test_future_dates_empty_lists_and_oversized_batches(client, served, state, json_row):
    row = json_row(served.snapshot, 0)
    row["as_of"] = (dt.date.today() + dt.timedelta(days=3)).isoformat()
    assert ("body", "customers", 0, "as_of") in _loc(
        client.post("/score", json={"customers": [row]})
    )
    assert ("body", "customers") in _loc(client.post("/score", json={"customers": []}))
    assert ("body", "customer_ids") in _loc(client.post("/score/by-id", json={"customer_ids": []}))
    small = ServiceState(served.settings(max_batch=2))
    small.scorer, small.snapshot = state.scorer, state.snapshot
    with TestClient(create_app(small)) as c:
        rows = [json_row(served.snapshot, i) for i in range(3)]
        r = c.post("/score", json={"customers": rows})
        assert ("body", "customers") in _loc(r)
        assert "at most 2" in r.json()["detail"][0]["msg"]
        r = c.post("/score/by-id", json={"customer_ids": ["1", "2", "3"]})
        assert ("body", "customer_ids") in _loc(r)


def test_history_events_after_as_of_and_malformed_json(client):
    body = {
        "as_of": "2024-06-30",
        "customers": [
            {
                "customer_id": "a",
                "transactions": [
                    {"timestamp": "2024-06-01", "amount": 10},
                    {"timestamp": "2024-07-02", "amount": 10},
                ],
            }
        ],
    }
    locs = _loc(client.post("/score/history", json=body))
    assert ("body", "customers", 0, "transactions", 1, "timestamp") in locs
    body["as_of"] = (dt.date.today() + dt.timedelta(days=1)).isoformat()
    assert ("body", "as_of") in _loc(client.post("/score/history", json=body))
    body["as_of"] = "2024-06-30"
    body["customers"][0]["transactions"][0]["amount"] = "lots"
    _loc(client.post("/score/history", json=body))
    for route in ("/score", "/score/history"):
        r = client.post(route, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422, (route, r.text)
        assert r.json()["detail"][0]["loc"][0] == "body"


def test_history_bodies_that_are_empty_or_not_json_are_422_naming_the_body(client):
    text = b'{"customers": [{"customer_id": "a", "transactions": []}]}'
    empty = client.post("/score/history", content=b"", headers={"content-type": "application/json"})
    assert _loc(empty) == [("body",)] and empty.json()["detail"][0]["type"] == "missing"
    # JSON only by its content type, as FastAPI reads a declared body.
    for headers in ({"content-type": "text/plain"}, {}):
        assert _loc(client.post("/score/history", content=text, headers=headers)) == [("body",)]
    ok = client.post("/score/history", content=text, headers={"content-type": "application/json"})
    assert _loc(ok) == [("body", "customers", 0, "transactions")]


def test_the_history_body_is_documented_as_a_declared_body(state):
    """The route reads its body itself; its OpenAPI is FastAPI's for a declared body."""
    declared = FastAPI()

    @declared.post("/score/history", response_model=ScoreResponse, summary="Score raw histories")
    async def score_history(body: HistoryRequest) -> ScoreResponse:
        """Score customers from their raw purchase and interaction histories.

        Features come from the training feature code; R/F/M scores are ranked within the
        served snapshot.
        """
        raise NotImplementedError

    app = create_app(state)
    ours, theirs = app.openapi(), declared.openapi()
    operation = ours["paths"]["/score/history"]["post"]
    expected = theirs["paths"]["/score/history"]["post"]
    assert operation["requestBody"] == expected["requestBody"]
    assert operation["responses"]["422"] == expected["responses"]["422"]
    assert operation["operationId"] == expected["operationId"]
    for name in ("HistoryRequest", "CustomerHistory", "Purchase", "Interaction"):
        assert ours["components"]["schemas"][name] == theirs["components"]["schemas"][name]
    assert list(ours["components"]["schemas"]) == sorted(ours["components"]["schemas"])


def test_not_ready_is_503_not_500(served):
    loading = ServiceState(served.settings())  # never loaded
    with TestClient(create_app(loading)) as c:
        assert c.get("/ready").status_code == 503
        r = c.post("/score/by-id", json={"customer_ids": ["1"]})
        assert r.status_code == 503 and "loading" in r.json()["detail"]
    broken = ServiceState(served.settings(churn_model="no-such-model")).load()
    assert not broken.ready and "no-such-model" in broken.error
    with TestClient(create_app(broken)) as c:
        assert c.get("/ready").status_code == 503
        assert c.get("/info").json()["error"] == broken.error


# -- fuzzing against the OpenAPI schema --------------------------------------------------------


def test_openapi_fuzz_never_5xx(state, fuzz):
    """Schemathesis cases from the app's own OpenAPI schema: no 5xx, responses as documented.

    Driven through Hypothesis directly: schemathesis' pytest fixture loader breaks on
    pytest 9.2 (it reads ``Function._nodeid``).
    """
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(state))
    paths = {result.ok().path for result in schema.get_all_operations()}
    assert paths >= {"/score", "/score/by-id", "/score/history"}
    fuzz(schema, examples=30)


def test_big_requests_are_scored_off_the_event_loop_with_the_same_answers(
    client, served, state, json_row
):
    n = THREAD_THRESHOLD + 20
    rows = [json_row(served.snapshot, i) for i in range(n)]
    r = client.post("/score", json={"customers": rows})
    assert r.status_code == 200, r.text
    expected = state.scorer.score_frame(served.snapshot.head(n))
    got = [s["churn_probability"] for s in r.json()["scores"]]
    np.testing.assert_allclose(got, expected.churn_probability, rtol=1e-12)
