"""StableCalculator in real ASE workflows: numeric forces and stress, NVE, optimisation, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from conftest import FAST_SCHNET
from stable_md.calculator import StableCalculator
from stable_md.potentials import build_metadata, build_potential, save_model


def test_forces_and_atomic_energies_match_numeric(pretrained_model, ethanol):
    atoms = ethanol.to_atoms(5)
    atoms.calc = StableCalculator(pretrained_model, default_dtype="float64")
    forces = atoms.get_forces()
    numeric = calculate_numerical_forces(atoms, eps=1e-4)
    assert np.abs(forces).max() > 0.05
    np.testing.assert_allclose(forces, numeric, atol=1e-5)
    assert atoms.get_potential_energies().sum() == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
    assert atoms.get_potential_energy(force_consistent=True) == pytest.approx(atoms.get_potential_energy())


def test_stress_matches_numeric_strain_derivative(tmp_path):
    torch.manual_seed(0)
    potential, hyper = build_potential("schnet", [1, 8], **{**FAST_SCHNET, "cutoff": 3.5})
    path = save_model(potential, tmp_path / "box.pt", build_metadata(potential, hyper))
    rng = np.random.default_rng(0)
    atoms = Atoms("OH2OH2", positions=rng.uniform(0, 7.5, (6, 3)), cell=[[7.5, 0, 0], [0.4, 7.6, 0], [0, 0.3, 7.4]],
                  pbc=True)
    atoms.calc = StableCalculator(path, default_dtype="float64")
    stress = atoms.get_stress()
    numeric = calculate_numerical_stress(atoms, eps=1e-5)
    assert np.abs(stress).max() > 1e-5
    np.testing.assert_allclose(stress, numeric, atol=1e-7)
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, eps=1e-4), atol=1e-6)


def test_nve_energy_is_conserved(pretrained_model, ethanol):
    atoms = ethanol.to_atoms(0)
    atoms.calc = StableCalculator(pretrained_model, default_dtype="float64")
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(1))
    Stationary(atoms)
    ZeroRotation(atoms)
    dynamics = VelocityVerlet(atoms, timestep=0.25 * units.fs)
    totals = []
    dynamics.attach(lambda: totals.append(atoms.get_total_energy()), interval=10)
    dynamics.run(400)
    totals = np.array(totals)
    kinetic_scale = 1.5 * len(atoms) * units.kB * 300
    drift = np.abs(totals - totals[0]).max()
    assert drift < 0.01 * kinetic_scale, (drift, kinetic_scale)
    assert atoms.get_temperature() > 50, "the molecule should still be moving"


def test_optimizer_lowers_the_energy(pretrained_model, ethanol):
    atoms = ethanol.to_atoms(3)
    atoms.calc = StableCalculator(pretrained_model)
    start = atoms.get_potential_energy()
    assert BFGS(atoms, logfile=None).run(fmax=0.05, steps=300)
    assert atoms.get_potential_energy() < start
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < 0.05


def test_committee_reports_mean_and_spread(pretrained_model, tmp_path, ethanol):
    torch.manual_seed(2)
    other, hyper = build_potential("schnet", ethanol.species, **FAST_SCHNET)
    other_path = save_model(other, tmp_path / "other.pt", build_metadata(other, hyper))
    atoms = ethanol.to_atoms(0)
    singles = []
    for path in (pretrained_model, other_path):
        atoms.calc = StableCalculator(path)
        singles.append(atoms.get_potential_energy())
    atoms.calc = StableCalculator([pretrained_model, other_path])
    assert atoms.get_potential_energy() == pytest.approx(np.mean(singles), rel=1e-6)
    assert atoms.calc.results["energy_std"] == pytest.approx(np.std(singles), rel=1e-4)


def test_clear_errors(pretrained_model, tmp_path):
    calc = StableCalculator(pretrained_model)
    nitrogen = Atoms("NH3", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    nitrogen.calc = calc
    with pytest.raises(ValueError, match=r"elements \[7\].*knows \[1, 6, 8\]"):
        nitrogen.get_potential_energy()
    slab = Atoms("OH2", positions=[[0, 0, 0], [1, 0, 0], [0, 1, 0]], cell=[12, 12, 12], pbc=[True, True, False])
    slab.calc = calc
    with pytest.raises(ValueError, match="partly periodic"):
        slab.get_potential_energy()
    # coordinates that are not numbers: an error naming the atom, never a finite energy with a zero force
    broken = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [np.nan, 0.9, 0]])
    broken.calc = calc
    with pytest.raises(ValueError, match=r"StableCalculator: positions of atom 2 are not finite"):
        broken.get_forces()
    broken.positions[2] = [np.inf, 0.9, 0.0]
    with pytest.raises(ValueError, match=r"atom 2 are not finite"):
        broken.get_potential_energy()
    # a box narrower than twice the cutoff: the widths and the cutoff in the message, before the model runs
    small_box = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [0, 0.96, 0]], cell=[12, 12, 6], pbc=True)
    small_box.calc = calc
    cutoff = calc.models[0].cutoff
    with pytest.raises(ValueError, match=rf"12.000, 12.000, 6.000 Å between opposite faces.*cutoff is {cutoff:g} Å"):
        small_box.get_potential_energy()
    with pytest.raises(ValueError, match="default_dtype"):
        StableCalculator(pretrained_model, default_dtype="float16")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        StableCalculator(tmp_path / "missing.pt")
    not_a_model = tmp_path / "notes.pt"
    not_a_model.write_text("hello")
    with pytest.raises(ValueError, match="notes.pt is not a stable-md model file"):
        StableCalculator(not_a_model)


def test_top_level_import_does_not_load_openmm():
    import subprocess
    import sys

    code = ("import sys; from stable_md import StableCalculator, load_model; "
            "assert StableCalculator.__module__ == 'stable_md.calculator'; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('openmm', 'openmm_bridge')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
