"""A stability guard for production MD: the criteria of refine and evaluate, watching one simulation.

A :class:`StabilityGuard` holds a criterion (``bond``, ``imd``, ``rdf`` or any registered one; see
:mod:`stable_md.stability`) built from a reference, and checks frames: :meth:`StabilityGuard.check`
returns an :class:`Instability` (reason, atoms, value) or None. Non-finite positions and forces,
and forces above :data:`~stable_md.geometry_checks.MAX_FORCE_EV_PER_A`, count as unstable too.

The reference, in the order tried by :meth:`StabilityGuard.from_model`: the bonds and lengths the
model file stores (pretrain and refine write them from their training frames), when its atoms are
the guarded ones; else the starting structure. :meth:`StabilityGuard.from_data` takes them from a
data file (and can build the RDF criterion, which needs reference frames).

Where it runs:

- ASE: ``dyn.attach(StabilityObserver(atoms, guard, dynamics=dyn), interval=10)``
  (:mod:`stable_md.guard_ase`), or ``StableCalculator(..., guard=True)`` to check every force call;
- OpenMM: ``simulation.reporters.append(StabilityReporter("model.stable.pt", 100))``
  (:mod:`stable_md.guard_openmm`, an OpenMM reporter that imports no OpenMM).

An unstable frame raises :class:`InstabilityError` (``action="stop"``, the default) with the step,
the time, the reason, the atoms and the value, or is logged and warned about (``"warn"``); the
OpenMM reporter can also rewind to the last stable state (``"rewind"``).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional, Sequence

import numpy as np

from stable_md.geometry_checks import MAX_FORCE_EV_PER_A
from stable_md.stability import BondGraph, Criterion, CriterionInputs, detect_bonds, make_criterion

REFERENCE_KEY = "stability_reference"  # in a model file's metadata


@dataclass(frozen=True)
class Instability:
    """Why a frame is unstable: ``reason`` in words, the ``atoms`` involved (0-based indices of the guarded
    atoms) and the ``value`` judged (Å for bonds and distances, eV/Å for forces)."""

    reason: str
    atoms: tuple[int, ...]
    value: float
    criterion: str


class InstabilityError(RuntimeError):
    """A guarded simulation became unstable. Attributes: ``step`` (MD step, or force call for a calculator),
    ``time_ps`` (None where unknown), ``reason``, ``atoms``, ``value``, ``criterion``."""

    def __init__(self, instability: Instability, step: int, time_ps: Optional[float] = None,
                 where: str = "", counted: str = "step") -> None:
        self.instability = instability
        self.step, self.time_ps = int(step), time_ps
        self.reason, self.atoms, self.value = instability.reason, instability.atoms, instability.value
        self.criterion = instability.criterion
        self._arguments = (instability, step, time_ps, where, counted)
        when = f"{counted} {self.step}" + ("" if time_ps is None else f" ({time_ps:.4g} ps)")
        super().__init__(f"{where}unstable at {when}: {instability.reason}")

    def __reduce__(self):
        # a guarded run in a process pool hands its error back whole
        return type(self), self._arguments


def stability_reference(bonds: BondGraph, source: str) -> dict[str, Any]:
    """What a model file stores for guards (metadata key :data:`REFERENCE_KEY`): atoms, bonds, lengths (Å)."""
    return {"numbers": [int(z) for z in bonds.numbers], "bonds": np.asarray(bonds.pairs, dtype=int).tolist(),
            "lengths_angstrom": [round(float(length), 5) for length in bonds.reference_lengths], "source": source}


def stored_reference_of(numbers: Sequence[int], positions: np.ndarray, cell: Optional[np.ndarray],
                        source: str) -> dict[str, Any]:
    """:func:`stability_reference` of the bonds of up to 1000 frames spread over ``positions`` [F, N, 3] Å."""
    from stable_md.structures import spread_indices

    frames = np.asarray(positions)[spread_indices(len(positions), min(len(positions), 1000))]
    return stability_reference(detect_bonds(np.asarray(numbers), frames, cell), source)


class StabilityGuard:
    """Checks frames of one simulation against ``criterion`` (see the module docstring).

    ``atoms``: indices of the guarded atoms among a larger system's (OpenMM's ML subset), None for all.
    ``max_force``: eV/Å above which a force counts as exploding.
    """

    def __init__(self, criterion: Criterion, atoms: Optional[Sequence[int]] = None,
                 max_force: float = MAX_FORCE_EV_PER_A, note: str = "") -> None:
        if not max_force > 0:
            raise ValueError(f"max_force must be a positive number of eV/Å, got {max_force!r}")
        self.criterion = criterion
        self.atoms = None if atoms is None else np.asarray(atoms, dtype=np.int64)
        self.max_force = float(max_force)
        self.note = note  # where the reference came from, for logs

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def from_structure(cls, numbers: Sequence[int], positions: np.ndarray, cell: Optional[np.ndarray] = None,
                       criterion: str = "bond", threshold: Optional[float] = None,
                       atoms: Optional[Sequence[int]] = None) -> "StabilityGuard":
        """Bonds and lengths (Å) of one structure (the starting one) as the reference."""
        bonds = detect_bonds(np.asarray(numbers), np.asarray(positions, dtype=np.float64), cell)
        return cls(make_criterion(criterion, CriterionInputs(bonds, cell), threshold), atoms,
                   note="bonds of the starting structure")

    @classmethod
    def from_data(cls, data, criterion: str = "bond", threshold: Optional[float] = None,
                  atoms: Optional[Sequence[int]] = None) -> "StabilityGuard":
        """The reference frames of a data file (or :class:`~stable_md.data.Dataset`); ``rdf`` needs these."""
        from stable_md.data import Dataset, load_dataset
        from stable_md.observables import reference_frames

        dataset = data if isinstance(data, Dataset) else load_dataset(data)
        cell = None if dataset.cells is None else dataset.cells[0]
        bonds = detect_bonds(dataset.numbers, reference_frames(dataset), cell)
        inputs = CriterionInputs(bonds, cell, data=dataset)
        return cls(make_criterion(criterion, inputs, threshold), atoms, note=f"bonds of {dataset.source}")

    @classmethod
    def from_model(cls, model, numbers: Sequence[int], positions: Optional[np.ndarray] = None,
                   cell: Optional[np.ndarray] = None, criterion: str = "bond", threshold: Optional[float] = None,
                   atoms: Optional[Sequence[int]] = None) -> "StabilityGuard":
        """The reference the model file (a path or a loaded ModelFile) stores, its training frames' bonds, when
        its atoms are ``numbers``; else the bonds of ``positions`` (the starting structure, Å)."""
        from stable_md.potentials.model_file import ModelFile, read_metadata

        metadata = model.metadata if isinstance(model, ModelFile) else read_metadata(model)
        model = model.path if isinstance(model, ModelFile) else model
        stored = metadata.get(REFERENCE_KEY)
        numbers = [int(z) for z in numbers]
        mismatch = None
        if stored is not None and stored["numbers"] == numbers:
            bonds = BondGraph(pairs=np.asarray(stored["bonds"], dtype=np.int64).reshape(-1, 2),
                              reference_lengths=np.asarray(stored["lengths_angstrom"], dtype=np.float64),
                              numbers=np.asarray(numbers))
            guard = cls(make_criterion(criterion, CriterionInputs(bonds, cell), threshold), atoms,
                        note=f"bonds the model stores ({stored['source']})")
            # the same elements in another order (hydrogens listed differently) would break the stored bonds at once
            mismatch = None if positions is None else guard._starting_mismatch(positions)
            if mismatch is None:
                return guard
        if positions is None:
            why = ("stores no reference (imported, or written before 2026-12-03)" if stored is None else
                   f"stores a reference for other atoms ({len(stored['numbers'])} atoms)")
            raise ValueError(f"{model} {why}; give the starting positions so that the guard takes its bonds "
                             f"from them, or use StabilityGuard.from_data")
        guard = cls.from_structure(numbers, positions, cell, criterion, threshold, atoms)
        why = ("stores none" if stored is None else "is for other atoms" if mismatch is None else
               f"stores bonds the starting structure does not have: {mismatch}; its atoms may be in another order")
        guard.note = f"bonds of the starting structure ({model} {why})"
        return guard

    def _starting_mismatch(self, positions: np.ndarray) -> Optional[str]:
        """Why the first of ``positions`` (``[N, 3]`` or ``[F, N, 3]`` Å, the guarded atoms) already fails this
        guard's criterion, or None."""
        frames = np.asarray(positions, dtype=np.float64).reshape(-1, np.asarray(positions).shape[-2], 3)
        if self.criterion.windowed or not bool(self.criterion(frames[:1])[0]):
            return None
        return self.criterion.reasons(frames[:1])[0]

    # -- checking ------------------------------------------------------------------------------------
    def check(self, positions: np.ndarray, forces: Optional[np.ndarray] = None,
              cell: Optional[np.ndarray] = None) -> Optional[Instability]:
        """The instability of one frame (positions ``[N, 3]`` Å and optionally forces ``[N, 3]`` eV/Å, of the
        whole system when ``atoms`` was given), or None when it is stable. ``cell`` [3, 3] Å: the box now, for
        a periodic criterion (under a barostat the box changes; a molecule's criterion has none)."""
        if cell is not None and getattr(self.criterion, "cell", None) is not None:
            self.criterion.cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
        positions = np.asarray(positions, dtype=np.float64)
        if self.atoms is not None:
            positions = positions[self.atoms]
            forces = None if forces is None else np.asarray(forces)[self.atoms]
        bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
        if len(bad):
            return Instability(f"non-finite positions on atom(s) {self._names(bad)}", self._atoms(bad),
                               float("nan"), "finite")
        if forces is not None:
            magnitudes = np.linalg.norm(np.asarray(forces, dtype=np.float64), axis=1)
            magnitudes = np.where(np.isfinite(magnitudes), magnitudes, np.inf)
            worst = int(magnitudes.argmax()) if len(magnitudes) else 0
            if len(magnitudes) and not magnitudes[worst] <= self.max_force:
                return Instability(f"force of {magnitudes[worst]:.4g} eV/Å on atom {self._names([worst])}, above "
                                   f"{self.max_force:g} eV/Å", self._atoms([worst]), float(magnitudes[worst]),
                                   "force")
        frame = positions[None]
        if not bool(self.criterion(frame)[0]):
            return None
        atoms, value = self.criterion.culprit(frame)
        return Instability(self.criterion.reasons(frame)[0], self._atoms(atoms), value, self.criterion.name)

    def _atoms(self, local: Sequence[int]) -> tuple[int, ...]:
        """Indices in the whole system of the guarded atoms ``local``."""
        return tuple(int(self.atoms[a]) if self.atoms is not None else int(a) for a in local)

    def _names(self, local: Sequence[int]) -> str:
        return ", ".join(str(a) for a in self._atoms(local)[:10])

    def reset(self) -> None:
        """Forget a windowed criterion's frames (after a rewind)."""
        self.criterion.reset()

    def error(self, instability: Instability, step: int, time_ps: Optional[float] = None, where: str = "",
              counted: str = "step") -> InstabilityError:
        """The exception a guarded run raises for ``instability`` at ``step`` (``counted``: what the number
        counts, ``step`` or ``force call``)."""
        return InstabilityError(instability, step, time_ps, where, counted)


class GuardLog:
    """Where a guard's events go: a file path (appended), an open text stream, or nowhere."""

    def __init__(self, log: Optional[str | os.PathLike | IO[str]]) -> None:
        # a path means the one named now, whatever the working directory is when something happens
        self.log = Path(log).resolve() if isinstance(log, (str, os.PathLike)) else log

    def write(self, line: str) -> None:
        if self.log is None:
            return
        if isinstance(self.log, (str, os.PathLike)):
            with open(Path(self.log), "a") as handle:
                handle.write(line + "\n")
        else:
            self.log.write(line + "\n")
            self.log.flush()


class GuardRecord:
    """What a guard running beside a simulation keeps: its unstable events, their log lines, and one warning per
    unstable stretch (``action="warn"``)."""

    def __init__(self, log: Optional[str | os.PathLike | IO[str]]) -> None:
        self.log = GuardLog(log)
        self.reset()

    def reset(self) -> None:
        self.events: list[tuple[int, Instability]] = []
        self._unstable = False

    def stable(self) -> None:
        self._unstable = False

    def unstable(self, step: int, time_ps: Optional[float], instability: Instability, action: str,
                 who: str = "") -> None:
        """Record ``instability`` at ``step``; with ``warn``, warn when an unstable stretch begins."""
        when = f"step {step}" + ("" if time_ps is None else f" ({time_ps:.4g} ps)")
        self.events.append((step, instability))
        self.log.write(f"{when}: unstable: {instability.reason} [{action}]")
        if action == "warn" and not self._unstable:
            warnings.warn(f"{who}unstable at {when}: {instability.reason}", RuntimeWarning, stacklevel=3)
        self._unstable = True


def check_action(action: str, actions: Sequence[str]) -> str:
    if action not in actions:
        raise ValueError(f"action must be one of {list(actions)}, got {action!r}")
    return action
