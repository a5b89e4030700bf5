"""The gate's statistics: is a case slower than its threshold allows, clearly, on the per-round samples?

Rule. With baseline rounds ``x``, run rounds ``y`` and threshold ``t`` (0.05 for 5%), a case
*regresses* when both

1. ``median(y) / median(x) > 1 + t`` (the slowdown a reader sees is above the threshold), and
2. a one-sided Mann-Whitney U test rejects "the run is at most ``1 + t`` times slower" at level
   ``alpha`` (0.01): the test asks whether ``y`` is stochastically larger than ``(1 + t) * x``.

Why this test. Rank tests need no normality (GPU and CPU times are skewed, with outliers), and
shifting the null hypothesis to the threshold, rather than to "no change", makes the guarantee
about what a gate promises: **for any true slowdown of at most t, a case is flagged with
probability at most alpha** (the test has size alpha at the boundary ``y ~ (1 + t) x`` and is
monotone: a smaller slowdown makes ``y`` stochastically smaller, so a rejection only rarer). In
an A/A comparison (no change at all) the chance is far below alpha, because the run would have
to look ``1 + t`` times slower on most pairs of rounds. A test against "no change" instead
would flag any drift once there are enough rounds (CPU runs have thousands), leaving the
threshold alone to decide. Improvements mirror the rule.

What it cannot see. The guarantee is about round-to-round noise within a run (rounds are taken
as exchangeable). A shift of a whole process (clocks, placement, a neighbour on the machine)
is one draw per run that no number of rounds reveals; the threshold must stay above that
spread (graph-batched GPU timing keeps it at 0.4-2.5% on the lent H200 against a 5% default,
see DESIGN.md), and the verdict table reports each side's noise so a drifting machine shows.

p-values come from scipy.stats.mannwhitneyu when scipy is installed; otherwise from the same
formulas in numpy (exact null distribution for small samples without ties, else the normal
approximation with tie and continuity corrections, as scipy does); tests check they agree.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

try:
    from scipy import stats as _scipy_stats
except ImportError:  # the gate works without scipy; see _mwu_greater_numpy
    _scipy_stats = None

ALPHA = 0.01
DEFAULT_THRESHOLD = 0.05
# Rounds kept per side (evenly spaced in run order): beyond a few thousand the verdict cannot
# change, and CPU runs of fast cases record 10^5 rounds.
MAX_ROUNDS = 4000


def _average_ranks(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average (1-based) ranks along the last axis of a 2-D array, and each row's sum of t^3 - t over tie groups."""
    rows, n = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    starts = np.ones_like(s, dtype=bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    flat_starts = starts.ravel()
    group = np.cumsum(flat_starts) - 1  # every row opens a new group, so ids never span rows
    first = np.flatnonzero(flat_starts)
    count = np.bincount(group).astype(np.float64)
    rank_sorted = ((first % n) + (count + 1) / 2)[group].reshape(rows, n)
    ranks = np.empty_like(rank_sorted)
    np.put_along_axis(ranks, order, rank_sorted, axis=1)
    ties = np.bincount(first // n, weights=count**3 - count, minlength=rows)
    return ranks, ties


@functools.lru_cache(maxsize=64)
def _u_null_tail(n: int, m: int) -> np.ndarray:
    """tail[u] = P(U >= u) for the Mann-Whitney U of samples of sizes n and m without ties, exactly.

    The counts of U are the coefficients of the Gaussian binomial [n+m choose k]_q, built by
    [b+i choose i] = [b+i-1 choose i-1] * (1 - q^(b+i)) / (1 - q^i); after each step the
    coefficients are non-negative counts again, so float64 keeps its precision.
    """
    k, b = min(n, m), max(n, m)
    size = n * m + 1
    c = np.zeros(size)
    c[0] = 1.0
    for i in range(1, k + 1):
        e = b + i
        if e < size:
            c[e:] = c[e:] - c[: size - e]
        for r in range(i):
            c[r::i] = np.cumsum(c[r::i])
    tail = np.cumsum(c[::-1])[::-1] / c.sum()
    tail.flags.writeable = False
    return tail


def _normal_sf(z: np.ndarray) -> np.ndarray:
    z = np.nan_to_num(np.asarray(z, dtype=np.float64), nan=-np.inf)
    return np.array([0.5 * math.erfc(v / math.sqrt(2.0)) for v in z.ravel()]).reshape(z.shape)


def _mwu_greater_numpy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    n, m = x.shape[-1], y.shape[-1]
    pooled = np.concatenate([x, y], axis=-1)
    ranks, ties = _average_ranks(pooled.reshape(-1, n + m))
    u = ranks[:, n:].sum(axis=1) - m * (m + 1) / 2  # U of y: pairs (x_i, y_j) with y_j > x_i, ties half
    if (n <= 8 or m <= 8) and not ties.any():
        p = _u_null_tail(n, m)[np.ceil(u - 1e-9).astype(int)]
    else:
        total = n + m
        sigma = np.sqrt(n * m / 12 * ((total + 1) - ties / (total * (total - 1))))
        with np.errstate(divide="ignore", invalid="ignore"):
            p = _normal_sf((u - n * m / 2 - 0.5) / sigma)
    return p.reshape(pooled.shape[:-1])


def mwu_greater(x, y, *, backend: str = "auto") -> np.ndarray:
    """One-sided Mann-Whitney U p-value of H1 "y is stochastically larger than x", along the last axis.

    `backend`: "scipy", "numpy", or "auto" (scipy when installed). Leading axes are batched.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    lead = np.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    x = np.broadcast_to(x, lead + x.shape[-1:])
    y = np.broadcast_to(y, lead + y.shape[-1:])
    if backend == "auto":
        backend = "scipy" if _scipy_stats is not None else "numpy"
    if backend == "scipy":
        if _scipy_stats is None:
            raise ImportError("scipy is not installed; use backend='numpy'")
        return np.asarray(_scipy_stats.mannwhitneyu(y, x, alternative="greater", axis=-1).pvalue)
    if backend == "numpy":
        return _mwu_greater_numpy(x, y)
    raise ValueError(f"backend must be 'auto', 'scipy' or 'numpy', got {backend!r}")


def p_slower(base, run, threshold: float, *, backend: str = "auto") -> np.ndarray:
    """p-value of H0 "run is at most (1 + threshold) times slower than base" (small: clearly slower)."""
    return mwu_greater(np.asarray(base) * (1.0 + threshold), run, backend=backend)


def p_faster(base, run, threshold: float, *, backend: str = "auto") -> np.ndarray:
    """p-value of H0 "run is at most (1 + threshold) times faster than base" (small: clearly faster)."""
    return mwu_greater(np.asarray(run) * (1.0 + threshold), base, backend=backend)


def regressed(base, run, threshold: float, alpha: float = ALPHA, *, backend: str = "auto") -> np.ndarray:
    """The gate's rule on batches: (..., n) baseline rounds and (..., m) run rounds -> bool (...)."""
    base = np.asarray(base, dtype=np.float64)
    run = np.asarray(run, dtype=np.float64)
    ratio = np.median(run, axis=-1) / np.median(base, axis=-1)
    return (ratio > 1.0 + threshold) & (p_slower(base, run, threshold, backend=backend) < alpha)


def _thin(samples: np.ndarray) -> np.ndarray:
    if samples.size <= MAX_ROUNDS:
        return samples
    return samples[np.linspace(0, samples.size - 1, MAX_ROUNDS).round().astype(int)]


def _boundary(ok, lo: float, hi: float) -> float:
    """exp of the point in [lo, hi] where the monotone predicate `ok` flips; nan if it does not."""
    at_lo = ok(lo)
    if at_lo == ok(hi):
        return math.nan
    for _ in range(32):  # the span is a few units of log-ratio: 2^-32 of it is far below display
        mid = 0.5 * (lo + hi)
        if ok(mid) == at_lo:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def ratio_interval(base, run, alpha: float = ALPHA, *, backend: str = "numpy") -> tuple[float, float]:
    """(low, high): the run/baseline time ratios that the one-sided tests at level `alpha` cannot
    reject; together a (1 - 2 alpha) interval. A case regresses exactly when low > 1 + threshold
    (and its median ratio agrees). nan where the samples are too few to reach `alpha` at all.
    The bisection takes ~80 p-values, so it uses the numpy backend (scipy's per-call overhead is
    ~10x); the two agree to rounding, which the tests check."""
    base = _thin(np.asarray(base, dtype=np.float64))
    run = _thin(np.asarray(run, dtype=np.float64))
    span_lo = math.log(run.min() / base.max()) - 1e-6
    span_hi = math.log(run.max() / base.min()) + 1e-6
    # "run is clearly more than e^v times slower": true for small v, false past the lower bound
    low = _boundary(lambda v: float(mwu_greater(base * math.exp(v), run, backend=backend)) < alpha, span_lo, span_hi)
    # "run is clearly less than e^v times the baseline": false for small v, true past the upper bound
    high = _boundary(lambda v: float(mwu_greater(run, base * math.exp(v), backend=backend)) < alpha, span_lo, span_hi)
    return low, high


def noise(samples: np.ndarray) -> float:
    """Interquartile range over median: the spread of one side's rounds."""
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return float((q3 - q1) / med)


@dataclass(frozen=True)
class Judgement:
    verdict: str  # "regression", "improvement", "slower?", "faster?" or "unchanged"
    ratio: float  # median(run) / median(base)
    low: float  # (1 - 2 alpha) interval of the ratio; nan where too few rounds
    high: float
    p_slower: float
    p_faster: float
    noise_base: float
    noise_run: float
    threshold: float


def judge(base, run, threshold: float = DEFAULT_THRESHOLD, alpha: float = ALPHA, *, backend: str = "auto",
          interval: bool = True) -> Judgement:
    """Verdict for one case. "slower?"/"faster?": the medians moved beyond the threshold but the
    rounds do not show it clearly (too few or too noisy); reported, never failed.
    `interval=False` skips the ratio interval (~80 p-values) where only the verdict is needed."""
    base = _thin(np.asarray(base, dtype=np.float64))
    run = _thin(np.asarray(run, dtype=np.float64))
    ratio = float(np.median(run) / np.median(base))
    if math.isinf(threshold):  # gating switched off for this case: report the change only
        ps = pf = 1.0
    else:
        ps = float(p_slower(base, run, threshold, backend=backend))
        pf = float(p_faster(base, run, threshold, backend=backend))
    if ratio > 1.0 + threshold:
        verdict = "regression" if ps < alpha else "slower?"
    elif ratio * (1.0 + threshold) < 1.0:
        verdict = "improvement" if pf < alpha else "faster?"
    else:
        verdict = "unchanged"
    low, high = ratio_interval(base, run, alpha) if interval else (math.nan, math.nan)
    return Judgement(verdict, ratio, low, high, ps, pf, noise(base), noise(run), threshold)
