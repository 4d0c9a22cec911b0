from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.special import hyp2f1

from rapport.features.build import build_features
from rapport.features.datasets import CDNOW_CALIBRATION_END, load_cdnow
from rapport.training.btyd import (
    BetaGeoModel,
    ConvergenceError,
    GammaGammaModel,
    ParetoNBDModel,
    customer_lifetime_value,
    expected_spend,
)

# Published CDNOW parameters (Fader, Hardie & Lee 2005; their notes on the Gamma-Gamma fit).
BGNBD_CDNOW = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
GG_CDNOW = {"p": 6.25, "q": 3.74, "v": 15.44}


def sig(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits - 1}e}")


@pytest.fixture(scope="module")
def cdnow() -> pd.DataFrame:
    f = build_features(load_cdnow("sample"), as_of=CDNOW_CALIBRATION_END)
    weeks = f[["frequency", "monetary_value"]].copy()
    weeks["recency"] = f["recency"] / 7
    weeks["T"] = f["T"] / 7
    return weeks


@pytest.fixture(scope="module")
def bg(cdnow) -> BetaGeoModel:
    return BetaGeoModel().fit(cdnow["frequency"], cdnow["recency"], cdnow["T"])


@pytest.fixture(scope="module")
def gg(cdnow) -> GammaGammaModel:
    return GammaGammaModel().fit(cdnow["frequency"], cdnow["monetary_value"])


# ---------------------------------------------------------------------------------------------
# Published figures
# ---------------------------------------------------------------------------------------------


def test_bgnbd_reproduces_published_cdnow_fit(bg):
    for name, published in BGNBD_CDNOW.items():
        assert sig(bg.params_[name]) == sig(published), name
    assert round(bg.log_likelihood_, 1) == -9582.4
    assert bg.n_customers_ == 2357


def test_gamma_gamma_reproduces_published_cdnow_fit(gg):
    for name, published in GG_CDNOW.items():
        assert sig(gg.params_[name]) == sig(published), name
    assert round(gg.v_, 2) == 15.44
    assert gg.n_customers_ == 946


def test_bgnbd_published_conditional_expectation(bg):
    # The paper's worked example: x = 2, t_x = 30.43, T = 38.86 weeks -> 1.226 in 39 weeks.
    assert bg.conditional_expected_purchases(39, [2], [30.43], [38.86])[0] == pytest.approx(
        1.226, abs=5e-4
    )


def test_time_unit_only_rescales_alpha(cdnow, bg):
    days = BetaGeoModel().fit(cdnow["frequency"], cdnow["recency"] * 7, cdnow["T"] * 7)
    assert days.alpha_ == pytest.approx(7 * bg.alpha_, rel=1e-4)
    for name in ("r", "a", "b"):
        assert days.params_[name] == pytest.approx(bg.params_[name], rel=1e-4)


def test_weights_equal_repeated_rows(cdnow, bg):
    grouped = cdnow.groupby(["frequency", "recency", "T"], as_index=False).size()
    assert len(grouped) < len(cdnow)
    fitted = BetaGeoModel().fit(
        grouped["frequency"], grouped["recency"], grouped["T"], weights=grouped["size"]
    )
    for name, value in bg.params_.items():
        assert fitted.params_[name] == pytest.approx(value, rel=1e-4)
    assert fitted.log_likelihood_ == pytest.approx(bg.log_likelihood_, rel=1e-8)


def test_fit_is_deterministic(cdnow, bg):
    again = BetaGeoModel().fit(cdnow["frequency"], cdnow["recency"], cdnow["T"])
    assert again.params_ == bg.params_
    assert again.log_likelihood_ == bg.log_likelihood_
    gg1 = GammaGammaModel().fit(cdnow["frequency"], cdnow["monetary_value"])
    gg2 = GammaGammaModel().fit(cdnow["frequency"], cdnow["monetary_value"])
    assert gg1.params_ == gg2.params_


def test_penalizer_shrinks_parameters(cdnow, bg):
    shrunk = BetaGeoModel(penalizer=0.1).fit(cdnow["frequency"], cdnow["recency"], cdnow["T"])
    assert sum(v**2 for v in shrunk.params_.values()) < sum(v**2 for v in bg.params_.values())
    assert shrunk.log_likelihood_ < bg.log_likelihood_


# ---------------------------------------------------------------------------------------------
# Hand-checkable predictions
# ---------------------------------------------------------------------------------------------

MODEL = BetaGeoModel.from_params(r=0.8, alpha=6.0, a=0.8, b=2.5)


def test_probability_alive_by_hand():
    # x = 0: alive for sure. x = 2, t_x = 10, T = 20:
    # 1 / (1 + a / (b + x - 1) * ((alpha + T) / (alpha + t_x)) ** (r + x)).
    expected = 1 / (1 + 0.8 / 3.5 * (26 / 16) ** 2.8)
    got = MODEL.probability_alive([0, 2, 2], [0, 10, 20], [30, 20, 20])
    assert got == pytest.approx([1.0, expected, 1 / (1 + 0.8 / 3.5)])


def test_conditional_expected_purchases_monotone():
    freq = np.arange(1, 30)
    by_freq = MODEL.conditional_expected_purchases(10, freq, np.full(29, 18.0), np.full(29, 20.0))
    assert np.all(np.diff(by_freq) > 0)
    big_t = np.linspace(20, 100, 20)
    by_t = MODEL.conditional_expected_purchases(10, np.full(20, 3), np.full(20, 20.0), big_t)
    assert np.all(np.diff(by_t) < 0)
    by_h = MODEL.conditional_expected_purchases(
        np.linspace(0, 50, 11), [3] * 11, [15] * 11, [20] * 11
    )
    assert by_h[0] == 0 and np.all(np.diff(by_h) > 0)


def test_conditional_expected_purchases_matches_published_formula():
    # The published form with 2F1(r + x, b + x; a + b + x - 1; z), fine for small x.
    r, alpha, a, b = 0.8, 6.0, 0.8, 2.5
    x, t_x, big_t, t = np.array([0, 1, 3, 7]), np.array([0, 4, 15, 19]), np.full(4, 20.0), 13.0
    z = t / (alpha + big_t + t)
    first = (a + b + x - 1) / (a - 1)
    second = 1 - ((alpha + big_t) / (alpha + big_t + t)) ** (r + x) * hyp2f1(
        r + x, b + x, a + b + x - 1, z
    )
    denominator = 1 + (x > 0) * a / (b + x - 1) * ((alpha + big_t) / (alpha + t_x)) ** (r + x)
    got = MODEL.conditional_expected_purchases(t, x, t_x, big_t)
    assert got == pytest.approx(first * second / denominator, rel=1e-9)
    # Unconditional = conditional on a brand-new customer (x = 0, T = 0).
    assert MODEL.expected_purchases(t) == pytest.approx(
        MODEL.conditional_expected_purchases(t, [0], [0], [0])[0]
    )


def test_large_frequencies_stay_finite():
    x = np.array([50, 500, 5000])
    alive = MODEL.conditional_expected_purchases(10, x, [100, 100, 100], [100, 100, 100])
    # A customer who bought right up to T buys at about the posterior rate (r + x) / (alpha + T).
    rate = (0.8 + x) / 106
    assert np.all(np.isfinite(alive))
    assert alive == pytest.approx(10 * rate, rel=0.1)
    gone = MODEL.conditional_expected_purchases(10, x, [10, 10, 10], [100, 100, 100])
    assert np.all(np.isfinite(gone)) and np.all(gone < 1e-6)
    assert np.all(np.isfinite(MODEL.probability_alive(x, [10, 10, 10], [100, 100, 100])))


def test_probability_no_purchase_bounds_and_monotone():
    t = np.linspace(0, 200, 41)
    p = MODEL.probability_no_purchase(t, [4] * 41, [10] * 41, [20] * 41)
    assert p[0] == pytest.approx(1.0)
    assert np.all((p >= 0) & (p <= 1))
    assert np.all(np.diff(p) < 0)
    # It never drops below P(dead): a dead customer stays quiet forever.
    assert p[-1] > 1 - MODEL.probability_alive([4], [10], [20])[0]
    # A customer who never repeated is alive: P = ((alpha + T) / (alpha + T + t)) ** r.
    assert MODEL.probability_no_purchase(5, [0], [0], [10])[0] == pytest.approx((16 / 21) ** 0.8)


def test_expected_time_to_next_purchase():
    got = MODEL.expected_time_to_next_purchase([0, 2], [0, 10], [30, 20])
    assert got[0] == np.inf  # r + x = 0.8 <= 1
    assert got[1] == pytest.approx(26 / 1.8)
    dates = MODEL.expected_next_purchase_date(
        [0, 2], [0, 10], [30, 20], as_of="2024-01-01", time_unit="7D"
    )
    assert np.isnat(dates[0])
    expected = pd.Timestamp("2024-01-01") + pd.Timedelta(weeks=26 / 1.8)
    assert abs(pd.Timestamp(dates[1]) - expected) < pd.Timedelta(milliseconds=1)
    with pytest.raises(ValueError, match="time_unit"):
        MODEL.expected_next_purchase_date([1], [1], [2], as_of="2024-01-01", time_unit="-1D")


# ---------------------------------------------------------------------------------------------
# Monte Carlo
# ---------------------------------------------------------------------------------------------


def simulate_bgnbd(r, alpha, a, b, big_t, horizon, t0, seed):
    """Simulate BG/NBD customers: history in (0, T], purchases in (T, T + horizon], in (0, t0]."""
    rng = np.random.default_rng(seed)
    n = len(big_t)
    lam = rng.gamma(r, 1 / alpha, n)
    p = rng.beta(a, b, n)
    end = np.maximum(big_t + horizon, t0)
    clock = np.zeros(n)
    x, t_x, future, early = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    active = np.arange(n)
    while active.size:
        clock[active] += rng.exponential(1 / lam[active])
        now = clock[active]
        active = active[now <= end[active]]
        now = clock[active]
        past = now <= big_t[active]
        x[active[past]] += 1
        t_x[active[past]] = now[past]
        future[active[~past & (now <= big_t[active] + horizon)]] += 1
        early[active[now <= t0]] += 1
        active = active[rng.random(active.size) >= p[active]]  # drop out after a purchase
    return x, t_x, future, early


def test_monte_carlo_agrees_with_formulas():
    r, alpha, a, b, horizon, t0 = 0.8, 6.0, 0.8, 2.5, 20.0, 30.0
    n = 40_000
    big_t = np.random.default_rng(0).uniform(5, 40, n)
    x, t_x, future, early = simulate_bgnbd(r, alpha, a, b, big_t, horizon, t0, seed=1)
    model = BetaGeoModel.from_params(r, alpha, a, b)

    # Unconditional E[X(t0)].
    se = early.std() / np.sqrt(n)
    assert abs(early.mean() - model.expected_purchases(t0)) < 4 * se

    # Conditional predictions average to what happened, in every history group (tower rule).
    quiet = model.probability_no_purchase(horizon, x, t_x, big_t)
    expected = model.conditional_expected_purchases(horizon, x, t_x, big_t)
    for group in (x == 0, x == 1, x == 2, (x >= 3) & (x < 6), x >= 6, np.ones(n, bool)):
        observed_quiet = (future[group] == 0).astype(float)
        se_quiet = observed_quiet.std() / np.sqrt(group.sum())
        assert abs(observed_quiet.mean() - quiet[group].mean()) < 4 * se_quiet + 1e-3
        se_count = future[group].std() / np.sqrt(group.sum())
        assert abs(future[group].mean() - expected[group].mean()) < 4 * se_count + 1e-3


def test_fit_recovers_simulated_parameters():
    truth = {"r": 0.8, "alpha": 6.0, "a": 0.8, "b": 2.5}
    big_t = np.random.default_rng(2).uniform(20, 60, 20_000)
    x, t_x, _, _ = simulate_bgnbd(0.8, 6.0, 0.8, 2.5, big_t, 0.0, 0.0, seed=3)
    fitted = BetaGeoModel().fit(x, t_x, big_t)
    for name, value in truth.items():
        assert fitted.params_[name] == pytest.approx(value, rel=0.2), name


# ---------------------------------------------------------------------------------------------
# Gamma-Gamma and value
# ---------------------------------------------------------------------------------------------


def test_gamma_gamma_skips_one_time_buyers(cdnow, gg):
    repeat = cdnow[cdnow["frequency"] > 0]
    only = GammaGammaModel().fit(repeat["frequency"], repeat["monetary_value"])
    assert only.params_ == gg.params_


def test_conditional_expected_average_profit_by_hand():
    model = GammaGammaModel.from_params(p=6.0, q=4.0, v=15.0)
    got = model.conditional_expected_average_profit([0, 2, 10], [0.0, 50.0, 50.0])
    population = 6 * 15 / 3
    assert got == pytest.approx([population, 6 * (15 + 100) / 15, 6 * (15 + 500) / 63])
    # More purchases: closer to the customer's own mean.
    assert abs(got[2] - 50) < abs(got[1] - 50)


def test_customer_lifetime_value(bg, gg, cdnow):
    cols = [cdnow[c].to_numpy()[:200] for c in ("frequency", "recency", "T", "monetary_value")]
    step, months, rate = 4.345, 12, 0.01
    clv = customer_lifetime_value(
        bg, gg, *cols, horizon=months * step, discount_rate=rate, step=step
    )
    # lifetimes' loop, written out.
    profit = gg.conditional_expected_average_profit(cols[0], cols[3])
    loop = np.zeros(200)
    for k in range(1, months + 1):
        gained = bg.conditional_expected_purchases(k * step, *cols[:3])
        gained -= bg.conditional_expected_purchases((k - 1) * step, *cols[:3])
        loop += gained * profit / (1 + rate) ** k
    assert clv == pytest.approx(loop, rel=1e-10)
    undiscounted = customer_lifetime_value(
        bg, gg, *cols, horizon=months * step, discount_rate=0.0, step=step
    )
    assert undiscounted == pytest.approx(expected_spend(bg, gg, *cols, horizon=months * step))
    assert np.all(clv < undiscounted)
    zero = customer_lifetime_value(bg, gg, *cols, horizon=0, discount_rate=rate, step=step)
    assert np.all(zero == 0)
    with pytest.raises(ValueError, match="whole number of steps"):
        customer_lifetime_value(bg, gg, *cols, horizon=10, discount_rate=rate, step=4)
    with pytest.raises(ValueError, match="discount_rate"):
        customer_lifetime_value(bg, gg, *cols, horizon=8, discount_rate=-1, step=4)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frequency", "recency", "T", "match"),
    [
        ([1, -1], [1, 1], [2, 2], "frequency contains 1 negative"),
        ([1, 1], [1, -1], [2, 2], "recency contains 1 negative"),
        ([1, 1], [1, 1], [2, -2], "T contains 1 negative"),
        ([1, np.nan], [1, 1], [2, 2], "frequency contains 1 NaN"),
        ([1, 1], [1, np.inf], [2, 2], "recency contains 1 NaN or infinite"),
        ([1, 1], [1, 1], [2, np.nan], "T contains 1 NaN"),
        ([1, 1], [1, 3], [2, 2], "recency exceeds T"),
        ([1, 1.5], [1, 1], [2, 2], "frequency must hold whole numbers"),
        ([1, 1], [1, 1], [2, 2, 2], "length mismatch"),
        ([1, 0], [1, 1], [2, 2], "recency must be 0 where frequency is 0"),
        ([], [], [], "frequency is empty"),
        (["a"], [1], [2], "frequency must be numeric"),
    ],
)
def test_bgnbd_input_errors(frequency, recency, T, match):
    with pytest.raises(ValueError, match=match):
        BetaGeoModel().fit(frequency, recency, T)
    with pytest.raises(ValueError, match=match):
        MODEL.conditional_expected_purchases(1, frequency, recency, T)


def test_other_errors(cdnow):
    with pytest.raises(ValueError, match="weights"):
        BetaGeoModel().fit([1, 2], [1, 1], [2, 2], weights=[1])
    with pytest.raises(ValueError, match="weights"):
        BetaGeoModel().fit([1, 2], [1, 1], [2, 2], weights=[0, 0])
    with pytest.raises(ValueError, match="penalizer"):
        BetaGeoModel(penalizer=-1).fit([1, 2], [1, 1], [2, 2])
    with pytest.raises(ValueError, match="t must be non-negative"):
        MODEL.probability_no_purchase(-1, [1], [1], [2])
    with pytest.raises(ValueError, match="positive"):
        BetaGeoModel.from_params(r=0, alpha=1, a=1, b=1)
    with pytest.raises(AttributeError, match="not fitted"):
        BetaGeoModel().probability_alive([1], [1], [2])
    with pytest.raises(AttributeError, match="not fitted"):
        GammaGammaModel().conditional_expected_average_profit([1], [1])
    with pytest.raises(ConvergenceError, match="did not converge"):
        BetaGeoModel(maxiter=1).fit(cdnow["frequency"], cdnow["recency"], cdnow["T"])
    with pytest.raises(ValueError, match="frequency: no repeat purchases"):
        BetaGeoModel().fit([0] * 50, [0] * 50, np.linspace(10, 40, 50))


def test_gamma_gamma_input_errors():
    with pytest.raises(ValueError, match="frequency: no repeat buyers"):
        GammaGammaModel().fit([0, 0], [0.0, 0.0])
    with pytest.raises(ValueError, match="monetary_value must be > 0 for repeat buyers"):
        GammaGammaModel().fit([1, 2, 0], [10.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="monetary_value contains 1 negative"):
        GammaGammaModel().fit([1, 2], [10.0, -5.0])
    with pytest.raises(ValueError, match="monetary_value contains 1 NaN"):
        GammaGammaModel().fit([1, 2], [10.0, np.nan])
    with pytest.raises(ValueError, match="frequency must hold whole numbers"):
        GammaGammaModel().fit([1, 2.5], [10.0, 5.0])
    with pytest.raises(ValueError, match="length mismatch"):
        GammaGammaModel().fit([1, 2], [10.0])
    with pytest.raises(ValueError, match="undefined"):
        GammaGammaModel.from_params(p=1, q=0.5, v=1).conditional_expected_average_profit([0], [0])


def test_conditional_summary_equals_the_separate_predictions(cdnow, bg):
    x, t_x, big_t = cdnow["frequency"], cdnow["recency"], cdnow["T"]
    summary = bg.conditional_summary(13.0, x, t_x, big_t)
    np.testing.assert_array_equal(summary["p_alive"], bg.probability_alive(x, t_x, big_t))
    np.testing.assert_array_equal(
        summary["expected_purchases"], bg.conditional_expected_purchases(13.0, x, t_x, big_t)
    )
    np.testing.assert_array_equal(
        summary["p_no_purchase"], bg.probability_no_purchase(13.0, x, t_x, big_t)
    )
    np.testing.assert_array_equal(
        summary["time_to_next"], bg.expected_time_to_next_purchase(x, t_x, big_t)
    )


# ---------------------------------------------------------------------------------------------
# Pareto/NBD
# ---------------------------------------------------------------------------------------------

# Published CDNOW parameters (Fader, Hardie & Lee 2005, table 1; weeks).
PNBD_CDNOW = {"r": 0.553, "alpha": 10.578, "s": 0.606, "beta": 11.669}


@pytest.fixture(scope="module")
def pnbd(cdnow) -> ParetoNBDModel:
    return ParetoNBDModel().fit(cdnow["frequency"], cdnow["recency"], cdnow["T"])


def test_pareto_nbd_reproduces_published_cdnow_fit(pnbd):
    for name, published in PNBD_CDNOW.items():
        assert sig(pnbd.params_[name]) == sig(published), name
    assert round(pnbd.log_likelihood_, 2) == -9594.98
    assert pnbd.n_customers_ == 2357


def test_pareto_nbd_time_unit_only_rescales_the_rates(cdnow, pnbd):
    days = ParetoNBDModel().fit(cdnow["frequency"], cdnow["recency"] * 7, cdnow["T"] * 7)
    assert days.r_ == pytest.approx(pnbd.r_, rel=1e-3)
    assert days.s_ == pytest.approx(pnbd.s_, rel=1e-3)
    assert days.alpha_ == pytest.approx(7 * pnbd.alpha_, rel=1e-3)
    assert days.beta_ == pytest.approx(7 * pnbd.beta_, rel=1e-3)


def test_pareto_nbd_probability_alive_behaves(pnbd):
    # one-time buyers are not alive for sure, and less so the longer ago they bought
    p_new = pnbd.probability_alive([0, 0, 0], [0, 0, 0], [5.0, 20.0, 39.0])
    assert np.all((p_new > 0) & (p_new < 1)) and np.all(np.diff(p_new) < 0)
    # a more recent last purchase, other things equal, means more likely alive
    p = pnbd.probability_alive([3, 3, 3], [10.0, 25.0, 38.0], [39.0, 39.0, 39.0])
    assert np.all(np.diff(p) > 0)


def test_pareto_nbd_monte_carlo_agrees_with_formulas():
    # Simulate the model itself; the mean predicted future purchases and share alive must
    # match what the simulated customers then do.
    r, alpha, s, beta, big_t, t = 0.8, 8.0, 0.7, 12.0, 39.0, 26.0
    rng = np.random.default_rng(0)
    n = 40_000
    lam = rng.gamma(r, 1 / alpha, n)
    mu = rng.gamma(s, 1 / beta, n)
    death = rng.exponential(1 / mu)
    x, t_x, future = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        end = min(death[i], big_t + t)
        times = np.cumsum(rng.exponential(1 / lam[i], 1 + int(lam[i] * end * 3 + 20)))
        times = times[times <= end]
        seen = times[times <= big_t]
        x[i], t_x[i] = len(seen), (seen[-1] if len(seen) else 0.0)
        future[i] = len(times) - len(seen)
    model = ParetoNBDModel.from_params(r, alpha, s, beta)
    predicted = model.conditional_expected_purchases(t, x, t_x, np.full(n, big_t))
    assert predicted.mean() == pytest.approx(future.mean(), rel=0.05)
    alive = model.probability_alive(x, t_x, np.full(n, big_t))
    assert alive.mean() == pytest.approx((death > big_t).mean(), abs=0.015)
    # and the fit recovers the parameters from the simulated histories
    fitted = ParetoNBDModel().fit(x, t_x, np.full(n, big_t))
    for name, true in {"r": r, "alpha": alpha, "s": s, "beta": beta}.items():
        assert fitted.params_[name] == pytest.approx(true, rel=0.25), name


def test_pareto_nbd_last_purchase_at_the_cutoff(pnbd):
    # no time left to have died unseen: the likelihood's A0 term is exactly 0, no warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = pnbd.probability_alive([2, 2], [39.0, 38.0], [39.0, 39.0])
    assert p[0] == 1.0 and p[1] < 1.0
