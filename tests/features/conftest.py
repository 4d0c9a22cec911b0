from __future__ import annotations

import pandas as pd
import pytest


@pytest.fixture
def tiny_tx() -> pd.DataFrame:
    """Hand-computed fixture; expected values are worked out in test_build.py."""
    rows = [
        ("A", "2024-01-01 09:00", 10.0),
        ("A", "2024-01-01 17:30", 5.0),  # same day: one purchase day, two purchases
        ("A", "2024-01-11 12:00", 20.0),
        ("A", "2024-02-10 08:00", 30.0),
        ("A", "2024-02-12 10:00", -5.0),  # refund: spend, never a purchase
        ("B", "2024-02-20 23:59", 50.0),
        ("B", "2024-03-02 00:00", 15.0),  # the day after the cutoff
        ("C", "2024-03-05 10:00", 40.0),  # first purchase after the cutoff
        ("C", "2024-03-20 10:00", 10.0),
        ("D", "2024-01-05 10:00", -10.0),  # only a refund: not a customer yet
    ]
    df = pd.DataFrame(rows, columns=["customer_id", "timestamp", "amount"])
    df["timestamp"] = pd.to_datetime(df["timestamp"])
    return df


@pytest.fixture
def tiny_ix() -> pd.DataFrame:
    rows = [
        ("A", "2024-02-01 08:00", "Email", "sent"),
        ("A", "2024-02-15 08:00", "email", "sent"),
        ("A", "2024-02-15 09:00", "EMAIL ", "open"),
        ("A", "2024-02-16 09:00", "email", "click"),
        ("A", "2024-01-05 12:00", "web", "visit"),
        ("A", "2024-02-20 12:00", "phone", "complaint"),
        ("A", "2024-03-02 09:00", "email", "open"),  # after the cutoff
        ("Z", "2024-02-01 09:00", "web", "visit"),  # a prospect with no purchase
    ]
    df = pd.DataFrame(rows, columns=["customer_id", "timestamp", "channel", "event"])
    df["timestamp"] = pd.to_datetime(df["timestamp"])
    return df
