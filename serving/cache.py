"""A local copy of the served MLflow models, so that a replacement worker loads in a moment.

Loading through the registry opens the tracking store (SQLAlchemy and its schema checks for
the embedded SQLite store, a round trip for a server) and copies the artifacts again: 1 to
2 s of a worker's start, more over a network. Under ``$RAPPORT_HOME/cache``:

- ``models/<store>/<name>/<version>/`` holds a registered version's MLflow model directory,
  copied once (``<store>`` is a digest of the tracking URI: version numbers are only unique
  within one registry). A copy appears whole or not at all (a temporary folder renamed).
- ``servers/<server id>.json`` names the versions a running server resolved at its start
  (``RAPPORT_SERVER_ID``, set by the manager: :mod:`rapport.serving.workers`). A worker
  that replaces a dead one loads those from the copies without asking the registry, and so
  serves what the rest of the server serves even if an alias has moved since.

Anything wrong with the cache (unwritable, a damaged file) falls back to the registry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from rapport.serving.scoring import LoadedModel, ModelVersion, load_pyfunc_dir, resolve_alias
from rapport.serving.workers import SERVER_ENV

log = logging.getLogger(__name__)


def load_registered(
    home: Path, names: list[str], alias: str, *, tracking_uri: str
) -> list[LoadedModel]:
    """The versions of ``names`` behind ``alias``, loaded from their local copies.

    In a worker of a running server (``RAPPORT_SERVER_ID`` set) the versions that server
    started with are loaded without the registry when it has recorded them; otherwise the
    alias is resolved in the registry, the versions copied if new, and (in a server)
    recorded for the workers that follow.

    Raises
    ------
    LookupError
        When a model or the alias does not exist (from the registry).
    """
    server = os.environ.get(SERVER_ENV)
    versions = pinned(home, server) if server else None
    if versions is not None and [v.name for v in versions] == names:
        try:
            return [load_pyfunc_dir(str(model_dir(home, tracking_uri, v)), v) for v in versions]
        except Exception as err:  # a damaged copy: the registry still has the model
            log.warning("cached models unusable (%s); loading from the registry", err)
    versions = [resolve_alias(name, alias, tracking_uri=tracking_uri) for name in names]
    try:
        dirs = [str(ensure_copy(home, tracking_uri, v)) for v in versions]
    except OSError as err:
        log.warning("no model cache under %s (%s); loading from the registry", home.name, err)
        dirs = [v.source for v in versions]
    loaded = [load_pyfunc_dir(path, v) for path, v in zip(dirs, versions, strict=True)]
    pin_server(home, versions)
    return loaded


def store_key(tracking_uri: str) -> str:
    """A short, path-safe digest naming the tracking store."""
    return hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]


def model_dir(home: Path, tracking_uri: str, version: ModelVersion) -> Path:
    """Where the copy of ``version`` of the store at ``tracking_uri`` lives."""
    return home / "cache" / "models" / store_key(tracking_uri) / version.name / version.version


def ensure_copy(home: Path, tracking_uri: str, version: ModelVersion) -> Path:
    """The local copy of ``version``'s model directory, downloaded first if missing.

    MLflow must already point at ``tracking_uri`` (:func:`~rapport.serving.scoring.resolve_alias`
    does).
    """
    import mlflow

    target = model_dir(home, tracking_uri, version)
    if (target / "MLmodel").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version.version}-", dir=target.parent))
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(staging)
        )
        try:
            staging.rename(target)
        except OSError:  # another worker's copy got there first: the same files
            if not (target / "MLmodel").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def restarting(home: Path) -> bool:
    """Whether this process replaces a worker of a server that has loaded its models before."""
    server = os.environ.get(SERVER_ENV)
    return bool(server) and _pins_path(home, str(server)).exists()


def pin_server(home: Path, versions: list[ModelVersion]) -> None:
    """In a worker of a running server: record the versions it serves (see :func:`pin`)."""
    server = os.environ.get(SERVER_ENV)
    if server:
        with contextlib.suppress(OSError):
            pin(home, server, versions)


def _pins_path(home: Path, server: str) -> Path:
    return home / "cache" / "servers" / f"{server}.json"


def pinned(home: Path, server: str) -> list[ModelVersion] | None:
    """The versions server ``server`` started with, or None when it has not recorded any."""
    path = _pins_path(home, server)
    try:
        return [ModelVersion(**item) for item in json.loads(path.read_text())["models"]]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as err:
        log.warning("ignoring the damaged cache file %s: %s", path.name, err)
        return None


def pin(home: Path, server: str, versions: list[ModelVersion]) -> None:
    """Record the versions server ``server`` serves; forget servers that have ended."""
    path = _pins_path(home, server)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"models": [dataclasses.asdict(v) for v in versions]})
    fd, tmp = tempfile.mkstemp(prefix=".pins-", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        out.write(body)
    os.replace(tmp, path)
    for old in path.parent.glob("*.json"):
        if old != path and not _manager_alive(old.stem):
            with contextlib.suppress(OSError):
                old.unlink()


def _manager_alive(server: str) -> bool:
    """Whether the manager named in a server id (``<pid>-<ns>``) still runs."""
    pid = server.split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
