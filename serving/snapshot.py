"""The feature snapshot: each customer's latest features, written ahead and scored by id.

:func:`write_snapshot` writes it from a user's data with the served models' feature set
(``rapport snapshot``, ``rapport demo``); :func:`read_snapshot` loads it for the service,
refusing one that lacks a feature the models read; :class:`FeatureSnapshot` answers lookups
by id; :func:`snapshot_staleness` says when it is too old to describe customers as they are.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rapport.features.build import connect, iter_features, write_features
from rapport.features.contracts import TableSource
from rapport.features.segments import SCORED_FEATURES
from rapport.serving.scoring import Scorer


class SnapshotNotLoadedError(Exception):
    """Why the snapshot was not loaded (missing, unreadable, lacking a model input)."""


@dataclass
class FeatureSnapshot:
    """Each customer's latest feature row, loaded once and looked up by id.

    ``cols`` holds the scorer's input arrays for every row, so scoring a known customer is a
    dictionary lookup and an array take.
    """

    path: str | None
    frame: pd.DataFrame
    index: dict[str, int]
    cols: dict[str, np.ndarray]
    as_of: list[dt.date | None]
    segment: list[str | None]

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, scorer: Scorer, path: str | None) -> FeatureSnapshot:
        """Keep each customer's latest row; prepare the scorer's arrays."""
        if "customer_id" not in frame.columns:
            raise ValueError(f"snapshot {path}: no customer_id column")
        if "as_of" in frame.columns:
            frame = frame.sort_values("as_of", kind="stable")
        ids = frame["customer_id"].astype("string")
        frame = frame[~ids.duplicated(keep="last")].reset_index(drop=True)
        ids = frame["customer_id"].astype("string")
        cols = scorer.columns_from_frame(frame)
        # BG/NBD's input rules, checked once here so that lookups can skip them.
        scorer.churn.btyd(cols, check=True)
        as_of: list[dt.date | None] = (
            [d.date() if pd.notna(d) else None for d in pd.to_datetime(frame["as_of"])]
            if "as_of" in frame.columns
            else [None] * len(frame)
        )
        seg = frame["segment"].astype("object") if "segment" in frame.columns else None
        segment: list[str | None] = (
            [str(v) if pd.notna(v) else None for v in seg]
            if seg is not None
            else [None] * len(frame)
        )
        return cls(
            path=path,
            frame=frame,
            index={cid: i for i, cid in enumerate(ids.tolist())},
            cols=cols,
            as_of=as_of,
            segment=segment,
        )

    @property
    def latest(self) -> dt.date | None:
        """The latest feature date in the snapshot."""
        dates = [d for d in self.as_of if d is not None]
        return max(dates) if dates else None

    def reference(self) -> pd.DataFrame | None:
        """Rows at the latest date: the population posted histories are ranked in."""
        needed = [col for _, col, _ in SCORED_FEATURES]
        if any(c not in self.frame.columns for c in needed) or self.frame.empty:
            return None
        if "as_of" not in self.frame.columns:
            return self.frame[needed]
        as_of = pd.to_datetime(self.frame["as_of"])
        return self.frame.loc[as_of == as_of.max(), needed]


@dataclass(frozen=True)
class SnapshotSummary:
    """What :func:`write_snapshot` wrote."""

    path: Path
    customers: int
    as_of: dt.date


def write_snapshot(
    transactions: TableSource,
    interactions: TableSource | None,
    *,
    as_of: dt.date,
    scorer: Scorer,
    out: Path,
    validate: bool = False,
    duckdb_threads: int | None = None,
    duckdb_memory_limit: str | None = None,
) -> SnapshotSummary:
    """Write each customer's features as of ``as_of``: the snapshot the service scores by id.

    The features are built with the served models' windows and interaction pairs, so every
    column the models read is there whatever else the data holds. The file appears only when
    complete (a temporary file is renamed); on any error nothing is written.

    Parameters
    ----------
    transactions, interactions
        The event tables (paths or frames; see :mod:`rapport.features.contracts`).
    as_of
        The cutoff: features use events up to the end of that day.
    scorer
        The served models, whose feature set the snapshot carries.
    out
        The Parquet file to write (the service reads ``ServingSettings.snapshot_path``).
    validate
        Validate raw inputs (frames from the loaders and contract Parquet need not be).

    Raises
    ------
    ValueError
        When no customer has a purchase by ``as_of``, or the data cannot give a feature
        the models need (interaction features without interactions).
    """
    con = connect(threads=duckdb_threads, memory_limit=duckdb_memory_limit)
    try:
        frames = iter_features(
            transactions,
            interactions,
            as_of=[as_of],
            windows=scorer.windows,
            interaction_pairs=scorer.interaction_pairs,
            validate=validate,
            connection=con,
        )
        hint = " (the models read interactions: give that file too)" if interactions is None else ""
        rows, _ = write_features(_with_model_inputs(frames, scorer, as_of, hint), out)
    finally:
        con.close()
    return SnapshotSummary(path=out, customers=rows, as_of=as_of)


def _with_model_inputs(
    frames: Iterator[pd.DataFrame], scorer: Scorer, as_of: dt.date, hint: str
) -> Iterator[pd.DataFrame]:
    """Pass feature batches on; refuse an empty one, or one lacking a model input."""
    for frame in frames:
        if frame.empty:
            raise ValueError(f"no customer has a purchase on or before {as_of}")
        missing = missing_inputs(frame.columns, scorer)
        if missing:
            raise ValueError(
                f"the served models need features this data does not give: {_some(missing)}{hint}"
            )
        yield frame


def missing_inputs(columns: Any, scorer: Scorer) -> list[str]:
    """The model input columns that ``columns`` lacks, in the models' order."""
    have = set(columns)
    return [c for c in scorer.inputs if c not in have]


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def snapshot_age_days(as_of: dt.date | None, today: dt.date | None = None) -> int | None:
    """Days from a snapshot's as-of date to today (UTC); None without a date."""
    return None if as_of is None else ((today or today_utc()) - as_of).days


def snapshot_staleness(
    as_of: dt.date | None, max_age_days: int, today: dt.date | None = None
) -> str | None:
    """Why a snapshot of ``as_of`` is stale, or None while it is within ``max_age_days``."""
    age = snapshot_age_days(as_of, today)
    if age is None or age <= max_age_days:
        return None
    return (
        f"is as of {as_of}, {age} days ago (more than RAPPORT_SNAPSHOT_MAX_AGE_DAYS="
        f"{max_age_days}): scores by id describe customers as they were then"
    )


def read_snapshot(path: Path, scorer: Scorer) -> FeatureSnapshot:
    """The snapshot at ``path``, with ``scorer``'s input arrays prepared.

    Parameters
    ----------
    path
        The Parquet file (``ServingSettings.snapshot_path``).
    scorer
        The served models: the snapshot must carry every feature they read.

    Raises
    ------
    SnapshotNotLoadedError
        Saying why, in the words the service's warnings and 503 answers use.
    """
    fix = "write one with `rapport snapshot`"
    if not path.exists():
        raise SnapshotNotLoadedError(
            f"no feature snapshot at {path}: scoring by id finds nobody; {fix}"
        )
    try:
        frame = pd.read_parquet(path)
        missing = missing_inputs(frame.columns, scorer)
        if not missing:
            return FeatureSnapshot.from_frame(frame, scorer, str(path))
    except Exception as err:
        raise SnapshotNotLoadedError(
            f"feature snapshot {path} not loaded: {type(err).__name__}: {err}"
        ) from err
    raise SnapshotNotLoadedError(
        f"feature snapshot {path} lacks {len(missing)} feature(s) the served "
        f"models need ({_some(missing)}): not loaded, scoring by id finds "
        f"nobody; {fix} (it builds the models' features)"
    )


def today_utc() -> dt.date:
    """Today's date in UTC: what snapshot ages and request dates are measured against."""
    return dt.datetime.now(dt.UTC).date()
