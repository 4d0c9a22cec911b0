"""What the service refuses, and how it says so: the errors the HTTP layer maps to answers.

:class:`InputError` becomes 422 with FastAPI's validation shape; :class:`NotReadyError`
(and :class:`SnapshotUnavailableError`) 503 (:mod:`rapport.serving.api`).
"""

from __future__ import annotations

from typing import Any


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


def too_long(text: str | None, limit: int) -> bool:
    """True for an id longer than ``limit`` characters (``RAPPORT_MAX_ID_LENGTH``)."""
    return text is not None and len(text) > limit


def long_id(loc: list[Any], limit: int) -> dict[str, Any]:
    """The error that names an id at ``loc`` as too long."""
    return {
        "loc": loc,
        "msg": f"at most {limit} characters (RAPPORT_MAX_ID_LENGTH)",
        "type": "string_too_long",
    }
