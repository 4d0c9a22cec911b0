"""Scoring with the registered models: the same numbers as the pyfunc, at serving speed.

The registered pyfunc scores a pandas frame; that costs about 7 ms for one customer, nearly
all of it pandas bookkeeping (the trees take 20 us). :class:`CompiledModel` does the same
steps on numpy arrays: BTYD columns, feature matrix in training order, categories as the
codes LightGBM saw, trees, calibration. Tests check it against the registered model row by
row. :class:`Scorer` joins the churn and value models into one answer per customer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from rapport.features.definitions import (
    FeatureSpec,
    feature_columns,
    is_nonnegative_feature,
)
from rapport.training.candidates import (
    ESTIMATORS,
    ChurnEstimator,
    Estimator,
    Family,
)
from rapport.training.candidates import predict as family_predict
from rapport.training.columns import BTYD_INPUTS
from rapport.training.models import (
    DAYS_PER_WEEK,
    BTYDFeatures,
    ChurnModel,
    FeatureSchemaError,
    ValueModel,
    input_columns,
)
from rapport.training.tracking import point_mlflow_at

#: Up to this many rows LightGBM predicts on one thread.
SMALL_PREDICTION = 10_000
#: Expected days beyond this are "not expected": no next-purchase date.
MAX_EXPECTED_DAYS = 365 * 100


@dataclass(frozen=True)
class ModelVersion:
    """Which registered model version is served, and where it came from."""

    name: str
    version: str
    alias: str | None = None
    run_id: str | None = None
    source: str = ""

    @property
    def label(self) -> str:
        """``name/version``, as responses report it."""
        return f"{self.name}/{self.version}"


@dataclass
class LoadedModel:
    """A fitted model and the registry version it came from."""

    model: Estimator
    version: ModelVersion
    currency: str | None = None


def resolve_alias(name: str, alias: str, *, tracking_uri: str) -> ModelVersion:
    """The registry version of ``name`` that ``alias`` points at (``source``: its URI).

    Also points MLflow's tracking and registry at ``tracking_uri``, so the ``models:/`` URI
    can be loaded or downloaded next: ``models:/`` resolves through the registry URI, and a
    process that trained against another store earlier (a notebook, the demo) would
    otherwise load that store's version of the same number.

    Raises
    ------
    LookupError
        When the model or the alias does not exist, naming both.
    """
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as err:
        raise LookupError(
            f"no version of registered model {name!r} has the alias {alias!r} in "
            f"{tracking_uri} (train one first: `rapport train`)"
        ) from err
    point_mlflow_at(tracking_uri)
    return ModelVersion(
        name=name,
        version=str(mv.version),
        alias=alias,
        run_id=mv.run_id,
        source=f"models:/{name}/{mv.version}",
    )


def load_registered(name: str, alias: str, *, tracking_uri: str) -> LoadedModel:
    """Load the version of ``name`` that ``alias`` points at from the MLflow registry."""
    version = resolve_alias(name, alias, tracking_uri=tracking_uri)
    return _loaded(mlflow.pyfunc.load_model(version.source), version)


def load_pyfunc_dir(path: str, version: ModelVersion) -> LoadedModel:
    """Load a model saved as an MLflow model folder (what a Bento carries)."""
    return _loaded(mlflow.pyfunc.load_model(path), version)


def _loaded(pyfunc: Any, version: ModelVersion) -> LoadedModel:
    """The unwrapped model, with the currency of the data it was trained on, if stated."""
    metadata = getattr(pyfunc.metadata, "metadata", None) or {}
    currency = metadata.get("currency")
    return LoadedModel(_unwrap(pyfunc), version, str(currency) if currency else None)


def _unwrap(pyfunc: Any) -> Estimator:
    inner = pyfunc.unwrap_python_model()
    model = getattr(inner, "model", None)
    if not isinstance(model, ESTIMATORS):
        raise TypeError(f"not a Rapport model: {type(inner).__name__}")
    return model


class CompiledModel:
    """One fitted model prepared for scoring plain arrays.

    Parameters
    ----------
    model
        A fitted :class:`ChurnModel` or :class:`ValueModel`.
    """

    def __init__(self, model: ChurnModel | ValueModel) -> None:
        self.model = model
        self.task = model.task
        self.horizon_days = model.config.horizon_days
        self.inputs: list[str] = input_columns(model)
        self.features: list[str] = list(model.feature_names_)
        self.btyd_columns: set[str] = set(model.btyd_.columns) if model.btyd_ else set()
        # LightGBM saw pandas categories as their codes: the index in the training list.
        self.codes: dict[str, dict[str, float]] = {
            col: {value: float(i) for i, value in enumerate(values)}
            for col, values in model.preprocessor_.categories_.items()
        }
        self.categorical: set[str] = set(self.codes)
        self.best_iteration = model.best_iteration_

    def btyd(self, cols: Mapping[str, np.ndarray], *, check: bool = True) -> dict[str, np.ndarray]:
        """The model's BTYD columns (empty without BTYD features).

        ``check=False`` for rows already validated (BG/NBD's input rules).
        """
        return _btyd_columns(self.model.btyd_, cols, check=check)

    def matrix(
        self, cols: Mapping[str, np.ndarray], n: int, btyd: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        """The input matrix in training order (float64; categories as codes, unseen NaN)."""
        columns: list[np.ndarray] = []
        for name in self.features:
            if name in self.btyd_columns:
                columns.append(btyd[name])
            elif name in self.codes:
                codes = self.codes[name]
                columns.append(
                    np.array(
                        [codes.get(v, np.nan) if v is not None else np.nan for v in cols[name]],
                        dtype="float64",
                    )
                )
            else:
                columns.append(cols[name])
        # One stacking call: assigning 75 columns one by one cost more than the trees.
        return np.column_stack(columns).astype("float64", copy=False).reshape(n, -1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Churn: calibrated probability; value: expected spend over the horizon."""
        model = self.model
        threads = _threads(len(x))
        if isinstance(model, ChurnModel):
            raw = model.booster_.predict(
                x, raw_score=True, num_iteration=self.best_iteration, num_threads=threads
            )
            return model.calibrator_.transform(np.asarray(raw, dtype="float64"))
        spend = np.asarray(
            model.booster_.predict(x, num_iteration=self.best_iteration, num_threads=threads),
            dtype="float64",
        )
        if model.buyer_booster_ is not None:
            buyer = model.buyer_booster_
            spend = spend * np.asarray(
                buyer.predict(x, num_iteration=buyer.best_iteration or None, num_threads=threads),
                dtype="float64",
            )
        return spend

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """SHAP values per row and feature (raw-score units), without the bias column."""
        contrib = self.model.booster_.predict(
            x, pred_contrib=True, num_iteration=self.best_iteration, num_threads=_threads(len(x))
        )
        return np.asarray(contrib, dtype="float64")[:, :-1]


def _btyd_columns(
    btyd: BTYDFeatures | None, cols: Mapping[str, np.ndarray], *, check: bool
) -> dict[str, np.ndarray]:
    if btyd is None:
        return {}
    return btyd.arrays(
        cols["frequency"],
        cols["recency"] / DAYS_PER_WEEK,
        cols["T"] / DAYS_PER_WEEK,
        cols["monetary_value"],
        check=check,
    )


class CompiledFamily:
    """A model of a non-LightGBM family, scored on plain arrays through its public methods.

    The same interface as :class:`CompiledModel`; the "matrix" is the model's input columns
    side by side, handed back to the model as ``{column: array}``. Reasons are the model's own
    ``contributions`` (the logistic family's coefficient x standardised input); families
    without an exact decomposition give none (their ``contributions_note`` says why).

    Parameters
    ----------
    model
        A fitted model of a family in :mod:`rapport.training.candidates`.
    """

    def __init__(self, model: Family) -> None:
        self.model = model
        self.task = model.task
        self.horizon_days = model.config.horizon_days
        self.inputs: list[str] = input_columns(model)
        self.features: list[str] = list(model.feature_names_)
        self.codes: dict[str, dict[str, float]] = {}
        self.categorical: set[str] = set()

    def btyd(self, cols: Mapping[str, np.ndarray], *, check: bool = True) -> dict[str, np.ndarray]:
        """The model's BTYD columns (empty for families without a BTYD fit)."""
        return _btyd_columns(self.model.btyd_, cols, check=check)

    def matrix(
        self, cols: Mapping[str, np.ndarray], n: int, btyd: Mapping[str, np.ndarray]
    ) -> np.ndarray:
        """The model's input columns side by side (float64), in :attr:`inputs` order."""
        return np.column_stack([cols[c] for c in self.inputs]).astype("float64").reshape(n, -1)

    def _columns(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {name: x[:, j] for j, name in enumerate(self.inputs)}

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Churn: the family's probability; value: its expected spend over the horizon."""
        return family_predict(self.model, self._columns(x))  # type: ignore[arg-type]

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """The model's own per-feature contributions, without the bias column."""
        frame = self.model.contributions(self._columns(x))
        return frame.drop(columns="_bias").to_numpy(dtype="float64")


def compile_model(model: Estimator) -> CompiledModel | CompiledFamily:
    """The array scorer of a fitted model of any family."""
    if isinstance(model, ChurnModel | ValueModel):
        return CompiledModel(model)
    return CompiledFamily(model)


def _threads(rows: int) -> int:
    """LightGBM threads for a prediction: one for small inputs, its default (0) for big ones.

    ``Booster.predict`` ignores the ``num_threads`` the model was trained with and starts
    OpenMP's full pool; for one customer on a busy 2-core machine that made a prediction
    take 240 us instead of 25 us.
    """
    return 1 if rows <= SMALL_PREDICTION else 0


@dataclass
class Reason:
    """One feature's push on a prediction."""

    feature: str
    value: float | str | None
    contribution: float


@dataclass
class Scores:
    """Scores for ``n`` customers, column-wise."""

    churn_probability: np.ndarray
    risk_tier: np.ndarray
    predicted_value: np.ndarray
    p_alive: np.ndarray
    expected_purchases: np.ndarray
    expected_days_to_next_purchase: np.ndarray
    expected_next_purchase_date: np.ndarray  # datetime64[D], NaT when not expected
    segment: list[str | None]
    churn_reasons: list[list[Reason]] | None = None
    value_reasons: list[list[Reason]] | None = None

    def frame(self) -> pd.DataFrame:
        """The scores as a DataFrame (without reasons)."""
        return pd.DataFrame(
            {
                "churn_probability": self.churn_probability,
                "risk_tier": self.risk_tier,
                "predicted_value": self.predicted_value,
                "p_alive": self.p_alive,
                "expected_purchases": self.expected_purchases,
                "expected_days_to_next_purchase": self.expected_days_to_next_purchase,
                "expected_next_purchase_date": self.expected_next_purchase_date.astype(
                    "datetime64[s]"
                ),
                "segment": self.segment,
            }
        )


def _next_dates(as_of: np.ndarray, days: np.ndarray) -> np.ndarray:
    """``as_of`` + ceil(days) as ``datetime64[D]``; NaT where not expected."""
    ok = np.isfinite(days) & (days < MAX_EXPECTED_DAYS)
    whole = np.where(ok, np.ceil(np.where(ok, days, 0.0)), 0.0).astype("int64")
    dates = as_of + whole.astype("timedelta64[D]")
    dates[~ok] = np.datetime64("NaT")
    return dates


def _day_array(as_of: Sequence[dt.date | None] | np.ndarray | None, n: int) -> np.ndarray:
    if as_of is None:
        return np.full(n, np.datetime64("NaT"), dtype="datetime64[D]")
    return np.asarray(as_of, dtype="datetime64[D]")


class Scorer:
    """The churn and value models together: one answer per customer.

    Parameters
    ----------
    churn, value
        The loaded models.
    """

    def __init__(self, churn: LoadedModel, value: LoadedModel) -> None:
        if churn.model.task != "churn" or value.model.task != "clv":
            raise TypeError("Scorer needs a churn model and a value (clv) model")
        self.churn_version = churn.version
        self.value_version = value.version
        #: The currency of the amounts the models learnt from (None when unstated).
        self.currency: str | None = value.currency or churn.currency
        self.churn = compile_model(churn.model)
        self.value = compile_model(value.model)
        self.inputs: list[str] = list(dict.fromkeys([*self.churn.inputs, *self.value.inputs]))
        self.categorical: set[str] = (self.churn.categorical | self.value.categorical) & set(
            self.inputs
        )
        self.numeric: list[str] = [c for c in self.inputs if c not in self.categorical]
        self.nonnegative: set[str] = {c for c in self.numeric if is_nonnegative_feature(c)}
        # Positions in ``numeric``, for checking request rows as one matrix.
        self.input_set: frozenset[str] = frozenset(self.inputs)
        self.nonnegative_index: list[int] = [
            j for j, c in enumerate(self.numeric) if c in self.nonnegative
        ]
        self.required_numeric: list[tuple[int, str]] = [
            (j, c) for j, c in enumerate(self.numeric) if c in BTYD_INPUTS
        ]
        # BTYD outputs come from the value model when it has them: its horizon is the one
        # the predicted value is for.
        self.btyd_source = self.value if self.value.model.btyd_ is not None else self.churn
        self.known: set[str] = {"customer_id", "as_of", *self.inputs, *self._all_columns()}

    def _all_columns(self) -> list[str]:
        cols: list[str] = []
        for compiled in (self.churn, self.value):
            pairs = compiled.model.interaction_pairs_ or ()
            spec = FeatureSpec(windows=compiled.model.config.windows, interaction_pairs=pairs)
            cols += feature_columns(spec)
        return cols

    @property
    def interaction_pairs(self) -> tuple[tuple[str, str], ...] | None:
        """The pairs the models' interaction features were built from (None if unknown)."""
        pairs: set[tuple[str, str]] = set()
        for compiled in (self.churn, self.value):
            if compiled.model.interaction_pairs_ is None:
                return None
            pairs |= set(compiled.model.interaction_pairs_)
        return tuple(sorted(pairs))

    @property
    def windows(self) -> tuple[int, ...]:
        """Feature windows (days) of both models."""
        return tuple(
            sorted(set(self.churn.model.config.windows) | set(self.value.model.config.windows))
        )

    def columns_from_frame(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """Input arrays from a feature frame (``build_features`` output or a snapshot).

        Raises
        ------
        FeatureSchemaError
            Naming the missing columns.
        """
        missing = [c for c in self.inputs if c not in frame.columns]
        if missing:
            raise FeatureSchemaError(f"missing feature columns: {', '.join(missing)}")
        cols: dict[str, np.ndarray] = {}
        for c in self.numeric:
            try:
                cols[c] = pd.to_numeric(frame[c]).to_numpy(dtype="float64", na_value=np.nan)
            except (ValueError, TypeError) as err:
                raise FeatureSchemaError(f"feature column {c!r} must be numeric: {err}") from err
        for c in self.categorical:
            values = frame[c].astype("object")
            cols[c] = np.asarray(values.where(values.notna(), None), dtype="object")
        return cols

    def score(
        self,
        cols: Mapping[str, np.ndarray],
        n: int,
        *,
        as_of: Sequence[dt.date | None] | np.ndarray | None = None,
        segment: Sequence[str | None] | None = None,
        explain: int = 0,
        validated: bool = False,
    ) -> Scores:
        """Score ``n`` customers given column arrays of :attr:`inputs`.

        Parameters
        ----------
        cols
            ``{column: array}`` for every name in :attr:`inputs`: numbers as float64 (NaN
            missing), categories as object arrays of str or None.
        n
            Number of customers.
        as_of
            Each row's cutoff, for the expected next purchase date.
        segment
            Each row's RFM segment, echoed in the answer.
        explain
            How many reasons (largest absolute contributions) per model and customer.
        validated
            The rows passed :func:`rapport.serving.schemas.check_rows` (or come from the
            feature pipeline): skip BG/NBD's own input checks.
        """
        check = not validated
        churn_btyd = self.churn.btyd(cols, check=check)
        value_btyd = self.value.btyd(cols, check=check)
        x_churn = self.churn.matrix(cols, n, churn_btyd)
        x_value = self.value.matrix(cols, n, value_btyd)
        proba = self.churn.predict(x_churn)
        value = self.value.predict(x_value)
        churn_model = self.churn.model
        assert isinstance(churn_model, ChurnEstimator)
        tiers = churn_model.risk_tier(proba)
        btyd = value_btyd if self.btyd_source is self.value else churn_btyd
        h = self.btyd_source.horizon_days
        nan = np.full(n, np.nan)
        days = btyd.get("expected_days_to_next_purchase", nan)
        scores = Scores(
            churn_probability=proba,
            risk_tier=tiers,
            predicted_value=value,
            p_alive=btyd.get("p_alive", nan),
            expected_purchases=btyd.get(f"expected_purchases_{h}d", nan),
            expected_days_to_next_purchase=days,
            expected_next_purchase_date=_next_dates(_day_array(as_of, n), days),
            segment=list(segment) if segment is not None else [None] * n,
        )
        if explain > 0:
            scores.churn_reasons = self._reasons(self.churn, x_churn, cols, churn_btyd, explain)
            scores.value_reasons = self._reasons(self.value, x_value, cols, value_btyd, explain)
        return scores

    @staticmethod
    def _reasons(
        compiled: CompiledModel | CompiledFamily,
        x: np.ndarray,
        cols: Mapping[str, np.ndarray],
        btyd: Mapping[str, np.ndarray],
        k: int,
    ) -> list[list[Reason]]:
        contrib = compiled.contributions(x)
        k = min(k, contrib.shape[1])
        top = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :k]
        out: list[list[Reason]] = []
        for i, idx in enumerate(top):
            reasons = []
            for j in idx:
                name = compiled.features[j]
                raw = btyd[name][i] if name in btyd else cols[name][i]
                value: float | str | None
                if raw is None or isinstance(raw, str):
                    value = raw
                else:
                    value = float(raw) if np.isfinite(raw) else None
                reasons.append(Reason(name, value, float(contrib[i, j])))
            out.append(reasons)
        return out

    def score_frame(self, frame: pd.DataFrame, *, explain: int = 0) -> Scores:
        """Score the rows of a feature frame (``as_of`` and ``segment`` used if present)."""
        cols = self.columns_from_frame(frame)
        as_of = None
        if "as_of" in frame.columns:
            as_of = pd.to_datetime(frame["as_of"]).to_numpy().astype("datetime64[D]")
        segment = None
        if "segment" in frame.columns:
            seg = frame["segment"].astype("object")
            segment = [str(s) if pd.notna(s) else None for s in seg]
        return self.score(cols, len(frame), as_of=as_of, segment=segment, explain=explain)
