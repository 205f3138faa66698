"""SchNet (Schütt et al., J. Chem. Phys. 148, 241722, 2018) in pure torch.

Continuous-filter convolutions over Gaussian radial basis functions with a
cosine cutoff. Defaults follow the paper's aspirin model (about 0.1M parameters,
5 Å cutoff); it is the fast default backbone of stable-md.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from stable_md.potentials.hyperparameters import COUNT, POSITIVE

DEFAULT_HYPERPARAMETERS: dict[str, Any] = {
    "cutoff": 5.0,
    "hidden_channels": 64,
    "num_filters": 64,
    "num_interactions": 6,
    "num_gaussians": 25,
}

HYPERPARAMETER_RULES = {"cutoff": POSITIVE, "hidden_channels": COUNT, "num_filters": COUNT,
                        "num_interactions": COUNT, "num_gaussians": COUNT}


class ShiftedSoftplus(nn.Module):
    """softplus(x) - log 2, SchNet's smooth activation (zero at zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = math.log(2.0)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.softplus(x) - self.shift


class GaussianBasis(nn.Module):
    """Gaussians centred on ``num`` evenly spaced distances in [0, cutoff] Å."""

    def __init__(self, cutoff: float, num: int) -> None:
        super().__init__()
        centres = torch.linspace(0.0, cutoff, num)
        self.register_buffer("centres", centres)
        spacing = float(centres[1] - centres[0]) if num > 1 else cutoff
        self.coefficient = -0.5 / spacing**2

    def forward(self, distances: Tensor) -> Tensor:
        return torch.exp(self.coefficient * (distances[:, None] - self.centres) ** 2)


class Interaction(nn.Module):
    """One SchNet interaction block: filter network, cfconv, atom-wise update."""

    def __init__(self, hidden: int, filters: int, gaussians: int) -> None:
        super().__init__()
        self.filter_network = nn.Sequential(
            nn.Linear(gaussians, filters), ShiftedSoftplus(), nn.Linear(filters, filters)
        )
        self.atom_to_filter = nn.Linear(hidden, filters, bias=False)
        self.filter_to_atom = nn.Sequential(
            nn.Linear(filters, hidden), ShiftedSoftplus(), nn.Linear(hidden, hidden)
        )

    def forward(self, features: Tensor, basis: Tensor, envelope: Tensor, edge_index: Tensor) -> Tensor:
        weights = self.filter_network(basis) * envelope[:, None]
        messages = self.atom_to_filter(features)[edge_index[1]] * weights
        aggregated = torch.zeros(
            features.shape[0], messages.shape[1], dtype=messages.dtype, device=messages.device
        ).index_add_(0, edge_index[0], messages)
        return features + self.filter_to_atom(aggregated)


class SchNet(nn.Module):
    """SchNet backbone following the signature of :mod:`stable_md.potentials.base`."""

    def __init__(self, num_species: int, cutoff: float, hidden_channels: int, num_filters: int,
                 num_interactions: int, num_gaussians: int) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.embedding = nn.Embedding(num_species, hidden_channels)
        self.basis = GaussianBasis(cutoff, num_gaussians)
        self.interactions = nn.ModuleList(
            [Interaction(hidden_channels, num_filters, num_gaussians) for _ in range(num_interactions)]
        )
        self.readout = nn.Sequential(
            nn.Linear(hidden_channels, hidden_channels // 2), ShiftedSoftplus(),
            nn.Linear(hidden_channels // 2, 1),
        )

    def forward(self, positions: Tensor, species: Tensor, edge_index: Tensor, shifts: Tensor,
                batch: Tensor, num_frames: int) -> Tensor:
        vectors = positions[edge_index[1]] - positions[edge_index[0]] + shifts
        distances = torch.linalg.norm(vectors, dim=-1)
        envelope = 0.5 * (torch.cos(distances * (math.pi / self.cutoff)) + 1.0)
        envelope = envelope * (distances < self.cutoff).to(distances.dtype)
        basis = self.basis(distances)
        features = self.embedding(species)
        for interaction in self.interactions:
            features = interaction(features, basis, envelope, edge_index)
        return self.readout(features).squeeze(-1)


def build_backbone(species: Sequence[int], cutoff: float, hidden_channels: int, num_filters: int,
                   num_interactions: int, num_gaussians: int) -> SchNet:
    """A SchNet for ``len(species)`` species (hyperparameters as in ``DEFAULT_HYPERPARAMETERS``)."""
    return SchNet(len(species), cutoff, hidden_channels, num_filters, num_interactions, num_gaussians)
