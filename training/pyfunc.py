"""The MLflow ``pyfunc`` wrapper that makes a registered model self-contained.

The wrapped estimator carries its preprocessing, BTYD sub-models and feature order, so a
client sends feature rows (extra columns are ignored) and gets scores back; serving can also
``unwrap_python_model()`` to reach ``contributions`` for explanations.
"""

from __future__ import annotations

import pandas as pd
from mlflow.pyfunc import PythonModel

from rapport.training.models import ChurnModel, ValueModel, input_columns, score_frame


class RapportModel(PythonModel):
    """A fitted :class:`ChurnModel` or :class:`ValueModel` behind MLflow's interface."""

    def __init__(self, model: ChurnModel | ValueModel) -> None:
        self.model = model
        self.task = model.config.task
        self.horizon_days = model.config.horizon_days
        self.input_columns = input_columns(model)

    # A DataFrame hint is one MLflow builds no schema from (the logged signature, from a real
    # input example, stays the schema); without a hint it warns on every import of this class.
    def predict(
        self, context: object, model_input: pd.DataFrame, params: dict[str, object] | None = None
    ) -> pd.DataFrame:
        """Scores for feature rows (see :func:`rapport.training.models.score_frame`)."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return score_frame(self.model, frame).reset_index(drop=True)

    def contributions(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Per-row feature contributions of the underlying LightGBM model."""
        return self.model.contributions(frame)
