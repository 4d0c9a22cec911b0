"""Training benchmark: the whole ``train`` job on synthetic customers, step by step.

Usage::

    uv run --locked --extra dev python bench/training_bench.py                 # 1M and 100k
    uv run --locked --extra dev python bench/training_bench.py --customers 100000 --tasks churn
    uv run --locked --extra dev python bench/training_bench.py \
        --override lightgbm.params.num_threads=2                      # a config override

Target: training on 1M synthetic customers in under 5 minutes with peak memory
under 8 GB. For each size a seeded synthetic world is written to Parquet once (``--data``,
default ``bench/results/data_training/``, never committed); then each task (``churn``,
``clv``, shipped default configs plus any ``--override``) runs in a fresh subprocess with its
own temporary ``RAPPORT_HOME`` (an empty MLflow SQLite store), so its peak RSS (``VmHWM``,
see ``peak_memory.py``) is its own and the gate has no champion to load. The ``step`` callback of
:func:`rapport.training.pipeline.train` times its steps:

- ``setup``: before the first step (MLflow tracking set-up and the experiment; on an empty
  SQLite store this creates the schema);
- ``build``: load + validate the Parquet inputs into pandas, features and labels at every
  cutoff (DuckDB), split, cap the training rows (``max_train_rows``);
- ``mlflow``: the rest of the time between the steps (run start, params, ``log_input`` of the three
  datasets, metrics, aliases and tags);
- ``fit``: LightGBM (with its BTYD features) and the baselines, scored on the test cutoff;
- ``log``: plots, artifacts, ``log_model`` and registration;
- ``gate``: the champion/challenger comparison.

Inside the steps a few library functions are wrapped (in the worker only) to split the time
further (pandas load, features, labels, model fit, BTYD fits, logistic, ``log_input``,
``log_model``); they are in the JSON. Beside each job, in the same run and on the same rows
(the job's own train/valid/test frames, saved after it ends), a reference worker times:

- ``bgnbd``: the BG/NBD + Gamma-Gamma baseline alone (``BTYDFeatures`` fit + transform on the
  test rows, as the pipeline does), and a BG/NBD fit on all test rows (no 200k sample);
- ``lgb_default``: a plain LightGBM fit with default parameters (100 rounds, no early
  stopping, one thread like Rapport's default) on the same matrix Rapport's model trains on.

Ratios are what to read (the machine is shared and noisy). Results go to
``bench/results/training.json`` and ``bench/results/training.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peak_memory import peak_gb

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGET_SECONDS = 300.0
TARGET_PEAK_GB = 8.0
STEP_KEYS = {
    "Building": "build",
    "Fitting": "fit",
    "Logging": "log",
    "Comparing": "gate",
}
STEPS = ("setup", "build", "mlflow", "fit", "log", "gate")


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--override {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


# --------------------------------------------------------------------------- workers


def _worker_data(n_customers: int, seed: int, out: Path) -> dict[str, Any]:
    """Write the synthetic world once; return its counts (cached in ``summary.json``)."""
    import pyarrow.parquet as pq

    from rapport.features.synthetic import SyntheticConfig, write_synthetic

    summary = out / "summary.json"
    if summary.exists() and (out / "transactions.parquet").exists():
        return dict(json.loads(summary.read_text()))
    start = time.perf_counter()
    write_synthetic(SyntheticConfig(n_customers=n_customers, seed=seed), out, progress=False)
    info = {
        "customers": n_customers,
        "seed": seed,
        "transactions": pq.ParquetFile(out / "transactions.parquet").metadata.num_rows,
        "interactions": pq.ParquetFile(out / "interactions.parquet").metadata.num_rows,
        "generate_seconds": time.perf_counter() - start,
    }
    summary.write_text(json.dumps(info))
    return info


class _Timers:
    """Accumulates wall time of wrapped callables (nested timers overlap)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, owner: Any, attr: str, key: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
                self.calls[key] = self.calls.get(key, 0) + 1

        setattr(owner, attr, timed)


def _worker_train(task: str, data: Path, home: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run ``train`` once in this process; return step times, peak RSS and row counts."""
    import contextlib

    import mlflow
    import pandas as pd

    from rapport.training import datasets, models, pipeline, tracking
    from rapport.training.config import load_config
    from rapport.training.settings import TrainingSettings

    config = load_config(task, overrides)
    settings = TrainingSettings(home=home)
    timers = _Timers()
    timers.wrap(pipeline, "load_transactions", "build.load_transactions")
    timers.wrap(pipeline, "load_interactions", "build.load_interactions")
    timers.wrap(datasets, "build_features", "build.features")
    timers.wrap(datasets, "build_labels", "build.labels")
    timers.wrap(pipeline, "build_training_set", "build.training_set")
    timers.wrap(models.ChurnModel, "fit", "fit.model")
    timers.wrap(models.ValueModel, "fit", "fit.model")
    timers.wrap(models.BTYDFeatures, "fit", "fit.btyd_fits")
    timers.wrap(models.LogisticBaseline, "fit", "fit.logistic")
    timers.wrap(mlflow, "log_input", "mlflow.log_input")
    timers.wrap(mlflow.pyfunc, "log_model", "log.log_model")
    timers.wrap(pipeline, "log_artifacts", "log.artifacts")
    timers.wrap(tracking, "champion_value_on", "gate.champion")

    trees: list[int] = []
    for cls in (models.ChurnModel, models.ValueModel):
        fit = cls.fit

        def fit_counting(self: Any, *a: Any, _fit: Any = fit, **k: Any) -> Any:
            model = _fit(self, *a, **k)
            for booster in (self.booster_, getattr(self, "buyer_booster_", None)):
                if booster is not None:
                    trees.append(int(booster.num_trees()))
            return model

        cls.fit = fit_counting

    frames: dict[str, pd.DataFrame] = {}
    split_frame = pipeline.split_frame

    def capture(frame: pd.DataFrame, split: Any) -> Any:
        parts = split_frame(frame, split)
        frames.update(zip(("train", "valid", "test"), parts, strict=True))
        return parts

    pipeline.split_frame = capture

    marks: list[tuple[str, float, float, float]] = []  # (step, start, end, peak GB at end)
    spilled: list[float] = []  # DuckDB spill files left after the build step (GB)

    @contextlib.contextmanager
    def step(title: str) -> Any:
        key = next((v for k, v in STEP_KEYS.items() if title.startswith(k)), title)
        start = time.perf_counter()
        yield
        marks.append((key, start, time.perf_counter(), peak_gb()))
        if key == "build":
            spill = Path(tempfile.gettempdir()) / "rapport_duckdb"
            used = sum(f.stat().st_size for f in spill.glob("*")) if spill.exists() else 0
            spilled.append(used / 1024**3)

    tx = data / "transactions.parquet"
    ix = data / "interactions.parquet"
    # Imports and config happen before the clock starts.
    start = time.perf_counter()
    result = pipeline.train(config, tx, ix, source=str(data), settings=settings, step=step)
    total = time.perf_counter() - start
    peak = peak_gb()

    steps = {key: end - begin for key, begin, end, _ in marks}
    # Between the steps: store setup before the first one, MLflow calls between the others.
    steps["setup"] = marks[0][1] - start if marks else 0.0
    steps["mlflow"] = total - sum(steps.values())
    out: dict[str, Any] = {
        "task": task,
        "seconds": total,
        "peak_gb": peak,
        "steps": steps,
        "peak_gb_after": {key: gb for key, _, _, gb in marks},
        "detail_seconds": timers.seconds,
        "rows": {
            "train_available": len(frames["train"]),
            "valid": len(frames["valid"]),
            "test": len(frames["test"]),
        },
        "cutoffs": {
            "train": len(result.split.train),
            "valid": str(result.split.valid),
            "test": str(result.split.test),
        },
        "max_train_rows": getattr(config, "max_train_rows", None),
        "lightgbm_params": dict(config.lightgbm.params),
        "duckdb_memory_limit": settings.duckdb_memory_limit,
        "duckdb_threads": settings.duckdb_threads,
        "duckdb_spill_gb_after_build": spilled[0] if spilled else None,
        "selected": result.selected,
        "metrics": {
            k: float(v)
            for k, v in result.metrics.loc[result.selected].items()
            if isinstance(v, int | float)
        },
        "promoted": result.promoted,
        "trees": sum(trees),
    }
    # What the model saw, for the reference worker (after the clock and the peak).
    train_rows = frames["train"]
    cap = out["max_train_rows"]
    if cap is not None and len(train_rows) > cap:
        train_rows = train_rows.sample(cap, random_state=config.seed)
    out["rows"]["train"] = len(train_rows)
    saved = home / "frames"
    saved.mkdir(parents=True, exist_ok=True)
    for role, part in (("train", train_rows), ("valid", frames["valid"]), ("test", frames["test"])):
        part.to_parquet(saved / f"{role}.parquet", index=False)
    return out


def _worker_reference(task: str, home: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Baseline fits alone on the job's own rows, and LightGBM with default parameters."""
    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    from rapport.training.btyd import BetaGeoModel
    from rapport.training.config import load_config
    from rapport.training.models import (
        BTYDFeatures,
        ChurnModel,
        ValueModel,
        btyd_inputs,
    )

    config = load_config(task, overrides)
    saved = home / "frames"
    train = pd.read_parquet(saved / "train.parquet")
    test = pd.read_parquet(saved / "test.parquet")
    out: dict[str, Any] = {}

    start = time.perf_counter()
    BTYDFeatures(config.horizon_days, seed=config.seed).fit(test).transform(test)
    out["bgnbd_baseline_seconds"] = time.perf_counter() - start
    freq, rec, age, _ = btyd_inputs(test)
    start = time.perf_counter()
    BetaGeoModel().fit(freq, rec, age)
    out["bgnbd_all_rows_seconds"] = time.perf_counter() - start
    out["bgnbd_rows"] = len(test)

    model = ChurnModel(config) if task == "churn" else ValueModel(config)
    start = time.perf_counter()
    model._fit_inputs(train)
    x = model.matrix(train)
    out["matrix_seconds"] = time.perf_counter() - start
    label = train[config.label]
    y = label.astype("int8").to_numpy() if task == "churn" else np.clip(label.to_numpy(), 0, None)
    params = {
        "objective": "binary" if task == "churn" else "tweedie",
        "verbosity": -1,
        "num_threads": int(config.lightgbm.params.get("num_threads", 1)),
    }
    start = time.perf_counter()
    booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=100)
    out["lgb_default_seconds"] = time.perf_counter() - start
    out["lgb_default_trees"] = booster.num_trees()
    out["lgb_default_params"] = params
    out["matrix_shape"] = list(x.shape)
    out["peak_gb"] = peak_gb()
    return out


# --------------------------------------------------------------------------- driver


def _run_worker(args: list[str], env: dict[str, str] | None, timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _fmt_steps(res: dict[str, Any]) -> list[str]:
    steps = res.get("steps", {})
    return [f"{steps[k]:.1f}" if k in steps else "-" for k in STEPS]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--customers", default="1000000,100000", help="customer counts")
    parser.add_argument("--tasks", default="churn,clv", help="tasks to train")
    parser.add_argument("--seed", type=int, default=1, help="synthetic data seed")
    parser.add_argument(
        "--data",
        default=str(RESULTS / "data_training"),
        help="folder caching the synthetic worlds (gitignored under bench/results/)",
    )
    parser.add_argument(
        "--home", default=None, help="parent of the per-run RAPPORT_HOME dirs (default: a tmp dir)"
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="config override key=value (YAML value), e.g. lightgbm.params.num_threads=2",
    )
    parser.add_argument(
        "--duckdb-memory-limit", default=None, help="RAPPORT_DUCKDB_MEMORY_LIMIT, e.g. 4GB"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the reference worker")
    parser.add_argument("--keep-home", action="store_true", help="keep the MLflow homes")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--label", default="", help="suffix of the results files")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = _parse_overrides(args.override)

    if args.worker:
        target = Path(args.dir)
        if args.worker == "data":
            res = _worker_data(args.n, args.seed, target)
        elif args.worker == "train":
            res = _worker_train(args.task, Path(args.data), target, overrides)
        elif args.worker == "reference":
            res = _worker_reference(args.task, target, overrides)
        else:
            raise ValueError(args.worker)
        print(json.dumps(res, default=str))
        return

    # The driver stays small (no pandas), though VmHWM is the child's own anyway.
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.duckdb_memory_limit:
        env["RAPPORT_DUCKDB_MEMORY_LIMIT"] = args.duckdb_memory_limit
    home_root = Path(args.home or tempfile.mkdtemp(prefix="rapport_training_bench_"))
    home_root.mkdir(parents=True, exist_ok=True)
    passthrough = [f"--override={o}" for o in args.override]
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {platform.python_version()}, {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "target": {"seconds": TARGET_SECONDS, "peak_gb": TARGET_PEAK_GB},
        "overrides": overrides,
        "duckdb_memory_limit": env.get("RAPPORT_DUCKDB_MEMORY_LIMIT"),
        "runs": [],
    }
    main_rows = [
        "| customers | task | transactions | interactions | train rows (available) | "
        "valid + test rows | setup s | build s | mlflow s | fit s | log s | gate s | total s | "
        "peak GB | target met? |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref_rows = [
        "| customers | task | Rapport fit s (trees) | LightGBM default 100 trees s | "
        "Rapport s/tree over default | BG/NBD baseline s (x Rapport fit) | "
        "BG/NBD on all test rows s |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in [int(s) for s in args.customers.split(",")]:
        data = Path(args.data) / f"customers_{n}_seed_{args.seed}"
        info = _run_worker(
            ["--worker", "data", "--n", str(n), "--seed", str(args.seed), "--dir", str(data)],
            env,
            args.timeout,
        )
        if "error" in info:
            raise SystemExit(f"data generation failed: {info['error']}")
        print(f"{n:>10,} data: {info}", flush=True)
        for task in args.tasks.split(","):
            home = home_root / f"{task}_{n}"
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir(parents=True)
            # A private TMPDIR: connect() spills to $TMPDIR/rapport_duckdb, and two processes
            # spilling to the same folder overwrite each other's files (an IO error).
            (home / "tmp").mkdir()
            wenv = {**env, "TMPDIR": str(home / "tmp")}
            wargs = ["--task", task, "--data", str(data), "--dir", str(home), *passthrough]
            res = _run_worker(["--worker", "train", *wargs], wenv, args.timeout)
            print(f"{n:>10,} {task} train: {json.dumps(res, default=str)}", flush=True)
            ref: dict[str, Any] = {}
            if "error" not in res and not args.no_reference:
                ref = _run_worker(["--worker", "reference", *wargs], wenv, args.timeout)
                print(f"{n:>10,} {task} reference: {json.dumps(ref)}", flush=True)
            if not args.keep_home:
                shutil.rmtree(home, ignore_errors=True)
            report["runs"].append({"customers": n, "data": info, "train": res, "reference": ref})
            if "error" in res:
                main_rows.append(f"| {n:,} | {task} | failed: {res['error'][-200:]!r} |")
                continue
            rows = res["rows"]
            met = res["seconds"] < TARGET_SECONDS and res["peak_gb"] < TARGET_PEAK_GB
            main_rows.append(
                "| "
                + " | ".join(
                    [
                        f"{n:,}",
                        task,
                        f"{info['transactions']:,}",
                        f"{info['interactions']:,}",
                        f"{rows['train']:,} ({rows['train_available']:,})",
                        f"{rows['valid']:,} + {rows['test']:,}",
                        *_fmt_steps(res),
                        f"{res['seconds']:.1f}",
                        f"{res['peak_gb']:.2f}",
                        "yes" if met else "**no**",
                    ]
                )
                + " |"
            )
            if ref and "error" not in ref:
                fit = res["steps"].get("fit", float("nan"))
                model_fit = res["detail_seconds"].get("fit.model", float("nan"))
                trees = res.get("trees")
                per_tree = ref["lgb_default_seconds"] / max(ref["lgb_default_trees"], 1)
                ref_rows.append(
                    "| "
                    + " | ".join(
                        [
                            f"{n:,}",
                            task,
                            f"{model_fit:.1f}" + (f" ({trees})" if trees else ""),
                            f"{ref['lgb_default_seconds']:.1f}",
                            f"{model_fit / ref['lgb_default_seconds']:.1f}x"
                            if not trees
                            else f"{model_fit / trees / per_tree:.1f}x",
                            f"{ref['bgnbd_baseline_seconds']:.2f} "
                            f"({ref['bgnbd_baseline_seconds'] / fit:.2f}x of fit step)",
                            f"{ref['bgnbd_all_rows_seconds']:.2f}",
                        ]
                    )
                    + " |"
                )
    suffix = f"_{args.label}" if args.label else ""
    (RESULTS / f"training{suffix}.json").write_text(json.dumps(report, indent=2, default=str))
    notes = [
        f"Machine: {report['machine']}, {report['date']}. Target: under {TARGET_SECONDS:.0f} s "
        f"and {TARGET_PEAK_GB:.0f} GB peak RSS per job.",
        f"Config overrides: {overrides or 'none (shipped defaults)'}; "
        f"RAPPORT_DUCKDB_MEMORY_LIMIT: {report['duckdb_memory_limit'] or 'default'}.",
    ]
    text = "\n".join([*notes, "", *main_rows, "", *(ref_rows if len(ref_rows) > 2 else [])])
    (RESULTS / f"training{suffix}.md").write_text(text + "\n")
    print(text)
    if not args.home and not args.keep_home:
        shutil.rmtree(home_root, ignore_errors=True)


if __name__ == "__main__":
    main()
