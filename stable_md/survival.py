"""Survival statistics of stable times: right-censored at the time a run was evaluated.

A replica that is still stable when the evaluation ends has a stable time of *at
least* the cap, not equal to it, so means and medians of raw times are biased and
count differences say nothing about significance. This module gives:

- :func:`kaplan_meier`: the Kaplan-Meier estimate S(t) of the fraction still stable,
  with Greenwood's variance and a log-log 95 % band (the band scipy's
  ``stats.ecdf(...).sf.confidence_interval(method="log-log")`` gives);
- the median stable time with the Brookmeyer-Crowley interval (the times where the
  band crosses one half; unbounded above when it never does within the cap);
- the restricted mean stable time up to the cap (area under S), with a bootstrap
  interval;
- :func:`compare`: the ratio of medians and of restricted means against a baseline
  with bootstrap intervals, and the log-rank test (``scipy.stats.logrank``).

Why scipy rather than lifelines: scipy is already a dependency, its ``logrank`` and
``ecdf`` handle right censoring, and lifelines would add pandas, autograd and
formulaic to every install for the same numbers. Times are in ps throughout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000
_Z = 1.959963984540054  # the two-sided 95 % normal quantile


@dataclass
class KaplanMeier:
    """S(t) on the distinct event times; ``lower``/``upper`` the pointwise 95 % band."""

    time: np.ndarray
    survival: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray

    def at(self, t: float | np.ndarray) -> np.ndarray:
        """S at time(s) ``t`` (a right-continuous step function, 1 before the first event)."""
        return _step(self.time, self.survival, t)


def kaplan_meier(times: np.ndarray, events: np.ndarray) -> KaplanMeier:
    """Kaplan-Meier estimate of P(stable time > t).

    Parameters
    ----------
    times: stable time of each replica (ps).
    events: True where the replica became unstable at that time, False where it was
        still stable when the evaluation stopped (censored).
    """
    distinct, at_risk, deaths = _km_steps(*_check(times, events))
    survival = np.cumprod(1.0 - deaths / at_risk)
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = np.cumsum(deaths / (at_risk * (at_risk - deaths)))
        # the log-log transform keeps the band inside [0, 1]
        log_survival = np.log(survival)
        spread = _Z * np.sqrt(greenwood) / np.abs(log_survival)
        lower = np.exp(log_survival * np.exp(spread))
        upper = np.exp(log_survival * np.exp(-spread))
    # once every replica has failed, S = 0 exactly and so is its band
    lower = np.where(survival > 0, lower, 0.0)
    upper = np.where(survival > 0, upper, 0.0)
    return KaplanMeier(time=distinct, survival=survival, lower=lower, upper=upper, at_risk=at_risk, events=deaths)


def median_time(curve: KaplanMeier, cap: float) -> tuple[float, float, float]:
    """Median stable time and its 95 % interval (Brookmeyer-Crowley, from the KM band).

    A bound that the data cannot give (the curve or its band never falls to one
    half before ``cap``) is ``inf``; the median itself is then "≥ cap".
    """
    return (_first_below(curve.time, curve.survival, 0.5),
            _first_below(curve.time, curve.lower, 0.5),
            _first_below(curve.time, curve.upper, 0.5))


def restricted_mean(times: np.ndarray, events: np.ndarray, cap: float) -> float:
    """Area under the KM curve from 0 to ``cap`` (ps): the mean stable time if no run could exceed the cap."""
    curve = kaplan_meier(times, events)
    return _area(curve.time, curve.survival, cap)


@dataclass
class SurvivalSummary:
    """Everything a report shows about one model's stable times."""

    n: int
    n_unstable: int
    cap_ps: float
    median_ps: float
    median_ci_ps: tuple[float, float]
    median_censored: bool
    rmst_ps: float
    rmst_ci_ps: tuple[float, float]
    curve: KaplanMeier

    def to_json(self) -> dict:
        return {"n": self.n, "n_unstable": self.n_unstable, "cap_ps": self.cap_ps,
                "median_ps": _finite_or_none(self.median_ps), "median_ci_ps": [_finite_or_none(v) for v in
                                                                             self.median_ci_ps],
                "median_censored": self.median_censored,
                "median_note": ("the median is at least the cap: fewer than half of the replicas became unstable"
                                if self.median_censored else None),
                "rmst_ps": self.rmst_ps, "rmst_ci_ps": list(self.rmst_ci_ps),
                "kaplan_meier": {"time_ps": self.curve.time.tolist(), "survival": self.curve.survival.tolist(),
                                 "lower": self.curve.lower.tolist(), "upper": self.curve.upper.tolist(),
                                 "at_risk": self.curve.at_risk.tolist(), "events": self.curve.events.tolist()}}


def summarize(times: np.ndarray, events: np.ndarray, cap: float, seed: int = 0,
              samples: int = BOOTSTRAP_SAMPLES) -> SurvivalSummary:
    """KM curve, median with interval and restricted mean with a bootstrap interval, up to ``cap`` ps."""
    times, events = _check(times, events)
    curve = kaplan_meier(times, events)
    median, low, high = median_time(curve, cap)
    rmst = _area(curve.time, curve.survival, cap)
    boot = _bootstrap_statistics(times, events, cap, np.random.default_rng(seed), samples)
    rmst_ci = tuple(float(v) for v in np.quantile(boot["rmst"], [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2]))
    return SurvivalSummary(n=len(times), n_unstable=int(events.sum()), cap_ps=float(cap), median_ps=median,
                           median_ci_ps=(low, high), median_censored=not np.isfinite(median), rmst_ps=rmst,
                           rmst_ci_ps=rmst_ci, curve=curve)


def logrank_p(baseline: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> float:
    """Two-sided log-rank p-value that two samples (times, events) share one survival function."""
    from scipy import stats

    (times_a, events_a), (times_b, events_b) = _check(*baseline), _check(*other)
    if not (events_a.any() or events_b.any()):
        return 1.0  # nothing failed in either: no evidence of a difference
    with np.errstate(invalid="ignore", divide="ignore"):
        p_value = float(stats.logrank(stats.CensoredData.right_censored(times_a, ~events_a),
                                      stats.CensoredData.right_censored(times_b, ~events_b)).pvalue)
    # zero variance (e.g. every replica of both failing at the same check): the samples cannot be told apart
    return p_value if np.isfinite(p_value) else 1.0


def compare(baseline: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray], cap: float,
            seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """``other`` against ``baseline``: ratios of medians and restricted means with bootstrap 95 % intervals,
    and the log-rank p-value.

    A median that is censored in a resample counts as the cap, so a ratio whose
    numerator is censored is a lower bound (``median_ratio_censored``); when the
    baseline's median is censored the ratio is ``None`` (only the restricted means
    compare then).
    """
    rng = np.random.default_rng(seed)
    base = _bootstrap_statistics(*_check(*baseline), cap, rng, samples)
    new = _bootstrap_statistics(*_check(*other), cap, rng, samples)
    base_curve, new_curve = kaplan_meier(*baseline), kaplan_meier(*other)
    base_median, new_median = median_time(base_curve, cap)[0], median_time(new_curve, cap)[0]
    if not np.isfinite(base_median):
        # both medians may lie beyond the cap: their ratio is unknown, the restricted means still compare
        median_ratio = None
    else:
        median_ratio = min(new_median, cap) / base_median
    with np.errstate(divide="ignore", invalid="ignore"):
        median_ratios = np.minimum(new["median"], cap) / np.minimum(base["median"], cap)
        rmst_ratios = new["rmst"] / base["rmst"]
    quantiles = [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2]
    return {
        "median_ratio": median_ratio,
        "median_ratio_ci": (None if median_ratio is None else
                            [float(v) for v in np.nanquantile(median_ratios, quantiles)]),
        "median_ratio_censored": bool(not np.isfinite(new_median)),
        "rmst_ratio": _area(new_curve.time, new_curve.survival, cap) / _area(base_curve.time, base_curve.survival,
                                                                             cap),
        "rmst_ratio_ci": [float(v) for v in np.nanquantile(rmst_ratios, quantiles)],
        "logrank_p": logrank_p(baseline, other),
    }


# -- helpers ------------------------------------------------------------------------------------------------------

def _check(times, events) -> tuple[np.ndarray, np.ndarray]:
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    events = np.asarray(events, dtype=bool).reshape(-1)
    if times.shape != events.shape:
        raise ValueError(f"{len(times)} stable times but {len(events)} event flags")
    if len(times) == 0:
        raise ValueError("survival statistics need at least one replica")
    if not np.isfinite(times).all() or (times < 0).any():
        raise ValueError("stable times must be finite and >= 0")
    return times, events


def _step(time: np.ndarray, values: np.ndarray, t) -> np.ndarray:
    position = np.searchsorted(time, np.asarray(t, dtype=np.float64), side="right")
    return np.concatenate([[1.0], values])[position]


def _first_below(time: np.ndarray, values: np.ndarray, level: float) -> float:
    below = np.flatnonzero(values <= level + 1e-12)
    return float(time[below[0]]) if len(below) else float("inf")


def _area(time: np.ndarray, survival: np.ndarray, cap: float) -> float:
    edges = np.concatenate([[0.0], time[time < cap], [cap]])
    heights = np.concatenate([[1.0], survival[time < cap]])
    return float(np.sum(np.diff(edges) * heights))


def _bootstrap_statistics(times: np.ndarray, events: np.ndarray, cap: float, rng: np.random.Generator,
                          samples: int) -> dict[str, np.ndarray]:
    """Median and restricted mean of ``samples`` resamples (with replacement) of the replicas."""
    n = len(times)
    picks = rng.integers(0, n, size=(samples, n))
    medians = np.empty(samples)
    areas = np.empty(samples)
    for k in range(samples):
        time, at_risk, deaths = _km_steps(times[picks[k]], events[picks[k]])
        survival = np.cumprod(1.0 - deaths / at_risk)
        medians[k] = _first_below(time, survival, 0.5)
        areas[k] = _area(time, survival, cap)
    return {"median": medians, "rmst": areas}


def _km_steps(times: np.ndarray, events: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct event times with the replicas at risk and the events at each (sorted, O(n log n))."""
    order = np.argsort(times, kind="stable")
    times, events = times[order], events[order]
    distinct, first = np.unique(times, return_index=True)
    deaths = np.add.reduceat(events.astype(np.int64), first)
    at_risk = len(times) - first
    keep = deaths > 0
    return distinct[keep], at_risk[keep], deaths[keep]


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if np.isfinite(value) else None
