"""The stability guard in production MD (issue 14, item 2): a simulation whose O-H bond is pulled apart is
stopped within one check interval, with the step, the reason, the atoms and the deviation, in OpenMM (a
reporter) and in ASE (an observer, and StableCalculator(guard=True)); warn and rewind; the reference the
model file stores.

The pull is an external force on one hydrogen under NVE (Verlet), so each trajectory is deterministic on a
machine; the first unstable step is found by checking every step, and the guard checking every 10 steps
must stop at the first multiple of 10 at or after it."""
from __future__ import annotations

import math

import numpy as np
import pytest
from ase import Atoms
from ase.constraints import ExternalForce
from ase.md.verlet import VelocityVerlet
from ase import units

from stable_md import StableCalculator
from stable_md.guard import REFERENCE_KEY, InstabilityError, StabilityGuard
from stable_md.guard_ase import StabilityObserver
from stable_md.potentials import build_metadata, build_potential, read_metadata, save_model

openmm = pytest.importorskip("openmm")
pytest.importorskip("openmmml")
import openmm.app as app  # noqa: E402
import openmm.unit as unit  # noqa: E402
from openmmml import MLPotential  # noqa: E402

from openmm_bridge.topology import molecule_topology  # noqa: E402
from stable_md.guard_openmm import StabilityReporter  # noqa: E402
from stable_md.stability import detect_bonds  # noqa: E402

O, HO = 2, 8  # ethanol's hydroxyl oxygen and hydrogen in the bundled data


def _pulled_simulation(model, ethanol, integrator=None, pull_kj_per_mol_nm=3000.0):
    bonds = detect_bonds(ethanol.numbers, ethanol.positions[:50])
    topology = molecule_topology(ethanol.numbers, bonds.pairs, residue="ETH")
    system = MLPotential("stable-md", modelPath=str(model)).createSystem(topology, removeCMMotion=False)
    pull = openmm.CustomExternalForce("-k*x")
    pull.addGlobalParameter("k", pull_kj_per_mol_nm)
    pull.addParticle(HO, [])
    system.addForce(pull)
    integrator = integrator or openmm.VerletIntegrator(0.5 * unit.femtosecond)
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("CPU"),
                                {"Threads": "1"})
    simulation.context.setPositions(ethanol.positions[0] * 0.1)
    return simulation


def _first_stop(simulation, reporter, steps=3000) -> InstabilityError:
    simulation.reporters.append(reporter)
    with pytest.raises(InstabilityError) as caught:
        simulation.step(steps)
    return caught.value


def test_the_openmm_reporter_stops_within_one_check_interval(pretrained_model, ethanol, tmp_path):
    every_step = _first_stop(_pulled_simulation(pretrained_model, ethanol), StabilityReporter(pretrained_model, 1))
    log = tmp_path / "guard.log"
    reporter = StabilityReporter(pretrained_model, 10, log=log)
    error = _first_stop(_pulled_simulation(pretrained_model, ethanol), reporter)
    assert error.step == 10 * math.ceil(every_step.step / 10), (every_step.step, error.step)
    assert error.atoms == (O, HO) and error.value > 0.5 and error.criterion == "bond"
    assert "bond O3-H9 off by" in error.reason and f"unstable at step {error.step} (" in str(error)
    assert error.time_ps == pytest.approx(error.step * 0.0005, rel=1e-6)
    assert f"step {error.step} (" in log.read_text() and "[stop]" in log.read_text()
    # the model file's own reference: pretrain stored the bonds of its training frames
    assert reporter.guard.note.startswith("bonds the model stores (200 training frames of")


def test_warn_goes_on_and_rewind_returns_to_the_last_stable_check(pretrained_model, ethanol, tmp_path):
    reporter = StabilityReporter(pretrained_model, 10, action="warn")
    simulation = _pulled_simulation(pretrained_model, ethanol)
    simulation.reporters.append(reporter)
    with pytest.warns(RuntimeWarning, match="StabilityReporter: unstable at step") as warned:
        simulation.step(300)
    assert simulation.currentStep == 300 and len(reporter.events) >= 2
    assert len([w for w in warned if "unstable" in str(w.message)]) == 1, "one warning per unstable stretch"

    log = tmp_path / "rewind.log"
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.5 * unit.femtosecond)
    reporter = StabilityReporter(pretrained_model, 10, action="rewind", log=log, maxRewinds=2, seed=0)
    error = _first_stop(_pulled_simulation(pretrained_model, ethanol, integrator), reporter)
    # the pull never stops, so each rewind breaks the bond again; then it stops, saying so
    assert reporter.rewinds == 2 and "StabilityReporter (after 2 rewinds): unstable at step" in str(error)
    rewound = [line for line in log.read_text().splitlines() if line.startswith("rewound to step")]
    assert len(rewound) == 2
    first_stable = int(rewound[0].split()[3])
    assert first_stable < reporter.events[0][0] and first_stable % 10 == 0

    verlet = _pulled_simulation(pretrained_model, ethanol)
    verlet.reporters.append(StabilityReporter(pretrained_model, 10, action="rewind"))
    with pytest.raises(ValueError, match="has none; use a thermostat integrator"):
        verlet.step(10)


def _pulled_atoms(model, ethanol, **calculator):
    atoms = Atoms(numbers=ethanol.numbers, positions=ethanol.positions[0])
    atoms.calc = StableCalculator(model, **calculator)
    atoms.set_constraint(ExternalForce(O, HO, 0.3))  # eV/Å pulling O and H apart
    return atoms


def test_the_ase_observer_stops_within_one_check_interval(pretrained_model, ethanol):
    def first_stop(interval: int) -> InstabilityError:
        atoms = _pulled_atoms(pretrained_model, ethanol)
        dynamics = VelocityVerlet(atoms, 0.5 * units.fs)
        guard = StabilityGuard.from_model(pretrained_model, atoms.numbers, atoms.positions)
        dynamics.attach(StabilityObserver(atoms, guard, dynamics=dynamics), interval=interval)
        with pytest.raises(InstabilityError) as caught:
            dynamics.run(3000)
        return caught.value

    every_step, error = first_stop(1), first_stop(10)
    assert error.step == 10 * math.ceil(every_step.step / 10), (every_step.step, error.step)
    assert error.atoms == (O, HO) and error.value > 0.5
    assert error.time_ps == pytest.approx(error.step * 0.0005, rel=1e-6)

    # the calculator's own guard checks every force call: call k holds the positions after step k - 1
    atoms = _pulled_atoms(pretrained_model, ethanol, guard=True)
    dynamics = VelocityVerlet(atoms, 0.5 * units.fs)
    with pytest.raises(InstabilityError, match=r"StableCalculator: unstable at force call \d+: bond O3-H9") as caught:
        dynamics.run(3000)
    assert caught.value.step == every_step.step + 1
    assert atoms.calc.results["forces"].shape == (9, 3), "the results of the failing call are kept"


def test_warn_in_ase_logs_and_goes_on(pretrained_model, ethanol, tmp_path):
    atoms = _pulled_atoms(pretrained_model, ethanol)
    dynamics = VelocityVerlet(atoms, 0.5 * units.fs)
    observer = StabilityObserver(atoms, StabilityGuard.from_model(pretrained_model, atoms.numbers, atoms.positions),
                                 dynamics=dynamics, action="warn", log=tmp_path / "ase.log")
    dynamics.attach(observer, interval=20)
    with pytest.warns(RuntimeWarning, match="unstable at step"):
        dynamics.run(400)
    assert dynamics.nsteps == 400 and observer.events
    assert (tmp_path / "ase.log").read_text().count("[warn]") == len(observer.events)


def test_the_reference_comes_from_the_model_file_else_from_the_start(pretrained_model, ethanol, tmp_path):
    stored = read_metadata(pretrained_model)[REFERENCE_KEY]
    assert stored["numbers"] == ethanol.numbers.tolist() and len(stored["bonds"]) == 8
    assert stored["source"].startswith("200 training frames of")

    # another molecule than the stored one: the starting structure's bonds, said so
    water = StabilityGuard.from_model(pretrained_model, [8, 1, 1], np.array([[0, 0, 0], [0.96, 0, 0], [0, 0.96, 0]]))
    assert water.note.startswith("bonds of the starting structure") and "is for other atoms" in water.note
    assert water.check(np.array([[0, 0, 0], [0.96, 0, 0], [0, 0.96, 0]])) is None
    broken = water.check(np.array([[0, 0, 0], [2.0, 0, 0], [0, 0.96, 0]]))
    assert broken.atoms == (0, 1) and broken.value == pytest.approx(1.04) and "O1-H2" in broken.reason

    # a model without a stored reference (imported or older) and no structure: refused by name
    potential, hyper = build_potential("schnet", [1, 6, 8], hidden_channels=8, num_filters=8, num_interactions=1,
                                       num_gaussians=8)
    bare = save_model(potential, tmp_path / "bare.pt", build_metadata(potential, hyper))
    with pytest.raises(ValueError, match="bare.pt stores no reference .*give the starting positions"):
        StabilityGuard.from_model(bare, ethanol.numbers)


def test_exploding_forces_and_bad_arguments(pretrained_model, ethanol):
    guard = StabilityGuard.from_model(pretrained_model, ethanol.numbers, atoms=None)
    forces = np.zeros((9, 3))
    forces[4, 0] = 2e3
    exploding = guard.check(ethanol.positions[0], forces)
    assert exploding.criterion == "force" and exploding.atoms == (4,) and "above 1000 eV/Å" in exploding.reason
    positions = ethanol.positions[0].copy()
    positions[7, 1] = np.nan
    assert guard.check(positions).reason == "non-finite positions on atom(s) 7"
    # a subset of a larger system: indices are the whole system's
    subset = StabilityGuard.from_model(pretrained_model, ethanol.numbers, atoms=range(3, 12))
    padded = np.vstack([np.zeros((3, 3)), ethanol.positions[0], np.zeros((2, 3))])
    padded[3 + HO] += [3.0, 3.0, 3.0]
    assert subset.check(padded).atoms == (3 + O, 3 + HO)

    with pytest.raises(ValueError, match=r"action must be one of \['stop', 'warn', 'rewind'\], got 'explode'"):
        StabilityReporter(pretrained_model, 10, action="explode")
    with pytest.raises(ValueError, match="reportInterval must be at least 1 step, got 0"):
        StabilityReporter(pretrained_model, 0)
    with pytest.raises(TypeError, match="guard must be True, False, None or a StabilityGuard, got str"):
        StableCalculator(pretrained_model, guard="yes")


def test_an_imported_model_stores_the_reference_it_is_given(ethanol_path, tmp_path, capsys):
    pytest.importorskip("torchani")
    import torch

    from stable_md.cli import main
    from test_import_ani import _assembled_ani

    source = tmp_path / "ani.pt"
    torch.save(_assembled_ani(ensemble=1, dtype=torch.float32), source)
    imported = tmp_path / "imported.pt"
    assert main(["import", "ani", str(source), "-o", str(imported), "--trust-pickle", "--reference",
                 str(ethanol_path)]) == 0
    stored = read_metadata(imported)[REFERENCE_KEY]
    assert stored["numbers"] == [6, 6, 8, 1, 1, 1, 1, 1, 1] and len(stored["bonds"]) == 8
    assert stored["source"].startswith("500 frames of") and stored["source"].endswith("ethanol_xtb_500K.extxyz")
    guard = StabilityGuard.from_model(imported, stored["numbers"])
    assert guard.note.startswith("bonds the model stores (500 frames of")
    # a reference with an element the model does not know is refused by name, nothing written
    nitrogen = tmp_path / "nh3.xyz"
    nitrogen.write_text("4\n\nN 0 0 0\nH 1.0 0 0\nH 0 1.0 0\nH 0 0 1.0\n")
    assert main(["import", "ani", str(source), "-o", str(tmp_path / "n.pt"), "--trust-pickle", "--species", "1,6,8",
                 "--reference", str(nitrogen)]) == 2
    assert "--reference" in capsys.readouterr().err and not (tmp_path / "n.pt").exists()


def test_review_cases_permuted_atoms_reuse_rewind_parameters_and_pickling(pretrained_model, ethanol, tmp_path):
    import pickle

    # the same elements in another order: the stored bonds would break at once, so the structure's are used
    order = [0, 1, 2, 8, 3, 4, 5, 6, 7]  # the hydroxyl H listed before the others
    permuted = ethanol.positions[0][order]
    guard = StabilityGuard.from_model(pretrained_model, ethanol.numbers[order], permuted)
    assert "does not have" in guard.note and "another order" in guard.note, guard.note
    assert guard.check(permuted) is None

    # one calculator with guard=True on two molecules: each gets its own guard
    calculator = StableCalculator(pretrained_model, guard=True)
    for atoms in (Atoms(numbers=ethanol.numbers, positions=ethanol.positions[0]),
                  Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [0, 0.96, 0]])):
        atoms.calc = calculator
        atoms.get_forces()

    # a rewind keeps the global parameters set since its checkpoint; it must be the last reporter
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.5 * unit.femtosecond)
    simulation = _pulled_simulation(pretrained_model, ethanol, integrator, pull_kj_per_mol_nm=0.0)
    reporter = StabilityReporter(pretrained_model, 10, action="rewind", maxRewinds=1, seed=0)
    simulation.reporters.append(reporter)
    simulation.step(20)
    simulation.context.setParameter("k", 5e4)
    with pytest.raises(InstabilityError, match="after 1 rewinds"):
        simulation.step(2000)
    assert simulation.context.getParameter("k") == 5e4 and reporter.rewinds == 1
    simulation.reporters.append(app.StateDataReporter(str(tmp_path / "state.csv"), 10, step=True))
    with pytest.raises(ValueError, match="must be the last of simulation.reporters"):
        simulation.step(10)
    # reused on another simulation, it starts afresh
    fresh = _pulled_simulation(pretrained_model, ethanol, openmm.LangevinMiddleIntegrator(
        300 * unit.kelvin, 1 / unit.picosecond, 0.5 * unit.femtosecond), pull_kj_per_mol_nm=0.0)
    fresh.reporters.append(reporter)
    fresh.step(30)
    assert reporter.rewinds == 0 and reporter.events == []

    # the error pickles whole (a guarded run in a process pool)
    again = pickle.loads(pickle.dumps(InstabilityError(guard.check(permuted + np.where(
        np.arange(9)[:, None] == 3, 3.0, 0.0)), 12, 0.006)))
    assert again.step == 12 and again.time_ps == 0.006 and again.atoms and "unstable at step 12" in str(again)

    # a model path with a typo is named when the reporter is made, not steps later
    with pytest.raises(FileNotFoundError):
        StabilityReporter(tmp_path / "typo.pt", 10)


def test_a_periodic_guard_measures_in_the_box_of_each_check():
    """Under a barostat the box changes: a bond across the boundary is measured in the box it has now."""
    cell = np.diag([10.0, 10.0, 10.0])
    positions = np.array([[9.7, 5.0, 5.0], [0.26, 5.0, 5.0], [9.7, 5.96, 5.0]])  # O at the face, H through it
    guard = StabilityGuard.from_structure([8, 1, 1], positions, cell)
    assert guard.check(positions) is None
    assert guard.check(positions, cell=cell) is None
    stretched = guard.check(positions, cell=np.diag([11.0, 10.0, 10.0]))  # the same coordinates, a longer box
    assert stretched is not None and stretched.atoms == (0, 1) and stretched.value == pytest.approx(1.0, abs=1e-6)
    # a molecule's guard has no box and takes none
    molecule = StabilityGuard.from_structure([8, 1, 1], positions - [9.0, 0, 0])
    assert molecule.check(positions - [9.0, 0, 0], cell=cell) is None and molecule.criterion.cell is None
