"""The MLflow wrapper imports quietly (the models it wraps are tested in test_pipeline)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_wrapper_prints_no_mlflow_warning():
    # every rapport command imports it: an unannotated predict made MLflow print a yellow
    # "Add type hints to the `predict` method" warning before each command's own output
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import rapport.training.pyfunc"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "predict" not in done.stderr, done.stderr
