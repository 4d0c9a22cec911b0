"""Run the HTTP server as a process tree of its own, and stop all of it.

``bentoml serve`` is a process manager (circus) that starts its workers each in a session
of their own, so neither a terminal's Ctrl-C nor a signal to the manager's group reaches
them, and a worker whose manager dies keeps answering on the port. ``rapport serve``
therefore starts the manager in a new session (a Ctrl-C in the terminal reaches only
``rapport serve``), keeps track of every process under it while it runs, passes SIGINT and
SIGTERM on to all of them, and kills whatever is left when the grace period runs out. A
second signal kills at once.

Process lookups use psutil, which BentoML itself depends on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

#: Signals that stop the server.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: How long killed processes have to vanish (the kernel only has to tear them down).
KILL_WAIT_SECONDS = 5.0
#: Between two looks at the running server (new workers, exit, grace period).
POLL_SECONDS = 0.25


class ServerTree:
    """The server process and every process seen under it so far.

    A worker whose parent died is no longer anyone's child that can be found, so the tree
    remembers each process from the moment it is seen (:meth:`refresh`).
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        import psutil

        self.proc = proc
        self.root = psutil.Process(proc.pid)
        self.known: dict[int, Any] = {proc.pid: self.root}

    def refresh(self) -> None:
        """Remember the processes now under the server."""
        import psutil

        with contextlib.suppress(psutil.Error):
            for child in self.root.children(recursive=True):
                self.known.setdefault(child.pid, child)

    def alive(self) -> list[Any]:
        """The known processes still running.

        A zombie counts as gone: only its parent's reaping is left, which no signal helps.
        """
        import psutil

        self.proc.poll()  # reaps the server itself once it has exited
        running = []
        for process in self.known.values():
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process)
        return running

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server's group and to every known process outside it."""
        import psutil

        self.refresh()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)
        for process in self.alive():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(process.pid) != self.proc.pid:
                    process.send_signal(signum)

    def wait_gone(self, seconds: float) -> bool:
        """Poll until no known process runs, or ``seconds`` pass; True when none runs."""
        deadline = time.monotonic() + seconds
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS / 5)
        return True

    def end(self, grace_seconds: float) -> None:
        """Stop whatever is left: SIGTERM, then SIGKILL once the grace period has passed."""
        if self.wait_gone(0):
            return
        self.signal(signal.SIGTERM)
        if not self.wait_gone(grace_seconds):
            self.signal(signal.SIGKILL)
            self.wait_gone(KILL_WAIT_SECONDS)


class _StopRequest:
    """The signal handlers' state: when the first stop signal came, and how many came."""

    def __init__(self) -> None:
        self.tree: ServerTree | None = None
        self.first: float | None = None
        self.count = 0
        self.signum: int = signal.SIGTERM

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.signum = signum
        if self.first is None:
            self.first = time.monotonic()
        if self.tree is not None:
            # A second Ctrl-C means "now": no more grace.
            self.tree.signal(signum if self.count == 1 else signal.SIGKILL)


def run_server(cmd: Sequence[str], env: Mapping[str, str], *, grace_seconds: float) -> int:
    """Run ``cmd`` in a session of its own until it exits or a stop signal comes.

    SIGINT and SIGTERM are passed on to the server and every process under it; whatever
    still runs ``grace_seconds`` later is killed. When this returns, no process of the
    server is left running, also when it exited on its own and left workers behind.

    Parameters
    ----------
    cmd, env
        The server's command line and environment.
    grace_seconds
        How long the server has to stop after a signal before it is killed.

    Returns
    -------
    int
        0 when a signal stopped the server (a requested stop), else the server's exit code.
    """
    stop = _StopRequest()
    # The handlers go in first: a signal while the server starts must not leave it behind.
    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        proc = subprocess.Popen(list(cmd), env=dict(env), start_new_session=True)
        tree = ServerTree(proc)
        try:
            stop.tree = tree
            if stop.first is not None:
                tree.signal(stop.signum)
            code = _wait(tree, stop, grace_seconds)
        finally:
            stop.tree = None
            tree.end(grace_seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stop.first is not None else code


def _wait(tree: ServerTree, stop: _StopRequest, grace_seconds: float) -> int:
    """The server's exit code; kills the tree once a stop has taken longer than the grace."""
    while True:
        try:
            # A timed wait: new workers are noted and the grace period checked meanwhile.
            return tree.proc.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            tree.refresh()
            if stop.first is not None and time.monotonic() - stop.first > grace_seconds:
                tree.signal(signal.SIGKILL)
