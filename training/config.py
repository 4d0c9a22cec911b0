"""Training configuration: one YAML file per model, loaded into frozen pydantic models.

The shipped defaults live in ``training/configs/{churn,clv}.yaml``; a user's own file has the
same shape. A few fields can be overridden from the command line
(:func:`load_config` takes ``overrides`` as dotted paths, e.g. ``{"horizon_days": 60}``).
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Task = Literal["churn", "clv"]

#: Metrics the gate can look at, and whether higher is better.
GATE_METRICS: dict[str, bool] = {
    "roc_auc": True,
    "pr_auc": True,
    "brier": False,
    "log_loss": False,
    "ece": False,
    "gini": True,
    "spearman": True,
    "decile_mape": False,
    "mae": False,
    "rmse": False,
}


#: Which of those metrics each task's evaluation computes.
TASK_METRICS: dict[str, frozenset[str]] = {
    "churn": frozenset({"roc_auc", "pr_auc", "brier", "log_loss", "ece"}),
    "clv": frozenset({"gini", "spearman", "decile_mape", "mae", "rmse"}),
}

#: Model families of each task (see :mod:`rapport.training.candidates`).
TASK_FAMILIES: dict[str, tuple[str, ...]] = {
    "churn": ("lightgbm", "logistic", "bgnbd", "pnbd"),
    "clv": ("lightgbm", "bgnbd_gg", "two_part"),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CutoffConfig(_Frozen):
    """Which cutoffs the training set is built at.

    Either ``dates`` lists them, or ``count`` month-ends ``every_months`` apart ending at
    ``last`` (default: the latest month-end whose horizon is fully inside the data). Which
    rows of which cutoffs train, validate and test is :class:`SplitConfig`'s.
    """

    dates: tuple[dt.date, ...] | None = None
    count: int = Field(default=12, ge=1, description="Cutoffs when `dates` is not given.")
    every_months: int = Field(default=1, ge=1, description="Months between generated cutoffs.")
    last: dt.date | None = None

    @field_validator("dates")
    @classmethod
    def _sorted_unique(cls, value: tuple[dt.date, ...] | None) -> tuple[dt.date, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one cutoff")
        return tuple(sorted(set(value)))

    @property
    def number(self) -> int:
        """How many cutoffs this asks for."""
        return len(self.dates) if self.dates is not None else self.count


class SplitConfig(_Frozen):
    """How the labelled rows are split into training, validation and test.

    ``time`` (the default): out of time, by cutoff: the last cutoff tests, the latest one whose
    horizon ends by it validates, earlier ones train (at least 3 cutoffs, so the history must
    span about two horizons). ``customers``: for histories too short for that (CDNOW's 18
    months and a 39-week horizon, or a year of data and a 365-day value horizon): a seeded
    ``test_fraction`` of the customers, drawn from a hash of their ids, is held out at the last
    cutoff for test and a ``valid_fraction`` for validation, and the other customers train at
    every cutoff. Customer-disjoint but not out of time: training horizons may overlap the
    test horizon, so a market-wide shift in that period is not tested for.
    """

    by: Literal["time", "customers"] = "time"
    valid_fraction: float = Field(default=0.2, gt=0, lt=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    #: Keys the customers' draw. Its own, not the model's ``seed``: a retrain with another
    #: seed keeps the held-out customers, so the gate scores the champion on customers
    #: neither model trained on.
    holdout_seed: int = 0

    @model_validator(mode="after")
    def _room_to_train(self) -> SplitConfig:
        if self.valid_fraction + self.test_fraction > 0.8:
            raise ValueError("valid_fraction + test_fraction must leave at least 20% to train")
        return self


class GateConfig(_Frozen):
    """When a new model may take the ``champion`` alias.

    It must reach ``min_value`` on ``metric`` on the test cutoff and beat the current champion,
    scored on the same test rows, by at least ``min_improvement``.
    """

    metric: str
    min_value: float | None = None
    min_improvement: float = 0.0

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in GATE_METRICS:
            raise ValueError(f"unknown gate metric {value!r}; choose from {sorted(GATE_METRICS)}")
        return value

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger value of the metric is better."""
        return GATE_METRICS[self.metric]


@functools.cache
def lightgbm_parameter_names() -> dict[str, frozenset[str]]:
    """Every parameter the installed LightGBM booster knows, with its aliases.

    Read from LightGBM's own table (``LGBM_DumpParamAliases``, through a private helper of its
    Python package); empty if that helper is gone, which turns the check off rather than
    refusing valid configs.
    """
    try:
        from lightgbm.basic import _ConfigAliases

        aliases: dict[str, list[str]] = _ConfigAliases._get_all_param_aliases()
    except (ImportError, AttributeError):  # pragma: no cover - a future LightGBM
        return {}
    return {name: frozenset(names) for name, names in aliases.items()}


class LightGBMConfig(_Frozen):
    """LightGBM parameters (anything in ``params`` goes to the booster as is)."""

    num_boost_round: int = Field(default=2000, ge=1)
    early_stopping_rounds: int = Field(default=100, ge=1)
    #: An improvement of the validation metric smaller than this does not count: AUC creeps up
    #: by 1e-5 a round for thousands of rounds, which buys nothing and costs minutes.
    early_stopping_min_delta: float = Field(default=1e-4, ge=0.0)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _known_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        # the booster only warns of an unknown name (silenced at verbosity -1), so a typo such
        # as num_leafs would train with the default and nobody would know
        known = lightgbm_parameter_names()
        aliases = set(known).union(*known.values())
        for name in value:
            if known and name not in aliases:
                # canonical names first: num_leafs should point at num_leaves, not num_leaf
                close = difflib.get_close_matches(name, sorted(known), n=1) or (
                    difflib.get_close_matches(name, sorted(aliases), n=1)
                )
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown LightGBM parameter {name!r}{hint}")
        return value


class TuningConfig(_Frozen):
    """Hyper-parameter search before the final fit (see :mod:`rapport.training.tuning`)."""

    #: Optuna trials; 0 (the default) trains with the configured parameters as they are.
    trials: int = Field(default=0, ge=0)
    #: Stop starting new trials after this many seconds (``null``: no limit).
    timeout_seconds: float | None = Field(default=None, gt=0)
    #: Validation metric to optimise; ``null`` uses the gate's metric.
    metric: str | None = None

    @field_validator("metric")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        if value is not None and value not in GATE_METRICS:
            raise ValueError(f"unknown tuning metric {value!r}; choose from {sorted(GATE_METRICS)}")
        return value


class ModelConfig(_Frozen):
    """Everything one training run needs, from one YAML file."""

    task: Task
    registered_name: str = Field(description="MLflow registered model name.")
    experiment: str = "rapport"
    horizon_days: int = Field(gt=0)
    windows: tuple[int, ...] = (30, 90, 365)
    cutoffs: CutoffConfig = Field(default_factory=CutoffConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    seed: int = 42
    lightgbm: LightGBMConfig = Field(default_factory=LightGBMConfig)
    #: churn: ``isotonic`` or ``sigmoid`` probability calibration on the validation cutoff.
    calibration: Literal["isotonic", "sigmoid", "none"] = "isotonic"
    #: churn: weigh classes to balance them while fitting (calibration then undoes the shift).
    balance_classes: bool = True
    #: clv: ``tweedie`` (one model) or ``two_part`` (P(purchase) x expected spend).
    value_model: Literal["tweedie", "two_part"] = "tweedie"
    #: Use BG/NBD (+ Gamma-Gamma) outputs as extra features.
    btyd_features: bool = True
    #: Monotone constraints by feature name (+1: the prediction never falls as the feature
    #: grows; -1: never rises). Unknown names are an error at fit time.
    monotone: dict[str, int] = Field(default_factory=dict)
    #: Cap on training rows (a seeded random sample of the training cutoffs): a million
    #: customers at a dozen cutoffs is more rows than the model needs. ``null`` keeps all.
    max_train_rows: int | None = Field(default=500_000, gt=0)
    #: Drop features by name (e.g. ones a data scientist found leaky or unstable).
    exclude_features: tuple[str, ...] = ()
    #: Families that may be selected and registered (``null``: every family of the task).
    #: The others are still fitted and scored, so they still bound the gate.
    selectable: tuple[str, ...] | None = None
    gate: GateConfig
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    #: Risk tiers for churn probability: upper bounds of ``low`` and ``medium``.
    risk_tiers: tuple[float, float] = (0.3, 0.6)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if sorted(set(self.windows)) != list(self.windows) or any(w <= 0 for w in self.windows):
            raise ValueError("windows must be positive, increasing and unique")
        if self.split.by == "time" and self.cutoffs.number < 3:
            field = "cutoffs.dates" if self.cutoffs.dates is not None else "cutoffs.count"
            raise ValueError(
                f"{field}: a time split needs at least 3 cutoffs (train, validation, test); "
                "give more, or hold out customers instead (split: {by: customers})"
            )
        bad = {k: v for k, v in self.monotone.items() if v not in (-1, 0, 1)}
        if bad:
            raise ValueError(f"monotone constraints must be -1, 0 or 1: {bad}")
        low, high = self.risk_tiers
        if not 0 < low < high < 1:
            raise ValueError("risk_tiers must satisfy 0 < low < high < 1")
        unknown = sorted(set(self.selectable or ()) - set(TASK_FAMILIES[self.task]))
        if unknown or self.selectable == ():
            raise ValueError(
                f"selectable: unknown {self.task} families {unknown}; choose from "
                f"{list(TASK_FAMILIES[self.task])}"
            )
        metric = self.tuning.metric or self.gate.metric
        if self.tuning.trials and metric not in TASK_METRICS[self.task]:
            raise ValueError(
                f"tuning metric {metric!r} is not a {self.task} metric; choose from "
                f"{sorted(TASK_METRICS[self.task])}"
            )
        return self

    @property
    def label(self) -> str:
        """The label column this model learns."""
        if self.task == "churn":
            return f"churned_{self.horizon_days}d"
        return f"future_spend_{self.horizon_days}d"


#: Overrides for a quick smoke run (few small trees, few cutoffs): tests, notebooks on small
#: data, checking a pipeline end to end before a real training.
QUICK_OVERRIDES: dict[str, Any] = {
    "lightgbm.num_boost_round": 40,
    "lightgbm.early_stopping_rounds": 10,
    "lightgbm.params.learning_rate": 0.2,
    "lightgbm.params.min_data_in_leaf": 20,
    "lightgbm.params.num_leaves": 15,
    "cutoffs.count": 8,
}


class ConfigError(ValueError):
    """A configuration file that cannot be used, with the field that is wrong."""


def default_config_path(task: Task) -> Path:
    """The shipped YAML file for ``task``."""
    ref = resources.files("rapport.training").joinpath("configs", f"{task}.yaml")
    return Path(str(ref))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def load_config(source: Task | str | Path, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """Load a model config from YAML.

    Parameters
    ----------
    source
        ``"churn"`` or ``"clv"`` for the shipped defaults, or a path to a YAML file.
    overrides
        Dotted field paths and values applied on top (``None`` values are skipped), e.g.
        ``{"horizon_days": 60, "cutoffs.count": 6}``.

    Returns
    -------
    ModelConfig

    Raises
    ------
    ConfigError
        Naming the file and the field that is missing or wrong.
    """
    path = default_config_path(source) if source in ("churn", "clv") else Path(source)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of fields")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"config file {path}: {problems}") from err
