"""ssp.engine.intervals against known values: Student t quantiles from the tables, Wilson intervals from the closed
form and published examples, t intervals worked by hand, and the averages over datasets."""

from __future__ import annotations

import math

import pytest

from ssp.engine.intervals import (
    Interval,
    mean_interval,
    mean_of_means_interval,
    mean_of_rates_interval,
    normal_quantile,
    student_t_quantile,
    wilson_interval,
)

Z = 1.959963984540054


@pytest.mark.parametrize(("p", "df", "expected"), [
    (0.975, 1, 12.706205),  # the Cauchy distribution: tan(pi * (p - 1/2))
    (0.975, 2, 4.302653),
    (0.975, 4, 2.776445),
    (0.975, 5, 2.570582),
    (0.975, 10, 2.228139),
    (0.975, 15, 2.131450),
    (0.975, 30, 2.042272),
    (0.995, 10, 3.169273),
    (0.95, 20, 1.724718),
    (0.975, 27.5, 2.050086),  # fractional degrees of freedom, as Welch's are (checked by integrating the density)
])
def test_student_t_quantiles_match_the_tables(p: float, df: float, expected: float) -> None:
    assert student_t_quantile(p, df) == pytest.approx(expected, abs=1e-5)
    assert student_t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-5)


def test_t_tends_to_the_normal_quantile() -> None:
    assert normal_quantile() == pytest.approx(Z)
    assert student_t_quantile(0.975, 1e6) == pytest.approx(Z, abs=1e-5)
    assert student_t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    (0, 10, 0.0, Z * Z / (10 + Z * Z)),  # no success: the upper bound is z²/(n + z²), the lower exactly 0
    (10, 10, 10 / (10 + Z * Z), 1.0),
    (5, 10, 0.236593, 0.763407),
    (1, 20, 0.008881, 0.236131),
    (81, 263, 0.255289, 0.366210),
])
def test_wilson_interval_known_values(successes: int, n: int, low: float, high: float) -> None:
    ci = wilson_interval(successes, n)
    assert (ci.low, ci.high) == (pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6))


def test_wilson_narrows_with_n_and_widens_with_confidence() -> None:
    small, large = wilson_interval(5, 10), wilson_interval(50, 100)
    assert large.high - large.low < small.high - small.low
    assert wilson_interval(5, 10, confidence=0.99).high > small.high


def test_t_interval_worked_by_hand() -> None:
    # mean 3, sd sqrt(2.5), se sqrt(2.5 / 5) = 0.70711; t(0.975, 4) = 2.776445 → half-width 1.963243
    ci = mean_interval([1, 2, 3, 4, 5], low=0.0, high=10.0)
    assert (ci.low, ci.high) == (pytest.approx(1.036757, abs=1e-6), pytest.approx(4.963243, abs=1e-6))


def test_t_interval_is_clipped_to_the_range_and_degenerate_cases() -> None:
    assert mean_interval([0.0, 1.0, 0.0, 1.0, 1.0], low=0.0, high=1.0) == Interval(0.0, 1.0)
    assert mean_interval([0.4], low=0.0, high=1.0) == Interval(0.0, 1.0)  # one value: spread unknown
    assert mean_interval([0.0, 0.0, 0.0], low=0.0, high=1.0) == Interval(0.0, 0.0)  # no spread: the point


def test_average_over_one_dataset_is_that_datasets_interval() -> None:
    assert mean_of_rates_interval([0.3], [20]) == wilson_interval(6, 20)
    values = [0.0, 0.5, 1.0, 0.25]
    alone = mean_interval(values, low=0.0, high=1.0)
    sd = math.sqrt(sum((v - 0.4375) ** 2 for v in values) / 3)
    assert mean_of_means_interval([0.4375], [sd], [4], low=0.0, high=1.0) == alone


def test_average_over_datasets_known_values() -> None:
    # Two 0/10 datasets: Wilson at the effective size 2² / (1/10 + 1/10) = 20.
    assert mean_of_rates_interval([0.0, 0.0], [10, 10]) == Interval(0.0, pytest.approx(Z * Z / (20 + Z * Z)))
    # Means 0.2 (sd 0.1, n 10) and 0.4 (sd 0.2, n 20): variances of the means 0.001 and 0.002, se sqrt(0.003) / 2,
    # Welch df 0.003² / (0.001²/9 + 0.002²/19) = 27.9818, t(0.975, 27.9818) = 2.048467.
    ci = mean_of_means_interval([0.2, 0.4], [0.1, 0.2], [10, 20], low=0.0, high=1.0)
    half = 2.048467 * math.sqrt(0.003) / 2
    assert (ci.low, ci.high) == (pytest.approx(0.3 - half, abs=1e-6), pytest.approx(0.3 + half, abs=1e-6))
    assert mean_of_means_interval([0.2, 0.4], [0.1, None], [10, 1], low=0.0, high=1.0) == Interval(0.0, 1.0)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: wilson_interval(0, 0), "at least one trial"),
    (lambda: wilson_interval(3, 2), "successes = 3"),
    (lambda: wilson_interval(1, 2, confidence=1.0), "confidence = 1.0"),
    (lambda: mean_interval([], low=0, high=1), "no values"),
    (lambda: mean_of_rates_interval([0.5], [10, 20]), "one size per estimate"),
    (lambda: mean_of_rates_interval([1.5], [10]), "must be in \\[0, 1\\]"),
    (lambda: mean_of_means_interval([0.5], [0.1, 0.2], [10], low=0, high=1), "one per group"),
    (lambda: student_t_quantile(0.975, 0), "df = 0"),
])
def test_bad_inputs_name_the_value(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()
