"""ReplicaSet in real OpenMM: independence, thermostats, NVE, rewind, freezing and non-finite replicas."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from openmm_bridge.replicas import ReplicaSet
from small_models import SMALL_HYPERPARAMETERS, periodic_test_box
from stable_md.potentials import build_metadata, build_potential, load_model, save_model


def _starts(ethanol, n):
    return ethanol.positions[np.arange(n) * 37]


@pytest.mark.parametrize("integrator", ["langevin", "nose-hoover"])
def test_replicas_are_independent(pretrained_model, ethanol, integrator):
    """Perturbing one replica changes its own trajectory and nobody else's."""
    starts = _starts(ethanol, 4)
    kwargs = dict(integrator=integrator, temperature=500, timestep=0.5, seed=3)
    reference = ReplicaSet(pretrained_model, ethanol.numbers, starts, **kwargs)
    perturbed_starts = starts.copy()
    perturbed_starts[2, 0] += 0.05
    perturbed = ReplicaSet(pretrained_model, ethanol.numbers, perturbed_starts, **kwargs)
    reference.run(200)
    perturbed.run(200)
    a, b = reference.positions(), perturbed.positions()
    np.testing.assert_array_equal(a[[0, 1, 3]], b[[0, 1, 3]])
    assert np.abs(a[2] - b[2]).max() > 1e-3


def test_batched_and_per_replica_contexts_agree(pretrained_model, ethanol):
    starts = _starts(ethanol, 3)
    kwargs = dict(integrator="nose-hoover", temperature=500, timestep=0.5, seed=1)
    batched = ReplicaSet(pretrained_model, ethanol.numbers, starts, mode="batched", **kwargs)
    separate = ReplicaSet(pretrained_model, ethanol.numbers, starts, mode="per-replica", **kwargs)
    batched.run(100)
    separate.run(100)
    # float32 model in a batch of 3 vs batches of 1: round-off only.
    np.testing.assert_allclose(batched.positions(), separate.positions(), atol=1e-4)
    np.testing.assert_allclose(batched.potential_energies(), separate.potential_energies(), atol=1e-3)


def test_nve_conserves_energy(pretrained_model, ethanol):
    model = load_model(pretrained_model, dtype=torch.float64)
    replicas = ReplicaSet(model, ethanol.numbers, _starts(ethanol, 2), integrator="verlet", temperature=300,
                          timestep=0.25, seed=0)
    totals, potentials = [], []

    def record(frames):
        totals.append(frames.potential_energy + frames.kinetic_energy)
        potentials.append(frames.potential_energy)

    replicas.run(3000, callback=record, every=25)
    totals, potentials = np.array(totals), np.array(potentials)
    assert len(totals) == 120
    swing = potentials.max(axis=0) - potentials.min(axis=0)
    assert (swing > 0.05).all()  # the molecules really move
    # OpenMM's Verlet is leapfrog: velocities lag half a step, so the total energy seen here
    # fluctuates by O(dt) around a constant; what must not happen is a secular drift.
    drift = np.abs(totals[-24:].mean(axis=0) - totals[:24].mean(axis=0))
    assert (drift < 0.01 * swing).all(), (drift, swing)
    assert (totals.std(axis=0) < 0.05 * swing).all(), (totals.std(axis=0), swing)


@pytest.mark.parametrize("integrator", ["langevin", "nose-hoover"])
def test_thermostats_hold_each_replica_at_its_target(pretrained_model, ethanol, integrator):
    """Replicas start far too hot or too cold; each one must settle at the target on its own."""
    n = 8
    replicas = ReplicaSet(pretrained_model, ethanol.numbers, _starts(ethanol, n), integrator=integrator,
                          temperature=400, timestep=0.5, friction=20.0, collision_frequency=20.0, seed=2)
    velocities = replicas.velocities()
    velocities[0] *= 2.0  # about 1600 K
    velocities[1] *= 0.3  # about 40 K
    replicas.set_state(velocities=velocities)
    replicas.run(500)
    samples = []
    replicas.run(3000, callback=lambda frames: samples.append(frames.temperature), every=10)
    mean = np.mean(samples, axis=0)
    # 9 atoms: the instantaneous temperature fluctuates by ~30 %, so 1.5 ps gives each replica's
    # mean to ~6 % and the mean over 8 replicas to ~2 %. Counting 3N instead of 3N - 3 degrees
    # of freedom would put Nose-Hoover 12.5 % too hot.
    np.testing.assert_allclose(mean, 400.0, rtol=0.18)
    assert mean.mean() == pytest.approx(400.0, rel=0.05)


def test_rewind_is_bit_exact(pretrained_model, ethanol):
    for mode in ("batched", "per-replica"):
        replicas = ReplicaSet(pretrained_model, ethanol.numbers, _starts(ethanol, 3), integrator="langevin",
                              temperature=500, seed=4, mode=mode)
        replicas.run(30)
        snapshot = replicas.snapshot()
        replicas.run(60)
        first = replicas.positions(), replicas.velocities()
        replicas.freeze([1])
        replicas.run(20)
        replicas.restore(snapshot)
        assert replicas.step == snapshot.step
        assert not replicas.frozen.any()
        np.testing.assert_array_equal(replicas.positions(), snapshot.positions)
        np.testing.assert_array_equal(replicas.velocities(), snapshot.velocities)
        replicas.run(60)
        np.testing.assert_array_equal(replicas.positions(), first[0])
        np.testing.assert_array_equal(replicas.velocities(), first[1])


def test_rewinding_a_subset_leaves_the_others_alone(pretrained_model, ethanol):
    replicas = ReplicaSet(pretrained_model, ethanol.numbers, _starts(ethanol, 4), integrator="nose-hoover",
                          temperature=500, seed=5)
    snapshot = replicas.snapshot()
    replicas.run(40)
    before = replicas.positions()
    replicas.restore(snapshot, replicas=[1, 3])
    after = replicas.positions()
    np.testing.assert_array_equal(after[[1, 3]], snapshot.positions[[1, 3]])
    np.testing.assert_array_equal(replicas.velocities()[[1, 3]], snapshot.velocities[[1, 3]])
    np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])


def test_frozen_replicas_stay_put_while_the_others_move(pretrained_model, ethanol):
    replicas = ReplicaSet(pretrained_model, ethanol.numbers, _starts(ethanol, 3), integrator="langevin",
                          temperature=500, seed=6)
    replicas.run(10)
    replicas.freeze([0])
    held = replicas.positions()[0]
    start = replicas.positions()
    replicas.run(100)
    now = replicas.positions()
    np.testing.assert_array_equal(now[0], held)
    assert np.abs(now[1:] - start[1:]).max() > 0.01
    assert np.isnan(replicas.potential_energies()[0]) and np.isfinite(replicas.potential_energies()[1:]).all()
    replicas.unfreeze([0])
    replicas.run(50)
    assert np.abs(replicas.positions()[0] - held).max() > 0.01
    # A callback's verdict freezes replicas too.
    replicas.run(40, callback=lambda frames: [2] if frames.step >= 200 else None, every=20)
    assert replicas.frozen.tolist() == [False, False, True]


class _NaNOutsideSphere(nn.Module):
    """The real model, but NaN energy once a molecule's centre leaves a sphere of ``radius`` Å."""

    def __init__(self, model: nn.Module, radius: float) -> None:
        super().__init__()
        self.model = model
        self.radius = radius
        self.species_numbers = model.species_numbers

    def forward(self, positions, numbers, cell=None):
        energy, atomic = self.model(positions, numbers, cell)
        away = positions.mean(dim=1).norm(dim=-1) > self.radius
        return torch.where(away, torch.full_like(energy, float("nan")), energy), atomic


@pytest.mark.parametrize("mode", ["batched", "per-replica"])
def test_a_nan_replica_is_frozen_and_the_others_carry_on(pretrained_model, ethanol, mode):
    model = _NaNOutsideSphere(load_model(pretrained_model).module, radius=3.0)
    starts = _starts(ethanol, 3)
    starts -= starts.mean(axis=1, keepdims=True)
    kwargs = dict(integrator="verlet", temperature=500, timestep=0.5, seed=7, mode=mode, check_interval=10)
    calm = ReplicaSet(model, ethanol.numbers, starts, **kwargs)
    drifting = ReplicaSet(model, ethanol.numbers, starts, **kwargs)
    velocities = drifting.velocities()
    velocities[1] += 0.05  # Å/fs along every axis: leaves the sphere after about 35 fs (70 steps)
    drifting.set_state(velocities=velocities)
    calm.run(300)
    drifting.run(300)
    assert drifting.unstable.tolist() == [False, True, False]
    assert drifting.frozen.tolist() == [False, True, False]
    assert 60 <= drifting.unstable_step[1] <= 90
    assert np.isfinite(drifting.positions()).all()
    np.testing.assert_allclose(drifting.positions()[[0, 2]], calm.positions()[[0, 2]], atol=1e-5)
    assert not calm.unstable.any()
    # The frozen replica sits at its last finite state, inside the sphere.
    assert np.linalg.norm(drifting.positions()[1].mean(axis=0)) <= 3.0


class _WallOutsideSphere(nn.Module):
    """The real model plus a steep finite wall (1e5 eV/Å²) beyond ``radius`` Å from the origin."""

    def __init__(self, model: nn.Module, radius: float) -> None:
        super().__init__()
        self.model, self.radius = model, radius
        self.species_numbers = model.species_numbers

    def forward(self, positions, numbers, cell=None):
        energy, atomic = self.model(positions, numbers, cell)
        outside = (positions.norm(dim=-1) - self.radius).clamp_min(0.0)
        wall = 0.5e5 * outside.pow(2)
        return energy + wall.sum(dim=1), atomic + wall


def test_an_exploding_replica_is_retired_before_openmm_sees_nan(pretrained_model, ethanol):
    from openmm_bridge.replicas import NONFINITE_REASON

    model = _WallOutsideSphere(load_model(pretrained_model).module, radius=6.0)
    starts = _starts(ethanol, 3)
    starts -= starts.mean(axis=1, keepdims=True)
    starts[1] += 6.5  # every atom well outside the wall: forces of order 1e5 eV/Å, finite but exploding
    replicas = ReplicaSet(model, ethanol.numbers, starts, integrator="verlet", temperature=300, timestep=0.5,
                          seed=2, check_interval=10)
    replicas.run(100)
    assert replicas.unstable.tolist() == [False, True, False]
    assert replicas.reasons[1] == NONFINITE_REASON
    assert np.isfinite(replicas.positions()).all()
    np.testing.assert_allclose(replicas.positions()[1], starts[1])  # kept at its last good state


def test_all_replicas_unstable_ends_the_run_early(pretrained_model, ethanol):
    model = _NaNOutsideSphere(load_model(pretrained_model).module, radius=0.0)
    replicas = ReplicaSet(model, ethanol.numbers, _starts(ethanol, 2) + 1.0, integrator="langevin", check_interval=5)
    assert replicas.run(1000) == 5
    assert replicas.unstable.all()


def test_reporters_are_asked_when_they_want_frames_and_keep_clock_reports_on(pretrained_model, ethanol):
    """Each reporter gets frames on its own interval (20 and 30 steps: 20, 30, 40, 60, ...), sharing one frame at
    common steps; with keep_clock a set whose replicas all stopped still counts steps and reports (a process of a
    multi-process run reports with the others) until a reporter calls halt()."""
    from openmm_bridge.reporters import Reporter

    class Steps(Reporter):
        def __init__(self, interval: int, halt_at=None) -> None:
            super().__init__(interval)
            self.steps, self.frames, self.halt_at = [], [], halt_at

        def report(self, replicas, frames) -> None:
            self.steps.append(frames.step)
            self.frames.append(frames)
            if frames.step == self.halt_at:
                replicas.halt()

    replicas = ReplicaSet(pretrained_model, ethanol.numbers, _starts(ethanol, 2), integrator="langevin")
    twenty, thirty = Steps(20), Steps(30)
    assert replicas.run(60, reporters=[twenty, thirty]) == 60
    assert twenty.steps == [20, 40, 60] and thirty.steps == [30, 60]
    assert twenty.frames[-1] is thirty.frames[-1]  # one ReplicaFrames for both at step 60
    replicas.freeze([0, 1])
    assert replicas.run(100, reporters=[Steps(20)]) == 0  # nothing runs: an ordinary set stops
    late = Steps(20, halt_at=120)
    before = replicas.positions()
    assert replicas.run(100, reporters=[late], keep_clock=True) == 60
    assert late.steps == [80, 100, 120] and replicas.step == 120
    np.testing.assert_array_equal(replicas.positions(), before)


def test_periodic_box_replicas_with_unwrapped_positions(tmp_path):
    torch.manual_seed(0)
    potential, hyper = build_potential("schnet", [1, 6, 8], **SMALL_HYPERPARAMETERS["schnet"])
    path = save_model(potential, tmp_path / "box.pt", build_metadata(potential, hyper))
    positions, numbers, edge = periodic_test_box()
    cell = np.eye(3) * edge
    unwrapped = positions + edge * np.array([[1, 0, 0], [0, 2, 0], [0, 0, -1]] + [[0, 0, 0]] * 5)
    replicas = ReplicaSet(path, numbers, np.stack([positions, unwrapped]), cell=cell, integrator="nose-hoover",
                          temperature=300, seed=0)
    energies = replicas.potential_energies()
    assert energies[0] == pytest.approx(energies[1], abs=1e-5)
    replicas.run(50)
    assert np.isfinite(replicas.positions()).all() and not replicas.unstable.any()
    with pytest.raises(ValueError, match="reduced form"):
        ReplicaSet(path, numbers, positions, cell=np.array([[edge, 1.0, 0], [0, edge, 0], [0, 0, edge]]))


def test_bad_input_is_named(pretrained_model, ethanol):
    with pytest.raises(ValueError, match="not trained on: atomic numbers \\[16\\]"):
        ReplicaSet(pretrained_model, [6, 16], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="positions must have shape"):
        ReplicaSet(pretrained_model, ethanol.numbers, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="unknown integrator"):
        ReplicaSet(pretrained_model, ethanol.numbers, ethanol.positions[0], integrator="berendsen")
    with pytest.raises(ValueError, match="timestep must be a positive"):
        ReplicaSet(pretrained_model, ethanol.numbers, ethanol.positions[0], timestep=0)
    replicas = ReplicaSet(pretrained_model, ethanol.numbers, ethanol.positions[0], n_replicas=2)
    with pytest.raises(ValueError, match="replica indices must lie in 0..1"):
        replicas.freeze([2])
    with pytest.raises(ValueError, match="a callback needs every"):
        replicas.run(10, callback=print)
