"""API keys: a small file of hashed keys, and the ASGI middleware that asks for one.

A key is a random 32-byte URL-safe token shown once when it is created; the keys file keeps
only its SHA-256 hash, a name and the creation time, so a leaked file gives no key away.
Several keys live side by side, so a client moves to a new key before the old one is revoked.
The service re-reads the file whenever it changes, so a revoked key stops working without a
restart. Clients send ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rapport.serving.settings import ServingSettings

log = logging.getLogger(__name__)

#: Prefix of every key: tells a Rapport key apart in logs and secret scanners.
KEY_PREFIX = "rk_"
#: Key names: letters, digits and ``._-``, so that they are safe to print and to type.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class KeyRecord:
    """One stored key: its name, when it was made and the hash of the key."""

    name: str
    created: str
    sha256: str


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as the keys file stores it."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def read_keys(path: Path) -> list[KeyRecord]:
    """The keys stored at ``path``; none when the file does not exist.

    Raises
    ------
    ValueError
        When the file is not a keys file (the service then refuses every key).
    """
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{path} is not a Rapport keys file (no 'keys' list)")
    return [KeyRecord(str(k["name"]), str(k["created"]), str(k["sha256"])) for k in data["keys"]]


def write_keys(path: Path, keys: list[KeyRecord]) -> None:
    """Write the keys file atomically (a temporary file renamed), readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"keys": [vars(k) for k in keys]}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def create_key(path: Path, name: str | None = None) -> tuple[KeyRecord, str]:
    """Add a new key to the file; the record and the key, which is never stored.

    Raises
    ------
    ValueError
        When ``name`` is taken or not a valid name.
    """
    keys = read_keys(path)
    taken = {k.name for k in keys}
    if name is None:
        name = next(f"key-{i}" for i in range(1, len(keys) + 2) if f"key-{i}" not in taken)
    if not NAME_PATTERN.match(name):
        raise ValueError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if name in taken:
        raise ValueError(f"a key named {name!r} exists; revoke it first or choose another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    created = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    record = KeyRecord(name=name, created=created, sha256=hash_key(key))
    write_keys(path, [*keys, record])
    return record, key


def revoke_key(path: Path, name: str) -> KeyRecord:
    """Remove the key called ``name``; the removed record.

    Raises
    ------
    KeyError
        When no key has that name.
    """
    keys = read_keys(path)
    found = [k for k in keys if k.name == name]
    if not found:
        raise KeyError(name)
    write_keys(path, [k for k in keys if k.name != name])
    return found[0]


class KeyChecker:
    """Checks presented keys against the keys file, re-read whenever the file changes.

    A change is seen from the file's modification time, size and inode (an atomic rewrite
    gives a new inode even within one timestamp tick). An unreadable or malformed file
    accepts no key, so a broken edit locks clients out rather than letting everyone in.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._hashes: list[bytes] = []

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._hashes = None, []
            return
        seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen == self._seen:
            return
        try:
            self._hashes = [bytes.fromhex(k.sha256) for k in read_keys(self.path)]
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.error("API keys file %s unreadable, refusing every key: %s", self.path, err)
            self._hashes = []
        self._seen = seen

    def valid(self, key: str) -> bool:
        """True when ``key`` is one of the stored keys.

        The presented key is hashed and compared with every stored hash in constant time,
        so the answer's timing tells nothing about how close a guess was.
        """
        self._refresh()
        presented = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = False
        for stored in self._hashes:
            found |= hmac.compare_digest(presented, stored)
        return found


def bearer_token(scope: Scope) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def route_path(scope: Scope) -> str:
    """The path inside the app that ``scope`` reaches (without a mount's prefix)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    """Send a whole JSON response from an ASGI middleware."""
    content = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


class ApiKeyMiddleware:
    """Answers 401 to requests for a guarded path that carry no valid key.

    Parameters
    ----------
    app
        The ASGI app to guard.
    checker
        The stored keys.
    guarded
        Whether a path (inside the app) needs a key.
    """

    def __init__(self, app: ASGIApp, checker: KeyChecker, guarded: Callable[[str], bool]) -> None:
        self.app = app
        self.checker = checker
        self.guarded = guarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, or answer 401 with a ``WWW-Authenticate`` challenge."""
        if scope["type"] != "http" or not self.guarded(route_path(scope)):
            return await self.app(scope, receive, send)
        token = bearer_token(scope)
        if token is not None and self.checker.valid(token):
            return await self.app(scope, receive, send)
        challenge = 'Bearer realm="rapport"'
        if token is not None:
            challenge += ', error="invalid_token"'
        detail = "invalid API key" if token is not None else "API key required"
        await send_json(
            send,
            401,
            {"detail": f"{detail}: send 'Authorization: Bearer <key>' (`rapport keys create`)"},
            {"WWW-Authenticate": challenge},
        )


#: Routes of the scoring app that stay open: they describe the API, not customers.
OPEN_APP_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
#: BentoML's health routes.
HEALTH_PATHS = frozenset({"/livez", "/healthz", "/readyz"})


def app_guard(path: str) -> bool:
    """Whether a path of the scoring app needs a key: all but its API description."""
    return path not in OPEN_APP_PATHS


def server_guard(*, metrics: bool, health: bool) -> Callable[[str], bool]:
    """Which of BentoML's own routes need a key (the scoring app guards itself)."""
    paths = set(HEALTH_PATHS) if health else set()
    if metrics:
        paths.add("/metrics")
    frozen = frozenset(paths)
    return lambda path: path in frozen


class ServerKeyMiddleware(ApiKeyMiddleware):
    """BentoML's ``/metrics`` and health routes behind the key, as the settings say.

    Added to the BentoML service, which builds it in each worker: the settings are the
    worker's environment, as ``rapport serve`` passed it.
    """

    def __init__(self, app: ASGIApp, settings: ServingSettings | None = None) -> None:
        from rapport.serving.settings import ServingSettings

        settings = settings or ServingSettings()
        guarded: Callable[[str], bool] = server_guard(
            metrics=settings.metrics_need_key, health=settings.health_needs_key
        )
        if not settings.keys_required:
            guarded = _nothing
        super().__init__(app, KeyChecker(settings.keys_path), guarded)


def serve_check(settings: ServingSettings) -> tuple[str | None, str | None]:
    """What ``rapport serve`` says about keys before it starts: (error, warning).

    The error: keys are required but none exists (every request would be refused). The
    warning: keys are switched off on an address other machines reach.
    """
    from rapport.serving.settings import is_loopback

    if settings.keys_required:
        try:
            keys = read_keys(settings.keys_path)
        except (OSError, ValueError, KeyError) as err:
            return f"API keys file {settings.keys_path} unreadable: {err}", None
        if not keys:
            return (
                f"API keys are required on {settings.host} but {settings.keys_path} holds none: "
                "make one with `rapport keys create`, or serve without keys with "
                "--no-require-api-key",
                None,
            )
        return None, None
    if not is_loopback(settings.host):
        return None, (
            f"serving on {settings.host} without API keys (--no-require-api-key): anyone who "
            "reaches the port reads every customer's scores"
        )
    return None, None


def _nothing(path: str) -> bool:
    return False
