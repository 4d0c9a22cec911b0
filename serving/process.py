"""Run the HTTP server as one process group, and stop all of it.

``bentoml serve`` is a process manager (circus) with worker processes under it. Started in a
session of its own, the whole tree shares one process group, so one signal to the group
reaches every process, and an empty group means nothing of the server is left to answer on
the port. The terminal's Ctrl-C then reaches only ``rapport serve``, which passes it on:
SIGINT and SIGTERM go to the group, a second one (or the grace period running out) kills it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from types import FrameType

#: Signals that stop the server.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: How long the group has to vanish after SIGKILL (the kernel only has to reap it).
KILL_WAIT_SECONDS = 5.0
#: Between two looks at a process group that is stopping.
POLL_SECONDS = 0.05


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pgid``; False when the group is gone."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    return True


def group_alive(proc: subprocess.Popen[bytes]) -> bool:
    """Whether any process of the group that ``proc`` leads is left.

    The leader is reaped first: a zombie still counts as a member of its group.
    """
    proc.poll()
    return signal_group(proc.pid, 0)


class _StopRequest:
    """What the signal handlers saw: when the first stop signal came, and how many."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.first: float | None = None
        self.count = 0
        self.signum = signal.SIGTERM

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.signum = signal.Signals(signum)
        if self.first is None:
            self.first = time.monotonic()
        if self.pid is not None:
            # A second Ctrl-C means "now": no more grace.
            signal_group(self.pid, signum if self.count == 1 else signal.SIGKILL)


def end_group(proc: subprocess.Popen[bytes], grace_seconds: float) -> None:
    """Stop what is left of ``proc``'s group: SIGTERM, then SIGKILL after the grace period."""
    for signum, seconds in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, KILL_WAIT_SECONDS)):
        if not group_alive(proc):
            return
        signal_group(proc.pid, signum)
        deadline = time.monotonic() + seconds
        while group_alive(proc) and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)


def run_group(cmd: Sequence[str], env: Mapping[str, str], *, grace_seconds: float) -> int:
    """Run ``cmd`` as its own process group until it exits or a stop signal comes.

    SIGINT and SIGTERM are passed to the whole group; whatever still runs ``grace_seconds``
    later is killed. When this returns no process of the group is left (up to the kernel
    reaping killed ones, :data:`KILL_WAIT_SECONDS`).

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
        stop.pid = proc.pid
        try:
            if stop.first is not None:
                signal_group(proc.pid, stop.signum)
            code = _wait(proc, stop, grace_seconds)
        finally:
            end_group(proc, grace_seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stop.first is not None else code


def _wait(proc: subprocess.Popen[bytes], stop: _StopRequest, grace_seconds: float) -> int:
    """The leader's exit code; kills the group once a stop has taken longer than the grace."""
    while True:
        try:
            # A timed wait, so that the grace period is checked while the server runs on.
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if stop.first is not None and time.monotonic() - stop.first > grace_seconds:
                signal_group(proc.pid, signal.SIGKILL)
