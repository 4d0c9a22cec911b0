"""Pareto/NBD purchase-count model (Schmittlein, Morrison & Colombo 1987; Fader & Hardie 2005)."""

from __future__ import annotations

import numpy as np
from scipy.special import expit, gammaln, hyp2f1

from rapport.training.btyd.base import (
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
    _numeric_gradient,
    _out_of_range,
    _penalizer,
    _repeat_history,
    _rfm,
)
from rapport.training.btyd.quadrature import _pareto_log_dead_integral, _per_distinct


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


class ParetoNBDModel(MaximumLikelihoodModel):
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

    _model = "Pareto/NBD"
    _params = ("r", "alpha", "s", "beta")

    @classmethod
    def from_params(cls, r: float, alpha: float, s: float, beta: float) -> ParetoNBDModel:
        """A model with given parameters, e.g. published ones."""
        return cls._with_params(r, alpha, s, beta)

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
