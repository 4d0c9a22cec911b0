"""What the service does, without the web framework: load, check, score, answer.

:class:`ServiceState` loads the champion models (from the MLflow registry by alias, or the
exact versions a Bento pins) and the feature snapshot, and answers the three scoring
requests. The HTTP layer (:mod:`rapport.serving.api`) only maps its exceptions
(:mod:`rapport.serving.errors`) to status codes, so the same code runs in the BentoML
service, in a bare FastAPI app and in tests. The snapshot itself lives in
:mod:`rapport.serving.snapshot` (:func:`write_snapshot` is also importable from here, for
``rapport snapshot`` and ``rapport demo``), the features of posted histories in
:mod:`rapport.serving.history`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

import numpy as np
import pandas as pd

from rapport.serving import cache
from rapport.serving import schemas as s
from rapport.serving.errors import (
    InputError,
    NotReadyError,
    SnapshotUnavailableError,
    long_id,
    too_long,
)
from rapport.serving.history import HistoryFeatures
from rapport.serving.limits import Deadline
from rapport.serving.redact import redact, shown_path
from rapport.serving.scoring import LoadedModel, ModelVersion, Scorer, load_pyfunc_dir
from rapport.serving.settings import ServingSettings
from rapport.serving.snapshot import (
    FeatureSnapshot,
    SnapshotNotLoadedError,
    read_snapshot,
    snapshot_age_days,
    snapshot_staleness,
    today_utc,
)

# Re-exported: the CLI writes snapshots with the models this module loads, from here.
from rapport.serving.snapshot import write_snapshot as write_snapshot

log = logging.getLogger(__name__)

#: Above this many customers a request is scored off the event loop. A thread hop cost
#: ~1 ms and widened the tails of 100-customer requests (bench/serving_bench.py: 125 -> 145
#: req/s at c=8, p99 90 -> 58 ms); past ~128 customers (~9 ms of scoring) the loop would be
#: held long enough to delay health checks and other clients.
THREAD_THRESHOLD = 128


def load_models(settings: ServingSettings) -> tuple[LoadedModel, LoadedModel]:
    """The churn and value models: the Bento's pinned ones, else the registry's alias."""
    if settings.churn_bento_model and settings.clv_bento_model:
        pinned = (
            _load_bento_model(settings.churn_bento_model),
            _load_bento_model(settings.clv_bento_model),
        )
        cache.pin_server(settings.home, [m.version for m in pinned])
        return pinned
    # Through local copies of the registered versions: a replacement worker loads in a moment.
    churn, value = cache.load_registered(
        settings.home,
        [settings.churn_model, settings.clv_model],
        settings.model_alias,
        tracking_uri=settings.tracking_uri,
    )
    return churn, value


def _load_bento_model(tag: str) -> LoadedModel:
    import bentoml

    model = bentoml.models.get(tag)
    meta = model.info.metadata
    version = ModelVersion(
        name=str(meta.get("registered_name", model.tag.name)),
        version=str(meta.get("registered_version", model.tag.version)),
        alias=str(meta["alias"]) if meta.get("alias") else None,
        run_id=str(meta["run_id"]) if meta.get("run_id") else None,
        source=f"bentoml:{model.tag}",
    )
    return load_pyfunc_dir(model.path_of("mlflow_model"), version)


class ServiceState:
    """Loaded models and snapshot, and the three ways to score.

    Parameters
    ----------
    settings
        Read from the environment when the service starts.
    """

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        self.scorer: Scorer | None = None
        self.snapshot: FeatureSnapshot | None = None
        self.reference: pd.DataFrame | None = None
        #: Why loading failed, as answers show it (paths relative to RAPPORT_HOME).
        self.error: str | None = None
        #: What start-up found wrong short of failing: no, an incomplete or a stale snapshot.
        self.warnings: list[str] = []
        #: Why no snapshot is loaded (scoring by id answers 503 with it).
        self.snapshot_problem: str | None = None
        self._loaded = threading.Event()
        #: Features of posted histories (their own DuckDB connection).
        self.history = HistoryFeatures(settings)

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> ServiceState:
        """Load models and snapshot (blocking); failures are kept in :attr:`error`."""
        start = time.monotonic()
        try:
            churn, value = load_models(self.settings)
            scorer = Scorer(churn, value)
            self._load_snapshot(scorer)
            self.scorer = scorer
            # Everything loaded so far (MLflow, pandas, the models: millions of objects) lives
            # as long as the process. Frozen, it leaves the collector's scans, which otherwise
            # stalled requests for ~250 ms on every full collection under load.
            gc.collect()
            gc.freeze()
            log.info(
                "loaded %s and %s in %.1f s",
                churn.version.label,
                value.version.label,
                time.monotonic() - start,
            )
        except Exception as err:
            self.error = redact(f"{type(err).__name__}: {err}", self.settings.home)
            log.exception("loading the models failed")
        finally:
            self._loaded.set()
        return self

    def _load_snapshot(self, scorer: Scorer) -> None:
        """Load the snapshot if it is there and complete; say what is wrong with it if not.

        Scoring posted rows and histories needs no snapshot, so a missing, unreadable or
        incomplete one leaves scoring by id without it rather than the service down.
        """
        path = self.settings.snapshot_path
        try:
            self.snapshot = read_snapshot(path, scorer)
        except SnapshotNotLoadedError as err:
            self._unloaded(str(err))
            return
        self.reference = self.snapshot.reference()
        stale = snapshot_staleness(self.snapshot.latest, self.settings.snapshot_max_age_days)
        if stale:
            self._warn(f"feature snapshot {path} {stale}; refresh it with `rapport snapshot`")

    def _warn(self, message: str) -> str:
        """Log ``message`` in full; keep it for /v1/info with paths as answers show them."""
        log.warning("%s", message)
        shown = redact(message, self.settings.home)
        self.warnings.append(shown)
        return shown

    def _unloaded(self, message: str) -> None:
        self.snapshot_problem = self._warn(message)

    def load_in_background(self) -> threading.Thread:
        """Start loading on a thread; :attr:`ready` turns true when done."""
        thread = threading.Thread(target=self.load, name="rapport-load", daemon=True)
        thread.start()
        return thread

    @property
    def ready(self) -> bool:
        """True once the models are loaded and usable."""
        return self.scorer is not None

    def _scorer(self) -> Scorer:
        if self.scorer is None:
            raise NotReadyError(self.error or "models are still loading")
        return self.scorer

    def _currency(self, scorer: Scorer) -> str | None:
        """The currency of predicted values: the training data's, else the setting's."""
        return scorer.currency or self.settings.currency

    # -- scoring ---------------------------------------------------------------------------

    def _check_size(self, n: int, field: str) -> None:
        if n > self.settings.max_batch:
            raise InputError(
                [
                    {
                        "loc": ["body", field],
                        "msg": f"at most {self.settings.max_batch} per request "
                        f"(got {n}; RAPPORT_MAX_BATCH)",
                        "type": "too_long",
                    }
                ]
            )

    def score_rows(self, request: s.ScoreRequest) -> s.ScoreResponse:
        """Score posted feature rows."""
        scorer = self._scorer()
        self._check_size(len(request.customers), "customers")
        self._check_ids(
            [r.customer_id for r in request.customers], ["body", "customers"], "customer_id"
        )
        cols, errors = s.check_rows(request.customers, scorer, today=today_utc())
        if errors:
            raise InputError(errors)
        rows = request.customers
        as_of = [r.as_of for r in rows]
        segment = [
            None if (v := (r.__pydantic_extra__ or {}).get("segment")) is None else str(v)
            for r in rows
        ]
        scores = scorer.score(
            cols, len(rows), as_of=as_of, segment=segment, explain=request.explain, validated=True
        )
        return s.ScoreResponse(
            models=s.versions_of(scorer),
            scores=s.to_customer_scores(
                scorer,
                scores,
                [r.customer_id for r in rows],
                as_of,
                currency=self._currency(scorer),
            ),
        )

    def score_ids(self, request: s.ByIdRequest) -> s.ByIdResponse:
        """Score known customers from the snapshot; unknown ids are listed, not fatal."""
        scorer = self._scorer()
        self._check_size(len(request.customer_ids), "customer_ids")
        self._check_ids(request.customer_ids, ["body", "customer_ids"])
        snap = self.snapshot
        if snap is None:
            # Not an empty answer with every id missing: clients and monitors must see that
            # the route cannot work until the snapshot is fixed.
            problem = self.snapshot_problem or "the feature snapshot is not loaded"
            raise SnapshotUnavailableError(f"scoring by id needs the feature snapshot: {problem}")
        found: list[int] = []
        ids: list[str] = []
        missing: list[s.MissingCustomer] = []
        for cid in request.customer_ids:
            pos = snap.index.get(cid)
            if pos is None:
                reason = "not in the feature snapshot"
                missing.append(s.MissingCustomer(customer_id=cid, reason=reason))
            else:
                found.append(pos)
                ids.append(cid)
        scores: list[s.CustomerScore] = []
        if found and snap is not None:
            take = np.asarray(found)
            cols = {k: v[take] for k, v in snap.cols.items()}
            as_of = [snap.as_of[i] for i in found]
            result = scorer.score(
                cols,
                len(found),
                as_of=as_of,
                segment=[snap.segment[i] for i in found],
                explain=request.explain,
                # Rows of the pipeline's own snapshot.
                validated=True,
            )
            scores = s.to_customer_scores(
                scorer, result, ids, as_of, currency=self._currency(scorer)
            )
        return s.ByIdResponse(
            models=s.versions_of(scorer),
            snapshot_as_of=snap.latest if snap is not None else None,
            scores=scores,
            missing=missing,
        )

    def score_history(
        self, request: s.HistoryRequest, deadline: Deadline | None = None
    ) -> s.ScoreResponse:
        """Compute features from posted histories (the training feature code) and score.

        Parameters
        ----------
        request
            The histories.
        deadline
            The request's time budget (default ``history_timeout_seconds`` from now),
            checked between customers and steps; the feature query is interrupted when it
            runs out. Past it, :class:`~rapport.serving.limits.BudgetExceededError`.
        """
        deadline = deadline or Deadline(self.settings.history_timeout_seconds)
        scorer = self._scorer()
        self._check_size(len(request.customers), "customers")
        self.history.check_bounds(request)
        today = today_utc()
        as_of = request.as_of or today
        errors: list[dict[str, Any]] = []
        if as_of > today:
            errors.append(
                {
                    "loc": ["body", "as_of"],
                    "msg": f"date {as_of} is in the future",
                    "type": "future",
                }
            )
        frame = self.history.features(request, scorer, self.reference, as_of, errors, deadline)
        cols = scorer.columns_from_frame(frame)
        segment = [str(v) if pd.notna(v) else None for v in frame["segment"].astype("object")]
        dates = [as_of] * len(frame)
        scores = scorer.score(
            cols, len(frame), as_of=dates, segment=segment, explain=request.explain
        )
        deadline.check()
        return s.ScoreResponse(
            models=s.versions_of(scorer),
            scores=s.to_customer_scores(
                scorer,
                scores,
                frame["customer_id"].astype("string").tolist(),
                list(dates),
                currency=self._currency(scorer),
            ),
        )

    def _check_ids(self, ids: list[str], loc: list[Any], field: str | None = None) -> None:
        """Refuse ids longer than ``max_id_length``; ``loc + [i] (+ [field])`` names each."""
        tail = [field] if field else []
        limit = self.settings.max_id_length
        errors = [
            long_id([*loc, i, *tail], limit) for i, cid in enumerate(ids) if too_long(cid, limit)
        ]
        if errors:
            raise InputError(errors)

    # -- description -----------------------------------------------------------------------

    def info(self) -> s.ServiceInfo:
        """What is served."""
        models: list[s.ModelDescription] = []
        scorer = self.scorer
        if scorer is not None:
            for compiled, version in (
                (scorer.churn, scorer.churn_version),
                (scorer.value, scorer.value_version),
            ):
                models.append(
                    s.ModelDescription(
                        name=version.name,
                        version=version.version,
                        alias=version.alias,
                        run_id=version.run_id,
                        task=compiled.task,
                        horizon_days=compiled.horizon_days,
                        source=version.source,
                        features=compiled.features,
                    )
                )
        snap = self.snapshot
        return s.ServiceInfo(
            ready=self.ready,
            error=self.error,
            models=models,
            inputs=scorer.inputs if scorer else [],
            categorical=sorted(scorer.categorical) if scorer else [],
            snapshot=(
                s.SnapshotInfo(
                    path=shown_path(snap.path, self.settings.home) if snap.path else None,
                    as_of=snap.latest,
                    customers=len(snap.index),
                    age_days=snapshot_age_days(snap.latest),
                    max_age_days=self.settings.snapshot_max_age_days,
                )
                if snap is not None
                else None
            ),
            warnings=list(self.warnings),
            max_batch=self.settings.max_batch,
            max_events=self.settings.max_events,
            max_request_events=self.settings.max_request_events,
            max_id_length=self.settings.max_id_length,
            max_body_bytes=self.settings.max_body_bytes,
            history_timeout_seconds=self.settings.history_timeout_seconds,
            currency=self._currency(scorer) if scorer else self.settings.currency,
        )
