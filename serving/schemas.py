"""Request and response models of the scoring service (pydantic, shown in its OpenAPI page).

Feature rows are open-ended: which columns a model reads depends on what it was trained on
(the interaction pairs of the data, the windows of its config). A row therefore declares its
keys and takes the features as extra fields, typed number, text or null; :func:`check_rows`
then checks them against the served models and names every bad field.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from rapport.serving.scoring import ModelVersion, Scorer, Scores
from rapport.training.columns import BTYD_INPUTS


def is_utf8(text: str) -> bool:
    """False for text with a lone surrogate (an unpaired UTF-16 half): no answer can carry it."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text_value(value: Any) -> Any:
    """Refuse NaN and infinities where text belongs (read as "nan", "inf"), and lone surrogates."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be text or a finite number")
    if isinstance(value, str) and not is_utf8(value):
        raise ValueError("must be valid Unicode (no lone surrogates)")
    return value


#: Customer ids: text, at least one character (numbers are accepted and read as text); at
#: most RAPPORT_MAX_ID_LENGTH (default 200), checked by the service.
CustomerId = Annotated[str, BeforeValidator(_text_value), Field(min_length=1)]
#: Order ids: text or a number read as text; at most RAPPORT_MAX_ID_LENGTH characters.
OrderId = Annotated[str, BeforeValidator(_text_value)]
#: Other text: valid Unicode.
Text = Annotated[str, BeforeValidator(_text_value)]

_ROW_EXAMPLE: dict[str, Any] = {
    "customer_id": "C-1042",
    "as_of": "2025-12-31",
    "frequency": 3,
    "recency": 210,
    "T": 400,
    "monetary_value": 54.2,
    "recency_days": 190,
    "n_purchases": 4,
    "total_spend": 230.5,
    "segment": "At risk",
    "preferred_channel": "email",
}


class FeatureRow(BaseModel):
    """One customer's features as ``rapport features build`` writes them.

    Send every feature the served models read (``GET /v1/info`` lists them). Other feature
    columns of the same feature set are accepted and ignored; unknown names are refused.
    """

    model_config = ConfigDict(
        extra="allow",
        allow_inf_nan=False,
        coerce_numbers_to_str=True,
        json_schema_extra={"examples": [_ROW_EXAMPLE]},
    )

    customer_id: CustomerId = Field(description="Customer id.")
    as_of: dt.date | None = Field(
        None, description="Date the features describe (for the next-purchase date)."
    )
    # Typed extras: every feature is a finite number, a text (categories) or null.
    __pydantic_extra__: dict[str, float | str | None] = Field(init=False)

    @model_validator(mode="after")
    def _unicode_features(self) -> FeatureRow:
        for key, value in (self.__pydantic_extra__ or {}).items():
            if not is_utf8(key) or (isinstance(value, str) and not is_utf8(value)):
                raise ValueError("feature names and values must be valid Unicode")
        return self


class ScoreRequest(BaseModel):
    """Customers to score from their feature rows."""

    model_config = ConfigDict(extra="forbid")

    customers: list[FeatureRow] = Field(min_length=1, description="Feature rows, one per customer.")
    explain: int = Field(
        0, ge=0, le=20, description="Top reasons per model and customer (0: none; costs time)."
    )


class ByIdRequest(BaseModel):
    """Known customers to score from the feature snapshot."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    customer_ids: list[CustomerId] = Field(min_length=1, description="Customer ids.")
    explain: int = Field(0, ge=0, le=20, description="Top reasons per model and customer.")


class Purchase(BaseModel):
    """One purchase (a refund has a negative amount)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)

    timestamp: dt.datetime = Field(description="When (ISO date or date-time; UTC if naive).")
    amount: float = Field(description="Net amount in the currency of the data.")
    order_id: OrderId | None = Field(None, description="Order id (repeated ids are one order).")


class Interaction(BaseModel):
    """One interaction: an e-mail sent/opened/clicked, a web visit, a call, a store visit."""

    model_config = ConfigDict(extra="forbid")

    timestamp: dt.datetime = Field(description="When (ISO date or date-time; UTC if naive).")
    channel: Text = Field(min_length=1, max_length=50, description="e.g. email, web, phone.")
    event: Text = Field(min_length=1, max_length=50, description="e.g. sent, open, visit.")


class CustomerHistory(BaseModel):
    """A customer's raw purchase (and interaction) history."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    customer_id: CustomerId = Field(description="Customer id.")
    transactions: list[Purchase] = Field(min_length=1, description="Purchases, any order.")
    interactions: list[Interaction] = Field(default_factory=list, description="Interactions.")


class HistoryRequest(BaseModel):
    """Customers to score from posted histories (features computed as in training)."""

    model_config = ConfigDict(extra="forbid")

    customers: list[CustomerHistory] = Field(min_length=1, description="One history each.")
    as_of: dt.date | None = Field(
        None, description="Cutoff date (default: today, UTC). Events after it are refused."
    )
    explain: int = Field(0, ge=0, le=20, description="Top reasons per model and customer.")


class Reason(BaseModel):
    """One feature's contribution to a prediction (SHAP value, raw model units)."""

    feature: str
    value: float | str | None = Field(description="The feature's value for this customer.")
    contribution: float = Field(description="Positive raises the prediction.")


class Reasons(BaseModel):
    """The largest contributions, largest first."""

    churn: list[Reason] = Field(description="Of the churn model (log-odds).")
    value: list[Reason] = Field(description="Of the value model (its raw score).")


class CustomerScore(BaseModel):
    """What Rapport predicts for one customer."""

    customer_id: str
    as_of: dt.date | None = Field(description="Date of the features scored.")
    churn_probability: float = Field(description="P(no purchase in the churn horizon).")
    risk_tier: Literal["low", "medium", "high"]
    churn_horizon_days: int
    predicted_value: float = Field(description="Expected net spend over the value horizon.")
    value_horizon_days: int
    currency: str | None
    expected_purchases: float | None = Field(description="BG/NBD, over the value horizon.")
    p_alive: float | None = Field(description="BG/NBD probability the customer is active.")
    expected_days_to_next_purchase: float | None = Field(
        description="If active; null when not expected."
    )
    expected_next_purchase_date: dt.date | None
    segment: str | None = Field(description="RFM segment.")
    reasons: Reasons | None = Field(None, description="Only when the request asked (explain).")


class ServedModelInfo(BaseModel):
    """One served model version."""

    name: str
    version: str
    alias: str | None
    run_id: str | None


class ModelVersions(BaseModel):
    """The model versions that produced a response."""

    churn: ServedModelInfo
    clv: ServedModelInfo


class ScoreResponse(BaseModel):
    """Scores, one per customer in request order."""

    models: ModelVersions
    scores: list[CustomerScore]


class MissingCustomer(BaseModel):
    """A requested id that could not be scored."""

    customer_id: str
    reason: str


class ByIdResponse(BaseModel):
    """Scores for the known ids (request order) and the unknown ones."""

    models: ModelVersions
    snapshot_as_of: dt.date | None
    scores: list[CustomerScore]
    missing: list[MissingCustomer]


class ModelDescription(ServedModelInfo):
    """A served model and what it reads."""

    task: str
    horizon_days: int
    source: str = Field(description="Where it was loaded from: a registry URI or a Bento model.")
    features: list[str]


class SnapshotInfo(BaseModel):
    """The feature snapshot served by id."""

    path: str | None
    as_of: dt.date | None
    customers: int
    age_days: int | None = Field(
        default=None, description="Days from the snapshot's as-of date to today (UTC)."
    )
    max_age_days: int | None = Field(
        default=None,
        description="Age past which it counts as stale (RAPPORT_SNAPSHOT_MAX_AGE_DAYS).",
    )


class ServiceInfo(BaseModel):
    """What the service serves."""

    ready: bool
    error: str | None
    models: list[ModelDescription]
    inputs: list[str] = Field(description="Feature fields a row must carry.")
    categorical: list[str] = Field(description="Of those, the text ones.")
    snapshot: SnapshotInfo | None
    warnings: list[str] = Field(
        default_factory=list,
        description="What start-up found wrong short of failing: no snapshot, a snapshot "
        "lacking features the models need, or one older than its maximum age.",
    )
    max_batch: int = Field(description="Most customers in one request (RAPPORT_MAX_BATCH).")
    max_events: int = Field(description="Most events per posted history (RAPPORT_MAX_EVENTS).")
    max_request_events: int | None = Field(
        default=None, description="Most events in one history request (RAPPORT_MAX_REQUEST_EVENTS)."
    )
    max_id_length: int | None = Field(
        default=None, description="Longest customer or order id (RAPPORT_MAX_ID_LENGTH)."
    )
    max_body_bytes: int | None = Field(
        default=None, description="Largest request body (RAPPORT_MAX_BODY_BYTES)."
    )
    history_timeout_seconds: float | None = Field(
        default=None,
        description="Time budget of a history request (RAPPORT_HISTORY_TIMEOUT_SECONDS).",
    )
    currency: str | None


def versions_of(scorer: Scorer) -> ModelVersions:
    """The response's model block."""

    def one(v: ModelVersion) -> ServedModelInfo:
        return ServedModelInfo(name=v.name, version=v.version, alias=v.alias, run_id=v.run_id)

    return ModelVersions(churn=one(scorer.churn_version), clv=one(scorer.value_version))


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def to_customer_scores(
    scorer: Scorer,
    scores: Scores,
    customer_ids: list[str],
    as_of: list[dt.date | None],
    *,
    currency: str | None,
) -> list[CustomerScore]:
    """Response rows from column-wise :class:`Scores`."""
    out = []
    churn_h, value_h = scorer.churn.horizon_days, scorer.value.horizon_days
    proba = scores.churn_probability.tolist()
    value = scores.predicted_value.tolist()
    alive = scores.p_alive.tolist()
    purchases = scores.expected_purchases.tolist()
    days = scores.expected_days_to_next_purchase.tolist()
    tiers = scores.risk_tier.tolist()
    next_dates = scores.expected_next_purchase_date.tolist()
    for i, cid in enumerate(customer_ids):
        reasons = None
        if scores.churn_reasons is not None and scores.value_reasons is not None:
            reasons = Reasons(
                churn=[Reason(**vars(r)) for r in scores.churn_reasons[i]],
                value=[Reason(**vars(r)) for r in scores.value_reasons[i]],
            )
        out.append(
            CustomerScore(
                customer_id=cid,
                as_of=as_of[i],
                churn_probability=proba[i],
                risk_tier=tiers[i],
                churn_horizon_days=churn_h,
                predicted_value=value[i],
                value_horizon_days=value_h,
                currency=currency,
                expected_purchases=_finite(purchases[i]),
                p_alive=_finite(alive[i]),
                expected_days_to_next_purchase=_finite(days[i]),
                expected_next_purchase_date=next_dates[i],
                segment=scores.segment[i],
                reasons=reasons,
            )
        )
    return out


def check_rows(
    rows: list[FeatureRow], scorer: Scorer, *, today: dt.date
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Column arrays for the scorer from feature rows, and every problem found.

    Each problem is a pydantic-style error (``loc``, ``msg``, ``type``) naming the row and
    field: a missing feature, an unknown field, text where a number belongs, a negative
    count, a null where BG/NBD needs a number, a date after ``today``. The common case (no
    problem) is checked with set operations and one matrix, not a loop per field.
    """
    errors: list[dict[str, Any]] = []
    numeric = scorer.numeric
    needed = scorer.input_set
    extras = [row.__pydantic_extra__ or {} for row in rows]
    for i, (row, extra) in enumerate(zip(rows, extras, strict=True)):
        loc: tuple[Any, ...] = ("body", "customers", i)
        if row.as_of is not None and row.as_of > today:
            errors.append(_err((*loc, "as_of"), f"date {row.as_of} is in the future", "future"))
        keys = extra.keys()
        for k in keys - scorer.known:
            errors.append(_err((*loc, k), "unknown feature (see GET /v1/info)", "extra_forbidden"))
        for k in sorted(needed - keys, key=scorer.inputs.index):
            errors.append(_err((*loc, k), "feature is required", "missing"))
        for k in numeric:
            if isinstance(extra.get(k), str):
                errors.append(_err((*loc, k), "must be a finite number", "float_type"))
    values: list[list[float | str | None]]
    if errors:
        # Blank out what is already reported, so that the value checks below still run.
        values = [[_number_or_none(extra.get(k)) for k in numeric] for extra in extras]
    else:
        values = [[extra[k] for k in numeric] for extra in extras]
    matrix = np.array(values, dtype="float64")  # None becomes NaN
    for j, k in scorer.required_numeric:
        for r in np.flatnonzero(np.isnan(matrix[:, j])).tolist():
            if k in extras[r] and extras[r][k] is None:
                errors.append(_err(("body", "customers", r, k), "must not be null", "missing"))
    negative = matrix[:, scorer.nonnegative_index] < 0
    for r, c in zip(*(a.tolist() for a in np.nonzero(negative)), strict=True):
        k = numeric[scorer.nonnegative_index[c]]
        errors.append(_err(("body", "customers", r, k), "must be >= 0", "greater_than_equal"))
    if errors:
        return {}, errors
    cols: dict[str, np.ndarray] = {k: matrix[:, j] for j, k in enumerate(numeric)}
    for k in scorer.categorical:
        cols[k] = np.asarray(
            [None if (v := extra[k]) is None else str(v) for extra in extras], dtype="object"
        )
    if cols.keys() >= _BTYD_REQUIRED:
        errors += _btyd_errors(cols["frequency"], cols["recency"], cols["T"])
    return cols, errors


def _number_or_none(value: float | str | None) -> float | None:
    return None if isinstance(value, str) else value


#: The BTYD summary: never null (BG/NBD needs it for every customer).
_BTYD_REQUIRED = frozenset(BTYD_INPUTS)


def _err(loc: tuple[Any, ...], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": kind}


def _btyd_errors(freq: np.ndarray, rec: np.ndarray, age: np.ndarray) -> list[dict[str, Any]]:
    """BG/NBD's own rules on the summary (its fit would refuse these rows)."""
    errors = []
    for i in np.flatnonzero(freq != np.round(freq)):
        errors.append(_err(("body", "customers", int(i), "frequency"), "must be whole", "int_type"))
    for i in np.flatnonzero(rec > age):
        errors.append(
            _err(("body", "customers", int(i), "recency"), "must be <= T", "less_than_equal")
        )
    for i in np.flatnonzero((freq == 0) & (rec != 0)):
        errors.append(
            _err(
                ("body", "customers", int(i), "recency"),
                "must be 0 when frequency is 0",
                "value_error",
            )
        )
    return errors
