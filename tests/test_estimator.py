"""The Boltzmann estimator against the paper's explicit covariance form and an analytic case."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import FAST_SCHNET
from stable_md.estimator import (ObservableTerm, balanced_selection, boltzmann_gradient, boltzmann_weights,
                                 localized_boltzmann_gradient)
from stable_md.observables import BondLengths, DistanceDistribution
from stable_md.potentials import build_potential
from stable_md.stability import detect_bonds
from stable_md.units import kT_eV


def schnet(ethanol):
    torch.manual_seed(0)
    model, _ = build_potential("schnet", ethanol.species, **FAST_SCHNET)
    return model.double()


def gradient_vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def per_sample_energy_gradients(model, positions, numbers, atoms=None) -> torch.Tensor:
    """[F, P] ∇θ U(Γ_i), one backward per sample (the memory-hungry form the library avoids)."""
    rows = []
    for frame in torch.as_tensor(positions):
        energy, atomic = model(frame[None], numbers, None)
        target = energy.sum() if atoms is None else atomic[0, atoms].sum()
        grads = torch.autograd.grad(target, list(model.parameters()), allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for g, p in zip(grads, model.parameters())]))
    return torch.stack(rows)


def paper_estimator(g: torch.Tensor, grad_u: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 6: N/(kT(N-1)) [Ê[g] Ê[∇U]^T − Ê[g ∇U^T]], a [K, P] Jacobian estimate."""
    n = g.shape[0]
    outer_mean = torch.einsum("nk,np->kp", g, grad_u) / n
    return n / (kT_eV(temperature) * (n - 1)) * (torch.outer(g.mean(0), grad_u.mean(0)) - outer_mean)


def test_one_weighted_backward_equals_the_per_sample_covariance_estimator(ethanol):
    model = schnet(ethanol)
    frames = torch.as_tensor(ethanol.positions[::37][:14])
    numbers = torch.as_tensor(ethanol.numbers)
    hr = DistanceDistribution(ethanol.n_atoms, r_max=6.0, n_bins=120)
    bond_types = BondLengths(detect_bonds(ethanol.numbers, ethanol.positions), per_type=True)
    terms = [ObservableTerm(hr, hr.reference(ethanol) * 1.1, weight=1.0),
             ObservableTerm(bond_types, bond_types.reference(ethanol) + 0.02, weight=3.0)]
    temperature = 500.0

    model.zero_grad()
    result = boltzmann_gradient(model, frames, numbers, terms, temperature, batch_size=5)
    ours = gradient_vector(model).clone()

    grad_u = per_sample_energy_gradients(model, frames, numbers)
    expected = torch.zeros_like(ours)
    for term in terms:
        g = term.observable(frames)
        jacobian = paper_estimator(g, grad_u, temperature)
        expected += term.weight * 2 * (g.mean(0) - term.reference) @ jacobian
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    assert result.n_samples == 14
    assert result.loss == pytest.approx(sum(t.weight * float(((t.observable(frames).mean(0) - t.reference) ** 2).sum())
                                            for t in terms))

    # minibatching changes memory, not the answer
    model.zero_grad()
    boltzmann_gradient(model, frames, numbers, terms, temperature, batch_size=100)
    torch.testing.assert_close(gradient_vector(model), ours, rtol=1e-10, atol=1e-13)


class Harmonic(nn.Module):
    """U = ½ k |x|² for one particle (the Potential interface): spring constant k in eV/Å²."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(float(k), dtype=torch.float64))

    def forward(self, positions, numbers, cell=None):
        atomic = 0.5 * self.k * positions.pow(2).sum(-1)
        return atomic.sum(-1), atomic


def test_harmonic_oscillator_gradient_converges_to_the_analytic_value():
    """Exact Boltzmann samples of U = ½kx²: <x²> = kT/k per dimension, d<x²>/dk = −kT/k²."""
    k, temperature = 4.0, 300.0
    kt = kT_eV(temperature)
    rng = np.random.default_rng(0)
    samples = rng.normal(0.0, np.sqrt(kt / k), size=(400_000, 1, 3))
    observable = lambda positions, cell=None: torch.as_tensor(positions)[:, 0, :1] ** 2  # x²
    observable.name = "x2"
    reference = torch.tensor([kt / k * 0.5])
    model = Harmonic(k)
    result = boltzmann_gradient(model, samples, [1], [ObservableTerm(observable, reference)], temperature,
                                batch_size=100_000)
    mean = float(result.means["x2"][0])
    analytic = 2 * (mean - float(reference[0])) * (-kt / k ** 2)
    assert float(model.k.grad) == pytest.approx(analytic, rel=0.02)
    assert mean == pytest.approx(kt / k, rel=0.01)


def test_weights_need_two_samples_and_matching_reference():
    with pytest.raises(ValueError, match="two samples"):
        boltzmann_weights(torch.zeros(1, 3), torch.zeros(3), 300.0)
    with pytest.raises(ValueError, match="reference has 2 entries"):
        boltzmann_weights(torch.zeros(4, 3), torch.zeros(2), 300.0)


def test_localized_estimator_with_the_whole_system_is_the_global_one(ethanol):
    model = schnet(ethanol)
    frames = torch.as_tensor(ethanol.positions[::50][:9])
    numbers = torch.as_tensor(ethanol.numbers)
    hr = DistanceDistribution(ethanol.n_atoms, r_max=6.0, n_bins=60)
    reference = hr.reference(ethanol) * 0.9
    model.zero_grad()
    boltzmann_gradient(model, frames, numbers, [ObservableTerm(hr, reference)], 500.0)
    global_gradient = gradient_vector(model).clone()
    model.zero_grad()
    localized_boltzmann_gradient(model, frames, numbers, hr(frames)[:, None, :],
                                 np.ones((1, ethanol.n_atoms), dtype=bool), reference, 500.0)
    torch.testing.assert_close(gradient_vector(model), global_gradient, rtol=1e-9, atol=1e-12)


def test_localized_estimator_matches_per_neighbourhood_covariance(ethanol):
    model = schnet(ethanol)
    frames = torch.as_tensor(ethanol.positions[::60][:8])
    numbers = torch.as_tensor(ethanol.numbers)
    bonds = detect_bonds(ethanol.numbers, ethanol.positions)
    lengths = BondLengths(bonds)(frames)  # [F, B]
    # two neighbourhoods: the C-O-H end and the methyl end, each observed by one bond length
    ends = [np.array([1, 2, 8]), np.array([0, 3, 4, 5])]
    membership = np.zeros((2, ethanol.n_atoms), dtype=bool)
    for m, atoms in enumerate(ends):
        membership[m, atoms] = True
    local = torch.stack([lengths[:, 0], lengths[:, 1]], dim=1)[..., None]  # [F, 2, 1]
    reference = torch.tensor([1.45])
    selection = np.ones((8, 2), dtype=bool)
    selection[0, 1] = selection[3, 0] = False
    model.zero_grad()
    localized_boltzmann_gradient(model, frames, numbers, local, membership, reference, 500.0, selection=selection)
    ours = gradient_vector(model).clone()

    g_rows, grad_rows = [], []
    for m, atoms in enumerate(ends):
        grads = per_sample_energy_gradients(model, frames, numbers, atoms=torch.as_tensor(atoms))
        for f in range(8):
            if selection[f, m]:
                g_rows.append(local[f, m])
                grad_rows.append(grads[f])
    g, grad_u = torch.stack(g_rows), torch.stack(grad_rows)
    expected = 2 * (g.mean(0) - reference) @ paper_estimator(g, grad_u, 500.0)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


def test_balanced_selection_keeps_rare_deviations():
    rng = np.random.default_rng(0)
    deviation = np.abs(rng.normal(0, 0.01, (50, 64)))
    deviation[7, 3] = 0.8  # one stretched bond among 3200 ordinary ones
    chosen = balanced_selection(deviation, n_bins=10, per_bin=5, rng=rng)
    assert chosen[7, 3]
    assert chosen.sum() <= 50
    edges = np.linspace(deviation.min(), deviation.max(), 11)
    counts = np.histogram(deviation[chosen], bins=edges)[0]
    assert counts.max() <= 5
