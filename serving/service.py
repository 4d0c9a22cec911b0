"""The BentoML service: ``bentoml serve rapport.serving.service:Rapport``.

Scoring endpoints live in the mounted FastAPI app (:mod:`rapport.serving.api`) under
``/v1``; BentoML adds ``/livez``, ``/readyz`` (ready only once the models are loaded),
``/metrics`` (Prometheus), the OpenAPI page at ``/`` and Bento packaging
(``rapport serve build``). Models load on a background thread at start, so health checks
answer while they load. API keys and request bounds: docs/security.md.
"""

from __future__ import annotations

from typing import Any

import bentoml

from rapport.serving import cache, metrics, workers
from rapport.serving.api import API_PREFIX, create_app
from rapport.serving.auth import ServerKeyMiddleware
from rapport.serving.core import ServiceState
from rapport.serving.patches import patch_timeout_middleware
from rapport.serving.settings import ServingSettings

patch_timeout_middleware()
# In `bentoml serve`'s manager (which imports this module): log and replace dead workers.
workers.install()

app = create_app()
# BentoML's request metrics by route template, not by raw path (bounded series).
metrics.install(metrics.RouteLabels(metrics.app_routes(app, API_PREFIX), metrics.BENTOML_STATIC))

#: Service options. One worker: LightGBM predictions are small and a second process would
#: double the memory; scale out with more replicas. Requests time out after 30 s. The scoring
#: routes stay out of OpenTelemetry tracing: with no exporter configured its middleware still
#: built spans for every request, 15% of a one-customer request's CPU (bench/serving_bench.py:
#: 920 -> 1,100 req/s at 8 clients). Health and info routes are still traced.
SERVICE_CONFIG: dict[str, object] = {
    "name": "rapport",
    "workers": 1,
    "traffic": {"timeout": 30},
    "metrics": {"enabled": True, "namespace": "rapport"},
    "tracing": {"excluded_urls": ["/v1/score"]},
}


class RapportService:
    """Scores customers with the champion churn and value models."""

    def __init__(self) -> None:
        self.state = ServiceState(self.make_settings())
        app.state.rapport = self.state
        if cache.restarting(self.state.settings.home):
            # A replacement worker loads the local copies in a moment: loading before the
            # worker accepts keeps requests queued at the socket instead of answered 503.
            self.state.load()
        else:
            self.state.load_in_background()

    def make_settings(self) -> ServingSettings:
        """Settings from the environment (a built Bento pins its model tags here)."""
        return ServingSettings()

    def __is_ready__(self) -> bool:
        return self.state.ready


def make_service(cls: type[RapportService]) -> Any:
    """The BentoML service of ``cls`` with the scoring app mounted under ``/v1``.

    The scoring app asks for API keys itself; BentoML's own ``/metrics`` and health routes
    get theirs from :class:`~rapport.serving.auth.ServerKeyMiddleware`.
    """
    service = bentoml.service(**SERVICE_CONFIG)(bentoml.asgi_app(app, path=API_PREFIX)(cls))
    service.add_asgi_middleware(ServerKeyMiddleware)
    return service


Rapport = make_service(RapportService)
