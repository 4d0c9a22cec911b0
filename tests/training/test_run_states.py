"""Run states of training runs that do not finish: killed outright (SIGKILL) or stopped by a
signal (SIGTERM), each in a real subprocess held after its model is registered."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from rapport.training import pipeline, tracking
from rapport.training.config import QUICK_OVERRIDES, ModelConfig
from rapport.training.settings import TrainingSettings

#: Trains the churn model, and holds (until a signal) at the gate: the model is registered,
#: the aliases are not moved.
CHILD = textwrap.dedent(
    """
    import json, signal, sys
    from pathlib import Path
    from rapport.training import pipeline
    from rapport.training.config import load_config
    from rapport.training.settings import TrainingSettings

    home, tx, ix, marker, overrides = sys.argv[1:6]

    def held(*args, **kwargs):
        Path(marker).write_text("registered")
        while True:
            signal.pause()

    pipeline._gate = held
    config = load_config("churn", json.loads(overrides))
    pipeline.train(config, tx, ix, settings=TrainingSettings(home=Path(home)))
    """
)


def _train_until_held(home: Path, world: dict[str, Path]) -> subprocess.Popen[bytes]:
    """A training subprocess, once it holds at the gate (its version registered)."""
    marker = home / "held"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    args = [str(home), str(world["transactions"]), str(world["interactions"]), str(marker)]
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args, json.dumps(QUICK_OVERRIDES)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "training never reached the gate"
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)
    return proc


def _runs(client: MlflowClient) -> list[Run]:
    experiment = client.get_experiment_by_name("rapport")
    assert experiment is not None
    return client.search_runs([experiment.experiment_id])


def test_a_killed_run_is_closed_by_the_next_training_and_gets_no_alias(
    tmp_path: Path,
    small_world: dict[str, Path],
    fast_config: Callable[..., ModelConfig],
) -> None:
    proc = _train_until_held(tmp_path, small_world)
    proc.kill()
    proc.wait(timeout=60)
    settings = TrainingSettings(home=tmp_path, mlflow_tracking_uri=None)
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    (killed,) = _runs(client)
    assert killed.info.status == "RUNNING"  # nothing could end it
    assert killed.data.tags[tracking.PID_TAG] == str(proc.pid)
    assert client.get_model_version("rapport-churn", "1").run_id == killed.info.run_id
    assert client.get_registered_model("rapport-churn").aliases == {}

    result = pipeline.train(
        fast_config("churn"),
        small_world["transactions"],
        small_world["interactions"],
        settings=settings,
    )
    closed = client.get_run(killed.info.run_id)
    assert closed.info.status == "KILLED"
    assert f"process {proc.pid}" in closed.data.tags[tracking.END_NOTE_TAG]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    aliases = {k: str(v) for k, v in client.get_registered_model("rapport-churn").aliases.items()}
    assert result.version == "2" and aliases[tracking.CHALLENGER] == "2"
    assert "1" not in aliases.values()


def test_sigterm_ends_the_run_as_killed_and_moves_no_alias(
    tmp_path: Path, small_world: dict[str, Path]
) -> None:
    proc = _train_until_held(tmp_path, small_world)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    uri = TrainingSettings(home=tmp_path, mlflow_tracking_uri=None).tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    (stopped,) = _runs(client)
    assert stopped.info.status == "KILLED"
    assert "stopped by SIGTERM" in stopped.data.tags[tracking.END_NOTE_TAG]
    assert client.get_registered_model("rapport-churn").aliases == {}
    # Nothing is left for the next start to close.
    tracking.configure(TrainingSettings(home=tmp_path, mlflow_tracking_uri=None))
    assert tracking.close_dead_runs([stopped.info.experiment_id]) == []
