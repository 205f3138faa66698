"""Survival statistics of censored stable times, checked against scipy's independent implementation and
against cases with known answers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from stable_md.survival import compare, kaplan_meier, logrank_p, restricted_mean, summarize


def censored_exponential(mean: float, n: int, cap: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Exponential stable times seen on a grid of 0.05 ps (ties, as checks make them), censored at ``cap``."""
    times = np.ceil(np.random.default_rng(seed).exponential(mean, n) / 0.05) * 0.05
    return np.minimum(times, cap), times < cap


def test_kaplan_meier_and_its_band_match_scipy():
    times, events = censored_exponential(5.0, 80, 8.0, seed=1)
    curve = kaplan_meier(times, events)
    reference = stats.ecdf(stats.CensoredData.right_censored(times, ~events))
    band = reference.sf.confidence_interval(0.95, method="log-log")
    np.testing.assert_allclose(curve.survival, reference.sf.evaluate(curve.time), atol=1e-12)
    finite = np.isfinite(band.low.evaluate(curve.time))
    np.testing.assert_allclose(curve.lower[finite], band.low.evaluate(curve.time)[finite], atol=1e-12)
    np.testing.assert_allclose(curve.upper[finite], band.high.evaluate(curve.time)[finite], atol=1e-12)
    assert curve.at(0.0) == 1.0 and curve.at(curve.time[0]) == curve.survival[0]


def test_without_censoring_the_estimates_are_the_plain_ones():
    times = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 8.0])
    events = np.ones(6, dtype=bool)
    curve = kaplan_meier(times, events)
    np.testing.assert_allclose(curve.survival, [5 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    summary = summarize(times, events, cap=10.0)
    assert summary.median_ps == 2.0  # the first time S(t) <= 1/2
    # the area under S up to a cap beyond every time is the plain mean
    assert summary.rmst_ps == pytest.approx(times.mean())
    assert summary.curve.lower[-1] == summary.curve.upper[-1] == 0.0


def test_restricted_mean_of_times_censored_at_the_cap_is_the_mean_of_the_capped_times():
    times, events = censored_exponential(4.0, 200, 5.0, seed=2)
    assert 0 < (~events).sum() < 200
    assert restricted_mean(times, events, 5.0) == pytest.approx(times.mean())


def test_a_median_beyond_the_cap_is_reported_as_censored():
    times, events = censored_exponential(40.0, 60, 5.0, seed=3)
    summary = summarize(times, events, cap=5.0)
    assert summary.median_censored and summary.median_ps == np.inf
    as_json = summary.to_json()
    assert as_json["median_ps"] is None and as_json["median_ci_ps"][1] is None
    assert "at least the cap" in as_json["median_note"]


def test_median_interval_covers_the_true_median_in_most_samples():
    """Brookmeyer-Crowley intervals of exponential samples (median ln2 · 5 ps): about 95 % coverage."""
    true_median = np.log(2) * 5.0
    covered = []
    for seed in range(200):
        times, events = censored_exponential(5.0, 60, 12.0, seed=seed)
        summary = summarize(times, events, cap=12.0, samples=10)
        low, high = summary.median_ci_ps
        covered.append(low <= true_median <= high)
    assert 0.88 <= np.mean(covered) <= 0.995


def test_compare_finds_a_real_difference_and_not_a_fake_one():
    cap = 10.0
    weak = censored_exponential(2.0, 64, cap, seed=4)
    strong = censored_exponential(6.0, 64, cap, seed=5)
    same = censored_exponential(2.0, 64, cap, seed=6)
    result = compare(weak, strong, cap, seed=0)
    assert result["logrank_p"] < 1e-4
    low, high = result["median_ratio_ci"]
    assert low <= result["median_ratio"] <= high and low > 1.5
    assert result["rmst_ratio_ci"][0] > 1.3
    null = compare(weak, same, cap, seed=0)
    assert null["logrank_p"] > 0.05
    assert null["median_ratio_ci"][0] < 1 < null["median_ratio_ci"][1]
    # the log-rank p-value is scipy's
    reference = stats.logrank(stats.CensoredData.right_censored(weak[0], ~weak[1]),
                              stats.CensoredData.right_censored(strong[0], ~strong[1]))
    assert result["logrank_p"] == pytest.approx(reference.pvalue, rel=1e-12)
    # reproducible by seed
    assert compare(weak, strong, cap, seed=0) == result


def test_no_failures_anywhere_is_no_evidence():
    cap = 2.0
    censored = (np.full(8, cap), np.zeros(8, dtype=bool))
    assert logrank_p(censored, censored) == 1.0
    summary = summarize(*censored, cap=cap)
    assert summary.median_censored and summary.rmst_ps == cap and summary.rmst_ci_ps == (cap, cap)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="3 stable times but 2 event flags"):
        kaplan_meier([1.0, 2.0, 3.0], [True, False])
    with pytest.raises(ValueError, match="finite and >= 0"):
        kaplan_meier([1.0, -2.0], [True, True])


def test_ratio_of_two_medians_beyond_the_cap_is_unknown_but_restricted_means_compare():
    cap = 2.0
    weak = censored_exponential(8.0, 96, cap, seed=7)
    strong = censored_exponential(40.0, 96, cap, seed=8)
    result = compare(weak, strong, cap)
    assert result["median_ratio"] is None and result["median_ratio_ci"] is None
    assert result["rmst_ratio"] > 1 and result["rmst_ratio_ci"][0] <= result["rmst_ratio"]


def test_samples_that_cannot_be_told_apart_give_p_one_not_nan():
    everything_fails_at_once = (np.full(6, 0.05), np.ones(6, dtype=bool))
    assert logrank_p(everything_fails_at_once, everything_fails_at_once) == 1.0
