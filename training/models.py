"""Churn and lifetime-value estimators, and the baselines they are compared with.

Every estimator takes feature frames as :func:`rapport.features.build.build_features` returns
them (extra columns are ignored, missing ones are an error naming the column) and carries its
own preprocessing and feature order, so whoever loads it never has to know them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import lightgbm as lgb
import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from rapport.training.btyd_features import (
    NEXT_PURCHASE_CAP_DAYS,
    BTYDFeatures,
    btyd_inputs,
)
from rapport.training.columns import (
    BTYD_INPUTS,
    CATEGORICAL_FEATURES,
    DAYS_PER_WEEK,
    KEY_COLUMNS,
    LABEL_PREFIXES,
    FeatureSchemaError,
    is_label,
)
from rapport.training.config import ModelConfig

__all__ = [
    "BTYD_INPUTS",
    "CATEGORICAL_FEATURES",
    "DAYS_PER_WEEK",
    "KEY_COLUMNS",
    "LABEL_PREFIXES",
    "NEXT_PURCHASE_CAP_DAYS",
    "BTYDFeatures",
    "ChurnModel",
    "FeatureSchemaError",
    "LogisticBaseline",
    "Preprocessor",
    "ValueModel",
    "btyd_inputs",
    "btyd_outputs",
    "input_columns",
    "is_label",
    "score_frame",
]


@dataclass
class Preprocessor:
    """Picks, orders and types the feature columns; learns categories from training rows."""

    exclude: tuple[str, ...] = ()
    feature_names_: list[str] = field(default_factory=list)
    categories_: dict[str, list[str]] = field(default_factory=dict)

    def fit(self, frame: pd.DataFrame) -> Preprocessor:
        """Learn the feature list and the categories of the text columns."""
        names = [
            c
            for c in frame.columns
            if c not in KEY_COLUMNS and not is_label(c) and c not in self.exclude
        ]
        if not names:
            raise FeatureSchemaError("no feature columns in the training frame")
        self.feature_names_ = names
        self.categories_ = {}
        for col in names:
            series = frame[col]
            if col in CATEGORICAL_FEATURES or not pd.api.types.is_numeric_dtype(series):
                values = series.dropna().astype(str).unique().tolist()
                self.categories_[col] = sorted(values)
        return self

    def transform(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The features in training order: numbers as float64, text as fixed categories.

        Raises
        ------
        FeatureSchemaError
            Naming the missing columns, or a column whose values are not numbers.
        """
        missing = [c for c in self.feature_names_ if c not in frame.columns]
        if missing:
            raise FeatureSchemaError(f"missing feature columns: {', '.join(missing)}")
        out: dict[str, Any] = {}
        for col in self.feature_names_:
            series = frame[col]
            if col in self.categories_:
                # Values unseen in training become missing, as LightGBM would treat them.
                cats = self.categories_[col]
                text = series.astype("string")
                out[col] = pd.Categorical(text.where(text.isin(cats)), categories=cats)
                continue
            try:
                out[col] = pd.to_numeric(series, errors="raise").to_numpy(
                    dtype="float64", na_value=np.nan
                )
            except (ValueError, TypeError) as err:
                raise FeatureSchemaError(f"feature column {col!r} must be numeric: {err}") from err
        return pd.DataFrame(out, index=frame.index)


def _lgb_params(
    config: ModelConfig, objective: str, metric: str, feature_names: Sequence[str]
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "objective": objective,
        "metric": metric,
        "seed": config.seed,
        "deterministic": True,
        "force_col_wise": True,
        "verbosity": -1,
        # One thread unless the config says otherwise: OpenMP threads spin at barriers, and on
        # a shared 2-core machine two threads trained 4x slower than one.
        "num_threads": 1,
    }
    params.update(config.lightgbm.params)
    if objective != "tweedie":
        params.pop("tweedie_variance_power", None)
    if config.monotone:
        unknown = sorted(set(config.monotone) - set(feature_names))
        if unknown:
            raise FeatureSchemaError(f"monotone constraint on unknown features: {unknown}")
        params["monotone_constraints"] = [config.monotone.get(n, 0) for n in feature_names]
        # "advanced" splits more precisely but cost noticeably more per tree at scale.
        params.setdefault("monotone_constraints_method", "intermediate")
    return params


def _train_booster(
    config: ModelConfig,
    params: dict[str, Any],
    x_train: pd.DataFrame,
    y_train: np.ndarray,
    x_valid: pd.DataFrame,
    y_valid: np.ndarray,
    weight: np.ndarray | None = None,
    valid_weight: np.ndarray | None = None,
) -> lgb.Booster:
    train_set = lgb.Dataset(x_train, y_train, weight=weight, free_raw_data=True)
    valid_set = lgb.Dataset(x_valid, y_valid, weight=valid_weight, reference=train_set)
    return lgb.train(
        params,
        train_set,
        num_boost_round=config.lightgbm.num_boost_round,
        valid_sets=[valid_set],
        valid_names=["valid"],
        callbacks=[
            lgb.early_stopping(
                config.lightgbm.early_stopping_rounds,
                verbose=False,
                min_delta=config.lightgbm.early_stopping_min_delta,
            ),
        ],
    )


#: Weight of the raw score in an isotonic calibration's output (see :class:`_Calibrator`).
_TIE_BREAK = 1e-9


class _Calibrator:
    """Maps raw churn scores to calibrated probabilities (isotonic, Platt or identity)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.model_: IsotonicRegression | LogisticRegression | None = None

    def fit(self, raw: np.ndarray, y: np.ndarray) -> _Calibrator:
        if self.method == "isotonic":
            self.model_ = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(raw, y)
        elif self.method == "sigmoid":
            self.model_ = LogisticRegression(C=1e6).fit(raw.reshape(-1, 1), y)
        return self

    def transform(self, raw: np.ndarray) -> np.ndarray:
        if isinstance(self.model_, IsotonicRegression):
            # IsotonicRegression.predict with out_of_bounds="clip" is this interpolation;
            # calling it directly saves its input checks (most of the time for one row).
            m = self.model_
            raw = np.asarray(raw, dtype="float64")
            steps = np.interp(raw, m.X_thresholds_, m.y_thresholds_)
            # The isotonic map is a step function: on CDNOW it gave 41 distinct values to
            # 2,357 customers, and the ties it makes cost 0.002 of ROC-AUC. A billionth of
            # the raw score's own probability breaks them in the raw order; a convex mix
            # keeps [0, 1], and no probability moves by more than 1e-9.
            return (1.0 - _TIE_BREAK) * steps + _TIE_BREAK * expit(raw)
        if isinstance(self.model_, LogisticRegression):
            return np.asarray(self.model_.predict_proba(raw.reshape(-1, 1))[:, 1])
        return np.asarray(expit(raw))


class _BaseModel:
    """Shared preprocessing for the LightGBM models."""

    task: str
    config: ModelConfig
    preprocessor_: Preprocessor

    def __init__(self, config: ModelConfig) -> None:
        if config.task != self.task:
            raise ValueError(
                f"{type(self).__name__} needs a {self.task} config, got task {config.task!r}"
            )
        self.config = config

    btyd_: BTYDFeatures | None
    booster_: lgb.Booster
    best_iteration_: int
    #: ``(channel, event)`` pairs the interaction features were built from (set by the
    #: training pipeline, so serving can rebuild the same columns from a raw history).
    interaction_pairs_: tuple[tuple[str, str], ...] | None = None

    def _fit_inputs(self, train: pd.DataFrame) -> None:
        self.btyd_ = (
            BTYDFeatures(self.config.horizon_days, seed=self.config.seed).fit(train)
            if self.config.btyd_features
            else None
        )
        self.preprocessor_ = Preprocessor(exclude=self.config.exclude_features).fit(
            self._with_btyd(train)
        )

    def _with_btyd(self, frame: pd.DataFrame, extra: pd.DataFrame | None = None) -> pd.DataFrame:
        if self.btyd_ is None:
            return frame
        if extra is None:
            extra = self.btyd_.transform(frame)
        return pd.concat([frame.drop(columns=extra.columns, errors="ignore"), extra], axis=1)

    def matrix(self, frame: pd.DataFrame, btyd: pd.DataFrame | None = None) -> pd.DataFrame:
        """The model's input matrix for feature rows (BTYD columns added, ordered, typed).

        ``btyd`` passes BTYD columns already computed for ``frame`` (scoring uses them twice).
        """
        return self.preprocessor_.transform(self._with_btyd(frame, btyd))

    @property
    def feature_names_(self) -> list[str]:
        """Model inputs, in order."""
        return self.preprocessor_.feature_names_

    def contributions(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Per-row feature contributions (SHAP values from LightGBM, in raw-score units)."""
        matrix = self.matrix(frame)
        contrib = self.booster_.predict(
            matrix, pred_contrib=True, num_iteration=self.booster_.best_iteration or None
        )
        names = [*self.feature_names_, "_bias"]
        return pd.DataFrame(np.asarray(contrib), columns=names, index=frame.index)

    def feature_importance(self) -> pd.Series:
        """Total gain per feature, largest first."""
        gain = self.booster_.feature_importance(importance_type="gain")
        return pd.Series(gain, index=self.feature_names_).sort_values(ascending=False)


class ChurnModel(_BaseModel):
    """LightGBM churn classifier, calibrated on the validation cutoff.

    Parameters
    ----------
    config
        The churn config: label ``churned_{H}d``, LightGBM parameters, calibration method,
        class balancing and BTYD features.
    """

    task = "churn"

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame) -> ChurnModel:
        """Fit on ``train`` rows, early-stop and calibrate on ``valid`` rows."""
        label = self.config.label
        y_train = binary_label(train, label)
        y_valid = binary_label(valid, label)
        self._fit_inputs(train)
        weight = valid_weight = None
        if self.config.balance_classes:
            rate = y_train.mean()
            weight = np.where(y_train == 1, 0.5 / rate, 0.5 / (1 - rate))
            # Validation is weighed the same way, so early stopping judges the model on the
            # loss it was trained on.
            valid_weight = np.where(y_valid == 1, 0.5 / rate, 0.5 / (1 - rate))
        # Early stopping on log loss: AUC sorts the whole validation set every round, which
        # made each tree 2.6x as expensive at a million rows.
        x_valid = self.matrix(valid)
        self.booster_ = _train_booster(
            self.config,
            _lgb_params(self.config, "binary", "binary_logloss", self.feature_names_),
            self.matrix(train),
            y_train,
            x_valid,
            y_valid,
            weight,
            valid_weight,
        )
        self.best_iteration_ = int(self.booster_.best_iteration or self.booster_.num_trees())
        self.calibrator_ = _Calibrator(self.config.calibration).fit(
            self._raw_matrix(x_valid), y_valid.astype("float64")
        )
        return self

    def _raw_matrix(self, matrix: pd.DataFrame) -> np.ndarray:
        return np.asarray(
            self.booster_.predict(matrix, raw_score=True, num_iteration=self.best_iteration_),
            dtype="float64",
        )

    def _raw(self, frame: pd.DataFrame) -> np.ndarray:
        return self._raw_matrix(self.matrix(frame))

    def proba_from_matrix(self, matrix: pd.DataFrame) -> np.ndarray:
        """Calibrated churn probability for an input matrix from :meth:`matrix`."""
        return self.calibrator_.transform(self._raw_matrix(matrix))

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Calibrated probability of no purchase in the horizon, per row."""
        return self.proba_from_matrix(self.matrix(frame))

    def risk_tier(self, probability: np.ndarray) -> np.ndarray:
        """``low``, ``medium`` or ``high`` from the config's tier bounds."""
        low, high = self.config.risk_tiers
        return np.select([probability < low, probability < high], ["low", "medium"], "high")


class ValueModel(_BaseModel):
    """LightGBM model of net spend over the horizon, in currency.

    ``tweedie`` fits one model with a Tweedie loss (a point mass at zero and a heavy tail);
    ``two_part`` multiplies P(any purchase) by the expected spend of those who buy (ZILN's
    decomposition with gradient boosting for both parts).
    """

    task = "clv"

    def fit(self, train: pd.DataFrame, valid: pd.DataFrame) -> ValueModel:
        """Fit on ``train`` rows, early-stop on ``valid`` rows."""
        label = self.config.label
        y_train = spend_label(train, label)
        y_valid = spend_label(valid, label)
        self._fit_inputs(train)
        x_train, x_valid = self.matrix(train), self.matrix(valid)
        self.buyer_booster_: lgb.Booster | None = None
        if self.config.value_model == "tweedie":
            self.booster_ = _train_booster(
                self.config,
                _lgb_params(self.config, "tweedie", "tweedie", self.feature_names_),
                x_train,
                y_train,
                x_valid,
                y_valid,
            )
        else:
            self.buyer_booster_ = _train_booster(
                self.config,
                _lgb_params(self.config, "binary", "binary_logloss", self.feature_names_),
                x_train,
                (y_train > 0).astype("int8"),
                x_valid,
                (y_valid > 0).astype("int8"),
            )
            buyers, valid_buyers = y_train > 0, y_valid > 0
            if buyers.sum() < 10 or valid_buyers.sum() < 1:
                raise ValueError(f"{label}: too few buyers to fit the spend part")
            self.booster_ = _train_booster(
                self.config,
                _lgb_params(self.config, "gamma", "gamma", self.feature_names_),
                x_train[buyers],
                y_train[buyers],
                x_valid[valid_buyers],
                y_valid[valid_buyers],
            )
        self.best_iteration_ = int(self.booster_.best_iteration or self.booster_.num_trees())
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Expected net spend over the horizon, per row (currency, >= 0)."""
        return self.predict_from_matrix(self.matrix(frame))

    def predict_from_matrix(self, matrix: pd.DataFrame) -> np.ndarray:
        """Expected net spend for an input matrix from :meth:`matrix`."""
        spend = np.asarray(
            self.booster_.predict(matrix, num_iteration=self.best_iteration_), dtype="float64"
        )
        if self.buyer_booster_ is not None:
            buyer = self.buyer_booster_
            spend = spend * np.asarray(
                buyer.predict(matrix, num_iteration=buyer.best_iteration or None)
            )
        return spend


def binary_label(frame: pd.DataFrame, label: str) -> np.ndarray:
    """A churn label column as int8 0/1, checked: present, no nulls, both classes.

    Raises
    ------
    FeatureSchemaError
        Naming the label and what is wrong with it.
    """
    if label not in frame.columns:
        raise FeatureSchemaError(f"label column {label!r} is missing")
    values = frame[label]
    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise FeatureSchemaError(f"label column {label!r} is null at row {row}")
    y = values.astype("int8").to_numpy()
    if len(np.unique(y)) < 2:
        raise FeatureSchemaError(f"label column {label!r} has a single class: cannot learn")
    return y


def spend_label(frame: pd.DataFrame, label: str) -> np.ndarray:
    """A spend label column as float64, checked finite, refunds floored at 0.

    Raises
    ------
    FeatureSchemaError
        Naming the label and the first row that is not finite.
    """
    if label not in frame.columns:
        raise FeatureSchemaError(f"label column {label!r} is missing")
    y = frame[label].to_numpy(dtype="float64", na_value=np.nan)
    if not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y))[0])
        raise FeatureSchemaError(f"label column {label!r} is not finite at row {row}")
    # Refunds can make a horizon's net spend negative; the value of a customer is not below 0.
    return np.clip(y, 0.0, None)


#: RFM inputs of the logistic-regression baseline (log1p-transformed).
LOGISTIC_FEATURES = ("recency_days", "frequency", "T", "monetary_value", "total_spend")


class LogisticBaseline:
    """Logistic regression on log RFM: the simple model any churn model must beat."""

    def __init__(self, label: str, features: Sequence[str] = LOGISTIC_FEATURES) -> None:
        self.label = label
        self.features = tuple(features)

    def _x(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise FeatureSchemaError(f"missing feature columns: {', '.join(missing)}")
        x = frame[list(self.features)].to_numpy(dtype="float64", na_value=0.0)
        return np.log1p(np.clip(x, 0.0, None))

    def fit(self, train: pd.DataFrame) -> LogisticBaseline:
        """Fit on training rows."""
        self.pipeline_: Pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=1.0))
        self.pipeline_.fit(self._x(train), binary_label(train, self.label))
        return self

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Probability of churn per row."""
        return np.asarray(self.pipeline_.predict_proba(self._x(frame))[:, 1])


def next_purchase_date(as_of: pd.Series, days: np.ndarray) -> pd.Series:
    """Expected next purchase date: the cutoff plus the expected days (NaT when unbounded)."""
    finite = np.where(np.isfinite(days) & (days < 365 * 100), np.ceil(days), np.nan)
    base = pd.to_datetime(as_of)
    return base + pd.to_timedelta(pd.Series(finite, index=as_of.index), unit="D")


class HasInputs(Protocol):
    """What :func:`btyd_outputs` and :func:`input_columns` read of a fitted model, any family."""

    config: ModelConfig
    btyd_: BTYDFeatures | None

    @property
    def feature_names_(self) -> list[str]:
        """Model inputs, in order."""
        ...


def btyd_outputs(
    model: HasInputs, frame: pd.DataFrame, extra: pd.DataFrame | None = None
) -> pd.DataFrame:
    """P(alive), expected purchases over the horizon and days to the next purchase, per row.

    NaN when the model was trained without BTYD features. ``extra`` passes the model's BTYD
    columns already computed for ``frame``.
    """
    if model.btyd_ is None or model.btyd_.dropped_reason_ is not None:
        nan = np.full(len(frame), np.nan)
        return pd.DataFrame(
            {"p_alive": nan, "expected_purchases": nan, "expected_days_to_next_purchase": nan},
            index=frame.index,
        )
    if extra is None:
        extra = model.btyd_.transform(frame)
    return pd.DataFrame(
        {
            "p_alive": extra["p_alive"],
            "expected_purchases": extra[f"expected_purchases_{model.config.horizon_days}d"],
            "expected_days_to_next_purchase": extra["expected_days_to_next_purchase"],
        },
        index=frame.index,
    )


def score_frame(model: ChurnModel | ValueModel, frame: pd.DataFrame) -> pd.DataFrame:
    """What serving returns per row: the model's prediction plus the BTYD outputs.

    Returns
    -------
    pandas.DataFrame
        Churn: ``churn_probability``, ``risk_tier``; value: ``predicted_value`` (currency
        over the horizon); both: ``p_alive``, ``expected_purchases``,
        ``expected_days_to_next_purchase`` and, when the rows carry their ``as_of``,
        ``expected_next_purchase_date``.
    """
    # The BTYD columns feed the model and the output: compute them once.
    extra = model.btyd_.transform(frame) if model.btyd_ is not None else None
    out = btyd_outputs(model, frame, extra)
    matrix = model.matrix(frame, extra)
    if isinstance(model, ChurnModel):
        proba = model.proba_from_matrix(matrix)
        out.insert(0, "risk_tier", model.risk_tier(proba))
        out.insert(0, "churn_probability", proba)
    else:
        out.insert(0, "predicted_value", model.predict_from_matrix(matrix))
    if "as_of" in frame.columns:
        out["expected_next_purchase_date"] = next_purchase_date(
            frame["as_of"], out["expected_days_to_next_purchase"].to_numpy()
        )
    return out


def input_columns(model: HasInputs) -> list[str]:
    """The feature columns a caller must send (BTYD columns are derived inside)."""
    derived = set(model.btyd_.columns) if model.btyd_ is not None else set()
    needed = [c for c in model.feature_names_ if c not in derived]
    if model.btyd_ is not None:
        needed += [c for c in ("frequency", "recency", "T", "monetary_value") if c not in needed]
    return needed
