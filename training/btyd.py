"""Classic "buy till you die" baselines: BG/NBD, Gamma-Gamma and customer lifetime value.

The models read the BTYD summary that :func:`rapport.features.build.build_features` writes:

``frequency``
    Repeat purchases (Rapport: distinct purchase days - 1), a whole number >= 0.
``recency``
    Time from the first to the last purchase (0 when ``frequency`` is 0).
``T``
    Time from the first purchase to the cutoff.
``monetary_value``
    Mean spend of the repeat purchases (0 when ``frequency`` is 0).

Rapport's summary is in days; the models work in whatever time unit they are given (the
literature fits CDNOW in weeks, ``days / 7``). Every rate, horizon and prediction is then in
that unit, so divide once, before ``fit``, and pass horizons in the same unit afterwards.

Models are fitted by maximum likelihood on log-parameters (so they stay positive) with an
analytic gradient; the likelihoods are written in log space and stay finite for large
frequencies. The formulas and conventions follow Fader, Hardie & Lee (2005) and the
``lifetimes`` package, so fitted parameters and predictions agree with both:

- Fader, Hardie & Lee (2005), "Counting your customers the easy way: an alternative to the
  Pareto/NBD model", *Marketing Science* 24(2) -- :class:`BetaGeoModel`.
- Fader, Hardie & Lee (2005), "RFM and CLV: using iso-value curves for customer base
  analysis", *Journal of Marketing Research* 42(4) -- :class:`GammaGammaModel`.
- Schmittlein, Morrison & Colombo (1987), and Fader & Hardie (2005), "A note on deriving the
  Pareto/NBD model and related expressions" -- :class:`ParetoNBDModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.optimize import minimize
from scipy.special import digamma, expit, gammaln, hyp2f1, log_expit

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]

__all__ = [
    "BetaGeoModel",
    "ConvergenceError",
    "GammaGammaModel",
    "ParetoNBDModel",
    "customer_lifetime_value",
    "expected_spend",
]

# A fit is accepted when the optimiser says so, or when it stopped on a line-search failure
# (BFGS' "precision loss") with a gradient this small: the mean log-likelihood per customer
# is then flat to well below the 3-4 significant digits anyone reads off the parameters.
_GRADIENT_TOLERANCE = 1e-4


class ConvergenceError(RuntimeError):
    """Raised when maximum-likelihood estimation does not converge."""


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _as_array(values: ArrayLike, name: str) -> FloatArray:
    """A 1-D float array from an array-like or Series; NaN and infinities are rejected."""
    if isinstance(values, pd.Series | pd.Index):
        values = values.to_numpy(dtype="float64", na_value=np.nan)
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from exc
    array = np.atleast_1d(array)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")
    if np.any(array < 0):
        bad = int(np.count_nonzero(array < 0))
        raise ValueError(f"{name} contains {bad} negative value(s)")
    return array


def _same_length(**arrays: FloatArray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"length mismatch: {detail}")


def _check_frequency(frequency: FloatArray) -> None:
    if np.any(frequency != np.round(frequency)):
        raise ValueError("frequency must hold whole numbers (repeat purchase counts)")


def _rfm(
    frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Validated ``frequency``, ``recency``, ``T`` arrays."""
    x = _as_array(frequency, "frequency")
    t_x = _as_array(recency, "recency")
    big_t = _as_array(T, "T")
    _same_length(frequency=x, recency=t_x, T=big_t)
    _check_frequency(x)
    if np.any(t_x > big_t):
        bad = int(np.count_nonzero(t_x > big_t))
        raise ValueError(f"recency exceeds T for {bad} customer(s)")
    if np.any(t_x[x == 0] != 0):
        # A one-purchase customer's last purchase is the first one; anything else means the
        # columns were mixed up or measured on different clocks.
        raise ValueError("recency must be 0 where frequency is 0")
    return x, t_x, big_t


def _weights(weights: ArrayLike | None, n: int) -> FloatArray:
    if weights is None:
        return np.ones(n)
    w = _as_array(weights, "weights")
    if len(w) != n:
        raise ValueError(f"length mismatch: weights={len(w)}, customers={n}")
    if not np.any(w > 0):
        raise ValueError("weights must not all be zero")
    return w


def _horizon(t: ArrayLike, name: str = "t") -> FloatArray:
    """A non-negative, finite time (scalar or array), kept broadcastable."""
    array = np.asarray(t, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite")
    if np.any(array < 0):
        raise ValueError(f"{name} must be non-negative")
    return array


def _penalizer(value: float) -> float:
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"penalizer must be a finite number >= 0, got {value}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------


def _maximise(
    objective: Callable[[FloatArray], tuple[float, FloatArray]],
    start: FloatArray,
    *,
    model: str,
    maxiter: int,
    running_off: Callable[[FloatArray], str | None],
) -> tuple[FloatArray, str | None]:
    """Minimise ``objective`` (value and gradient in log-parameters).

    Returns the log-parameters and, when the fit is degenerate, why: ``running_off`` names
    a parameter running off to 0 or infinity. There the likelihood is flat along that
    direction, so the optimiser may well stop short of its tolerance: such a fit is returned
    (flagged) rather than raised, so that a training run can drop what it feeds and go on.

    Raises
    ------
    ConvergenceError
        When the fit diverges, or stops short with no parameter running off.
    """
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        result = minimize(
            objective, start, jac=True, method="BFGS", options={"maxiter": maxiter, "gtol": 1e-7}
        )
        value, grad = objective(result.x)
    if not np.isfinite(value) or not np.all(np.isfinite(result.x)):
        raise ConvergenceError(f"{model} fit diverged: {result.message}")
    off = running_off(np.exp(result.x))
    if not result.success and float(np.max(np.abs(grad))) > _GRADIENT_TOLERANCE:
        if off is None:
            raise ConvergenceError(
                f"{model} fit did not converge after {result.nit} iterations: {result.message} "
                f"(gradient {np.max(np.abs(grad)):.2g}); try rescaling time or a small penalizer"
            )
        off = f"{off}; the optimiser stopped short ({result.message})"
    return np.asarray(result.x, dtype=np.float64), off


# A fitted parameter outside [1e-8, 1e8] has run off to 0 or infinity: the NBD limit of
# BG/NBD is a, b -> infinity, and 1e8 is far past any scale the data pin down.
_PARAMETER_RANGE = (1e-8, 1e8)
# Below this, a dropout shape (BG/NBD a, Pareto/NBD s) has run off to 0: Beta(a, b) or
# Gamma(s, beta) then puts all but about a fraction ``a`` of the customers at a dropout
# probability (rate) of practically 0, so the model says nobody ever leaves. Healthy fits
# sit at 0.1-10 (CDNOW: a = 0.79, s = 0.61).
_MIN_DROPOUT_SHAPE = 1e-4
# BG/NBD's mean dropout probability per repeat purchase, a / (a + b), below which dropout
# never happens in practice: under it, even 300 repeat purchases end fewer than 3 % of
# customers. Grocery fits at 1.8e-3 (a = 1e4, b = 6e6: homogeneous but real dropout) pass.
_MIN_DROPOUT_MEAN = 1e-4
# P(alive) is uninformative when this share of the customers it can tell apart get the same
# value to within _ALIVE_TIE: a feature that is constant carries nothing.
_ALIVE_SHARE = 0.99
_ALIVE_TIE = 1e-3


def _out_of_range(names: str, params: FloatArray) -> list[str]:
    """``name=value ran off to 0 / infinity`` for each parameter outside _PARAMETER_RANGE."""
    low, high = _PARAMETER_RANGE
    reasons = []
    for name, value in zip(names.split(", "), params, strict=True):
        if value < low or value > high:
            where = "0" if value < low else "infinity"
            reasons.append(f"{name}={value:.1e} ran off to {where}")
    return reasons


def _flat_alive(alive: FloatArray, weights: FloatArray, who: str) -> str | None:
    """A reason when nearly all ``who`` get the same P(alive), else None."""
    keep = weights > 0
    if not np.any(keep):
        return None
    alive, weights = alive[keep], weights[keep]
    order = np.argsort(alive)
    cumulative = np.cumsum(weights[order])
    median = float(alive[order][np.searchsorted(cumulative, cumulative[-1] / 2)])
    share = float(weights[np.abs(alive - median) <= _ALIVE_TIE].sum() / cumulative[-1])
    if share < _ALIVE_SHARE:
        return None
    return f"P(alive) is {median:.3g} for {share:.1%} of {who}"


def _degenerate(model: str, reasons: list[str | None]) -> str | None:
    """One line ``model: reason: reason``, or None when there is no reason."""
    found = [r for r in reasons if r]
    return f"{model}: {': '.join(found)}" if found else None


def _dot(a: FloatArray, b: FloatArray) -> float:
    # Not `a @ b`: a threaded BLAS ddot can take milliseconds on a busy machine, where this
    # pairwise sum takes microseconds.
    return float(np.sum(a * b))


def _compress(columns: FloatArray, weights: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Unique rows of ``columns`` (shape (n, k)) with summed weights.

    Summaries in whole days or weeks repeat a lot (CDNOW: 23,570 customers, 8,685 distinct
    rows), and every likelihood evaluation is then that much cheaper.
    """
    # A lexsort and a run-length pass: np.unique(axis=0) sorts opaque byte strings and is
    # tens of times slower.
    order = np.lexsort(columns.T[::-1])
    ordered = columns[order]
    starts = np.ones(len(ordered), dtype=bool)
    starts[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    group = np.cumsum(starts) - 1
    summed = np.bincount(group, weights=weights[order]).astype(np.float64)
    keep = summed > 0
    return ordered[starts][keep], summed[keep]


def _positive_params(names: str, *values: float) -> FloatArray:
    """Given model parameters as an array; an error naming them unless all positive, finite."""
    params = np.array(values, dtype=np.float64)
    if not np.all(np.isfinite(params)) or np.any(params <= 0):
        raise ValueError(f"{names} must be positive and finite, got {params}")
    return params


def _repeat_history(
    frequency: ArrayLike,
    recency: ArrayLike,
    T: ArrayLike,
    weights: ArrayLike | None,
    *,
    model: str,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, int]:
    """A purchase-count model's inputs, checked and compressed to distinct rows.

    Returns ``x``, ``t_x``, ``T`` and the summed weights of the distinct rows, and the number
    of customers given. Without a single repeat purchase the dropout process leaves no trace:
    the dropout parameters are not identified and the rate runs off to 0, so that is an error.
    """
    x, t_x, big_t = _rfm(frequency, recency, T)
    n_customers = len(x)
    w = _weights(weights, n_customers)
    if not np.any((x > 0) & (w > 0)):
        raise ValueError(f"frequency: no repeat purchases (frequency > 0) to fit {model} on")
    rows, w = _compress(np.column_stack([x, t_x, big_t]), w)
    x, t_x, big_t = rows.T
    return x, t_x, big_t, w, n_customers


def _not_fitted(model: object, attribute: str) -> None:
    if not hasattr(model, attribute):
        raise AttributeError(
            f"This {type(model).__name__} is not fitted yet: call fit() or from_params() first"
        )


# --------------------------------------------------------------------------------------------
# BG/NBD expectation
# --------------------------------------------------------------------------------------------

# Nodes of the trapezoid rule in :func:`_beta_mean_of_g`. The integrand is analytic within
# pi of the real axis in the logit variable, and the step never exceeds half the density's
# width nor 0.5, so the rule's error is below exp(-2 pi^2 / 0.5^2) ~ 1e-34 relative, far
# under float64 rounding; 400 nodes keep the step there over the widest range needed.
_QUADRATURE_NODES = 400
# Half-width, in the density's standard widths (or in logit units for the slow left tail),
# beyond which the integrand is below exp(-45) of its peak.
_TAIL = 45.0
# Rows evaluated at once: bounds memory at _QUADRATURE_NODES x _CHUNK doubles (13 MB).
_CHUNK = 4096


def _alive_purchases(n: FloatArray, k: FloatArray, a: float, big_b: FloatArray) -> FloatArray:
    """Expected purchases of an alive BG/NBD customer, ``E[(1 - (1 + k p)^-n) / p]``.

    ``p ~ Beta(a, B)`` is the dropout probability, ``n = r + x`` the posterior rate's shape
    and ``k = t / (alpha + T)``. The published form, ``(a + B - 1) / (a - 1)`` times
    ``1 - (1 - z)^n 2F1(n, B; a + B - 1; z)``, overflows once ``a`` and ``b`` are large (the
    2F1 grows like ``(1 - z)^-a``) and cancels to nothing near the NBD limit (``a`` small or
    ``b`` large, where both factors head to 0 and infinity). The expectation itself is of a
    smooth bounded function, so it is integrated instead (:func:`_beta_mean_of_g`), once
    per distinct ``(n, k, B)``: summaries in whole days repeat a lot.
    """
    return _per_distinct(
        np.column_stack([n, k, big_b]),
        lambda rows: _beta_mean_of_g(rows[:, 0], rows[:, 1], a, rows[:, 2]),
    )


def _per_distinct(rows: FloatArray, compute: Callable[[FloatArray], FloatArray]) -> FloatArray:
    """``compute`` of each row of ``rows``, called once per distinct row, ``_CHUNK`` at a time.

    Summaries in whole days repeat a lot, and each distinct row costs a quadrature.
    """
    order = np.lexsort(rows.T[::-1])
    ordered = rows[order]
    starts = np.ones(len(ordered), dtype=bool)
    starts[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    distinct = ordered[starts]
    values = np.empty(len(distinct))
    for lo in range(0, len(distinct), _CHUNK):
        values[lo : lo + _CHUNK] = compute(distinct[lo : lo + _CHUNK])
    out = np.empty(len(rows))
    out[order] = values[np.cumsum(starts) - 1]
    return out


def _beta_mean_of_g(n: FloatArray, k: FloatArray, a: float, big_b: FloatArray) -> FloatArray:
    """``E[g(p)]`` for ``g(p) = (1 - (1 + k p)^-n) / p`` and ``p ~ Beta(a, B)``.

    ``g`` is split into its chord ``L(p) = g(0) (1 - p) + g(1) p`` and ``p (1 - p) e(p)``:
    the chord's mean is exact, and ``E[p (1 - p) e(p)]`` is ``E[p (1 - p)]`` times the mean
    of ``e`` under ``Beta(a + 1, B + 1)``, whose tails decay at least like ``exp(-|v|)`` in
    the logit ``v`` however small ``a`` or ``B`` (``a = 1e-8`` leaves almost all of
    ``Beta(a, B)``'s mass spread over ``log p`` down to -1e8). That mean is a trapezoid sum in
    ``v``, centred on the density's mode and scaled to its width (1e-4 when ``a`` and ``b``
    are 1e8), stretched to the left to ``-log k`` where ``a`` is small: ``e`` then keeps the
    integrand up until ``p ~ 1 / k``.
    """
    n, k, big_b = n[:, None], k[:, None], big_b[:, None]
    g0 = n * k
    g1 = -np.expm1(-n * np.log1p(k))
    mean_p = a / (a + big_b)
    chord = g0 * (1.0 - mean_p) + g1 * mean_p
    centre = np.log((a + 1.0) / (big_b + 1.0))
    width = np.sqrt((a + big_b + 2.0) / ((a + 1.0) * (big_b + 1.0)))
    with np.errstate(divide="ignore"):
        slow_tail = np.maximum(centre + np.log(k), 0.0) + _TAIL
    lo = centre - _TAIL * width - np.minimum(_TAIL / a, slow_tail)
    hi = centre + _TAIL * width
    v = lo + (hi - lo) * np.linspace(0.0, 1.0, _QUADRATURE_NODES)
    log_p, log_q = log_expit(v), log_expit(-v)
    p, q = np.exp(log_p), np.exp(log_q)
    log_w = (a + 1.0) * log_p + (big_b + 1.0) * log_q
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        g = -np.expm1(-n * np.log1p(k * p)) / p
        e = (g - g0 + p * (g0 - g1)) / (p * q)
    # p or 1 - p rounds to 0 only where the weight has underflowed: those nodes add nothing
    e = np.where(w > 0, e, 0.0)
    mean_e = (w * e).sum(axis=1) / w.sum(axis=1)
    spread = a * big_b[:, 0] / ((a + big_b[:, 0]) * (a + big_b[:, 0] + 1.0))
    result = chord[:, 0] + spread * mean_e
    # nothing can happen in no time (k = 0), and the quadrature's 0 * inf must not say otherwise
    return np.asarray(np.where(k[:, 0] > 0, result, 0.0), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# BG/NBD
# --------------------------------------------------------------------------------------------


class BetaGeoModel:
    """BG/NBD purchase-count model (Fader, Hardie & Lee 2005).

    While alive, a customer buys as a Poisson process with rate ``lambda ~ Gamma(r, alpha)``
    (shape ``r``, rate ``alpha``); right after each repeat purchase the customer drops out for
    good with probability ``p ~ Beta(a, b)``. The first purchase starts the clock (time 0) and
    is not counted, so a customer with no repeat purchase is alive for sure.

    Parameters
    ----------
    penalizer
        L2 penalty on the four parameters, added to the mean negative log-likelihood per
        customer (``lifetimes``' ``penalizer_coef``). 0 is plain maximum likelihood.
    maxiter
        Most optimiser iterations.

    Attributes
    ----------
    r_, alpha_, a_, b_ : float
        Fitted parameters; ``alpha_`` is in the time unit of the fit.
    log_likelihood_ : float
        Total (weighted) log-likelihood at the optimum, without the penalty, as published.
    n_customers_ : int
        Number of customers (rows) fitted.
    degenerate_ : str or None
        None for a healthy fit; else one line saying why the fit is degenerate: a parameter
        ran off to 0 or infinity (``a`` < 1e-4, ``a / (a + b)`` < 1e-4, any outside
        [1e-8, 1e8]), the optimiser stopped short while one did, or P(alive) is the same
        (within 1e-3) for 99 % of the repeat buyers fitted. Predictions stay finite and
        exact for the parameters; they are just uninformative.
    """

    def __init__(self, penalizer: float = 0.0, maxiter: int = 1000) -> None:
        self.penalizer = penalizer
        self.maxiter = maxiter

    @classmethod
    def from_params(cls, r: float, alpha: float, a: float, b: float) -> BetaGeoModel:
        """A model with given parameters, e.g. published ones or for simulation."""
        params = _positive_params("r, alpha, a, b", r, alpha, a, b)
        model = cls()
        model.r_, model.alpha_, model.a_, model.b_ = (float(v) for v in params)
        model.degenerate_ = _degenerate("BG/NBD", [cls._running_off(params)])
        return model

    @property
    def params_(self) -> dict[str, float]:
        """Fitted parameters by name."""
        _not_fitted(self, "r_")
        return {"r": self.r_, "alpha": self.alpha_, "a": self.a_, "b": self.b_}

    # -- fitting ---------------------------------------------------------------------------

    @staticmethod
    def _log_likelihood(
        params: FloatArray, x: FloatArray, t_x: FloatArray, big_t: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """Per-customer log-likelihood and its gradient in the raw parameters, shape (4, n)."""
        r, alpha, a, b = params
        repeat = x > 0
        # b + x - 1 only enters for repeat buyers; x=1 stands in elsewhere so that b < 1 with
        # x = 0 never takes the log of a negative number.
        b_x1 = b + np.maximum(x, 1.0) - 1.0
        log_at = np.log(alpha + big_t)
        log_atx = np.log(alpha + t_x)
        a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
        a2 = gammaln(a + b) + gammaln(b + x) - gammaln(b) - gammaln(a + b + x)
        a3 = -(r + x) * log_at
        a4 = np.where(repeat, np.log(a) - np.log(b_x1) - (r + x) * log_atx, -np.inf)
        peak = np.maximum(a3, a4)
        e3, e4 = np.exp(a3 - peak), np.exp(a4 - peak)
        total = e3 + e4
        ll = a1 + a2 + peak + np.log(total)
        w3, w4 = e3 / total, e4 / total
        dig_ab, dig_abx = digamma(a + b), digamma(a + b + x)
        grad = np.stack(
            [
                digamma(r + x) - digamma(r) + np.log(alpha) - w3 * log_at - w4 * log_atx,
                r / alpha - (r + x) * (w3 / (alpha + big_t) + w4 / (alpha + t_x)),
                dig_ab - dig_abx + w4 / a,
                dig_ab + digamma(b + x) - digamma(b) - dig_abx - w4 / b_x1,
            ]
        )
        return ll, grad

    def fit(
        self,
        frequency: ArrayLike,
        recency: ArrayLike,
        T: ArrayLike,
        *,
        weights: ArrayLike | None = None,
    ) -> BetaGeoModel:
        """Fit by maximum likelihood.

        Parameters
        ----------
        frequency, recency, T
            The BTYD summary, one value per customer (see the module docstring), recency and
            ``T`` in the time unit the model should use.
        weights
            Optional non-negative weight per row, e.g. the number of customers sharing that
            ``(frequency, recency, T)``.

        Returns
        -------
        BetaGeoModel
            ``self``, fitted.

        Raises
        ------
        ValueError
            On invalid inputs (the message names the offending argument).
        ConvergenceError
            When the optimiser fails to converge.
        """
        penalizer = _penalizer(self.penalizer)
        x, t_x, big_t, w, n_customers = _repeat_history(
            frequency, recency, T, weights, model="BG/NBD"
        )
        w_sum = float(w.sum())

        def objective(log_params: FloatArray) -> tuple[float, FloatArray]:
            params = np.exp(log_params)
            ll, grad = self._log_likelihood(params, x, t_x, big_t)
            value = -_dot(w, ll) / w_sum + penalizer * float(np.sum(params**2))
            gradient = (-(grad * w).sum(axis=1) / w_sum + 2 * penalizer * params) * params
            return value, gradient

        # Scale-aware start: alpha carries the time unit, so days and weeks start alike.
        alpha0 = float(np.average(big_t, weights=w)) / (1.0 + float(np.average(x, weights=w)))
        start = np.log(np.array([1.0, alpha0, 1.0, 1.0]))
        log_params, off = _maximise(
            objective, start, model="BG/NBD", maxiter=self.maxiter, running_off=self._running_off
        )
        self.r_, self.alpha_, self.a_, self.b_ = (float(v) for v in np.exp(log_params))
        ll, _ = self._log_likelihood(np.exp(log_params), x, t_x, big_t)
        self.log_likelihood_ = _dot(w, ll)
        self.n_customers_ = n_customers
        # one-time buyers are alive for sure in BG/NBD: only repeat buyers can tell it apart
        alive = expit(-self._log_odds_dead(x, t_x, big_t))
        flat = _flat_alive(alive, np.where(x > 0, w, 0.0), "repeat buyers")
        self.degenerate_ = _degenerate("BG/NBD", [off, flat])
        return self

    @staticmethod
    def _running_off(params: FloatArray) -> str | None:
        """Why parameters ``r, alpha, a, b`` say dropout (or buying) never happens, or None."""
        a, b = params[2], params[3]
        reasons = _out_of_range("r, alpha, a, b", params)
        if _PARAMETER_RANGE[0] <= a < _MIN_DROPOUT_SHAPE:
            reasons.append(f"a={a:.1e} ran off to 0 (dropout never happens)")
        elif a / (a + b) < _MIN_DROPOUT_MEAN:
            reasons.append(
                f"a/(a+b)={a / (a + b):.1e} (a={a:.2g}, b={b:.2g}): b ran off to infinity, "
                "dropout never happens"
            )
        return "; ".join(reasons) or None

    # -- predictions -----------------------------------------------------------------------

    def _fitted(self) -> tuple[float, float, float, float]:
        _not_fitted(self, "r_")
        return self.r_, self.alpha_, self.a_, self.b_

    def _log_odds_dead(self, x: FloatArray, t_x: FloatArray, big_t: FloatArray) -> FloatArray:
        """Log-odds P(dead) / P(alive) given the history; -inf for customers who never repeated."""
        r, alpha, a, b = self._fitted()
        b_x1 = b + np.maximum(x, 1.0) - 1.0
        # log((alpha + T) / (alpha + t_x)) without the cancellation of two logs of large
        # alphas, which (r + x) times over decides P(alive)
        odds = np.log(a) - np.log(b_x1) + (r + x) * np.log1p((big_t - t_x) / (alpha + t_x))
        return np.where(x > 0, odds, -np.inf)

    def probability_alive(
        self, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
    ) -> FloatArray:
        """P(alive at ``T`` | history).

        Exactly 1 when ``frequency`` is 0: BG/NBD customers only drop out right after a repeat
        purchase (the ``lifetimes`` convention; it is the model, not a patch).

        Parameters
        ----------
        frequency, recency, T
            The BTYD summary per customer, in the time unit of the fit.

        Returns
        -------
        numpy.ndarray
            One probability per customer.
        """
        x, t_x, big_t = _rfm(frequency, recency, T)
        return np.asarray(expit(-self._log_odds_dead(x, t_x, big_t)), dtype=np.float64)

    def _expected_purchases(
        self, t: FloatArray, x: FloatArray, big_t: FloatArray, log_odds_dead: FloatArray
    ) -> FloatArray:
        """E[purchases in (T, T + t] | history], broadcasting ``t`` against the customers.

        P(alive) times what an alive customer buys: with ``lambda ~ Gamma(r + x, alpha + T)``
        and ``p ~ Beta(a, b + x)`` a posteriori, ``E[(1 - exp(-lambda p t)) / p]``; see
        :func:`_alive_purchases` for why it is not the published 2F1 form.
        """
        r, alpha, a, b = self._fitted()
        shape = np.broadcast_shapes(np.shape(t), np.shape(x))
        times, xs, ages = (np.broadcast_to(v, shape).ravel() for v in (t, x, big_t))
        alive = expit(-np.broadcast_to(log_odds_dead, shape).ravel())
        k = times / (alpha + ages)
        bought = _alive_purchases(r + xs, k, a, b + xs)
        return np.asarray((bought * alive).reshape(shape), dtype=np.float64)

    def expected_purchases(self, t: ArrayLike) -> FloatArray:
        """E[X(t)]: expected repeat purchases in (0, t] of a new customer (unconditional).

        Parameters
        ----------
        t
            Time(s) since the first purchase, in the unit of the fit (scalar or array).

        Returns
        -------
        numpy.ndarray
            Same shape as ``t``.
        """
        times = _horizon(t)
        zero = np.zeros_like(times)
        return self._expected_purchases(times, zero, zero, np.full_like(times, -np.inf))

    def conditional_expected_purchases(
        self, t: ArrayLike, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
    ) -> FloatArray:
        """E[purchases in (T, T + t] | frequency, recency, T].

        Parameters
        ----------
        t
            Horizon after the cutoff, in the unit of the fit: a scalar or one per customer.
        frequency, recency, T
            The BTYD summary per customer.

        Returns
        -------
        numpy.ndarray
            One expectation per customer.
        """
        x, t_x, big_t = _rfm(frequency, recency, T)
        return self._expected_purchases(_horizon(t), x, big_t, self._log_odds_dead(x, t_x, big_t))

    def probability_no_purchase(
        self, t: ArrayLike, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
    ) -> FloatArray:
        """P(no purchase in (T, T + t] | history).

        A dead customer never buys. An alive one makes no purchase in ``t`` with probability
        ``E[exp(-lambda t)]`` under the posterior ``lambda ~ Gamma(r + x, alpha + T)`` (given
        alive, ``lambda`` and ``p`` are independent), and cannot drop out meanwhile, because
        dropout only happens right after a purchase::

            P = (1 - P(alive)) + P(alive) * ((alpha + T) / (alpha + T + t)) ** (r + x)

        Parameters
        ----------
        t
            Horizon after the cutoff, in the unit of the fit: a scalar or one per customer.
        frequency, recency, T
            The BTYD summary per customer.

        Returns
        -------
        numpy.ndarray
            One probability per customer, decreasing in ``t``.
        """
        x, t_x, big_t = _rfm(frequency, recency, T)
        return self._no_purchase(_horizon(t), x, big_t, self._log_odds_dead(x, t_x, big_t))

    def _no_purchase(
        self, times: FloatArray, x: FloatArray, big_t: FloatArray, log_odds_dead: FloatArray
    ) -> FloatArray:
        r, alpha, _, _ = self._fitted()
        quiet = np.exp(-(r + x) * np.log1p(times / (alpha + big_t)))
        # P(dead) from the log-odds, not 1 - P(alive), which loses it when it is tiny
        dead, alive = expit(log_odds_dead), expit(-log_odds_dead)
        return np.asarray(dead + alive * quiet, dtype=np.float64)

    def expected_time_to_next_purchase(
        self, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
    ) -> FloatArray:
        """Expected time from ``T`` to the next purchase, given the customer is alive.

        An alive customer's waiting time is exponential with mean ``1 / lambda`` (memoryless,
        and dropout cannot intervene before the next purchase), so this is the posterior mean
        of ``1 / lambda`` under ``Gamma(r + x, alpha + T)``::

            (alpha + T) / (r + x - 1)   if r + x > 1, else inf

        It is infinite for ``r + x <= 1``: the posterior puts so much weight on tiny rates that
        the mean wait diverges (the median does not). Dead customers never buy again and are
        not accounted for here: read the result next to :meth:`probability_alive`.

        Returns
        -------
        numpy.ndarray
            One time per customer, in the unit of the fit (``inf`` where undefined).
        """
        x, _, big_t = _rfm(frequency, recency, T)
        return self._wait(x, big_t)

    def _wait(self, x: FloatArray, big_t: FloatArray) -> FloatArray:
        r, alpha, _, _ = self._fitted()
        shape = r + x - 1.0
        with np.errstate(divide="ignore"):
            wait = np.where(shape > 0, (alpha + big_t) / np.where(shape > 0, shape, 1.0), np.inf)
        return np.asarray(wait, dtype=np.float64)

    def conditional_summary(
        self,
        t: float,
        frequency: ArrayLike,
        recency: ArrayLike,
        T: ArrayLike,
        *,
        check: bool = True,
    ) -> dict[str, FloatArray]:
        """All per-customer predictions for a horizon ``t``, validating the inputs once.

        The same numbers as :meth:`probability_alive`, :meth:`conditional_expected_purchases`,
        :meth:`probability_no_purchase` and :meth:`expected_time_to_next_purchase`: scoring
        one customer spent most of its time checking the same three arrays four times.

        ``check=False`` skips the input checks, for callers that already enforced them
        (serving validates every request row against the same rules).

        Returns
        -------
        dict
            ``p_alive``, ``expected_purchases``, ``p_no_purchase`` and ``time_to_next``.
        """
        self._fitted()
        if check:
            x, t_x, big_t = _rfm(frequency, recency, T)
        else:
            x = np.asarray(frequency, dtype=np.float64)
            t_x = np.asarray(recency, dtype=np.float64)
            big_t = np.asarray(T, dtype=np.float64)
        times = _horizon(t)
        log_odds = self._log_odds_dead(x, t_x, big_t)
        alive = np.asarray(expit(-log_odds), dtype=np.float64)
        return {
            "p_alive": alive,
            "expected_purchases": self._expected_purchases(times, x, big_t, log_odds),
            "p_no_purchase": self._no_purchase(times, x, big_t, log_odds),
            "time_to_next": self._wait(x, big_t),
        }

    def expected_next_purchase_date(
        self,
        frequency: ArrayLike,
        recency: ArrayLike,
        T: ArrayLike,
        *,
        as_of: Any,
        time_unit: str | pd.Timedelta | np.timedelta64 = "1D",
    ) -> npt.NDArray[np.datetime64]:
        """``as_of`` plus :meth:`expected_time_to_next_purchase`, as dates.

        Parameters
        ----------
        frequency, recency, T
            The BTYD summary per customer at the cutoff ``as_of``.
        as_of
            The cutoff (anything :class:`pandas.Timestamp` reads); ``T`` runs up to it.
        time_unit
            Length of one model time unit: ``"1D"`` for a fit in days, ``"7D"`` in weeks.

        Returns
        -------
        numpy.ndarray
            ``datetime64[us]`` per customer; ``NaT`` where the expected time is infinite.
        """
        unit = pd.Timedelta(time_unit)
        if unit <= pd.Timedelta(0):
            raise ValueError(f"time_unit must be positive, got {time_unit!r}")
        cutoff = pd.Timestamp(as_of)
        if pd.isna(cutoff):
            raise ValueError("as_of must be a date")
        wait = self.expected_time_to_next_purchase(frequency, recency, T)
        micros = wait * (unit / pd.Timedelta(microseconds=1))
        finite = np.isfinite(micros)
        offsets = np.where(finite, np.round(np.where(finite, micros, 0.0)), 0).astype("int64")
        dates = cutoff.as_unit("us").to_datetime64() + offsets.astype("timedelta64[us]")
        return np.where(finite, dates, np.datetime64("NaT", "us"))


# --------------------------------------------------------------------------------------------
# Pareto/NBD
# --------------------------------------------------------------------------------------------


def _numeric_gradient(
    f: Callable[[FloatArray], float], step: float = 1e-6
) -> Callable[[FloatArray], tuple[float, FloatArray]]:
    """``f`` with a central-difference gradient, in the shape :func:`_maximise` wants."""

    def value_and_gradient(x: FloatArray) -> tuple[float, FloatArray]:
        grad = np.empty_like(x)
        for i in range(len(x)):
            e = np.zeros_like(x)
            e[i] = step
            grad[i] = (f(x + e) - f(x - e)) / (2 * step)
        return f(x), grad

    return value_and_gradient


# Gauss-Legendre rule for each of the panels of :func:`_pareto_log_dead_integral`.
_LEGENDRE = np.polynomial.legendre.leggauss(32)
_PANELS = 4
# The dropout integrand is cut where it falls below exp(-_PARETO_TAIL) of its peak.
_PARETO_TAIL = 45.0
# Bisection steps locating that cut: 2^-40 of the span in d is far inside one panel.
_BISECTIONS = 40


def _pareto_log_odds_dead(
    params: FloatArray, x: FloatArray, t_x: FloatArray, big_t: FloatArray
) -> FloatArray:
    """Log-odds P(dead) / P(alive) at ``T`` of Pareto/NBD customers.

    The odds are ``s (alpha + T)^(r + x) (beta + T)^s`` times
    ``I = integral over (t_x, T) of (alpha + u)^-(r + x) (beta + u)^-(s + 1) du`` (death at
    ``u``, unseen since). The published closed form, a difference of two 2F1 terms,
    overflows or cancels for frequent buyers and extreme rates; ``I`` is integrated instead
    (:func:`_pareto_log_dead_integral`), once per distinct ``(x, t_x, T)``.
    """
    _, alpha, s, beta = params
    small = min(alpha, beta)
    log_integral = _per_distinct(
        np.column_stack([x, t_x, big_t]),
        lambda rows: _pareto_log_dead_integral(params, rows[:, 0], rows[:, 1], rows[:, 2]),
    )
    return np.asarray(
        np.log(s) + np.log(small + big_t) - np.log(beta + big_t) + log_integral,
        dtype=np.float64,
    )


def _pareto_log_dead_integral(
    params: FloatArray, x: FloatArray, t_x: FloatArray, big_t: FloatArray
) -> FloatArray:
    """Log of the dropout integral in ``d = log((c + u) / (c + T))``, ``c = min(alpha, beta)``.

    The odds dead are ``s (c + T) / (beta + T)`` times ``integral of exp(f(d)) dd``, with
    ``f(d) = (1 - n_c) d - n_o log(1 - k (1 - e^d))``, ``n_c`` and ``n_o`` the exponents of
    the smaller and the other rate and ``k = (c + T) / (o + T)`` in (0, 1]. ``f`` is concave
    whatever the parameters, so the integrand has one peak and falls at least exponentially
    on either side: cut where it is ``exp(-45)`` below its peak, the rest is smooth (its
    singularities lie ``pi`` off the real axis) and composite Gauss-Legendre takes it to
    float64 rounding, however steep (``x`` in the hundreds) or wide (rates 1e-8 to 1e8).
    """
    r, alpha, s, beta = params
    x, t_x, big_t = x[:, None], t_x[:, None], big_t[:, None]
    if alpha <= beta:
        n_c, n_o, c, o = r + x, s + 1.0 + 0.0 * x, alpha, beta
    else:
        n_c, n_o, c, o = s + 1.0 + 0.0 * x, r + x, beta, alpha
    k = (c + big_t) / (o + big_t)

    def f(d: FloatArray) -> FloatArray:
        return np.asarray((1.0 - n_c) * d - n_o * np.log1p(k * np.expm1(d)), dtype=np.float64)

    start = -np.log1p((big_t - t_x) / (c + t_x))  # d at u = t_x
    # f' falls from 1 - n_c towards 1 - n_c - n_o: the peak is where it crosses 0
    y = np.clip((1.0 - n_c) / n_o, 1e-300, 1.0 - 1e-16)
    with np.errstate(divide="ignore"):
        crossing = np.log(y * (1.0 - k)) - np.log(k * (1.0 - y))
    peak = np.clip(np.where(n_c < 1.0, crossing, -np.inf), start, 0.0)
    level = f(peak) - _PARETO_TAIL
    lo = _cut(f, level, start, peak)
    hi = _cut(f, level, np.zeros_like(peak), peak)
    nodes, weights = _LEGENDRE
    panel = (hi - lo) / _PANELS
    left = lo + panel * np.arange(_PANELS)
    d = (left[:, :, None] + panel[:, :, None] * (nodes + 1.0) / 2.0).reshape(len(lo), -1)
    values = f(d)
    top = values.max(axis=1)
    total = np.exp(values - top[:, None]) @ np.tile(weights, _PANELS) * panel[:, 0] / 2.0
    with np.errstate(divide="ignore"):
        # a last purchase at T leaves no time to die unseen: I = 0
        log_integral = np.where(start[:, 0] < 0.0, top + np.log(total), -np.inf)
    return np.asarray(log_integral, dtype=np.float64)


def _cut(
    f: Callable[[FloatArray], FloatArray], level: FloatArray, end: FloatArray, peak: FloatArray
) -> FloatArray:
    """The point between ``peak`` and ``end`` where concave ``f`` falls to ``level``.

    ``end`` itself where ``f`` stays above ``level`` all the way.
    """
    inside, outside = peak.copy(), end.copy()
    for _ in range(_BISECTIONS):
        middle = (inside + outside) / 2.0
        above = f(middle) >= level
        inside = np.where(above, middle, inside)
        outside = np.where(above, outside, middle)
    return np.asarray(np.where(f(end) >= level, end, outside), dtype=np.float64)


class ParetoNBDModel:
    """Pareto/NBD purchase-count model (Schmittlein, Morrison & Colombo 1987).

    While alive, a customer buys as a Poisson process with rate ``lambda ~ Gamma(r, alpha)``;
    the lifetime is exponential with rate ``mu ~ Gamma(s, beta)``, so unlike BG/NBD a customer
    can drop out at any time, also before a first repeat purchase. The likelihood and the
    conditional expressions follow Fader & Hardie's note "A note on deriving the Pareto/NBD
    model and related expressions" (2005), in log space; the fit reproduces their CDNOW
    estimates (r, alpha, s, beta = 0.553, 10.578, 0.606, 11.669 in weeks, log-likelihood
    -9594.98).

    Parameters
    ----------
    penalizer
        L2 penalty on the four parameters, added to the mean negative log-likelihood.
    maxiter
        Most optimiser iterations.

    Attributes
    ----------
    r_, alpha_, s_, beta_ : float
        Fitted parameters; ``alpha_`` and ``beta_`` are in the time unit of the fit.
    log_likelihood_ : float
        Total (weighted) log-likelihood at the optimum, without the penalty.
    n_customers_ : int
        Number of customers (rows) fitted.
    degenerate_ : str or None
        None for a healthy fit; else one line saying why it is degenerate: ``s`` < 1e-4
        (dropout never happens), a parameter outside [1e-8, 1e8], the optimiser stopped
        short while one ran off, or P(alive) the same (within 1e-3) for 99 % of customers.
    """

    def __init__(self, penalizer: float = 0.0, maxiter: int = 1000) -> None:
        self.penalizer = penalizer
        self.maxiter = maxiter

    @classmethod
    def from_params(cls, r: float, alpha: float, s: float, beta: float) -> ParetoNBDModel:
        """A model with given parameters, e.g. published ones."""
        params = _positive_params("r, alpha, s, beta", r, alpha, s, beta)
        model = cls()
        model.r_, model.alpha_, model.s_, model.beta_ = (float(v) for v in params)
        model.degenerate_ = _degenerate("Pareto/NBD", [cls._running_off(params)])
        return model

    @property
    def params_(self) -> dict[str, float]:
        """Fitted parameters by name."""
        _not_fitted(self, "r_")
        return {"r": self.r_, "alpha": self.alpha_, "s": self.s_, "beta": self.beta_}

    @staticmethod
    def _log_a0(
        params: FloatArray, x: FloatArray, t_x: FloatArray, big_t: FloatArray
    ) -> FloatArray:
        """Log A0 of the note: the part of the likelihood where death came before ``T``."""
        r, alpha, s, beta = params
        # the hypergeometric argument must stay in [0, 1): expand around the larger rate
        if alpha >= beta:
            big, small, b_arg = alpha, beta, s + 1.0
        else:
            big, small, b_arg = beta, alpha, r + x
        rsx = r + s + x
        q1, q2 = big + t_x, big + big_t
        log_p1 = np.log(hyp2f1(rsx, b_arg, rsx + 1.0, (big - small) / q1))
        log_p2 = np.log(hyp2f1(rsx, b_arg, rsx + 1.0, (big - small) / q2))
        # log(p1 / q1^rsx - p2 / q2^rsx), the first term the larger since t_x <= T; a last
        # purchase at T itself leaves no time to die unseen: A0 = 0, log A0 = -inf
        first = log_p1 - rsx * np.log(q1)
        second = log_p2 - rsx * np.log(q2)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_a0 = first + np.log(-np.expm1(np.minimum(second - first, 0.0)))
        # The 2F1 form is fast (the fit evaluates it thousands of times) but overflows for
        # frequent buyers with extreme rates: there, the integral (A0's definition) instead.
        bad = np.isnan(log_a0) | (log_a0 == np.inf) | ((log_a0 == -np.inf) & (t_x < big_t))
        if np.any(bad):
            odds = _pareto_log_odds_dead(params, x[bad], t_x[bad], big_t[bad])
            log_a0[bad] = (
                odds
                - np.log(s)
                + np.log(rsx[bad])
                - (r + x[bad]) * np.log(alpha + big_t[bad])
                - s * np.log(beta + big_t[bad])
            )
        return np.asarray(log_a0, dtype=np.float64)

    @classmethod
    def _log_likelihood(
        cls, params: FloatArray, x: FloatArray, t_x: FloatArray, big_t: FloatArray
    ) -> FloatArray:
        r, alpha, s, beta = params
        a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha) + s * np.log(beta)
        alive = -(r + x) * np.log(alpha + big_t) - s * np.log(beta + big_t)
        died = np.log(s) - np.log(r + s + x) + cls._log_a0(params, x, t_x, big_t)
        return np.asarray(a1 + np.logaddexp(alive, died), dtype=np.float64)

    def fit(
        self,
        frequency: ArrayLike,
        recency: ArrayLike,
        T: ArrayLike,
        *,
        weights: ArrayLike | None = None,
    ) -> ParetoNBDModel:
        """Fit by maximum likelihood (same inputs as :meth:`BetaGeoModel.fit`).

        Returns
        -------
        ParetoNBDModel
            ``self``, fitted.

        Raises
        ------
        ValueError
            On invalid inputs (the message names the offending argument).
        ConvergenceError
            When the optimiser fails to converge.
        """
        penalizer = _penalizer(self.penalizer)
        x, t_x, big_t, w, n_customers = _repeat_history(
            frequency, recency, T, weights, model="Pareto/NBD"
        )
        w_sum = float(w.sum())

        def objective(log_params: FloatArray) -> float:
            params = np.exp(log_params)
            ll = self._log_likelihood(params, x, t_x, big_t)
            return -_dot(w, ll) / w_sum + penalizer * float(np.sum(params**2))

        scale = float(np.average(big_t, weights=w))
        alpha0 = scale / (1.0 + float(np.average(x, weights=w)))
        start = np.log(np.array([1.0, alpha0, 1.0, scale]))
        log_params, off = _maximise(
            _numeric_gradient(objective),
            start,
            model="Pareto/NBD",
            maxiter=self.maxiter,
            running_off=self._running_off,
        )
        params = np.exp(log_params)
        self.r_, self.alpha_, self.s_, self.beta_ = (float(v) for v in params)
        self.log_likelihood_ = _dot(w, self._log_likelihood(params, x, t_x, big_t))
        self.n_customers_ = n_customers
        alive = expit(-_pareto_log_odds_dead(params, x, t_x, big_t))
        self.degenerate_ = _degenerate("Pareto/NBD", [off, _flat_alive(alive, w, "customers")])
        return self

    @staticmethod
    def _running_off(params: FloatArray) -> str | None:
        """Why parameters ``r, alpha, s, beta`` say dropout (or buying) never happens."""
        reasons = _out_of_range("r, alpha, s, beta", params)
        s = params[2]
        if _PARAMETER_RANGE[0] <= s < _MIN_DROPOUT_SHAPE:
            reasons.append(f"s={s:.1e} ran off to 0 (dropout never happens)")
        return "; ".join(reasons) or None

    def _fitted(self) -> FloatArray:
        _not_fitted(self, "r_")
        return np.array([self.r_, self.alpha_, self.s_, self.beta_])

    def probability_alive(
        self, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
    ) -> FloatArray:
        """P(alive at ``T`` | history), in the time unit of the fit.

        Unlike BG/NBD, a customer with no repeat purchase is not alive for sure: the longer
        since the first purchase, the likelier the lifetime has ended.
        """
        x, t_x, big_t = _rfm(frequency, recency, T)
        log_odds_dead = _pareto_log_odds_dead(self._fitted(), x, t_x, big_t)
        return np.asarray(expit(-log_odds_dead), dtype=np.float64)

    def conditional_expected_purchases(
        self, t: ArrayLike, frequency: ArrayLike, recency: ArrayLike, T: ArrayLike
    ) -> FloatArray:
        """E[purchases in (T, T + t] | history], in the time unit of the fit.

        The posterior purchase rate times the expected time alive within the next ``t``,
        times P(alive).
        """
        x, t_x, big_t = _rfm(frequency, recency, T)
        horizon = _horizon(t)
        r, alpha, s, beta = self._fitted()
        u = np.log1p(horizon / (beta + big_t))
        # (1 - ((beta + T) / (beta + T + t))^(s - 1)) / (s - 1), continuous through s = 1
        alive_time = u if abs(s - 1.0) < 1e-9 else -np.expm1(-(s - 1.0) * u) / (s - 1.0)
        rate = (r + x) / (alpha + big_t) * (beta + big_t)
        return np.asarray(
            rate * alive_time * self.probability_alive(x, t_x, big_t), dtype=np.float64
        )


# --------------------------------------------------------------------------------------------
# Gamma-Gamma
# --------------------------------------------------------------------------------------------


class GammaGammaModel:
    """Gamma-Gamma spend model (Fader, Hardie & Lee 2005, "RFM and CLV").

    A customer's transaction values are Gamma(``p``, ``nu``) around a customer mean
    ``p / nu``, with ``nu ~ Gamma(q, v)`` across customers. It assumes spend independent of
    purchase frequency (check that correlation before trusting the CLV).

    Parameters
    ----------
    penalizer
        L2 penalty on ``p, q, v`` added to the mean negative log-likelihood per customer.
    maxiter
        Most optimiser iterations.

    Attributes
    ----------
    p_, q_, v_ : float
        Fitted parameters (``v_`` is the published ``gamma``).
    log_likelihood_ : float
        Total (weighted) log-likelihood of the repeat buyers at the optimum, without penalty.
    n_customers_ : int
        Number of repeat buyers fitted.
    degenerate_ : str or None
        None for a healthy fit; else why not: a parameter outside [1e-8, 1e8], or ``q <= 1``.
    """

    def __init__(self, penalizer: float = 0.0, maxiter: int = 1000) -> None:
        self.penalizer = penalizer
        self.maxiter = maxiter

    @classmethod
    def from_params(cls, p: float, q: float, v: float) -> GammaGammaModel:
        """A model with given parameters."""
        params = np.array([p, q, v], dtype=np.float64)
        if not np.all(np.isfinite(params)) or np.any(params <= 0):
            raise ValueError(f"p, q, v must be positive and finite, got {params}")
        model = cls()
        model.p_, model.q_, model.v_ = (float(val) for val in params)
        model.degenerate_ = _degenerate("Gamma-Gamma", [cls._running_off(params)])
        return model

    @staticmethod
    def _running_off(params: FloatArray) -> str | None:
        """Why parameters ``p, q, v`` make the spend model degenerate, or None."""
        reasons = _out_of_range("p, q, v", params)
        if params[1] <= 1.0:
            reasons.append(f"q={params[1]:.3g} <= 1: a new customer's expected spend is undefined")
        return "; ".join(reasons) or None

    @property
    def params_(self) -> dict[str, float]:
        """Fitted parameters by name."""
        _not_fitted(self, "p_")
        return {"p": self.p_, "q": self.q_, "v": self.v_}

    @staticmethod
    def _log_likelihood(
        params: FloatArray, x: FloatArray, m: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """Per-customer log-likelihood of mean spend ``m`` over ``x`` purchases, and gradient."""
        p, q, v = params
        px = p * x
        log_xm_v = np.log(x * m + v)
        ll = (
            gammaln(px + q)
            - gammaln(px)
            - gammaln(q)
            + q * np.log(v)
            + (px - 1.0) * np.log(m)
            + px * np.log(x)
            - (px + q) * log_xm_v
        )
        dig_pxq = digamma(px + q)
        grad = np.stack(
            [
                x * (dig_pxq - digamma(px) + np.log(m) + np.log(x) - log_xm_v),
                dig_pxq - digamma(q) + np.log(v) - log_xm_v,
                q / v - (px + q) / (x * m + v),
            ]
        )
        return ll, grad

    def fit(
        self,
        frequency: ArrayLike,
        monetary_value: ArrayLike,
        *,
        weights: ArrayLike | None = None,
    ) -> GammaGammaModel:
        """Fit by maximum likelihood on the repeat buyers.

        Rows with ``frequency == 0`` are skipped: they have no repeat purchase, hence no spend
        to learn from, so the whole feature table can be passed as is.

        Parameters
        ----------
        frequency
            Repeat purchases per customer.
        monetary_value
            Mean spend of those repeat purchases; must be > 0 wherever ``frequency > 0``
            (the model is for positive amounts: drop or floor customers whose refunds cancel
            their spend).
        weights
            Optional non-negative weight per row.

        Returns
        -------
        GammaGammaModel
            ``self``, fitted.

        Raises
        ------
        ValueError
            On invalid inputs, or when no customer has ``frequency > 0``.
        ConvergenceError
            When the optimiser fails to converge.
        """
        penalizer = _penalizer(self.penalizer)
        x = _as_array(frequency, "frequency")
        m = _as_array(monetary_value, "monetary_value")
        _same_length(frequency=x, monetary_value=m)
        _check_frequency(x)
        w = _weights(weights, len(x))
        repeat = x > 0
        if not np.any(repeat):
            raise ValueError("frequency: no repeat buyers (frequency > 0) to fit spend on")
        if np.any(m[repeat] <= 0):
            bad = int(np.count_nonzero(m[repeat] <= 0))
            raise ValueError(
                f"monetary_value must be > 0 for repeat buyers; {bad} customer(s) with "
                "frequency > 0 have monetary_value <= 0"
            )
        x, m, w = x[repeat], m[repeat], w[repeat]
        if not np.any(w > 0):
            raise ValueError("weights: every repeat buyer has weight 0")
        w_sum = float(w.sum())

        def objective(log_params: FloatArray) -> tuple[float, FloatArray]:
            params = np.exp(log_params)
            ll, grad = self._log_likelihood(params, x, m)
            value = -_dot(w, ll) / w_sum + penalizer * float(np.sum(params**2))
            gradient = (-(grad * w).sum(axis=1) / w_sum + 2 * penalizer * params) * params
            return value, gradient

        # Start where the implied mean spend p v / (q - 1) equals the observed one.
        start = np.log(np.array([1.0, 2.0, float(np.average(m, weights=w))]))
        log_params, off = _maximise(
            objective,
            start,
            model="Gamma-Gamma",
            maxiter=self.maxiter,
            running_off=self._running_off,
        )
        self.p_, self.q_, self.v_ = (float(val) for val in np.exp(log_params))
        self.degenerate_ = _degenerate("Gamma-Gamma", [off])
        ll, _ = self._log_likelihood(np.exp(log_params), x, m)
        self.log_likelihood_ = _dot(w, ll)
        self.n_customers_ = len(x)
        return self

    def conditional_expected_average_profit(
        self, frequency: ArrayLike, monetary_value: ArrayLike
    ) -> FloatArray:
        """E[mean transaction value | x purchases averaging ``monetary_value``].

        A credibility-weighted blend of the population mean ``p v / (q - 1)`` and the
        customer's own mean: ``p (v + x m) / (p x + q - 1)``. Customers with ``frequency`` 0
        get the population mean (requires ``q > 1``).

        Returns
        -------
        numpy.ndarray
            One value per customer, in the currency of ``monetary_value``.
        """
        _not_fitted(self, "p_")
        x = _as_array(frequency, "frequency")
        m = _as_array(monetary_value, "monetary_value")
        _same_length(frequency=x, monetary_value=m)
        _check_frequency(x)
        p, q, v = self.p_, self.q_, self.v_
        denominator = p * x + q - 1.0
        if np.any(denominator <= 0):
            raise ValueError(
                f"expected spend is undefined (q = {q:.3g} <= 1) for customers with frequency 0"
            )
        return np.asarray(p * (v + x * m) / denominator, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Value
# --------------------------------------------------------------------------------------------


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
