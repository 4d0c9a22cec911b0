"""Labelled training sets over several cutoffs, split out of time.

A row is one (customer, cutoff): the features as of the cutoff (nothing after it) and the labels
over the horizon after it. The split never lets training see the test horizon: the last cutoff
is the test set; validation is the latest earlier cutoff whose horizon ends by the test cutoff;
training uses the cutoffs before validation. (Training horizons may overlap the validation
horizon: validation only steers early stopping and calibration, the test set is clean.)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import pandas as pd

from rapport.features.build import build_features, build_labels, parse_cutoffs
from rapport.features.contracts import TableSource
from rapport.features.definitions import DEFAULT_WINDOWS
from rapport.training.config import CutoffConfig


def month_end(day: dt.date) -> dt.date:
    """The last day of ``day``'s month."""
    return (pd.Timestamp(day) + pd.offsets.MonthEnd(0)).date()


def latest_complete_cutoff(last_event_day: dt.date, horizon_days: int) -> dt.date:
    """The latest month-end whose whole horizon lies on or before ``last_event_day``."""
    candidate = month_end(last_event_day)
    while candidate + dt.timedelta(days=horizon_days) > last_event_day:
        candidate = (pd.Timestamp(candidate) - pd.offsets.MonthEnd(1)).date()
    return candidate


def resolve_cutoffs(
    config: CutoffConfig, *, horizon_days: int, last_event_day: dt.date
) -> list[dt.date]:
    """The cutoff dates a config asks for, checked against the data's last day.

    Raises
    ------
    ValueError
        If a cutoff's horizon runs past ``last_event_day`` (its labels would be censored).
    """
    if config.dates is not None:
        cutoffs = list(config.dates)
    else:
        last = config.last or latest_complete_cutoff(last_event_day, horizon_days)
        end = pd.Timestamp(month_end(last))
        cutoffs = [
            (end - pd.offsets.MonthEnd(config.every_months * k)).date()
            for k in range(config.count - 1, -1, -1)
        ]
        if config.last is not None and config.last != month_end(config.last):
            cutoffs[-1] = config.last
    latest = cutoffs[-1]
    if latest + dt.timedelta(days=horizon_days) > last_event_day:
        raise ValueError(
            f"cutoffs: the last cutoff {latest} plus the {horizon_days}-day horizon runs past the "
            f"last transaction day {last_event_day}; its labels would be censored"
        )
    return cutoffs


@dataclass(frozen=True)
class OutOfTimeSplit:
    """Which cutoffs train, validate and test."""

    train: tuple[dt.date, ...]
    valid: dt.date
    test: dt.date

    def role(self, as_of: dt.date) -> str:
        """``train``, ``valid``, ``test`` or ``unused`` for one cutoff."""
        if as_of == self.test:
            return "test"
        if as_of == self.valid:
            return "valid"
        return "train" if as_of in self.train else "unused"


def split_cutoffs(cutoffs: Sequence[dt.date], horizon_days: int) -> OutOfTimeSplit:
    """Split sorted cutoffs out of time (see the module docstring).

    Raises
    ------
    ValueError
        When no validation or training cutoff fits before the test cutoff's start.
    """
    ordered = sorted(set(cutoffs))
    if len(ordered) < 3:
        raise ValueError("an out-of-time split needs at least 3 cutoffs")
    test = ordered[-1]
    horizon = dt.timedelta(days=horizon_days)
    eligible = [c for c in ordered[:-1] if c + horizon <= test]
    if not eligible:
        raise ValueError(
            f"no cutoff's {horizon_days}-day horizon ends by the test cutoff {test}: "
            f"add earlier cutoffs (have {', '.join(map(str, ordered))})"
        )
    valid = eligible[-1]
    train = tuple(c for c in eligible if c < valid)
    if not train:
        raise ValueError(
            f"no training cutoff before the validation cutoff {valid}: add earlier cutoffs"
        )
    return OutOfTimeSplit(train=train, valid=valid, test=test)


def build_training_set(
    transactions: TableSource,
    interactions: TableSource | None = None,
    *,
    cutoffs: Sequence[dt.date | str],
    horizon_days: int,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    interaction_pairs: Sequence[tuple[str, str]] | None = None,
    validate: bool = True,
    connection: duckdb.DuckDBPyConnection | None = None,
) -> pd.DataFrame:
    """Features joined to labels, one row per (customer, cutoff).

    Parameters
    ----------
    transactions, interactions
        As for :func:`rapport.features.build.build_features`.
    cutoffs
        The cutoff dates.
    horizon_days
        Label horizon ``H``.
    windows
        Feature windows in days.
    interaction_pairs
        ``(channel, event)`` pairs to count (a trained model's); by default those present.
    validate
        Validate raw inputs (frames from the loaders are already valid).
    connection
        DuckDB connection to share between the feature and label queries.

    Returns
    -------
    pandas.DataFrame
        Every column of ``build_features`` (``customer_id``, ``as_of``, features) plus
        ``churned_{H}d``, ``future_spend_{H}d`` and ``future_purchases_{H}d``.
    """
    dates = parse_cutoffs(list(cutoffs))
    feats = build_features(
        transactions,
        interactions,
        as_of=dates,
        windows=tuple(windows),
        interaction_pairs=interaction_pairs,
        validate=validate,
        connection=connection,
    )
    labels = build_labels(
        transactions,
        as_of=dates,
        horizon_days=horizon_days,
        validate=validate,
        connection=connection,
    )
    merged = feats.merge(labels, on=["customer_id", "as_of"], how="left", validate="one_to_one")
    label_columns = [c for c in labels.columns if c not in ("customer_id", "as_of")]
    missing = merged[label_columns[0]].isna()
    if missing.any():
        row = merged.loc[missing, ["customer_id", "as_of"]].iloc[0].to_dict()
        raise RuntimeError(f"labels missing for {int(missing.sum())} feature rows, e.g. {row}")
    return merged
