"""Flexible SPC/Fw water in OpenMM: a box of N molecules, its System, and a Langevin simulation of it.

The engine half of ``stable-md data water`` (the generator, its files and its resume logic are
:mod:`stable_md.refdata.water_md`). Cubic box at a given density, PME electrostatics with a
long-range LJ correction, constant volume. The force field is ``forcefields/spcfw.xml``
(Wu, Tepper & Voth 2006; OpenMM ships none). Units at this API: Å, fs, K, 1/ps, eV.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

from openmm_bridge.labelled_md import LabelledSimulation
from stable_md.units import NM_IN_ANGSTROM

FORCEFIELD = Path(__file__).with_name("forcefields") / "spcfw.xml"
# 1 / 96.48533212 (CODATA): the water data have always been written with this value, a little more precise than
# stable_md.units' (the two differ by 1e-8 relative); kept so that regenerated and resumed files do not change.
KJ_PER_MOL_IN_EV = 0.010364269656262174
WATER_MASS_AMU = 18.01528
AVOGADRO = 6.02214076e23
# SPC/Fw equilibrium geometry (Å, degrees), used to build the starting box.
OH_LENGTH = 1.012
HOH_ANGLE = 113.24


def box_length(n_molecules: int, density: float) -> float:
    """Edge (Å) of the cubic box holding ``n_molecules`` waters at ``density`` g/cm³."""
    volume_cm3 = n_molecules * WATER_MASS_AMU / (density * AVOGADRO)
    return (volume_cm3 * 1e24) ** (1.0 / 3.0)


def build_box(n_molecules: int, density: float, seed: int = 0) -> tuple[app.Topology, np.ndarray, float]:
    """Randomly oriented waters on a grid: topology, positions [3n, 3] Å (O, H1, H2 each) and box edge (Å)."""
    if n_molecules < 2:
        raise ValueError(f"a water box needs at least 2 molecules, got {n_molecules}")
    if not density > 0:
        raise ValueError(f"density must be > 0 g/cm³, got {density}")
    length = box_length(n_molecules, density)
    per_side = int(np.ceil(n_molecules ** (1.0 / 3.0)))
    spacing = length / per_side
    rng = np.random.default_rng(seed)
    sites = np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    sites = sites[rng.permutation(len(sites))[:n_molecules]]
    half = np.radians(HOH_ANGLE) / 2
    local = np.array([[0.0, 0.0, 0.0],
                      [OH_LENGTH * np.sin(half), 0.0, OH_LENGTH * np.cos(half)],
                      [-OH_LENGTH * np.sin(half), 0.0, OH_LENGTH * np.cos(half)]])
    positions = []
    for site in sites:
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        positions.append((site + 0.5) * spacing + local @ rotation.T)
    topology = app.Topology()
    chain = topology.addChain()
    oxygen, hydrogen = app.Element.getBySymbol("O"), app.Element.getBySymbol("H")
    for _ in range(n_molecules):
        residue = topology.addResidue("HOH", chain)
        o = topology.addAtom("O", oxygen, residue)
        h1 = topology.addAtom("H1", hydrogen, residue)
        h2 = topology.addAtom("H2", hydrogen, residue)
        topology.addBond(o, h1)
        topology.addBond(o, h2)
    topology.setPeriodicBoxVectors(np.eye(3) * length / NM_IN_ANGSTROM * unit.nanometer)
    return topology, np.concatenate(positions), length


def water_system(topology: app.Topology, length: float) -> openmm.System:
    """SPC/Fw System with PME; real-space cutoff min(9 Å, 0.49 box) and a long-range LJ correction."""
    forcefield = app.ForceField(str(FORCEFIELD))
    cutoff = min(0.9, 0.49 * length / NM_IN_ANGSTROM)
    system = forcefield.createSystem(topology, nonbondedMethod=app.PME, nonbondedCutoff=cutoff * unit.nanometer,
                                     constraints=None, rigidWater=False)
    for force in system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            force.setUseDispersionCorrection(True)
            force.setEwaldErrorTolerance(1e-5)
    return system


class WaterSimulation(LabelledSimulation):
    """SPC/Fw water in a cubic box under a Langevin thermostat (LangevinMiddle), one Context.

    Parameters: ``n_molecules``, ``density`` g/cm³, ``temperature`` K, ``timestep`` fs,
    ``friction`` 1/ps, ``seed`` (box, velocities and noise), OpenMM ``platform``.
    """

    ev_per_kj_mol = KJ_PER_MOL_IN_EV

    def __init__(self, n_molecules: int, density: float, temperature: float, timestep: float, friction: float,
                 seed: int, platform: str = "CPU") -> None:
        topology, start_positions, self.length = build_box(n_molecules, density, seed)
        super().__init__(water_system(topology, self.length), np.array([8, 1, 1] * n_molecules), start_positions,
                         temperature, timestep, friction, seed, platform, cell=np.eye(3) * self.length)
