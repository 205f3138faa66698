"""StableCalculator: any stable-md model file as an ASE calculator.

Follows the conventions of MACE's and NequIP's ASE calculators::

    atoms.calc = StableCalculator(model_paths="model.stable.pt", device="cpu", default_dtype="float32")

Implements ``energy``, ``free_energy`` (eV), ``forces`` (eV/Å), per-atom ``energies`` (eV) and,
for fully periodic cells, ``stress`` (eV/Å³, Voigt order, from the strain derivative). Several
model paths form a committee: results are the mean, with ``energy_std``/``forces_std`` added.
``guard=True`` (or a :class:`~stable_md.guard.StabilityGuard`) checks every structure it computes and
raises :class:`~stable_md.guard.InstabilityError` when a bond breaks or a force explodes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from stable_md.geometry_checks import check_cell_fits_cutoff, check_finite_positions
from stable_md.guard import StabilityGuard
from stable_md.potentials.base import plain_execution
from stable_md.potentials.model_file import ModelFile, load_model
from stable_md.pretrain import DTYPES


class StableCalculator(Calculator):
    """ASE calculator backed by one or more stable-md model files."""

    implemented_properties = ["energy", "free_energy", "forces", "energies", "stress"]

    def __init__(self, model_paths: str | os.PathLike | Sequence[str | os.PathLike], device: str = "cpu",
                 default_dtype: str = "float32", guard: bool | StabilityGuard | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if not (guard is None or isinstance(guard, (bool, StabilityGuard))):
            raise TypeError(f"StableCalculator: guard must be True, False, None or a StabilityGuard, got "
                            f"{type(guard).__name__}")
        self.guard: bool | StabilityGuard | None = guard
        self._guard_built: Optional[StabilityGuard] = None  # what guard=True built, for these atomic numbers
        self._guard_numbers: Optional[list[int]] = None
        self.force_calls = 0
        paths = [model_paths] if isinstance(model_paths, (str, os.PathLike)) else list(model_paths)
        if not paths:
            raise ValueError("StableCalculator: model_paths is empty")
        if default_dtype not in DTYPES:
            raise ValueError(f"StableCalculator: default_dtype must be one of {sorted(DTYPES)}, "
                             f"got {default_dtype!r}")
        self.dtype = DTYPES[default_dtype]
        self.device = torch.device(device)
        self.models: list[ModelFile] = [load_model(Path(p), device=self.device, dtype=self.dtype) for p in paths]
        for model in self.models:
            model.module.eval()
            for parameter in model.module.parameters():
                parameter.requires_grad_(False)
        self.species = set(self.models[0].species)
        for model in self.models[1:]:
            if set(model.species) != self.species:
                raise ValueError(f"StableCalculator: {model.path} knows species {model.species}, "
                                 f"{self.models[0].path} knows {sorted(self.species)}")
        self.cutoff = max(model.cutoff for model in self.models)

    def _check(self, atoms) -> Optional[torch.Tensor]:
        unknown = sorted(set(int(z) for z in atoms.numbers) - self.species)
        if unknown:
            raise ValueError(
                f"StableCalculator: atoms contain elements {unknown} that model {self.models[0].path} "
                f"was not trained on (it knows {sorted(self.species)})")
        pbc = np.asarray(atoms.pbc)
        if pbc.any() and not pbc.all():
            raise ValueError(f"StableCalculator: partly periodic cells (pbc={pbc.tolist()}) are not supported; "
                             f"use a molecule (pbc=False) or a fully periodic box")
        check_finite_positions(atoms.positions, "StableCalculator")
        if not pbc.any():
            return None
        check_cell_fits_cutoff(np.asarray(atoms.cell), max(model.cutoff for model in self.models), "StableCalculator")
        return torch.tensor(np.asarray(atoms.cell), dtype=self.dtype, device=self.device)[None]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        cell = self._check(self.atoms)
        positions = torch.tensor(self.atoms.positions, dtype=self.dtype, device=self.device)[None]
        numbers = torch.tensor(self.atoms.numbers, dtype=torch.long, device=self.device)
        want_stress = "stress" in properties and cell is not None
        energies, forces, atomic, stresses = [], [], [], []
        for model in self.models:
            e, f, a, s = _evaluate(model.module, positions, numbers, cell, want_stress)
            energies.append(e)
            forces.append(f)
            atomic.append(a)
            if s is not None:
                stresses.append(s)
        energy = float(np.mean(energies))
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": np.mean(forces, axis=0),
            "energies": np.mean(atomic, axis=0),
        }
        if stresses:
            self.results["stress"] = np.mean(stresses, axis=0)
        if len(self.models) > 1:
            self.results["energy_std"] = float(np.std(energies))
            self.results["forces_std"] = np.std(forces, axis=0)
        self.force_calls += 1
        if self.guard:
            self._guard_check(cell)

    def _guard_check(self, cell: Optional[torch.Tensor]) -> None:
        """With ``guard``, raise :class:`~stable_md.guard.InstabilityError` for an unstable structure (the results
        of this call are kept). ``guard=True`` builds the guard at the first call: the bonds the model stores
        when its atoms are these, else those of the first structure."""
        guard = self.guard
        numbers = [int(z) for z in self.atoms.numbers]
        if guard is True:
            if self._guard_built is None or self._guard_numbers != numbers:  # other atoms: a guard of their own
                box = None if cell is None else cell[0].detach().cpu().numpy().astype(np.float64)
                self._guard_built = StabilityGuard.from_model(self.models[0], numbers, self.atoms.positions, box)
                self._guard_numbers = numbers
            guard = self._guard_built
        instability = guard.check(self.atoms.positions, self.results["forces"],
                                  np.asarray(self.atoms.cell) if cell is not None else None)
        if instability is not None:
            raise guard.error(instability, self.force_calls, where="StableCalculator: ", counted="force call")


def _evaluate(module, positions, numbers, cell, want_stress: bool):
    """Energy, forces, atomic energies and (optionally) Voigt stress of one frame."""
    positions = positions.clone().requires_grad_(True)
    inputs = [positions]
    strain = None
    if want_stress:
        # Stress is the derivative with respect to a homogeneous strain applied to
        # positions and cell together, divided by the volume.
        strain = torch.zeros(3, 3, dtype=positions.dtype, device=positions.device, requires_grad=True)
        deformation = torch.eye(3, dtype=positions.dtype, device=positions.device) + strain
        positions_in = positions @ deformation
        cell_in = cell @ deformation
        inputs.append(strain)
    else:
        positions_in, cell_in = positions, cell
    with plain_execution():
        energy, atomic = module(positions_in, numbers, cell_in)
    gradients = torch.autograd.grad(energy.sum(), inputs)
    forces = -gradients[0][0].detach().cpu().numpy().astype(np.float64)
    stress = None
    if want_stress:
        volume = float(torch.abs(torch.det(cell[0])))
        sigma = gradients[1].detach().cpu().numpy().astype(np.float64) / volume
        sigma = 0.5 * (sigma + sigma.T)
        stress = np.array([sigma[0, 0], sigma[1, 1], sigma[2, 2], sigma[1, 2], sigma[0, 2], sigma[0, 1]])
    return (float(energy.detach()[0]), forces, atomic.detach()[0].cpu().numpy().astype(np.float64), stress)
