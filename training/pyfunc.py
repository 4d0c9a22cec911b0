"""The MLflow ``pyfunc`` wrapper that makes a registered model self-contained.

The wrapped estimator, of any family (:mod:`rapport.training.candidates`), carries its
preprocessing, BTYD sub-models and feature order, so a client sends feature rows (extra
columns are ignored) and gets scores back; serving can also ``unwrap_python_model()`` to
reach the model's own prediction and ``contributions`` methods.
"""

from __future__ import annotations

import pandas as pd
from mlflow.pyfunc import PythonModel

from rapport.training.candidates import Estimator, family_of, score_rows
from rapport.training.models import input_columns


class RapportModel(PythonModel):
    """A fitted model of any family behind MLflow's interface."""

    def __init__(self, model: Estimator) -> None:
        self.model = model
        self.task = model.config.task
        self.family = family_of(model)
        self.horizon_days = model.config.horizon_days
        self.input_columns = input_columns(model)

    # A DataFrame hint is one MLflow builds no schema from (the logged signature, from a real
    # input example, stays the schema); without a hint it warns on every import of this class.
    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> pd.DataFrame:
        """Scores for feature rows (see :func:`rapport.training.candidates.score_rows`)."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return score_rows(self.model, frame).reset_index(drop=True)

    def contributions(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Per-row feature contributions of the underlying model (its own method)."""
        return self.model.contributions(frame)
