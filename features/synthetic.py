"""Seeded, vectorised, chunked synthetic customer event data (transactions + interactions).

The world is Pareto/NBD-like, with Gamma-Gamma spend:

* customer ``c`` is acquired at a time ``a_c`` drawn over ``[start, end - acquisition_cutoff_days]``
  (density rising linearly by ``acquisition_growth``), and makes its first purchase then;
* it purchases again as a Poisson process of rate ``lambda_c ~ Gamma(purchase_rate_shape,
  purchase_rate_scale)`` (per day) while alive, and dies after an exponential lifetime of rate
  ``mu_c ~ Gamma(dropout_rate_shape, dropout_rate_scale)`` (per day); many customers lapse;
* each order is worth ``Gamma(spend_order_shape, m_c / spend_order_shape)`` where the customer's
  mean ``m_c ~ Gamma(spend_mean_shape, spend_mean / spend_mean_shape)``; a share ``refund_prob``
  of orders is refunded (a separate row with the negated amount) a few days later;
* e-mails are sent to every customer, alive or dead, as a Poisson process of rate
  ``email_send_rate`` from acquisition to ``end``; opens and clicks follow a send, web visits,
  app opens, phone calls and store visits are Poisson processes whose rate is proportional to
  ``lambda_c``; all of them are multiplied by an engagement factor that is 1 while the customer is
  well alive, ramps down linearly to ``fade_floor`` over the ``fade_days`` before death, and is
  ``post_death_factor`` afterwards; complaints are rare, with an extra burst shortly before death.

Every chunk of ``chunk_customers`` customers draws from its own child of
``np.random.SeedSequence(seed)``, so the output is a pure function of the configuration and chunk
``i`` never depends on chunk ``j``. Within a chunk everything is vectorised (no loop over
customers or events); memory is bounded by the chunk size.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rapport.features.contracts import contract_metadata

__all__ = [
    "INTERACTION_CHANNELS",
    "INTERACTION_EVENTS",
    "INTERACTION_PAIRS",
    "SyntheticConfig",
    "SyntheticSummary",
    "customers_for_transactions",
    "expected_transactions_per_customer",
    "generate_synthetic",
    "iter_synthetic",
    "write_synthetic",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Interaction channels, in the order of the ``channel`` categories.
INTERACTION_CHANNELS: tuple[str, ...] = ("email", "web", "app", "phone", "store")
#: Interaction events, in the order of the ``event`` categories.
INTERACTION_EVENTS: tuple[str, ...] = ("sent", "open", "click", "visit", "call", "complaint")
#: The fixed set of ``(channel, event)`` pairs the generator emits.
INTERACTION_PAIRS: tuple[tuple[str, str], ...] = (
    ("email", "sent"),
    ("email", "open"),
    ("email", "click"),
    ("web", "visit"),
    ("app", "open"),
    ("phone", "call"),
    ("phone", "complaint"),
    ("store", "visit"),
)

_CHANNEL_DTYPE = pd.CategoricalDtype(list(INTERACTION_CHANNELS))
_EVENT_DTYPE = pd.CategoricalDtype(list(INTERACTION_EVENTS))
_SECONDS_PER_DAY = 86_400
_US_PER_SECOND = 1_000_000
# Largest within-customer sort fraction: keeps ``owner + u`` strictly below ``owner + 1``.
_MAX_FRACTION = 1.0 - 1e-9

# marked as in the contract: generated rows are unique, naive UTC and lower-case already
_TRANSACTION_SCHEMA = pa.schema(
    [
        ("customer_id", pa.int64()),
        ("timestamp", pa.timestamp("us")),
        ("amount", pa.float64()),
        ("order_id", pa.int64()),
    ],
    metadata=contract_metadata("transactions"),
)
_INTERACTION_SCHEMA = pa.schema(
    [
        ("customer_id", pa.int64()),
        ("timestamp", pa.timestamp("us")),
        ("channel", pa.dictionary(pa.int8(), pa.string())),
        ("event", pa.dictionary(pa.int8(), pa.string())),
    ],
    metadata=contract_metadata("interactions"),
)


def _pair_code(channel: str, event: str) -> tuple[int, int]:
    return INTERACTION_CHANNELS.index(channel), INTERACTION_EVENTS.index(event)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic world; all rates are per day.

    Parameters
    ----------
    n_customers : int
        Number of customers (ids ``1..n_customers``).
    start : str
        First possible acquisition date (ISO date; data starts at its midnight).
    end : str
        Last day of data, inclusive (no event at or after the following midnight).
    seed : int
        Root seed of ``np.random.SeedSequence``.
    interactions : bool
        Whether to generate interactions (otherwise the interactions frames are empty).
    chunk_customers : int
        Customers generated per chunk; output is identical for the same seed and chunk size.
    acquisition_cutoff_days : int
        No customer is acquired during the last ``acquisition_cutoff_days`` days.
    acquisition_growth : float
        Acquisition density rises linearly from 1 to ``1 + acquisition_growth`` over the period.
    purchase_rate_shape, purchase_rate_scale : float
        Gamma shape and scale of the repeat-purchase rate ``lambda`` (mean one purchase per
        ``1 / (shape * scale)`` = 75 days by default).
    dropout_rate_shape, dropout_rate_scale : float
        Gamma shape and scale of the dropout rate ``mu`` (mean ``mu`` 1/600 per day by default;
        the lifetime given ``mu`` is exponential).
    spend_mean, spend_mean_shape : float
        Mean and Gamma shape of the customer-level mean order value.
    spend_order_shape : float
        Gamma shape of an order's value around the customer's mean.
    refund_prob : float
        Probability that an order is refunded (a second row with the negated amount).
    refund_delay_days : float
        Mean (exponential) delay between an order and its refund.
    email_send_rate : float
        Rate of e-mail sends to every customer, alive or not, from acquisition to ``end``
        (one per 180 days by default, which keeps interactions about as many as transactions;
        use e.g. ``1 / 7`` for a weekly newsletter).
    email_open_prob : float
        Probability that an average customer (``lambda`` at its mean) opens a send while fully
        engaged; scales with ``sqrt(lambda / mean lambda)``, capped at 0.95.
    email_click_prob : float
        Probability that an open is followed by a click.
    web_visits_per_purchase, app_opens_per_purchase : float
        Web-visit and app-open rates as multiples of ``lambda`` (app opens only for app users).
    app_user_share : float
        Share of customers who use the app.
    phone_calls_per_purchase, store_visits_per_purchase : float
        Phone-call and store-visit rates as multiples of ``lambda``.
    complaints_per_purchase : float
        Baseline complaint rate as a multiple of ``lambda``.
    complaint_pre_death : float
        Expected extra complaints within ``complaint_window_days`` before death.
    complaint_window_days : float
        Length of the pre-death complaint window.
    fade_days : float
        Engagement ramps down linearly over the ``fade_days`` before death.
    fade_floor : float
        Engagement factor reached at death.
    post_death_factor : float
        Engagement factor after death.
    """

    n_customers: int = 10_000
    start: str = "2023-01-01"
    end: str = "2025-12-31"
    seed: int = 42
    interactions: bool = True
    chunk_customers: int = 200_000
    acquisition_cutoff_days: int = 60
    acquisition_growth: float = 1.0
    purchase_rate_shape: float = 1.3
    purchase_rate_scale: float = 1.0 / (75.0 * 1.3)
    dropout_rate_shape: float = 1.5
    dropout_rate_scale: float = 1.0 / (600.0 * 1.5)
    spend_mean: float = 55.0
    spend_mean_shape: float = 2.5
    spend_order_shape: float = 3.0
    refund_prob: float = 0.02
    refund_delay_days: float = 10.0
    email_send_rate: float = 1.0 / 180.0
    email_open_prob: float = 0.4
    email_click_prob: float = 0.2
    web_visits_per_purchase: float = 0.35
    app_opens_per_purchase: float = 0.8
    app_user_share: float = 0.3
    phone_calls_per_purchase: float = 0.05
    store_visits_per_purchase: float = 0.12
    complaints_per_purchase: float = 0.01
    complaint_pre_death: float = 0.1
    complaint_window_days: float = 30.0
    fade_days: float = 75.0
    fade_floor: float = 0.1
    post_death_factor: float = 0.02

    def __post_init__(self) -> None:
        if self.n_customers < 0:
            raise ValueError(f"n_customers must be >= 0, got {self.n_customers}")
        if self.chunk_customers < 1:
            raise ValueError(f"chunk_customers must be >= 1, got {self.chunk_customers}")
        if self.acquisition_cutoff_days < 0:
            raise ValueError("acquisition_cutoff_days must be >= 0")
        if self.horizon_days - self.acquisition_cutoff_days < 1:
            raise ValueError(
                f"end ({self.end}) must be more than acquisition_cutoff_days "
                f"({self.acquisition_cutoff_days}) days after start ({self.start})"
            )
        positive = (
            "purchase_rate_shape",
            "purchase_rate_scale",
            "dropout_rate_shape",
            "dropout_rate_scale",
            "spend_mean",
            "spend_mean_shape",
            "spend_order_shape",
            "refund_delay_days",
            "complaint_window_days",
            "fade_days",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        non_negative = (
            "acquisition_growth",
            "email_send_rate",
            "web_visits_per_purchase",
            "app_opens_per_purchase",
            "phone_calls_per_purchase",
            "store_visits_per_purchase",
            "complaints_per_purchase",
            "complaint_pre_death",
        )
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        probabilities = (
            "refund_prob",
            "email_open_prob",
            "email_click_prob",
            "app_user_share",
            "fade_floor",
            "post_death_factor",
        )
        for name in probabilities:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def start_date(self) -> np.datetime64:
        """First day of data (``start`` at day resolution)."""
        return np.datetime64(self.start, "D")

    @property
    def end_date(self) -> np.datetime64:
        """Last day of data (``end`` at day resolution, inclusive)."""
        return np.datetime64(self.end, "D")

    @property
    def horizon_days(self) -> int:
        """Number of days from ``start`` to ``end``, both inclusive."""
        return int((self.end_date - self.start_date).astype(np.int64)) + 1

    @property
    def n_chunks(self) -> int:
        """Number of customer chunks."""
        return -(-self.n_customers // self.chunk_customers)


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`write_synthetic` wrote.

    Parameters
    ----------
    n_customers : int
        Customers generated (every one has at least one transaction).
    n_transactions, n_interactions : int
        Rows written to each file.
    transactions_path, interactions_path : Path
        Final paths of the two Parquet files.
    """

    n_customers: int
    n_transactions: int
    n_interactions: int
    transactions_path: Path
    interactions_path: Path


# --------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _Customers:
    """Latent customer parameters of one chunk; times are in days since ``start``."""

    acquisition: FloatArray
    death: FloatArray
    purchase_rate: FloatArray
    spend_mean: FloatArray
    app_user: npt.NDArray[np.bool_]


def _draw_customers(config: SyntheticConfig, rng: np.random.Generator, n: int) -> _Customers:
    window = float(config.horizon_days - config.acquisition_cutoff_days)
    g = config.acquisition_growth
    v = rng.random(n)
    # Inverse CDF of the density proportional to 1 + g x on [0, 1].
    x = v if g == 0 else (np.sqrt(1.0 + 2.0 * g * v * (1.0 + g / 2.0)) - 1.0) / g
    acquisition = np.minimum(x * window, np.nextafter(window, 0.0))
    purchase_rate = rng.gamma(config.purchase_rate_shape, config.purchase_rate_scale, n)
    dropout_rate = rng.gamma(config.dropout_rate_shape, config.dropout_rate_scale, n)
    lifetime = rng.standard_exponential(n) / np.maximum(dropout_rate, 1e-12)
    spend_mean = rng.gamma(config.spend_mean_shape, config.spend_mean / config.spend_mean_shape, n)
    app_user = rng.random(n) < config.app_user_share
    return _Customers(acquisition, acquisition + lifetime, purchase_rate, spend_mean, app_user)


def _poisson_events(
    rng: np.random.Generator, rate: FloatArray, lo: FloatArray, hi: FloatArray
) -> tuple[IntArray, FloatArray]:
    """Homogeneous Poisson events of per-customer ``rate`` on ``[lo, hi)`` (empty if hi <= lo)."""
    span = np.clip(hi - lo, 0.0, None)
    counts = rng.poisson(rate * span)
    owner = np.repeat(np.arange(rate.size, dtype=np.int64), counts)
    times = lo[owner] + rng.random(owner.size) * span[owner]
    return owner, times


def _engagement(config: SyntheticConfig, times: FloatArray, death: FloatArray) -> FloatArray:
    """Engagement factor at ``times`` for customers dying at ``death`` (same shape)."""
    to_death = death - times
    ramp = config.fade_floor + (1.0 - config.fade_floor) * np.clip(
        to_death / config.fade_days, 0.0, 1.0
    )
    return np.where(to_death > 0, ramp, config.post_death_factor)


def _engaged_events(
    config: SyntheticConfig, rng: np.random.Generator, cust: _Customers, rate: FloatArray
) -> tuple[IntArray, FloatArray]:
    """Poisson events of intensity ``rate * engagement(t)`` from acquisition to ``end``."""
    horizon = float(config.horizon_days)
    alive_end = np.minimum(cust.death, horizon)
    owner, times = _poisson_events(rng, rate, cust.acquisition, alive_end)
    keep = rng.random(owner.size) < _engagement(config, times, cust.death[owner])
    owner_post, times_post = _poisson_events(
        rng, rate * config.post_death_factor, cust.death, np.full_like(cust.death, horizon)
    )
    return np.concatenate([owner[keep], owner_post]), np.concatenate([times[keep], times_post])


def _sort_order(owner: IntArray, times: FloatArray, cust: _Customers, horizon: float) -> IntArray:
    """Permutation sorting events by owner, then time (one float argsort)."""
    start = cust.acquisition[owner]
    fraction = np.clip((times - start) / (horizon - start), 0.0, _MAX_FRACTION)
    return np.argsort(owner + fraction)


def _to_timestamps(config: SyntheticConfig, times: FloatArray) -> npt.NDArray[np.datetime64]:
    """Days since ``start`` -> naive ``datetime64[us]``, floored to whole seconds."""
    seconds = np.floor(times * _SECONDS_PER_DAY).astype(np.int64)
    origin = config.start_date.astype("datetime64[us]").astype(np.int64)
    return (origin + seconds * _US_PER_SECOND).astype("datetime64[us]")


def _transactions(
    config: SyntheticConfig,
    rng: np.random.Generator,
    cust: _Customers,
    first_customer_id: int,
    first_order_id: int,
) -> pd.DataFrame:
    n = cust.acquisition.size
    horizon = float(config.horizon_days)
    # First purchase at acquisition, repeats while alive and before the end of data.
    rep_owner, rep_times = _poisson_events(
        rng, cust.purchase_rate, cust.acquisition, np.minimum(cust.death, horizon)
    )
    owner = np.concatenate([np.arange(n, dtype=np.int64), rep_owner])
    times = np.concatenate([cust.acquisition, rep_times])
    shape = config.spend_order_shape
    amount = np.round(rng.gamma(shape, cust.spend_mean[owner] / shape), 2)
    # Refunds: a second row, later, with the negated amount of the refunded order.
    refunded = np.flatnonzero(rng.random(owner.size) < config.refund_prob)
    refund_times = times[refunded] + rng.exponential(config.refund_delay_days, refunded.size)
    observed = refund_times < horizon
    refunded, refund_times = refunded[observed], refund_times[observed]
    owner = np.concatenate([owner, owner[refunded]])
    times = np.concatenate([times, refund_times])
    amount = np.concatenate([amount, -amount[refunded]])

    order = _sort_order(owner, times, cust, horizon)
    owner, times, amount = owner[order], times[order], amount[order]
    return pd.DataFrame(
        {
            "customer_id": owner + first_customer_id,
            "timestamp": _to_timestamps(config, times),
            "amount": amount + 0.0,  # turns -0.0 into 0.0
            "order_id": np.arange(first_order_id, first_order_id + owner.size, dtype=np.int64),
        }
    )


def _empty_transactions() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": np.empty(0, np.int64),
            "timestamp": np.empty(0, "datetime64[us]"),
            "amount": np.empty(0, np.float64),
            "order_id": np.empty(0, np.int64),
        }
    )


def _interaction_frame(
    customer_id: IntArray,
    timestamp: npt.NDArray[np.datetime64],
    channel: npt.NDArray[np.int8],
    event: npt.NDArray[np.int8],
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": customer_id,
            "timestamp": timestamp,
            "channel": pd.Categorical.from_codes(channel, dtype=_CHANNEL_DTYPE),
            "event": pd.Categorical.from_codes(event, dtype=_EVENT_DTYPE),
        }
    )


def _empty_interactions() -> pd.DataFrame:
    return _interaction_frame(
        np.empty(0, np.int64),
        np.empty(0, "datetime64[us]"),
        np.empty(0, np.int8),
        np.empty(0, np.int8),
    )


def _interactions(
    config: SyntheticConfig,
    rng: np.random.Generator,
    cust: _Customers,
    first_customer_id: int,
) -> pd.DataFrame:
    horizon = float(config.horizon_days)
    n = cust.acquisition.size
    owners: list[IntArray] = []
    times: list[FloatArray] = []
    codes: list[tuple[tuple[int, int], int]] = []

    def add(pair: tuple[str, str], owner: IntArray, when: FloatArray) -> None:
        keep = when < horizon
        owners.append(owner[keep])
        times.append(when[keep])
        codes.append((_pair_code(*pair), int(keep.sum())))

    # E-mail: sends to everyone until the end; opens depend on engagement at send time.
    send_owner, send_times = _poisson_events(
        rng,
        np.full(n, config.email_send_rate),
        cust.acquisition,
        np.full(n, horizon),
    )
    add(("email", "sent"), send_owner, send_times)
    mean_rate = config.purchase_rate_shape * config.purchase_rate_scale
    open_prob = np.minimum(config.email_open_prob * np.sqrt(cust.purchase_rate / mean_rate), 0.95)
    p_open = open_prob[send_owner] * _engagement(config, send_times, cust.death[send_owner])
    opened = rng.random(send_owner.size) < p_open
    open_owner = send_owner[opened]
    open_times = send_times[opened] + rng.exponential(0.5, open_owner.size)
    add(("email", "open"), open_owner, open_times)
    clicked = rng.random(open_owner.size) < config.email_click_prob
    click_owner = open_owner[clicked]
    click_times = open_times[clicked] + rng.exponential(10.0 / 1440.0, click_owner.size)
    add(("email", "click"), click_owner, click_times)

    # Engagement channels: rate proportional to the purchase rate, fading before death.
    lam = cust.purchase_rate
    channel_rates: tuple[tuple[tuple[str, str], FloatArray], ...] = (
        (("web", "visit"), lam * config.web_visits_per_purchase),
        (("app", "open"), lam * config.app_opens_per_purchase * cust.app_user),
        (("phone", "call"), lam * config.phone_calls_per_purchase),
        (("store", "visit"), lam * config.store_visits_per_purchase),
        (("phone", "complaint"), lam * config.complaints_per_purchase),
    )
    for pair, rate in channel_rates:
        add(pair, *_engaged_events(config, rng, cust, rate))
    # Extra complaints in the window just before death (only if death is observed).
    window = config.complaint_window_days
    burst_owner, burst_times = _poisson_events(
        rng,
        np.full(n, config.complaint_pre_death / window),
        np.maximum(cust.acquisition, cust.death - window),
        np.minimum(cust.death, horizon),
    )
    add(("phone", "complaint"), burst_owner, burst_times)

    owner = np.concatenate(owners)
    when = np.concatenate(times)
    channel = np.concatenate([np.full(k, c, np.int8) for (c, _), k in codes])
    event = np.concatenate([np.full(k, e, np.int8) for (_, e), k in codes])
    order = _sort_order(owner, when, cust, horizon)
    return _interaction_frame(
        owner[order] + first_customer_id,
        _to_timestamps(config, when[order]),
        channel[order],
        event[order],
    )


# --------------------------------------------------------------------------- public API


def iter_synthetic(config: SyntheticConfig) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """Yield ``(transactions, interactions)`` one customer chunk at a time.

    Chunk ``i`` holds customers ``i * chunk_customers + 1 ..`` and draws from the ``i``-th child of
    ``np.random.SeedSequence(config.seed)``; its transactions do not depend on
    ``config.interactions``.

    Parameters
    ----------
    config : SyntheticConfig
        The synthetic world.

    Yields
    ------
    transactions : pandas.DataFrame
        ``customer_id`` (int64, ``1..n_customers``), ``timestamp`` (naive ``datetime64[us]``,
        UTC, whole seconds), ``amount`` (float64, cents; negative for refunds), ``order_id``
        (int64, ``1..`` consecutive over all chunks); sorted by customer then time. Each
        customer's first row is its acquisition purchase.
    interactions : pandas.DataFrame
        ``customer_id`` (int64), ``timestamp`` (naive ``datetime64[us]``), ``channel``
        (category of :data:`INTERACTION_CHANNELS`), ``event`` (category of
        :data:`INTERACTION_EVENTS`); pairs among :data:`INTERACTION_PAIRS`; sorted by customer
        then time; empty when ``config.interactions`` is false.
    """
    children = np.random.SeedSequence(config.seed).spawn(config.n_chunks)
    next_order_id = 1
    for index, child in enumerate(children):
        first = index * config.chunk_customers
        n = min(config.chunk_customers, config.n_customers - first)
        seq_customers, seq_transactions, seq_interactions = child.spawn(3)
        cust = _draw_customers(config, np.random.default_rng(seq_customers), n)
        tx = _transactions(
            config, np.random.default_rng(seq_transactions), cust, first + 1, next_order_id
        )
        next_order_id += len(tx)
        if config.interactions:
            ix = _interactions(config, np.random.default_rng(seq_interactions), cust, first + 1)
        else:
            ix = _empty_interactions()
        yield tx, ix


def generate_synthetic(config: SyntheticConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generate all chunks and concatenate them (for demo and test sizes).

    Parameters
    ----------
    config : SyntheticConfig
        The synthetic world.

    Returns
    -------
    transactions, interactions : pandas.DataFrame
        The frames of :func:`iter_synthetic`, concatenated with a fresh ``RangeIndex``.
    """
    chunks = list(iter_synthetic(config))
    if not chunks:
        return _empty_transactions(), _empty_interactions()
    tx = pd.concat([c[0] for c in chunks], ignore_index=True)
    ix = pd.concat([c[1] for c in chunks], ignore_index=True)
    return tx, ix


def _to_table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def write_synthetic(
    config: SyntheticConfig, out_dir: str | Path, *, progress: bool = False
) -> SyntheticSummary:
    """Write ``transactions.parquet`` and ``interactions.parquet`` under ``out_dir``.

    One row group per chunk; at most one chunk is in memory. Both files are written to
    temporary names in ``out_dir`` and renamed at the end, so a failure never leaves a partial
    file under a final name (an existing file is replaced only on success).

    Parameters
    ----------
    config : SyntheticConfig
        The synthetic world.
    out_dir : str or Path
        Output folder, created if missing.
    progress : bool
        Show a ``rich`` progress bar over chunks (on stderr).

    Returns
    -------
    SyntheticSummary
        Customer and row counts, and the two paths. The files hold the columns of
        :func:`iter_synthetic`; ``channel`` and ``event`` are dictionary-encoded strings.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tx_path = out / "transactions.parquet"
    ix_path = out / "interactions.parquet"
    token = uuid.uuid4().hex[:12]
    tx_tmp = out / f".transactions.parquet.{token}.tmp"
    ix_tmp = out / f".interactions.parquet.{token}.tmp"
    n_tx = n_ix = 0
    bar: Any = None
    try:
        with (
            pq.ParquetWriter(tx_tmp, _TRANSACTION_SCHEMA) as tx_writer,
            pq.ParquetWriter(ix_tmp, _INTERACTION_SCHEMA) as ix_writer,
        ):
            if progress:
                from rich.console import Console
                from rich.progress import Progress

                bar = Progress(console=Console(stderr=True), transient=False)
                bar.start()
                task = bar.add_task("synthetic data", total=config.n_chunks)
            for tx, ix in iter_synthetic(config):
                tx_writer.write_table(
                    _to_table(tx, _TRANSACTION_SCHEMA), row_group_size=max(len(tx), 1)
                )
                if len(ix):
                    ix_writer.write_table(
                        _to_table(ix, _INTERACTION_SCHEMA), row_group_size=len(ix)
                    )
                n_tx += len(tx)
                n_ix += len(ix)
                del tx, ix
                if bar is not None:
                    bar.update(
                        task,
                        advance=1,
                        description=f"synthetic data: {n_tx:,} transactions, {n_ix:,} interactions",
                    )
        os.replace(tx_tmp, tx_path)
        os.replace(ix_tmp, ix_path)
    finally:
        if bar is not None:
            bar.stop()
        for tmp in (tx_tmp, ix_tmp):
            tmp.unlink(missing_ok=True)
    return SyntheticSummary(config.n_customers, n_tx, n_ix, tx_path, ix_path)


def expected_transactions_per_customer(config: SyntheticConfig | None = None) -> float:
    """Expected transaction rows (purchases and refunds) per customer under ``config``.

    ``1 + E[lambda] * E[min(lifetime, end - acquisition)]``, times ``1 + refund_prob``; the
    inner expectation is exact given the Gamma dropout rate and integrated numerically over the
    acquisition density (refunds falling after ``end`` are ignored, a <0.1% effect).

    Parameters
    ----------
    config : SyntheticConfig, optional
        The synthetic world (default: ``SyntheticConfig()``).

    Returns
    -------
    float
        Expected rows per customer.
    """
    config = config or SyntheticConfig()
    window = float(config.horizon_days - config.acquisition_cutoff_days)
    grid = (np.arange(4096) + 0.5) / 4096
    density = 1.0 + config.acquisition_growth * grid
    density /= density.sum()
    w = config.horizon_days - grid * window  # observation span after acquisition
    s, theta = config.dropout_rate_shape, config.dropout_rate_scale
    # E[min(L, w)] = int_0^w E[exp(-mu t)] dt = int_0^w (1 + theta t)^(-s) dt.
    if math.isclose(s, 1.0):
        alive = np.log1p(theta * w) / theta
    else:
        alive = (np.power(1.0 + theta * w, 1.0 - s) - 1.0) / (theta * (1.0 - s))
    mean_rate = config.purchase_rate_shape * config.purchase_rate_scale
    purchases = 1.0 + mean_rate * float(np.sum(density * alive))
    return purchases * (1.0 + config.refund_prob)


def customers_for_transactions(n_transactions: int, config: SyntheticConfig | None = None) -> int:
    """How many customers to ask for to get about ``n_transactions`` transaction rows.

    Parameters
    ----------
    n_transactions : int
        Wanted number of transaction rows.
    config : SyntheticConfig, optional
        Process parameters (``n_customers`` is ignored; default ``SyntheticConfig()``).

    Returns
    -------
    int
        ``round(n_transactions / expected_transactions_per_customer(config))``, at least 1 when
        ``n_transactions > 0``.
    """
    if n_transactions <= 0:
        return 0
    return max(1, round(n_transactions / expected_transactions_per_customer(config)))
