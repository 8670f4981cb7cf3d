"""95% intervals for evaluation scores, so a before/after table can be read with its uncertainty. Pure functions.

    rates (EM, valid-question rate, solver accuracy)   wilson_interval(successes, n)
    means of bounded values (F1, searches)             mean_interval(values, low=, high=)     Student t
    the unweighted average over datasets               mean_of_rates_interval / mean_of_means_interval

Why Wilson for rates: evaluation subsets are small (20 questions, 16 seeds) and rates sit near 0 or 1, where the
normal ("Wald") interval collapses to a point or leaves [0, 1]; Wilson stays inside [0, 1] and is not empty at 0/n
(0 of 20 still allows up to 16%). Why Student t for means: with a handful of values the normal quantile is too
narrow (t with 15 degrees of freedom is 2.13, not 1.96). An interval is clipped to the values' own range.

Every interval is two-sided at `confidence` (default 0.95).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True, slots=True)
class Interval:
    """A confidence interval [low, high] around an estimate (the estimate itself is kept by the score)."""

    low: float
    high: float

    def to_json(self) -> list[float]:
        return [round(self.low, 4), round(self.high, 4)]


def separation(before: Interval, after: Interval) -> int:
    """+1 when `after` lies wholly above `before`, -1 wholly below, 0 when they overlap. Two 95% intervals that do
    not overlap differ at well below the 5% level (about 0.6% for equal widths): a conservative test, chosen because
    it reads straight off the tables and needs no pairing of the two runs."""
    if after.low > before.high:
        return 1
    if after.high < before.low:
        return -1
    return 0


def normal_quantile(confidence: float = CONFIDENCE) -> float:
    """z such that a standard normal lies within ±z with probability `confidence` (1.96 for 0.95)."""
    _check_confidence(confidence)
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (df may be fractional, as Welch's is), found by
    bisection on the exact CDF (regularised incomplete beta); the standard library has no t distribution."""
    if not 0 < p < 1:
        raise ValueError(f"p = {p}: a quantile needs 0 < p < 1")
    if not df > 0:
        raise ValueError(f"df = {df}: degrees of freedom must be > 0")
    if p < 0.5:
        return -student_t_quantile(1 - p, df)
    high = 1.0
    while _t_cdf(high, df) < p:
        high *= 2
    low = 0.0
    for _ in range(200):
        mid = (low + high) / 2
        if _t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval of a rate successes / n."""
    if n < 1:
        raise ValueError(f"n = {n}: a rate needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"successes = {successes}: must be in 0..n = {n}")
    return _wilson(successes / n, n, normal_quantile(confidence))


def mean_of_rates_interval(rates: Sequence[float], ns: Sequence[int], confidence: float = CONFIDENCE) -> Interval:
    """Interval of the unweighted mean of rates measured on independent samples of sizes `ns` (the "average" row
    over datasets): Wilson at the effective sample size k² / Σ 1/n_i, the size for which one rate has the same
    variance as the mean when the rates are equal. For one rate it is that rate's Wilson interval."""
    _check_groups(rates, ns)
    if any(not 0 <= r <= 1 for r in rates):
        raise ValueError(f"rates {list(rates)}: each must be in [0, 1]")
    k = len(rates)
    effective_n = k * k / sum(1 / n for n in ns)
    return _wilson(sum(rates) / k, effective_n, normal_quantile(confidence))


def mean_interval(values: Sequence[float], *, low: float, high: float, confidence: float = CONFIDENCE) -> Interval:
    """Student t interval of the mean of `values`, which all lie in [low, high] (e.g. F1 in [0, 1]); clipped to
    that range. One value says nothing about the spread: the interval is then the whole range."""
    if not values:
        raise ValueError("no values: the mean of nothing has no interval")
    sd = statistics.stdev(values) if len(values) > 1 else None
    return mean_of_means_interval([statistics.fmean(values)], [sd], [len(values)], low=low, high=high,
                                  confidence=confidence)


def mean_of_means_interval(means: Sequence[float], sds: Sequence[float | None], ns: Sequence[int], *, low: float,
                           high: float, confidence: float = CONFIDENCE) -> Interval:
    """Interval of the unweighted mean of k independent sample means (sample standard deviations `sds`, sizes
    `ns`): standard error sqrt(Σ sd_i²/n_i) / k with a Student t quantile at Welch–Satterthwaite's degrees of
    freedom, which for k = 1 is n - 1 (the plain t interval). A group of one value (sd None) leaves the spread
    unknown: the interval is then [low, high]. Zero spread everywhere gives the point itself."""
    _check_groups(means, ns)
    _check_confidence(confidence)
    if len(sds) != len(means):
        raise ValueError(f"{len(means)} means but {len(sds)} standard deviations; give one per group")
    if low > high:
        raise ValueError(f"low = {low} > high = {high}: the values' range must not be empty")
    mean = sum(means) / len(means)
    if any(sd is None for sd in sds):
        return Interval(float(low), float(high))
    variances = [sd * sd / n for sd, n in zip(sds, ns) if sd is not None]
    total = sum(variances)
    if total == 0:
        return Interval(float(max(low, mean)), float(min(high, mean)))
    df = total * total / sum(v * v / (n - 1) for v, n in zip(variances, ns))
    half = student_t_quantile(0.5 + confidence / 2, df) * math.sqrt(total) / len(means)
    return Interval(float(max(low, mean - half)), float(min(high, mean + half)))


# ---------------------------------------------------------------- internals


def _wilson(rate: float, n: float, z: float) -> Interval:
    z2 = z * z
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    if rate == 0:  # the lower bound is exactly 0 here; the formula leaves a rounding residue
        return Interval(0.0, min(1.0, centre + half))
    if rate == 1:
        return Interval(max(0.0, centre - half), 1.0)
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def _t_cdf(t: float, df: float) -> float:
    """P(T <= t) for t >= 0: 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t²)."""
    return 1 - 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz), using the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1 - front * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300

    def guard(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1 / guard(1 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 500):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d, c = 1 / guard(1 + even * d), guard(1 + even / c)
        h *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d, c = 1 / guard(1 + odd * d), guard(1 + odd / c)
        step = d * c
        h *= step
        if abs(step - 1) < 1e-15:
            break
    return h


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence = {confidence}: must be in (0, 1), e.g. 0.95")


def _check_groups(estimates: Sequence[float], ns: Sequence[int]) -> None:
    if not estimates or len(estimates) != len(ns):
        raise ValueError(f"{len(estimates)} estimates and {len(ns)} sample sizes: need one size per estimate, and "
                         "at least one")
    if any(n < 1 for n in ns):
        raise ValueError(f"sample sizes {list(ns)}: each must be >= 1")
