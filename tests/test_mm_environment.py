"""Mixed ML/MM in stable-md's own engine (issue 14, item 3): replicas of ethanol in TIP3P water, the model on
the ethanol and the MM force field on the rest, with OpenMM-ML's Hamiltonian; simulate and refine take it from
the command line (--structure, --mm-system, --model-atoms); bad input is named."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

openmm = pytest.importorskip("openmm")
pytest.importorskip("openmmml")
import openmm.app as app  # noqa: E402
import openmm.unit as unit  # noqa: E402
from openmmml import MLPotential  # noqa: E402

from openmm_bridge.mm_environment import MMEnvironment, degrees_of_freedom, select_atoms  # noqa: E402
from openmm_bridge.replicas import ReplicaSet  # noqa: E402
from openmm_bridge.serialization import load_system  # noqa: E402
from openmm_bridge.topology import molecule_topology  # noqa: E402
from stable_md.cli import main  # noqa: E402
from stable_md.stability import detect_bonds  # noqa: E402
from stable_md.units import EV_IN_KJ_PER_MOL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_ETHANOL = 9


def _solvated_ethanol(ethanol, water: str):
    """Modeller of ethanol (frame 0, residue ETH) in ``water`` (tip3p, tip4pew; 0.8 nm padding) and its MM System
    (ethanol_mm.xml, PME with a 0.7 nm cutoff, rigid water, X-H constraints)."""
    bonds = detect_bonds(ethanol.numbers, ethanol.positions[:50], None)
    forcefield = app.ForceField(str(REPO / "data" / "ethanol_mm.xml"), f"{water}.xml")
    modeller = app.Modeller(molecule_topology(ethanol.numbers, bonds.pairs, residue="ETH"),
                            ethanol.positions[0] * 0.1 * unit.nanometer)
    modeller.addSolvent(forcefield, model=water, padding=0.8 * unit.nanometer)
    return modeller, forcefield.createSystem(modeller.topology, nonbondedMethod=app.PME,
                                             nonbondedCutoff=0.7 * unit.nanometer, constraints=app.HBonds)


def _minimized(modeller, system, iterations: int):
    """The Modeller's positions after OpenMM's energy minimization in ``system`` (nm, a Quantity array)."""
    simulation = app.Simulation(modeller.topology, system, openmm.VerletIntegrator(0.0005),
                                openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"})
    simulation.context.setPositions(modeller.positions)
    simulation.minimizeEnergy(maxIterations=iterations)
    return simulation.context.getState(getPositions=True).getPositions(asNumpy=True)


@pytest.fixture(scope="module")
def solvated_files(tmp_path_factory, pretrained_model, ethanol):
    """What a user brings: an equilibrated PDB of ethanol (residue ETH) in TIP3P water and the MM System XML of
    every particle (ethanol_mm.xml + tip3p.xml, PME, rigid water, X-H constraints), minimized in OpenMM with
    OpenMM-ML's mixed System of the model."""
    folder = tmp_path_factory.mktemp("solvated")
    modeller, mm_system = _solvated_ethanol(ethanol, "tip3p")
    mixed = MLPotential("stable-md", modelPath=str(pretrained_model)).createMixedSystem(
        modeller.topology, mm_system, list(range(N_ETHANOL)))
    positions = _minimized(modeller, mixed, 300)
    with open(folder / "solvated.pdb", "w") as handle:
        app.PDBFile.writeFile(modeller.topology, positions, handle, keepIds=True)
    (folder / "system.xml").write_text(openmm.XmlSerializer.serialize(mm_system))
    return folder / "solvated.pdb", folder / "system.xml"


@pytest.fixture(scope="module")
def environment(solvated_files):
    return MMEnvironment.from_files(*solvated_files, "resname:ETH")


def _replicas(model, environment, n_replicas=2, **options):
    options = {"integrator": "nose-hoover", "temperature": 300.0, "mode": "per-replica", **options}
    return ReplicaSet(model, environment.numbers, environment.positions, n_replicas=n_replicas,
                      environment=environment, **options)


def test_the_environment_reads_the_users_files(environment, ethanol):
    assert environment.model_atoms.tolist() == list(range(N_ETHANOL))
    assert environment.numbers.tolist() == ethanol.numbers.tolist()
    n_waters = (environment.n_particles - N_ETHANOL) // 3
    assert environment.n_particles == N_ETHANOL + 3 * n_waters and n_waters > 50
    assert environment.box is not None and environment.box[0, 0] > 10.0
    assert environment.record()["structure_sha256"] and environment.record()["system_sha256"]
    assert select_atoms(environment.topology, "0-2,5") == [0, 1, 2, 5]


def test_replica_energies_are_openmm_mls_mixed_system(pretrained_model, environment, solvated_files):
    """The same Hamiltonian as a production MLPotential('stable-md').createMixedSystem run of the same files."""
    replicas = _replicas(str(pretrained_model), environment)
    mm_system = load_system(solvated_files[1])
    mixed = MLPotential("stable-md", modelPath=str(pretrained_model)).createMixedSystem(
        environment.topology, mm_system, list(range(N_ETHANOL)))
    context = openmm.Context(mixed, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName("CPU"),
                             {"Threads": "1"})
    context.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in environment.box / 10.0])
    context.setPositions(environment.positions / 10.0)
    context.applyConstraints(1e-5)  # as the replicas' start is (a PDB's 3 decimals leave waters off their shape)
    expected = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    np.testing.assert_allclose(replicas.potential_energies(), expected / EV_IN_KJ_PER_MOL, atol=2e-4)
    frames = replicas.frames()
    assert frames.positions.shape == (2, N_ETHANOL, 3)
    assert frames.system_positions.shape == (2, environment.n_particles, 3)
    np.testing.assert_allclose(frames.positions[0], environment.positions[:N_ETHANOL], atol=2e-3)
    np.testing.assert_allclose(frames.potential_energy, expected / EV_IN_KJ_PER_MOL, atol=2e-4)


def test_the_temperature_counts_openmms_degrees_of_freedom(pretrained_model, environment):
    """Rigid waters and a CMMotionRemover: 3 per atom, less 3 per water, less 3; ethanol's X-H constraints are
    gone (OpenMM-ML removes constraints among the model's atoms)."""
    replicas = _replicas(str(pretrained_model), environment)
    n_waters = (environment.n_particles - N_ETHANOL) // 3
    template = environment.template(replicas.model)
    assert degrees_of_freedom(template) == 3 * environment.n_particles - 3 * n_waters - 3
    # velocities are put on the constraints when written: the start is near the target, not 3P/DOF times it
    assert np.all(np.abs(replicas.frames().temperature - 300.0) < 60.0)


def test_a_picosecond_in_water_keeps_ethanol_whole_at_its_temperature(pretrained_model, environment, ethanol):
    replicas = _replicas(str(pretrained_model), environment, seed=3)
    temperatures = []
    for _ in range(20):
        replicas.run(100)
        temperatures.append(replicas.frames().temperature)
    assert not replicas.unstable.any(), replicas.reasons
    final = replicas.frames().positions
    bonds = detect_bonds(ethanol.numbers, ethanol.positions[:50], None)
    lengths = np.linalg.norm(final[:, bonds.pairs[:, 0]] - final[:, bonds.pairs[:, 1]], axis=-1)
    assert np.abs(lengths - bonds.reference_lengths).max() < 0.35
    # ~720 degrees of freedom: one frame fluctuates by ~16 K; measured over seeds 1-4 (unminimized box, demo
    # model), half-picosecond means lay within 16 K of the target, so 30 K is the margin
    mean = np.mean(temperatures[10:], axis=0)
    assert np.all(np.abs(mean - 300.0) < 30.0), mean
    # the water moved too: the MM part is integrated, not held
    moved = np.abs(replicas.positions()[:, N_ETHANOL:] - environment.positions[N_ETHANOL:]).max()
    assert moved > 0.5


def test_rewind_with_surroundings_restores_the_state_exactly(pretrained_model, environment):
    """The state comes back bit for bit; the run that follows agrees to rounding only, because OpenMM's CPU
    platform rebuilds its MM neighbour list on loading a checkpoint (the sums run in another order)."""
    replicas = _replicas(str(pretrained_model), environment, integrator="langevin", seed=5)
    replicas.run(40)
    snapshot = replicas.snapshot()
    replicas.run(60)
    first = replicas.positions()
    replicas.restore(snapshot)
    np.testing.assert_array_equal(replicas.positions(), snapshot.positions)
    np.testing.assert_array_equal(replicas.velocities(), snapshot.velocities)
    replicas.run(60)
    np.testing.assert_allclose(replicas.positions(), first, atol=1e-4)


def test_a_replica_blown_up_by_the_mm_part_is_retired_and_the_others_go_on(pretrained_model, environment):
    starts = np.repeat(environment.positions[None], 3, axis=0)
    starts[1, N_ETHANOL] = starts[1, 2] + [0.3, 0.0, 0.0]  # a water oxygen 0.3 Å from ethanol's oxygen
    replicas = ReplicaSet(str(pretrained_model), environment.numbers, starts, environment=environment,
                          mode="per-replica", integrator="langevin", temperature=300, check_interval=10)
    replicas.run(100)
    assert replicas.unstable.tolist() == [False, True, False]
    assert "NaN" in replicas.reasons[1]
    assert np.isfinite(replicas.positions()).all()
    assert replicas.step == 100 and not replicas.frozen[[0, 2]].any()


def test_bad_surroundings_are_named(pretrained_model, environment, solvated_files, tmp_path):
    structure, system = solvated_files
    model = str(pretrained_model)
    with pytest.raises(ValueError, match="one Context per replica"):
        _replicas(model, environment, mode="batched")
    with pytest.raises(ValueError, match="TorchForce"):
        _replicas(model, environment, backend="torch")
    with pytest.raises(ValueError, match="are atomic numbers"):
        ReplicaSet(model, environment.numbers[::-1], environment.positions, environment=environment,
                   mode="per-replica")
    with pytest.raises(ValueError, match=r"P = \d+, every particle"):
        ReplicaSet(model, environment.numbers, environment.positions[:N_ETHANOL], environment=environment,
                   mode="per-replica")
    with pytest.raises(ValueError, match="is bonded to atom .* outside the selection"):
        MMEnvironment.from_files(structure, system, "0-4")
    with pytest.raises(ValueError, match="no residue is named 'LIG'.*ETH"):
        MMEnvironment.from_files(structure, system, "resname:LIG")
    with pytest.raises(ValueError, match="'0-x' is not an index or range"):
        MMEnvironment.from_files(structure, system, "0-x")
    with pytest.raises(ValueError, match="model atom indices must lie in"):
        MMEnvironment.from_files(structure, system, f"0-8,{environment.n_particles}")
    xyz = tmp_path / "ethanol.xyz"
    xyz.write_text("1\n\nO 0 0 0\n")
    with pytest.raises(ValueError, match="must be a PDB or PDBx/mmCIF file"):
        MMEnvironment.from_files(xyz, system, "resname:ETH")
    barostat = load_system(system)
    barostat.addForce(openmm.MonteCarloBarostat(1.0, 300.0))
    (tmp_path / "npt.xml").write_text(openmm.XmlSerializer.serialize(barostat))
    with pytest.raises(ValueError, match="MonteCarloBarostat, a barostat: replicas run at constant volume"):
        MMEnvironment.from_files(structure, tmp_path / "npt.xml", "resname:ETH")
    smaller = openmm.System()
    smaller.addParticle(1.0)
    (tmp_path / "one.xml").write_text(openmm.XmlSerializer.serialize(smaller))
    with pytest.raises(ValueError, match=r"the structure has \d+ atoms but the MM System 1 particles"):
        MMEnvironment.from_files(structure, tmp_path / "one.xml", "resname:ETH")


def test_simulate_in_water_from_the_command_line(pretrained_model, solvated_files, environment, tmp_path,
                                                 capsys):
    """Relative paths from the user's own directory; trajectories and topology of every particle; a resume."""
    structure, system = solvated_files
    work = tmp_path / "work"
    work.mkdir()
    for source in (structure, system, pretrained_model):
        (work / source.name).write_bytes(source.read_bytes())
    command = ["simulate", pretrained_model.name, "--structure", structure.name, "--mm-system", system.name,
               "--model-atoms", "resname:ETH", "--replicas", "2", "--time", "50fs", "--check-every", "20",
               "--temperature", "300", "-o", "run", "--no-progress"]
    old = Path.cwd()
    os.chdir(work)
    try:
        assert main(command) == 0
        assert "per-replica on CPU" in capsys.readouterr().out
        summary = json.loads(Path("run/summary.json").read_text())
        assert summary["n_unstable"] == 0 and summary["completed"]
        assert summary["settings"]["environment"]["model_atoms"] == list(range(N_ETHANOL))
        assert summary["settings"]["mode"] == "per-replica"
        topology = app.PDBFile("run/topology.pdb").topology
        assert topology.getNumAtoms() == environment.n_particles
        assert [r.name for r in topology.residues()][:2] == ["ETH", "HOH"]
        header = Path("run/replica_000.dcd").read_bytes()
        comments = int.from_bytes(header[92:96], "little")
        assert int.from_bytes(header[104 + comments:108 + comments], "little") == environment.n_particles
        rows = Path("run/state.csv").read_text().splitlines()
        assert len(rows) == 1 + 2 * 6  # steps 0, 20, ..., 100 of 2 replicas
        assert main([("60fs" if part == "50fs" else part) for part in command] + ["--resume"]) == 0
        assert json.loads(Path("run/summary.json").read_text())["steps"] == 120
        capsys.readouterr()
        assert main([*command[:6], "--replicas", "2", "-o", "bad", "--time", "10fs"]) == 2
        assert "need --structure, --mm-system and --model-atoms together; missing --model-atoms" in \
            capsys.readouterr().err
    finally:
        os.chdir(old)


def test_refine_in_water_learns_from_the_molecules_frames(pretrained_model, ethanol_path, environment, tmp_path):
    """A learning epoch in MM surroundings: replicas rewound to their full state (water included), samples of
    the ethanol alone, the estimator's gradient and the energy/force term move the model."""
    import torch

    from stable_md.refinement import RefineSettings, _Refinement
    from openmm_bridge.md_settings import MDSettings

    settings = RefineSettings(n_replicas=2, steps_per_epoch=60, sample_every=10, check_every=30, max_epochs=1,
                              md=MDSettings(mode="per-replica", temperature=300.0))
    directory = tmp_path / "run"
    directory.mkdir()
    run = _Refinement(pretrained_model, ethanol_path, tmp_path / "out.pt", directory, settings, resume=False,
                      progress=False, environment=environment)
    assert run.starts.shape == (2, environment.n_particles, 3)
    before = [p.detach().clone() for p in run.model.parameters()]
    run.replicas.run(30)
    # the rewind is of every particle, exactly: the water goes back with the ethanol (a state read from replicas
    # is on its constraints and is written as it is)
    run.replicas.reset(run.rewind_positions, run.rewind_velocities)
    np.testing.assert_array_equal(run.replicas.positions(), run.rewind_positions)
    np.testing.assert_array_equal(run.replicas.velocities(), run.rewind_velocities)
    row = run._learning_epoch()
    assert row["samples"] == 2 * 6 and np.isfinite(row["observable_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, run.model.parameters()))
    assert run.replicas.step == 30 + 60


def test_refine_in_water_from_the_command_line(pretrained_model, ethanol_path, solvated_files, tmp_path, capsys):
    structure, system = solvated_files
    output = tmp_path / "water.stable.pt"
    command = ["refine", str(pretrained_model), "--data", str(ethanol_path), "--structure", str(structure),
               "--mm-system", str(system), "--model-atoms", "0-8", "-o", str(output), "--replicas", "2",
               "--steps-per-epoch", "40", "--sample-every", "10", "--check-every", "20", "--max-sim-time", "40fs",
               "--temperature", "300", "--no-progress"]
    assert main(command) == 0
    assert "the model computes atoms 0-8 of" in capsys.readouterr().out
    from stable_md.potentials.model_file import read_metadata

    entry = read_metadata(output)["history"][-1]
    assert entry["stage"] == "refine" and entry["environment"]["model_atoms"] == list(range(N_ETHANOL))
    settings = json.loads((tmp_path / "water.stable.refine" / "settings.json").read_text())["settings"]
    assert settings["mode"] == "per-replica" and settings["environment"]["particles"] > 100
    # resuming with other surroundings (another System file's contents) is refused, naming them
    edited = tmp_path / "edited.xml"
    edited.write_text(system.read_text() + "\n")
    other = [str(edited) if part == str(system) else part for part in command]
    capsys.readouterr()
    assert main(other + ["--resume"]) == 2
    assert "environment (the MM surroundings" in capsys.readouterr().err
    assert main([*command[:4], "--structure", str(structure), "-o", str(tmp_path / "x.pt")]) == 2
    assert "--structure is for MM surroundings" in capsys.readouterr().err


def test_writing_one_replica_leaves_the_others_exactly_as_they_were(pretrained_model, environment):
    replicas = _replicas(str(pretrained_model), environment, n_replicas=3, integrator="langevin", seed=2)
    replicas.run(20)
    positions, velocities = replicas.positions(), replicas.velocities()
    replicas.randomize_velocities(replicas=[1])
    replicas.freeze([2])
    after_positions, after_velocities = replicas.positions(), replicas.velocities()
    np.testing.assert_array_equal(after_positions[0], positions[0])
    np.testing.assert_array_equal(after_velocities[0], velocities[0])
    assert not np.array_equal(after_velocities[1], velocities[1])
    # the drawn velocities were put on the rigid waters' constraints: no velocity along an O-H bond
    oxygen = N_ETHANOL
    bond = after_positions[1, oxygen + 1] - after_positions[1, oxygen]
    relative = after_velocities[1, oxygen + 1] - after_velocities[1, oxygen]
    assert abs(relative @ bond) / np.linalg.norm(bond) < 1e-4


def test_the_energy_of_a_frame_is_that_of_its_moment(pretrained_model, environment):
    """A replica a reporter marks unstable after the frame was taken keeps its energy in that frame."""
    replicas = _replicas(str(pretrained_model), environment)
    frames = replicas.frames()
    replicas.mark_unstable([0], ["judged"])
    assert np.isfinite(frames.potential_energy).all()
    assert np.isnan(replicas.potential_energies()[0])


def test_a_solute_wrapped_through_the_box_face_is_made_whole(pretrained_model, environment, solvated_files,
                                                            tmp_path):
    structure, system = solvated_files
    pdb = app.PDBFile(str(structure))
    positions = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.angstrom))
    box = environment.box
    wrapped = positions.copy()
    wrapped[4] += box[0]  # one hydrogen of the ethanol one box length away: the same periodic system
    with open(tmp_path / "wrapped.pdb", "w") as handle:
        app.PDBFile.writeFile(pdb.topology, wrapped * 0.1 * unit.nanometer, handle)
    moved = MMEnvironment.from_files(tmp_path / "wrapped.pdb", system, "resname:ETH")
    np.testing.assert_allclose(moved.positions[:N_ETHANOL], environment.positions[:N_ETHANOL], atol=2e-3)
    replicas = _replicas(str(pretrained_model), moved)
    np.testing.assert_allclose(replicas.potential_energies(), _replicas(str(pretrained_model), environment)
                               .potential_energies(), atol=1e-3)


def test_a_pdb_without_conect_records_still_needs_whole_molecules(environment, solvated_files, tmp_path):
    structure, system = solvated_files
    stripped = tmp_path / "noconect.pdb"
    stripped.write_text("".join(line for line in structure.read_text().splitlines(keepends=True)
                                if not line.startswith("CONECT")))
    assert app.PDBFile(str(stripped)).topology.getNumBonds() < environment.topology.getNumBonds()
    with pytest.raises(ValueError, match="is bonded to atom .* outside the selection"):
        MMEnvironment.from_files(stripped, system, "0-4")


def test_a_water_model_with_virtual_sites_runs(pretrained_model, ethanol, tmp_path):
    """TIP4P-Ew: massless M sites, which OpenMM-ML reads an element of; the temperature counts massive atoms."""
    modeller, mm_system = _solvated_ethanol(ethanol, "tip4pew")
    # Modeller's waters are placed, not relaxed
    positions = np.asarray(_minimized(modeller, mm_system, 200).value_in_unit(unit.angstrom))
    environment = MMEnvironment(modeller.topology, mm_system, range(N_ETHANOL), positions)
    sites = [i for i in range(mm_system.getNumParticles()) if mm_system.isVirtualSite(i)]
    n_waters = len(sites)
    assert n_waters > 50
    replicas = _replicas(str(pretrained_model), environment, integrator="langevin", n_replicas=4)
    assert degrees_of_freedom(environment.template(replicas.model)) == 3 * (N_ETHANOL + 3 * n_waters) \
        - 3 * n_waters - 3
    # drawn at 300 K and put on the constraints: ~700 degrees of freedom fluctuate by ~16 K (the sites' would
    # have counted for a third more)
    assert np.all(np.abs(replicas.frames().temperature - 300.0) < 60.0), replicas.frames().temperature
    replicas.run(100)
    assert not replicas.unstable.any(), replicas.reasons


def test_a_non_periodic_system_ignores_the_files_placeholder_box(pretrained_model, environment, solvated_files,
                                                                 tmp_path):
    """A vacuum cluster (NoCutoff) whose PDB still has a CRYST1 line: no box for the model or the replicas."""
    forcefield = app.ForceField(str(REPO / "data" / "ethanol_mm.xml"), "tip3p.xml")
    cluster = forcefield.createSystem(environment.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    (tmp_path / "cluster.xml").write_text(openmm.XmlSerializer.serialize(cluster))
    placeholder = tmp_path / "cluster.pdb"
    text = solvated_files[0].read_text()
    placeholder.write_text("CRYST1    1.000    1.000    1.000  90.00  90.00  90.00 P 1           1\n"
                           + "".join(line for line in text.splitlines(keepends=True) if not line.startswith("CRYST1")))
    vacuum = MMEnvironment.from_files(placeholder, tmp_path / "cluster.xml", "resname:ETH")
    assert vacuum.box is None
    replicas = _replicas(str(pretrained_model), vacuum, integrator="langevin")
    assert replicas.cell is None
    replicas.run(40)
    assert not replicas.unstable.any() and np.isfinite(replicas.potential_energies()).all()
