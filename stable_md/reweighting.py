"""Boltzmann reweighting of data frames to another temperature (appendix A.9 of the StABlE paper).

Frames sampled at T1 with potential energies U_i (eV) represent the canonical
ensemble at T2 when weighted by w_i ∝ exp(−U_i (1/(kB T2) − 1/(kB T1))). How many
frames effectively carry the reweighted average is N_eff = exp(−Σ w_i ln w_i) for
normalised weights: N_eff = F for uniform weights and 1 when one frame dominates.
Consecutive MD frames are correlated, so N_eff is an upper bound on independent samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stable_md.units import KB_EV_PER_K


@dataclass
class TemperatureWeights:
    """Normalised weights ``[F]`` (sum 1) of data frames for a new temperature, and their effective size."""

    weights: np.ndarray
    effective_samples: float
    from_temperature: float
    to_temperature: float

    def describe(self) -> dict:
        return {"from_temperature_K": self.from_temperature, "to_temperature_K": self.to_temperature,
                "frames": int(len(self.weights)), "effective_samples": float(self.effective_samples),
                "largest_weight": float(self.weights.max())}


def temperature_weights(energies_eV: np.ndarray, from_temperature: float, to_temperature: float
                        ) -> TemperatureWeights:
    """Weights that turn frames sampled at ``from_temperature`` (K) into an average at ``to_temperature`` (K).

    ``energies_eV`` are the frames' potential energies (eV). The largest log-weight is
    subtracted before exponentiating, so absolute energies of thousands of eV are safe.
    """
    energies = np.asarray(energies_eV, dtype=np.float64).reshape(-1)
    if len(energies) == 0:
        raise ValueError("reweighting needs at least one frame")
    if not np.all(np.isfinite(energies)):
        raise ValueError("reweighting needs finite energies")
    for name, value in (("from_temperature", from_temperature), ("to_temperature", to_temperature)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0 K, got {value}")
    delta_beta = 1.0 / (KB_EV_PER_K * to_temperature) - 1.0 / (KB_EV_PER_K * from_temperature)
    log_weights = -delta_beta * (energies - energies.mean())
    log_weights -= log_weights.max()
    weights = np.exp(log_weights)
    weights /= weights.sum()
    positive = weights[weights > 0]
    effective = float(np.exp(-(positive * np.log(positive)).sum()))
    return TemperatureWeights(weights, effective, float(from_temperature), float(to_temperature))
