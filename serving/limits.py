"""Request bounds: body size, a time budget for history scoring, and safe error bodies.

Every bound is a setting (:class:`~rapport.serving.settings.ServingSettings`); docs/security.md
lists them with their defaults.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rapport.serving.auth import ASGIApp, Message, Receive, Scope, Send, send_json

#: Most characters of a client's input echoed back in an error.
ECHO_CHARS = 200


class BodyTooLargeError(Exception):
    """Raised into the app when a streamed body passes the limit (it stops reading)."""


class BodyLimitMiddleware:
    """Answers 413 to a body larger than ``max_bytes``, before the app parses any of it.

    A declared ``Content-Length`` over the limit is refused without reading the body; a
    body without one (chunked) is counted while it streams in, and refused as soon as it
    passes the limit, whatever the app had started to do with it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on with its body counted, or answer 413."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(send)
        received = 0
        exceeded = False
        started = False

        async def counted() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyTooLargeError
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            # The app's answer to a body it could not finish reading (FastAPI: a 400) is
            # dropped: the 413 below says what happened.
            if exceeded:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(BodyTooLargeError):
            await self.app(scope, counted, guarded)
        if exceeded and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        detail = (
            f"request body larger than {self.max_bytes} bytes (RAPPORT_MAX_BODY_BYTES): "
            "send fewer customers per request"
        )
        await send_json(send, 413, {"detail": detail}, {"Connection": "close"})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BudgetExceededError(RuntimeError):
    """A request ran out of its time budget; the work was stopped."""


@dataclass
class Deadline:
    """A time budget that the work checks between its steps.

    Parameters
    ----------
    seconds
        The budget, from the moment the deadline is made.
    setting
        The environment variable that sets it, named in the error.
    """

    seconds: float
    setting: str = "RAPPORT_HISTORY_TIMEOUT_SECONDS"
    start: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        """Seconds left (0 once passed)."""
        return max(0.0, self.start + self.seconds - time.monotonic())

    def check(self) -> None:
        """Raise :class:`BudgetExceededError` once the budget is spent."""
        if time.monotonic() - self.start > self.seconds:
            raise self.exceeded()

    def exceeded(self) -> BudgetExceededError:
        """The error that says the budget is spent."""
        return BudgetExceededError(
            f"history scoring stopped after its {self.seconds:g} s budget ({self.setting}): "
            "send fewer customers or events per request, or retry when the service is less busy"
        )


def safe_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors that always serialise as JSON and echo little of the input.

    Non-finite floats become text (``"NaN"``, ``"Infinity"``), lone surrogates are escaped,
    and every echoed text or ``input`` is cut to :data:`ECHO_CHARS` characters: a body that
    carried a 100 MB id or ``NaN`` gets a 422 that names the field, not a 500.
    """
    out = []
    for error in errors if isinstance(errors, list) else [errors]:
        if not isinstance(error, Mapping):
            out.append({"loc": [], "msg": _text(error), "type": "value_error"})
            continue
        clean: dict[str, Any] = {}
        for key, value in error.items():
            if key == "input":
                clean[key] = _short_input(value)
            elif key == "ctx" and isinstance(value, Mapping):
                clean[key] = {str(k): _plain(v) for k, v in value.items()}
            elif key == "loc":
                clean[key] = [_plain(p) for p in value]
            else:
                clean[str(key)] = _plain(value)
        out.append(clean)
    return out


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a short value (text cut, non-finite numbers as text)."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _float_text(value)
    return _text(value)


def _short_input(value: Any) -> Any:
    """The input echoed back: kept when its JSON is short, else summarised."""
    try:
        clean = _small(value, depth=3)
        if len(json.dumps(clean)) <= ECHO_CHARS:
            return clean
    except _TooBigError:
        pass
    if isinstance(value, str):
        return _text(value)
    size = len(value) if hasattr(value, "__len__") else 0
    return f"<{type(value).__name__} of {size} items, not shown>"


class _TooBigError(Exception):
    pass


def _small(value: Any, depth: int) -> Any:
    """A JSON-safe copy of a small value; raises :class:`_TooBigError` past a few items."""
    if value is None or isinstance(value, bool | int | float):
        return _plain(value)
    if isinstance(value, str):
        if len(value) > ECHO_CHARS:
            raise _TooBigError
        return _text(value)
    if depth == 0 or not hasattr(value, "__len__") or len(value) > 20:
        raise _TooBigError
    if isinstance(value, Mapping):
        return {_text(k): _small(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_small(v, depth - 1) for v in value]
    return _text(value)


def _float_text(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _text(value: Any, limit: int = ECHO_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters, lone surrogates escaped."""
    text = value if isinstance(value, str) else str(value)
    text = text[: limit * 6].encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:limit] + ("…" if len(text) > limit else "")
