"""Rapport's BentoML service without the ``TimeoutMiddleware`` fix, for the benchmark only.

``bench/serving_bench.py`` serves it with
``bentoml serve unpatched_service:RapportUnpatched --working-dir bench`` beside the real
service (``rapport.serving.service:Rapport``) to show what
:func:`rapport.serving.patches.patch_timeout_middleware` buys under sustained load. It is
built like ``serving/service.py`` (same FastAPI app, state, settings and service options)
but never imports that module, since importing it installs the patch. Not a deployment
target.
"""

from __future__ import annotations

import bentoml
from bentoml._internal.server.http.traffic import TimeoutMiddleware

from rapport.serving.api import API_PREFIX, create_app
from rapport.serving.core import ServiceState
from rapport.serving.settings import ServingSettings

if getattr(TimeoutMiddleware, "__rapport_patched__", False):
    raise RuntimeError("TimeoutMiddleware is patched: this service must run BentoML's own")

app = create_app()

#: The options of ``rapport.serving.service.SERVICE_CONFIG`` (copied, not imported).
SERVICE_CONFIG: dict[str, object] = {
    "name": "rapport",
    "workers": 1,
    "traffic": {"timeout": 30},
    "metrics": {"enabled": True, "namespace": "rapport"},
}


class RapportUnpatchedService:
    """The Rapport service on BentoML's unpatched ``TimeoutMiddleware``."""

    def __init__(self) -> None:
        self.state = ServiceState(self.make_settings())
        app.state.rapport = self.state
        self.state.load_in_background()

    def make_settings(self) -> ServingSettings:
        """Settings from the environment."""
        return ServingSettings()

    def __is_ready__(self) -> bool:
        return self.state.ready


RapportUnpatched = bentoml.service(**SERVICE_CONFIG)(
    bentoml.asgi_app(app, path=API_PREFIX)(RapportUnpatchedService)
)
