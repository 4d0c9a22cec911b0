"""The retraining notebook runs end to end on a small world, so it cannot rot.

``notebooks/retraining.py`` (jupytext percent format) is converted to a notebook and executed
by a Jupyter kernel running this interpreter, with ``RAPPORT_HOME`` in a temporary folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

from mlflow import MlflowClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "retraining.py"


def _private_jupyter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``python3`` kernelspec that runs this interpreter, ahead of any user-level one."""
    data = tmp_path / "jupyter"
    spec = data / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (rapport tests)",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(data))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")


def _texts(nb: nbformat.NotebookNode) -> str:
    parts: list[str] = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                parts.append(output["text"])
            data = output.get("data", {})
            parts.extend(str(data[k]) for k in ("text/plain", "text/html") if k in data)
    return "\n".join(parts)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        for output in cell.get("outputs", [])
    )


def test_retraining_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("RAPPORT_HOME", str(home))
    monkeypatch.setenv("RAPPORT_NB_CUSTOMERS", "2000")
    monkeypatch.setenv("RAPPORT_NB_FAST", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _private_jupyter(tmp_path, monkeypatch)

    nb = jupytext.read(NOTEBOOK)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert "parameters" in nb.cells[1].metadata.get("tags", [])
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint('KERNEL', sys.executable)"))

    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / "retraining.ipynb")  # kept for a failing run's autopsy

    text = _texts(nb)
    assert f"KERNEL {sys.executable}" in text
    # The metric tables compare the model with its baselines.
    for name in ("lightgbm", "logistic", "bgnbd", "bgnbd_gg", "roc_auc", "gini"):
        assert name in text
    assert "test AUC logged" in text
    assert _images(nb) >= 10

    uri = f"sqlite:///{(home / 'mlflow.db').resolve()}"
    mlflow = MlflowClient(tracking_uri=uri, registry_uri=uri)
    churn = mlflow.get_registered_model("rapport-churn")
    assert len(mlflow.search_model_versions("name = 'rapport-churn'")) == 2
    assert {"champion", "challenger"} <= set(churn.aliases)
    champion = mlflow.get_model_version_by_alias("rapport-churn", "champion")
    # The notebook promotes by hand and rolls back to the gate's choice, tagged on the version;
    # when no churn version beat the best baseline on test, the hand-promoted one stays.
    assert any(why in champion.tags["promoted_by"] for why in ("roll back", "manual promotion"))
    assert "champion" in mlflow.get_registered_model("rapport-clv").aliases
    assert (home / "demo" / "transactions.parquet").exists()
    assert (home / "notebook" / "segments.png").exists()
