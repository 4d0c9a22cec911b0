"""BG/NBD purchase-count model (Fader, Hardie & Lee 2005, "Counting your customers")."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.special import digamma, expit, gammaln

from rapport.training.btyd.base import (
    _MIN_DROPOUT_MEAN,
    _MIN_DROPOUT_SHAPE,
    _PARAMETER_RANGE,
    ArrayLike,
    FloatArray,
    MaximumLikelihoodModel,
    _degenerate,
    _dot,
    _flat_alive,
    _horizon,
    _maximise,
    _not_fitted,
    _out_of_range,
    _penalizer,
    _repeat_history,
    _rfm,
)
from rapport.training.btyd.quadrature import _beta_mean_of_g, _per_distinct


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


class BetaGeoModel(MaximumLikelihoodModel):
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

    _model = "BG/NBD"
    _params = ("r", "alpha", "a", "b")

    @classmethod
    def from_params(cls, r: float, alpha: float, a: float, b: float) -> BetaGeoModel:
        """A model with given parameters, e.g. published ones or for simulation."""
        return cls._with_params(r, alpha, a, b)

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
