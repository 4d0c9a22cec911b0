"""What the service does, without the web framework: load, check, score, answer.

:class:`ServiceState` loads the champion models (from the MLflow registry by alias, or the
exact versions a Bento pins) and the feature snapshot, and answers the three scoring
requests. The HTTP layer (:mod:`rapport.serving.api`) only maps its exceptions to status
codes, so the same code runs in the BentoML service, in a bare FastAPI app and in tests.
:func:`write_snapshot` writes that snapshot from a user's data with the served models'
feature set (``rapport snapshot``, ``rapport demo``).
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rapport.features.build import build_features, connect, iter_features, write_features
from rapport.features.contracts import DataValidationError, TableSource, validate_table
from rapport.features.segments import SCORED_FEATURES, scores_against
from rapport.serving import cache
from rapport.serving import schemas as s
from rapport.serving.limits import Deadline
from rapport.serving.redact import redact, shown_path
from rapport.serving.scoring import LoadedModel, ModelVersion, Scorer, load_pyfunc_dir
from rapport.serving.settings import ServingSettings

log = logging.getLogger(__name__)

#: Above this many customers a request is scored off the event loop. A thread hop cost
#: ~1 ms and widened the tails of 100-customer requests (bench/serving_bench.py: 125 -> 145
#: req/s at c=8, p99 90 -> 58 ms); past ~128 customers (~9 ms of scoring) the loop would be
#: held long enough to delay health checks and other clients.
THREAD_THRESHOLD = 128
#: A stand-in customer with one interaction and no purchase: gives a posted history without
#: interactions the interaction columns a customer without activity gets in training.
_NOBODY = "\x00rapport-nobody"

#: One posted interaction as a table row: customer, time, channel, event.
_IxRow = tuple[str, pd.Timestamp, str, str]


class InputError(ValueError):
    """Request content the models cannot score; ``errors`` name row and field."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        first = errors[0] if errors else {"loc": [], "msg": "invalid input"}
        loc = ".".join(str(p) for p in first["loc"])
        super().__init__(
            f"{loc}: {first['msg']}" + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")
        )


class NotReadyError(RuntimeError):
    """The models are not loaded (yet, or loading failed)."""


class SnapshotUnavailableError(NotReadyError):
    """Scoring by id needs the feature snapshot, which did not load (the message says why)."""


@dataclass
class FeatureSnapshot:
    """Each customer's latest feature row, loaded once and looked up by id.

    ``cols`` holds the scorer's input arrays for every row, so scoring a known customer is a
    dictionary lookup and an array take.
    """

    path: str | None
    frame: pd.DataFrame
    index: dict[str, int]
    cols: dict[str, np.ndarray]
    as_of: list[dt.date | None]
    segment: list[str | None]

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, scorer: Scorer, path: str | None) -> FeatureSnapshot:
        """Keep each customer's latest row; prepare the scorer's arrays."""
        if "customer_id" not in frame.columns:
            raise ValueError(f"snapshot {path}: no customer_id column")
        if "as_of" in frame.columns:
            frame = frame.sort_values("as_of", kind="stable")
        ids = frame["customer_id"].astype("string")
        frame = frame[~ids.duplicated(keep="last")].reset_index(drop=True)
        ids = frame["customer_id"].astype("string")
        cols = scorer.columns_from_frame(frame)
        # BG/NBD's input rules, checked once here so that lookups can skip them.
        scorer.churn.btyd(cols, check=True)
        as_of: list[dt.date | None] = (
            [d.date() if pd.notna(d) else None for d in pd.to_datetime(frame["as_of"])]
            if "as_of" in frame.columns
            else [None] * len(frame)
        )
        seg = frame["segment"].astype("object") if "segment" in frame.columns else None
        segment: list[str | None] = (
            [str(v) if pd.notna(v) else None for v in seg]
            if seg is not None
            else [None] * len(frame)
        )
        return cls(
            path=path,
            frame=frame,
            index={cid: i for i, cid in enumerate(ids.tolist())},
            cols=cols,
            as_of=as_of,
            segment=segment,
        )

    @property
    def latest(self) -> dt.date | None:
        """The latest feature date in the snapshot."""
        dates = [d for d in self.as_of if d is not None]
        return max(dates) if dates else None

    def reference(self) -> pd.DataFrame | None:
        """Rows at the latest date: the population posted histories are ranked in."""
        needed = [col for _, col, _ in SCORED_FEATURES]
        if any(c not in self.frame.columns for c in needed) or self.frame.empty:
            return None
        if "as_of" not in self.frame.columns:
            return self.frame[needed]
        as_of = pd.to_datetime(self.frame["as_of"])
        return self.frame.loc[as_of == as_of.max(), needed]


@dataclass(frozen=True)
class SnapshotSummary:
    """What :func:`write_snapshot` wrote."""

    path: Path
    customers: int
    as_of: dt.date


def write_snapshot(
    transactions: TableSource,
    interactions: TableSource | None,
    *,
    as_of: dt.date,
    scorer: Scorer,
    out: Path,
    validate: bool = False,
    duckdb_threads: int | None = None,
    duckdb_memory_limit: str | None = None,
) -> SnapshotSummary:
    """Write each customer's features as of ``as_of``: the snapshot the service scores by id.

    The features are built with the served models' windows and interaction pairs, so every
    column the models read is there whatever else the data holds. The file appears only when
    complete (a temporary file is renamed); on any error nothing is written.

    Parameters
    ----------
    transactions, interactions
        The event tables (paths or frames; see :mod:`rapport.features.contracts`).
    as_of
        The cutoff: features use events up to the end of that day.
    scorer
        The served models, whose feature set the snapshot carries.
    out
        The Parquet file to write (the service reads ``ServingSettings.snapshot_path``).
    validate
        Validate raw inputs (frames from the loaders and contract Parquet need not be).

    Raises
    ------
    ValueError
        When no customer has a purchase by ``as_of``, or the data cannot give a feature
        the models need (interaction features without interactions).
    """
    con = connect(threads=duckdb_threads, memory_limit=duckdb_memory_limit)
    try:
        frames = iter_features(
            transactions,
            interactions,
            as_of=[as_of],
            windows=scorer.windows,
            interaction_pairs=scorer.interaction_pairs,
            validate=validate,
            connection=con,
        )
        hint = " (the models read interactions: give that file too)" if interactions is None else ""
        rows, _ = write_features(_with_model_inputs(frames, scorer, as_of, hint), out)
    finally:
        con.close()
    return SnapshotSummary(path=out, customers=rows, as_of=as_of)


def _with_model_inputs(
    frames: Iterator[pd.DataFrame], scorer: Scorer, as_of: dt.date, hint: str
) -> Iterator[pd.DataFrame]:
    """Pass feature batches on; refuse an empty one, or one lacking a model input."""
    for frame in frames:
        if frame.empty:
            raise ValueError(f"no customer has a purchase on or before {as_of}")
        missing = missing_inputs(frame.columns, scorer)
        if missing:
            raise ValueError(
                f"the served models need features this data does not give: {_some(missing)}{hint}"
            )
        yield frame


def missing_inputs(columns: Any, scorer: Scorer) -> list[str]:
    """The model input columns that ``columns`` lacks, in the models' order."""
    have = set(columns)
    return [c for c in scorer.inputs if c not in have]


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def snapshot_age_days(as_of: dt.date | None, today: dt.date | None = None) -> int | None:
    """Days from a snapshot's as-of date to today (UTC); None without a date."""
    return None if as_of is None else ((today or _today()) - as_of).days


def snapshot_staleness(
    as_of: dt.date | None, max_age_days: int, today: dt.date | None = None
) -> str | None:
    """Why a snapshot of ``as_of`` is stale, or None while it is within ``max_age_days``."""
    age = snapshot_age_days(as_of, today)
    if age is None or age <= max_age_days:
        return None
    return (
        f"is as of {as_of}, {age} days ago (more than RAPPORT_SNAPSHOT_MAX_AGE_DAYS="
        f"{max_age_days}): scores by id describe customers as they were then"
    )


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
        self._duckdb_lock = threading.Lock()
        self._con: Any = None

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
        fix = "write one with `rapport snapshot`"
        if not path.exists():
            self._unloaded(f"no feature snapshot at {path}: scoring by id finds nobody; {fix}")
            return
        try:
            frame = pd.read_parquet(path)
            missing = missing_inputs(frame.columns, scorer)
            if missing:
                self._unloaded(
                    f"feature snapshot {path} lacks {len(missing)} feature(s) the served "
                    f"models need ({_some(missing)}): not loaded, scoring by id finds "
                    f"nobody; {fix} (it builds the models' features)"
                )
                return
            self.snapshot = FeatureSnapshot.from_frame(frame, scorer, str(path))
        except Exception as err:
            self._unloaded(f"feature snapshot {path} not loaded: {type(err).__name__}: {err}")
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
        cols, errors = s.check_rows(request.customers, scorer, today=_today())
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
        self._check_history_bounds(request)
        today = _today()
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
        frame = self._history_features(request, as_of, errors, deadline)
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
        errors = [
            self._long_id([*loc, i, *tail]) for i, cid in enumerate(ids) if self._too_long(cid)
        ]
        if errors:
            raise InputError(errors)

    def _too_long(self, text: str | None) -> bool:
        return text is not None and len(text) > self.settings.max_id_length

    def _long_id(self, loc: list[Any]) -> dict[str, Any]:
        limit = self.settings.max_id_length
        return {
            "loc": loc,
            "msg": f"at most {limit} characters (RAPPORT_MAX_ID_LENGTH)",
            "type": "string_too_long",
        }

    def _check_history_bounds(self, request: s.HistoryRequest) -> None:
        """Id lengths and the request's event count, checked before any work starts."""
        errors: list[dict[str, Any]] = []
        events = 0
        for i, cust in enumerate(request.customers):
            loc = ["body", "customers", i]
            if self._too_long(cust.customer_id):
                errors.append(self._long_id([*loc, "customer_id"]))
            errors += [
                self._long_id([*loc, "transactions", j, "order_id"])
                for j, p in enumerate(cust.transactions)
                if self._too_long(p.order_id)
            ]
            events += len(cust.transactions) + len(cust.interactions)
        most = self.settings.max_request_events
        if events > most:
            errors.append(
                {
                    "loc": ["body", "customers"],
                    "msg": f"at most {most} events per request (got {events}; "
                    "RAPPORT_MAX_REQUEST_EVENTS)",
                    "type": "too_long",
                }
            )
        if errors:
            raise InputError(errors)

    def _history_rows(
        self,
        request: s.HistoryRequest,
        as_of: dt.date,
        errors: list[dict[str, Any]],
        deadline: Deadline,
    ) -> tuple[list[tuple[str, pd.Timestamp, float, str | None]], list[_IxRow]]:
        """The posted events as table rows; what is wrong with them goes to ``errors``."""
        limit = self.settings.max_events
        end = pd.Timestamp(as_of) + pd.Timedelta(days=1)
        tx_rows: list[tuple[str, pd.Timestamp, float, str | None]] = []
        ix_rows: list[_IxRow] = []
        seen: set[str] = set()
        for i, cust in enumerate(request.customers):
            deadline.check()
            loc = ["body", "customers", i]
            if cust.customer_id in seen:
                errors.append(
                    {
                        "loc": [*loc, "customer_id"],
                        "msg": "repeated customer",
                        "type": "value_error",
                    }
                )
            seen.add(cust.customer_id)
            if len(cust.transactions) + len(cust.interactions) > limit:
                errors.append(
                    {
                        "loc": loc,
                        "msg": f"at most {limit} events per customer (RAPPORT_MAX_EVENTS)",
                        "type": "too_long",
                    }
                )
                continue
            tx = [
                (cust.customer_id, _utc_naive(p.timestamp), p.amount, p.order_id)
                for p in cust.transactions
            ]
            ix = [
                (cust.customer_id, _utc_naive(e.timestamp), e.channel.lower(), e.event.lower())
                for e in cust.interactions
            ]
            for field, rows in (("transactions", tx), ("interactions", ix)):
                errors += [
                    {
                        "loc": [*loc, field, j, "timestamp"],
                        "msg": f"{row[1]} is after as_of {as_of}",
                        "type": "future",
                    }
                    for j, row in enumerate(rows)
                    if row[1] >= end
                ]
            tx_rows += tx
            ix_rows += ix
        return tx_rows, ix_rows

    def _history_features(
        self,
        request: s.HistoryRequest,
        as_of: dt.date,
        errors: list[dict[str, Any]],
        deadline: Deadline,
    ) -> pd.DataFrame:
        scorer = self._scorer()
        tx_rows, ix_rows = self._history_rows(request, as_of, errors, deadline)
        if errors:
            raise InputError(errors)
        tx = pd.DataFrame(tx_rows, columns=["customer_id", "timestamp", "amount", "order_id"])
        pairs = scorer.interaction_pairs
        if pairs is None:
            pairs = tuple(sorted({(c, e) for _, _, c, e in ix_rows}))
        ix: pd.DataFrame | None = None
        if pairs:
            first_channel, first_event = pairs[0]
            ix_rows.append((_NOBODY, pd.Timestamp(as_of), first_channel, first_event))
            ix = pd.DataFrame(ix_rows, columns=["customer_id", "timestamp", "channel", "event"])
        try:
            # A posted line has no product or line number, so two equal lines are two lines
            # of one order, not a duplicate: kept, then summed into their order.
            tx = validate_table(tx, "transactions", duplicates="keep")
            deadline.check()
            frame = self._features_within(tx, ix, as_of, pairs, deadline)
        except DataValidationError as err:
            raise InputError(
                [{"loc": ["body", "customers"], "msg": str(err), "type": "value_error"}]
            ) from err
        deadline.check()
        return self._ranked_in_request_order(frame, request, as_of)

    def _features_within(
        self,
        tx: pd.DataFrame,
        ix: pd.DataFrame | None,
        as_of: dt.date,
        pairs: tuple[tuple[str, str], ...],
        deadline: Deadline,
    ) -> pd.DataFrame:
        """The feature code on the posted events, stopped when ``deadline`` runs out.

        One DuckDB connection runs one query at a time (connections are not thread-safe):
        waiting for it counts against the budget, and a timer interrupts the query itself
        when the budget runs out, so an abandoned request stops holding memory and the
        connection.
        """
        import duckdb

        scorer = self._scorer()
        if not self._duckdb_lock.acquire(timeout=deadline.remaining()):
            raise deadline.exceeded()
        try:
            if self._con is None:
                self._con = connect(threads=1)
            timer = threading.Timer(deadline.remaining(), self._con.interrupt)
            timer.daemon = True
            timer.start()
            try:
                return build_features(
                    tx,
                    ix,
                    as_of=[as_of],
                    windows=scorer.windows,
                    interaction_pairs=pairs,
                    validate=True,
                    connection=self._con,
                )
            except duckdb.InterruptException as err:
                raise deadline.exceeded() from err
            finally:
                # Cancelled and joined under the lock: an interrupt never reaches the next
                # request's query.
                timer.cancel()
                timer.join()
        finally:
            self._duckdb_lock.release()

    def _ranked_in_request_order(
        self, frame: pd.DataFrame, request: s.HistoryRequest, as_of: dt.date
    ) -> pd.DataFrame:
        """Feature rows of the posted customers, R/F/M-scored against the snapshot."""
        scorer = self._scorer()
        frame = frame[frame["customer_id"].astype("string") != _NOBODY].reset_index(drop=True)
        # The feature code counts a customer from the first purchase (refunds alone are not
        # one); such a history has no feature row, and the answer says which.
        present = set(frame["customer_id"].astype("string"))
        absent = [
            {
                "loc": ["body", "customers", i, "transactions"],
                "msg": f"no purchase on or before {as_of} (refunds alone do not count)",
                "type": "value_error",
            }
            for i, cust in enumerate(request.customers)
            if cust.customer_id not in present
        ]
        if absent:
            raise InputError(absent)
        missing_cols = [c for c in scorer.inputs if c not in frame.columns]
        for c in missing_cols:
            frame[c] = np.nan
        if self.reference is not None and not frame.empty:
            scored = scores_against(frame, self.reference)
            for c in scored.columns:
                frame[c] = scored[c]
        order = {c.customer_id: i for i, c in enumerate(request.customers)}
        frame = frame.assign(_order=frame["customer_id"].astype("string").map(order))
        return frame.sort_values("_order").drop(columns="_order").reset_index(drop=True)

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


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def _utc_naive(ts: dt.datetime) -> pd.Timestamp:
    stamp = pd.Timestamp(ts)
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return stamp
