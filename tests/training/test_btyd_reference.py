"""The BTYD predictions against the published formulas evaluated at 50 digits (mpmath).

The oracle is written here from the papers, independently of ``rapport.training.btyd``:
BG/NBD from Fader, Hardie & Lee (2005) (their 2F1 form, or, where mpmath cannot sum that
2F1 in reasonable time, the defining expectation over the posterior dropout probability),
Pareto/NBD's P(alive) from its definition as an integral over the unseen time of death.
"""

from __future__ import annotations

import functools
import os

import mpmath as mp
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapport.training.btyd import (
    BetaGeoModel,
    GammaGammaModel,
    ParetoNBDModel,
    customer_lifetime_value,
    expected_spend,
)
from rapport.training.models import NEXT_PURCHASE_CAP_DAYS, BTYDFeatures

mp.mp.dps = 50
REL = 1e-6
# below this the float64 result may underflow to 0 where the reference does not
TINY = 1e-280


def close(got: float, want: mp.mpf) -> bool:
    want_f = float(want)
    return bool(np.isfinite(got)) and abs(got - want_f) <= REL * abs(want_f) + TINY


# ---------------------------------------------------------------------------------------------
# Oracle
# ---------------------------------------------------------------------------------------------


def bg_p_alive(r, alpha, a, b, x, t_x, big_t):
    r, alpha, a, b, x, t_x, big_t = map(mp.mpf, (r, alpha, a, b, x, t_x, big_t))
    if x == 0:
        return mp.mpf(1)
    return 1 / (1 + a / (b + x - 1) * ((alpha + big_t) / (alpha + t_x)) ** (r + x))


def _alive_by_integral(n, k, a, big_b):
    """E[(1 - (1 + k p)^-n) / p] for p ~ Beta(a, B), from g(0) minus E[g(0) - g(p)]."""
    g0 = n * k

    def h(p):  # (g(0) - g(p)) / p, bounded
        kp = k * p
        if (n + 3) * kp < mp.mpf(10) ** -16:
            # g(0) - g(p) cancels to nothing here: its Taylor series, exact to 1e-48
            return n * (n + 1) * k**2 / 2 * (1 - (n + 2) * kp / 3 + (n + 2) * (n + 3) * kp**2 / 12)
        return (g0 - (1 - (1 + kp) ** (-n)) / p) / p

    a1 = a + 1
    log_norm = mp.loggamma(a1 + big_b) - mp.loggamma(a1) - mp.loggamma(big_b)

    def f(p, q):  # the integrand at p = 1 - q, both given exactly
        return h(p) * mp.exp(log_norm + a * mp.log(p) + (big_b - 1) * mp.log(q))

    mode = a1 / (a1 + big_b)
    sd = mp.sqrt(a1 * big_b / ((a1 + big_b) ** 2 * (a1 + big_b + 1)))
    half = mp.mpf(1) / 2
    points = {mp.mpf(0), mp.mpf(1), half, mode, min(1 / k, half)}
    points |= {max(mp.mpf(0), mode - 30 * sd), min(mp.mpf(1), mode + 30 * sd)}
    left = mp.quad(lambda p: f(p, 1 - p), sorted(v for v in points if v <= half))
    # over (1/2, 1) in q = 1 - p: with B < 1 a share q^B of the mass lies below q, down far
    # past where p rounds to 1; in w = q^B the integrand is smooth and that mass even
    right_points = sorted(1 - v for v in points if v >= half)
    if big_b < 1:

        def smooth(w):
            q = w ** (1 / big_b)
            return h(1 - q) * mp.exp(log_norm + a * mp.log1p(-q)) / big_b

        right = mp.quad(smooth, [v**big_b for v in right_points])
    else:
        right = mp.quad(lambda q: f(1 - q, q), right_points)
    return g0 - a / (a + big_b) * (left + right)


def _alive_by_series(n, k, a, big_b):
    """E[(1 - (1 + k p)^-n) / p] for p ~ Beta(a, B), as n k 3F2(n + 1, a, 1; a + B, 2; -k).

    ``(1 - (1 + k p)^-n) / p`` is ``n`` times the integral over ``(0, k)`` of
    ``(1 + y p)^-(n + 1) dy``, whose mean over ``p`` is ``2F1(n + 1, a; a + B; -y)`` (Euler);
    integrating that series term by term gives the 3F2, a convergent series for ``k < 1``.
    """
    return n * k * mp.hyp3f2(n + 1, a, 1, a + big_b, 2, -k)


@functools.cache
def bg_alive_purchases(r, alpha, a, b, x, big_t, t):
    """E[purchases in (T, T + t] | alive]: the published 2F1 form over P(alive).

    mpmath sums that 2F1 slowly once ``a + b`` is large or ``z`` near 1; there, the 3F2
    series of the defining expectation over ``p ~ Beta(a, b + x)`` where it converges
    (``k < 1``), else that expectation integrated (all three agree where they run, see
    :func:`test_the_reference_forms_agree`).
    """
    r, alpha, a, b, x, big_t, t = map(mp.mpf, (r, alpha, a, b, x, big_t, t))
    z = t / (alpha + big_t + t)
    n, big_b = r + x, b + x
    if a + big_b < 1000 and z < 0.9:
        hyp = mp.hyp2f1(n, big_b, a + big_b - 1, z)
        return (a + big_b - 1) / (a - 1) * (1 - (1 - z) ** n * hyp)
    k = t / (alpha + big_t)
    if k < 1:
        return _alive_by_series(n, k, a, big_b)
    return _alive_by_integral(n, k, a, big_b)


def test_the_reference_forms_agree():
    for r, alpha, a, b, x, big_t, t in [
        (0.243, 4.414, 0.793, 2.426, 3, 30, 13),
        (1.349, 3.597, 2.5, 0.05, 0, 30, 90),  # B < 1: the mass piles up at p = 1
        (12.0, 3000.0, 0.3, 40.0, 200, 3000, 900),
        (0.5, 30.0, 8e-8, 5e4, 300, 3000, 0.5),  # retail: g(0) - g(p) cancels near p = 0
        (1.349, 3.597, 10461.5, 5877624.0, 0, 30, 13),
    ]:
        r, alpha, a, b, t = map(mp.mpf, (r, alpha, a, b, t))
        z, k = t / (alpha + big_t + t), t / (alpha + big_t)
        n, big_b = r + x, b + x
        series = _alive_by_series(n, k, a, big_b)
        forms = [_alive_by_integral(n, k, a, big_b)]
        if a + big_b < 1000:
            hyp = mp.hyp2f1(n, big_b, a + big_b - 1, z)
            forms.append((a + big_b - 1) / (a - 1) * (1 - (1 - z) ** n * hyp))
        for form in forms:
            assert abs(form - series) < mp.mpf(10) ** -30 * abs(series)


def bg_expected(r, alpha, a, b, x, t_x, big_t, t):
    return bg_p_alive(r, alpha, a, b, x, t_x, big_t) * bg_alive_purchases(
        r, alpha, a, b, x, big_t, t
    )


def bg_no_purchase(r, alpha, a, b, x, t_x, big_t, t):
    alive = bg_p_alive(r, alpha, a, b, x, t_x, big_t)
    r, alpha, x, big_t, t = map(mp.mpf, (r, alpha, x, big_t, t))
    return 1 - alive + alive * ((alpha + big_t) / (alpha + big_t + t)) ** (r + x)


def pnbd_p_alive(r, alpha, s, beta, x, t_x, big_t):
    """1 / (1 + odds dead), odds = s (a+T)^(r+x) (b+T)^s * int_{t_x}^T (a+u)^-(r+x) (b+u)^-(s+1)."""
    r, alpha, s, beta, x, t_x, big_t = map(mp.mpf, (r, alpha, s, beta, x, t_x, big_t))
    if t_x == big_t:
        return mp.mpf(1)

    def died(u):
        return mp.exp(
            (r + x) * (mp.log(alpha + big_t) - mp.log(alpha + u))
            + s * (mp.log(beta + big_t) - mp.log(beta + u))
            - mp.log(beta + u)
        )

    # the integrand falls over a scale (alpha + t_x) / (r + x) from t_x: split there
    scale = (alpha + t_x) / (r + x + s + 1)
    points = [t_x + scale * 2**j for j in range(0, 60) if t_x + scale * 2**j < big_t]
    odds = s * mp.quad(died, [t_x, *points, big_t])
    return 1 / (1 + odds)


def pnbd_expected(r, alpha, s, beta, x, t_x, big_t, t):
    alive = pnbd_p_alive(r, alpha, s, beta, x, t_x, big_t)
    r, alpha, s, beta, x, big_t, t = map(mp.mpf, (r, alpha, s, beta, x, big_t, t))
    ratio = (beta + big_t) / (beta + big_t + t)
    return (r + x) * (beta + big_t) / ((alpha + big_t) * (s - 1)) * (1 - ratio ** (s - 1)) * alive


# ---------------------------------------------------------------------------------------------
# A grid over what fits return (a, b up to 1e8, a down to 1e-8, r and alpha over decades)
# ---------------------------------------------------------------------------------------------

BG_PARAMS = [
    (0.243, 4.414, 0.793, 2.426),  # CDNOW, weeks
    (1.349, 3.597, 10461.5, 5877624.0),  # grocery: a, b near the NBD limit
    (0.5, 30.0, 8e-8, 5e4),  # retail: a ran off to 0
    (0.05, 0.5, 1e8, 1e8),  # dropout probability pinned at 1/2
    (3.0, 300.0, 1e-8, 1e8),
    (12.0, 3000.0, 2.5, 0.05),
]
# (x, t_x, T): 0 to 300 repeat purchases over 0 to 3,000 days
HISTORIES: list[tuple[float, float, float]] = [
    (0, 0.0, 0.0),
    (0, 0.0, 700.0),
    (1, 3.0, 30.0),
    (12, 350.0, 365.0),
    (300, 2990.0, 3000.0),
    (300, 400.0, 3000.0),
    (40, 3000.0, 3000.0),
]
HORIZONS = [0.5, 3000.0]


@pytest.mark.parametrize(
    "params",
    BG_PARAMS,
    ids=lambda p: f"a={p[2]:g},b={p[3]:g}",
)
def test_bgnbd_predictions_match_the_50_digit_reference(params: tuple[float, float, float, float]):
    model = BetaGeoModel.from_params(*params)
    x, t_x, big_t = (np.array(c, dtype=float) for c in zip(*HISTORIES, strict=True))
    alive = model.probability_alive(x, t_x, big_t)
    for i, h in enumerate(HISTORIES):
        assert close(alive[i], bg_p_alive(*params, *h)), (h, alive[i])
    for t in HORIZONS:
        got = model.conditional_expected_purchases(t, x, t_x, big_t)
        quiet = model.probability_no_purchase(t, x, t_x, big_t)
        summary = model.conditional_summary(t, x, t_x, big_t)
        np.testing.assert_array_equal(summary["expected_purchases"], got)
        for i, h in enumerate(HISTORIES):
            assert close(got[i], bg_expected(*params, *h, t)), (h, t, got[i])
            assert close(quiet[i], bg_no_purchase(*params, *h, t)), (h, t, quiet[i])
        new = model.expected_purchases(t)
        assert close(float(new), bg_alive_purchases(*params, 0, 0, t)), (t, new)
    wait = model.expected_time_to_next_purchase(x, t_x, big_t)
    r, alpha = params[0], params[1]
    for i, (xi, _, ti) in enumerate(HISTORIES):
        if r + xi > 1:
            assert close(wait[i], (mp.mpf(alpha) + ti) / (mp.mpf(r) + xi - 1))
        else:
            assert wait[i] == np.inf  # the posterior mean wait diverges


def test_grocery_fit_gives_the_finite_true_expectations():
    # x = 0 customers, T = 30 and 700 (weeks), 90 weeks ahead; previously -inf for everyone
    model = BetaGeoModel.from_params(1.349, 3.597, 10461.5, 5877624.0)
    got = model.conditional_expected_purchases(90, [0, 0], [0, 0], [30, 700])
    want = [bg_expected(1.349, 3.597, 10461.5, 5877624.0, 0, 0, T, 90) for T in (30, 700)]
    assert close(got[0], want[0]) and close(got[1], want[1])
    assert round(got[0], 3) == 3.594 and round(got[1], 3) == 0.173
    assert model.degenerate_ is None  # homogeneous, but real, dropout


@pytest.mark.skipif(
    not os.environ.get("RAPPORT_BTYD_ORACLE"),
    reason="random draws of the 50-digit reference take minutes: RAPPORT_BTYD_ORACLE=1 runs it",
)
@pytest.mark.xfail(
    reason="the mpmath reference takes minutes on some draws; kept to finish, not yet a gate",
    strict=False,
)
@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    log_a=st.floats(-8, 8),
    log_b=st.floats(-2, 8),
    log_r=st.floats(-2, 1.5),
    log_alpha=st.floats(-1, 3.5),
    x=st.integers(0, 300),
    span=st.floats(0, 3000),
    last=st.floats(0, 1),
    t=st.floats(0.1, 3000),
)
def test_bgnbd_expectation_matches_reference_anywhere(
    log_a, log_b, log_r, log_alpha, x, span, last, t
):
    params = (10**log_r, 10**log_alpha, 10**log_a, 10**log_b)
    t_x = span * last if x > 0 else 0.0
    model = BetaGeoModel.from_params(*params)
    got = model.conditional_expected_purchases(t, [x], [t_x], [span])[0]
    assert close(got, bg_expected(*params, x, t_x, span, t)), (params, x, t_x, span, t, got)


PNBD_PARAMS = [
    (0.553, 10.578, 0.606, 11.669),  # CDNOW, weeks
    (0.8, 20.0, 1e-5, 3000.0),  # retail: s ran off to 0
    (5.0, 0.5, 30.0, 2.0),
    (0.1, 2000.0, 2.0, 0.3),
]


@pytest.mark.parametrize(
    "params",
    PNBD_PARAMS,
    ids=lambda p: f"s={p[2]:g}",
)
def test_pareto_nbd_predictions_match_the_50_digit_reference(
    params: tuple[float, float, float, float],
):
    model = ParetoNBDModel.from_params(*params)
    x, t_x, big_t = (np.array(c, dtype=float) for c in zip(*HISTORIES, strict=True))
    alive = model.probability_alive(x, t_x, big_t)
    for i, h in enumerate(HISTORIES):
        assert close(alive[i], pnbd_p_alive(*params, *h)), (h, alive[i])
    for t in (0.5, 90.0):
        got = model.conditional_expected_purchases(t, x, t_x, big_t)
        for i, h in enumerate(HISTORIES):
            assert close(got[i], pnbd_expected(*params, *h, t)), (h, t, got[i])


def test_value_predictions_match_the_reference():
    params = (1.349, 3.597, 10461.5, 5877624.0)
    bg = BetaGeoModel.from_params(*params)
    gg = GammaGammaModel.from_params(p=6.25, q=3.74, v=15.44)
    x, t_x, big_t = (np.array(c, dtype=float) for c in zip(*HISTORIES, strict=True))
    money = np.where(x > 0, 35.0, 0.0)
    profit = gg.conditional_expected_average_profit(x, money)
    p, q, v = (mp.mpf(c) for c in ("6.25", "3.74", "15.44"))
    want_profit = [p * (v + xi * mi) / (p * xi + q - 1) for xi, mi in zip(x, money, strict=True)]
    assert all(close(g, w) for g, w in zip(profit, want_profit, strict=True))
    spend = expected_spend(bg, gg, x, t_x, big_t, money, horizon=52.0)
    clv = customer_lifetime_value(
        bg, gg, x, t_x, big_t, money, horizon=52.0, discount_rate=0.01, step=13.0
    )
    for i, h in enumerate(HISTORIES):
        assert close(spend[i], bg_expected(*params, *h, 52) * want_profit[i])
        steps = [bg_expected(*params, *h, 13 * k) if k else 0 for k in range(5)]
        want = sum((steps[k] - steps[k - 1]) / mp.mpf("1.01") ** k for k in range(1, 5))
        assert close(clv[i], want * want_profit[i])


def test_nothing_infinite_over_the_grid():
    for params in BG_PARAMS:
        model = BetaGeoModel.from_params(*params)
        x, t_x, big_t = (np.array(c, dtype=float) for c in zip(*HISTORIES, strict=True))
        for t in HORIZONS:
            summary = model.conditional_summary(t, x, t_x, big_t)
            for name in ("p_alive", "expected_purchases", "p_no_purchase"):
                assert np.all(np.isfinite(summary[name])), (params, t, name)
    for params in PNBD_PARAMS:
        model = ParetoNBDModel.from_params(*params)
        x, t_x, big_t = (np.array(c, dtype=float) for c in zip(*HISTORIES, strict=True))
        assert np.all(np.isfinite(model.conditional_expected_purchases(90, x, t_x, big_t)))


# ---------------------------------------------------------------------------------------------
# Degenerate fits
# ---------------------------------------------------------------------------------------------


def test_retail_parameters_are_flagged_degenerate():
    bg = BetaGeoModel.from_params(0.5, 30.0, 8e-8, 5e4)
    assert bg.degenerate_ is not None and "a=8.0e-08 ran off to 0" in bg.degenerate_
    pnbd = ParetoNBDModel.from_params(0.8, 20.0, 1e-5, 3000.0)
    assert pnbd.degenerate_ is not None and "s=1.0e-05" in pnbd.degenerate_
    assert BetaGeoModel.from_params(0.243, 4.414, 0.793, 2.426).degenerate_ is None
    assert GammaGammaModel.from_params(6.25, 0.9, 15.0).degenerate_ is not None


def never_dropping_history(n=4000, seed=0):
    """Poisson buyers who never leave: BG/NBD's dropout has nothing to explain."""
    rng = np.random.default_rng(seed)
    lam = rng.gamma(2.0, 1 / 20.0, n)
    big_t = rng.uniform(200, 700, n)
    x = rng.poisson(lam * big_t).astype(float)
    # given x purchases in (0, T], the last is the max of x uniforms
    t_x = np.where(x > 0, big_t * rng.beta(np.maximum(x, 1), 1), 0.0)
    return x, t_x, big_t


def test_fit_without_dropout_is_flagged_not_raised():
    x, t_x, big_t = never_dropping_history()
    model = BetaGeoModel().fit(x, t_x, big_t)
    assert model.degenerate_ is not None and model.degenerate_.startswith("BG/NBD: ")
    alive = model.probability_alive(x, t_x, big_t)
    assert np.all(np.isfinite(alive))


def test_btyd_features_drop_a_degenerate_fit():
    x, t_x, big_t = never_dropping_history()
    frame = pd.DataFrame(
        {"frequency": x, "recency": t_x, "T": big_t, "monetary_value": np.where(x > 0, 20.0, 0.0)}
    )
    features = BTYDFeatures(90).fit(frame)
    assert features.dropped_reason_ is not None and features.dropped_reason_.startswith("BG/NBD")
    assert features.columns == []
    assert list(features.transform(frame).columns) == []


def test_btyd_features_are_finite_and_capped():
    rng = np.random.default_rng(1)
    n = 3000
    big_t = rng.uniform(0, 3000, n)
    lam = rng.gamma(0.6, 1 / 30.0, n)
    # buyers leave after each purchase with probability 0.15: a healthy BG/NBD fit
    lifetime = np.minimum(rng.geometric(0.15, n), rng.poisson(lam * big_t) + 1) - 1
    x = lifetime.astype(float)
    t_x = np.where(x > 0, big_t * rng.beta(np.maximum(x, 1), 1.0) * 0.8, 0.0)
    frame = pd.DataFrame(
        {"frequency": x, "recency": t_x, "T": big_t, "monetary_value": np.where(x > 0, 20.0, 0.0)}
    )
    features = BTYDFeatures(90).fit(frame)
    assert features.dropped_reason_ is None
    out = features.transform(frame)
    assert list(out.columns) == features.columns
    values = out.to_numpy()
    assert not np.any(np.isinf(values))
    days = out["expected_days_to_next_purchase"].to_numpy()
    assert np.all(np.isnan(days) | (days <= NEXT_PURCHASE_CAP_DAYS))
    # null exactly where the mean wait is beyond the cap or infinite (r + x <= 1)
    wait = features.bgnbd_.expected_time_to_next_purchase(x, t_x / 7, big_t / 7) * 7
    np.testing.assert_array_equal(np.isnan(days), ~(wait <= NEXT_PURCHASE_CAP_DAYS))
    assert np.isnan(days).any()
    others = out.drop(columns="expected_days_to_next_purchase").to_numpy()
    assert np.all(np.isfinite(others))
