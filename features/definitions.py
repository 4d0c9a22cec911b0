"""Every feature and label definition, in one place, as SQL.

The queries are written in DuckDB's dialect with only portable constructs (``CASE`` inside
aggregates, ``LAG``/``FIRST_VALUE ... IGNORE NULLS``, ``PERCENT_RANK`` and ``SUM`` windows,
``DATE_DIFF``, integer ``//`` and ``%``), so that sqlglot can transpile the very same
definitions for a distributed engine (see :func:`transpile`). They read three relations that
the engine registers:

``tx``
    ``customer_id``, ``timestamp`` (naive UTC ``TIMESTAMP``), ``amount`` (``DOUBLE``).
``ix``
    ``customer_id``, ``timestamp``, ``channel``, ``event`` (lower case).
``cutoffs``
    ``as_of`` (``DATE``); a date cutoff includes that whole day.

Speed comes from shape, not from one scan per window. One window pass marks each transaction
row with what needs its neighbours (a new purchase day, the gap since the previous one, a
repeat day), and then every feature of a customer is a conditional aggregate in a single hash
aggregate over the rows, transactions and interactions each in one pass. In a hash aggregate
each aggregate costs time per input row, so there are as few as possible: counts of nested
windows share one BIGINT (:func:`_window_groups`), interaction rows are coded to small
integers once, and the R and F scores rank a histogram of their values instead of sorting
every customer. The window marks do not depend on the cutoff, so several cutoffs in one query
share them and the scan. This SQL alone is what a distributed engine runs
(:mod:`rapport.features.spark`). On one machine, :mod:`rapport.features.grid`, the default,
computes the base aggregates (:func:`aggregate_columns`) in numpy over the rows these queries
select, by the same marks (recomputed there, tested equal), for one cutoff or many, reading
each event once; ``features_sql(spec, source="grid")`` then derives the features from them with
the very expressions below.

Definitions (``d`` is a day, ``c`` the cutoff date, a "purchase" a transaction row with
``amount >= 0``; refunds are negative rows: they count in spend but never as purchases):

BTYD summary (as lifetimes' ``summary_data_from_transaction_data`` with ``freq="D"``)
    ``frequency`` repeat purchase days (distinct purchase days - 1); ``recency`` days from the
    first to the last purchase day; ``T`` days from the first purchase day to ``c``;
    ``monetary_value`` mean net spend of the repeat purchase days (0 with no repeat).
RFM and history
    ``recency_days`` days since the last purchase; ``tenure_days`` days since the first
    purchase (equal to ``T``); ``n_purchases`` purchase rows; ``n_purchase_days``;
    ``total_spend`` net spend; ``avg_order_value`` and ``spend_std`` (sample std, NaN under two
    purchases) over purchase rows; ``ipt_mean_days`` and ``ipt_std_days`` mean and sample std of
    the gaps between consecutive purchase days (NaN under two and three purchase days).
Windows, for each ``W`` in ``windows``
    ``purchases_{W}d`` and ``spend_{W}d`` over days ``(c - W, c]``; ``purchases_trend_{W}d`` and
    ``spend_trend_{W}d`` = ``(x_now - x_before) / (|x_now| + |x_before|)`` in ``[-1, 1]`` (0
    when both are 0), where ``x_before`` covers ``(c - 2W, c - W]``.
Interactions (when given), with "responses" every event but the outbound ones (``sent``,
``delivered``, ``bounce``, ``impression``) and complaints
    ``{channel}_{event}s_{W}d`` counts (``sent`` reads ``sends``); ``days_since_{channel}``
    days since any event in that channel (NaN if none); ``responses_{W}d``;
    ``days_since_response``; ``complaints_{W}d``; ``days_since_complaint``;
    ``email_open_rate_{Wmax}d`` and ``email_click_rate_{Wmax}d`` opens and clicks per send in
    the longest window (NaN without sends); ``preferred_channel`` the channel with the most
    responses in the longest window (ties: alphabetical; null without responses).
RFM scores and segments
    ``r_score`` (on ``recency_days``, recent is high), ``f_score`` (on ``n_purchase_days``),
    ``m_score`` (on ``total_spend``): 1-5 by quantile within each cutoff,
    ``1 + min(4, floor(5 * percent_rank))``, ties share a score, so results do not depend on
    row order; ``segment`` from ``r_score`` and ``fm_score = ceil((f_score + m_score) / 2)`` by
    the rules in :mod:`rapport.features.segments`.
Labels for a horizon ``H`` (:func:`labels_sql`)
    ``churned_{H}d`` no purchase in ``(c, c + H]``; ``future_spend_{H}d`` net spend and
    ``future_purchases_{H}d`` purchase rows in that span.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from rapport.features.segments import segment_case_sql

#: Company-initiated events: they say nothing about the customer's own engagement.
OUTBOUND_EVENTS: tuple[str, ...] = ("sent", "delivered", "bounce", "impression")
COMPLAINT_EVENT = "complaint"
DEFAULT_WINDOWS: tuple[int, ...] = (30, 90, 365)

_PLURALS = {"sent": "sends", "delivered": "deliveries"}


def column_fragment(name: str) -> str:
    """A safe lower-case SQL identifier fragment for a channel or event name."""
    cleaned = re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")
    if not cleaned:
        raise ValueError(f"channel/event name {name!r} has no usable characters")
    return cleaned


def event_plural(event: str) -> str:
    """Plural of an event name for column names (``sent`` reads ``sends``)."""
    event = column_fragment(event)
    if event in _PLURALS:
        return _PLURALS[event]
    if len(event) > 1 and event.endswith("y") and event[-2] not in "aeiou_":
        return event[:-1] + "ies"  # reply reads replies; survey stays surveys
    return event + ("es" if event.endswith(("s", "x", "sh", "ch")) else "s")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True)
class FeatureSpec:
    """What to compute: windows and the interaction vocabulary.

    Parameters
    ----------
    windows
        Window lengths in days, e.g. ``(30, 90, 365)``.
    interaction_pairs
        ``(channel, event)`` pairs to count, lower case. A trained model pins these so that
        serving computes exactly the training columns; build functions discover them from the
        data when not given.
    pack_counts
        Pack the counts of up to three windows into one BIGINT (fewer aggregates, same
        values). A count over ``2**21`` makes DuckDB refuse the query (never a wrong value);
        ``build_features`` then reruns with ``False``.
    """

    windows: tuple[int, ...] = DEFAULT_WINDOWS
    interaction_pairs: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    pack_counts: bool = True

    def __post_init__(self) -> None:
        if not self.windows:
            raise ValueError("windows must name at least one window length in days")
        if any(int(w) != w or w <= 0 for w in self.windows):
            raise ValueError(f"windows must be positive whole days, got {self.windows}")
        object.__setattr__(self, "windows", tuple(sorted({int(w) for w in self.windows})))
        pairs = tuple(sorted({(c.lower(), e.lower()) for c, e in self.interaction_pairs}))
        object.__setattr__(self, "interaction_pairs", pairs)

    @property
    def longest(self) -> int:
        """The longest window in days."""
        return self.windows[-1]

    @property
    def channels(self) -> tuple[str, ...]:
        """Channels named by the interaction pairs, sorted."""
        return tuple(sorted({c for c, _ in self.interaction_pairs}))

    @property
    def lookback_days(self) -> int:
        """How far before a cutoff windowed transaction features look (trends: two windows)."""
        return 2 * self.longest


def transaction_feature_columns(spec: FeatureSpec) -> list[str]:
    """Names of the transaction feature columns, in output order."""
    cols = [
        "frequency",
        "recency",
        "T",
        "monetary_value",
        "recency_days",
        "tenure_days",
        "n_purchases",
        "n_purchase_days",
        "total_spend",
        "avg_order_value",
        "spend_std",
        "ipt_mean_days",
        "ipt_std_days",
    ]
    for w in spec.windows:
        cols += [f"purchases_{w}d", f"spend_{w}d", f"purchases_trend_{w}d", f"spend_trend_{w}d"]
    return cols


def interaction_feature_columns(spec: FeatureSpec) -> list[str]:
    """Names of the interaction feature columns, in output order (empty without pairs)."""
    if not spec.interaction_pairs:
        return []
    cols = [
        f"{column_fragment(c)}_{event_plural(e)}_{w}d"
        for c, e in spec.interaction_pairs
        for w in spec.windows
    ]
    cols += [f"days_since_{column_fragment(c)}" for c in spec.channels]
    cols += [f"responses_{w}d" for w in spec.windows] + ["days_since_response"]
    cols += [f"complaints_{w}d" for w in spec.windows] + ["days_since_complaint"]
    pairs = set(spec.interaction_pairs)
    if ("email", "sent") in pairs:
        for event in ("open", "click"):
            if ("email", event) in pairs:
                cols.append(f"email_{event}_rate_{spec.longest}d")
    cols.append("preferred_channel")
    return cols


SCORE_COLUMNS = ["r_score", "f_score", "m_score", "fm_score", "segment"]

#: Name fragments of features that may be negative: money (refunds) and trends (-1 to 1).
SIGNED_FRAGMENTS = ("spend", "trend", "monetary_value", "avg_order_value")


def is_nonnegative_feature(column: str) -> bool:
    """Whether a numeric feature can never be negative (counts, days, rates, scores)."""
    return not any(fragment in column for fragment in SIGNED_FRAGMENTS)


def feature_columns(spec: FeatureSpec) -> list[str]:
    """Every column :func:`features_sql` returns, keys first."""
    return [
        "customer_id",
        "as_of",
        *transaction_feature_columns(spec),
        *interaction_feature_columns(spec),
        *SCORE_COLUMNS,
    ]


#: Bits per counter when several window counts share one BIGINT (three per BIGINT).
PACK_BITS = 21
_PACK_WIDTH = 63 // PACK_BITS


def _chunks(items: Sequence[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(items[i : i + size]) for i in range(0, len(items), size)]


def _window_groups(spec: FeatureSpec) -> list[tuple[int, ...]]:
    """Windows grouped so that one BIGINT sum carries the counts of a whole group.

    Counts of *nested* ranges (``(c - W, c]`` for growing ``W``) share one integer,
    ``PACK_BITS`` bits per count, the longest range always in the top bits (see
    :func:`_shift`). Every count is at most the top one, so the packing is exact whenever the
    top count fits; one that does not fit overflows the BIGINT, which DuckDB refuses loudly
    (the engine then reruns with ``FeatureSpec(pack_counts=False)``: one count per integer).
    Packing turns one aggregate per window into one per group of three windows.
    """
    return _chunks(spec.windows, _PACK_WIDTH if spec.pack_counts else 1)


def _shift(j: int, n: int) -> int:
    """Bit offset of field ``j`` of ``n``: the last field (the largest count) goes on top."""
    return PACK_BITS * (_PACK_WIDTH - 1) if j == n - 1 and n > 1 else PACK_BITS * j


def _packed(terms: Sequence[str]) -> str:
    """``terms`` (0/1 or count expressions) packed into one integer, ``PACK_BITS`` apart."""
    n = len(terms)
    return " + ".join(
        t if _shift(j, n) == 0 else f"{t} * {1 << _shift(j, n)}" for j, t in enumerate(terms)
    )


def _field(packed: str, j: int, n: int) -> str:
    """Field ``j`` of ``n`` packed with :func:`_packed` (portable: integer division, modulo)."""
    if n == 1:
        return packed
    shift = _shift(j, n)
    shifted = packed if shift == 0 else f"({packed} // {1 << shift})"
    return shifted if j == n - 1 else f"({shifted} % {1 << PACK_BITS})"


def _rows_sql() -> str:
    """Transaction rows up to the last cutoff, each placed in its customer's purchase history.

    One window pass, ordered by day with a day's purchases before its refunds, gives each row
    ``prev_day``, the customer's latest purchase day among the rows before it. From it:
    ``new_day`` marks the first purchase row of each purchase day, ``gap`` is the distance in
    days from the previous purchase day, and ``repeat_day`` marks rows on a purchase day after
    the first (a refund row counts when a purchase shares its day, which then sorts before it).
    None of these depends on the cutoff: a row only looks at earlier rows, and the first
    purchase day of a customer who has bought by a cutoff is the same for every later cutoff.
    So they are computed once, on the raw rows, however many cutoffs there are: no roll-up to
    one row per customer and day, which cost as much as everything else together.
    """
    return (
        _tx_rows_sql()
        + """,
    tx_seq AS (
        SELECT
            customer_id,
            day,
            amount,
            is_purchase,
            LAG(CASE WHEN is_purchase THEN day END IGNORE NULLS) OVER w AS prev_day,
            FIRST_VALUE(CASE WHEN is_purchase THEN day END IGNORE NULLS) OVER w AS first_day
        FROM tx_rows
        WINDOW w AS (PARTITION BY customer_id ORDER BY day, amount < 0)
    ),
    tx_marked AS (
        SELECT
            customer_id,
            day,
            amount,
            is_purchase,
            is_purchase AND (prev_day IS NULL OR prev_day < day) AS new_day,
            CASE WHEN is_purchase AND prev_day < day
                 THEN DATE_DIFF('day', prev_day, day) END AS gap,
            day > first_day AND (is_purchase OR prev_day = day) AS repeat_day
        FROM tx_seq
    )"""
    )


def _tx_rows_sql() -> str:
    return """
    tx_rows AS (
        SELECT
            customer_id,
            CAST(timestamp AS DATE) AS day,
            amount,
            amount >= 0 AS is_purchase
        FROM tx
        WHERE CAST(timestamp AS DATE) <= (SELECT MAX(as_of) FROM cutoffs)
    )"""


def transaction_rows_sql() -> str:
    """Transaction rows up to the last cutoff, unmarked: what the window pass reads.

    Columns ``customer_id``, ``day``, ``amount``, ``is_purchase``; reads ``tx`` and ``cutoffs``.
    :mod:`rapport.features.grid` marks them in numpy by the rule of :func:`_rows_sql`.
    """
    return f"WITH{_tx_rows_sql()} SELECT customer_id, day, amount, is_purchase FROM tx_rows"


def coded_interactions_sql(spec: FeatureSpec) -> str:
    """Interaction rows up to the last cutoff, coded as the aggregates read them.

    Columns ``customer_id``, ``day``, ``pair_id``, ``channel_id``, ``is_response``,
    ``is_complaint``; reads ``ix`` and ``cutoffs``.
    """
    return (
        f"WITH{_ix_rows_sql(spec)} "
        "SELECT customer_id, day, pair_id, channel_id, is_response, is_complaint FROM ix_rows"
    )


def _trend(now: str, before: str) -> str:
    return (
        f"CASE WHEN ABS({now}) + ABS({before}) > 0 "
        f"THEN ({now} - {before}) / (ABS({now}) + ABS({before})) ELSE 0.0 END"
    )


def _transaction_sql(spec: FeatureSpec) -> str:
    # Purchase counts of the nested ranges (c - W, c] and (c - 2W, c] are packed (see
    # _window_groups); "before" counts are the difference. Spend sums stay one per range.
    aggs = []
    for g, group in enumerate(_window_groups(spec)):
        for kind, span in (("now", 1), ("two", 2)):
            terms = [
                f"CASE WHEN d.is_purchase AND d.day > c.as_of - {span * w} THEN 1 ELSE 0 END"
                for w in group
            ]
            aggs.append(f"CAST(SUM({_packed(terms)}) AS BIGINT) AS _purchases_{kind}_{g}")
    for w in spec.windows:
        now = f"d.day > c.as_of - {w}"
        before = f"d.day > c.as_of - {2 * w} AND d.day <= c.as_of - {w}"
        aggs += [
            f"ROUND(SUM(CASE WHEN {now} THEN d.amount ELSE 0.0 END), 6) AS spend_{w}d",
            f"ROUND(SUM(CASE WHEN {before} THEN d.amount ELSE 0.0 END), 6) AS _spend_before_{w}d",
        ]
    windows = ",\n            ".join(aggs)
    # purchase days never outnumber purchase rows, so the two share one integer when packing
    counts = _packed(
        [
            "CASE WHEN d.new_day THEN 1 ELSE 0 END",
            "CASE WHEN d.is_purchase THEN 1 ELSE 0 END",
        ]
        if spec.pack_counts
        else ["CASE WHEN d.new_day THEN 1 ELSE 0 END"]
    )
    purchase_rows = (
        ""
        if spec.pack_counts
        else "CAST(SUM(CASE WHEN d.is_purchase THEN 1 ELSE 0 END) AS BIGINT) AS _purchase_rows,"
    )
    return f"""
    tx_agg AS (
        SELECT
            d.customer_id,
            c.as_of,
            MIN(CASE WHEN d.is_purchase THEN d.day END) AS first_day,
            MAX(CASE WHEN d.is_purchase THEN d.day END) AS last_day,
            CAST(SUM({counts}) AS BIGINT) AS _counts,
            {purchase_rows}
            -- Sums are rounded to 1e-6: DuckDB adds floats in parallel, in no fixed order, and
            -- the last bits must not flip a trend's sign or a tie in the spend score.
            ROUND(SUM(d.amount), 6) AS total_spend,
            ROUND(SUM(CASE WHEN d.repeat_day THEN d.amount ELSE 0.0 END), 6) AS repeat_spend,
            ROUND(SUM(CASE WHEN d.is_purchase THEN d.amount ELSE 0.0 END), 6) AS order_spend,
            SUM(CASE WHEN d.is_purchase THEN d.amount * d.amount ELSE 0.0 END)
                AS order_spend_sq,
            SUM(d.gap * d.gap) AS gap_sq,
            {windows}
        FROM tx_marked AS d
        JOIN cutoffs AS c ON d.day <= c.as_of
        GROUP BY d.customer_id, c.as_of
        HAVING MAX(CASE WHEN d.is_purchase THEN d.day END) IS NOT NULL
    )"""


def _transaction_features_sql(spec: FeatureSpec, *, passthrough: Sequence[str] = ()) -> str:
    """``tx_counted`` and ``tx_feat`` from the base aggregates in ``tx_agg``.

    ``passthrough`` names more ``tx_agg`` columns to carry into ``tx_feat`` unchanged.
    """
    extra = "".join(f",\n            {name}" for name in passthrough)
    return f"""
    tx_counted AS (
        SELECT
            *,
            {_field("_counts", 0, 2) if spec.pack_counts else "_counts"} AS n_purchase_days,
            {_field("_counts", 1, 2) if spec.pack_counts else "_purchase_rows"} AS n_purchases
        FROM tx_agg
    ),
    tx_feat AS (
        SELECT
            customer_id,
            as_of,
            CAST(n_purchase_days - 1 AS DOUBLE) AS frequency,
            CAST(DATE_DIFF('day', first_day, last_day) AS DOUBLE) AS recency,
            CAST(DATE_DIFF('day', first_day, as_of) AS DOUBLE) AS T,
            CASE WHEN n_purchase_days > 1 THEN repeat_spend / (n_purchase_days - 1)
                 ELSE 0.0 END AS monetary_value,
            DATE_DIFF('day', last_day, as_of) AS recency_days,
            DATE_DIFF('day', first_day, as_of) AS tenure_days,
            n_purchases,
            CAST(n_purchase_days AS BIGINT) AS n_purchase_days,
            total_spend,
            order_spend / n_purchases AS avg_order_value,
            CASE WHEN n_purchases > 1 THEN SQRT(GREATEST(0.0,
                (order_spend_sq - order_spend * order_spend / n_purchases) / (n_purchases - 1)))
            END AS spend_std,
            -- consecutive gaps add up to last - first: only their squares need the window
            CASE WHEN n_purchase_days > 1
                 THEN CAST(DATE_DIFF('day', first_day, last_day) AS DOUBLE)
                      / (n_purchase_days - 1) END AS ipt_mean_days,
            CASE WHEN n_purchase_days > 2 THEN SQRT(GREATEST(0.0,
                (gap_sq - CAST(DATE_DIFF('day', first_day, last_day) AS DOUBLE)
                          * DATE_DIFF('day', first_day, last_day) / (n_purchase_days - 1))
                / (n_purchase_days - 2)))
            END AS ipt_std_days,
            {_window_outputs(spec)}{extra}
        FROM tx_counted
    )"""


def _window_outputs(spec: FeatureSpec) -> str:
    outs = []
    for g, group in enumerate(_window_groups(spec)):
        for j, w in enumerate(group):
            now = _field(f"_purchases_now_{g}", j, len(group))
            two = _field(f"_purchases_two_{g}", j, len(group))
            outs += [
                f"{now} AS purchases_{w}d",
                f"spend_{w}d",
                f"{_trend(f'CAST({now} AS DOUBLE)', f'CAST({two} - {now} AS DOUBLE)')}"
                f" AS purchases_trend_{w}d",
                f"{_trend(f'spend_{w}d', f'_spend_before_{w}d')} AS spend_trend_{w}d",
            ]
    return ",\n            ".join(outs)


def _ix_rows_sql(spec: FeatureSpec) -> str:
    """Interaction rows up to the last cutoff, each coded once.

    Small integers for its (channel, event) pair and its channel, flags for responses and
    complaints.
    """
    non_response = ", ".join(_quote(e) for e in (*OUTBOUND_EVENTS, COMPLAINT_EVENT))
    pair_id = {pair: k for k, pair in enumerate(spec.interaction_pairs)}
    # channel first, then event within it: a row is compared with a handful of strings, not
    # with every pair
    by_channel = " ".join(
        f"WHEN channel = {_quote(ch)} THEN CASE "
        + " ".join(f"WHEN event = {_quote(e)} THEN {k}" for (c, e), k in pair_id.items() if c == ch)
        + " END"
        for ch in spec.channels
    )
    channel_case = " ".join(
        f"WHEN channel = {_quote(ch)} THEN {k}" for k, ch in enumerate(spec.channels)
    )
    return f"""
    ix_rows AS (
        SELECT
            customer_id,
            CAST(timestamp AS DATE) AS day,
            CASE {by_channel} END AS pair_id,
            CASE {channel_case} END AS channel_id,
            event NOT IN ({non_response}) AS is_response,
            event = {_quote(COMPLAINT_EVENT)} AS is_complaint
        FROM ix
        WHERE CAST(timestamp AS DATE) <= (SELECT MAX(as_of) FROM cutoffs)
    )"""


def _interaction_sql(spec: FeatureSpec) -> str:
    # One aggregate per customer and cutoff straight over the coded event rows: their window
    # flags packed into one integer per group of windows, then every output is a conditional
    # sum or max of those codes: one pass, no intermediate table per (channel, event) to
    # build and pivot.
    # the rows carry pair and channel as their positions in the spec (see _ix_rows_sql)
    n_pairs, n_channels = len(spec.interaction_pairs), len(spec.channels)
    groups = _window_groups(spec)
    flags = ",\n            ".join(
        "{} AS w_{}".format(
            _packed([f"CASE WHEN i.day > c.as_of - {w} THEN 1 ELSE 0 END" for w in group]), g
        )
        for g, group in enumerate(groups)
    )
    # the longest window's flag alone, for the per-channel response counts
    longest = f"CASE WHEN i.day > c.as_of - {spec.longest} THEN 1 ELSE 0 END"
    aggs = []
    for k in range(n_pairs):
        for g in range(len(groups)):
            aggs.append(
                f"CAST(SUM(CASE WHEN p.pair_id = {k} THEN p.w_{g} END) AS BIGINT) AS _pair_{k}_{g}"
            )
    for k in range(n_channels):
        aggs.append(f"MAX(CASE WHEN p.channel_id = {k} THEN p.day END) AS _last_channel_{k}")
    for kind in ("response", "complaint"):
        flag = f"p.is_{kind}"
        for g in range(len(groups)):
            aggs.append(
                f"CAST(SUM(CASE WHEN {flag} THEN p.w_{g} ELSE 0 END) AS BIGINT) AS _{kind}s_{g}"
            )
        aggs.append(f"MAX(CASE WHEN {flag} THEN p.day END) AS _last_{kind}")
    # responses per channel in the longest window, packed side by side: each is at most the
    # customer's responses in that window, which the packed counts above already bound
    for g, chans in enumerate(
        _chunks(list(range(n_channels)), _PACK_WIDTH if spec.pack_counts else 1)
    ):
        terms = [
            f"CASE WHEN p.channel_id = {k} AND p.is_response THEN p.w_last ELSE 0 END"
            for k in chans
        ]
        aggs.append(f"CAST(SUM({_packed(terms)}) AS BIGINT) AS _channel_responses_{g}")
    body = ",\n            ".join(aggs)
    return f"""
    ix_feat AS (
        SELECT
            p.customer_id,
            p.as_of,
            {body}
        FROM (
            SELECT
                i.customer_id,
                c.as_of,
                i.day,
                i.pair_id,
                i.channel_id,
                i.is_response,
                i.is_complaint,
                {flags},
                {longest} AS w_last
            FROM ix_rows AS i
            JOIN cutoffs AS c ON i.day <= c.as_of
        ) AS p
        GROUP BY p.customer_id, p.as_of
    )"""


def _interaction_outputs(spec: FeatureSpec, src: str = "x") -> list[str]:
    """Select-list entries turning ``ix_feat`` columns into the final interaction features.

    ``src`` is the alias of the relation holding those columns.
    """
    pairs = set(spec.interaction_pairs)
    groups = _window_groups(spec)
    where = {w: (g, j, len(group)) for g, group in enumerate(groups) for j, w in enumerate(group)}

    def count(packed_prefix: str, w: int) -> str:
        g, j, n = where[w]
        return _field(f"COALESCE({src}.{packed_prefix}_{g}, 0)", j, n)

    outs = []
    for k, (c, e) in enumerate(spec.interaction_pairs):
        for w in spec.windows:
            outs.append(f"{count(f'_pair_{k}', w)} AS {column_fragment(c)}_{event_plural(e)}_{w}d")
    for k, ch in enumerate(spec.channels):
        # DOUBLE so that "never" is NaN, as in every other missing feature
        outs.append(
            f"CAST(DATE_DIFF('day', {src}._last_channel_{k}, t.as_of) AS DOUBLE)"
            f" AS days_since_{column_fragment(ch)}"
        )
    for kind in ("response", "complaint"):
        outs += [f"{count(f'_{kind}s', w)} AS {kind}s_{w}d" for w in spec.windows]
        outs.append(
            f"CAST(DATE_DIFF('day', {src}._last_{kind}, t.as_of) AS DOUBLE) AS days_since_{kind}"
        )
    if ("email", "sent") in pairs:
        k_sent = spec.interaction_pairs.index(("email", "sent"))
        sends = count(f"_pair_{k_sent}", spec.longest)
        for event in ("open", "click"):
            if ("email", event) in pairs:
                k = spec.interaction_pairs.index(("email", event))
                opened = count(f"_pair_{k}", spec.longest)
                outs.append(
                    f"CASE WHEN {sends} > 0 THEN CAST({opened} AS DOUBLE) / {sends} END"
                    f" AS email_{event}_rate_{spec.longest}d"
                )
    width = _PACK_WIDTH if spec.pack_counts else 1
    responses = []
    for k in range(len(spec.channels)):
        g, j = divmod(k, width)
        n = min(width, len(spec.channels) - g * width)
        responses.append(_field(f"COALESCE({src}._channel_responses_{g}, 0)", j, n))
    best = f"GREATEST({', '.join(responses)})" if len(responses) > 1 else responses[0]
    whens = " ".join(
        f"WHEN {r} = {best} THEN {_quote(ch)}"
        for r, ch in zip(responses, spec.channels, strict=True)
    )
    outs.append(f"CASE WHEN {best} > 0 THEN CASE {whens} END END AS preferred_channel")
    return outs


def _bucket(percent_rank: str, *, descending: bool) -> str:
    bucket = f"LEAST(4, CAST(FLOOR(5 * {percent_rank}) AS INTEGER))"
    return f"5 - {bucket}" if descending else f"1 + {bucket}"


def _score_lookup(name: str, column: str, *, descending: bool) -> str:
    """``(as_of, value, score)`` for a column with few distinct values (days, day counts).

    ``PERCENT_RANK`` is ``(rank - 1) / (n - 1)`` with ``rank - 1`` the number of smaller
    values: computed on the histogram of the values rather than by sorting every customer.
    """
    rank = "CASE WHEN n > 1 THEN CAST(below AS DOUBLE) / (n - 1) ELSE 0.0 END"
    return f"""
    {name}_hist AS (
        SELECT as_of, {column} AS value, COUNT(*) AS cnt
        FROM tx_feat
        GROUP BY as_of, {column}
    ),
    {name} AS (
        SELECT as_of, value, {_bucket(rank, descending=descending)} AS score
        FROM (
            SELECT
                as_of,
                value,
                SUM(cnt) OVER (PARTITION BY as_of ORDER BY value) - cnt AS below,
                SUM(cnt) OVER (PARTITION BY as_of) AS n
            FROM {name}_hist
        ) AS h
    )"""


def aggregate_columns(spec: FeatureSpec) -> tuple[list[str], list[str]]:
    """The base aggregates every feature derives from: ``tx_agg``'s and ``ix_feat``'s columns.

    Keys aside, for a spec that does not pack counts (one window per integer).

    :mod:`rapport.features.grid` computes exactly these, for one cutoff or many at once;
    ``features_sql(spec, source="grid")`` derives the features from them.
    """
    if spec.pack_counts:
        raise ValueError("aggregate_columns describes unpacked counts (pack_counts=False)")
    tx = ["first_day", "last_day", "_counts", "_purchase_rows", "total_spend", "repeat_spend"]
    tx += ["order_spend", "order_spend_sq", "gap_sq"]
    tx += [f"_purchases_{kind}_{g}" for g in range(len(spec.windows)) for kind in ("now", "two")]
    tx += [f"{name}_{w}d" for w in spec.windows for name in ("spend", "_spend_before")]
    if not spec.interaction_pairs:
        return tx, []
    n_windows = len(spec.windows)
    ix = [f"_pair_{k}_{g}" for k in range(len(spec.interaction_pairs)) for g in range(n_windows)]
    ix += [f"_last_channel_{k}" for k in range(len(spec.channels))]
    for kind in ("response", "complaint"):
        ix += [f"_{kind}s_{g}" for g in range(n_windows)] + [f"_last_{kind}"]
    ix += [f"_channel_responses_{k}" for k in range(len(spec.channels))]
    return tx, ix


def features_sql(spec: FeatureSpec, *, ordered: bool = True, source: str = "events") -> str:
    """The whole feature query: one row per (customer with a purchase by ``as_of``, ``as_of``).

    Columns are :func:`feature_columns` (``spec``), ordered by ``as_of`` then ``customer_id``
    (unordered with ``ordered=False``, for a caller that sorts the result itself).

    With ``source="events"`` (the default) the query reads the event relations ``tx``,
    ``ix`` and ``cutoffs``. With ``source="grid"`` it reads one relation ``grid`` holding
    ``customer_id``, ``as_of`` and the base aggregates of :func:`aggregate_columns` (an
    unpacked ``spec``), computed elsewhere, and derives every feature from them the same way,
    as one projection: every column but :data:`SCORE_COLUMNS`, in the grid's row order. The
    scores rank customers within a cutoff; the caller computes them with
    :func:`rapport.features.segments.rfm_scores`, the same rule in numpy.
    """
    if source not in ("events", "grid"):
        raise ValueError(f"source must be 'events' or 'grid', got {source!r}")
    tx_cols = [f"t.{c}" for c in transaction_feature_columns(spec)]
    select = ["t.customer_id", "t.as_of", *tx_cols]
    join = ""
    if source == "grid":
        # one relation holds both tables' aggregates, so no join: tx_feat carries them along
        ix_base = aggregate_columns(spec)[1]
        ctes = ["\n    tx_agg AS (SELECT * FROM grid)"]
        ctes.append(_transaction_features_sql(spec, passthrough=ix_base))
        if spec.interaction_pairs:
            select += _interaction_outputs(spec, src="t")
    else:
        ctes = [_rows_sql(), _transaction_sql(spec), _transaction_features_sql(spec)]
        if spec.interaction_pairs:
            ctes += [_ix_rows_sql(spec), _interaction_sql(spec)]
            select += _interaction_outputs(spec)
            join = "LEFT JOIN ix_feat AS x ON x.customer_id = t.customer_id AND x.as_of = t.as_of"
    if source == "grid":
        # a pure projection: the rows keep the grid's order, and the caller ranks the scores
        return (
            "WITH"
            + ",".join(ctes)
            + "\n    SELECT\n        "
            + ",\n        ".join(select)
            + ("\n    FROM tx_feat AS t\n")
        )
    select += ["s.r_score", "s.f_score", "s.m_score"]
    body = ",\n        ".join(select)
    ctes.append(_score_lookup("r_scores", "recency_days", descending=True))
    ctes.append(_score_lookup("f_scores", "n_purchase_days", descending=False))
    m_score = _bucket(
        "PERCENT_RANK() OVER (PARTITION BY t.as_of ORDER BY t.total_spend)", descending=False
    )
    # Each lookup joins a two-relation tree (a window or a subquery in between), so that no
    # optimiser can pair the lookups with each other on as_of alone.
    ctes.append(f"""
    scores AS (
        -- Ranked on a narrow projection: windows over the wide feature rows cost 10x more.
        SELECT w.customer_id, w.as_of, w.r_score, f.score AS f_score, w.m_score
        FROM (
            SELECT
                t.customer_id,
                t.as_of,
                t.n_purchase_days,
                r.score AS r_score,
                {m_score} AS m_score
            FROM tx_feat AS t
            JOIN r_scores AS r ON r.as_of = t.as_of AND r.value = t.recency_days
        ) AS w
        JOIN f_scores AS f ON f.as_of = w.as_of AND f.value = w.n_purchase_days
    ),
    scored AS (
        SELECT
        {body}
        FROM tx_feat AS t
        JOIN scores AS s ON s.customer_id = t.customer_id AND s.as_of = t.as_of
        {join}
    )""")
    fm = "CAST(CEIL((f_score + m_score) / 2.0) AS INTEGER)"
    order = "ORDER BY as_of, customer_id" if ordered else ""
    return (
        "WITH"
        + ",".join(ctes)
        + f"""
    SELECT
        *,
        {fm} AS fm_score,
        {segment_case_sql("r_score", fm)} AS segment
    FROM scored
    {order}
    """
    )


def labels_sql(horizon_days: int) -> str:
    """Labels for a horizon after each cutoff, for customers with a purchase by the cutoff.

    Columns: ``customer_id``, ``as_of``, ``churned_{H}d`` (bool), ``future_spend_{H}d``
    (float64), ``future_purchases_{H}d`` (int64); ordered by ``as_of`` then ``customer_id``.
    """
    h = int(horizon_days)
    if h <= 0:
        raise ValueError(f"horizon_days must be a positive number of days, got {horizon_days}")
    return f"""
    WITH lab AS (
        SELECT
            t.customer_id,
            c.as_of,
            CAST(SUM(CASE WHEN CAST(t.timestamp AS DATE) > c.as_of AND t.amount >= 0
                          THEN 1 ELSE 0 END) AS BIGINT) AS future_purchases,
            ROUND(SUM(CASE WHEN CAST(t.timestamp AS DATE) > c.as_of
                           THEN t.amount ELSE 0.0 END), 6) AS future_spend
        FROM tx AS t
        JOIN cutoffs AS c ON CAST(t.timestamp AS DATE) <= c.as_of + {h}
        GROUP BY t.customer_id, c.as_of
        HAVING MAX(CASE WHEN CAST(t.timestamp AS DATE) <= c.as_of AND t.amount >= 0
                        THEN 1 ELSE 0 END) > 0
    )
    SELECT
        customer_id,
        as_of,
        future_purchases = 0 AS churned_{h}d,
        future_spend AS future_spend_{h}d,
        future_purchases AS future_purchases_{h}d
    FROM lab
    ORDER BY as_of, customer_id
    """


def transpile(sql: str, dialect: str = "spark") -> str:
    """Translate one of these queries from DuckDB's dialect to another engine's (sqlglot)."""
    import sqlglot

    return sqlglot.transpile(sql, read="duckdb", write=dialect, pretty=True)[0]


#: The (channel, event) pairs an interactions table ``ix`` holds, as :func:`discover_pairs`
#: takes them.
DISTINCT_PAIRS_SQL = "SELECT DISTINCT lower(channel), lower(event) FROM ix"


def discover_pairs(pairs: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Normalise observed (channel, event) pairs: lower case, unique, sorted."""
    return tuple(sorted({(str(c).lower(), str(e).lower()) for c, e in pairs}))
