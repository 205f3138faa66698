"""The stability guard as an OpenMM reporter for ``openmm.app.Simulation``.

    simulation.reporters.append(StabilityReporter("model.stable.pt", 100, atoms=ml_atoms, log="guard.log"))

Every ``reportInterval`` steps it checks the guarded atoms (all, or the ML subset of a mixed System)
with their forces. On an unstable frame it writes the step, the time and the reason to ``log`` and:

- ``action="stop"`` (default): raises :class:`~stable_md.guard.InstabilityError` out of
  ``simulation.step``, which you can catch;
- ``"warn"``: warns once per unstable stretch and goes on;
- ``"rewind"``: returns to the last stable check (a checkpoint held in memory), draws new velocities at
  the integrator's temperature so the run does not replay the same path, and goes on; after
  ``maxRewinds`` rewinds it stops as ``"stop"`` does.

Between checks OpenMM itself stops on what no step can integrate (non-finite positions, or a model force
above 1000 eV/Å): ``simulation.step`` then raises ``openmm.OpenMMException`` with the model's message, which
no reporter sees; catch it beside :class:`~stable_md.guard.InstabilityError`. With ``"rewind"`` the
reporter must be the last in ``simulation.reporters`` (so that none records the discarded state), and the
global parameters set since the checkpoint are kept.

Given a model file instead of a :class:`~stable_md.guard.StabilityGuard`, it builds one at its first
report: the bonds the model stores when its atoms are the guarded ones, else those of the structure
at that first report. It follows OpenMM's reporter protocol and imports no OpenMM (state values are
read in OpenMM's own units, nm and kJ/mol/nm).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Optional, Sequence

import numpy as np

from stable_md.guard import GuardRecord, Instability, StabilityGuard, check_action
from stable_md.units import EV_PER_ANGSTROM_IN_KJ_PER_MOL_NM, NM_IN_ANGSTROM

ACTIONS = ("stop", "warn", "rewind")


class StabilityReporter:
    """An OpenMM reporter that guards a simulation; see the module docstring."""

    def __init__(self, guard: StabilityGuard | str | os.PathLike, reportInterval: int, action: str = "stop",
                 log: Optional[str | os.PathLike | IO[str]] = None, atoms: Optional[Sequence[int]] = None,
                 criterion: str = "bond", threshold: Optional[float] = None, maxRewinds: int = 5,
                 seed: Optional[int] = None) -> None:
        if int(reportInterval) < 1:
            raise ValueError(f"reportInterval must be at least 1 step, got {reportInterval}")
        if int(maxRewinds) < 0:
            raise ValueError(f"maxRewinds must be >= 0, got {maxRewinds}")
        self.interval = int(reportInterval)
        self.action = check_action(action, ACTIONS)
        self.record = GuardRecord(log)
        self.guard = guard if isinstance(guard, StabilityGuard) else None
        self.model = None
        if not isinstance(guard, StabilityGuard):  # checked now, not steps later, and whatever the directory then
            from stable_md.potentials.model_file import read_metadata

            self.model = Path(guard).resolve()
            read_metadata(self.model)
        self.atoms = None if atoms is None else [int(a) for a in atoms]
        self.criterion, self.threshold = criterion, threshold
        self.max_rewinds, self.rewinds = int(maxRewinds), 0
        self.rng = np.random.default_rng(seed)
        self._last_stable: Optional[tuple[bytes, int]] = None
        self._simulation = None  # the one being guarded: a reporter reused on another starts afresh
        self._built_guard = self.guard is None

    @property
    def events(self) -> list[tuple[int, Instability]]:
        """(step, instability) of every unstable check of the simulation guarded now."""
        return self.record.events

    def describeNextReport(self, simulation) -> dict:
        steps = self.interval - simulation.currentStep % self.interval
        # unwrapped positions: a molecule is never split across the box (criteria use the minimum image anyway)
        return {"steps": steps, "periodic": False, "include": ["positions", "forces"]}

    def report(self, simulation, state) -> None:
        if simulation is not self._simulation:
            self._start(simulation)
        if self.action == "rewind" and simulation.reporters and simulation.reporters[-1] is not self:
            # reporters after it in the same round would record the unstable state under the rewound step
            raise ValueError("StabilityReporter(action='rewind') must be the last of simulation.reporters: append "
                             "it after the others")
        positions = _in_nm(state.getPositions(asNumpy=True), "positions") * NM_IN_ANGSTROM
        forces = _in_kj_per_mol_nm(state.getForces(asNumpy=True)) / EV_PER_ANGSTROM_IN_KJ_PER_MOL_NM
        if self.guard is None:
            self.guard = self._guard_for(simulation, positions, state)
        instability = self.guard.check(positions, forces, _periodic_box(simulation, state))
        time = state.getTime()
        step, time_ps = int(simulation.currentStep), float(time.value_in_unit(time.unit))
        if instability is None:
            self.record.stable()
            if self.action == "rewind":
                self._last_stable = (simulation.context.createCheckpoint(), step)
            return
        self.record.unstable(step, time_ps, instability, self.action, who="StabilityReporter: ")
        if self.action == "warn":
            return
        if self.action == "rewind" and self._last_stable is not None and self.rewinds < self.max_rewinds:
            self._rewind(simulation)
            return
        note = "" if self.action == "stop" else (
            f" (after {self.rewinds} rewinds)" if self._last_stable is not None else " (no stable check to rewind to)")
        raise self.guard.error(instability, step, time_ps, where=f"StabilityReporter{note}: ")

    def _start(self, simulation) -> None:
        """Forget another simulation's state, and check what a rewind needs."""
        self._simulation = simulation
        self.record.reset()
        self.rewinds, self._last_stable = 0, None
        if self._built_guard:
            self.guard = None
        if self.action != "rewind":
            return
        if not hasattr(simulation.integrator, "getTemperature"):
            raise ValueError(f"StabilityReporter(action='rewind') draws new velocities at the integrator's "
                             f"temperature, and {type(simulation.integrator).__name__} has none; use a thermostat "
                             f"integrator (LangevinMiddleIntegrator, NoseHooverIntegrator) or action='stop'")

    def _rewind(self, simulation) -> None:
        checkpoint, step = self._last_stable
        # a checkpoint holds the global parameters too: keep the ones set since (lambda schedules, restraints)
        parameters = dict(simulation.context.getParameters())
        simulation.context.loadCheckpoint(checkpoint)
        for name, value in parameters.items():
            simulation.context.setParameter(name, value)
        simulation.currentStep = step
        temperature = simulation.integrator.getTemperature()
        # the checkpoint restores the random stream too: new velocities keep the run from replaying the same path
        simulation.context.setVelocitiesToTemperature(temperature, int(self.rng.integers(1, 2**31 - 1)))
        self.guard.reset()
        self.rewinds += 1
        self.record.log.write(f"rewound to step {step} (rewind {self.rewinds} of at most {self.max_rewinds}), new "
                       f"velocities at {temperature}")

    def _guard_for(self, simulation, positions: np.ndarray, state) -> StabilityGuard:
        atoms = list(simulation.topology.atoms())
        chosen = range(len(atoms)) if self.atoms is None else self.atoms
        numbers = [atoms[a].element.atomic_number for a in chosen]
        cell = _periodic_box(simulation, state)
        return StabilityGuard.from_model(self.model, numbers, positions[list(chosen)], cell, self.criterion,
                                         self.threshold, self.atoms)


def _periodic_box(simulation, state) -> Optional[np.ndarray]:
    """The box now (Å), or None for a non-periodic simulation."""
    if simulation.topology.getPeriodicBoxVectors() is None:
        return None
    return _in_nm(state.getPeriodicBoxVectors(asNumpy=True), "box") * NM_IN_ANGSTROM


def _in_nm(quantity, what: str) -> np.ndarray:
    """OpenMM's State gives positions and boxes in nm; read them without importing OpenMM's unit module."""
    if quantity.unit.get_name() != "nanometer":
        raise ValueError(f"expected {what} in nanometers from OpenMM, got {quantity.unit}")
    return np.asarray(quantity.value_in_unit(quantity.unit), dtype=np.float64)


def _in_kj_per_mol_nm(quantity) -> np.ndarray:
    name = quantity.unit.get_name()
    if "kilojoule" not in name or "nanometer" not in name:
        raise ValueError(f"expected forces in kJ/mol/nm from OpenMM, got {quantity.unit}")
    return np.asarray(quantity.value_in_unit(quantity.unit), dtype=np.float64)
