"""The gate's statistics on simulated samples: false alarms, power, and the two p-value backends."""

import itertools
import math

import numpy as np
import pytest

from fastattn.perf import stats

BACKENDS = ["numpy", pytest.param("scipy", marks=pytest.mark.skipif(stats._scipy_stats is None, reason="scipy not installed"))]
PAIRS = 1000


def simulate(rng, slowdown, rounds=30, noise=0.02, drift=0.0, outliers=0.0):
    """PAIRS (baseline, run) pairs of `rounds` rounds; the run is `slowdown` times slower.

    noise: lognormal spread of one round; drift: lognormal spread of a whole process (one draw
    per run, which no number of rounds averages away); outliers: share of rounds 1.5x slower.
    """

    def side(factor):
        level = np.log(factor) + rng.normal(0.0, drift, (PAIRS, 1))
        t = rng.lognormal(level, noise, (PAIRS, rounds))
        return t * np.where(rng.random(t.shape) < outliers, 1.5, 1.0)

    return side(1.0), side(slowdown)


# Graph-batched GPU timing as measured on the lent H200 (DESIGN.md): medians of one call spread
# 0.4-2.5% across processes (drift ~1%), rounds a few % apart, with occasional slow outliers.
REALISTIC = dict(noise=0.03, drift=0.01, outliers=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aa_pairs_at_realistic_noise_rarely_fail(backend):
    base, run = simulate(np.random.default_rng(1), 1.0, **REALISTIC)
    false_alarms = stats.regressed(base, run, 0.05, backend=backend).sum()
    assert false_alarms <= PAIRS // 100, f"{false_alarms} false alarms in {PAIRS} A/A pairs"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rounds", [30, 6])  # 6: the exact small-sample null distribution
def test_false_alarm_rate_at_the_threshold_is_at_most_alpha(backend, rounds):
    # The guarantee: a true slowdown of exactly the threshold (the worst case the gate must
    # pass) is flagged with probability <= alpha; allow 3 binomial standard deviations.
    base, run = simulate(np.random.default_rng(2), 1.05, rounds=rounds)
    rate = stats.regressed(base, run, 0.05, backend=backend).mean()
    assert rate <= stats.ALPHA + 3 * math.sqrt(stats.ALPHA * (1 - stats.ALPHA) / PAIRS), rate


@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_percent_slowdown_with_30_rounds_at_2_percent_noise_is_caught(backend):
    base, run = simulate(np.random.default_rng(3), 1.10, rounds=30, noise=0.02)
    caught = stats.regressed(base, run, 0.05, backend=backend).mean()
    assert caught >= 0.99, caught


def test_slowdown_below_threshold_is_not_failed_however_many_rounds():
    # 3% slower, 2000 rounds: clearly slower, but not clearly beyond 5%.
    rng = np.random.default_rng(4)
    base, run = rng.lognormal(0, 0.02, 2000), rng.lognormal(np.log(1.03), 0.02, 2000)
    assert stats.judge(base, run, 0.05).verdict == "unchanged"


def brute_force_p(x, y):
    """P(U >= U_obs) by enumerating every split of the pooled sample (tiny samples only)."""
    pooled = np.concatenate([x, y])
    u_obs = sum((yj > xi) + 0.5 * (yj == xi) for xi in x for yj in y)
    count = total = 0
    for idx in itertools.combinations(range(pooled.size), y.size):
        ys = pooled[list(idx)]
        xs = np.delete(pooled, idx)
        u = sum((yj > xi) + 0.5 * (yj == xi) for xi in xs for yj in ys)
        count += u >= u_obs - 1e-9
        total += 1
    return count / total


def test_exact_small_sample_pvalue_matches_enumeration():
    rng = np.random.default_rng(5)
    for n, m in [(3, 4), (5, 5), (2, 7)]:
        x, y = rng.random(n), rng.random(m) + 0.2
        assert stats.mwu_greater(x, y, backend="numpy") == pytest.approx(brute_force_p(x, y), abs=1e-12)


@pytest.mark.skipif(stats._scipy_stats is None, reason="scipy not installed")
@pytest.mark.parametrize("n,m,decimals", [(5, 5, None), (6, 40, None), (30, 30, None), (30, 30, 2), (200, 90, 3), (4, 4, 1)])
def test_numpy_fallback_agrees_with_scipy(n, m, decimals):
    rng = np.random.default_rng(n * 100 + m)
    x, y = rng.lognormal(0, 0.05, (50, n)), rng.lognormal(0.02, 0.05, (50, m))
    if decimals is not None:  # ties, as a coarse timer makes
        x, y = np.round(x, decimals), np.round(y, decimals)
    np.testing.assert_allclose(stats.mwu_greater(x, y, backend="numpy"), stats.mwu_greater(x, y, backend="scipy"), rtol=1e-9, atol=1e-15)


def test_all_equal_samples_are_never_significant():
    x = np.full(30, 1e-3)
    assert stats.mwu_greater(x, x * 1.0, backend="numpy") == pytest.approx(1.0)
    assert stats.judge(x, x).verdict == "unchanged"


def test_verdicts():
    rng = np.random.default_rng(6)
    base = rng.lognormal(0, 0.02, 30)
    assert stats.judge(base, base * 1.2).verdict == "regression"
    assert stats.judge(base, base / 1.2).verdict == "improvement"
    assert stats.judge(base, base * 1.01).verdict == "unchanged"
    # 3 rounds a side cannot reach p < 0.01 (the smallest p is 1/20): reported, not failed
    assert stats.judge(base[:3], base[:3] * 1.5).verdict == "slower?"
    assert stats.judge(base[:3], base[:3] / 1.5).verdict == "faster?"
    assert stats.judge(base, base * 3, threshold=math.inf).verdict == "unchanged"


def test_interval_agrees_with_the_verdict_and_covers_the_true_ratio():
    rng = np.random.default_rng(7)
    for true in (0.9, 1.0, 1.07, 1.2):
        base, run = rng.lognormal(0, 0.02, 40), rng.lognormal(np.log(true), 0.02, 40)
        j = stats.judge(base, run, 0.05)
        assert j.low < true < j.high
        assert (j.verdict == "regression") == (j.low > 1.05 and j.ratio > 1.05)
        assert (j.verdict == "improvement") == (j.high * 1.05 < 1 and j.ratio * 1.05 < 1)


def test_interval_is_nan_where_rounds_are_too_few():
    j = stats.judge([1.0, 1.1], [2.0, 2.1])
    assert math.isnan(j.low) and math.isnan(j.high) and j.verdict == "slower?"


def test_huge_runs_are_thinned_not_slow():
    rng = np.random.default_rng(8)
    base, run = rng.lognormal(0, 0.3, 100_000), rng.lognormal(np.log(1.5), 0.3, 100_000)
    assert stats.judge(base, run, 0.05).verdict == "regression"
