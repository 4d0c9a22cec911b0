"""The code installs under one namespace, editable and as a wheel, and claims no generic name."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_imports_from_the_checkout():
    import rapport.features
    import rapport.serving
    import rapport.training

    assert Path(rapport.features.__file__).parent == ROOT / "features"
    assert Path(rapport.training.__file__).parent == ROOT / "training"
    assert Path(rapport.serving.__file__).parent == ROOT / "serving"


def test_no_generic_top_level_names_are_claimed(tmp_path):
    # run from an unrelated folder so the checkout is not on sys.path
    code = (
        "import importlib.util as u;"
        "print([n for n in ('features', 'training', 'serving') if u.find_spec(n)])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_wheel_installs_under_the_namespace(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("rapport-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "rapport/features/build.py" in names
    assert "rapport/features/data/CDNOW_master.txt" in names
    assert "rapport/serving/cli.py" in names
    assert not [n for n in names if n.split("/")[0] in {"features", "training", "serving", "tests"}]
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    # -S skips site-packages' .pth files, so the editable finder cannot answer the import;
    # dependencies still come from the environment's site-packages directory.
    purelib = sysconfig.get_paths()["purelib"]
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]];"
        "import rapport.features.datasets as d, rapport.serving.cli;"
        "print(d.__file__); print(len(d.load_cdnow('sample')))"
    )
    run = subprocess.run(
        [sys.executable, "-S", "-c", code, str(target), purelib],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    file, rows = run.stdout.split()
    assert Path(file).is_relative_to(target)
    assert rows == "6919"
