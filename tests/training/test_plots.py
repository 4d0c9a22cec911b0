from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from rapport.training.plots import calibration_plot, decile_plot, gain_plot, importance_plot


@pytest.fixture(scope="module")
def churn():
    rng = np.random.default_rng(0)
    y = rng.binomial(1, 0.3, 500)
    good = np.clip(0.3 + 0.4 * (y - 0.3) + rng.normal(0, 0.15, y.size), 0, 1)
    return y, {"lightgbm": good, "random": rng.random(y.size)}


@pytest.fixture(scope="module")
def value():
    rng = np.random.default_rng(1)
    y = rng.lognormal(3, 1, 400) * (rng.random(400) < 0.5)
    return y, {"ziln": y * rng.lognormal(0, 0.4, y.size) + 1, "mean": np.full(y.size, y.mean())}


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _saves(fig, tmp_path, name):
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibration_plot(churn, tmp_path):
    y, probs = churn
    fig = calibration_plot(y, probs)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 1 + len(probs)  # diagonal + one curve per model
    assert _legend(ax) == ["perfectly calibrated", "lightgbm", "random"]
    assert ax.get_title() == "Calibration"
    assert ax.get_xlabel() and ax.get_ylabel()
    _saves(fig, tmp_path, "calibration")


def test_gain_plot(churn, tmp_path):
    y, scores = churn
    fig = gain_plot(y, scores)
    gain_ax, lift_ax = fig.axes
    assert len(gain_ax.get_lines()) == 1 + len(scores)
    curve = gain_ax.get_lines()[1]
    assert len(curve.get_xdata()) == 11  # origin + 10 bins, ending at (1, 1)
    assert curve.get_xdata()[-1] == pytest.approx(1) and curve.get_ydata()[-1] == pytest.approx(1)
    assert len(_bars(lift_ax)) == 10 * len(scores)
    assert _legend(gain_ax) == ["random", "lightgbm", "random"]
    assert _legend(lift_ax) == ["no lift", "lightgbm", "random"]
    assert gain_ax.get_title() == "Cumulative gain" and lift_ax.get_title() == "Lift by bin"
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    assert len(_bars(gain_plot(y, scores, n_bins=5).axes[1])) == 5 * len(scores)
    _saves(fig, tmp_path, "gain")


def test_decile_plot(value, tmp_path):
    y, preds = value
    fig = decile_plot(y, preds)
    assert len(fig.axes) == len(preds)
    for ax, name in zip(fig.axes, preds, strict=True):
        assert len(_bars(ax)) == 20  # actual + predicted for each decile
        assert _legend(ax) == ["actual", "predicted"]
        assert ax.get_title() == name
        assert ax.get_xlabel()
    assert fig.axes[0].get_ylabel()
    assert fig.get_suptitle() == "Mean value by predicted decile"
    assert len(decile_plot(y, {"only": preds["ziln"]}).axes) == 1
    _saves(fig, tmp_path, "decile")


def test_importance_plot(tmp_path):
    names = [f"f{i}" for i in range(30)]
    importances = np.arange(30.0)
    fig = importance_plot(names, importances, top=5, label="gain")
    (ax,) = fig.axes
    bars = _bars(ax)
    assert len(bars) == 5
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["f25", "f26", "f27", "f28", "f29"]  # largest at the top
    assert [b.get_width() for b in bars] == [25, 26, 27, 28, 29]
    assert ax.get_title() == "Top 5 features by gain"
    assert ax.get_xlabel() == "gain" and ax.get_ylabel() == "Feature"
    assert _legend(ax) == ["gain"]
    assert len(_bars(importance_plot(names[:3], [1, 3, 2]).axes[0])) == 3  # fewer than top
    _saves(fig, tmp_path, "importance")


def test_plot_validation(churn, value):
    y, _ = churn
    with pytest.raises(ValueError, match="probs must name at least one model"):
        calibration_plot(y, {})
    with pytest.raises(ValueError, match="scores must name at least one model"):
        gain_plot(y, {})
    with pytest.raises(ValueError, match="preds must name at least one model"):
        decile_plot(value[0], {})
    with pytest.raises(ValueError, match="p must lie in"):
        calibration_plot(y, {"bad": np.full(y.size, 2.0)})
    with pytest.raises(ValueError, match="one value per name"):
        importance_plot(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="names is empty"):
        importance_plot([], [])
    with pytest.raises(ValueError, match="NaN"):
        importance_plot(["a"], [np.nan])
    with pytest.raises(ValueError, match="top must be a positive integer"):
        importance_plot(["a"], [1.0], top=0)


def test_plots_never_import_pyplot():
    code = (
        "import sys, numpy as np\n"
        "from rapport.training.plots import importance_plot\n"
        "importance_plot(['a'], [1.0]).savefig(__import__('io').BytesIO(), format='png')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
