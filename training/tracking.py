"""MLflow plumbing: the store, experiments, run states, registered models, aliases, the gate.

Aliases, never the deprecated stages: every new version gets ``challenger``; ``champion``
moves only when the gate passes, as the very last step of a successful run, once the run
has ended FINISHED.

A run records the process and host that run it (:data:`PID_TAG`, :data:`HOST_TAG`). A stop
signal ends the open run as KILLED (:func:`open_run`); a process killed outright cannot end
its run, so the next training start ends every run it left RUNNING (:func:`close_dead_runs`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import math
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from rapport.training.config import GateConfig
from rapport.training.models import FeatureSchemaError
from rapport.training.settings import TrainingSettings

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
#: Run tags naming the process that runs a training run.
PID_TAG = "rapport.pid"
HOST_TAG = "rapport.host"
#: Run tag saying why a run ended KILLED rather than as training ended it.
END_NOTE_TAG = "rapport.end_note"
#: MLflow's tag linking a nested run (a tuning trial) to its parent.
PARENT_TAG = "mlflow.parentRunId"


def configure(settings: TrainingSettings | None = None) -> str:
    """Point MLflow at the configured store (creating the embedded one's folder).

    Returns
    -------
    str
        The tracking URI in use.
    """
    settings = settings or TrainingSettings()
    if not settings.mlflow_tracking_uri:
        Path(settings.home).mkdir(parents=True, exist_ok=True)
    uri = settings.tracking_uri
    point_mlflow_at(uri)
    return uri


def point_mlflow_at(uri: str) -> None:
    """Point MLflow's tracking and registry at ``uri``, and leave the environment as it was.

    MLflow 3 copies a tracking URI it is given into ``MLFLOW_TRACKING_URI`` (and a registry
    URI into ``MLFLOW_REGISTRY_URI``) for subprocesses to inherit. Rapport's settings read
    that variable as the user's choice of server, so a second store in the same process (a
    notebook's, another ``RAPPORT_HOME``) would silently have resolved to the first one.
    """
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def ensure_experiment(name: str, settings: TrainingSettings | None = None) -> str:
    """The id of experiment ``name``, created (with local artifacts if embedded) if new."""
    settings = settings or TrainingSettings()
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    return str(client.create_experiment(name, artifact_location=settings.artifact_root))


class TrainingStopped(KeyboardInterrupt):
    """A stop signal (SIGTERM or SIGINT) arrived while a training run was open."""


def owner_tags() -> dict[str, str]:
    """The run tags naming this process: its pid and host."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`TrainingStopped` inside the block.

    SIGTERM's default action ends the process on the spot, leaving its run RUNNING; raised
    as an exception, it unwinds the run's ``with`` block like Ctrl-C does. Handlers are only
    installed from the main thread (Python's rule); elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise TrainingStopped(f"stopped by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def open_run(experiment_id: str, run_name: str) -> Iterator[mlflow.ActiveRun]:
    """A tagged MLflow run that a stop signal ends as KILLED, with a note saying why.

    The run ends FINISHED when the block completes and FAILED when it raises; SIGTERM or
    SIGINT ends it KILLED and the :class:`TrainingStopped` goes on up.
    """
    with (
        stop_signals_raise(),
        mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run,
    ):
        mlflow.set_tags(owner_tags())
        try:
            yield run
        except TrainingStopped as stop:
            mlflow.set_tag(END_NOTE_TAG, f"{stop} before training finished")
            mlflow.end_run("KILLED")
            raise


def _process_gone(pid: int, started_ms: int) -> bool:
    """True when no process ``pid`` that could have started a run at ``started_ms`` runs here.

    A pid taken over by a process younger than the run is not the run's. psutil comes with
    BentoML.
    """
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        # a second of slack for the clocks behind the two times
        return bool(process.create_time() > started_ms / 1000 + 1.0)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # it exists, but may not be looked at (another user's)
        return False


def _end_killed(client: MlflowClient, run_id: str, note: str) -> None:
    client.set_tag(run_id, END_NOTE_TAG, note)
    client.set_terminated(run_id, status="KILLED")
    log.warning("run %s ended as KILLED: %s", run_id, note)


def close_dead_runs(experiment_ids: list[str]) -> list[str]:
    """End, as KILLED with a note, the runs of these experiments whose process is gone.

    A training process killed outright (SIGKILL, out of memory) cannot end its run, which
    would stay RUNNING for good. A run is closed when it names this host and a pid no
    longer running (:data:`PID_TAG`, :data:`HOST_TAG`); a nested run (a tuning trial)
    still RUNNING under a parent that has ended is closed with it. Runs of other hosts,
    and runs without the tags, are left as they are: nothing here can tell they are dead.

    Returns
    -------
    list of str
        The ids of the runs ended, parents first.
    """
    client = MlflowClient()
    running = client.search_runs(
        experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    host = socket.gethostname()
    ended: list[str] = []
    for run in running:
        pid = run.data.tags.get(PID_TAG, "")
        if run.data.tags.get(HOST_TAG) != host or not pid.isdigit():
            continue
        if _process_gone(int(pid), run.info.start_time):
            note = (
                f"process {pid} on {host} ended without ending this run (killed); "
                "closed when training next started"
            )
            _end_killed(client, run.info.run_id, note)
            ended.append(run.info.run_id)
    still_running = {run.info.run_id for run in running} - set(ended)
    for run in running:
        parent = run.data.tags.get(PARENT_TAG)
        if parent is None or run.info.run_id in ended or parent in still_running:
            continue
        _end_killed(client, run.info.run_id, f"its parent run {parent} has ended")
        ended.append(run.info.run_id)
    return ended


def version_by_alias(name: str, alias: str) -> ModelVersion | None:
    """The version behind ``alias`` of model ``name``, or ``None``."""
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@dataclass(frozen=True)
class GateDecision:
    """Whether a new version takes ``champion``, and why."""

    promote: bool
    reason: str
    new_value: float
    champion_value: float | None = None
    champion_version: str | None = None


def decide(
    gate: GateConfig,
    new_value: float,
    champion_value: float | None,
    champion_version: str | None = None,
    note: str = "",
    baseline: tuple[str, float] | None = None,
) -> GateDecision:
    """Apply the gate to the new model's, the champion's and the best baseline's metric.

    All three are scored on the same test rows. The new version is promoted only when it
    beats both the champion and ``baseline`` (``(name, value)``, the best baseline of the
    run) by ``gate.min_improvement``; otherwise the reason names what beat it. ``note``
    (from :func:`champion_value_on`) is added to the reason. A champion that exists
    (``champion_version``) but could not be scored (``champion_value`` None) is kept: nothing
    is promoted without a comparison.
    """
    decision = _decide(gate, new_value, champion_value, champion_version, baseline)
    if note:
        decision = dataclasses.replace(decision, reason=f"{decision.reason}; {note}")
    return decision


def _beats(gate: GateConfig, new_value: float, other: float) -> bool:
    margin = (1.0 if gate.higher_is_better else -1.0) * (new_value - other)
    return margin > gate.min_improvement or (gate.min_improvement == 0 and margin >= 0)


def _decide(
    gate: GateConfig,
    new_value: float,
    champion_value: float | None,
    champion_version: str | None,
    baseline: tuple[str, float] | None = None,
) -> GateDecision:
    metric = gate.metric
    if not math.isfinite(new_value):
        return GateDecision(False, f"{metric} is not finite", new_value)
    if gate.min_value is not None and not _beats(
        gate.model_copy(update={"min_improvement": 0.0}), new_value, gate.min_value
    ):
        bound = ">=" if gate.higher_is_better else "<="
        return GateDecision(
            False,
            f"{metric} {new_value:.4f} misses the threshold {bound} {gate.min_value}",
            new_value,
            champion_value,
            champion_version,
        )
    failures: list[str] = []
    passed: list[str] = []
    if champion_value is None and champion_version is not None:
        failures.append(
            f"{metric} {new_value:.4f}, but champion v{champion_version} could not be compared "
            "on the same test cutoff, so it stays (compare, then `rapport promote` by hand)"
        )
    elif champion_value is not None:
        against = f"champion v{champion_version} {champion_value:.4f}"
        if _beats(gate, new_value, champion_value):
            passed.append(against)
        else:
            failures.append(
                f"{metric} {new_value:.4f} does not beat {against} by {gate.min_improvement}"
            )
    if baseline is not None:
        name, value = baseline
        against = f"baseline {name} {value:.4f}"
        if _beats(gate, new_value, value):
            passed.append(against)
        else:
            failures.append(
                f"{metric} {new_value:.4f} does not beat {against} by {gate.min_improvement}"
            )
    if failures:
        return GateDecision(False, "; ".join(failures), new_value, champion_value, champion_version)
    first = "" if champion_version is not None else "no champion yet; "
    versus = f" vs {' and '.join(passed)}" if passed else ""
    return GateDecision(
        True,
        f"{first}{metric} {new_value:.4f}{versus}",
        new_value,
        champion_value,
        champion_version,
    )


class NotComparableError(Exception):
    """The champion cannot be scored on this run's data (the reason is the message)."""


def champion_value_on(
    name: str,
    test: pd.DataFrame,
    score: Callable[[Any, pd.DataFrame], float],
    rows_for: Callable[[Any], pd.DataFrame] | None = None,
) -> tuple[float | None, str | None, str]:
    """Score the current champion on the new run's test cutoff.

    Returns ``(value, version, note)``: ``(None, None, "")`` when there is no champion. A
    champion trained on other feature columns (other windows, other interaction pairs, or
    none) cannot read ``test``; ``rows_for(model)`` then rebuilds the same test cutoff with
    the champion's own feature spec and the run's labels, and ``note`` says so. Where even
    that is impossible (``rows_for`` raises :class:`NotComparableError`) the value is ``None`` and
    ``note`` says why: :func:`decide` then keeps the champion.
    """
    current = version_by_alias(name, CHAMPION)
    if current is None:
        return None, None, ""
    version = str(current.version)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}").unwrap_python_model()
    try:
        return score(model, test), version, ""
    except FeatureSchemaError as error:
        if rows_for is None:
            raise
        mismatch = str(error)
    try:
        rows = rows_for(model)
    except NotComparableError as why:
        return None, version, f"champion v{version} cannot be scored on this run's data: {why}"
    note = f"champion v{version} scored on its own features of the test cutoff ({mismatch})"
    return score(model, rows), version, note


def set_alias(name: str, alias: str, version: str) -> None:
    """Point ``alias`` of model ``name`` at ``version``."""
    MlflowClient().set_registered_model_alias(name, alias, version)


def promote(name: str, version: str, *, reason: str = "manual") -> None:
    """Make ``version`` the champion by hand (``rapport promote``), recording why."""
    client = MlflowClient()
    client.get_model_version(name, version)  # raises a clear MlflowException if absent
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "promoted_by", reason)
    client.set_model_version_tag(name, version, "promoted_at", dt.datetime.now(dt.UTC).isoformat())


def list_versions(names: list[str] | None = None) -> pd.DataFrame:
    """Registered versions with aliases and their run's test metrics.

    Returns
    -------
    pandas.DataFrame
        ``model``, ``version``, ``aliases``, ``created``, ``run_id``, ``test_cutoff`` and one
        column per ``test_*`` metric of the model (not the baselines).
    """
    client = MlflowClient()
    if names is None:
        names = [m.name for m in client.search_registered_models()]
    rows: list[dict[str, Any]] = []
    for name in names:
        # Version search results may omit aliases; the registered model always has them.
        aliases: dict[str, list[str]] = {}
        for alias, aliased in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(aliased), []).append(alias)
        for mv in client.search_model_versions(f"name = '{name}'"):
            row: dict[str, Any] = {
                "model": name,
                "version": int(mv.version),
                "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                "created": pd.Timestamp(mv.creation_timestamp, unit="ms"),
                "run_id": mv.run_id,
            }
            if mv.run_id:
                run = client.get_run(mv.run_id)
                row["test_cutoff"] = run.data.params.get("test_cutoff")
                row.update(
                    {
                        k.removeprefix("test_"): v
                        for k, v in run.data.metrics.items()
                        if k.startswith("test_")
                    }
                )
            rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values(["model", "version"], ascending=[True, False]).reset_index(drop=True)
