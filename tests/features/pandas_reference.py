"""The same features as ``rapport.features.build.build_features``, written in idiomatic pandas.

This is the benchmark's "what a data scientist would write" comparison for ONE cutoff: boolean
masks, ``groupby(...).agg(...)`` with named aggregations, ``.diff()`` on sorted purchase days,
``unstack`` for the channel x event counts and ``merge`` to put the pieces together. It is
vectorised (no Python loop over customers) but makes no effort beyond that, and it returns the
same values as ``build_features`` (the definitions are in ``rapport.features.definitions``).

Inputs are canonical frames (``rapport.features.contracts.validate_table``): ``tx`` with
``customer_id``, ``timestamp`` (naive ``datetime64``), ``amount``; ``ix`` with ``customer_id``,
``timestamp``, ``channel`` and ``event`` (lower-case categoricals or strings).
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from rapport.features.definitions import (
    COMPLAINT_EVENT,
    OUTBOUND_EVENTS,
    FeatureSpec,
    column_fragment,
    event_plural,
    feature_columns,
)
from rapport.features.segments import SEGMENT_RULES, SEGMENTS

_PLURALS = {"sent": "sends", "delivered": "deliveries"}


def _trend(now: pd.Series, before: pd.Series) -> pd.Series:
    """``(now - before) / (|now| + |before|)``, 0 when both are 0."""
    scale = now.abs() + before.abs()
    return ((now - before) / scale.where(scale > 0)).fillna(0.0)


def _days_since(last_day: pd.Series | pd.DataFrame, cutoff: pd.Timestamp):
    """Whole days from ``last_day`` to the cutoff (NaN where there is no day)."""
    delta = cutoff - last_day
    if isinstance(delta, pd.DataFrame):
        return delta.apply(lambda col: col.dt.days)
    return delta.dt.days


def _transaction_features(
    tx: pd.DataFrame, cutoff: pd.Timestamp, windows: tuple[int, ...]
) -> pd.DataFrame:
    day = tx["timestamp"].dt.normalize()
    tx = tx.loc[day <= cutoff, ["customer_id", "amount"]].assign(day=day)
    tx["is_purchase"] = tx["amount"] >= 0

    # Purchase rows: counts, mean and spread of the order values.
    orders = (
        tx[tx["is_purchase"]]
        .groupby("customer_id")["amount"]
        .agg(n_purchases="size", avg_order_value="mean", spend_std="std")
    )

    # One row per customer and day with a purchase or a refund; a purchase day has an order.
    daily = (
        tx.groupby(["customer_id", "day"], sort=True)
        .agg(spend=("amount", "sum"), n_orders=("is_purchase", "sum"))
        .reset_index()
    )
    daily["age"] = (cutoff - daily["day"]).dt.days  # 0 on the cutoff day

    purchase_days = daily[daily["n_orders"] > 0].copy()
    purchase_days["gap"] = purchase_days.groupby("customer_id")["day"].diff().dt.days
    purchase_days["repeat_spend"] = purchase_days["spend"].where(purchase_days["gap"].notna())
    history = purchase_days.groupby("customer_id").agg(
        first_day=("day", "min"),
        last_day=("day", "max"),
        n_purchase_days=("day", "size"),
        monetary_value=("repeat_spend", "mean"),
        ipt_mean_days=("gap", "mean"),
        ipt_std_days=("gap", "std"),
    )
    history["monetary_value"] = history["monetary_value"].fillna(0.0)

    # Windowed sums in one groupby: each window is a masked copy of the daily columns.
    masked = {}
    for w in windows:
        now = daily["age"] < w
        before = (daily["age"] >= w) & (daily["age"] < 2 * w)
        masked[f"purchases_{w}d"] = daily["n_orders"].where(now, 0)
        masked[f"spend_{w}d"] = daily["spend"].where(now, 0.0)
        masked[f"purchases_before_{w}d"] = daily["n_orders"].where(before, 0)
        masked[f"spend_before_{w}d"] = daily["spend"].where(before, 0.0)
    sums = (
        daily[["customer_id", "spend"]]
        .rename(columns={"spend": "total_spend"})
        .assign(**masked)
        .groupby("customer_id")
        .sum()
    )

    feats = history.merge(orders, left_index=True, right_index=True, how="left").merge(
        sums, left_index=True, right_index=True, how="left"
    )
    feats["frequency"] = (feats["n_purchase_days"] - 1).astype("float64")
    feats["recency"] = (feats["last_day"] - feats["first_day"]).dt.days.astype("float64")
    feats["tenure_days"] = _days_since(feats["first_day"], cutoff)
    feats["T"] = feats["tenure_days"].astype("float64")
    feats["recency_days"] = _days_since(feats["last_day"], cutoff)
    for w in windows:
        feats[f"purchases_trend_{w}d"] = _trend(
            feats[f"purchases_{w}d"].astype("float64"), feats[f"purchases_before_{w}d"]
        )
        feats[f"spend_trend_{w}d"] = _trend(feats[f"spend_{w}d"], feats[f"spend_before_{w}d"])
    return feats


def _interaction_features(
    ix: pd.DataFrame,
    cutoff: pd.Timestamp,
    windows: tuple[int, ...],
    pairs: tuple[tuple[str, str], ...],
) -> pd.DataFrame:
    longest = windows[-1]
    day = ix["timestamp"].dt.normalize()
    ix = ix.loc[day <= cutoff, ["customer_id", "channel", "event"]].assign(day=day)
    ix["age"] = (cutoff - ix["day"]).dt.days  # 0 on the cutoff day
    is_response = ~ix["event"].isin([*OUTBOUND_EVENTS, COMPLAINT_EVENT])
    is_complaint = ix["event"] == COMPLAINT_EVENT
    in_window = {w: ix["age"] < w for w in windows}

    # channel x event counts per window: count per (customer, channel, event), then unstack.
    counts = (
        ix.assign(**{f"n_{w}": in_window[w] for w in windows})
        .groupby(["customer_id", "channel", "event"], observed=True)[[f"n_{w}" for w in windows]]
        .sum()
        .unstack(["channel", "event"], fill_value=0)
    )
    counts.columns = [
        f"{column_fragment(str(c))}_{event_plural(str(e))}_{n.removeprefix('n_')}d"
        for n, c, e in counts.columns
    ]

    # Days since the last event of each channel.
    last_by_channel = (
        ix.groupby(["customer_id", "channel"], observed=True)["day"].max().unstack("channel")
    )
    days_since_channel = _days_since(last_by_channel, cutoff)
    days_since_channel.columns = [
        f"days_since_{column_fragment(str(c))}" for c in days_since_channel.columns
    ]

    # Responses and complaints: masked counts and last days in one named aggregation.
    flagged = ix[["customer_id"]].assign(
        response_day=ix["day"].where(is_response),
        complaint_day=ix["day"].where(is_complaint),
        **{f"responses_{w}d": is_response & in_window[w] for w in windows},
        **{f"complaints_{w}d": is_complaint & in_window[w] for w in windows},
    )
    engagement = flagged.groupby("customer_id").agg(
        last_response=("response_day", "max"),
        last_complaint=("complaint_day", "max"),
        **{f"responses_{w}d": (f"responses_{w}d", "sum") for w in windows},
        **{f"complaints_{w}d": (f"complaints_{w}d", "sum") for w in windows},
    )
    engagement["days_since_response"] = _days_since(engagement.pop("last_response"), cutoff)
    engagement["days_since_complaint"] = _days_since(engagement.pop("last_complaint"), cutoff)

    # Preferred channel: most responses in the longest window, ties alphabetical.
    by_channel = (
        ix[is_response & in_window[longest]]
        .groupby(["customer_id", "channel"], observed=True)
        .size()
        .unstack("channel", fill_value=0)
    )
    by_channel.columns = by_channel.columns.astype(str)
    by_channel = by_channel[sorted(by_channel.columns)]
    preferred = by_channel.idxmax(axis=1).rename("preferred_channel")

    out = (
        counts.merge(days_since_channel, left_index=True, right_index=True, how="outer")
        .merge(engagement, left_index=True, right_index=True, how="outer")
        .merge(preferred, left_index=True, right_index=True, how="left")
    )
    # Pairs or channels with no event by the cutoff still get their (all zero / NaN) column.
    for c, e in pairs:
        for w in windows:
            col = f"{column_fragment(c)}_{event_plural(e)}_{w}d"
            if col not in out.columns:
                out[col] = 0
    for c in sorted({c for c, _ in pairs}):
        col = f"days_since_{column_fragment(c)}"
        if col not in out.columns:
            out[col] = np.nan

    if ("email", "sent") in pairs:
        sends = out[f"email_sends_{longest}d"]
        for event in ("open", "click"):
            if ("email", event) in pairs:
                out[f"email_{event}_rate_{longest}d"] = out[
                    f"email_{event_plural(event)}_{longest}d"
                ] / sends.where(sends > 0)
    return out


def _percent_rank(values: pd.Series) -> pd.Series:
    """SQL ``PERCENT_RANK``: ``(rank_min - 1) / (n - 1)``, 0 for a single row."""
    n = len(values)
    rank = values.rank(method="min")
    return (rank - 1) / (n - 1) if n > 1 else rank * 0.0


def _scores(feats: pd.DataFrame) -> pd.DataFrame:
    def bucket(values: pd.Series) -> pd.Series:
        return np.floor(5 * _percent_rank(values)).clip(upper=4).astype("int64")

    scores = pd.DataFrame(
        {
            "r_score": 5 - bucket(feats["recency_days"]),
            "f_score": 1 + bucket(feats["n_purchase_days"]),
            "m_score": 1 + bucket(feats["total_spend"]),
        },
        index=feats.index,
    )
    scores["fm_score"] = np.ceil((scores["f_score"] + scores["m_score"]) / 2).astype("int64")
    cells = pd.DataFrame(
        [(r, fm, name) for name, rs, fms in SEGMENT_RULES for r in rs for fm in fms],
        columns=["r_score", "fm_score", "segment"],
    )
    segment = scores.reset_index().merge(cells, on=["r_score", "fm_score"], how="left")
    scores["segment"] = pd.Categorical(segment["segment"].to_numpy(), categories=list(SEGMENTS))
    return scores


def pandas_features(
    tx: pd.DataFrame,
    ix: pd.DataFrame | None,
    *,
    as_of: str | dt.date,
    windows: tuple[int, ...] = (30, 90, 365),
) -> pd.DataFrame:
    """Transaction and interaction features for one cutoff, as ``build_features`` returns them.

    One row per customer with a purchase (``amount >= 0``) on or before ``as_of`` (the whole
    day included), sorted by ``customer_id``; the columns of ``build_features`` in its order.
    Interaction pairs are the distinct ``(channel, event)`` pairs observed in ``ix``.
    """
    cutoff = pd.Timestamp(as_of).normalize()
    windows = tuple(sorted({int(w) for w in windows}))

    feats = _transaction_features(tx, cutoff, windows)

    pairs: tuple[tuple[str, str], ...] = ()
    if ix is not None and len(ix):
        observed = ix.groupby(["channel", "event"], observed=True).size().index
        pairs = tuple(sorted({(str(c).lower(), str(e).lower()) for c, e in observed}))
    if pairs:
        inter = _interaction_features(ix, cutoff, windows, pairs)
        feats = feats.merge(inter, left_index=True, right_index=True, how="left")
        # Customers without any interaction by the cutoff: counts 0, days_since/rates NaN.
        counts = [f"{column_fragment(c)}_{event_plural(e)}_{w}d" for c, e in pairs for w in windows]
        counts += [f"{kind}_{w}d" for kind in ("responses", "complaints") for w in windows]
        feats[counts] = feats[counts].fillna(0).astype("int64")
        feats["preferred_channel"] = feats["preferred_channel"].astype("string")

    feats = feats.join(_scores(feats))
    feats["as_of"] = cutoff.as_unit("us")
    spec = FeatureSpec(windows=windows, interaction_pairs=pairs)
    feats = feats.rename_axis("customer_id").reset_index().sort_values("customer_id")
    return feats[feature_columns(spec)].reset_index(drop=True)


if __name__ == "__main__":  # pragma: no cover - a quick look at the output
    from rapport.features.datasets import load_cdnow

    print(pandas_features(load_cdnow("sample"), None, as_of="1997-09-30").head())
