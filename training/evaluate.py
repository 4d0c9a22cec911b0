"""Scoring a registered model at one cutoff, beside the BTYD baseline fitted there.

``rapport evaluate`` reads a version back from the registry and measures it on any cutoff
whose horizon is in the data; the caveat says when the model saw outcomes of that horizon
while training, so the figures flatter it.
"""

from __future__ import annotations

import datetime as dt

import mlflow
import pandas as pd

from rapport.features.contracts import TableSource, load_interactions, load_transactions
from rapport.training import tracking
from rapport.training.btyd_features import BTYDFeatures
from rapport.training.config import ModelConfig
from rapport.training.metrics import churn_metrics, value_metrics
from rapport.training.pipeline import labelled_rows, model_inputs
from rapport.training.settings import TrainingSettings


def evaluate_registered(
    config: ModelConfig,
    model_uri: str,
    transactions: TableSource,
    interactions: TableSource | None = None,
    *,
    as_of: str,
    settings: TrainingSettings | None = None,
) -> pd.DataFrame:
    """Score a registered model on one cutoff, beside the BTYD baseline fitted there.

    Parameters
    ----------
    config
        Config of the model's task (label and horizon).
    model_uri
        E.g. ``models:/rapport-churn@champion`` or ``models:/rapport-churn/3``.
    transactions, interactions
        Data to evaluate on.
    as_of
        The cutoff; its whole horizon must lie inside the data.

    Returns
    -------
    pandas.DataFrame
        Models as rows (``registered``, and ``bgnbd`` or ``bgnbd_gg``), metrics as columns;
        ``attrs["caveat"]`` says why the figures flatter the model, when its training saw
        outcomes inside this cutoff's horizon (see :func:`seen_until`), else it is absent.
    """
    settings = settings or TrainingSettings()
    tracking.configure(settings)
    loaded = mlflow.pyfunc.load_model(model_uri)
    model = loaded.unwrap_python_model()
    # the features the model was trained on (its windows and interaction pairs), whatever
    # the config at hand says: the config gives the label and horizon
    try:
        source, pairs = model_inputs(model.model, interactions)
    except tracking.NotComparableError as error:
        raise ValueError(f"{model_uri}: {error}") from error
    ix = load_interactions(source) if source is not None else None
    frame = labelled_rows(
        config,
        load_transactions(transactions),
        ix,
        [as_of],
        settings,
        windows=tuple(model.model.config.windows),
        interaction_pairs=pairs,
    )
    scores = model.predict(None, frame)
    h = config.horizon_days
    fitted = BTYDFeatures(h, seed=config.seed).fit(frame)
    btyd = fitted.transform(frame)
    rows: dict[str, dict[str, float]] = {}
    if config.task == "churn":
        y = frame[config.label].astype("int8").to_numpy()
        rows["registered"] = churn_metrics(y, scores["churn_probability"].to_numpy())
        if fitted.dropped_reason_ is None:
            rows["bgnbd"] = churn_metrics(y, btyd[f"p_no_purchase_{h}d"].to_numpy())
    else:
        actual = frame[config.label].to_numpy(dtype="float64")
        rows["registered"] = value_metrics(actual, scores["predicted_value"].to_numpy())
        if fitted.dropped_reason_ is None:
            rows["bgnbd_gg"] = value_metrics(actual, btyd[f"btyd_value_{h}d"].to_numpy())
    table = pd.DataFrame.from_dict(rows, orient="index")
    params = mlflow.MlflowClient().get_run(loaded.metadata.run_id).data.params
    seen = seen_until(params)
    if seen is not None and pd.Timestamp(as_of).date() < seen:
        table.attrs["caveat"] = (
            f"{model_uri} saw outcomes up to {seen} while training ({params.get('split')}): "
            f"these figures at {as_of} include what it learned from, so they flatter it; "
            f"evaluate at {seen} or later for an out-of-sample reading"
        )
    return table


def seen_until(params: dict[str, str]) -> dt.date | None:
    """The last day of outcomes a training run's labels covered (None if not recorded).

    Its training and validation cutoffs plus the horizon: a cutoff on or after it is out of
    sample for every customer; an earlier one overlaps what the model learned from (for a
    customer split, the training customers' outcomes at the same dates).
    """
    try:
        cutoffs = [dt.date.fromisoformat(c) for c in params["train_cutoffs"].split(",")]
        cutoffs.append(dt.date.fromisoformat(params["valid_cutoff"]))
        horizon = int(params["horizon_days"])
    except (KeyError, ValueError):
        return None
    return max(cutoffs) + dt.timedelta(days=horizon)
