"""Soak and fault benchmark: ``rapport serve`` under steady load, a worker killed, big histories.

Usage::

    uv run --locked --extra dev python bench/soak_bench.py               # 2 x 60 s (~3 min)
    uv run --locked --extra dev python bench/soak_bench.py --seconds 15  # a quick run

Each scenario starts a fresh ``rapport serve --registry`` on a free 127.0.0.1 port (its own
session, stopped whatever happens) over ``--home``, and ``--clients`` closed-loop aiohttp
clients post one-customer ``/v1/score/by-id`` requests for ``--seconds`` (ids rotate through
the snapshot). Nothing leaves the loopback interface.

- ``kill``: at a third of the time the service's worker is killed (SIGKILL). Reported: the
  recovery time (from the kill to the first 200 on the scoring route), non-2xx answers and
  connection errors inside and outside that recovery window, the p99 before the kill and
  after the recovery, and whether ``rapport serve``'s log names the dead worker.
- ``history``: the same load without a kill, plus a ~``--history-mb`` MB
  ``/v1/score/history`` request every ``--history-every`` seconds and a ``/livez`` probe every
  100 ms. The server's body and event limits are raised to let the request through
  (``RAPPORT_MAX_BODY_BYTES``, ``RAPPORT_MAX_REQUEST_EVENTS``): refused at the default
  limits, it would cost next to nothing. Reported: ``/livez`` p50/p99/max, the one-customer
  p99 overall and while a history request is in flight, and the history requests' statuses
  and latencies. (A kill here would mix the restart into the ``/livez`` figures.)

Targets: no non-2xx outside the recovery window, recovery under 5 s, ``/livez`` p99 under
50 ms during history requests. Client and server share the machine's CPUs, so the figures
include the client's own load. Results go to ``bench/results/soak[_LABEL].json`` and ``.md``,
servers' logs to ``bench/results/soak_logs/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pandas as pd
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serving_bench import wait_ready  # noqa: E402  # one readiness poll for both benchmarks

BIN = Path(sys.executable).parent
JSON = {"Content-Type": "application/json"}
SCORE_PATH = "/v1/score/by-id"
LIVEZ_EVERY_S = 0.1
WARMUP_S = 2.0
#: The worker process under ``bentoml serve`` (circus starts it as this module).
WORKER_MARK = "_bentoml_impl.worker"
RECOVERY_TARGET_S = 5.0
LIVEZ_P99_TARGET_MS = 50.0


@dataclass
class Record:
    """One request: when it was sent and answered (monotonic seconds), and its status."""

    sent: float
    done: float
    status: int  # 0: no answer (connection refused, reset, timeout)

    @property
    def ms(self) -> float:
        return (self.done - self.sent) * 1000


@dataclass
class Run:
    """What one scenario recorded."""

    start: float
    scoring: list[Record] = field(default_factory=list)
    livez: list[Record] = field(default_factory=list)
    history: list[Record] = field(default_factory=list)
    kill_at: float | None = None
    killed_pid: int | None = None


# -- server ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(home: Path, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, RAPPORT_HOME=str(home), PYTHONUNBUFFERED="1", **extra)
    env.pop("MLFLOW_TRACKING_URI", None)  # derived from RAPPORT_HOME
    env.update(BENTOML_DO_NOT_TRACK="True", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    return env


@contextlib.contextmanager
def serving(home: Path, port: int, log: Path, timeout: float, extra: dict[str, str]) -> Any:
    """Run ``rapport serve`` on ``port``; yield its process; always stop all of it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [str(BIN / "rapport"), "serve", "--registry", "--host", "127.0.0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*argv, "--port", str(port)],
            env=server_env(home, extra),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/readyz", log, timeout)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)  # rapport serve stops its whole tree
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def worker_pid(root: int) -> int:
    """The pid of the service's worker under ``rapport serve`` (pid ``root``)."""
    for child in psutil.Process(root).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(WORKER_MARK in part for part in child.cmdline()):
                return int(child.pid)
    raise LookupError("no BentoML worker under rapport serve")


# -- payloads -------------------------------------------------------------------------------


def id_bodies(home: Path, n: int = 500) -> list[bytes]:
    """One-customer by-id bodies for ``n`` snapshot customers."""
    frame = pd.read_parquet(home / "snapshot.parquet", columns=["customer_id"])
    ids = frame["customer_id"].astype("string").drop_duplicates().head(n).tolist()
    return [json.dumps({"customer_ids": [i]}).encode() for i in ids]


def history_body(megabytes: float, customers: int = 100) -> bytes:
    """A history request of about ``megabytes`` MB: ``customers`` with many small purchases."""
    per_event = len('{"timestamp":"2024-01-01T00:00:00","amount":12.34,"order_id":"o0000000"},')
    events = int(megabytes * 1e6 / per_event / customers)
    rng = np.random.default_rng(0)
    start = pd.Timestamp("2022-01-01")
    people = []
    for c in range(customers):
        stamps = start + pd.to_timedelta(np.sort(rng.integers(0, 1000 * 86400, events)), "s")
        amounts = np.round(rng.gamma(2.0, 30.0, events), 2)
        people.append(
            {
                "customer_id": f"h{c}",
                "transactions": [
                    {"timestamp": t.isoformat(), "amount": float(a), "order_id": f"o{c}-{i}"}
                    for i, (t, a) in enumerate(zip(stamps, amounts, strict=True))
                ],
            }
        )
    return json.dumps({"customers": people, "as_of": "2024-12-31"}).encode()


# -- load -----------------------------------------------------------------------------------


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, body: bytes | None = None
) -> Record:
    sent = time.monotonic()
    try:
        async with session.request(method, url, data=body, headers=JSON) as resp:
            await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        status = 0
    return Record(sent, time.monotonic(), status)


async def scoring_client(
    session: aiohttp.ClientSession, url: str, bodies: list[bytes], k: int, run: Run, end: float
) -> None:
    """One closed-loop client: the next request as soon as the previous one is answered."""
    i = k
    while time.monotonic() < end:
        rec = await _call(session, "POST", url, bodies[i % len(bodies)])
        run.scoring.append(rec)
        i += 1
        if rec.status == 0:
            await asyncio.sleep(0.01)  # refused at once while no worker listens: no spinning


async def every(seconds: float, end: float, fn: Any, out: list[Record], first: float = 0.0) -> None:
    """Call ``fn()`` every ``seconds`` (after ``first``) until ``end``; keep its records."""
    await asyncio.sleep(first)
    while time.monotonic() < end:
        tick = time.monotonic()
        out.append(await fn())
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - tick)))


async def killer(root: int, at: float, run: Run) -> None:
    """SIGKILL the service's worker ``at`` seconds after the start."""
    await asyncio.sleep(max(0.0, run.start + at - time.monotonic()))
    pid = worker_pid(root)
    os.kill(pid, signal.SIGKILL)
    run.kill_at, run.killed_pid = time.monotonic(), pid


async def drive(base: str, root: int, args: argparse.Namespace, scenario: str) -> Run:
    """Run one scenario's load against ``base``; what it recorded."""
    bodies = id_bodies(args.home)
    big = history_body(args.history_mb) if scenario == "history" else b""
    timeout = aiohttp.ClientTimeout(total=60)
    conn = aiohttp.TCPConnector(limit=args.clients)
    async with (
        aiohttp.ClientSession(connector=conn, timeout=timeout) as session,
        aiohttp.ClientSession(timeout=timeout) as probe,
        aiohttp.ClientSession(timeout=timeout) as post,
    ):
        run = Run(start=time.monotonic())
        end = run.start + args.seconds
        tasks = [
            scoring_client(session, base + SCORE_PATH, bodies, k, run, end)
            for k in range(args.clients)
        ]
        if scenario == "kill":
            tasks.append(killer(root, args.seconds / 3, run))
        else:
            livez = base + "/livez"
            history = base + "/v1/score/history"
            tasks.append(every(LIVEZ_EVERY_S, end, lambda: _call(probe, "GET", livez), run.livez))
            tasks.append(
                every(
                    args.history_every,
                    end,
                    lambda: _call(post, "POST", history, big),
                    run.history,
                    first=WARMUP_S,
                )
            )
        await asyncio.gather(*tasks)
    return run


# -- figures --------------------------------------------------------------------------------


def _p(records: list[Record], q: float) -> float | None:
    return round(float(np.percentile([r.ms for r in records], q)), 1) if records else None


def _ok(r: Record) -> bool:
    return 200 <= r.status < 300


def kill_figures(run: Run, log: Path) -> dict[str, Any]:
    """Recovery time, errors inside and outside the recovery window, p99 before and after."""
    assert run.kill_at is not None
    kill = run.kill_at
    after_kill = [r for r in run.scoring if r.sent >= kill and _ok(r)]
    recovered = min((r.done for r in after_kill), default=None)
    window_end = recovered if recovered is not None else float("inf")
    inside = [r for r in run.scoring if r.done >= kill and r.sent <= window_end]
    outside = [r for r in run.scoring if not (r.done >= kill and r.sent <= window_end)]
    warm = run.start + WARMUP_S
    before = [r for r in outside if r.sent >= warm and r.done < kill]
    after = [r for r in outside if r.sent > window_end]
    text = log.read_text(errors="replace") if log.exists() else ""
    logged = [ln for ln in text.splitlines() if str(run.killed_pid) in ln and "worker" in ln]
    return {
        "requests": len(run.scoring),
        "killed_pid": run.killed_pid,
        "recovery_s": None if recovered is None else round(recovered - kill, 2),
        "non_2xx_in_window": sum(not _ok(r) for r in inside),
        # 0: no answer (refused or reset); 503: a worker up, its models not loaded yet
        "statuses_in_window": {
            str(k): v for k, v in sorted(Counter(r.status for r in inside).items())
        },
        "non_2xx_outside_window": sum(not _ok(r) for r in outside),
        "p99_ms_before": _p(before, 99),
        "p99_ms_after": _p(after, 99),
        "req_s_before": round(len(before) / max(kill - warm, 1e-9), 1),
        "death_logged": logged[:2],
    }


def history_figures(run: Run) -> dict[str, Any]:
    """/livez latency, the one-customer p99 overall and during history requests."""
    warm = run.start + WARMUP_S
    scoring = [r for r in run.scoring if r.sent >= warm]
    windows = [(h.sent, h.done) for h in run.history]
    during = [r for r in scoring if any(a <= r.sent <= b for a, b in windows)]
    livez = [r for r in run.livez if r.sent >= warm]
    livez_during = [r for r in livez if any(a <= r.sent <= b for a, b in windows)]
    return {
        "requests": len(run.scoring),
        "non_2xx": sum(not _ok(r) for r in scoring),
        "p99_ms": _p(scoring, 99),
        "p99_ms_during_history": _p(during, 99),
        "livez_p50_ms": _p(livez, 50),
        "livez_p99_ms": _p(livez, 99),
        "livez_p99_ms_during_history": _p(livez_during, 99),
        "livez_max_ms": round(max((r.ms for r in livez), default=0.0), 1),
        "livez_non_2xx": sum(not _ok(r) for r in livez),
        "history_requests": len(run.history),
        "history_statuses": sorted({r.status for r in run.history}),
        "history_p50_ms": _p(run.history, 50),
    }


def targets(result: dict[str, Any]) -> list[str]:
    """One line per target: met or missed, with the figure."""
    lines = []
    kill = result["scenarios"].get("kill")
    if kill:
        rec = kill["recovery_s"]
        lines.append(
            f"non-2xx outside the recovery window: {kill['non_2xx_outside_window']} "
            f"(target 0): {'met' if kill['non_2xx_outside_window'] == 0 else 'missed'}"
        )
        met = rec is not None and rec < RECOVERY_TARGET_S
        lines.append(
            f"recovery: {rec} s (target < {RECOVERY_TARGET_S} s): {'met' if met else 'missed'}"
        )
    hist = result["scenarios"].get("history")
    if hist:
        p99 = hist["livez_p99_ms"]
        met = p99 is not None and p99 < LIVEZ_P99_TARGET_MS
        lines.append(
            f"/livez p99 during history requests: {p99} ms "
            f"(target < {LIVEZ_P99_TARGET_MS:.0f} ms): {'met' if met else 'missed'}"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The results as two small tables and the targets."""
    out = [
        f"Soak run {result['date']} ({result['seconds']} s a scenario, "
        f"{result['clients']} clients; load average at end {result['load_1m']}; "
        f"{result['cpus']} CPUs shared by client and server)",
        "",
    ]
    kill = result["scenarios"].get("kill")
    if kill:
        out += [
            "| kill: requests | recovery s | non-2xx in window | non-2xx outside | "
            "p99 ms before | p99 ms after | death logged |",
            "|---:|---:|---:|---:|---:|---:|---|",
            f"| {kill['requests']} | {kill['recovery_s']} | {kill['non_2xx_in_window']} | "
            f"{kill['non_2xx_outside_window']} | {kill['p99_ms_before']} | "
            f"{kill['p99_ms_after']} | {'yes' if kill['death_logged'] else 'no'} |",
            "",
        ]
    hist = result["scenarios"].get("history")
    if hist:
        out += [
            "| history: requests | non-2xx | p99 ms | p99 ms during history | "
            "/livez p50 ms | /livez p99 ms | /livez max ms | history statuses | history p50 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
            f"| {hist['requests']} | {hist['non_2xx']} | {hist['p99_ms']} | "
            f"{hist['p99_ms_during_history']} | {hist['livez_p50_ms']} | "
            f"{hist['livez_p99_ms']} | {hist['livez_max_ms']} | "
            f"{hist['history_statuses']} | {hist['history_p50_ms']} |",
            "",
        ]
    out += [f"- {line}" for line in targets(result)]
    return "\n".join(out) + "\n"


# -- main -----------------------------------------------------------------------------------


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("RAPPORT_HOME", ".rapport")),
        help="RAPPORT_HOME with champion models and snapshot.parquet (`rapport demo`)",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each scenario")
    parser.add_argument("--clients", type=int, default=32, help="concurrent scoring clients")
    parser.add_argument("--history-mb", type=float, default=20.0, help="history request size")
    parser.add_argument("--history-every", type=float, default=5.0, help="seconds between them")
    parser.add_argument("--scenarios", default="kill,history", help="kill, history or both")
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to ready")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument("--label", default="", help="suffix of the results files")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _raise_interrupt)  # servers are stopped on the way out
    args.home = args.home.resolve()
    if not (args.home / "mlflow.db").exists() or not (args.home / "snapshot.parquet").exists():
        raise SystemExit(f"no models or snapshot in {args.home}: run `rapport demo` first")
    stem = "soak" + (f"_{args.label}" if args.label else "")
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "seconds": args.seconds,
        "clients": args.clients,
        "cpus": os.cpu_count(),
        "scenarios": {},
    }
    for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
        port = free_port()
        log = args.out / "soak_logs" / f"{stem}_{scenario}.log"
        print(f"{scenario}: rapport serve on 127.0.0.1:{port}, {args.seconds:.0f} s", flush=True)
        extra = {}
        if scenario == "history":
            body_bytes = int(args.history_mb * 1.5e6)
            extra = {"RAPPORT_MAX_BODY_BYTES": str(body_bytes)}
            extra["RAPPORT_MAX_REQUEST_EVENTS"] = str(body_bytes // 50)
        with serving(args.home, port, log, args.ready_timeout, extra) as proc:
            run = asyncio.run(drive(f"http://127.0.0.1:{port}", proc.pid, args, scenario))
        figures = kill_figures(run, log) if scenario == "kill" else history_figures(run)
        result["scenarios"][scenario] = figures
        print(json.dumps(figures), flush=True)
    result["load_1m"] = round(os.getloadavg()[0], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / f"{stem}.md").write_text(md)
    print(f"\n{md}\nwrote {args.out / stem}.json and .md", flush=True)


if __name__ == "__main__":
    main()
