"""Model families besides LightGBM that can be chosen, registered and served.

Each family is a full estimator: ``fit(train, valid)`` returns the model with its fitted
attributes ending in ``_``; churn families predict with ``predict_proba`` and value families
with ``predict``, on a feature frame or on a mapping of column arrays (the form serving
holds). Each also gives per-row ``contributions`` (an exact decomposition, or none with the
reason in ``contributions_note``), ``feature_importance`` and ``degenerate_``: ``None``, or
why its fit carries no information (it is then never selected).

The families:

* ``logistic``: logistic regression on log RFM (churn).
* ``bgnbd``: BG/NBD's probability of no purchase over the horizon (churn).
* ``pnbd``: Pareto/NBD's probability of being dead, ``1 - P(alive)`` (churn).
* ``bgnbd_gg``: BG/NBD expected purchases x Gamma-Gamma spend per purchase (value).
* ``two_part``: P(any purchase) from a logistic regression x the buyers' spend from a
  log-linear regression, both on log RFM, with Duan's smearing (value).

The BTYD families are fitted on the training rows of the latest training cutoff (one row per
customer, as the models assume) and then scored on any cutoff, like every other model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeAlias

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.linear_model import LogisticRegression, Ridge

from rapport.training.btyd import ParetoNBDModel
from rapport.training.columns import BTYD_INPUTS
from rapport.training.config import TASK_FAMILIES, ModelConfig
from rapport.training.models import (
    DAYS_PER_WEEK,
    LOGISTIC_FEATURES,
    BTYDFeatures,
    ChurnModel,
    FeatureSchemaError,
    ValueModel,
    binary_label,
    btyd_outputs,
    next_purchase_date,
    score_frame,
    spend_label,
)

#: A feature frame or ``{column: array}``: what the families' prediction methods read.
Columns: TypeAlias = pd.DataFrame | Mapping[str, Any]
#: Customers the Pareto/NBD family is fitted on (a seeded sample beyond that: its gradient
#: is numeric, so its fit time grows with every customer).
PARETO_FIT_ROWS = 50_000
#: The BTYD summary columns, in the order the models take them.
SUMMARY = BTYD_INPUTS


def column(data: Columns, name: str) -> np.ndarray:
    """One numeric input column as float64 (missing values NaN).

    Raises
    ------
    FeatureSchemaError
        Naming the column when it is absent.
    """
    try:
        values = data[name]
    except KeyError as err:
        raise FeatureSchemaError(f"missing feature column {name!r}") from err
    if isinstance(values, pd.Series):
        return values.to_numpy(dtype="float64", na_value=np.nan)
    return np.asarray(values, dtype="float64")


def summary(data: Columns) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``frequency``, ``recency`` and ``T`` in weeks (the BTYD unit), ``monetary_value``."""
    freq, rec, age, money = (column(data, c) for c in SUMMARY)
    return freq, rec / DAYS_PER_WEEK, age / DAYS_PER_WEEK, money


def latest_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the latest cutoff: one per customer, as the BTYD models are fitted on."""
    as_of = pd.to_datetime(frame["as_of"])
    return frame[(as_of == as_of.max()).to_numpy()]


def constant_reason(values: np.ndarray) -> str | None:
    """Why a score carries no ranking (one value for every row), or None."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return "it predicts no finite value"
    if np.ptp(finite) <= 1e-12 * max(1.0, float(np.abs(finite).max())):
        return f"it predicts the same value ({finite[0]:.4g}) for every customer"
    return None


class Family:
    """What every non-LightGBM family shares: its config, task check and output helpers."""

    task: ClassVar[str]
    family: ClassVar[str]
    #: Why :meth:`contributions` is empty, for families without an exact decomposition.
    contributions_note: ClassVar[str] = ""
    config: ModelConfig
    feature_names_: list[str]
    btyd_: BTYDFeatures | None = None
    degenerate_: str | None = None
    #: Set by the training pipeline, as for LightGBM (serving rebuilds features with them).
    interaction_pairs_: tuple[tuple[str, str], ...] | None = None

    def __init__(self, config: ModelConfig) -> None:
        if config.task != self.task:
            raise ValueError(
                f"{type(self).__name__} needs a {self.task} config, got task {config.task!r}"
            )
        self.config = config

    def contributions(self, data: Columns) -> pd.DataFrame:
        """Per-row contributions and ``_bias``; no feature columns unless the family has them."""
        n = len(column(data, (self.feature_names_ or list(SUMMARY))[0]))
        return pd.DataFrame({"_bias": np.full(n, np.nan)}, index=_index(data, n))

    def feature_importance(self) -> pd.Series:
        """Importance per input, largest first (empty without a decomposition)."""
        return pd.Series(dtype="float64")

    def risk_tier(self, probability: np.ndarray) -> np.ndarray:
        """``low``, ``medium`` or ``high`` from the config's tier bounds (churn)."""
        low, high = self.config.risk_tiers
        return np.select([probability < low, probability < high], ["low", "medium"], "high")


def _index(data: Columns, n: int) -> pd.Index:
    return data.index if isinstance(data, pd.DataFrame) else pd.RangeIndex(n)


class _LogRFM:
    """Standardised log RFM: ``log1p`` of the non-negative inputs, missing as 0."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def fit(self, data: Columns) -> _LogRFM:
        x = self.raw(data)
        self.mean_ = x.mean(axis=0)
        scale = x.std(axis=0)
        self.scale_ = np.where(scale > 0, scale, 1.0)  # a constant input contributes 0
        return self

    def raw(self, data: Columns) -> np.ndarray:
        x = np.column_stack([column(data, c) for c in self.names])
        return np.log1p(np.clip(np.nan_to_num(x, nan=0.0), 0.0, None))

    def transform(self, data: Columns) -> np.ndarray:
        return (self.raw(data) - self.mean_) / self.scale_


class LogisticChurnModel(Family):
    """Logistic regression on standardised log RFM: the simple model churn models must beat.

    ``contributions`` is exact: coefficient x standardised input per feature plus the
    intercept as ``_bias`` sum to the log-odds the probability comes from.
    """

    task = "churn"
    family = "logistic"

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> LogisticChurnModel:
        """Fit on ``train`` rows (a linear model on five inputs needs no early stopping)."""
        y = binary_label(train, self.config.label)
        self.inputs_ = _LogRFM(LOGISTIC_FEATURES).fit(train)
        fitted = LogisticRegression(C=1.0).fit(self.inputs_.transform(train), y)
        self.coef_ = np.asarray(fitted.coef_[0], dtype="float64")
        self.intercept_ = float(fitted.intercept_[0])
        self.feature_names_ = list(LOGISTIC_FEATURES)
        self.degenerate_ = None if np.any(self.coef_ != 0) else "every coefficient is 0"
        return self

    def log_odds(self, data: Columns) -> np.ndarray:
        """Log-odds of churn per row."""
        return np.asarray(self.inputs_.transform(data) @ self.coef_ + self.intercept_)

    def predict_proba(self, data: Columns) -> np.ndarray:
        """Probability of no purchase in the horizon, per row."""
        return np.asarray(expit(self.log_odds(data)), dtype="float64")

    def contributions(self, data: Columns) -> pd.DataFrame:
        """Coefficient x standardised input per feature (log-odds units), and ``_bias``."""
        z = self.inputs_.transform(data)
        out = pd.DataFrame(z * self.coef_, columns=self.feature_names_, index=_index(data, len(z)))
        out["_bias"] = self.intercept_
        return out

    def feature_importance(self) -> pd.Series:
        """Absolute coefficient per standardised input, largest first."""
        return pd.Series(np.abs(self.coef_), index=self.feature_names_).sort_values(ascending=False)


class _BTYDFamily(Family):
    """A family whose predictions are :class:`BTYDFeatures` columns fitted on training rows."""

    contributions_note = (
        "a BTYD model has no additive per-feature decomposition: its output is a closed-form "
        "function of frequency, recency and T taken together"
    )

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> _BTYDFamily:
        """Fit BG/NBD (and Gamma-Gamma) on the latest training cutoff's rows."""
        rows = latest_rows(train)
        self.btyd_ = BTYDFeatures(self.config.horizon_days, seed=self.config.seed).fit(rows)
        self.feature_names_ = []
        # the BTYD fit says itself when it is degenerate; a score that is the same for
        # every training customer carries no ranking whatever the fit says
        reason = _btyd_reason(self.btyd_)
        self.degenerate_ = reason if reason else constant_reason(self._score(rows))
        return self

    def outputs(self, data: Columns) -> dict[str, np.ndarray]:
        """The BTYD columns (``p_alive``, expected purchases, ...) per row."""
        if self.btyd_ is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted")
        return self.btyd_.arrays(*summary(data))

    def expected_purchases(self, data: Columns) -> np.ndarray:
        """Expected purchases over the horizon, per row."""
        return self.outputs(data)[f"expected_purchases_{self.config.horizon_days}d"]

    def _score(self, data: Columns) -> np.ndarray:
        raise NotImplementedError


def _btyd_reason(btyd: BTYDFeatures) -> str | None:
    """A degenerate BG/NBD or Gamma-Gamma fit's own reason (None while the fit has none)."""
    for name, model in (("BG/NBD", btyd.bgnbd_), ("Gamma-Gamma", btyd.gamma_gamma_)):
        reason = getattr(model, "degenerate_", None)
        if reason:
            return f"{name}: {reason}"
    if btyd.dropped_reason_ is not None or btyd.bgnbd_ is None:
        return "BG/NBD: " + (btyd.dropped_reason_ or "not fitted")
    return None


class BGNBDChurnModel(_BTYDFamily):
    """BG/NBD churn: the probability of no purchase over the horizon."""

    task = "churn"
    family = "bgnbd"

    def predict_proba(self, data: Columns) -> np.ndarray:
        """P(no purchase in the horizon), per row."""
        return self.outputs(data)[f"p_no_purchase_{self.config.horizon_days}d"]

    def _score(self, data: Columns) -> np.ndarray:
        return self.predict_proba(data)


class BTYDValueModel(_BTYDFamily):
    """BG/NBD expected purchases x Gamma-Gamma expected spend per purchase (undiscounted)."""

    task = "clv"
    family = "bgnbd_gg"

    def predict(self, data: Columns) -> np.ndarray:
        """Expected spend over the horizon, per row (currency)."""
        return self.outputs(data)[f"btyd_value_{self.config.horizon_days}d"]

    def _score(self, data: Columns) -> np.ndarray:
        return self.predict(data)


class ParetoNBDChurnModel(Family):
    """Pareto/NBD churn: the probability that the customer's lifetime has ended."""

    task = "churn"
    family = "pnbd"
    contributions_note = _BTYDFamily.contributions_note

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> ParetoNBDChurnModel:
        """Fit on (a seeded sample of) the latest training cutoff's rows."""
        rows = latest_rows(train)
        if len(rows) > PARETO_FIT_ROWS:
            rows = rows.sample(PARETO_FIT_ROWS, random_state=self.config.seed)
        freq, rec, age, _ = summary(rows)
        self.pnbd_ = ParetoNBDModel().fit(freq, rec, age)
        self.feature_names_ = ["frequency", "recency", "T"]
        reason = getattr(self.pnbd_, "degenerate_", None)
        self.degenerate_ = (
            f"Pareto/NBD: {reason}" if reason else constant_reason(self.predict_proba(rows))
        )
        return self

    def predict_proba(self, data: Columns) -> np.ndarray:
        """``1 - P(alive)``, per row."""
        freq, rec, age, _ = summary(data)
        return 1.0 - self.pnbd_.probability_alive(freq, rec, age)

    def expected_purchases(self, data: Columns) -> np.ndarray:
        """Expected purchases over the horizon, per row."""
        freq, rec, age, _ = summary(data)
        weeks = self.config.horizon_days / DAYS_PER_WEEK
        return self.pnbd_.conditional_expected_purchases(weeks, freq, rec, age)


class TwoPartValueModel(Family):
    """P(any purchase) x expected spend of a buyer, both linear in log RFM.

    The spend part regresses log spend on the buyers and multiplies back by Duan's smearing
    factor (the mean of the exponentiated residuals), so the buyers' mean spend is unbiased
    without assuming normal errors.
    """

    task = "clv"
    family = "two_part"
    contributions_note = (
        "the two-part value is a product of a logistic and an exponential: it has no exact "
        "additive per-feature decomposition"
    )

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame | None = None) -> TwoPartValueModel:
        """Fit both parts on ``train`` rows."""
        y = spend_label(train, self.config.label)
        buyers = y > 0
        if buyers.sum() < 10 or (~buyers).sum() < 1:
            raise ValueError(f"{self.config.label}: too few buyers and non-buyers for two parts")
        self.inputs_ = _LogRFM(LOGISTIC_FEATURES).fit(train)
        z = self.inputs_.transform(train)
        buy = LogisticRegression(C=1.0).fit(z, buyers.astype("int8"))
        self.buy_coef_ = np.asarray(buy.coef_[0], dtype="float64")
        self.buy_intercept_ = float(buy.intercept_[0])
        spend = Ridge(alpha=1.0).fit(z[buyers], np.log(y[buyers]))
        self.spend_coef_ = np.asarray(spend.coef_, dtype="float64")
        self.spend_intercept_ = float(spend.intercept_)
        residuals = np.log(y[buyers]) - z[buyers] @ self.spend_coef_ - self.spend_intercept_
        self.smearing_ = float(np.mean(np.exp(residuals)))
        self.feature_names_ = list(LOGISTIC_FEATURES)
        self.degenerate_ = constant_reason(self.predict(train))
        return self

    def predict(self, data: Columns) -> np.ndarray:
        """Expected spend over the horizon, per row (currency, >= 0)."""
        z = self.inputs_.transform(data)
        p_buy = expit(z @ self.buy_coef_ + self.buy_intercept_)
        spend = np.exp(z @ self.spend_coef_ + self.spend_intercept_) * self.smearing_
        return np.asarray(p_buy * spend, dtype="float64")


#: Families by name, per task (LightGBM first: the model every run trains).
CHURN_FAMILIES: dict[str, type[Any]] = {
    "lightgbm": ChurnModel,
    "logistic": LogisticChurnModel,
    "bgnbd": BGNBDChurnModel,
    "pnbd": ParetoNBDChurnModel,
}
VALUE_FAMILIES: dict[str, type[Any]] = {
    "lightgbm": ValueModel,
    "bgnbd_gg": BTYDValueModel,
    "two_part": TwoPartValueModel,
}
#: Every estimator class a registered Rapport model may hold.
ESTIMATORS = (
    ChurnModel,
    ValueModel,
    LogisticChurnModel,
    BGNBDChurnModel,
    ParetoNBDChurnModel,
    BTYDValueModel,
    TwoPartValueModel,
)
Estimator: TypeAlias = (
    ChurnModel
    | ValueModel
    | LogisticChurnModel
    | BGNBDChurnModel
    | ParetoNBDChurnModel
    | BTYDValueModel
    | TwoPartValueModel
)
ChurnEstimator: TypeAlias = ChurnModel | LogisticChurnModel | BGNBDChurnModel | ParetoNBDChurnModel
ValueEstimator: TypeAlias = ValueModel | BTYDValueModel | TwoPartValueModel


def family_of(model: Estimator) -> str:
    """The family name of a fitted model (``lightgbm`` for the LightGBM models)."""
    return "lightgbm" if isinstance(model, ChurnModel | ValueModel) else model.family


def predict(model: Estimator, data: Columns) -> np.ndarray:
    """The model's prediction per row: churn probability, or expected spend."""
    if isinstance(model, ChurnModel | ValueModel) and not isinstance(data, pd.DataFrame):
        data = pd.DataFrame(data)  # the LightGBM models read frames only
    if isinstance(model, ChurnModel | LogisticChurnModel | BGNBDChurnModel | ParetoNBDChurnModel):
        return np.asarray(model.predict_proba(data), dtype="float64")  # type: ignore[arg-type]
    return np.asarray(model.predict(data), dtype="float64")  # type: ignore[arg-type]


def score_rows(model: Estimator, frame: pd.DataFrame) -> pd.DataFrame:
    """What serving returns per row, for a model of any family.

    The columns of :func:`rapport.training.models.score_frame`: the prediction
    (``churn_probability`` and ``risk_tier``, or ``predicted_value``), then ``p_alive``,
    ``expected_purchases`` and ``expected_days_to_next_purchase`` from the model's own BTYD
    fit (NaN for families without one) and, when the rows carry ``as_of``, the date.
    """
    if isinstance(model, ChurnModel | ValueModel):
        return score_frame(model, frame)
    extra = model.btyd_.transform(frame) if model.btyd_ is not None else None
    out = btyd_outputs(model, frame, extra)
    prediction = predict(model, frame)
    if model.task == "churn":
        out.insert(0, "risk_tier", model.risk_tier(prediction))
        out.insert(0, "churn_probability", prediction)
    else:
        out.insert(0, "predicted_value", prediction)
    if "as_of" in frame.columns:
        out["expected_next_purchase_date"] = next_purchase_date(
            frame["as_of"], out["expected_days_to_next_purchase"].to_numpy()
        )
    return out


assert tuple(CHURN_FAMILIES) == TASK_FAMILIES["churn"]
assert tuple(VALUE_FAMILIES) == TASK_FAMILIES["clv"]
