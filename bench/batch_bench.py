"""Batch scoring benchmark: ``rapport score`` over a million customers, beside MLflow's pyfunc.

Usage::

    uv run --locked --extra dev python bench/batch_bench.py                  # 1M customers
    uv run --locked --extra dev python bench/batch_bench.py --customers 100000

Target: 1M customers scored in under 30 s on this machine, memory bounded
by the chunk size. A seeded synthetic world is written once (``--data``, default
``bench/results/data_batch_<n>/``, never committed). The champion models come from
``--home`` (default ``.rapport``, as ``rapport demo`` leaves it; the synthetic generator gives
the same feature columns at any size). Each job runs in its own subprocess so its peak RSS
(``VmHWM``, see ``peak_memory.py``) is its own:

- ``rapport``: :func:`rapport.serving.batch.score_chunks` + ``score_batch`` (features streamed
  out of DuckDB in chunks, compiled models, Parquet written as it goes), at two chunk sizes
  to show memory following the chunk, not the customer count;
- ``pyfunc``: the alternative a data scientist reaches for, the registered MLflow pyfunc
  models (``mlflow.pyfunc.load_model(...).predict``) on the same features built in one piece
  with ``build_features``, churn then value, written to Parquet.

Ratios are what to read (shared, noisy machine). Results go to ``bench/results/batch.json``
and ``bench/results/batch.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peak_memory import peak_gb

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGET_SECONDS = 30.0


def _worker(job: str, data: Path, home: Path, as_of: str, chunk: int, out: Path) -> dict[str, Any]:
    os.environ["RAPPORT_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from rapport.serving.core import load_models
    from rapport.serving.scoring import Scorer
    from rapport.serving.settings import ServingSettings

    settings = ServingSettings()
    tx, ix = data / "transactions.parquet", data / "interactions.parquet"
    day = dt.date.fromisoformat(as_of)
    start = time.perf_counter()
    if job == "rapport":
        from rapport.serving.batch import score_batch, score_chunks

        churn, value = load_models(settings)
        scorer = Scorer(churn, value)
        loaded = time.perf_counter()
        result = score_batch(
            score_chunks(tx, ix, as_of=day, scorer=scorer, chunk_rows=chunk, validate=False),
            out,
        )
        rows = result.rows
    else:
        import mlflow
        import pandas as pd

        from rapport.features.build import build_features

        mlflow.set_tracking_uri(settings.tracking_uri)
        churn_model = mlflow.pyfunc.load_model(f"models:/{settings.churn_model}@champion")
        value_model = mlflow.pyfunc.load_model(f"models:/{settings.clv_model}@champion")
        loaded = time.perf_counter()
        feats = build_features(tx, ix, as_of=[day], validate=False)
        for col in ("segment", "preferred_channel"):
            feats[col] = feats[col].astype("object").where(feats[col].notna(), None)
        churn = churn_model.predict(feats)
        value = value_model.predict(feats)
        out_frame = pd.DataFrame(
            {
                "customer_id": feats["customer_id"],
                "churn_probability": churn["churn_probability"].to_numpy(),
                "predicted_value": value["predicted_value"].to_numpy(),
            }
        )
        out_frame.to_parquet(out, index=False)
        rows = len(out_frame)
    end = time.perf_counter()
    return {
        "job": job,
        "chunk_rows": chunk if job == "rapport" else None,
        "rows": rows,
        "load_seconds": loaded - start,
        "score_seconds": end - loaded,
        "peak_gb": peak_gb(),
    }


def _data(n: int, seed: int, out: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from rapport.features.synthetic import SyntheticConfig, write_synthetic

    summary = out / "summary.json"
    if summary.exists():
        return dict(json.loads(summary.read_text()))
    start = time.perf_counter()
    write_synthetic(SyntheticConfig(n_customers=n, seed=seed), out, progress=False)
    table = pq.read_table(out / "transactions.parquet", columns=["timestamp"])
    info = {
        "customers": n,
        "seed": seed,
        "transactions": table.num_rows,
        "last_day": str(table.column("timestamp").to_pandas().max().date()),
        "generate_seconds": time.perf_counter() - start,
    }
    summary.write_text(json.dumps(info))
    return info


def _run(job: str, args: argparse.Namespace, data: Path, as_of: str, chunk: int) -> dict:
    out = args.data / f"scores_{job}_{chunk}.parquet"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(
            {"job": job, "data": str(data), "home": str(args.home), "as_of": as_of,
             "chunk": chunk, "out": str(out)}
        ),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    out.unlink(missing_ok=True)
    return dict(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000, help="Synthetic customers.")
    parser.add_argument("--seed", type=int, default=42, help="Seed of the synthetic world.")
    parser.add_argument("--home", type=Path, default=Path(".rapport"), help="RAPPORT_HOME.")
    parser.add_argument("--data", type=Path, default=None, help="Where the world is cached.")
    parser.add_argument(
        "--chunks", default="200000,50000", help="Chunk sizes for Rapport (comma-separated)."
    )
    parser.add_argument("--no-pyfunc", action="store_true", help="Skip the pyfunc run.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(
            json.dumps(
                _worker(
                    spec["job"],
                    Path(spec["data"]),
                    Path(spec["home"]),
                    spec["as_of"],
                    spec["chunk"],
                    Path(spec["out"]),
                )
            )
        )
        return
    args.home = args.home.resolve()
    args.data = (args.data or RESULTS / f"data_batch_{args.customers}").resolve()
    args.data.mkdir(parents=True, exist_ok=True)
    info = _data(args.customers, args.seed, args.data)
    as_of = info["last_day"]
    runs = [_run("rapport", args, args.data, as_of, int(c)) for c in args.chunks.split(",")]
    if not args.no_pyfunc:
        runs.append(_run("pyfunc", args, args.data, as_of, 0))
    best = runs[0]
    total = best["load_seconds"] + best["score_seconds"]
    lines = [
        f"### Batch scoring, {info['customers']:,} customers ({dt.datetime.now(dt.UTC):%Y-%m-%d})",
        "",
        f"- command: `uv run --locked --extra dev python bench/batch_bench.py "
        f"--customers {args.customers}`",
        f"- machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; world: "
        f"{info['transactions']:,} transactions, scored as of {as_of}",
        f"- target: under {TARGET_SECONDS:.0f} s -> "
        f"{'met' if total < TARGET_SECONDS else '**missed**'} ({total:.1f} s incl. model load)",
        "",
        "| job | chunk rows | rows | model load s | scoring s | peak GB | x Rapport |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        ratio = r["score_seconds"] / best["score_seconds"]
        chunk = f"{r['chunk_rows']:,}" if r["chunk_rows"] else "all"
        lines.append(
            f"| {r['job']} | {chunk} | {r['rows']:,} | {r['load_seconds']:.1f} | "
            f"{r['score_seconds']:.1f} | {r['peak_gb']:.2f} | {ratio:.2f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batch.json").write_text(json.dumps({"world": info, "runs": runs}, indent=2))
    (RESULTS / "batch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
