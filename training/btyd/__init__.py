"""Classic "buy till you die" baselines: BG/NBD, Pareto/NBD, Gamma-Gamma and CLV.

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

One model per module over a shared maximum-likelihood base:

- :mod:`.base` -- input checks, the optimiser driver and :class:`~.base.MaximumLikelihoodModel`.
- :mod:`.quadrature` -- the numerical integrals behind the BG/NBD and Pareto/NBD expectations.
- :mod:`.bgnbd`, :mod:`.pareto_nbd`, :mod:`.gamma_gamma` -- the models.
- :mod:`.value` -- expected spend and customer lifetime value from a purchase and a spend model.
"""

from rapport.training.btyd.base import ConvergenceError
from rapport.training.btyd.bgnbd import BetaGeoModel
from rapport.training.btyd.gamma_gamma import GammaGammaModel
from rapport.training.btyd.pareto_nbd import ParetoNBDModel
from rapport.training.btyd.value import customer_lifetime_value, expected_spend

__all__ = [
    "BetaGeoModel",
    "ConvergenceError",
    "GammaGammaModel",
    "ParetoNBDModel",
    "customer_lifetime_value",
    "expected_spend",
]
