"""Numerical integrals behind the BG/NBD and Pareto/NBD expectations.

Their published closed forms (2F1 hypergeometric terms) overflow or cancel for frequent
buyers and extreme parameters; the integrals they stand for are smooth, so quadrature takes
them to float64 rounding instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import log_expit

from rapport.training.btyd.base import FloatArray

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


# Gauss-Legendre rule for each of the panels of :func:`_pareto_log_dead_integral`.
_LEGENDRE = np.polynomial.legendre.leggauss(32)
_PANELS = 4
# The dropout integrand is cut where it falls below exp(-_PARETO_TAIL) of its peak.
_PARETO_TAIL = 45.0
# Bisection steps locating that cut: 2^-40 of the span in d is far inside one panel.
_BISECTIONS = 40


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
