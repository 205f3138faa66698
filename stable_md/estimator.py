"""The Boltzmann estimator of observable-loss gradients, global and localized (section 2.1, appendix A.1-A.2).

For samples Γ_1..Γ_N from the Boltzmann distribution of U_θ at temperature T and the
loss L = ||ĝ − g_ref||², ĝ = mean_i g(Γ_i), the paper's estimator (eq. 6) is

    ∇θ L ≈ −2/(kT (N−1)) Σ_i [(ĝ − g_ref)·(g_i − ĝ)] ∇θ U(Γ_i) = ∇θ Σ_i w_i U(Γ_i)

with the weights w_i = −2 (ĝ − g_ref)·(g_i − ĝ) / (kT (N−1)) held constant. So the
gradient is ONE batched backward of a weighted energy sum: memory O(parameters)
rather than the O(samples × parameters) of materialised per-sample gradients.
Several observables, each with a weight, add their w_i before that one backward
(the ∇θU term is shared). Minibatches only split the backward for memory; the
weights come from all samples, so the result equals the full-batch gradient.

The localized estimator replaces U by the sum of atomic energies over a
neighbourhood and g by the observable of that neighbourhood; a neighbourhood
weight w_{f,m} becomes per-atom weights Σ_m w_{f,m} [n ∈ m], again one backward.

kT is in eV (energies of the models are eV), so a learning rate has the same
meaning whatever the temperature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from stable_md.observables import Observable
from stable_md.potentials.base import model_dtype_device, plain_execution
from stable_md.units import kT_eV

DEFAULT_BATCH_SIZE = 256


@dataclass
class ObservableTerm:
    """One observable of the loss: ``weight * ||mean g − reference||²``."""

    observable: Observable
    reference: Tensor
    weight: float = 1.0

    def __post_init__(self) -> None:
        self.reference = torch.as_tensor(self.reference, dtype=torch.float64).reshape(-1)
        if not self.weight >= 0:
            raise ValueError(f"observable weight must be >= 0, got {self.weight}")


@dataclass
class EstimatorResult:
    """What one estimator pass measured (gradients are left in the parameters' ``.grad``)."""

    loss: float
    losses: dict[str, float]
    means: dict[str, np.ndarray]
    n_samples: int
    weights: np.ndarray = field(repr=False)


def boltzmann_weights(values: Tensor, reference: Tensor, temperature: float,
                      reduce: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, float, Tensor]:
    """Per-sample weights ``[N]`` (1/eV), the loss ||ĝ − g_ref||² and ĝ, for values ``[N, K]``.

    ∇θ L = ∇θ Σ_i w_i U_i with U in eV and ``temperature`` in K. With samples spread over
    several processes, ``reduce`` sums a tensor over them: N and ĝ are then those of all
    samples, and the weights returned are this process's part.
    """
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.dim() != 2:
        raise ValueError(f"observable values must be [samples, K], got shape {tuple(values.shape)}")
    reference = torch.as_tensor(reference, dtype=torch.float64).reshape(-1)
    if reference.shape[0] != values.shape[1]:
        raise ValueError(f"reference has {reference.shape[0]} entries, the observable {values.shape[1]}")
    if reduce is None:
        n = values.shape[0]
    else:
        shared = reduce(torch.cat([torch.tensor([float(values.shape[0])], dtype=torch.float64), values.sum(dim=0)]))
        n = int(round(float(shared[0])))
    if n < 2:
        raise ValueError("the Boltzmann estimator needs at least two samples")
    mean = values.mean(dim=0) if reduce is None else shared[1:] / n
    difference = mean - reference
    weights = -2.0 * ((values - mean) @ difference) / (kT_eV(temperature) * (n - 1))
    return weights, float(difference.pow(2).sum()), mean


def weighted_energy_backward(model: nn.Module, positions: Tensor, numbers: Tensor, cells: Optional[Tensor],
                             weights: Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
    """Accumulate ∇θ Σ_i w_i U(positions_i) into ``.grad`` with one backward per minibatch.

    ``weights`` is ``[F]`` (per frame, total energy) or ``[F, N]`` (per atom, atomic energies).
    """
    dtype, device = model_dtype_device(model)
    weights = torch.as_tensor(weights, dtype=dtype).detach().to(device)
    numbers = numbers.to(device)
    for begin in range(0, positions.shape[0], batch_size):
        stop = begin + batch_size
        w = weights[begin:stop]
        if not bool(w.any()):
            continue
        batch = positions[begin:stop].to(device, dtype)
        cell = None if cells is None else cells[begin:stop].to(device, dtype)
        # Plain execution: the optimising graph executor is slower here and, once it has specialised
        # a graph, changes the rounding of later force calls (which would break exact resumes).
        with plain_execution():
            energy, atomic = model(batch, numbers, cell)
        objective = (w * energy).sum() if w.dim() == 1 else (w * atomic).sum()
        objective.backward()


def _frames(positions, cells) -> tuple[Tensor, Optional[Tensor]]:
    positions = torch.as_tensor(positions, dtype=torch.float64)
    if positions.dim() != 3 or positions.shape[-1] != 3:
        raise ValueError(f"samples must be positions [F, N, 3] (Å), got shape {tuple(positions.shape)}")
    if cells is not None:
        cells = torch.as_tensor(cells, dtype=torch.float64)
        if cells.dim() == 2:
            cells = cells.expand(positions.shape[0], 3, 3)
    return positions, cells


def boltzmann_gradient(model: nn.Module, positions, numbers, terms: Sequence[ObservableTerm], temperature: float,
                       cells=None, batch_size: int = DEFAULT_BATCH_SIZE,
                       reduce: Optional[Callable[[Tensor], Tensor]] = None) -> EstimatorResult:
    """Accumulate the Boltzmann-estimator gradient of Σ_t weight_t ||ĝ_t − g_ref,t||² into ``model``'s ``.grad``.

    Parameters
    ----------
    positions:
        Samples ``[F, N, 3]`` (Å) from simulations of ``model`` at ``temperature`` K.
    numbers:
        Atomic numbers ``[N]``.
    terms:
        Observables with their references and weights.
    cells:
        ``[3, 3]`` or ``[F, 3, 3]`` Å for periodic systems.
    batch_size:
        Frames per forward/backward (memory only; the result does not depend on it).
    reduce:
        Sums a tensor over the processes that hold the other samples (:mod:`stable_md.distributed`):
        the weights then use the mean over all samples, and the gradient left in ``.grad`` is this
        process's part, to be summed over the processes. ``None``: these are all the samples.
    """
    if not terms:
        raise ValueError("at least one observable is needed")
    positions, cells = _frames(positions, cells)
    numbers = torch.as_tensor(np.asarray(numbers), dtype=torch.long)
    total = torch.zeros(positions.shape[0], dtype=torch.float64)
    losses, means, loss = {}, {}, 0.0
    with torch.no_grad():
        for term in terms:
            if positions.shape[0]:
                values = term.observable(positions, cells)
            else:  # a process whose replicas gave no samples this time still takes part in the sums
                values = torch.zeros((0, term.reference.shape[0]), dtype=torch.float64)
            weights, term_loss, mean = boltzmann_weights(values, term.reference, temperature, reduce)
            total += term.weight * weights
            losses[term.observable.name] = term_loss
            means[term.observable.name] = mean.numpy()
            loss += term.weight * term_loss
    weighted_energy_backward(model, positions, numbers, cells, total, batch_size)
    return EstimatorResult(loss=loss, losses=losses, means=means, n_samples=positions.shape[0],
                           weights=total.numpy())


def localized_boltzmann_gradient(model: nn.Module, positions, numbers, local_values, membership, reference,
                                 temperature: float, cells=None, selection=None,
                                 batch_size: int = DEFAULT_BATCH_SIZE, weight: float = 1.0,
                                 reduce: Optional[Callable[[Tensor], Tensor]] = None) -> EstimatorResult:
    """The localized estimator (eq. 8): neighbourhood energies Σ_{n∈m} ε_n and local observables.

    Accumulates ∇θ of ``weight`` ||ĝ − g_ref||² into ``.grad``, ĝ the mean over the chosen local samples.

    Parameters
    ----------
    local_values:
        ``[F, M, K]``: the observable of each of M neighbourhoods in each frame.
    membership:
        ``[M, N]`` bool: which atoms form each neighbourhood (the same in every frame).
    reference:
        ``[K]`` reference value of the local observable.
    selection:
        Optional ``[F, M]`` bool: the local samples to use (e.g. from :func:`balanced_selection`);
        default all F × M.
    reduce:
        Sums a tensor over the processes that hold the other samples, as in :func:`boltzmann_gradient`.
    """
    positions, cells = _frames(positions, cells)
    numbers = torch.as_tensor(np.asarray(numbers), dtype=torch.long)
    values = torch.as_tensor(local_values, dtype=torch.float64)
    member = torch.as_tensor(np.asarray(membership), dtype=torch.float64)
    n_frames, n_atoms = positions.shape[:2]
    if values.dim() != 3 or values.shape[0] != n_frames:
        raise ValueError(f"local values must be [F={n_frames}, M, K], got shape {tuple(values.shape)}")
    if member.shape != (values.shape[1], n_atoms):
        raise ValueError(f"membership must be [M={values.shape[1]}, N={n_atoms}], got {tuple(member.shape)}")
    chosen = (torch.ones(values.shape[:2], dtype=torch.bool) if selection is None
              else torch.as_tensor(np.asarray(selection), dtype=torch.bool))
    if chosen.shape != values.shape[:2]:
        raise ValueError(f"selection must be [F, M] = {tuple(values.shape[:2])}, got {tuple(chosen.shape)}")
    weights, loss, mean = boltzmann_weights(values[chosen], reference, temperature, reduce)
    local_weights = torch.zeros(values.shape[:2], dtype=torch.float64)
    local_weights[chosen] = weight * weights
    atom_weights = local_weights @ member  # [F, N]
    weighted_energy_backward(model, positions, numbers, cells, atom_weights, batch_size)
    return EstimatorResult(loss=weight * loss, losses={"local": loss}, means={"local": mean.numpy()},
                           n_samples=int(chosen.sum()), weights=local_weights.numpy())


def balanced_selection(deviation, n_bins: int = 100, per_bin: int = 5,
                       rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """``[F, M]`` bool choosing up to ``per_bin`` local samples from each of ``n_bins`` equal-width bins of
    ``deviation [F, M]`` (the paper's water scheme: 100 bins of O-H bond-length deviation, 5 per bin), so
    that the rare, strongly deviating neighbourhoods are not drowned by the many ordinary ones.
    """
    deviation = np.asarray(deviation, dtype=np.float64)
    rng = np.random.default_rng(0) if rng is None else rng
    if n_bins < 1 or per_bin < 1:
        raise ValueError(f"balanced selection needs at least one bin and one sample per bin, got n_bins={n_bins}, "
                         f"per_bin={per_bin}")
    flat = deviation.reshape(-1)
    if flat.size == 0:
        return np.zeros(deviation.shape, dtype=bool)
    edges = np.linspace(flat.min(), flat.max(), n_bins + 1)
    bins = np.clip(np.searchsorted(edges, flat, side="right") - 1, 0, n_bins - 1)
    chosen = np.zeros(flat.shape, dtype=bool)
    for b in np.unique(bins):
        members = np.flatnonzero(bins == b)
        chosen[rng.choice(members, size=min(per_bin, len(members)), replace=False)] = True
    return chosen.reshape(deviation.shape)
