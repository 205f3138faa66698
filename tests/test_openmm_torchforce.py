"""The TorchForce backend against the PythonForce backend, in real OpenMM.

Both forces evaluate the same float32 model on the same positions, so they must agree
to float32 round-off. These tests need ``openmmtorch`` (its PyPI build links a CUDA
build of torch 2.9, see ``make test-openmmtorch``); where it does not import they skip.

Tolerances: the model computes in float32 (unit round-off 6e-8). The two paths differ
only in where rounding happens: the exported module casts nm to float32 and then scales
to Å (PythonForce scales in float64 and then casts), and the two run separate autograd
passes. That moves inputs by up to one ulp and results by a few 1e-7 relative after the
sums over atoms and neighbours. rtol = 1e-5 leaves a 10x margin and still catches any
unit error (factor 10 or 96.485) or replica mix-up, which are O(1) changes. Force
components near zero get an absolute floor of 1e-5 of the largest force component.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

# torch before openmm: `import openmm` loads the TorchForce plugin (libOpenMMTorchReference.so), which
# finds libnvrtc.so.12 only once torch has loaded its CUDA libraries (see test_import_order_openmm_first).
torch = pytest.importorskip("torch")
openmm = pytest.importorskip("openmm")
from openmm_bridge.forces import torch_force_available  # noqa: E402

if not torch_force_available():
    pytest.skip("openmmtorch does not import with this torch (run `make test-openmmtorch`)",
                allow_module_level=True)

import openmmtorch  # noqa: E402
from small_models import SMALL_HYPERPARAMETERS, periodic_test_box  # noqa: E402

from openmm_bridge.engines import make_platform  # noqa: E402
from openmm_bridge.forces import ModelCallback, make_force  # noqa: E402
from openmm_bridge.replicas import ReplicaSet  # noqa: E402
from stable_md.potentials import build_metadata, build_potential, load_model, save_model  # noqa: E402
from stable_md.units import EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM  # noqa: E402

RTOL = 1e-5
FORCE_FLOOR = 1e-5  # times the largest |force component|
ETHANOL_FRAMES = [0, 120, 240, 360]


def _platforms() -> list[str]:
    names = {openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())}
    return [name for name in ("Reference", "CPU") if name in names]


PLATFORMS = _platforms()


def _save(tmp_path_factory, name: str, species, **hyper) -> str:
    torch.manual_seed(0)
    potential, hyperparameters = build_potential("schnet", species, **hyper)
    path = tmp_path_factory.mktemp(name) / f"{name}.pt"
    save_model(potential, path, build_metadata(potential, hyperparameters))
    return str(path)


@pytest.fixture(scope="module")
def ethanol_model(tmp_path_factory) -> str:
    return _save(tmp_path_factory, "ethanol_schnet", [1, 6, 8], hidden_channels=16, num_filters=16,
                 num_interactions=2, num_gaussians=8)


@pytest.fixture(scope="module")
def box_model(tmp_path_factory) -> str:
    # Species of periodic_test_box (H, C, O) and the 3 Å cutoff that fits its 6.5 Å box.
    return _save(tmp_path_factory, "box_schnet", [1, 6, 8], **SMALL_HYPERPARAMETERS["schnet"])


def _evaluate(force: openmm.Force, n_particles: int, positions_nm: np.ndarray, platform: str,
              box_nm: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Energy (kJ/mol) and forces [M, 3] (kJ/mol/nm) of ``force`` alone in a fresh Context."""
    system = openmm.System()
    for _ in range(n_particles):
        system.addParticle(12.0)
    if box_nm is not None:
        system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in box_nm))
    system.addForce(force)
    platform_object, properties = make_platform(platform)
    context = openmm.Context(system, openmm.VerletIntegrator(0.0005), platform_object, properties)
    if box_nm is not None:
        context.setPeriodicBoxVectors(*(openmm.Vec3(*row) for row in box_nm))
    context.setPositions(positions_nm.reshape(-1, 3))
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
    forces = np.asarray(state.getForces(asNumpy=True).value_in_unit(
        openmm.unit.kilojoule_per_mole / openmm.unit.nanometer))
    return float(energy), forces


def _both(model_path: str, numbers, positions_angstrom: np.ndarray, platform: str,
          box_angstrom: np.ndarray | None = None):
    """(TorchForce, PythonForce) results for replicas ``positions_angstrom`` [R, N, 3]."""
    n_replicas = len(positions_angstrom)
    periodic = box_angstrom is not None
    box_nm = None if box_angstrom is None else box_angstrom / NM_IN_ANGSTROM
    positions_nm = positions_angstrom / NM_IN_ANGSTROM
    results = []
    for backend in ("torch", "python"):
        # Net-force removal off: compare the model's own forces on both paths.
        callback = ModelCallback(model_path, numbers, n_replicas, periodic=periodic, remove_net_force=False)
        force = make_force(callback, backend)
        if backend == "torch":
            assert isinstance(force, openmmtorch.TorchForce)
            assert force.getOutputsForces() and force.usesPeriodicBoundaryConditions() == periodic
        else:
            assert isinstance(force, openmm.PythonForce)
        results.append(_evaluate(force, n_replicas * len(numbers), positions_nm, platform, box_nm))
    return results


def _assert_same(actual, expected):
    (energy_a, forces_a), (energy_e, forces_e) = actual, expected
    assert np.isfinite(energy_a) and np.isfinite(forces_a).all()
    assert np.abs(forces_e).max() > 1.0, "test model gives vanishing forces; the comparison would be empty"
    np.testing.assert_allclose(energy_a, energy_e, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(forces_a, forces_e, rtol=RTOL, atol=FORCE_FLOOR * np.abs(forces_e).max())


def _direct_energy_kj(model_path: str, numbers, positions_angstrom: np.ndarray, cell=None) -> np.ndarray:
    """Per-replica energies (kJ/mol) from the model itself, outside OpenMM."""
    module = load_model(model_path).module
    cell_t = None if cell is None else torch.as_tensor(cell, dtype=torch.float32)
    with torch.no_grad():
        energy, _ = module(torch.as_tensor(positions_angstrom, dtype=torch.float32),
                           torch.as_tensor(list(numbers)), cell_t)
    return energy.double().numpy() * EV_IN_KJ_PER_MOL


# -- (a) ethanol, 1 and 4 replicas ------------------------------------------------------------------
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("n_replicas", [1, 4])
def test_ethanol_torchforce_matches_pythonforce(ethanol_model, ethanol, platform, n_replicas):
    positions = ethanol.positions[ETHANOL_FRAMES[:n_replicas]]
    torch_result, python_result = _both(ethanol_model, ethanol.numbers.tolist(), positions, platform)
    _assert_same(torch_result, python_result)
    # Both agree with the model evaluated directly (units: eV -> kJ/mol).
    direct = _direct_energy_kj(ethanol_model, ethanol.numbers.tolist(), positions)
    np.testing.assert_allclose(torch_result[0], direct.sum(), rtol=RTOL)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_ethanol_replica_layout(ethanol_model, ethanol, platform):
    """Replica r of the 4-replica TorchForce is the 1-replica TorchForce of frame r (particle r*N + i)."""
    numbers = ethanol.numbers.tolist()
    positions = ethanol.positions[ETHANOL_FRAMES]
    batched, _ = _both(ethanol_model, numbers, positions, platform)
    singles = [_both(ethanol_model, numbers, frame[None], platform)[0] for frame in positions]
    np.testing.assert_allclose(batched[0], sum(energy for energy, _ in singles), rtol=RTOL)
    n_atoms = len(numbers)
    for replica, (_, forces) in enumerate(singles):
        np.testing.assert_allclose(batched[1][replica * n_atoms:(replica + 1) * n_atoms], forces, rtol=RTOL,
                                   atol=FORCE_FLOOR * np.abs(forces).max())
    # The frames differ, so a replica mix-up could not pass unnoticed.
    assert np.ptp([energy for energy, _ in singles]) > 1e-3


# -- (b) periodic box ----------------------------------------------------------------------------
@pytest.mark.parametrize("platform", PLATFORMS)
def test_periodic_box_torchforce_matches_pythonforce(box_model, platform):
    positions, numbers, edge = periodic_test_box()
    cell = np.diag([edge, edge, edge])
    # Replica 2: the same atoms moved by whole box vectors (OpenMM does not wrap the positions it hands over).
    shifted = positions + np.array([[1, 0, 0], [0, -1, 0], [0, 0, 2], [-1, 1, 0],
                                    [0, 0, 0], [1, 1, 1], [0, 0, -1], [2, 0, 0]]) * edge
    replicas = np.stack([positions, shifted])
    torch_result, python_result = _both(box_model, numbers, replicas, platform, box_angstrom=cell)
    _assert_same(torch_result, python_result)
    # The box reaches the model: the energy is the periodic one, not the open-boundary one.
    periodic = _direct_energy_kj(box_model, numbers, positions[None], cell[None])[0]
    open_boundary = _direct_energy_kj(box_model, numbers, positions[None])[0]
    assert abs(periodic - open_boundary) > 1e-2 * abs(periodic) + 1e-3
    np.testing.assert_allclose(torch_result[0], 2 * periodic, rtol=RTOL)
    # Image shifts do not matter: both replicas feel the same forces.
    n_atoms = len(numbers)
    forces = torch_result[1]
    np.testing.assert_allclose(forces[n_atoms:], forces[:n_atoms], rtol=RTOL,
                               atol=FORCE_FLOOR * np.abs(forces).max())


# -- (c) dynamics through ReplicaSet -----------------------------------------------------------------
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("mode", ["batched", "per-replica"])
def test_replicaset_torch_backend_matches_python_backend(ethanol_model, ethanol, mode, platform):
    positions = ethanol.positions[ETHANOL_FRAMES]
    runs = {}
    for backend in ("torch", "python"):
        replicas = ReplicaSet(ethanol_model, ethanol.numbers, positions, backend=backend, integrator="verlet",
                              timestep=0.5, temperature=500.0, seed=3, mode=mode, platform=platform)
        assert replicas.run(20) == 20
        assert not replicas.unstable.any()
        runs[backend] = (replicas.positions(), replicas.velocities(), replicas.potential_energies())
    torch_positions, torch_velocities, torch_energies = runs["torch"]
    python_positions, python_velocities, python_energies = runs["python"]
    moved = np.abs(python_positions - positions).max()
    assert moved > 1e-2, "the replicas hardly moved; the comparison would be empty"
    # The PythonForce path subtracts each replica's float32 net force (about 1e-7 of the force), the
    # TorchForce path does not; with the round-off above that moved the trajectories apart by about
    # 1e-9 Å and 2e-10 Å/fs after these 20 steps of 0.5 fs (atoms moved 0.6 Å, speeds up to 6e-2 Å/fs).
    # 1e-6 is a 1000x margin and still far below any real difference in the forces.
    np.testing.assert_allclose(torch_positions, python_positions, rtol=0, atol=1e-6)
    np.testing.assert_allclose(torch_velocities, python_velocities, rtol=0, atol=1e-6)
    np.testing.assert_allclose(torch_energies, python_energies, rtol=RTOL, atol=1e-6)


# -- import order ----------------------------------------------------------------------------------
ORDER_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from openmm_bridge.replicas import ReplicaSet  # imports openmm before torch
    from stable_md.potentials import build_metadata, build_potential, save_model

    potential, hyper = build_potential("schnet", [1, 8], hidden_channels=8, num_filters=8, num_interactions=1,
                                       num_gaussians=4)
    save_model(potential, sys.argv[1], build_metadata(potential, hyper))
    water = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    replicas = ReplicaSet(sys.argv[1], [8, 1, 1], water, backend="torch", integrator="verlet")
    replicas.run(2)
""")


def test_import_order_openmm_first(tmp_path):
    """A fresh program that imports openmm_bridge (so openmm before torch) and asks for the torch backend."""
    result = subprocess.run([sys.executable, "-c", ORDER_SCRIPT, str(tmp_path / "water.pt")],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "does not support all required kernels" not in result.stderr:
        raise RuntimeError(f"the script failed for another reason:\n{result.stderr[-2000:]}")
    assert result.returncode == 0, result.stderr[-2000:]
