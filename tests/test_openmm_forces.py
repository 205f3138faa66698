"""The model inside OpenMM: units, batching over replicas, periodic boxes, export and serialization."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import openmm
import pytest
import torch

from openmm_bridge.export import export_for_openmm
from openmm_bridge.forces import ModelCallback, make_force
from openmm_bridge.serialization import check_python_forces, load_system, save_system
from small_models import SMALL_HYPERPARAMETERS, periodic_test_box
from stable_md.potentials import build_metadata, build_potential, energy_and_forces, load_model, save_model
from stable_md.units import EV_IN_KJ_PER_MOL, EV_PER_ANGSTROM_IN_KJ_PER_MOL_NM


def _context(callback: ModelCallback, positions_angstrom: np.ndarray, box_angstrom=None) -> openmm.Context:
    system = openmm.System()
    for _ in range(len(positions_angstrom)):
        system.addParticle(12.0)
    if box_angstrom is not None:
        system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row / 10.0) for row in box_angstrom))
    system.addForce(make_force(callback))
    context = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions_angstrom / 10.0)
    return context


def _openmm_energy_forces(context: openmm.Context) -> tuple[float, np.ndarray]:
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer)
    return energy, np.asarray(forces)


def _model_energy_forces(module, positions, numbers, cell=None):
    cell_tensor = None if cell is None else torch.as_tensor(cell)[None].expand(len(positions), 3, 3)
    energy, forces = energy_and_forces(module, torch.as_tensor(positions), torch.as_tensor(numbers), cell_tensor)
    return energy.detach().numpy(), forces.detach().numpy()


@pytest.fixture(scope="module")
def ethanol_model64(pretrained_model):
    return load_model(pretrained_model, dtype=torch.float64)


@pytest.mark.parametrize("n_replicas", [1, 4])
def test_openmm_sees_the_model_energy_and_forces_in_its_units(ethanol_model64, ethanol, n_replicas):
    frames = ethanol.positions[[0, 50, 100, 150][:n_replicas]]
    callback = ModelCallback(ethanol_model64, ethanol.numbers, n_replicas, remove_net_force=False)
    energy, forces = _openmm_energy_forces(_context(callback, frames.reshape(-1, 3)))
    model_energy, model_forces = _model_energy_forces(ethanol_model64.module, frames, ethanol.numbers)
    assert energy == pytest.approx(model_energy.sum() * EV_IN_KJ_PER_MOL, rel=1e-12)
    np.testing.assert_allclose(forces, model_forces.reshape(-1, 3) * EV_PER_ANGSTROM_IN_KJ_PER_MOL_NM,
                               rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(callback.energies_eV, model_energy, rtol=1e-12)
    # A copy's forces depend on that copy alone.
    assert np.abs(forces).max() > 10.0


def test_net_force_removal_changes_forces_by_round_off_only(pretrained_model, ethanol):
    float32 = load_model(pretrained_model)
    frames = ethanol.positions[[3, 7]]
    plain = ModelCallback(float32, ethanol.numbers, 2, remove_net_force=False).compute(frames.reshape(-1, 3) / 10)
    clean = ModelCallback(float32, ethanol.numbers, 2).compute(frames.reshape(-1, 3) / 10)
    assert clean[0] == plain[0]
    net = clean[1].reshape(2, -1, 3).sum(axis=1)
    np.testing.assert_allclose(net, 0.0, atol=1e-9)
    np.testing.assert_allclose(clean[1], plain[1], atol=1e-3 * np.abs(plain[1]).max())


@pytest.fixture(scope="module")
def box_model(tmp_path_factory):
    torch.manual_seed(1)
    potential, hyper = build_potential("schnet", [1, 6, 8], **SMALL_HYPERPARAMETERS["schnet"])
    path = tmp_path_factory.mktemp("box") / "box.pt"
    save_model(potential.double(), path, build_metadata(potential, hyper))
    return path


def test_periodic_box_vectors_reach_the_model(box_model):
    positions, numbers, edge = periodic_test_box()
    cell = np.eye(3) * edge
    model = load_model(box_model)
    # Two replicas: one wrapped into the box, one with atoms displaced by whole box vectors.
    shifted = positions + np.array([[edge, 0, 0], [0, -edge, 0], [0, 0, 2 * edge]] + [[0, 0, 0]] * 5)
    frames = np.stack([positions, shifted])
    callback = ModelCallback(model, numbers, 2, periodic=True, remove_net_force=False)
    energy, forces = _openmm_energy_forces(_context(callback, frames.reshape(-1, 3), cell))
    model_energy, model_forces = _model_energy_forces(model.module, positions[None], numbers, cell)
    np.testing.assert_allclose(callback.energies_eV, [model_energy[0]] * 2, rtol=1e-12)
    assert energy == pytest.approx(2 * model_energy[0] * EV_IN_KJ_PER_MOL, rel=1e-12)
    np.testing.assert_allclose(forces.reshape(2, -1, 3),
                               np.stack([model_forces[0]] * 2) * EV_PER_ANGSTROM_IN_KJ_PER_MOL_NM, atol=1e-8)
    # Without periodicity the same coordinates are a different (non-periodic) system.
    isolated = ModelCallback(model, numbers, 2, periodic=False).compute(frames.reshape(-1, 3) / 10)
    assert isolated[0] != pytest.approx(energy, rel=1e-6)


def test_export_in_openmm_units_matches_the_model(pretrained_model, ethanol, box_model, tmp_path):
    model = load_model(pretrained_model, dtype=torch.float64)
    frames = ethanol.positions[[0, 9, 21]]
    exported = export_for_openmm(model, ethanol.numbers, n_replicas=3, path=tmp_path / "omm.pt")
    reloaded = torch.jit.load(str(tmp_path / "omm.pt"))
    with_forces = export_for_openmm(model, ethanol.numbers, n_replicas=3, return_forces=True)
    model_energy, model_forces = _model_energy_forces(model.module, frames, ethanol.numbers)
    positions_nm = torch.as_tensor(frames.reshape(-1, 3) / 10.0)
    for module in (exported, reloaded):
        assert module(positions_nm).item() == pytest.approx(model_energy.sum() * EV_IN_KJ_PER_MOL, rel=1e-12)
    energy, forces = with_forces(positions_nm)
    assert energy.item() == pytest.approx(model_energy.sum() * EV_IN_KJ_PER_MOL, rel=1e-12)
    np.testing.assert_allclose(forces.numpy(), model_forces.reshape(-1, 3) * EV_PER_ANGSTROM_IN_KJ_PER_MOL_NM,
                               rtol=1e-9, atol=1e-9)
    with pytest.raises(FileExistsError):
        export_for_openmm(model, ethanol.numbers, path=tmp_path / "omm.pt")
    # Periodic: box vectors in nm are the second argument.
    positions, numbers, edge = periodic_test_box()
    box = load_model(box_model)
    periodic = export_for_openmm(box, numbers)
    expected, _ = _model_energy_forces(box.module, positions[None], numbers, np.eye(3) * edge)
    value = periodic(torch.as_tensor(positions / 10.0), torch.eye(3, dtype=torch.float64) * edge / 10.0)
    assert value.item() == pytest.approx(expected[0] * EV_IN_KJ_PER_MOL, rel=1e-12)
    with pytest.raises(ValueError, match="not among the model's species"):
        export_for_openmm(box, [1, 6, 16])


def test_system_with_model_force_round_trips_through_xml(pretrained_model, ethanol, tmp_path):
    frames = ethanol.positions[[0, 1]]
    callback = ModelCallback(pretrained_model, ethanol.numbers, 2)
    context = _context(callback, frames.reshape(-1, 3))
    energy, forces = _openmm_energy_forces(context)
    path = save_system(context.getSystem(), tmp_path / "system.xml")
    with pytest.raises(FileExistsError):
        save_system(context.getSystem(), path)
    system = load_system(path)
    restored = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName("Reference"))
    restored.setPositions(frames.reshape(-1, 3) / 10.0)
    energy2, forces2 = _openmm_energy_forces(restored)
    assert energy2 == energy
    np.testing.assert_array_equal(forces2, forces)


def test_in_memory_model_cannot_be_serialized_and_says_why(ethanol, tmp_path):
    potential, _ = build_potential("schnet", [1, 6, 8], **SMALL_HYPERPARAMETERS["schnet"])
    system = openmm.System()
    for _ in range(9):
        system.addParticle(1.0)
    callback = ModelCallback(potential, ethanol.numbers)
    system.addForce(make_force(callback))
    with pytest.raises(ValueError, match="build it from a saved model file"):
        save_system(system, tmp_path / "system.xml")
    assert not (tmp_path / "system.xml").exists()
    with pytest.raises(pickle.PicklingError, match="never saved to a file"):
        pickle.dumps(callback)


def test_unloadable_python_force_raises_instead_of_crashing(pretrained_model, ethanol, tmp_path):
    copy = tmp_path / "model.pt"
    copy.write_bytes(pretrained_model.read_bytes())
    system = openmm.System()
    for _ in range(9):
        system.addParticle(1.0)
    system.addForce(make_force(ModelCallback(copy, ethanol.numbers)))
    xml = openmm.XmlSerializer.serialize(system)
    assert check_python_forces(xml) == 1
    copy.unlink()
    (tmp_path / "gone.xml").write_text(xml)
    with pytest.raises(ValueError, match="model file .* does not exist"):
        load_system(tmp_path / "gone.xml")
    # A force whose module is missing: OpenMM alone would take the interpreter down.
    payload = xml.split('function="')[1].split('"')[0]
    foreign = bytes.fromhex(payload).replace(b"openmm_bridge.forces", b"nosuch_module.forces").hex()
    (tmp_path / "foreign.xml").write_text(xml.replace(payload, foreign))
    with pytest.raises(ValueError, match="nosuch_module"):
        load_system(tmp_path / "foreign.xml")
    # Proof that the check matters: a subprocess doing the plain OpenMM load does not survive it.
    script = (f"import openmm; openmm.XmlSerializer.deserialize(open({str(tmp_path / 'foreign.xml')!r}).read());"
              "print('survived')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "survived" not in result.stdout


class _Steeper(torch.nn.Module):
    """A real model made steeper: its energies (and so forces) scaled by ``factor``."""

    def __init__(self, module: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.module, self.factor = module, factor

    def forward(self, positions, numbers, cell=None):
        energy, atomic = self.module(positions, numbers, cell)
        return energy * self.factor, atomic * self.factor


def test_a_failing_model_stops_the_users_simulation_instead_of_integrating_on_zero_forces(ethanol_model64, ethanol):
    """Issue 12 row 3: in a user's own System the force raises, naming the replica and atom; only the replica
    engine's 'freeze' mode gives an exploding replica zero forces (and flags it)."""
    from openmm_bridge.forces import MAX_FORCE_EV_PER_A, ModelFailure

    frames = ethanol.positions[[0, 1]]
    steep = _Steeper(ethanol_model64.module, 1e6)
    _, forces = _model_energy_forces(steep, frames, ethanol.numbers)
    worst = np.linalg.norm(forces[1], axis=1)
    assert worst.max() > MAX_FORCE_EV_PER_A  # the premise: replica 1 is beyond what a step can integrate
    callback = ModelCallback(steep, ethanol.numbers, 2)
    context = _context(callback, frames.reshape(-1, 3))
    with pytest.raises(openmm.OpenMMException):
        context.getState(getForces=True)
    assert isinstance(callback.last_error, ModelFailure)
    assert "replica 0" in str(callback.last_error) and "eV/Å" in str(callback.last_error)
    with pytest.raises(ModelFailure, match=rf"force on atom {int(np.argmax(np.linalg.norm(forces[0], axis=1)))} is"):
        callback.compute(frames.reshape(-1, 3) / 10.0)
    # non-finite positions are named by atom before the model runs
    broken = frames.copy()
    broken[1, 4] = np.nan
    with pytest.raises(ModelFailure, match=r"replica 1: non-finite positions .* atom\(s\) \[4\]"):
        ModelCallback(ethanol_model64, ethanol.numbers, 2).compute(broken.reshape(-1, 3) / 10.0)
    # the engine's mode: zero forces for the flagged replica, the other evaluated as before
    frozen = ModelCallback(ethanol_model64, ethanol.numbers, 2, on_failure="freeze", remove_net_force=False)
    energy, out = frozen.compute(broken.reshape(-1, 3) / 10.0)
    assert frozen.nonfinite.tolist() == [False, True]
    assert np.all(out.reshape(2, -1, 3)[1] == 0) and np.isfinite(energy)
    with pytest.raises(ValueError, match="on_failure must be one of"):
        ModelCallback(ethanol_model64, ethanol.numbers, on_failure="ignore")


def test_load_system_runs_no_foreign_pickle_without_trust(pretrained_model, ethanol, tmp_path):
    """Issue 12 row 14: a crafted PythonForce pickle is refused, naming what it would run, unless trust_pickle."""
    system = openmm.System()
    for _ in range(9):
        system.addParticle(1.0)
    system.addForce(make_force(ModelCallback(pretrained_model, ethanol.numbers)))
    own = save_system(system, tmp_path / "own.xml")
    assert load_system(own).getNumForces() == 1  # stable-md's own force needs no flag
    xml = own.read_text()
    payload = xml.split('function="')[1].split('"')[0]
    marker = tmp_path / "ran"
    crafted = pickle.dumps(_RunsShellCommand(f"touch {marker}"), protocol=4)
    text = xml.replace(payload, crafted.hex())
    (tmp_path / "crafted.xml").write_text(text)
    with pytest.raises(ValueError, match=r"crafted.xml: PythonForce 1 is not a stable-md force.*system.*trust_pickle"):
        load_system(tmp_path / "crafted.xml")
    assert not marker.exists()
    # The proof that the refusal matters: trusted, the same bytes run their command.
    check_python_forces(text, trust_pickle=True)
    assert marker.exists()


class _RunsShellCommand:
    """Pickles as a call of os.system: what a crafted System file could hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_a_system_with_more_particles_is_refused_by_name_not_by_a_crash(pretrained_model, ethanol):
    """The docs' recipe in a System with two more (MM) particles used to abort the interpreter ("double free or
    corruption": the fast position reader wrote 11 positions into a buffer for 9). Now OpenMM stops with our
    message, and setParticles applies the force to the model's atoms among the others."""
    script = f"""
import numpy as np, openmm
from openmm_bridge.forces import ModelCallback, make_force
system = openmm.System()
for mass in [12, 12, 16, 1, 1, 1, 1, 1, 1, 40, 40]:
    system.addParticle(mass)
force = make_force(ModelCallback({str(pretrained_model)!r}, {ethanol.numbers.tolist()}))
system.addForce(force)
positions = np.vstack([np.array({(ethanol.positions[0] * 0.1).tolist()}), [[1.0, 1, 1], [1.5, 1, 1]]])
context = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName("Reference"))
context.setPositions(positions)
try:
    context.getState(getEnergy=True)
except openmm.OpenMMException as error:
    print("refused:", error)
force.setParticles(list(range(9)))
context.reinitialize(preserveState=True)
print("energy:", context.getState(getEnergy=True).getPotentialEnergy()._value)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert ("refused: this force computes 9 particles (1 x 9 atoms) but OpenMM passed it 11: in a System with "
            "other particles, apply it to the model's atoms with force.setParticles(indices)") in result.stdout
    energy = float(result.stdout.split("energy:")[1])
    module = load_model(pretrained_model).module
    expected, _ = _model_energy_forces(module, ethanol.positions[:1].astype(np.float32), ethanol.numbers)
    assert energy == pytest.approx(float(expected[0]) * EV_IN_KJ_PER_MOL, rel=1e-5)
