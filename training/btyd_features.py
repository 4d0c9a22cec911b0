"""BG/NBD and Gamma-Gamma predictions as features: fitted on training rows, added as columns.

The LightGBM models read them beside the RFM features, and serving returns P(alive), expected
purchases and the expected days to the next purchase from the same fit. A degenerate fit
(:attr:`BTYDFeatures.dropped_reason_`) adds no column, and no column ever holds an infinity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rapport.training.btyd import BetaGeoModel, ConvergenceError, GammaGammaModel
from rapport.training.columns import BTYD_INPUTS, DAYS_PER_WEEK, FeatureSchemaError

#: Rows used to fit the BTYD feature models: plenty for four parameters, and bounded time.
BTYD_FIT_ROWS = 200_000


def btyd_inputs(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``frequency``, ``recency`` and ``T`` in weeks (the BTYD models' unit), ``monetary_value``."""
    for col in BTYD_INPUTS:
        if col not in frame.columns:
            raise FeatureSchemaError(f"missing feature column {col!r} (BTYD summary)")
    freq = frame["frequency"].to_numpy(dtype="float64")
    rec = frame["recency"].to_numpy(dtype="float64") / DAYS_PER_WEEK
    age = frame["T"].to_numpy(dtype="float64") / DAYS_PER_WEEK
    money = frame["monetary_value"].to_numpy(dtype="float64")
    return freq, rec, age, money


#: Longest expected wait, in days, reported as ``expected_days_to_next_purchase`` (10 years);
#: beyond it (or where the mean wait is infinite) no next purchase is expected in any horizon
#: a model is used for, and the feature is null (NaN, which LightGBM reads as missing).
NEXT_PURCHASE_CAP_DAYS = 3652.5


@dataclass
class BTYDFeatures:
    """BG/NBD + Gamma-Gamma fitted on training rows; adds their predictions as columns.

    Added columns, for the horizon ``H``: ``p_alive``, ``expected_purchases_{H}d``,
    ``p_no_purchase_{H}d``, ``btyd_value_{H}d`` (expected purchases x expected spend per
    purchase, currency, undiscounted) and ``expected_days_to_next_purchase``: the mean wait
    of an alive customer, null where it exceeds :data:`NEXT_PURCHASE_CAP_DAYS` or is infinite
    (``r + frequency <= 1``: the posterior puts so much weight on tiny purchase rates that
    the mean wait diverges). No column ever holds an infinity.

    When BG/NBD cannot be fitted on the rows (no repeat buyer, no convergence) or its fit
    is degenerate (:attr:`BetaGeoModel.degenerate_`), none of the columns is produced:
    ``columns`` is empty and ``dropped_reason_`` says why, for the run to report.
    """

    horizon_days: int
    seed: int = 42
    bgnbd_: BetaGeoModel | None = None
    gamma_gamma_: GammaGammaModel | None = None
    mean_spend_: float = 0.0
    #: Why the BTYD columns are left out of this fit (one line), or None when they are made.
    dropped_reason_: str | None = None

    def fit(self, frame: pd.DataFrame) -> BTYDFeatures:
        """Fit both models on (a seeded sample of) the rows' BTYD summary."""
        if len(frame) > BTYD_FIT_ROWS:
            frame = frame.sample(BTYD_FIT_ROWS, random_state=self.seed)
        freq, rec, age, money = btyd_inputs(frame)
        self.bgnbd_, self.dropped_reason_ = _fit_bgnbd(freq, rec, age)
        repeat = (freq > 0) & (money > 0)
        self.mean_spend_ = float(money[repeat].mean()) if repeat.any() else 0.0
        self.gamma_gamma_ = None
        # Gamma-Gamma needs repeat buyers with positive spend; without enough of them, or on
        # a degenerate fit, the value falls back to the mean repeat spend rather than failing
        # the whole run.
        if repeat.sum() >= 20:
            try:
                gg = GammaGammaModel().fit(freq[repeat], money[repeat])
            except (ValueError, RuntimeError):
                gg = None
            self.gamma_gamma_ = gg if gg is not None and gg.degenerate_ is None else None
        return self

    @property
    def columns(self) -> list[str]:
        """Names of the added columns (none when ``dropped_reason_`` is set)."""
        if self.dropped_reason_ is not None:
            return []
        h = self.horizon_days
        return [
            "p_alive",
            f"expected_purchases_{h}d",
            f"p_no_purchase_{h}d",
            f"btyd_value_{h}d",
            "expected_days_to_next_purchase",
        ]

    def spend_per_purchase(self, freq: np.ndarray, money: np.ndarray) -> np.ndarray:
        """Gamma-Gamma's expected spend per purchase (the mean repeat spend as fallback)."""
        if self.gamma_gamma_ is None:
            return np.full(len(freq), self.mean_spend_)
        gg = self.gamma_gamma_
        valid = (freq > 0) & (money > 0)
        x = np.where(valid, freq, 1.0)
        m = np.where(valid, money, 1.0)
        # GammaGammaModel.conditional_expected_average_profit's formula, p (v + x m) /
        # (p x + q - 1), on inputs the BG/NBD summary already checked: its own checks cost
        # more than the maths when scoring one customer.
        spend = gg.p_ * (gg.v_ + x * m) / (gg.p_ * x + gg.q_ - 1.0)
        # Customers without a positive repeat spend get the population mean of the model,
        # p v / (q - 1), the conditional mean at frequency 0.
        population = gg.p_ * gg.v_ / (gg.q_ - 1.0) if gg.q_ > 1.0 else self.mean_spend_
        return np.where(valid, spend, population)

    def transform(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The added columns for each row of ``frame`` (same index)."""
        self._check_fitted()
        return pd.DataFrame(self.arrays(*btyd_inputs(frame)), index=frame.index)

    def _check_fitted(self) -> None:
        if self.bgnbd_ is None and self.dropped_reason_ is None:
            raise RuntimeError("BTYDFeatures is not fitted")

    def arrays(
        self,
        freq: np.ndarray,
        rec: np.ndarray,
        age: np.ndarray,
        money: np.ndarray,
        *,
        check: bool = True,
    ) -> dict[str, np.ndarray]:
        """The added columns as arrays, from the summary in weeks (see :meth:`transform`).

        Serving calls this on plain arrays (building a DataFrame costs more than the maths
        for one customer), with ``check=False`` on rows it has already validated.
        """
        self._check_fitted()
        if self.bgnbd_ is None or self.dropped_reason_ is not None:
            return {}
        h = self.horizon_days
        bg = self.bgnbd_.conditional_summary(h / DAYS_PER_WEEK, freq, rec, age, check=check)
        purchases = bg["expected_purchases"]
        days = bg["time_to_next"] * DAYS_PER_WEEK
        columns = {
            "p_alive": bg["p_alive"],
            f"expected_purchases_{h}d": purchases,
            f"p_no_purchase_{h}d": bg["p_no_purchase"],
            f"btyd_value_{h}d": purchases * self.spend_per_purchase(freq, money),
            "expected_days_to_next_purchase": np.where(
                days <= NEXT_PURCHASE_CAP_DAYS, days, np.nan
            ),
        }
        # The maths is finite for any fit; an infinity here would be a bug, and the model
        # must see it as missing rather than as a number.
        return {name: np.where(np.isfinite(v), v, np.nan) for name, v in columns.items()}


def _fit_bgnbd(
    freq: np.ndarray, rec: np.ndarray, age: np.ndarray
) -> tuple[BetaGeoModel | None, str | None]:
    """BG/NBD fitted on the summary in weeks, and why its columns are dropped (or None)."""
    if not np.any(freq > 0):
        return None, "BG/NBD: no repeat purchases to fit on"
    try:
        model = BetaGeoModel().fit(freq, rec, age)
    except ConvergenceError as err:
        return None, str(err)
    return model, model.degenerate_
