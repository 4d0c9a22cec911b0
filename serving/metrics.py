"""Bounded ``endpoint`` labels for BentoML's request metrics.

BentoML 1.4's traffic middleware (``RunnerTrafficMetricsMiddleware``, the one a
``@bentoml.service`` gets) labels its request counters, duration histograms and
in-progress gauges with the raw request path, so every distinct URL became new series: 300
random 404 URLs added 6,000 to ``/metrics``. With :func:`install` the label is the template
of the route that serves the path (``/v1/score/by-id``), and :data:`UNMATCHED` for a path
that no route serves. The request itself still reaches the app with its own path.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from typing import Any

#: The one label of every path that no route serves.
UNMATCHED = "<unmatched>"
#: BentoML's own routes in front of the mounted app (health, metrics, OpenAPI, index).
BENTOML_ROUTES = ("/", "/livez", "/healthz", "/readyz", "/metrics", "/docs.json", "/schema.json")
#: BentoML's static folders, one label each.
BENTOML_STATIC = ("/static_content", "/assets")
_PATCHED = "__rapport_route_labels__"


class RouteLabels:
    """Maps a request path to the template of its route.

    Parameters
    ----------
    routes
        Called once, at the first lookup (when every route is in place): the route
        templates, Starlette style (``/items/{item_id}``).
    static
        Folders served as files: any path under one is labelled ``<folder>/{path}``.
    """

    def __init__(self, routes: Callable[[], Iterable[str]], static: Iterable[str] = ()) -> None:
        self._routes = routes
        self._static = tuple(static)
        self._exact: set[str] | None = None
        self._patterns: list[tuple[re.Pattern[str], str]] = []

    def _compile(self) -> set[str]:
        exact: set[str] = set()
        for template in self._routes():
            if "{" in template:
                literal = re.split(r"\{[^}]+\}", template)
                regex = "[^/]+".join(re.escape(part) for part in literal) + "$"
                self._patterns.append((re.compile(regex), template))
            else:
                exact.add(template)
        self._exact = exact
        return exact

    def __call__(self, path: str) -> str:
        """The label of ``path``."""
        exact = self._exact if self._exact is not None else self._compile()
        if path in exact:
            return path
        for pattern, template in self._patterns:
            if pattern.match(path):
                return template
        for folder in self._static:
            if path.startswith(folder + "/"):
                return folder + "/{path}"
        return UNMATCHED


def app_routes(app: Any, prefix: str) -> Callable[[], list[str]]:
    """The templates of ``app``'s routes once mounted under ``prefix``, with BentoML's own."""

    def routes() -> list[str]:
        mounted = [prefix + r.path for r in app.routes if isinstance(getattr(r, "path", None), str)]
        return [*BENTOML_ROUTES, *mounted]

    return routes


def install(labels: Callable[[str], str]) -> bool:
    """Label BentoML's request metrics with ``labels(path)`` (idempotent; True if patched now).

    The middleware is handed a copy of the request's scope whose ``path`` is the label, and
    an app that passes the request on with its own scope.
    """
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

    middleware: Any = RunnerTrafficMetricsMiddleware
    if getattr(middleware, _PATCHED, False):
        return False
    original = middleware.__call__

    async def labelled(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await original(self, scope, receive, send)
            return
        if not self._is_setup:
            self._setup()  # on the middleware itself, not on the per-request view below
        app = self.app

        async def own_scope(_: Any, receive_: Any, send_: Any) -> None:
            await app(scope, receive_, send_)

        view = copy.copy(self)
        view.app = own_scope
        await original(view, {**scope, "path": labels(scope["path"])}, receive, send)

    middleware.__call__ = labelled
    setattr(middleware, _PATCHED, True)
    return True
