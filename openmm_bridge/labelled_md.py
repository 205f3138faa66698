"""One OpenMM Context under a Langevin thermostat whose frames become labelled reference data.

What ``stable_md.refdata.openmm_md.run_labelled_md`` drives: :class:`openmm_bridge.water_box.WaterSimulation`
and :class:`openmm_bridge.peptide.PeptideSimulation` differ only in the System they build. Units at this API:
Å, fs, K, 1/ps, eV.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import openmm
from openmm import unit

from stable_md.units import KJ_PER_MOL_IN_EV, NM_IN_ANGSTROM


class LabelledSimulation:
    """``system`` of atoms ``numbers`` [N] under LangevinMiddle at ``temperature`` K (``timestep`` fs, ``friction``
    1/ps, noise and velocities from ``seed``), one Context on OpenMM ``platform`` (one thread on the CPU);
    ``cell`` [3, 3] Å for a periodic box (frames are then wrapped into it), None for a molecule."""

    #: eV per kJ/mol of the frames' energies and forces (a subclass may keep the value its files were made with)
    ev_per_kj_mol: float = KJ_PER_MOL_IN_EV

    def __init__(self, system: openmm.System, numbers: np.ndarray, start_positions: np.ndarray, temperature: float,
                 timestep: float, friction: float, seed: int, platform: str = "CPU",
                 cell: Optional[np.ndarray] = None) -> None:
        self.numbers, self.start_positions, self.cell = np.asarray(numbers), start_positions, cell
        self.temperature, self.seed = temperature, seed
        self.integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, friction / unit.picosecond,
                                                          timestep * unit.femtosecond)
        self.integrator.setRandomNumberSeed(seed + 1)
        properties = {"Threads": "1"} if platform == "CPU" else {}
        self.context = openmm.Context(system, self.integrator, openmm.Platform.getPlatformByName(platform),
                                      properties)

    def start(self) -> None:
        """Minimize from the start positions and draw velocities at the temperature."""
        self.context.setPositions(self.start_positions / NM_IN_ANGSTROM * unit.nanometer)
        openmm.LocalEnergyMinimizer.minimize(self.context, 10.0, 1000)
        self.context.setVelocitiesToTemperature(self.temperature * unit.kelvin, self.seed + 1)

    def step(self, n_steps: int) -> None:
        self.integrator.step(int(n_steps))

    def labelled_frame(self) -> tuple[np.ndarray, float, np.ndarray]:
        """Positions [N, 3] Å (wrapped into the box, if any), potential energy (eV) and forces [N, 3] (eV/Å)."""
        state = self.context.getState(getPositions=True, getEnergy=True, getForces=True,
                                      enforcePeriodicBox=self.cell is not None)
        positions = np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.angstrom))
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) * self.ev_per_kj_mol
        forces = np.asarray(state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.angstrom))
        return positions, float(energy), forces * self.ev_per_kj_mol

    def velocities(self) -> np.ndarray:
        """Velocities [N, 3] in Å/fs (LangevinMiddle's: half a step behind the positions)."""
        state = self.context.getState(getVelocities=True)
        return np.asarray(state.getVelocities(asNumpy=True).value_in_unit(unit.angstrom / unit.femtosecond))

    def checkpoint(self) -> bytes:
        """The Context's exact state (positions, velocities, random stream)."""
        return self.context.createCheckpoint()

    def load(self, checkpoint: bytes) -> None:
        self.context.loadCheckpoint(checkpoint)
