"""Reporters of a replica set, and the files they write: DCD trajectories MDTraj reads, a state log.

A reporter is what OpenMM's ``Simulation`` reporters are for one Context: the run loop
(:meth:`openmm_bridge.replicas.ReplicaSet.run`) asks each one how many steps remain until it
wants the next frames (``steps_to_next``, OpenMM's ``describeNextReport``), stops there, and
hands it the frames (``report``). The loop knows nothing about what is recorded; a stability
monitor, an observable sampler and a trajectory writer are all reporters
(:mod:`stable_md.reporting` has the ones that need criteria or observables).

A replica's trajectory stops at its last frame before it was frozen, so that every
frame in a file is a frame of a running simulation; the state log records when and
why it stopped.
"""
from __future__ import annotations

import csv
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

import numpy as np
import openmm
from openmm import app, unit

from stable_md.units import NM_IN_ANGSTROM, PS_IN_FS

if TYPE_CHECKING:
    from openmm_bridge.replicas import ReplicaFrames, ReplicaSet


class Reporter:
    """Something that wants the replicas' frames now and then.

    Subclasses implement :meth:`report` and either set ``interval`` (a report whenever the
    step counter is a multiple of it) or override :meth:`steps_to_next`.
    """

    interval: int = 1

    def __init__(self, interval: int) -> None:
        if int(interval) != interval or interval < 1:
            raise ValueError(f"a reporter's interval must be a positive number of steps, got {interval}")
        self.interval = int(interval)

    def steps_to_next(self, step: int) -> Optional[int]:
        """Steps from ``step`` until the next report (>= 1); ``None``: no more reports."""
        return self.interval - step % self.interval

    def report(self, replicas: "ReplicaSet", frames: "ReplicaFrames") -> None:
        raise NotImplementedError


class CallbackReporter(Reporter):
    """``callback(frames)`` every ``interval`` steps; replica indices it returns are frozen."""

    def __init__(self, callback: Callable[["ReplicaFrames"], Optional[Iterable[int]]], interval: int) -> None:
        super().__init__(interval)
        self.callback = callback

    def report(self, replicas: "ReplicaSet", frames: "ReplicaFrames") -> None:
        verdict = self.callback(frames)
        if verdict is not None:
            replicas.freeze(verdict)


class TrajectoryReporter(Reporter):
    """Appends the running replicas' positions to their DCD files (a :class:`TrajectoryWriter`)."""

    def __init__(self, writer: "TrajectoryWriter", interval: int) -> None:
        super().__init__(interval)
        self.writer = writer

    def report(self, replicas: "ReplicaSet", frames: "ReplicaFrames") -> None:
        self.writer.write(frames.system_positions, frames.running)  # MM surroundings included


class VelocityRecorder(Reporter):
    """The velocities [R, N, 3] Å/fs of every step of the first ``n_steps`` steps (for a VACF).

    ``stable`` holds, at the last recorded step, which replicas had not been found unstable
    (put this reporter after a stability monitor so that a replica failing on that step is excluded).
    """

    def __init__(self, n_steps: int) -> None:
        super().__init__(1)
        self.n_steps = int(n_steps)
        self.velocities: list[np.ndarray] = []
        self.stable: Optional[np.ndarray] = None

    def steps_to_next(self, step: int) -> Optional[int]:
        return 1 if len(self.velocities) < self.n_steps else None

    def report(self, replicas: "ReplicaSet", frames: "ReplicaFrames") -> None:
        self.velocities.append(frames.velocities)
        self.stable = ~replicas.unstable

    def stacked(self) -> np.ndarray:
        """[R, T, N, 3] velocities of the recorded steps."""
        return np.stack(self.velocities, axis=1)


def replica_status(replicas: "ReplicaSet") -> list[str]:
    """``unstable``, ``frozen`` or ``running`` for every replica."""
    return ["unstable" if replicas.unstable[r] else ("frozen" if replicas.frozen[r] else "running")
            for r in range(replicas.n_replicas)]


TOPOLOGY_NAME = "topology.pdb"
STATE_LOG_NAME = "state.csv"
STATE_COLUMNS = ("step", "time_ps", "replica", "status", "potential_eV", "kinetic_eV", "temperature_K")
# Bytes of the DCD header OpenMM writes, before the comment block's length is added.
_DCD_FIXED_HEADER = 104 + 8


def replica_topology(numbers: Sequence[int], cell: Optional[np.ndarray] = None) -> app.Topology:
    """An OpenMM Topology of one replica: one chain, one residue, atoms named by element."""
    topology = app.Topology()
    chain = topology.addChain()
    residue = topology.addResidue("MOL", chain)
    counts: dict[str, int] = {}
    for number in numbers:
        element = app.Element.getByAtomicNumber(int(number))
        counts[element.symbol] = counts.get(element.symbol, 0) + 1
        name = f"{element.symbol}{counts[element.symbol]}"
        topology.addAtom(name if len(name) <= 4 else element.symbol, element, residue)
    if cell is not None:
        topology.setPeriodicBoxVectors([openmm.Vec3(*(row / NM_IN_ANGSTROM)) for row in np.asarray(cell)]
                                       * unit.nanometer)
    return topology


def write_topology(path: str | os.PathLike, numbers: Sequence[int], positions: np.ndarray,
                   cell: Optional[np.ndarray] = None, topology: Optional[app.Topology] = None) -> Path:
    """PDB file with one replica's particles at ``positions`` (Å): the topology MDTraj needs for DCD files;
    ``topology`` (a replica with MM surroundings: every particle, the user's residues) instead of one
    residue of ``numbers``."""
    path = Path(path)
    topology = replica_topology(numbers, cell) if topology is None else topology
    with open(path, "w") as handle:
        app.PDBFile.writeFile(topology, np.asarray(positions) / NM_IN_ANGSTROM * unit.nanometer, handle)
    return path


class TrajectoryWriter:
    """One DCD file per replica, ``replica_000.dcd`` ..., in ``directory``.

    Parameters
    ----------
    directory:
        Output folder (created).
    numbers, cell:
        Atomic numbers and periodic box (Å) of one replica.
    topology:
        The Topology of one replica when it is more than ``numbers`` (MM surroundings).
    n_replicas:
        Number of files.
    timestep:
        MD timestep in fs; ``interval`` steps between frames; ``first_step`` of the first frame.
    append:
        Continue existing files (after :func:`truncate_dcd` when resuming).
    indices:
        The replicas' numbers in the file names (default 0 .. n_replicas - 1; a process holding
        part of the replicas names them by their place among all).
    """

    def __init__(self, directory: str | os.PathLike, numbers: Sequence[int], n_replicas: int, timestep: float,
                 interval: int, cell: Optional[np.ndarray] = None, first_step: int = 0,
                 append: bool = False, indices: Optional[Sequence[int]] = None,
                 topology: Optional[app.Topology] = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.topology = replica_topology(numbers, cell) if topology is None else topology
        self.cell = None if cell is None else np.asarray(cell, dtype=np.float64)
        indices = range(n_replicas) if indices is None else indices
        self.paths = [self.directory / dcd_name(r) for r in indices]
        self._handles = []
        self._files = []
        for path in self.paths:
            handle = open(path, "r+b" if append else "wb")
            self._handles.append(handle)
            self._files.append(app.DCDFile(handle, self.topology, timestep / PS_IN_FS * unit.picosecond,
                                           firstStep=first_step, interval=interval, append=append))
        self.frames_written = np.array([f._modelCount for f in self._files], dtype=np.int64)

    def write(self, positions: np.ndarray, running: np.ndarray) -> None:
        """Append ``positions`` [R, N, 3] Å of the ``running`` [R] replicas."""
        box = None
        if self.cell is not None:
            box = [openmm.Vec3(*(row / NM_IN_ANGSTROM)) for row in self.cell] * unit.nanometer
        for replica in np.flatnonzero(running):
            self._files[replica].writeModel(positions[replica] / NM_IN_ANGSTROM, periodicBoxVectors=box)
            self.frames_written[replica] += 1
        for handle in self._handles:
            handle.flush()

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        self._handles = []

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dcd_name(replica: int) -> str:
    """The trajectory file of replica ``replica``: ``replica_000.dcd``, ..."""
    return f"replica_{replica:03d}.dcd"


def truncate_dcd(path: str | os.PathLike, n_frames: int) -> None:
    """Cut an OpenMM-written DCD file back to its first ``n_frames`` frames (resuming after a kill)."""
    path = Path(path)
    with open(path, "r+b") as handle:
        handle.seek(8)
        count = struct.unpack("<i", handle.read(4))[0]
        handle.seek(12)
        first_step, interval = struct.unpack("<ii", handle.read(8))
        handle.seek(48)
        has_box = struct.unpack("<i", handle.read(4))[0] == 1
        handle.seek(92)
        comments = struct.unpack("<i", handle.read(4))[0]
        handle.seek(104 + comments)
        n_atoms = struct.unpack("<i", handle.read(4))[0]
        header = _DCD_FIXED_HEADER + comments
        frame = (56 if has_box else 0) + 3 * (8 + 4 * n_atoms)
        if n_frames > count or header + n_frames * frame > os.path.getsize(path):
            raise ValueError(f"{path} holds {count} frames, fewer than the {n_frames} the checkpoint expects")
        handle.truncate(header + n_frames * frame)
        handle.seek(8)
        handle.write(struct.pack("<i", n_frames))
        handle.seek(20)
        handle.write(struct.pack("<i", first_step + max(n_frames - 1, 0) * interval))


class StateLog:
    """CSV with one row per replica per report: step, time, status, potential and kinetic energy, temperature."""

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = Path(path)
        new = not (append and self.path.exists())
        self._handle = open(self.path, "w" if new else "a", newline="")
        self._writer = csv.writer(self._handle)
        if new:
            self._writer.writerow(STATE_COLUMNS)
            self._handle.flush()

    def write(self, frames, status: Sequence[str]) -> None:
        """Rows for every replica of ``frames`` (a ReplicaFrames) with ``status`` per replica."""
        self.write_rows(self.rows(frames, status))

    @staticmethod
    def rows(frames, status: Sequence[str], indices: Optional[Sequence[int]] = None) -> list[list]:
        """The rows of ``frames``' replicas, numbered ``indices`` (default 0 .. R - 1)."""
        time_ps = frames.time / PS_IN_FS
        indices = range(len(frames.positions)) if indices is None else indices
        return [[frames.step, f"{time_ps:.6f}", int(number), status[replica],
                 _number(frames.potential_energy[replica]), _number(frames.kinetic_energy[replica]),
                 _number(frames.temperature[replica], digits=2)] for replica, number in enumerate(indices)]

    def write_rows(self, rows: Sequence[Sequence]) -> None:
        self._writer.writerows(rows)
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def truncate_state_log(path: str | os.PathLike, last_step: int) -> None:
    """Drop rows after ``last_step`` from a state log (resuming after a kill)."""
    path = Path(path)
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    kept = [rows[0]] + [row for row in rows[1:] if row and int(row[0]) <= last_step]
    from stable_md.files import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            csv.writer(handle).writerows(kept)

    atomic_write(path, write)


def _number(value: float, digits: int = 6) -> str:
    return "" if not np.isfinite(value) else f"{value:.{digits}f}"
