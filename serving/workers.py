"""Worker supervision in ``bentoml serve``'s manager process (circus's arbiter).

BentoML's arbiter checks on its workers every 10 seconds (``check_delay``) and replaces a
dead one without a word: a killed worker left the port answering nothing for up to 10 s
before its replacement even started, and the log never said why. The manager imports the
service module to find the service, and the service module calls :func:`install`, so in
the manager:

- each worker's exit is logged with the worker's name, pid and exit code or signal, as a
  warning unless the server is stopping;
- a worker's death (SIGCHLD) makes the arbiter check its workers at once, so the
  replacement starts within a fraction of a second;
- every worker's environment names the server (:data:`SERVER_ENV`), so that a replacement
  loads the models its server started with from the local cache
  (:mod:`rapport.serving.core`).

In a worker, or anywhere else, :func:`install` only patches classes nothing there uses.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

log = logging.getLogger("rapport.serving.workers")

#: Environment variable naming the running server (manager pid and start time, in ns).
SERVER_ENV = "RAPPORT_SERVER_ID"
#: Wait between a worker's death and the check: a stop signal reaches the manager and its
#: workers together, and the manager must see its own first, or it replaces a worker that
#: is meant to stop.
CHECK_DELAY_SECONDS = 0.25
_PATCHED = "__rapport_workers__"


def describe_exit(code: int | None) -> str:
    """``exit code 3``, ``signal SIGKILL`` (circus gives a signal as its negative number)."""
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class _Supervisor:
    """The manager's worker exits not yet reported, and the check that follows them."""

    def __init__(self, arbiter: Any, loop: Any) -> None:
        self.arbiter = arbiter
        self.loop = loop
        self.exits: list[tuple[str, int, int | None]] = []
        self.pending = False

    def exited(self, watcher: str, pid: int, code: int | None) -> None:
        self.exits.append((watcher, pid, code))
        self.schedule()

    def schedule(self) -> None:
        if not self.pending:
            self.pending = True
            self.loop.call_later(CHECK_DELAY_SECONDS, self.check)

    def check(self) -> None:
        """Report the exits, then let the arbiter replace the dead (unless it is stopping)."""
        from circus.exc import ConflictError

        self.pending = False
        stopping = bool(getattr(self.arbiter, "_stopping", False))
        for watcher, pid, code in self.exits:
            if stopping:
                log.info("worker %s (pid %s) stopped: %s", watcher, pid, describe_exit(code))
            else:
                log.warning(
                    "worker %s (pid %s) died: %s; starting a new one",
                    watcher,
                    pid,
                    describe_exit(code),
                )
        self.exits.clear()
        if stopping:
            return
        try:
            self.arbiter.manage_watchers()
        except ConflictError:  # busy with another command (starting, reloading): retry
            self.schedule()


def install() -> bool:
    """Patch circus as described above (idempotent); whether this call patched it."""
    from circus.controller import Controller
    from circus.watcher import Watcher

    if getattr(Watcher, _PATCHED, False):
        return False
    notify = Watcher.notify_event
    start = Controller.start

    def notify_event(self: Any, topic: str, msg: dict[str, Any]) -> None:
        notify(self, topic, msg)
        supervisor = getattr(self.arbiter, "_rapport_supervisor", None)
        if topic == "reap" and supervisor is not None:
            supervisor.exited(self.name, msg.get("process_pid"), msg.get("exit_code"))

    def controller_start(self: Any) -> None:
        start(self)
        _supervise(self.arbiter, self.loop)

    Watcher.notify_event = notify_event
    Controller.start = controller_start
    setattr(Watcher, _PATCHED, True)
    return True


def _supervise(arbiter: Any, loop: Any) -> None:
    """Name the server in its workers' environment; check the workers on SIGCHLD."""
    server = f"{os.getpid()}-{time.time_ns()}"
    for watcher in arbiter.iter_watchers():
        if watcher.env is not None:
            watcher.env[SERVER_ENV] = server
    supervisor = _Supervisor(arbiter, loop)
    arbiter._rapport_supervisor = supervisor
    aio = getattr(loop, "asyncio_loop", None)
    if aio is None or threading.current_thread() is not threading.main_thread():
        return  # exits are still logged, at the arbiter's own pace
    aio.add_signal_handler(signal.SIGCHLD, supervisor.schedule)
