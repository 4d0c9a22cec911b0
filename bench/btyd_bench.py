"""BTYD benchmark: BG/NBD + Gamma-Gamma fit on the full CDNOW master (23,570 customers).

Usage::

    uv run python bench/btyd_bench.py               # best of 5
    uv run python bench/btyd_bench.py --repeats 10

The BTYD summary at the end of the 39-week calibration period (1997-09-30) is built once, in
weeks (``days / 7``), before the clock; only the two fits are timed. When the ``lifetimes``
package can be imported (it cannot on pandas 3) its ``BetaGeoFitter`` + ``GammaGammaFitter`` are
timed on the same inputs. Results go to ``bench/results/btyd.json`` and ``bench/results/btyd.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from rapport.features.build import build_features
from rapport.features.datasets import CDNOW_CALIBRATION_END, load_cdnow
from rapport.training.btyd import BetaGeoModel, GammaGammaModel, ParetoNBDModel

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _summary() -> pd.DataFrame:
    f = build_features(load_cdnow("master"), as_of=CDNOW_CALIBRATION_END)
    out = f[["frequency", "monetary_value"]].copy()
    out["recency"] = f["recency"] / 7
    out["T"] = f["T"] / 7
    return out


def _best(fit: Callable[[], dict[str, float]], repeats: int) -> tuple[float, dict[str, float]]:
    best, params = float("inf"), {}
    for _ in range(repeats):
        start = time.perf_counter()
        params = fit()
        best = min(best, time.perf_counter() - start)
    return best, params


def _spenders(data: pd.DataFrame) -> pd.DataFrame:
    # Gamma-Gamma needs positive spend; the master file has a repeat buyer whose repeat days
    # cost $0, which both Rapport and lifetimes reject, so it is left out of the spend fit.
    return data[(data["frequency"] > 0) & (data["monetary_value"] > 0)]


def _rapport(data: pd.DataFrame) -> dict[str, float]:
    bg = BetaGeoModel().fit(data["frequency"], data["recency"], data["T"])
    spend = _spenders(data)
    gg = GammaGammaModel().fit(spend["frequency"], spend["monetary_value"])
    return {**bg.params_, "log_likelihood": bg.log_likelihood_, **gg.params_}


def _lifetimes(data: pd.DataFrame) -> Callable[[], dict[str, float]] | None:
    try:
        from lifetimes import BetaGeoFitter, GammaGammaFitter
    except Exception:  # ImportError, or lifetimes' own breakage on pandas 3
        return None

    repeat = _spenders(data)

    def fit() -> dict[str, float]:
        bg = BetaGeoFitter().fit(data["frequency"], data["recency"], data["T"])
        gg = GammaGammaFitter().fit(repeat["frequency"], repeat["monetary_value"])
        return {**bg.params_.to_dict(), **gg.params_.to_dict()}

    return fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (best)")
    args = parser.parse_args()

    data = _summary()
    _rapport(data)  # warm-up: first-call costs (scipy's lazy imports) are not the fit
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "customers": len(data),
        "repeat_buyers": int((data["frequency"] > 0).sum()),
        "spend_fit_customers": len(_spenders(data)),
        "calibration_end": CDNOW_CALIBRATION_END,
        "time_unit": "weeks",
        "repeats": args.repeats,
    }
    seconds, params = _best(lambda: _rapport(data), args.repeats)
    report["rapport"] = {"seconds": seconds, "params": params}
    rows = [("rapport", seconds, params)]
    pnbd_seconds, pnbd = _best(
        lambda: ParetoNBDModel().fit(data["frequency"], data["recency"], data["T"]).params_,
        args.repeats,
    )
    report["rapport_pareto_nbd"] = {"seconds": pnbd_seconds, "params": pnbd}
    lifetimes_fit = _lifetimes(data)
    if lifetimes_fit is None:
        report["lifetimes"] = None
    else:
        lt_seconds, lt_params = _best(lifetimes_fit, args.repeats)
        report["lifetimes"] = {"seconds": lt_seconds, "params": lt_params}
        rows.append(("lifetimes", lt_seconds, lt_params))

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "btyd.json").write_text(json.dumps(report, indent=2))
    names = ["r", "alpha", "a", "b", "p", "q", "v"]
    lines = [
        f"BG/NBD + Gamma-Gamma fit, CDNOW master ({len(data):,} customers, "
        f"{report['repeat_buyers']:,} repeat buyers, {report['spend_fit_customers']:,} with "
        f"positive spend), weeks, best of {args.repeats}",
        "",
        "| library | fit s | " + " | ".join(names) + " |",
        "|---" * (len(names) + 2) + "|",
    ]
    for name, secs, values in rows:
        cells = [f"{values[k]:.4g}" if k in values else "-" for k in names]
        lines.append(f"| {name} | {secs:.3f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Pareto/NBD fit (Rapport), same data: {pnbd_seconds:.3f} s; "
        + ", ".join(f"{k} = {v:.4g}" for k, v in pnbd.items()),
    ]
    if lifetimes_fit is None:
        lines += ["", "lifetimes: not importable here (it does not run on pandas 3)."]
    table = "\n".join(lines) + "\n"
    (RESULTS / "btyd.md").write_text(table)
    print(json.dumps(report, indent=2))
    print(table)


if __name__ == "__main__":
    main()
