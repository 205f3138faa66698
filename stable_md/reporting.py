"""Reporters that judge and measure replicas: a stability monitor, samplers of positions and observables,
and a displacement recorder for diffusion.

refine, evaluate and simulate are compositions of these and the engine's own reporters
(:mod:`openmm_bridge.reporters`: trajectories, the state log, velocities), handed to
:meth:`openmm_bridge.replicas.ReplicaSet.run`. Each reports every ``interval`` steps of the
replica set's clock; list order decides who sees a frame first (a sampler placed after the
monitor skips the replicas the monitor has just stopped).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from openmm_bridge.reporters import Reporter


class StabilityMonitor(Reporter):
    """Applies a stability criterion (a :class:`stable_md.stability.Criterion`) to every report's frames and
    marks the running replicas it rejects unstable, with the criterion's reasons.

    ``checks`` counts the reports made; ``first_unstable`` is how many replicas were unstable right after
    the first one (refine refuses to learn from a start where all of them are).
    """

    def __init__(self, criterion, interval: int) -> None:
        super().__init__(interval)
        self.criterion = criterion
        self.checks = 0
        self.first_unstable: Optional[int] = None

    def report(self, replicas, frames) -> None:
        self.check(replicas, frames.positions, frames.running)

    def check(self, replicas, positions: np.ndarray, running: np.ndarray) -> None:
        """Judge ``positions`` [R, N, 3] Å of the ``running`` [R] replicas now (also used at t = 0)."""
        broken = np.flatnonzero(self.criterion(positions) & running & ~replicas.unstable)
        if len(broken):
            replicas.mark_unstable(broken, self.criterion.reasons(positions, broken))
        if self.checks == 0:
            self.first_unstable = int(replicas.unstable.sum())
        self.checks += 1


class PositionSampler(Reporter):
    """Keeps the positions of the replicas still stable at each report: samples [S, N, 3] Å for the estimator."""

    def __init__(self, interval: int, n_atoms: int) -> None:
        super().__init__(interval)
        self.n_atoms = n_atoms
        self._samples: list[np.ndarray] = []

    def report(self, replicas, frames) -> None:
        self._samples.append(frames.positions[frames.running & ~replicas.unstable])

    def samples(self) -> np.ndarray:
        """All kept positions, [S, N, 3] Å (S = 0 when none)."""
        if not self._samples:
            return np.zeros((0, self.n_atoms, 3))
        return np.concatenate(self._samples)


class ObservableAverager(Reporter):
    """The running sum of an observable (a :class:`stable_md.observables.Observable`) over the replicas still
    stable at each report, so that its mean is taken over the stable part of the runs only."""

    def __init__(self, observable, interval: int, cell: Optional[np.ndarray] = None) -> None:
        super().__init__(interval)
        self.observable, self.cell = observable, cell
        self.total: Optional[np.ndarray] = None
        self.count = 0

    def report(self, replicas, frames) -> None:
        passing = frames.running & ~replicas.unstable
        if not passing.any():
            return
        values = self.observable(frames.positions[passing], self.cell).numpy()
        self.total = values.sum(axis=0) if self.total is None else self.total + values.sum(axis=0)
        self.count += len(values)


class DisplacementRecorder(Reporter):
    """Unwrapped positions of chosen atoms (minimum-image steps between reports, periodic box ``cell``) and,
    per replica, how many reports found it stable: the input of an MSD over each replica's stable part."""

    def __init__(self, interval: int, atoms: np.ndarray, cell: np.ndarray, n_replicas: int) -> None:
        super().__init__(interval)
        self.atoms = np.asarray(atoms)
        self.cell = np.asarray(cell, dtype=np.float64)
        self._inverse = np.linalg.inv(self.cell)
        self.unwrapped: list[np.ndarray] = []
        self.stable_frames = np.zeros(n_replicas, dtype=np.int64)
        self._last: Optional[np.ndarray] = None

    def report(self, replicas, frames) -> None:
        self.record(frames.positions, frames.running & ~replicas.unstable)

    def record(self, positions: np.ndarray, stable: np.ndarray) -> None:
        """Add one frame of ``positions`` [R, N, 3] Å, counting it for the ``stable`` [R] replicas."""
        chosen = positions[:, self.atoms]
        if self._last is None:
            self.unwrapped.append(chosen.copy())
        else:
            fractional = (chosen - self._last) @ self._inverse
            self.unwrapped.append(self.unwrapped[-1] + (fractional - np.round(fractional)) @ self.cell)
        self._last = chosen.copy()
        self.stable_frames[stable] += 1
