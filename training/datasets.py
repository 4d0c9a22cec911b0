"""Labelled training sets over several cutoffs, split out of time or by customer.

A row is one (customer, cutoff): the features as of the cutoff (nothing after it) and the labels
over the horizon after it. The time split never lets training see the validation or test
horizons: the last cutoff is the test set; validation is the latest earlier cutoff whose horizon
ends by the test cutoff; training uses the cutoffs whose horizon ends by the validation cutoff.
So the validation rows that choose among model families, stop boosting and calibrate are as
unseen as the test rows. The customer split, for histories too short for that, holds seeded
fractions of the customers out at the last cutoff for validation and test, and trains on the
others at every cutoff (see :class:`rapport.training.config.SplitConfig`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from rapport.features.build import build_features, build_labels, parse_cutoffs
from rapport.features.contracts import TableSource
from rapport.features.definitions import DEFAULT_WINDOWS
from rapport.training.config import CutoffConfig, SplitConfig


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
    config: CutoffConfig,
    *,
    horizon_days: int,
    last_event_day: dt.date,
    first_event_day: dt.date | None = None,
) -> list[dt.date]:
    """The cutoff dates a config asks for, checked against the data's first and last days.

    Cutoffs before ``first_event_day`` (the first purchase) are left out: no customer has a
    row there, so they would only inflate the count of cutoffs a split reports.

    Raises
    ------
    ValueError
        If a cutoff's horizon runs past ``last_event_day`` (its labels would be censored), or
        if the last cutoff is before ``first_event_day`` (no customer would have a row).
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
    if first_event_day is not None and latest < first_event_day:
        if config.dates is not None:
            raise ValueError(
                f"cutoffs.dates: the last cutoff {latest} is before the first transaction, on "
                f"{first_event_day}: no customer would have a row"
            )
        raise ValueError(
            f"cutoffs: the last cutoff {latest} is before the first transaction, on "
            f"{first_event_day}: the data ({first_event_day} to {last_event_day}) are too short "
            f"for a {horizon_days}-day horizon after it; shorten the horizon or add history"
        )
    if first_event_day is not None:
        cutoffs = [c for c in cutoffs if c >= first_event_day]
    return cutoffs


@dataclass(frozen=True)
class TrainingSplit:
    """Which rows train, validate and test.

    ``by="time"``: the cutoffs ``train`` train, ``valid`` validates and ``test`` tests, every
    customer at each. ``by="customers"``: ``valid == test`` is the last cutoff, where the
    customers :func:`holdout_draw` puts below ``test_fraction`` test and the next
    ``valid_fraction`` validate; the other customers train at every cutoff of ``train``.
    """

    train: tuple[dt.date, ...]
    valid: dt.date
    test: dt.date
    by: str = "time"
    valid_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 0

    def role(self, as_of: dt.date) -> str:
        """``train``, ``valid``, ``test`` or ``unused`` for one cutoff of a time split."""
        if self.by != "time":
            raise ValueError("a customer split gives roles to customers, not to cutoffs")
        if as_of == self.test:
            return "test"
        if as_of == self.valid:
            return "valid"
        return "train" if as_of in self.train else "unused"

    def describe(self) -> str:
        """One line for people: which rows test, validate and train."""
        if self.by == "customers":
            return (
                f"test: {self.test_fraction:.0%} of customers held out at {self.test}, "
                f"validation {self.valid_fraction:.0%}, the rest train at "
                f"{len(self.train)} cutoff{'s' if len(self.train) != 1 else ''}"
            )
        return (
            f"test cutoff {self.test} (validation {self.valid}, {len(self.train)} training cutoffs)"
        )

    def parts(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        """Train, validation and test rows of ``frame`` (``customer_id``, ``as_of``, ...)."""
        as_of = pd.to_datetime(frame["as_of"]).dt.date
        if self.by == "time":
            train = frame[as_of.isin(self.train)]
            valid = frame[as_of == self.valid]
            test = frame[as_of == self.test]
        else:
            draw = holdout_draw(frame["customer_id"], self.seed)
            held_out = self.test_fraction + self.valid_fraction
            at_test = (as_of == self.test).to_numpy()
            train = frame[(draw >= held_out) & as_of.isin(self.train).to_numpy()]
            valid = frame[at_test & (draw >= self.test_fraction) & (draw < held_out)]
            test = frame[at_test & (draw < self.test_fraction)]
        for role, part in (("train", train), ("valid", valid), ("test", test)):
            if part.empty:
                hint = (
                    "no customer had bought by that cutoff; with a short history, split by "
                    "customers, or use fewer cutoffs or a shorter horizon"
                    if self.by == "time"
                    else "too few customers for the held-out fractions, or none had bought by "
                    "the training cutoffs"
                )
                raise ValueError(f"the {role} rows are empty ({self.describe()}): {hint}")
        return train, valid, test


def holdout_draw(customer_id: pd.Series, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per row, fixed by the customer's id and ``seed``.

    A hash (SipHash, keyed by the seed) of the id as text: the same customer draws the same
    number at every cutoff, in every run and on every machine, and ``1`` and ``"1"`` agree.
    """
    key = f"rapport{seed:09d}"[-16:].rjust(16, "0")
    codes, ids = pd.factorize(customer_id)  # each customer hashed once, not once per cutoff
    hashed = pd.util.hash_pandas_object(pd.Series(ids).astype(str), index=False, hash_key=key)
    draws = (hashed.to_numpy() >> np.uint64(11)).astype(np.float64) / float(2**53)
    return draws[codes]


def split_cutoffs(cutoffs: Sequence[dt.date], horizon_days: int) -> TrainingSplit:
    """Split sorted cutoffs out of time (see the module docstring).

    Raises
    ------
    ValueError
        When no validation or training cutoff fits before the test cutoff's start.
    """
    ordered = sorted(set(cutoffs))
    if len(ordered) < 3:
        raise ValueError(
            f"an out-of-time split needs at least 3 cutoffs with customers, have {len(ordered)} "
            f"({', '.join(map(str, ordered))}): the data start too late for more; hold out "
            "customers instead (split: {by: customers})"
        )
    test = ordered[-1]
    horizon = dt.timedelta(days=horizon_days)
    eligible = [c for c in ordered[:-1] if c + horizon <= test]
    if not eligible:
        raise ValueError(
            f"no cutoff's {horizon_days}-day horizon ends by the test cutoff {test}: "
            f"add earlier cutoffs (have {', '.join(map(str, ordered))}), or hold out "
            "customers instead (split: {by: customers})"
        )
    valid = eligible[-1]
    # A training label over (c, c + H] that reached past the validation cutoff would be
    # validation's own future: selection would then favour the models that memorise it.
    train = tuple(c for c in eligible if c + horizon <= valid)
    if not train:
        raise ValueError(
            f"no training cutoff whose {horizon_days}-day horizon ends by the validation "
            f"cutoff {valid}: add earlier cutoffs (cutoffs.count), or hold out customers "
            "instead (split: {by: customers})"
        )
    return TrainingSplit(train=train, valid=valid, test=test)


def split_rows(cutoffs: Sequence[dt.date], horizon_days: int, config: SplitConfig) -> TrainingSplit:
    """The split ``config`` asks for over ``cutoffs``."""
    if config.by == "time":
        return split_cutoffs(cutoffs, horizon_days)
    ordered = tuple(sorted(set(cutoffs)))
    return TrainingSplit(
        train=ordered,
        valid=ordered[-1],
        test=ordered[-1],
        by="customers",
        valid_fraction=config.valid_fraction,
        test_fraction=config.test_fraction,
        seed=config.holdout_seed,
    )


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
