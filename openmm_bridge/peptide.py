"""A capped peptide under Amber14 in OpenMM: the system of ``stable-md data amber-peptide``.

The heavy atoms come in by residue and PDB name (``stable_md.refdata.peptide_md`` builds them for
Ac-(Ala)n-NHMe); OpenMM's Modeller adds the hydrogens by its residue templates, and the System is
amber14-all in vacuum (no cutoff) or with OBC2 implicit solvent, every bond flexible (an ML potential's
training data needs the X-H vibrations).
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from openmm_bridge.labelled_md import LabelledSimulation
from stable_md.units import NM_IN_ANGSTROM

SOLVENTS = {"vacuum": ("amber14-all.xml",), "obc2": ("amber14-all.xml", "implicit/obc2.xml")}


def peptide_topology(heavy_atoms: Sequence[tuple[int, str, str, int, np.ndarray]], solvent: str = "vacuum",
                     seed: int = 0) -> tuple[app.Topology, np.ndarray, app.ForceField]:
    """Topology and positions [N, 3] Å of the peptide whose heavy atoms are ``(residue index, residue name, atom
    name, atomic number, position Å)`` in chain order, with hydrogens added by OpenMM's Modeller (from ``seed``);
    and the force field of ``solvent``."""
    if solvent not in SOLVENTS:
        raise ValueError(f"unknown solvent {solvent!r}; expected one of {list(SOLVENTS)}")
    topology = app.Topology()
    chain = topology.addChain()
    residues: dict[int, app.topology.Residue] = {}
    positions = []
    for index, residue_name, atom_name, number, position in heavy_atoms:
        if index not in residues:
            residues[index] = topology.addResidue(residue_name, chain)
        topology.addAtom(atom_name, app.Element.getByAtomicNumber(int(number)), residues[index])
        positions.append(np.asarray(position, dtype=np.float64))
    topology.createStandardBonds()
    forcefield = app.ForceField(*SOLVENTS[solvent])
    modeller = app.Modeller(topology, np.array(positions) / NM_IN_ANGSTROM * unit.nanometer)
    # Modeller starts hydrogens at positions drawn from Python's global random stream and relaxes them on the
    # default platform: a seeded stream (the caller's left as it was) and the Reference platform make the
    # structure, and so the whole data set, the same on every run
    state = random.getstate()
    random.seed(seed)
    try:
        modeller.addHydrogens(forcefield, platform=openmm.Platform.getPlatformByName("Reference"))
    finally:
        random.setstate(state)
    coordinates = np.asarray(modeller.getPositions().value_in_unit(unit.angstrom))
    return modeller.topology, coordinates, forcefield


class PeptideSimulation(LabelledSimulation):
    """The peptide under a Langevin thermostat (LangevinMiddle), one Context, no box.

    Parameters: ``heavy_atoms`` (see :func:`peptide_topology`), ``solvent`` (vacuum or obc2),
    ``temperature`` K, ``timestep`` fs, ``friction`` 1/ps, ``seed`` (hydrogens, velocities and noise), OpenMM
    ``platform``.
    """

    def __init__(self, heavy_atoms, solvent: str, temperature: float, timestep: float, friction: float,
                 seed: int, platform: str = "CPU") -> None:
        self.topology, start_positions, forcefield = peptide_topology(heavy_atoms, solvent, seed)
        system = forcefield.createSystem(self.topology, nonbondedMethod=app.NoCutoff, constraints=None,
                                         rigidWater=False)
        numbers = np.array([atom.element.atomic_number for atom in self.topology.atoms()])
        super().__init__(system, numbers, start_positions, temperature, timestep, friction, seed, platform)
