"""The stability guard as an ASE observer: ``dyn.attach(StabilityObserver(atoms, guard, dynamics=dyn), interval=10)``.

See :mod:`stable_md.guard` for the guard and its reference.
"""
from __future__ import annotations

import os
from typing import IO, Optional

import numpy as np

from stable_md.guard import GuardRecord, Instability, StabilityGuard, check_action


class StabilityObserver:
    """An ASE observer: ``dyn.attach(StabilityObserver(atoms, guard, dynamics=dyn), interval=10)``.

    Checks ``atoms`` (with the forces its calculator last computed, never computing new ones) each time
    the dynamics calls it. ``action="stop"`` raises :class:`InstabilityError` out of ``dyn.run``;
    ``"warn"`` writes to ``log`` and warns once per unstable stretch. The step is ``dynamics.nsteps``
    when ``dynamics`` is given, else the number of checks so far.
    """

    def __init__(self, atoms, guard: StabilityGuard, dynamics=None, action: str = "stop",
                 log: Optional[str | os.PathLike | IO[str]] = None) -> None:
        self.atoms, self.guard, self.dynamics = atoms, guard, dynamics
        self.action = check_action(action, ("stop", "warn"))
        self.record = GuardRecord(log)
        self.checks = 0

    @property
    def events(self) -> list[tuple[int, Instability]]:
        """(step, instability) of every unstable check."""
        return self.record.events

    def __call__(self) -> None:
        self.checks += 1
        forces = None
        if self.atoms.calc is not None:
            try:
                forces = self.atoms.calc.get_property("forces", self.atoms, allow_calculation=False)
            except Exception:  # a calculator without cached forces, or one that cannot give them
                forces = None
        cell = np.asarray(self.atoms.cell) if self.atoms.pbc.all() else None
        instability = self.guard.check(self.atoms.positions, forces, cell)
        if instability is None:
            self.record.stable()
            return
        step = int(getattr(self.dynamics, "nsteps", self.checks)) if self.dynamics is not None else self.checks
        time_ps = None
        if self.dynamics is not None and hasattr(self.dynamics, "dt"):
            from ase import units

            time_ps = step * self.dynamics.dt / (1000 * units.fs)
        self.record.unstable(step, time_ps, instability, self.action)
        if self.action == "stop":
            raise self.guard.error(instability, step, time_ps)
