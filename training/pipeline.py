"""The training job: data -> out-of-time training set -> models and baselines -> MLflow.

:func:`fit_and_evaluate` is pure (frames in, fitted models and metrics out) so the CDNOW
benchmark and the tests use it without MLflow; :func:`train` wraps it in an MLflow run, logs
everything, registers the model and applies the champion/challenger gate last, so a run that
fails at any step leaves the champion where it was.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.data.pandas_dataset import from_pandas
from mlflow.models import infer_signature

from rapport.features.build import build_features, connect, discover_interaction_pairs
from rapport.features.contracts import TableSource, load_interactions, load_transactions
from rapport.features.load_report import LoadReport
from rapport.training import plots, tracking, tuning
from rapport.training.candidates import Estimator, family_of
from rapport.training.config import GATE_METRICS, ModelConfig
from rapport.training.datasets import (
    TrainingSplit,
    build_training_set,
    resolve_cutoffs,
    split_rows,
)
from rapport.training.metrics import churn_metrics, value_metrics
from rapport.training.models import input_columns
from rapport.training.pyfunc import RapportModel
from rapport.training.selection import (
    Evaluation,
    evaluate_candidates,
    log_selection,
    summary_lines,
)
from rapport.training.settings import TrainingSettings

#: Rows MLflow looks at to type the logged data sets' columns.
SCHEMA_ROWS = 10_000
#: Key of the training frame's ``attrs`` holding the load reports of its inputs.
LOADS = "loads"
#: Key of the training frame's ``attrs`` holding the interaction pairs its features used.
INTERACTION_PAIRS = "interaction_pairs"

StepFn = Callable[[str], AbstractContextManager[Any]]


@contextlib.contextmanager
def _quiet_step(_: str) -> Iterator[None]:
    yield


def fit_and_evaluate(
    config: ModelConfig, train: pd.DataFrame, valid: pd.DataFrame, test: pd.DataFrame
) -> Evaluation:
    """Fit LightGBM and the baseline families, select one on ``valid``, score all on ``test``.

    See :func:`rapport.training.selection.evaluate_candidates`: churn candidates are
    ``lightgbm``, ``logistic`` (log RFM), ``bgnbd`` (P(no purchase in the horizon)) and
    ``pnbd`` (1 - P(alive)), with the rank-only references ``bgnbd_rank`` and ``pnbd_rank``;
    value candidates are ``lightgbm``, ``bgnbd_gg`` (expected purchases x Gamma-Gamma spend)
    and ``two_part``. Every one is fitted on the training rows, so what is measured on test
    is what would be registered and served.
    """
    return evaluate_candidates(config, train, valid, test)


def _figures(evaluation: Evaluation, task: str) -> dict[str, Any]:
    y, preds = evaluation.y_test, evaluation.predictions
    # the LightGBM model's gains, whichever family is selected: it is the one with many inputs
    importance = evaluation.lightgbm.feature_importance()
    figures = {
        "feature_importance.png": plots.importance_plot(
            list(importance.index), importance.to_numpy()
        )
    }
    if task == "churn":
        probs = {k: v for k, v in preds.items() if not k.endswith("_rank")}
        figures["calibration.png"] = plots.calibration_plot(y, probs)
        figures["gain.png"] = plots.gain_plot(y, probs)
    else:
        figures["deciles.png"] = plots.decile_plot(y, preds)
    return figures


def frame_digest(frame: pd.DataFrame) -> str:
    """A content digest of every row and column (lineage: same digest, same data).

    MLflow's own digest maps ``type`` over every cell of the frame in Python (a minute for
    half a million rows of features) and hashes only the first 10,000 rows; this one hashes
    everything, vectorised.
    """
    hashes = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    digest = hashlib.md5(hashes.tobytes(), usedforsecurity=False)
    digest.update(",".join(map(str, frame.columns)).encode())
    return digest.hexdigest()[:16]


def _flat_params(config: ModelConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = (
                value if not isinstance(value, list | tuple) else ",".join(map(str, value))
            )

    walk("", config.model_dump(mode="json"))
    return flat


def _input_example(model: Estimator, frame: pd.DataFrame) -> pd.DataFrame:
    """A few feature rows as ``build_features`` types them (categories sent as strings)."""
    example = frame[input_columns(model)].head(5).copy()
    for col in example.columns:
        if not pd.api.types.is_numeric_dtype(example[col]):
            example[col] = example[col].astype("string").astype(object)
    return example.reset_index(drop=True)


def _requirements() -> list[str]:
    reqs = []
    for package in ("lightgbm", "scikit-learn", "scipy", "pandas", "numpy", "pyarrow"):
        try:
            reqs.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return reqs


@dataclass(frozen=True)
class TrainingResult:
    """What a training run produced."""

    run_id: str
    registered_name: str
    version: str
    promoted: bool
    gate_reason: str
    metrics: pd.DataFrame
    split: TrainingSplit
    #: The family registered (chosen on the validation rows).
    selected: str = "lightgbm"
    #: Lines for people: the selection, unusable baselines, the gain over the best baseline.
    notes: tuple[str, ...] = ()


def _score_with(config: ModelConfig) -> Callable[[Any, pd.DataFrame], float]:
    def score(model: Any, test: pd.DataFrame) -> float:
        out = model.predict(None, test)
        if config.task == "churn":
            y = test[config.label].astype("int8").to_numpy()
            return churn_metrics(y, out["churn_probability"].to_numpy())[config.gate.metric]
        actual = test[config.label].to_numpy(dtype="float64")
        return value_metrics(actual, out["predicted_value"].to_numpy())[config.gate.metric]

    return score


def model_inputs(
    model: Estimator, interactions: TableSource | None
) -> tuple[TableSource | None, tuple[tuple[str, str], ...] | None]:
    """The interactions and pinned ``(channel, event)`` pairs a trained model's features need.

    Raises
    ------
    tracking.NotComparableError
        The model reads interaction features and ``interactions`` is None.
    """
    pairs = model.interaction_pairs_
    if pairs is None:  # not recorded with the model: the pairs the data has
        return interactions, None
    if not pairs:
        return None, None
    if interactions is None:
        raise tracking.NotComparableError("it reads interaction features and none were given")
    return interactions, tuple(pairs)


def _champion_rows(
    champion: Any,
    config: ModelConfig,
    transactions: TableSource,
    interactions: TableSource | None,
    test_rows: pd.DataFrame,
) -> pd.DataFrame:
    """The test cutoff's rows as a champion with another feature spec reads them.

    Its own windows and interaction pairs over the run's data, at the run's test cutoff,
    with the run's labels: the same customers and targets, so the gate still compares like
    with like after a config changes the features.
    """
    model = champion.model  # the pyfunc wrapper's model, of any family
    ix, pairs = model_inputs(model, interactions)
    features = build_features(
        load_transactions(transactions),
        load_interactions(ix) if ix is not None else None,
        as_of=pd.Timestamp(test_rows["as_of"].iloc[0]).date().isoformat(),
        windows=model.config.windows,
        interaction_pairs=pairs,
        validate=False,
    )
    labels = test_rows[["customer_id", "as_of", config.label]]
    return features.merge(labels, on=["customer_id", "as_of"], validate="one_to_one")


def prepare_training_set(
    config: ModelConfig,
    transactions: TableSource,
    interactions: TableSource | None = None,
    *,
    settings: TrainingSettings | None = None,
) -> tuple[pd.DataFrame, TrainingSplit]:
    """Load and validate inputs, pick cutoffs, build the labelled rows of the split.

    Returns
    -------
    (pandas.DataFrame, TrainingSplit)
        Rows at the train, validation and test cutoffs only; ``attrs["interaction_pairs"]``
        holds the ``(channel, event)`` pairs the interaction features were built from.
    """
    settings = settings or TrainingSettings()
    tx = load_transactions(transactions)
    ix = load_interactions(interactions) if interactions is not None else None
    cutoffs = resolve_cutoffs(
        config.cutoffs,
        horizon_days=config.horizon_days,
        last_event_day=pd.Timestamp(tx["timestamp"].max()).date(),
        first_event_day=_first_purchase_day(tx),
    )
    split = split_rows(cutoffs, config.horizon_days, config.split)
    used = sorted({*split.train, split.valid, split.test})
    frame = labelled_rows(config, tx, ix, used, settings)
    frame.attrs[INTERACTION_PAIRS] = discover_interaction_pairs(ix) if ix is not None else ()
    frame.attrs[LOADS] = {
        prefix: report.to_attrs()
        for prefix, table in (("tx", tx), ("ix", ix))
        if table is not None and (report := LoadReport.of(table)) is not None
    }
    return frame, split


def _first_purchase_day(tx: pd.DataFrame) -> dt.date:
    """The day of the first purchase (a refund alone gives a customer no feature row)."""
    purchases = tx.loc[tx["amount"] >= 0, "timestamp"]
    stamps = purchases if not purchases.empty else tx["timestamp"]
    return pd.Timestamp(stamps.min()).date()


def labelled_rows(
    config: ModelConfig,
    tx: pd.DataFrame,
    ix: pd.DataFrame | None,
    cutoffs: list[dt.date] | list[str],
    settings: TrainingSettings,
    *,
    windows: tuple[int, ...] | None = None,
    interaction_pairs: tuple[tuple[str, str], ...] | None = None,
) -> pd.DataFrame:
    """Features and labels at ``cutoffs`` on one DuckDB connection set up from settings.

    The config's windows unless ``windows`` (a trained model's) are given.
    """
    con = connect(threads=settings.duckdb_threads, memory_limit=settings.duckdb_memory_limit)
    try:
        return build_training_set(
            tx,
            ix,
            cutoffs=cutoffs,
            horizon_days=config.horizon_days,
            windows=config.windows if windows is None else windows,
            interaction_pairs=interaction_pairs,
            validate=False,
            connection=con,
        )
    finally:
        con.close()


def split_frame(
    frame: pd.DataFrame, split: TrainingSplit
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train, validation and test rows of a training set (see :class:`TrainingSplit`)."""
    return split.parts(frame)


def train(
    config: ModelConfig,
    transactions: TableSource,
    interactions: TableSource | None = None,
    *,
    source: str | None = None,
    settings: TrainingSettings | None = None,
    step: StepFn = _quiet_step,
) -> TrainingResult:
    """Train one model, track it in MLflow, register it and apply the gate.

    Runs of the experiment left RUNNING by a killed training process are ended as KILLED
    first (:func:`~rapport.training.tracking.close_dead_runs`). The aliases move only once
    the run has ended FINISHED: a run that fails, is stopped by a signal or is killed leaves
    both where they were, and its registered version (if any) without an alias.

    Parameters
    ----------
    config
        The model config.
    transactions, interactions
        Paths or frames.
    source
        Where the data came from, for lineage (defaults to the paths given).
    settings
        Environment settings (read from the environment by default).
    step
        A context-manager factory for progress display, called with each step's title.

    Returns
    -------
    TrainingResult
    """
    settings = settings or TrainingSettings()
    tracking.configure(settings)
    experiment_id = tracking.ensure_experiment(config.experiment, settings)
    tracking.close_dead_runs([experiment_id])
    if source is None:
        source = str(transactions) if isinstance(transactions, str | Path) else "dataframe"
    with step("Building the labelled training set"):
        frame, split = prepare_training_set(config, transactions, interactions, settings=settings)
        parts = split_frame(frame, split)
        pairs = frame.attrs.get(INTERACTION_PAIRS, ())
        loads = {k: LoadReport.from_attrs(v) for k, v in frame.attrs.get(LOADS, {}).items()}
        del frame
        rows_available = len(parts[0])
        train_rows, valid_rows, test_rows = parts = _capped(config, parts)
    with tracking.open_run(experiment_id, f"{config.task}-{split.test}") as run:
        currency = _log_inputs(config, split, parts, source, loads, rows_available)
        if config.tuning.trials:
            with step(f"Tuning the {config.task} model ({config.tuning.trials} trials)"):
                config = _tuned(config, train_rows, valid_rows)
        with step(f"Fitting the {config.task} model and its baselines"):
            evaluation = fit_and_evaluate(config, train_rows, valid_rows, test_rows)
        # Serving computes features from a posted history: it needs the interaction pairs
        # the model saw, not those that happen to be in one customer's events.
        evaluation.model.interaction_pairs_ = pairs
        mlflow.log_metric("best_iteration", evaluation.lightgbm.best_iteration_)
        log_selection(evaluation)
        with step(f"Logging plots and the {evaluation.selected} model"):
            log_artifacts(evaluation, config)
            new_version = _log_model(evaluation, config, test_rows, str(split.test), currency)
        with step("Comparing with the champion and the best baseline"):
            decision = _gate(evaluation, config, transactions, interactions, test_rows)
        _log_decision(config, new_version, decision, str(split.test))
    # The run has ended FINISHED: only now do the aliases move.
    tracking.set_alias(config.registered_name, tracking.CHALLENGER, new_version)
    if decision.promote:
        tracking.set_alias(config.registered_name, tracking.CHAMPION, new_version)
    return TrainingResult(
        run_id=run.info.run_id,
        registered_name=config.registered_name,
        version=new_version,
        promoted=decision.promote,
        gate_reason=decision.reason,
        metrics=evaluation.table(),
        split=split,
        selected=evaluation.selected,
        notes=tuple(summary_lines(evaluation)),
    )


Parts = tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]


def _capped(config: ModelConfig, parts: Parts) -> Parts:
    """The parts, with the training rows sampled down to ``config.max_train_rows``."""
    train_rows, valid_rows, test_rows = parts
    if config.max_train_rows is not None and len(train_rows) > config.max_train_rows:
        train_rows = train_rows.sample(config.max_train_rows, random_state=config.seed)
    return train_rows, valid_rows, test_rows


def _log_inputs(
    config: ModelConfig,
    split: TrainingSplit,
    parts: Parts,
    source: str,
    loads: dict[str, LoadReport],
    rows_available: int,
) -> str | None:
    """Log the config, the split, the loads and the three data sets; the data's currency."""
    mlflow.set_tags(
        {"rapport.task": config.task, "rapport.registered_name": config.registered_name}
    )
    mlflow.log_params(_flat_params(config))
    mlflow.log_params(
        {
            "train_cutoffs": ",".join(map(str, split.train)),
            "valid_cutoff": str(split.valid),
            "test_cutoff": str(split.test),
            "split": split.describe(),
            "data_source": source,
            "train_rows_available": rows_available,
        }
    )
    mlflow.log_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), "config.yaml")
    currency = _log_loads(loads)
    for role, part in zip(("train", "valid", "test"), parts, strict=True):
        dataset = from_pandas(
            part,
            digest=frame_digest(part),
            source=source,
            name=f"{config.task}-{role}",
            targets=config.label,
        )
        # MLflow infers the column types from every row (25 s at 550k rows) into a cached
        # property; the first rows give the same types.
        dataset.__dict__["schema"] = infer_signature(part.head(SCHEMA_ROWS)).inputs
        mlflow.log_input(dataset, context=role, tags={"rows": str(len(part))})
        mlflow.log_metric(f"rows_{role}", len(part))
    return currency


def _log_decision(
    config: ModelConfig, version: str, decision: tracking.GateDecision, test_cutoff: str
) -> None:
    """Record the gate's decision on the run and on the new version."""
    mlflow.set_tags({"rapport.gate": "pass" if decision.promote else "fail"})
    mlflow.log_text(decision.reason, "gate.txt")
    client = mlflow.MlflowClient()
    client.set_model_version_tag(config.registered_name, version, "gate", decision.reason)
    client.set_model_version_tag(config.registered_name, version, "test_cutoff", test_cutoff)


def _log_loads(loads: dict[str, LoadReport]) -> str | None:
    """Log what loading read, kept and dropped (metrics, ``load.txt``); the data's currency."""
    for prefix, report in loads.items():
        mlflow.log_metrics(report.as_metrics(prefix))
    if loads:
        mlflow.log_text("\n".join(r.line() for r in loads.values()) + "\n", "load.txt")
    currency = next((r.currency for r in loads.values() if r.currency), None)
    if currency:
        mlflow.log_param("currency", currency)
    return currency


def _log_model(
    evaluation: Evaluation,
    config: ModelConfig,
    test_rows: pd.DataFrame,
    test_cutoff: str,
    currency: str | None,
) -> str:
    """Log and register the selected model through the pyfunc; the new version's number."""
    model = evaluation.model
    example = _input_example(model, test_rows)
    wrapped = RapportModel(model)
    signature = infer_signature(example, wrapped.predict(None, example))
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=wrapped,
        signature=signature,
        input_example=example,
        registered_model_name=config.registered_name,
        pip_requirements=_requirements(),
        metadata={
            "task": config.task,
            "family": family_of(model),
            "horizon_days": config.horizon_days,
            "test_cutoff": test_cutoff,
            "feature_names": model.feature_names_,
            "currency": currency,
        },
    )
    return str(info.registered_model_version)


def _gate(
    evaluation: Evaluation,
    config: ModelConfig,
    transactions: TableSource,
    interactions: TableSource | None,
    test_rows: pd.DataFrame,
) -> tracking.GateDecision:
    """The gate's decision: the new version against the champion and the best baseline."""
    champion_value, champion_version, note = tracking.champion_value_on(
        config.registered_name,
        test_rows,
        _score_with(config),
        rows_for=lambda champion: _champion_rows(
            champion, config, transactions, interactions, test_rows
        ),
    )
    metric = config.gate.metric
    baseline = None
    if evaluation.baseline is not None:
        baseline = (evaluation.baseline, evaluation.metrics[evaluation.baseline][metric])
    return tracking.decide(
        config.gate,
        evaluation.metrics.get(evaluation.selected, {}).get(metric, float("nan")),
        champion_value,
        champion_version,
        note,
        baseline=baseline,
    )


def _tuned(config: ModelConfig, train: pd.DataFrame, valid: pd.DataFrame) -> ModelConfig:
    """Search parameters in nested runs; log the result; the config with the best ones.

    The search runs before anything is registered, so a search that fails (no trial
    finishes) fails the run and leaves the champion untouched.
    """
    result = tuning.tune(config, train, valid)
    tuned = tuning.with_params(config, result.best_params)
    mlflow.log_params({f"tuned.lightgbm.params.{k}": v for k, v in result.best_params.items()})
    mlflow.log_metric(f"tuning_best_valid_{result.metric}", result.best_value)
    mlflow.log_text(result.trials.to_csv(index=False), "tuning/trials.csv")
    mlflow.log_figure(
        plots.tuning_plot(
            result.trials["value"].to_numpy(dtype="float64"),
            metric=result.metric,
            higher_is_better=GATE_METRICS[result.metric],
        ),
        "plots/tuning.png",
    )
    mlflow.log_text(
        yaml.safe_dump(tuned.model_dump(mode="json"), sort_keys=False), "config_tuned.yaml"
    )
    return tuned


def log_artifacts(evaluation: Evaluation, config: ModelConfig) -> None:
    """Plots, the metrics table, feature list and importances of one run."""
    for filename, figure in _figures(evaluation, config.task).items():
        mlflow.log_figure(figure, f"plots/{filename}")
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "metrics.csv"
        evaluation.table().to_csv(table)
        mlflow.log_artifact(str(table))
    importance = evaluation.lightgbm.feature_importance()
    mlflow.log_text(json.dumps(evaluation.model.feature_names_, indent=1), "features.json")
    mlflow.log_text(importance.to_csv(header=["gain"]), "feature_importance.csv")
