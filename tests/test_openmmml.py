"""MLPotential('stable-md') in OpenMM-ML: found through the entry point, equal to StableCalculator on a
molecule and in a periodic box, mixed ML/MM of ethanol in TIP3P water with OpenMM-ML's own semantics
(the ML part plus the MM part, interpolation, force groups), 1 ps of MD, and bad input named (issue 14)."""
from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

openmm = pytest.importorskip("openmm")
pytest.importorskip("openmmml")
import openmm.app as app  # noqa: E402
import openmm.unit as unit  # noqa: E402
from ase import Atoms  # noqa: E402
from openmmml import MLPotential  # noqa: E402

from openmm_bridge.serialization import load_system, save_system  # noqa: E402
from openmm_bridge.topology import molecule_topology  # noqa: E402
from stable_md import StableCalculator  # noqa: E402
from stable_md.stability import detect_bonds  # noqa: E402
from stable_md.units import EV_IN_KJ_PER_MOL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ETHANOL_MM = REPO / "data" / "ethanol_mm.xml"


def _cpu() -> openmm.Platform:
    return openmm.Platform.getPlatformByName("CPU")


def _energy_forces(system, positions_nm, groups=-1, box_nm=None):
    """Energy (eV) and forces (eV/Å) of ``system`` at ``positions_nm``, on one CPU thread."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.0005), _cpu(), {"Threads": "1"})
    if box_nm is not None:
        context.setPeriodicBoxVectors(*box_nm)
    context.setPositions(positions_nm)
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / EV_IN_KJ_PER_MOL
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.angstrom) / EV_IN_KJ_PER_MOL
    return energy, np.asarray(forces)


def _reference(model, numbers, positions, cell=None):
    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=cell is not None)
    atoms.calc = StableCalculator(model)
    return atoms.get_potential_energy(), atoms.get_forces()


@pytest.fixture(scope="module")
def ethanol_topology(ethanol):
    bonds = detect_bonds(ethanol.numbers, ethanol.positions[:50], None)
    return molecule_topology(ethanol.numbers, bonds.pairs, residue="ETH")


@pytest.fixture(scope="module")
def solvated(ethanol, ethanol_topology):
    """Ethanol (frame 0) in TIP3P water, 1 nm of padding: topology, positions (nm) and the MM force field."""
    forcefield = app.ForceField(str(ETHANOL_MM), "tip3p.xml")
    modeller = app.Modeller(ethanol_topology, ethanol.positions[0] * 0.1 * unit.nanometer)
    modeller.addSolvent(forcefield, model="tip3p", padding=1.0 * unit.nanometer)
    return modeller.topology, modeller.positions, forcefield


def test_the_entry_point_registers_the_potential_without_importing_stable_md(pretrained_model, tmp_path):
    script = (
        "import sys\n"
        "from openmmml import MLPotential\n"
        "import openmm.app as app\n"
        "assert 'stable_md' not in sys.modules and 'torch' not in sys.modules, 'loaded too early'\n"
        f"potential = MLPotential('stable-md', modelPath={str(pretrained_model)!r})\n"
        "topology = app.Topology(); residue = topology.addResidue('W', topology.addChain())\n"
        "for name, element in (('O', app.element.oxygen), ('H1', app.element.hydrogen)):\n"
        "    topology.addAtom(name, element, residue)\n"
        "system = potential.createSystem(topology)\n"
        "print(sorted(force.getName() for force in system.getForces()))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['CMMotionRemover', 'stable-md model']"


def test_create_system_gives_stable_calculator_energies_and_forces(pretrained_model, ethanol, ethanol_topology):
    positions = ethanol.positions[3]
    system = MLPotential("stable-md", modelPath=str(pretrained_model)).createSystem(ethanol_topology)
    energy, forces = _energy_forces(system, positions * 0.1)
    expected_energy, expected_forces = _reference(pretrained_model, ethanol.numbers, positions)
    assert energy == pytest.approx(expected_energy, abs=1e-4)
    np.testing.assert_allclose(forces, expected_forces, atol=1e-4)


def test_a_periodic_box_uses_the_minimum_image_as_stable_calculator_does(pretrained_model, ethanol):
    # ethanol across the faces of a box twice the cutoff: bonds reach through the boundary
    cell = np.diag([10.5, 11.0, 12.0])
    positions = ethanol.positions[5] - ethanol.positions[5].mean(axis=0) + np.array([10.2, 0.3, 6.0])
    topology = molecule_topology(ethanol.numbers, [], residue="ETH", box_angstrom=cell)
    system = MLPotential("stable-md", modelPath=str(pretrained_model)).createSystem(topology)
    assert system.usesPeriodicBoundaryConditions()
    energy, forces = _energy_forces(system, positions * 0.1)
    expected_energy, expected_forces = _reference(pretrained_model, ethanol.numbers, positions, cell)
    assert energy == pytest.approx(expected_energy, abs=1e-4)
    np.testing.assert_allclose(forces, expected_forces, atol=1e-4)
    # the same molecule unwrapped gives the same numbers: the model saw the minimum image
    unwrapped, _ = _reference(pretrained_model, ethanol.numbers, ethanol.positions[5])
    assert energy == pytest.approx(unwrapped, abs=1e-4)


def test_mixed_system_is_the_ml_part_plus_the_mm_part(pretrained_model, ethanol, solvated):
    """With a cutoff MM force field (no Ewald sum over images), the MM part OpenMM-ML keeps is exactly the MM
    energy of the whole box less that of the ethanol alone; the ML part is StableCalculator's ethanol."""
    topology, positions, forcefield = solvated
    mm_system = forcefield.createSystem(topology, nonbondedMethod=app.CutoffPeriodic,
                                        nonbondedCutoff=0.9 * unit.nanometer, constraints=app.HBonds)
    ml_atoms = list(range(len(ethanol.numbers)))
    potential = MLPotential("stable-md", modelPath=str(pretrained_model))
    mixed = potential.createMixedSystem(topology, mm_system, ml_atoms, forceGroup=1)
    positions_nm = np.asarray(positions.value_in_unit(unit.nanometer))
    box = topology.getPeriodicBoxVectors()

    ml_energy, ml_forces = _energy_forces(mixed, positions_nm, groups={1})
    cell = np.asarray(box.value_in_unit(unit.angstrom))
    expected_energy, expected_forces = _reference(pretrained_model, ethanol.numbers, positions_nm[:9] * 10, cell)
    assert ml_energy == pytest.approx(expected_energy, abs=1e-4)
    np.testing.assert_allclose(ml_forces[:9], expected_forces, atol=1e-4)
    assert np.abs(ml_forces[9:]).max() == 0.0, "the model's force acts on the ML atoms only"

    total, _ = _energy_forces(mixed, positions_nm)
    whole_mm, _ = _energy_forces(mm_system, positions_nm)
    # the ethanol alone in the same box with the same force field: its MM terms among its own atoms
    alone_topology = app.Topology()
    alone_topology.setPeriodicBoxVectors(box)
    chain = alone_topology.addChain()
    residue = alone_topology.addResidue("ETH", chain)
    by_old = {}
    for atom in list(topology.atoms())[:9]:
        by_old[atom.index] = alone_topology.addAtom(atom.name, atom.element, residue)
    for a, b in topology.bonds():
        if a.index < 9 and b.index < 9:
            alone_topology.addBond(by_old[a.index], by_old[b.index])
    alone = forcefield.createSystem(alone_topology, nonbondedMethod=app.CutoffPeriodic,
                                    nonbondedCutoff=0.9 * unit.nanometer, constraints=app.HBonds)
    ethanol_mm, _ = _energy_forces(alone, positions_nm[:9])
    assert total == pytest.approx(expected_energy + whole_mm - ethanol_mm, abs=2e-4)
    # OpenMM-ML's removeConstraints: no constraint left between two ethanol atoms
    constrained = [mixed.getConstraintParameters(k)[:2] for k in range(mixed.getNumConstraints())]
    assert constrained and not [pair for pair in constrained if max(pair) < 9]


def test_interpolation_runs_from_mm_to_ml(pretrained_model, solvated):
    topology, positions, forcefield = solvated
    mm_system = forcefield.createSystem(topology, nonbondedMethod=app.PME, nonbondedCutoff=0.9 * unit.nanometer,
                                        constraints=app.HBonds)
    potential = MLPotential("stable-md", modelPath=str(pretrained_model))
    ml_atoms = list(range(9))
    interpolating = potential.createMixedSystem(topology, mm_system, ml_atoms, interpolate=True)
    mixed = potential.createMixedSystem(topology, mm_system, ml_atoms)
    context = openmm.Context(interpolating, openmm.VerletIntegrator(0.0005), _cpu(), {"Threads": "1"})
    context.setPositions(positions)
    energies = {}
    for value in (0.0, 0.5, 1.0):
        context.setParameter("lambda_interpolate", value)
        energies[value] = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole) / EV_IN_KJ_PER_MOL
    positions_nm = np.asarray(positions.value_in_unit(unit.nanometer))
    assert energies[0.0] == pytest.approx(_energy_forces(mm_system, positions_nm)[0], abs=1e-3)
    assert energies[1.0] == pytest.approx(_energy_forces(mixed, positions_nm)[0], abs=1e-3)
    assert energies[0.5] == pytest.approx(0.5 * (energies[0.0] + energies[1.0]), abs=1e-3)


def test_ethanol_in_water_runs_a_picosecond_and_stays_whole(pretrained_model, ethanol, solvated, tmp_path):
    topology, positions, forcefield = solvated
    mm_system = forcefield.createSystem(topology, nonbondedMethod=app.PME, nonbondedCutoff=0.9 * unit.nanometer,
                                        constraints=app.HBonds)
    mixed = MLPotential("stable-md", modelPath=str(pretrained_model)).createMixedSystem(topology, mm_system,
                                                                                        list(range(9)))
    # the System serializes and loads back through stable-md's safe loader, model force included
    save_system(mixed, tmp_path / "mixed.xml")
    mixed = load_system(tmp_path / "mixed.xml")
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.5 * unit.femtosecond)
    integrator.setRandomNumberSeed(1)
    simulation = app.Simulation(topology, mixed, integrator, _cpu(), {"Threads": "1"})
    simulation.context.setPositions(positions)
    simulation.minimizeEnergy(maxIterations=200)
    simulation.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    simulation.step(2000)  # 1 ps
    state = simulation.context.getState(getEnergy=True, getPositions=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert np.isfinite(energy)
    final = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.angstrom))[:9]
    bonds = detect_bonds(ethanol.numbers, ethanol.positions[:50], None)
    lengths = np.linalg.norm(final[bonds.pairs[:, 0]] - final[bonds.pairs[:, 1]], axis=1)
    assert np.abs(lengths - bonds.reference_lengths).max() < 0.35, (lengths, bonds.reference_lengths)


def test_bad_input_is_named(pretrained_model, ethanol_topology, tmp_path):
    with pytest.raises(ValueError, match=r"MLPotential\('stable-md'\) needs the model file"):
        MLPotential("stable-md")
    with pytest.raises(FileNotFoundError, match="modelPath .*nothing.pt does not exist"):
        MLPotential("stable-md", modelPath=str(tmp_path / "nothing.pt"))
    potential = MLPotential("stable-md", modelPath=str(pretrained_model))
    with pytest.raises(ValueError, match="precision must be one of \\['single', 'double'\\], got 'half'"):
        potential.createSystem(ethanol_topology, precision="half")
    nitrogen = molecule_topology([7, 1, 1, 1], [(0, 1), (0, 2), (0, 3)])
    with pytest.raises(ValueError, match=r"the ML atoms hold elements \[7\] that .* was not trained on"):
        potential.createSystem(nitrogen)
    small_box = molecule_topology(ethanol_numbers := [a.element.atomic_number for a in ethanol_topology.atoms()],
                                  [], box_angstrom=np.diag([8.0, 12.0, 12.0]))
    with pytest.raises(ValueError, match=r"with .*\.pt: .*8\.000, 12\.000, 12\.000 Å between opposite faces; "
                                         r"the model's cutoff is 5 Å"):
        potential.createSystem(small_box)
    assert len(ethanol_numbers) == 9
    with pytest.raises(ValueError, match=r"atom index 12 is not in the topology \(9 atoms\)"):
        potential.createMixedSystem(molecule_topology(ethanol_numbers, []), openmm.System(), [0, 12])


def test_a_model_already_loaded_gives_the_files_energies(pretrained_model, ethanol, ethanol_topology):
    """model= (a ModelFile or its module, e.g. one being refined) instead of modelPath=."""
    from stable_md.potentials.model_file import load_model

    positions = ethanol.positions[7] * 0.1
    expected = _energy_forces(MLPotential("stable-md", modelPath=str(pretrained_model)).createSystem(
        ethanol_topology), positions)
    loaded = load_model(pretrained_model)
    for model in (loaded, loaded.module):
        energy, forces = _energy_forces(MLPotential("stable-md", model=model).createSystem(ethanol_topology),
                                        positions)
        assert energy == pytest.approx(expected[0], abs=1e-6)
        np.testing.assert_allclose(forces, expected[1], atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        MLPotential("stable-md", modelPath=str(pretrained_model), model=loaded)
    with pytest.raises(ValueError, match="a loaded model runs in its own precision"):
        MLPotential("stable-md", model=loaded).createSystem(ethanol_topology, precision="double")


def test_double_precision_is_a_float64_copy_of_the_model(pretrained_model, ethanol, ethanol_topology):
    system = MLPotential("stable-md", modelPath=str(pretrained_model)).createSystem(ethanol_topology,
                                                                                     precision="double")
    force = next(f for f in system.getForces() if f.getName() == "stable-md model")
    # what a saved System runs (the pickle in its XML): the precision survives
    pickled = re.search(r'function="([0-9a-f]+)"', openmm.XmlSerializer.serialize(force)).group(1)
    callback = pickle.loads(bytes.fromhex(pickled))
    assert callback.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in callback.model.parameters())
    if not torch.cuda.is_available():  # a System saved on a GPU node (OpenMM-ML's default device) loads here
        from openmm_bridge.forces import ModelCallback

        state = {**callback.__getstate__(), "device": "cuda"}
        moved = ModelCallback.__new__(ModelCallback)
        moved.__setstate__(state)
        assert moved.device == torch.device("cpu") and next(moved.model.parameters()).device.type == "cpu"
    # OpenMM-ML passes device=None through: the automatic choice
    MLPotential("stable-md", modelPath=str(pretrained_model)).createSystem(ethanol_topology, device=None)
    energy, _ = _energy_forces(system, ethanol.positions[0] * 0.1)
    single, _ = _reference(pretrained_model, ethanol.numbers, ethanol.positions[0])
    assert energy == pytest.approx(single, abs=1e-3)
