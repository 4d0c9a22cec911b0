"""The MLflow wrapper imports quietly (the models it wraps are tested in test_pipeline)."""

from __future__ import annotations

import warnings

from mlflow.pyfunc import PythonModel

from rapport.training.pyfunc import RapportModel


def test_the_wrappers_predict_gives_mlflow_nothing_to_warn_about():
    # every rapport command imports the wrapper: an unannotated predict made MLflow print a
    # yellow "Add type hints to the `predict` method" warning before each command's output.
    # MLflow checks a class's own predict when the class is made: make one around ours.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        type("Probe", (PythonModel,), {"predict": RapportModel.predict, "__module__": "probe"})
    assert not [w for w in caught if "predict" in str(w.message)]
