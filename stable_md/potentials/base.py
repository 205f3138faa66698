"""The one Potential interface every backbone is wrapped into.

``Potential.forward(positions [B, N, 3] Å, numbers [N] int64, cell [B, 3, 3] Å or None)``
returns ``(energy [B] eV, atomic_energies [B, N] eV)``. Forces are ``-dE/dpositions``
by autograd, taken by callers. The module builds its own neighbour list, so a
scripted model file needs nothing but positions, and it stays trainable after
``torch.jit.load``.

A *backbone* is any ``torch.nn.Module`` with the signature::

    forward(positions [M, 3] Å, species [M] int64 in 0..S-1, edge_index [2, E],
            shifts [E, 3] Å, batch [M] int64, num_frames: int) -> atomic energies [M]

where ``M = B*N`` rows are the flattened frames, ``edge_index`` and ``shifts`` follow
:mod:`stable_md.potentials.neighbors` (``r_ij = r_j - r_i + shift``). The Potential
adds per-species energy shifts and a global energy scale around the backbone so that
backbones learn numbers of order one.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from stable_md.potentials.neighbors import cartesian_shifts, neighbor_pairs

MAX_ATOMIC_NUMBER = 118


class Potential(nn.Module):
    """A backbone plus the neighbour list, per-species energy shifts and energy scale.

    Parameters
    ----------
    backbone:
        Module following the backbone signature in this module's docstring.
    species:
        Atomic numbers the model knows, in the order of the backbone's species indices.
    cutoff:
        Neighbour-list cutoff in Å.
    arch:
        Architecture name (``schnet``, ``ani``, ``nequip``, ``mace``, or an importer's name).
    """

    def __init__(self, backbone: nn.Module, species: Sequence[int], cutoff: float, arch: str) -> None:
        super().__init__()
        species = [int(z) for z in species]
        if len(species) == 0:
            raise ValueError("a Potential needs at least one species")
        if len(set(species)) != len(species):
            raise ValueError(f"species list has duplicates: {species}")
        for z in species:
            if not 1 <= z <= MAX_ATOMIC_NUMBER:
                raise ValueError(f"atomic number {z} in species list is outside 1..{MAX_ATOMIC_NUMBER}")
        self.backbone = backbone
        self.cutoff = float(cutoff)
        self.arch = str(arch)
        index = torch.full((MAX_ATOMIC_NUMBER + 1,), -1, dtype=torch.long)
        index[torch.tensor(species)] = torch.arange(len(species))
        self.register_buffer("species_index", index)
        self.register_buffer("species_numbers", torch.tensor(species, dtype=torch.long))
        self.register_buffer("energy_shift", torch.zeros(len(species)))
        self.register_buffer("energy_scale", torch.ones(()))

    @torch.jit.export
    def species_of(self, numbers: Tensor) -> Tensor:
        """Backbone species indices ``[N]`` of atomic numbers ``[N]``; raises on unknown elements."""
        if bool(((numbers < 1) | (numbers > 118)).any()):
            raise ValueError("atomic numbers must lie in 1..118")
        species = self.species_index[numbers]
        if bool((species < 0).any()):
            known: List[int] = self.species_numbers.tolist()
            unknown: List[int] = torch.unique(numbers[species < 0]).tolist()
            raise ValueError(
                "the structure contains elements this model was not trained on: atomic numbers "
                + str(unknown)
                + "; the model knows "
                + str(known)
            )
        return species

    def forward(
        self, positions: Tensor, numbers: Tensor, cell: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        if positions.dim() != 3 or positions.shape[2] != 3:
            raise ValueError("positions must have shape [B, N, 3]")
        n_frames = positions.shape[0]
        n_atoms = positions.shape[1]
        if numbers.shape[0] != n_atoms:
            raise ValueError("numbers must have one entry per atom of positions [B, N, 3]")
        species = self.species_of(numbers)
        cell_detached: Optional[Tensor] = None
        if cell is not None:
            if cell.dim() == 2:
                cell = cell.unsqueeze(0).expand(n_frames, 3, 3)
            cell_detached = cell.detach()
        edge_index, unit_shifts = neighbor_pairs(positions.detach(), cell_detached, self.cutoff)
        batch = torch.arange(n_frames, device=positions.device).repeat_interleave(n_atoms)
        shifts = cartesian_shifts(unit_shifts.to(positions.dtype), cell, batch[edge_index[0]])
        flat_positions = positions.reshape(n_frames * n_atoms, 3)
        flat_species = species.repeat(n_frames)
        raw = self.backbone(flat_positions, flat_species, edge_index, shifts, batch, n_frames)
        atomic = raw.reshape(n_frames, n_atoms) * self.energy_scale + self.energy_shift[species]
        return atomic.sum(dim=1), atomic


def energy_and_forces(
    model: nn.Module,
    positions: Tensor,
    numbers: Tensor,
    cell: Optional[Tensor] = None,
    create_graph: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Energy ``[B]`` (eV) and forces ``[B, N, 3]`` (eV/Å) of any Potential-like module.

    ``create_graph=True`` keeps the graph so that a loss on the forces can be
    back-propagated to the parameters (force training).
    """
    if not positions.requires_grad:
        positions = positions.detach().requires_grad_(True)
    with plain_execution():
        energy, _ = model(positions, numbers, cell)
    (gradient,) = torch.autograd.grad(
        energy.sum(), positions, create_graph=create_graph, retain_graph=create_graph
    )
    return energy, -gradient


def model_dtype_device(model: nn.Module) -> Tuple[torch.dtype, torch.device]:
    """The dtype and device of ``model``'s parameters (float32 on the CPU for a module without any): what its
    inputs are converted to."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.float32, torch.device("cpu")
    return parameter.dtype, parameter.device


def check_finite_predictions(model: nn.Module, positions, numbers, cell, where: str, batch_size: int = 64) -> None:
    """Raise ``ValueError`` naming ``where`` and the first frames on which ``model`` returns a non-finite
    energy or force: such a model cannot be simulated, refined or evaluated, and would otherwise fail
    silently or write NaN parameters.

    ``positions`` ``[F, N, 3]`` Å, ``numbers`` ``[N]``, ``cell`` one ``[3, 3]`` Å cell for all frames or
    None; arrays or tensors, converted to the model's dtype and device.
    """
    dtype, device = model_dtype_device(model)
    positions = torch.as_tensor(positions, dtype=dtype, device=device)
    numbers = torch.as_tensor(numbers, dtype=torch.int64, device=device)
    cell = None if cell is None else torch.as_tensor(cell, dtype=dtype, device=device).reshape(3, 3)
    bad: list[int] = []
    for start in range(0, len(positions), batch_size):
        chunk = positions[start:start + batch_size]
        chunk_cell = None if cell is None else cell.expand(len(chunk), 3, 3)
        energy, forces = energy_and_forces(model, chunk, numbers, chunk_cell)
        finite = torch.isfinite(energy) & torch.isfinite(forces).flatten(1).all(dim=1)
        bad += [start + int(k) for k in torch.nonzero(~finite).flatten()]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"{where}: the model returns a non-finite (NaN or inf) energy or force on {len(bad)} of "
                         f"{len(positions)} frames ({shown}); its parameters or the frames are broken, so it "
                         f"cannot be run")


def plain_execution():
    """Context that runs TorchScript models without the graph executor's optimisations.

    Measured here on CPU (SchNet, aspirin, energy + forces): the optimising executor's
    autodiff graphs are 2x slower than plain autograd, and its first calls take 70-170 ms
    each while it profiles. Eager modules are unaffected.
    """
    return torch.jit.optimized_execution(False)


def species_list(numbers: Sequence[int]) -> List[int]:
    """Sorted unique atomic numbers."""
    return sorted({int(z) for z in numbers})
