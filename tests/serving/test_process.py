"""Stopping the server's process tree: a server that ignores SIGTERM, with a worker in a
session of its own (as circus starts them), is killed after the grace period, worker too."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time

import psutil

from rapport.serving.process import run_server

#: A server that ignores SIGTERM, starts a worker in its own session that ignores it too,
#: then asks for a stop (SIGTERM to its parent, the test) once the worker is ready.
SERVER = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
    )
    worker.stdout.readline()
    with open(sys.argv[1], "w") as f:
        json.dump([os.getpid(), worker.pid], f)
    os.kill(os.getppid(), signal.SIGTERM)
    worker.wait()
    """
)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_server_that_ignores_sigterm_is_killed_with_its_worker(tmp_path):
    pids = tmp_path / "pids.json"
    start = time.monotonic()
    code = run_server(
        [sys.executable, "-c", SERVER, str(pids)], dict(os.environ), grace_seconds=0.5
    )
    assert code == 0  # a requested stop
    server, worker = json.loads(pids.read_text())
    assert not _running(server) and not _running(worker)
    assert time.monotonic() - start < 30
    # the handlers this process had are back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
