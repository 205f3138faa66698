"""TorchScript export of a Potential in OpenMM's units, in the signature openmm-torch expects.

openmm-torch's ``TorchForce`` calls ``forward(positions)`` (or ``forward(positions,
boxvectors)`` for periodic systems) with positions ``[M, 3]`` in nm and expects the
energy in kJ/mol, optionally with forces ``[M, 3]`` in kJ/mol/nm. The exported module
binds the atomic numbers, the number of replicas (``M = R * N``: R non-interacting
copies are evaluated as one batch) and the periodicity, so the file needs nothing but
positions.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from stable_md.potentials.base import Potential
from stable_md.files import atomic_write
from stable_md.potentials.model_file import ModelFile, load_model, script_potential
from stable_md.units import EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM


class _OpenMMUnits(nn.Module):
    """Shared part: nm in, Å to the model, eV out, kJ/mol back."""

    def __init__(self, potential: nn.Module, numbers: Sequence[int], n_replicas: int) -> None:
        super().__init__()
        if n_replicas < 1:
            raise ValueError(f"n_replicas must be at least 1, got {n_replicas}")
        self.potential = potential
        self.register_buffer("numbers", torch.as_tensor(list(numbers), dtype=torch.long))
        self.n_replicas = int(n_replicas)
        self.n_atoms = int(len(numbers))
        parameter = next(potential.parameters(), None)
        self.model_dtype = torch.float32 if parameter is None else parameter.dtype
        # TorchScript cannot read module-level Python floats; keep the unit factors as attributes.
        self.angstrom_per_nm = float(NM_IN_ANGSTROM)
        self.kj_per_mol_per_ev = float(EV_IN_KJ_PER_MOL)

    def replica_energies(self, positions: Tensor, boxvectors: Optional[Tensor]) -> Tensor:
        """Energy of each replica ``[R]`` in kJ/mol from positions ``[R*N, 3]`` in nm."""
        frames = (positions.to(self.model_dtype) * self.angstrom_per_nm).reshape(self.n_replicas, self.n_atoms, 3)
        cell: Optional[Tensor] = None
        if boxvectors is not None:
            cell = (boxvectors.to(self.model_dtype) * self.angstrom_per_nm).reshape(1, 3, 3)
            cell = cell.expand(self.n_replicas, 3, 3)
        energy, _ = self.potential(frames, self.numbers, cell)
        return energy.to(positions.dtype) * self.kj_per_mol_per_ev


class OpenMMEnergy(_OpenMMUnits):
    """``forward(positions [R*N, 3] nm, boxvectors [3, 3] nm or None) -> energy`` (kJ/mol).

    Forces are left to openmm-torch's autograd.
    """

    def forward(self, positions: Tensor, boxvectors: Optional[Tensor] = None) -> Tensor:
        return self.replica_energies(positions, boxvectors).sum()


class OpenMMEnergyForces(_OpenMMUnits):
    """``forward(positions, boxvectors=None) -> (energy kJ/mol, forces [R*N, 3] kJ/mol/nm)``.

    For ``TorchForce.setOutputsForces(True)``.
    """

    def forward(self, positions: Tensor, boxvectors: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        positions = positions.detach().requires_grad_(True)
        energy = self.replica_energies(positions, boxvectors).sum()
        (gradient,) = torch.autograd.grad([energy], [positions])
        assert gradient is not None
        return energy.detach(), -gradient


def export_for_openmm(
    model: nn.Module | ModelFile | str | os.PathLike,
    numbers: Sequence[int],
    n_replicas: int = 1,
    return_forces: bool = False,
    path: Optional[str | os.PathLike] = None,
    overwrite: bool = False,
) -> torch.jit.ScriptModule:
    """Script ``model`` in OpenMM units for ``openmmtorch.TorchForce``.

    Parameters
    ----------
    model:
        A Potential (eager or scripted), a loaded :class:`ModelFile`, or a model file path.
    numbers:
        Atomic numbers of one replica, in System particle order.
    n_replicas:
        Number of non-interacting copies; the System holds ``n_replicas * len(numbers)`` particles.
    return_forces:
        Export ``(energy, forces)`` instead of the energy alone.
    path:
        Where to write the scripted module (atomically); nothing is written when ``None``.
    overwrite:
        Replace an existing ``path``.

    Periodicity is decided by the caller: ``TorchForce.setUsesPeriodicBoundaryConditions(True)``
    makes OpenMM pass box vectors, which reach the model as its cell.
    """
    potential = _as_module(model)
    known = set(potential.species_numbers.tolist())
    unknown = sorted({int(z) for z in numbers} - known)
    if unknown:
        raise ValueError(f"atomic numbers {unknown} are not among the model's species {sorted(known)}")
    wrapper_class = OpenMMEnergyForces if return_forces else OpenMMEnergy
    scripted = torch.jit.script(wrapper_class(script_potential(potential), numbers, n_replicas))
    if path is not None:
        target = Path(path)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; refusing to overwrite it (pass overwrite=True)")
        atomic_write(target, lambda tmp: torch.jit.save(scripted, str(tmp)))
    return scripted


def _as_module(model: nn.Module | ModelFile | str | os.PathLike) -> nn.Module:
    if isinstance(model, ModelFile):
        return model.module
    if isinstance(model, (str, os.PathLike)):
        return load_model(model).module
    if isinstance(model, (Potential, torch.jit.ScriptModule)):
        return model
    raise TypeError(f"expected a Potential, a ModelFile or a model file path, got {type(model).__name__}")
