"""Customer value from a purchase model and a spend model: expected spend and CLV."""

from __future__ import annotations

import numpy as np

from rapport.training.btyd.base import ArrayLike, FloatArray, _horizon, _rfm, _same_length
from rapport.training.btyd.bgnbd import BetaGeoModel
from rapport.training.btyd.gamma_gamma import GammaGammaModel


def expected_spend(
    bgnbd: BetaGeoModel,
    gg: GammaGammaModel,
    frequency: ArrayLike,
    recency: ArrayLike,
    T: ArrayLike,
    monetary_value: ArrayLike,
    *,
    horizon: float,
) -> FloatArray:
    """Undiscounted expected spend in (T, T + horizon].

    ``conditional_expected_purchases(horizon) * conditional_expected_average_profit``.

    Parameters
    ----------
    bgnbd, gg
        Fitted purchase and spend models.
    frequency, recency, T, monetary_value
        The BTYD summary per customer, times in the unit of ``bgnbd``'s fit.
    horizon
        Length of the future window, in the unit of ``bgnbd``'s fit.

    Returns
    -------
    numpy.ndarray
        One value per customer, in the currency of ``monetary_value``.
    """
    purchases = bgnbd.conditional_expected_purchases(
        _horizon(horizon, "horizon"), frequency, recency, T
    )
    return purchases * gg.conditional_expected_average_profit(frequency, monetary_value)


def customer_lifetime_value(
    bgnbd: BetaGeoModel,
    gg: GammaGammaModel,
    frequency: ArrayLike,
    recency: ArrayLike,
    T: ArrayLike,
    monetary_value: ArrayLike,
    *,
    horizon: float,
    discount_rate: float,
    step: float,
) -> FloatArray:
    """Expected discounted spend in (T, T + horizon], as ``lifetimes.customer_lifetime_value``.

    The horizon is cut into ``K = horizon / step`` steps; the purchases expected in step ``k``
    are valued at the expected average profit and discounted by ``(1 + discount_rate) ** k``::

        sum_k (E[X(k step)] - E[X((k - 1) step)]) * profit / (1 + discount_rate) ** k

    ``lifetimes``' default (12 months, 1 % per month, a fit in weeks) is
    ``horizon=12 * 4.345, step=4.345, discount_rate=0.01``.

    Parameters
    ----------
    bgnbd, gg
        Fitted purchase and spend models.
    frequency, recency, T, monetary_value
        The BTYD summary per customer, times in the unit of ``bgnbd``'s fit.
    horizon
        Length of the future window, in the unit of the fit; a whole number of steps.
    discount_rate
        Discount rate per step (not per unit of time), > -1.
    step
        Length of one discounting step, in the unit of the fit.

    Returns
    -------
    numpy.ndarray
        One present value per customer, in the currency of ``monetary_value``.
    """
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"step must be positive, got {step}")
    if not (np.isfinite(horizon) and horizon >= 0):
        raise ValueError(f"horizon must be non-negative, got {horizon}")
    if not (np.isfinite(discount_rate) and discount_rate > -1):
        raise ValueError(f"discount_rate must be > -1, got {discount_rate}")
    n_steps = round(horizon / step)
    if abs(n_steps * step - horizon) > 1e-6 * max(horizon, step):
        raise ValueError(f"horizon ({horizon}) must be a whole number of steps ({step})")
    profit = gg.conditional_expected_average_profit(frequency, monetary_value)
    x, t_x, big_t = _rfm(frequency, recency, T)
    _same_length(frequency=x, monetary_value=profit)
    if n_steps == 0:
        return np.zeros(len(x))
    # One (steps, customers) evaluation instead of a Python loop over steps.
    times = step * np.arange(1, n_steps + 1, dtype=np.float64)[:, None]
    cumulative = bgnbd._expected_purchases(times, x, big_t, bgnbd._log_odds_dead(x, t_x, big_t))
    per_step = np.diff(cumulative, axis=0, prepend=0.0)
    discount = (1.0 + discount_rate) ** -np.arange(1, n_steps + 1, dtype=np.float64)
    return np.asarray((discount @ per_step) * profit, dtype=np.float64)
