"""Cutoff dates as the feature and label builders take them: one or several, whole days."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

CutoffsLike = str | dt.date | pd.Timestamp | np.datetime64 | Iterable[str | dt.date | pd.Timestamp]


def parse_cutoffs(as_of: CutoffsLike) -> list[dt.date]:
    """Turn one or several cutoffs into sorted unique dates.

    Parameters
    ----------
    as_of
        A date, a ``YYYY-MM-DD`` string, a comma-separated string of them, or an iterable.
        A datetime must be midnight: cutoffs are whole days (a date includes that whole day).

    Returns
    -------
    list of datetime.date
    """
    if isinstance(as_of, str):
        items: list[Any] = [part.strip() for part in as_of.split(",") if part.strip()]
    elif isinstance(as_of, dt.date | pd.Timestamp | np.datetime64):
        items = [as_of]
    else:
        items = list(as_of)
    if not items:
        raise ValueError("as_of must name at least one cutoff date")
    return sorted({_cutoff_day(item) for item in items})


def _cutoff_day(item: Any) -> dt.date:
    """One cutoff as a date; a time of day other than midnight is refused."""
    try:
        ts = pd.Timestamp(item)
    except (ValueError, TypeError) as err:
        raise ValueError(f"as_of: {item!r} is not a date (use YYYY-MM-DD)") from err
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    if ts != ts.normalize():
        raise ValueError(
            f"as_of: {item!r} has a time of day; cutoffs are whole days (a date cutoff "
            "includes that whole day)"
        )
    return ts.date()
