"""Shared by the BTYD models: input checks, the optimiser driver and the model base class."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Self

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.optimize import minimize

ArrayLike = npt.ArrayLike
FloatArray = npt.NDArray[np.float64]

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


class MaximumLikelihoodModel:
    """What the BTYD models share: settings, parameters by name, and the fitted check.

    A subclass names itself (``_model``, as in messages) and its parameters (``_params``,
    stored as ``<name>_`` attributes once fitted), says in ``_running_off`` why given
    parameters make it degenerate, and gives ``from_params`` its named signature on top of
    :meth:`_with_params`.

    Parameters
    ----------
    penalizer
        L2 penalty on the parameters, added to the mean negative log-likelihood per customer.
    maxiter
        Most optimiser iterations.
    """

    _model: ClassVar[str]
    _params: ClassVar[tuple[str, ...]]
    degenerate_: str | None

    def __init__(self, penalizer: float = 0.0, maxiter: int = 1000) -> None:
        self.penalizer = penalizer
        self.maxiter = maxiter

    @classmethod
    def _with_params(cls, *values: float) -> Self:
        """A model with the given parameters, in ``_params`` order; checked positive, finite."""
        params = _positive_params(", ".join(cls._params), *values)
        model = cls()
        for name, value in zip(cls._params, params, strict=True):
            setattr(model, f"{name}_", float(value))
        model.degenerate_ = _degenerate(cls._model, [cls._running_off(params)])
        return model

    @staticmethod
    def _running_off(params: FloatArray) -> str | None:
        """Why ``params`` make the model degenerate, or None."""
        raise NotImplementedError

    @property
    def params_(self) -> dict[str, float]:
        """Fitted parameters by name."""
        _not_fitted(self, f"{self._params[0]}_")
        return {name: float(getattr(self, f"{name}_")) for name in self._params}
