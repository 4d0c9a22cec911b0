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

    # No type hints on purpose: MLflow would build a schema from them; the logged signature
    # (from a real input example) is the schema.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        """Scores for feature rows (see :func:`rapport.training.models.score_frame`)."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return score_frame(self.model, frame).reset_index(drop=True)

    def contributions(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Per-row feature contributions of the underlying LightGBM model."""
        return self.model.contributions(frame)
