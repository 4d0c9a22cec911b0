"""Feature-building benchmark: Rapport (DuckDB) beside a bare scan and idiomatic pandas.

Usage::

    uv run python bench/features_bench.py                      # 1M and 10M transactions
    uv run python bench/features_bench.py --sizes 1000000      # quicker

For each size a seeded synthetic world (about as many interactions as transactions) is written
to Parquet once, then every measurement runs in a fresh subprocess so that its peak memory
(the high-water mark of its own address space, ``VmHWM``) is its own:

- ``scan``: DuckDB reads the same columns of both Parquet files (a bare aggregate: nothing
  is kept, so this is the strictest reading of the target's "bare scan");
- ``read``: DuckDB reads the same columns of both files into memory (Arrow tables): a scan
  that keeps what it reads, as every contender below must;
- ``rapport``: ``build_features`` on the Parquet paths, one cutoff (the default engine: from
  2M event rows x cutoffs the grid, where DuckDB reads the rows, compiled kernels aggregate
  them and the feature SQL derives the features; below it the feature SQL alone);
- ``rapport_sql``: the same cutoff by the feature SQL alone (``cutoff_batch=1``);
- ``rapport_shuffled``, ``rapport_sql_shuffled`` and ``pandas_shuffled``: on a copy of the
  world with its rows in random order (the generator writes them grouped by customer and
  time, which spares the default engine its sort and helps its memory access);
- ``plain``: a straightforward DuckDB query (``bench/plain_duckdb.py``: ``FILTER`` aggregates,
  ``COUNT(DISTINCT)``, a subset of the features), the target's reference point;
- ``rapport_12``: the same with 12 monthly cutoffs (a training set), computed by the grid
  (one pass over the events for every cutoff, the default);
- ``rapport_12_sql``: the 12 cutoffs by the feature SQL instead (``cutoff_batch``: all 12 in
  one query up to 1M transactions, one per query above, the faster batching at each size);
- ``rapport_frames``: load + validate both tables into pandas, then ``build_features``;
- ``pandas``: ``pd.read_parquet`` + ``tests/features/pandas_reference.py`` (the tests' oracle:
  the same features, one cutoff).

Runs go in rounds, one run of every contender per round, and each keeps its best: a slow spell
of this shared machine then falls on every contender, not on whichever ran during it.
Ratios are what to read (this machine is shared and noisy): results go to
``bench/results/features.json`` and ``bench/results/features.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from peak_memory import peak_gb

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
AS_OF = "2025-06-30"
CUTOFFS_12 = [
    "2024-07-31",
    "2024-08-31",
    "2024-09-30",
    "2024-10-31",
    "2024-11-30",
    "2024-12-31",
    "2025-01-31",
    "2025-02-28",
    "2025-03-31",
    "2025-04-30",
    "2025-05-31",
    "2025-06-30",
]


def _world(n_transactions: int, seed: int) -> Path:
    from rapport.features.synthetic import (
        SyntheticConfig,
        customers_for_transactions,
        write_synthetic,
    )

    out = RESULTS / f"data_{n_transactions}_{seed}"
    if not (out / "transactions.parquet").exists():
        config = SyntheticConfig(n_customers=customers_for_transactions(n_transactions), seed=seed)
        write_synthetic(config, out, progress=True)
    return out


def _shuffled(data: Path) -> Path:
    """A copy of a world with its rows in a random (hash) order, written once."""
    import duckdb

    out = data / "shuffled"
    if not (out / "interactions.parquet").exists():
        out.mkdir(exist_ok=True)
        con = duckdb.connect()
        for name in ("transactions", "interactions"):
            con.execute(
                f"COPY (SELECT * FROM read_parquet('{data / name}.parquet') "
                "ORDER BY hash(customer_id, timestamp)) "
                f"TO '{out / name}.parquet' (FORMAT parquet)"
            )
    return out


def _worker(kind: str, data: Path) -> dict[str, float]:
    """Run one measurement in this process; return wall seconds, peak RSS and row count."""
    import duckdb
    import pandas as pd

    from rapport.features.build import build_features
    from rapport.features.contracts import load_interactions, load_transactions

    sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "features")]
    from pandas_reference import pandas_features
    from plain_duckdb import plain_features

    if kind.startswith("rapport"):
        # the engine imports numba (0.18 s) lazily, in a thread beside its reads; it is
        # imported here as pandas and duckdb are for the others. Its first call, which sets
        # up numba's compiler and loads the kernels (about 0.3 s), stays on the clock.
        import rapport.features.kernels  # noqa: F401

    # Imports happen before the clock starts: every contender is timed on its work alone.
    if kind.endswith("_shuffled"):
        data, kind = data / "shuffled", kind.removesuffix("_shuffled")
    tx_path, ix_path = data / "transactions.parquet", data / "interactions.parquet"
    start = time.perf_counter()
    rows = 0
    if kind == "scan":
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        con.execute(
            f"SELECT MIN(customer_id), MAX(timestamp), SUM(amount) FROM read_parquet('{tx_path}')"
        ).fetchall()
        con.execute(
            "SELECT MIN(customer_id), MAX(timestamp), COUNT(DISTINCT channel), "
            f"COUNT(DISTINCT event) FROM read_parquet('{ix_path}')"
        ).fetchall()
    elif kind == "read":
        con = duckdb.connect()
        con.execute("SET TimeZone = 'UTC'")
        tables = [
            con.execute(
                f"SELECT customer_id, timestamp, amount FROM read_parquet('{tx_path}')"
            ).to_arrow_table(),
            con.execute(
                f"SELECT customer_id, timestamp, channel, event FROM read_parquet('{ix_path}')"
            ).to_arrow_table(),
        ]
        rows = sum(t.num_rows for t in tables)
    elif kind in ("rapport", "rapport_12"):
        cutoffs = AS_OF if kind == "rapport" else CUTOFFS_12
        rows = len(build_features(tx_path, ix_path, as_of=cutoffs, validate=False))
    elif kind == "rapport_sql":
        rows = len(build_features(tx_path, ix_path, as_of=AS_OF, validate=False, cutoff_batch=1))
    elif kind == "rapport_12_sql":
        batch = 12 if _size(data) <= 1_000_000 else 1
        rows = len(
            build_features(tx_path, ix_path, as_of=CUTOFFS_12, validate=False, cutoff_batch=batch)
        )
    elif kind == "rapport_frames":
        tx, ix = load_transactions(tx_path), load_interactions(ix_path)
        rows = len(build_features(tx, ix, as_of=AS_OF, validate=False))
    elif kind == "plain":
        rows = len(plain_features(tx_path, ix_path, as_of=AS_OF))
    elif kind == "pandas":
        tx, ix = pd.read_parquet(tx_path), pd.read_parquet(ix_path)
        rows = len(pandas_features(tx, ix, as_of=AS_OF))
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_gb": peak_gb(), "rows": rows}


def _size(data: Path) -> int:
    """The nominal transaction count a world was generated for (from its folder name)."""
    return int(data.name.split("_")[1])


def _run_once(kind: str, data: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--data", str(data)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _measure(
    kinds: list[str], data: Path, repeats: int
) -> tuple[dict[str, dict[str, float]], list[dict[str, float]]]:
    """The best of ``repeats`` runs of each contender, run in rounds of one run each.

    Also each round's seconds by contender: ratios within a round compare runs made minutes
    apart, where the best of each may come from different spells of the machine.
    """
    best: dict[str, dict[str, float]] = {}
    rounds: list[dict[str, float]] = []
    for round_ in range(repeats):
        rounds.append({})
        for kind in kinds:
            result = _run_once(kind, data)
            print(f"{_size(data):>11,} round {round_ + 1} {kind:<20} {result}", flush=True)
            rounds[-1][kind] = result["seconds"]
            if kind not in best or result["seconds"] < best[kind]["seconds"]:
                best[kind] = result
    return best, rounds


def _by_round(rounds: list[dict[str, float]]) -> dict[str, list[float]]:
    """Per round: rapport's time over the scan's and the read's, pandas' over rapport's."""
    pairs = {
        "rapport_over_scan": ("rapport", "scan"),
        "rapport_over_read": ("rapport", "read"),
        "pandas_over_rapport": ("pandas", "rapport"),
        "cutoffs12_over_1": ("rapport_12", "rapport"),
        "shuffled_pandas_over_rapport": ("pandas_shuffled", "rapport_shuffled"),
    }
    return {
        name: [r[a] / r[b] for r in rounds]
        for name, (a, b) in pairs.items()
        if all(a in r and b in r for r in rounds)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000", help="transaction counts")
    parser.add_argument("--seed", type=int, default=1, help="synthetic data seed")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement (best)")
    parser.add_argument(
        "--pandas-max", type=int, default=10_000_000, help="skip pandas above this size"
    )
    parser.add_argument(
        "--cutoffs12-max",
        type=int,
        default=10_000_000,
        help="skip the 12-cutoff runs above this size (their output is 12x the rows)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, Path(args.data))))
        return

    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "as_of": AS_OF,
        "sizes": {},
    }
    lines = [
        "| transactions | interactions | customers | scan s | read s "
        "| rapport s (x scan, x read) | peak GB | by SQL s (x rapport) "
        "| plain DuckDB s (x rapport) | 12 cutoffs s (x 1) "
        "| 12 cutoffs peak GB | rows shuffled: rapport s, by SQL s, pandas s (x rapport) "
        "| 12 cutoffs by SQL s (x 1) | load+validate+features s | pandas s (x rapport) "
        "| pandas peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    spread: list[str] = []
    import pyarrow.parquet as pq

    for size in [int(s) for s in args.sizes.split(",")]:
        data = _world(size, args.seed)
        n_tx = pq.ParquetFile(data / "transactions.parquet").metadata.num_rows
        n_ix = pq.ParquetFile(data / "interactions.parquet").metadata.num_rows
        _shuffled(data)
        kinds = ["scan", "read", "rapport", "rapport_sql", "plain", "rapport_frames"]
        kinds += ["rapport_shuffled", "rapport_sql_shuffled"]
        if size <= args.cutoffs12_max:
            kinds += ["rapport_12", "rapport_12_sql"]
        if size <= args.pandas_max:
            kinds += ["pandas", "pandas_shuffled"]
        res, rounds = _measure(kinds, data, args.repeats)
        by_round = _by_round(rounds)
        scan, read, rap = res["scan"], res["read"], res["rapport"]
        rap12, pandas = res.get("rapport_12"), res.get("pandas")
        sql12 = res.get("rapport_12_sql")
        ratios = {
            "rapport_over_scan": rap["seconds"] / scan["seconds"],
            "rapport_over_read": rap["seconds"] / read["seconds"],
            "cutoffs12_over_1": rap12["seconds"] / rap["seconds"] if rap12 else None,
            "sql_cutoffs12_over_1": sql12["seconds"] / rap["seconds"] if sql12 else None,
            "pandas_over_rapport": pandas["seconds"] / rap["seconds"] if pandas else None,
            "plain_over_rapport": res["plain"]["seconds"] / rap["seconds"],
            "sql_over_rapport": res["rapport_sql"]["seconds"] / rap["seconds"],
            "shuffled_pandas_over_rapport": (
                res["pandas_shuffled"]["seconds"] / res["rapport_shuffled"]["seconds"]
                if "pandas_shuffled" in res
                else None
            ),
        }
        report["sizes"][str(size)] = {  # type: ignore[index]
            "transactions": n_tx,
            "interactions": n_ix,
            **res,
            "ratios": ratios,
            "rounds": rounds,
            "ratios_by_round": by_round,
        }
        cells = [
            f"{n_tx:,}",
            f"{n_ix:,}",
            f"{rap['rows']:,.0f}",
            f"{scan['seconds']:.2f}",
            f"{read['seconds']:.2f}",
            f"{rap['seconds']:.2f} ({ratios['rapport_over_scan']:.1f}x, "
            f"{ratios['rapport_over_read']:.1f}x)",
            f"{rap['peak_gb']:.2f}",
            f"{res['rapport_sql']['seconds']:.2f} ({ratios['sql_over_rapport']:.2f}x)",
            f"{res['plain']['seconds']:.2f} ({ratios['plain_over_rapport']:.2f}x)",
            f"{rap12['seconds']:.1f} ({ratios['cutoffs12_over_1']:.1f}x)" if rap12 else "skipped",
            f"{rap12['peak_gb']:.2f}" if rap12 else "skipped",
            f"{res['rapport_shuffled']['seconds']:.2f}, "
            f"{res['rapport_sql_shuffled']['seconds']:.2f}, "
            + (
                f"{res['pandas_shuffled']['seconds']:.1f} "
                f"({ratios['shuffled_pandas_over_rapport']:.2f}x)"
                if "pandas_shuffled" in res
                else "-"
            ),
            f"{sql12['seconds']:.1f} ({ratios['sql_cutoffs12_over_1']:.1f}x)"
            if sql12
            else "skipped",
            f"{res['rapport_frames']['seconds']:.1f}",
            f"{pandas['seconds']:.1f} ({ratios['pandas_over_rapport']:.2f}x)"
            if pandas
            else "skipped",
            f"{pandas['peak_gb']:.2f}" if pandas else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        spread.append(
            f"{n_tx:,} transactions, round by round: "
            + "; ".join(
                f"{name.replace('_', ' ')} " + ", ".join(f"{x:.2f}x" for x in values)
                for name, values in by_round.items()
            )
        )
    (RESULTS / "features.json").write_text(json.dumps(report, indent=2))
    table = "\n".join(lines) + "\n\n" + "\n".join(f"- {line}" for line in spread)
    (RESULTS / "features.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
