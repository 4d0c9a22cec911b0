"""The HTTP API: a FastAPI app over :class:`~rapport.serving.core.ServiceState`.

The BentoML service mounts this app (``@bentoml.asgi_app``), which keeps BentoML's serving
machinery (health, Prometheus metrics, traffic control, Bentos) while the scoring path costs
what FastAPI costs; the benchmark runs the very same app under bare uvicorn for comparison.
Errors are FastAPI's validation shape everywhere: ``422 {"detail": [{"loc", "msg", "type"}]}``,
the echoed input made safe to serialise and short (:func:`rapport.serving.limits.safe_errors`).
Bodies over ``RAPPORT_MAX_BODY_BYTES`` get 413 before they are parsed, and with API keys
required every route but the API description answers 401 without one (docs/security.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from starlette.requests import ClientDisconnect

from rapport.serving import schemas as s
from rapport.serving.auth import ApiKeyMiddleware, KeyChecker, app_guard
from rapport.serving.bodies import document_bodies, json_body_openapi, parse_json_body
from rapport.serving.core import THREAD_THRESHOLD, ServiceState
from rapport.serving.errors import InputError, NotReadyError
from rapport.serving.limits import BodyLimitMiddleware, BudgetExceededError, Deadline, safe_errors
from rapport.serving.settings import ServingSettings

API_PREFIX = "/v1"

# Under `bentoml serve` the environment already names BentoML's multi-process registry when
# this module loads, so these appear in the service's /metrics.
SCORED = Counter(
    name="rapport_customers_scored",
    documentation="Customers scored, by endpoint.",
    labelnames=["endpoint"],
)
UNKNOWN = Counter(
    name="rapport_unknown_customers",
    documentation="Ids asked for that are not in the snapshot.",
)
SCORING_SECONDS = Histogram(
    name="rapport_scoring_seconds",
    documentation="Time spent scoring one request (after parsing), by endpoint.",
    labelnames=["endpoint"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
)

_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API key (when the service requires keys)."},
    413: {"description": "Request body over RAPPORT_MAX_BODY_BYTES."},
    503: {
        "description": "Models not loaded yet (or loading failed: see /v1/info), or a history "
        "request over its time budget (RAPPORT_HISTORY_TIMEOUT_SECONDS)."
    },
}

T = TypeVar("T")


def create_app(
    state: ServiceState | None = None, settings: ServingSettings | None = None
) -> FastAPI:
    """The FastAPI app; ``state`` may be attached later as ``app.state.rapport``.

    Parameters
    ----------
    state
        The loaded service (or None while it loads).
    settings
        Request bounds and API keys; by default the state's, else the environment's.
    """
    if settings is None:
        settings = state.settings if state is not None else ServingSettings()
    app = FastAPI(
        title="Rapport scoring",
        description="Churn risk, expected value and reasons per customer.",
        version="1",
        responses=_RESPONSES,
    )
    app.state.rapport = state
    # Added last, runs first: a request without a key is refused before its body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.keys_required:
        app.add_middleware(
            ApiKeyMiddleware, checker=KeyChecker(settings.keys_path), guarded=app_guard
        )
    # History requests compute on at most this many threads; others wait without one, so
    # the pool that health checks and small requests use never runs dry.
    history_threads = anyio.CapacityLimiter(settings.history_concurrency)

    def current(request: Request) -> ServiceState:
        found: ServiceState | None = request.app.state.rapport
        if found is None:
            raise NotReadyError("the service is starting")
        return found

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input, which may hold NaN, a lone surrogate or
        # megabytes: the 422 then fails to serialise and becomes a 500.
        return JSONResponse({"detail": safe_errors(exc.errors())}, status_code=422)

    @app.exception_handler(InputError)
    async def _input_error(_: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": safe_errors(exc.errors)}, status_code=422)

    @app.exception_handler(BudgetExceededError)
    async def _over_budget(_: Request, exc: BudgetExceededError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(NotReadyError)
    async def _not_ready(_: Request, exc: NotReadyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    async def run(
        endpoint: str, n: int, fn: Callable[[], T], *, limiter: anyio.CapacityLimiter | None = None
    ) -> T:
        start = time.perf_counter()
        # Small requests score on the event loop (a thread hop costs more than the work);
        # big ones, and any with a limiter of their own, go to a thread so the loop keeps
        # answering health checks.
        on_loop = n <= THREAD_THRESHOLD and limiter is None
        result = fn() if on_loop else await anyio.to_thread.run_sync(fn, limiter=limiter)
        SCORING_SECONDS.labels(endpoint).observe(time.perf_counter() - start)
        SCORED.labels(endpoint).inc(n)
        return result

    @app.post("/score", response_model=s.ScoreResponse, summary="Score feature rows")
    async def score(body: s.ScoreRequest, request: Request) -> s.ScoreResponse:
        """Score customers given their feature rows.

        Churn probability, risk tier, predicted value, BG/NBD outputs and, with ``explain``,
        the top reasons.
        """
        state = current(request)
        return await run("score", len(body.customers), lambda: state.score_rows(body))

    @app.post("/score/by-id", response_model=s.ByIdResponse, summary="Score known customers")
    async def score_by_id(body: s.ByIdRequest, request: Request) -> s.ByIdResponse:
        """Score customers from the latest feature snapshot.

        Unknown ids come back in ``missing``.
        """
        state = current(request)
        result = await run("by-id", len(body.customer_ids), lambda: state.score_ids(body))
        # Counted as asked; the unknown ones also here.
        UNKNOWN.inc(len(result.missing))
        return result

    @app.post(
        "/score/history",
        response_model=s.ScoreResponse,
        summary="Score raw histories",
        openapi_extra=json_body_openapi(s.HistoryRequest),
    )
    async def score_history(request: Request) -> s.ScoreResponse:
        """Score customers from their raw purchase and interaction histories.

        Features come from the training feature code; R/F/M scores are ranked within the
        served snapshot.
        """
        # Read here (bounded by the body limit), parsed on a history thread: megabytes of
        # JSON validated on the event loop held health checks and every client for ~1 s.
        try:
            raw = await request.body()
        except ClientDisconnect as err:
            raise HTTPException(400, "There was an error parsing the body") from err
        content_type = request.headers.get("content-type")
        parse = partial(parse_json_body, s.HistoryRequest, raw, content_type)
        body = await anyio.to_thread.run_sync(parse, limiter=history_threads)
        state = current(request)
        # The budget runs from here, so the wait for a thread counts too.
        deadline = Deadline(state.settings.history_timeout_seconds)
        # DuckDB work: always off the event loop.
        fn = partial(state.score_history, body, deadline)
        return await run("history", len(body.customers), fn, limiter=history_threads)

    @app.get("/info", response_model=s.ServiceInfo, summary="Served models and inputs")
    async def info(request: Request) -> s.ServiceInfo:
        """Model versions, the feature fields rows must carry, snapshot and limits."""
        state: ServiceState | None = request.app.state.rapport
        if state is None:
            raise NotReadyError("the service is starting")
        return state.info()

    @app.get("/ready", summary="Readiness", responses={200: {"description": "Models loaded."}})
    async def ready(request: Request) -> dict[str, Any]:
        """200 once the models are loaded, 503 before (or if loading failed)."""
        current(request)._scorer()
        return {"ready": True}

    document_bodies(app, [s.HistoryRequest])
    return app


def standalone_app() -> FastAPI:
    """The same app without BentoML, models loaded before it starts (``uvicorn --factory``).

    For the benchmark's bare-FastAPI comparison and for embedding in another ASGI server.
    """
    from rapport.serving.settings import ServingSettings

    state = ServiceState(ServingSettings()).load()
    if not state.ready:
        raise RuntimeError(f"models failed to load: {state.error}")
    return create_app(state)
