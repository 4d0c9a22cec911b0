"""A fix for BentoML 1.4's ``TimeoutMiddleware``, applied when the service module loads.

Upstream (``bentoml/_internal/server/http/traffic.py``, ``TimeoutMiddleware.__call__`` in
1.4.40) schedules ``loop.call_later(timeout, ...)`` for every request and never cancels it.
The timer keeps the request's future, and through it the request, alive for ``timeout``
seconds (60 by default): under load the heap fills with finished requests, full garbage
collections grew to ~0.8 s and p99 at 32 concurrent clients reached ~0.5 s. It also waits
on the first response message only, so an app that fails before sending anything leaves the
client waiting for the whole timeout.

The replacement cancels the timer as soon as the request is done and wakes up when the app
finishes, whatever happened. Remove it once upstream cancels the timer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.responses import JSONResponse

_PATCHED = "__rapport_patched__"


async def _timeout_call(self: Any, scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message: Any) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    def _finished(_: asyncio.Future[Any]) -> None:
        if not waiter.done():
            waiter.set_result(None)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
    fut.add_done_callback(_finished)
    try:
        await waiter
    except TimeoutError:
        if fut.cancel():
            resp = JSONResponse(
                {"error": f"Not able to process the request in {self.timeout} seconds"},
                status_code=504,
            )
            await resp(scope, receive, send)
    else:
        await fut
    finally:
        timer.cancel()


def patch_timeout_middleware() -> bool:
    """Install the fix (idempotent); returns whether this call installed it."""
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    if getattr(TimeoutMiddleware, _PATCHED, False):
        return False
    TimeoutMiddleware.__call__ = _timeout_call  # type: ignore[method-assign]
    setattr(TimeoutMiddleware, _PATCHED, True)
    return True
