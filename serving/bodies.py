"""JSON request bodies parsed off the event loop, and documented as FastAPI documents them.

A history request may carry megabytes (up to ``RAPPORT_MAX_BODY_BYTES``). Declared as a
route parameter, FastAPI would parse and validate it on the event loop, and health checks
and every other client would wait for it (about a second for 20 MB). The route instead reads
the raw bytes (counted by :class:`~rapport.serving.limits.BodyLimitMiddleware`) and hands
them to :func:`parse_json_body` on a worker thread; errors come out as FastAPI's own
:class:`~fastapi.exceptions.RequestValidationError` with ``loc`` starting at ``"body"``.
:func:`json_body_openapi` and :func:`document_bodies` keep the OpenAPI document as it is for
a declared body, so clients and the schema-driven tests see the same contract.
"""

from __future__ import annotations

import contextlib
import email.message
import gc
import threading
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.constants import REF_TEMPLATE
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def is_json(content_type: str | None) -> bool:
    """True for a JSON media type (``application/json``, ``application/*+json``).

    The rule FastAPI applies to a declared body: without a content type, or with another
    one, the body is not read as JSON.
    """
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def parse_json_body(model: type[M], raw: bytes, content_type: str | None) -> M:
    """``raw`` validated as ``model``; meant for a worker thread.

    Parameters
    ----------
    model
        The request model.
    raw
        The request body as received.
    content_type
        The request's ``Content-Type`` header.

    Raises
    ------
    RequestValidationError
        With FastAPI's error shape for a declared body: every ``loc`` starts with
        ``"body"``; an empty body is a missing field, a body that is not JSON (by content
        type) fails as the model's input type.
    """
    if not raw:
        missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
        raise RequestValidationError([missing])
    try:
        if not is_json(content_type):
            # As FastAPI does: the bytes themselves are the input, which no model accepts.
            return model.model_validate(raw)
        with collector_paused():
            return model.model_validate_json(raw)
    except ValidationError as err:
        errors = [
            {**error, "loc": ("body", *error["loc"])} for error in err.errors(include_url=False)
        ]
        raise RequestValidationError(errors) from None


class _CollectorPause:
    """Automatic garbage collection off while any body is parsed, back on after the last.

    Validating an 18 MB history allocates millions of objects, and the collector keeps
    scanning the young ones while they pile up: scans that grow to 100-200 ms, each holding
    the GIL, so the event loop thread waits as long for its turn (the parse took 0.6-1.0 s).
    Paused, the parse takes 0.3 s; the loop then waits at most for the JSON tokenising
    (~50 ms, in one call) and for the one collection after the pause (~80 ms). A parse makes
    no reference cycles, so nothing it leaves needs the collector; the next automatic
    collection takes what other threads left meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._resume = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._active == 0:
                # Left off when something else had turned it off.
                self._resume = gc.isenabled()
                gc.disable()
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0 and self._resume:
                    gc.enable()


#: Pauses automatic garbage collection for the block (re-entrant across threads).
collector_paused = _CollectorPause()


def json_body_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads ``model`` from its body itself.

    The request body and the 422 answer, as FastAPI writes them for a declared body;
    :func:`document_bodies` adds the schemas they refer to.
    """
    return {
        "requestBody": {
            "content": {"application/json": {"schema": {"$ref": _ref(model.__name__)}}},
            "required": True,
        },
        "responses": {
            "422": {
                "description": "Validation Error",
                "content": {"application/json": {"schema": {"$ref": _ref("HTTPValidationError")}}},
            }
        },
    }


def document_bodies(app: FastAPI, models: Iterable[type[BaseModel]]) -> None:
    """Add the schemas of ``models`` (and of the models they hold) to ``app``'s OpenAPI.

    FastAPI only lists the models of declared parameters under ``components``; a route that
    reads its body itself names its model through :func:`json_body_openapi`, and this puts
    the schemas there, as FastAPI itself writes them for a route declaring that body.
    """
    wanted = list(models)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = generate()
        components = document.setdefault("components", {})
        schemas = {**_declared_schemas(wanted), **components.get("schemas", {})}
        # Sorted, as FastAPI lists them.
        components["schemas"] = {name: schemas[name] for name in sorted(schemas)}
        app.openapi_schema = document
        return document

    # FastAPI's documented way to extend the generated document.
    app.openapi = openapi  # type: ignore[method-assign]


def _declared_schemas(models: list[type[BaseModel]]) -> dict[str, Any]:
    """The component schemas FastAPI writes for routes that declare ``models`` as bodies.

    Taken from an app of such routes rather than generated here, so they match FastAPI's
    own (its schema generator, naming and error schemas) in whatever version is installed.
    """
    twin = FastAPI()
    for i, model in enumerate(models):

        async def declared(body: Any) -> None:
            """Never called: documents ``body``."""

        declared.__annotations__ = {"body": model, "return": None}
        twin.post(f"/{i}")(declared)
    schemas: dict[str, Any] = twin.openapi().get("components", {}).get("schemas", {})
    return schemas


def _ref(name: str) -> str:
    return REF_TEMPLATE.format(model=name)
