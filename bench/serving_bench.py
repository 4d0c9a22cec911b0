"""Serving benchmark: Rapport on BentoML against the same app on bare uvicorn and MLflow's server.

Usage::

    uv run --locked --extra dev python bench/serving_bench.py           # full (~6 min)
    uv run --locked --extra dev python bench/serving_bench.py --quick   # a smoke run (~2 min)

Each server starts in turn as a subprocess on a free loopback port (its own process group,
stopped whatever happens), and an aiohttp client drives it with N concurrent workers, each
sending its next request as soon as the previous one is answered (closed loop; one session,
``TCPConnector(limit=N)``, keep-alive). Every level has a warm-up, then a measured phase
bounded by time and by request count. Latency is measured on the client, from sending a
request to reading the whole response; req/s is completed requests over the measured wall
time. Servers:

- ``rapport``: ``bentoml serve rapport.serving.service:Rapport`` (1 worker), the service as
  deployed (BentoML's access log on, as by default);
- ``bare``: the very same FastAPI app and scoring code without BentoML,
  ``uvicorn --factory rapport.serving.api:standalone_app`` (1 worker, no access log). The
  Rapport/bare ratio is BentoML's overhead;
- ``mlflow``: ``mlflow models serve -m models:/rapport-churn@champion`` (1 worker). It serves
  the churn model only, where a Rapport request scores both the churn and the value model;
- ``unpatched``: ``bench/unpatched_service.py``, Rapport's service without the
  ``TimeoutMiddleware`` fix of :mod:`rapport.serving.patches`, in the sustained run only.

Scenarios: one customer a request (rows rotate through ``--customers`` snapshot customers) at
concurrency 1, 8 and 32 on rapport, bare and mlflow; batches of 100 customers at 1 and 8; a
sustained run (60 s, concurrency 32, one customer a request) on rapport and unpatched.

Ratios are what to read: the machine is shared and noisy, so absolute numbers move from run
to run while ratios taken within one run hold better. With two CPUs or more the servers are
pinned to one CPU and the client to another, and the servers' CPU time is read from
``/proc`` (CPU ms a request tells where the time goes and whether the server was saturated).
Targets are checked and marked met/missed. Results go to ``bench/results/serving.json`` and
``bench/results/serving.md`` (a table ready for the README); servers' logs to
``bench/results/serving_logs/``. Nothing leaves the loopback interface (BentoML's and MLflow's
usage tracking are turned off).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import itertools
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
JSON_HEADERS = {"Content-Type": "application/json"}
BATCH = 100
SINGLE_LEVELS = (1, 8, 32)
BATCH_LEVELS = (1, 8)
SUSTAINED_CONCURRENCY = 32
SERVERS = ("rapport", "bare", "mlflow", "unpatched")
LABELS = {
    "rapport": "Rapport (BentoML)",
    "bare": "bare FastAPI + uvicorn",
    "mlflow": "mlflow models serve (churn only)",
    "unpatched": "Rapport, unpatched TimeoutMiddleware",
}


@dataclass(frozen=True)
class Mode:
    """How long each load level runs."""

    warmup_s: float
    measure_s: float
    max_requests: int
    sustained_s: float


FULL = Mode(warmup_s=2.0, measure_s=8.0, max_requests=20_000, sustained_s=60.0)
QUICK = Mode(warmup_s=0.5, measure_s=2.0, max_requests=20_000, sustained_s=5.0)


@dataclass(frozen=True)
class ServerSpec:
    """A server to start: command, environment and the paths the load uses."""

    name: str
    port: int
    argv: list[str]
    env: dict[str, str]
    ready_path: str
    score_path: str
    payload: str  # "rapport" (feature rows with ids) or "mlflow" (dataframe_records)


@dataclass
class Level:
    """One measured load level."""

    scenario: str
    server: str
    concurrency: int
    customers_per_request: int
    requests: int
    seconds: float
    rps: float
    customers_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    non_2xx: int
    errors: int
    statuses: dict[str, int]
    error_samples: list[str]
    server_cpu_pct: float | None
    server_cpu_ms_per_request: float | None
    client_cpu_pct: float
    window_p99_ms: list[float] = field(default_factory=list)


# -- machine and command --------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _command() -> str:
    """The command line that started this run (uv's, when run by ``uv run``)."""
    argv = ["python", *sys.argv]
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        parent = [a.decode() for a in raw.split(b"\0") if a]
    except OSError:
        parent = []
    if parent and Path(parent[0]).name == "uv":
        return shlex.join(["uv", *parent[1:]])
    return shlex.join(argv)


def _machine(pinning: dict[str, Any]) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d) for d in ("bentoml", "fastapi", "uvicorn", "mlflow", "aiohttp", "uvloop")
        },
        "pinning": pinning,
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# -- payloads -------------------------------------------------------------------------------


def ensure_snapshot(home: Path) -> Path:
    """The serving snapshot; built from the demo data (as of its last purchase) if missing."""
    path = home / "snapshot.parquet"
    if path.exists():
        return path
    tx, ix = home / "demo" / "transactions.parquet", home / "demo" / "interactions.parquet"
    if not tx.exists():
        raise SystemExit(f"no snapshot at {path} and no demo data at {tx}: run `rapport demo`")
    as_of = pd.read_parquet(tx, columns=["timestamp"])["timestamp"].max().date().isoformat()
    argv = [str(BIN / "rapport"), "features", "build", "-t", str(tx), "--as-of", as_of]
    argv += ["--out", str(path)] + (["-i", str(ix)] if ix.exists() else [])
    print(f"building the snapshot: {shlex.join(argv)}", flush=True)
    subprocess.run(argv, check=True, env=_base_env(home), stdin=subprocess.DEVNULL)
    return path


def _jsonable(value: Any) -> Any:
    """A JSON value: NaN/NA as null, numpy scalars as Python numbers, dates as ISO text."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp | dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, np.integer | int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, np.floating | float):
        return None if math.isnan(value) else float(value)
    return str(value)


def load_rows(snapshot: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` snapshot customers (a seeded sample) as flat JSON rows."""
    frame = pd.read_parquet(snapshot)
    frame = frame.sample(n=min(n, len(frame)), random_state=seed).reset_index(drop=True)
    records = frame.to_dict("records")
    rows = [{str(k): _jsonable(v) for k, v in rec.items()} for rec in records]
    for row in rows:
        row["customer_id"] = str(row["customer_id"])
    return rows


def _encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def make_bodies(rows: list[dict[str, Any]], payload: str, per_request: int) -> list[bytes]:
    """Request bodies, encoded once, each with ``per_request`` consecutive rows (wrapping)."""
    if payload == "mlflow":
        rows = [{k: v for k, v in r.items() if k not in ("customer_id", "as_of")} for r in rows]
    count = len(rows)
    step = 1 if per_request == 1 else max(1, count // 50)  # batches: ~50 distinct bodies
    bodies = []
    for start in range(0, count, step):
        chunk = [rows[(start + i) % count] for i in range(per_request)]
        obj: dict[str, Any] = (
            {"dataframe_records": chunk}
            if payload == "mlflow"
            else {"customers": chunk, "explain": 0}
        )
        bodies.append(_encode(obj))
    return bodies


# -- servers --------------------------------------------------------------------------------


def free_port() -> int:
    """A free loopback port (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _base_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["RAPPORT_HOME"] = str(home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)  # Rapport derives it from RAPPORT_HOME
    # Loopback only: no usage tracking.
    env.update(BENTOML_DO_NOT_TRACK="True", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def server_spec(name: str, home: Path, port: int) -> ServerSpec:
    """How to start ``name`` on ``port``."""
    env = _base_env(home)
    host = ["--host", "127.0.0.1"]
    if name == "rapport":
        argv = [str(BIN / "bentoml"), "serve", "rapport.serving.service:Rapport", *host]
        return ServerSpec(
            name, port, [*argv, "--port", str(port)], env, "/readyz", "/v1/score", name
        )
    if name == "unpatched":
        argv = [str(BIN / "bentoml"), "serve", "unpatched_service:RapportUnpatched"]
        argv += ["--working-dir", str(HERE), *host, "--port", str(port)]
        return ServerSpec(name, port, argv, env, "/readyz", "/v1/score", "rapport")
    if name == "bare":
        argv = [str(BIN / "uvicorn"), "--factory", "rapport.serving.api:standalone_app", *host]
        argv += ["--port", str(port), "--workers", "1", "--no-access-log"]
        return ServerSpec(name, port, argv, env, "/ready", "/score", "rapport")
    if name == "mlflow":
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(home / 'mlflow.db').resolve()}"
        argv = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/rapport-churn@champion"]
        argv += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
        return ServerSpec(name, port, argv, env, "/ping", "/invocations", "mlflow")
    raise ValueError(f"unknown server {name!r}")


def _tail(path: Path, n: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return ""


class ServerExitedError(RuntimeError):
    """The server exited before it was ready."""


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> float:
    """Seconds until ``url`` answers 200; raises if the server exits or the time runs out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise ServerExitedError(f"exited ({proc.returncode}) before ready:\n{_tail(log)}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=2) as resp,
        ):
            if resp.status == 200:
                return time.monotonic() - start
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s:\n{_tail(log)}")


def _proc_stats() -> dict[int, list[str]]:
    """``/proc/PID/stat`` fields after the command name, by pid (Linux; empty elsewhere)."""
    stats: dict[int, list[str]] = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stats[int(path.parent.name)] = path.read_text().rsplit(")", 1)[1].split()
    return stats


def process_tree(root: int) -> dict[int, str]:
    """``root`` and its live descendants: pid -> start time (to tell a reused pid).

    BentoML's arbiter starts its worker in a session of its own, so the server's process
    group does not hold the whole server: the tree does.
    """
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)  # field 4: ppid
    tree: dict[int, str] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in tree:
            tree[pid] = stats[pid][19]  # field 22: starttime
            todo += children.get(pid, [])
    return tree


def tree_cpu_seconds(root: int) -> float | None:
    """User + system CPU seconds of ``root`` and its live descendants (Linux /proc)."""
    stats = _proc_stats()
    pids = process_tree(root)
    if not pids:
        return None
    ticks = sum(int(stats[p][11]) + int(stats[p][12]) for p in pids if p in stats)
    return ticks / os.sysconf("SC_CLK_TCK")  # fields 14, 15: utime, stime


def _alive(pid: int, start: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[19] == start and fields[0] != "Z"


def stop_server(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever of its tree is left."""
    tree = process_tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: it leads its own group
    deadline = time.monotonic() + grace
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    left = {pid: start for pid, start in tree.items() if pid != proc.pid}
    while any(_alive(p, s) for p, s in left.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid, start in left.items():
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.contextmanager
def running(
    spec: ServerSpec, log: Path, cpus: set[int] | None, ready_timeout: float
) -> Iterator[tuple[str, subprocess.Popen[bytes], float]]:
    """Start ``spec``, yield ``(base_url, process, seconds_to_ready)``, always stop it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    preexec: Callable[[], None] | None = None
    if cpus:
        pinned = set(cpus)

        def preexec() -> None:
            os.sched_setaffinity(0, pinned)

    base = f"http://127.0.0.1:{spec.port}"
    for attempt in (1, 2):  # once more if it dies while starting (a shared machine)
        with log.open("wb" if attempt == 1 else "ab") as out:
            proc = subprocess.Popen(
                spec.argv,
                env=spec.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )
        try:
            ready_s = wait_ready(proc, base + spec.ready_path, log, ready_timeout)
        except ServerExitedError as err:
            stop_server(proc)
            if attempt == 2:
                raise
            print(f"   {spec.name} {err}\n   starting it again", flush=True)
            continue
        except BaseException:
            stop_server(proc)
            raise
        break
    try:
        yield base, proc, ready_s
    finally:
        stop_server(proc)


# -- load -----------------------------------------------------------------------------------


@dataclass
class Sample:
    """Raw results of one load phase."""

    starts: list[float]
    latencies: list[float]
    statuses: Counter[int]
    errors: Counter[str]
    seconds: float


async def drive(
    session: aiohttp.ClientSession,
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    seconds: float,
    max_requests: int,
) -> Sample:
    """``concurrency`` workers send requests back to back until time or count runs out."""
    starts: list[float] = []
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    issued = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() < deadline:
            body = bodies[issued % len(bodies)]
            issued += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError, OSError) as err:
                errors[f"{type(err).__name__}: {err}"[:200]] += 1
                continue
            starts.append(t0 - start)
            latencies.append(time.perf_counter() - t0)
            statuses[status] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Sample(starts, latencies, statuses, errors, time.perf_counter() - start)


async def _load(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    warmup: float,
    seconds: float,
    cap: int,
    server_cpu: Callable[[], float | None],
) -> tuple[Sample, float | None, float]:
    """Warm up, then measure; also the server's and this client's CPU seconds meanwhile."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if warmup > 0:
            await drive(session, url, bodies, concurrency, warmup, sys.maxsize)
        gc.collect()
        cpu0, client0 = server_cpu(), time.process_time()
        sample = await drive(session, url, bodies, concurrency, seconds, cap)
        cpu1, client1 = server_cpu(), time.process_time()
    used = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return sample, used, client1 - client0


def measure(
    *,
    scenario: str,
    server: str,
    proc: subprocess.Popen[bytes],
    url: str,
    bodies: Sequence[bytes],
    per_request: int,
    concurrency: int,
    warmup: float,
    seconds: float,
    max_requests: int,
    windows: int = 0,
) -> Level:
    """Warm up, measure one level, summarise (latencies in ms)."""
    sample, server_cpu, client_cpu = asyncio.run(
        _load(
            url,
            bodies,
            concurrency,
            warmup,
            seconds,
            max_requests,
            lambda: tree_cpu_seconds(proc.pid),
        )
    )
    lat = np.asarray(sample.latencies) * 1000.0
    n = len(lat)

    def pct(q: float, values: np.ndarray = lat) -> float:
        return round(float(np.percentile(values, q)), 3) if len(values) else math.nan

    window_p99: list[float] = []
    if windows and n:
        starts = np.asarray(sample.starts)
        edges = np.linspace(0.0, sample.seconds, windows + 1)
        for lo, hi in itertools.pairwise(edges):
            window_p99.append(pct(99, lat[(starts >= lo) & (starts < hi)]))
    non_2xx = sum(c for s, c in sample.statuses.items() if not 200 <= s < 300)
    return Level(
        scenario=scenario,
        server=server,
        concurrency=concurrency,
        customers_per_request=per_request,
        requests=n,
        seconds=round(sample.seconds, 3),
        rps=round(n / sample.seconds, 1),
        customers_per_s=round(n * per_request / sample.seconds, 1),
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        p999_ms=pct(99.9),
        max_ms=round(float(lat.max()), 3) if n else math.nan,
        mean_ms=round(float(lat.mean()), 3) if n else math.nan,
        non_2xx=non_2xx,
        errors=sum(sample.errors.values()),
        statuses={str(s): c for s, c in sorted(sample.statuses.items())},
        error_samples=[f"{c}x {e}" for e, c in sample.errors.most_common(3)],
        server_cpu_pct=(
            round(100 * server_cpu / sample.seconds, 1) if server_cpu is not None else None
        ),
        server_cpu_ms_per_request=(
            round(1000 * server_cpu / n, 3) if server_cpu is not None and n else None
        ),
        client_cpu_pct=round(100 * client_cpu / sample.seconds, 1),
        window_p99_ms=window_p99,
    )


def check_inputs(base: str, rows: list[dict[str, Any]]) -> None:
    """Fail early if the rows lack a field the served models read (``GET /v1/info``)."""
    with urllib.request.urlopen(base + "/v1/info", timeout=10) as resp:
        info = json.load(resp)
    missing = sorted(set(info.get("inputs", [])) - set(rows[0]))
    if missing:
        raise SystemExit(f"snapshot rows lack served inputs: {missing}")


def run_server(
    name: str,
    *,
    home: Path,
    rows: list[dict[str, Any]],
    mode: Mode,
    logs: Path,
    cpus: set[int] | None,
    ready_timeout: float,
    scenarios: Sequence[str],
) -> tuple[list[Level], float]:
    """All of ``name``'s scenarios on one server process; returns levels, seconds to ready."""
    spec = server_spec(name, home, free_port())
    single = make_bodies(rows, spec.payload, 1)
    batch = make_bodies(rows, spec.payload, BATCH)
    levels: list[Level] = []
    print(f"\n== {LABELS[name]}: {shlex.join(spec.argv)}", flush=True)
    with running(spec, logs / f"{name}.log", cpus, ready_timeout) as (base, proc, ready_s):
        print(f"   ready in {ready_s:.1f} s", flush=True)
        if spec.payload == "rapport" and name == "rapport":
            check_inputs(base, rows)
        url = base + spec.score_path
        # (scenario, bodies, customers a request, concurrency, seconds, request cap, windows)
        plan: list[tuple[str, Sequence[bytes], int, int, float, int, int]] = []
        if "single" in scenarios:
            plan += [
                ("single", single, 1, c, mode.measure_s, mode.max_requests, 0)
                for c in SINGLE_LEVELS
            ]
        if "batch" in scenarios:
            plan += [
                ("batch", batch, BATCH, c, mode.measure_s, mode.max_requests, 0)
                for c in BATCH_LEVELS
            ]
        if "sustained" in scenarios:  # bounded by time only, p99 over 6 windows
            sus = SUSTAINED_CONCURRENCY
            plan.append(("sustained", single, 1, sus, mode.sustained_s, sys.maxsize, 6))
        for scenario, bodies, per, conc, seconds, cap, windows in plan:
            level = measure(
                scenario=scenario,
                server=name,
                proc=proc,
                url=url,
                bodies=bodies,
                per_request=per,
                concurrency=conc,
                warmup=mode.warmup_s,
                seconds=seconds,
                max_requests=cap,
                windows=windows,
            )
            levels.append(level)
            print("   " + _level_line(level), flush=True)
    return levels, ready_s


def _level_line(lv: Level) -> str:
    cpu = f"{lv.server_cpu_pct:5.1f}%" if lv.server_cpu_pct is not None else "  n/a"
    bad = f" non-2xx={lv.non_2xx} errors={lv.errors}" if lv.non_2xx or lv.errors else ""
    return (
        f"{lv.scenario:9s} x{lv.customers_per_request:<3d} c={lv.concurrency:<2d} "
        f"{lv.requests:6d} req {lv.rps:8.1f} req/s  p50 {lv.p50_ms:7.2f}  p99 {lv.p99_ms:7.2f}"
        f"  max {lv.max_ms:7.1f} ms  server cpu {cpu}{bad}"
    )


# -- targets and report ---------------------------------------------------------------------


def _find(levels: list[Level], server: str, scenario: str, conc: int) -> Level | None:
    for lv in levels:
        if lv.server == server and lv.scenario == scenario and lv.concurrency == conc:
            return lv
    return None


def targets(levels: list[Level]) -> list[dict[str, Any]]:
    """The targets: value, bound and whether it is met (None: not measured)."""

    def ratio(a: str, b: str, scenario: str, conc: int) -> float | None:
        x, y = _find(levels, a, scenario, conc), _find(levels, b, scenario, conc)
        return round(x.rps / y.rps, 3) if x and y and y.rps else None

    def p99(server: str, scenario: str, conc: int) -> float | None:
        lv = _find(levels, server, scenario, conc)
        return lv.p99_ms if lv else None

    def floor(server: str, scenario: str, conc: int) -> str:
        # A closed loop of `conc` clients at R req/s waits conc / R on average (Little's law).
        lv = _find(levels, server, scenario, conc)
        if not lv or not lv.rps:
            return ""
        return f"mean latency at c={conc} and {lv.rps:,.0f} req/s is {1000 * conc / lv.rps:.1f} ms"

    bad = float(sum(lv.non_2xx + lv.errors for lv in levels))
    sus = SUSTAINED_CONCURRENCY
    rows: list[tuple[str, float | None, str, float, str]] = [
        (
            "Rapport/bare req/s, 1 customer, c=1",
            ratio("rapport", "bare", "single", 1),
            ">=",
            0.5,
            "",
        ),
        (
            "Rapport/bare req/s, 1 customer, c=8",
            ratio("rapport", "bare", "single", 8),
            ">=",
            0.35,
            "",
        ),
        (
            "Rapport/mlflow req/s, 1 customer, c=8",
            ratio("rapport", "mlflow", "single", 8),
            ">=",
            5,
            "",
        ),
        (
            "Rapport p99 ms, 1 customer, c=8",
            p99("rapport", "single", 8),
            "<=",
            10,
            floor("rapport", "single", 8),
        ),
        (
            "Rapport p99 ms, sustained c=32",
            p99("rapport", "sustained", sus),
            "<=",
            40,
            floor("rapport", "sustained", sus),
        ),
        (
            "Rapport/bare req/s, 100 customers, c=1",
            ratio("rapport", "bare", "batch", 1),
            ">=",
            0.9,
            "",
        ),
        (
            "Rapport/bare req/s, 100 customers, c=8",
            ratio("rapport", "bare", "batch", 8),
            ">=",
            0.9,
            "",
        ),
        ("non-2xx + errors, all levels", bad, "<=", 0, ""),
    ]
    out = []
    for name, value, op, bound, note in rows:
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append(
            {"target": name, "value": value, "op": op, "bound": bound, "met": met, "note": note}
        )
    return out


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The report as Markdown."""
    m = result["machine"]
    v = m["versions"]
    lines = [
        f"### Serving benchmark ({result['mode']}, {result['date']})",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['platform']}, "
        f"Python {m['python']}; bentoml {v['bentoml']}, fastapi {v['fastapi']}, "
        f"uvicorn {v['uvicorn']}, mlflow {v['mlflow']}, aiohttp {v['aiohttp']}",
        f"- pinning: {m['pinning']['note']}",
        f"- load: closed loop, aiohttp, keep-alive; per level {result['settings']['warmup_s']} s "
        f"warm-up then up to {result['settings']['measure_s']} s or "
        f"{result['settings']['max_requests']:,} requests; sustained run "
        f"{result['settings']['sustained_s']} s at c={SUSTAINED_CONCURRENCY}; one-customer rows "
        f"rotate through {result['settings']['customers']:,} snapshot customers",
        "- `mlflow models serve` scores the churn model only; a Rapport request scores both "
        "the churn and the value model (and returns BG/NBD outputs for both)",
        "- shared, noisy machine (1-min load average "
        f"{m['load_average_1m_at_start']} at start, {result['load_average_1m_at_end']} at end): "
        "read the ratios (taken within one run), not absolute numbers",
        "",
        "| target | value | bound | | note |",
        "|---|---:|---:|---|---|",
    ]
    for t in result["targets"]:
        mark = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(
            f"| {t['target']} | {_fmt(t['value'], 2)} | {t['op']} {t['bound']} | {mark} "
            f"| {t['note']} |"
        )
    lines += [
        "",
        "| scenario | server | c | req/s | customers/s | p50 ms | p99 ms | max ms "
        "| server CPU | server CPU ms/req | non-2xx / errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in result["levels"]:
        scen = {"single": "1 customer", "batch": f"{BATCH} customers", "sustained": "sustained"}
        lines.append(
            f"| {scen[lv['scenario']]} | {LABELS[lv['server']]} | {lv['concurrency']} "
            f"| {_fmt(lv['rps'])} | {_fmt(lv['customers_per_s'], 0)} | {_fmt(lv['p50_ms'], 2)} "
            f"| {_fmt(lv['p99_ms'], 2)} | {_fmt(lv['max_ms'], 1)} "
            f"| {_fmt(lv['server_cpu_pct'], 0)}% | {_fmt(lv['server_cpu_ms_per_request'], 2)} "
            f"| {lv['non_2xx']} / {lv['errors']} |"
        )
    sustained = [lv for lv in result["levels"] if lv["scenario"] == "sustained"]
    if sustained:
        lines += ["", "Sustained runs, p99 (ms) in each sixth of the run:", ""]
        for lv in sustained:
            p = ", ".join(_fmt(x, 1) for x in lv["window_p99_ms"])
            lines.append(
                f"- {LABELS[lv['server']]}: {lv['requests']:,} requests in {lv['seconds']:.0f} s, "
                f"p99.9 {_fmt(lv['p999_ms'], 1)} ms, max {_fmt(lv['max_ms'], 1)} ms; windows: {p}"
            )
    return "\n".join(lines) + "\n"


def _print_targets(rows: list[dict[str, Any]]) -> None:
    print("\ntargets:")
    for t in rows:
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"  {t['target']:42s} {_fmt(t['value'], 3):>9s}  {t['op']} {t['bound']:<5}  {mark}")


# -- main -----------------------------------------------------------------------------------


def _pinning() -> tuple[set[int] | None, dict[str, Any]]:
    """Server on the first allowed CPU, this client on the second (when two exist)."""
    if not hasattr(os, "sched_setaffinity"):
        return None, {"note": "not pinned (no sched_setaffinity)"}
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, {"note": f"not pinned (1 CPU allowed: {allowed})"}
    server, client = {allowed[0]}, {allowed[1]}
    os.sched_setaffinity(0, client)
    note = f"servers on CPU {allowed[0]}, load client on CPU {allowed[1]} (sched_setaffinity)"
    return server, {"server_cpus": sorted(server), "client_cpus": sorted(client), "note": note}


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK.warmup_s} s warm-up, {QUICK.measure_s} s a level, "
        f"{QUICK.sustained_s} s sustained",
    )
    parser.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("RAPPORT_HOME", ".rapport")),
        help="RAPPORT_HOME with the trained models (mlflow.db) and snapshot.parquet",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated servers to run, of {','.join(SERVERS)}",
    )
    parser.add_argument(
        "--customers", type=int, default=1000, help="snapshot customers the requests rotate"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the customer sample")
    parser.add_argument(
        "--ready-timeout", type=float, default=120.0, help="seconds a server has to get ready"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and client CPUs")
    parser.add_argument("--label", default="", help="suffix of the results files")
    args = parser.parse_args()

    # Stop the servers on Ctrl-C and on SIGTERM too (`finally` blocks run either way).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    mode = QUICK if args.quick else FULL
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(servers) - set(SERVERS))
    if unknown:
        parser.error(f"unknown servers: {unknown}")
    home = args.home.resolve()
    if not (home / "mlflow.db").exists():
        raise SystemExit(f"no models in {home} (no mlflow.db): run `rapport demo` first")
    rows = load_rows(ensure_snapshot(home), args.customers, args.seed)
    cpus, pinning = (None, {"note": "not pinned (--no-pin)"}) if args.no_pin else _pinning()
    machine = _machine(pinning)
    gc.collect()
    gc.freeze()  # the client's long-lived data stays out of its collections

    command = _command()
    started = dt.datetime.now(dt.UTC)
    print(f"{command}\n{pinning['note']}; {len(rows)} customers", flush=True)
    scenarios = {
        "rapport": ("single", "batch", "sustained"),
        "bare": ("single", "batch"),
        "mlflow": ("single", "batch"),
        "unpatched": ("sustained",),
    }
    levels: list[Level] = []
    ready: dict[str, float] = {}
    logs = args.out / "serving_logs"
    for name in servers:
        got, ready_s = run_server(
            name,
            home=home,
            rows=rows,
            mode=mode,
            logs=logs,
            cpus=cpus,
            ready_timeout=args.ready_timeout,
            scenarios=scenarios[name],
        )
        levels += got
        ready[name] = round(ready_s, 2)

    checked = targets(levels)
    result: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "command": command,
        "machine": machine,
        "settings": {**asdict(mode), "customers": len(rows), "batch": BATCH},
        "seconds_to_ready": ready,
        "targets": checked,
        "levels": [asdict(lv) for lv in levels],
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "wall_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
    }
    _print_targets(checked)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"serving{'_' + args.label if args.label else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / f"{stem}.md").write_text(md)
    print(f"\n{md}\nwrote {args.out / stem}.json and .md", flush=True)


if __name__ == "__main__":
    main()
