"""A posted history's repeated order ids are one order, as in files loaded with ``order_id``."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from rapport.serving.api import create_app


@pytest.fixture(scope="module")
def client(state):
    with TestClient(create_app(state)) as c:
        yield c


def _score(client, served, transactions: list[dict]) -> dict:
    body = {
        "as_of": served.as_of.isoformat(),
        "customers": [{"customer_id": "lines", "transactions": transactions}],
    }
    r = client.post("/score/history", json=body)
    assert r.status_code == 200, r.text
    return r.json()["scores"][0]


def test_lines_of_one_order_score_as_the_order(client, served):
    day = served.as_of.isoformat()
    first = {"timestamp": "2024-06-01T10:00:00", "amount": 40.0, "order_id": "A1"}
    lines = [
        {"timestamp": f"{day}T09:00:00", "amount": 5.0, "order_id": "B7"},
        {"timestamp": f"{day}T09:00:00", "amount": 5.0, "order_id": "B7"},
        {"timestamp": f"{day}T09:00:00", "amount": 20.0, "order_id": "B7"},
    ]
    as_lines = _score(client, served, [first, *lines])
    as_order = _score(
        client, served, [first, {"timestamp": f"{day}T09:00:00", "amount": 30.0, "order_id": "B7"}]
    )
    for field in ("churn_probability", "predicted_value"):
        assert math.isclose(as_lines[field], as_order[field], rel_tol=1e-9), field
