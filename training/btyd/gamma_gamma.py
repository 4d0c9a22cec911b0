"""Gamma-Gamma spend model (Fader, Hardie & Lee 2005, "RFM and CLV")."""

from __future__ import annotations

import numpy as np
from scipy.special import digamma, gammaln

from rapport.training.btyd.base import (
    ArrayLike,
    FloatArray,
    MaximumLikelihoodModel,
    _as_array,
    _check_frequency,
    _degenerate,
    _dot,
    _maximise,
    _not_fitted,
    _out_of_range,
    _penalizer,
    _same_length,
    _weights,
)


class GammaGammaModel(MaximumLikelihoodModel):
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

    _model = "Gamma-Gamma"
    _params = ("p", "q", "v")

    @classmethod
    def from_params(cls, p: float, q: float, v: float) -> GammaGammaModel:
        """A model with given parameters."""
        return cls._with_params(p, q, v)

    @staticmethod
    def _running_off(params: FloatArray) -> str | None:
        """Why parameters ``p, q, v`` make the spend model degenerate, or None."""
        reasons = _out_of_range("p, q, v", params)
        if params[1] <= 1.0:
            reasons.append(f"q={params[1]:.3g} <= 1: a new customer's expected spend is undefined")
        return "; ".join(reasons) or None

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
