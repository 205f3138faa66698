"""An OpenMM Topology for a molecule known only by atomic numbers and bonds (what our data files hold).

OpenMM's ForceField matches residue templates by elements and bonds, not by atom names, so such a
Topology takes a user's MM force field for the molecule (e.g. ``data/ethanol_mm.xml``), can be
solvated with ``openmm.app.Modeller`` and passed to ``MLPotential('stable-md').createMixedSystem``.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit


def molecule_topology(numbers: Sequence[int], bonds: Sequence[Sequence[int]], residue: str = "MOL",
                      box_angstrom: Optional[np.ndarray] = None) -> app.Topology:
    """One chain, one residue ``residue`` with atoms named by element and count (C1, C2, O1, H1, ...), in
    the order of ``numbers``, bonded by the index pairs ``bonds``; ``box_angstrom`` [3, 3] Å makes it periodic."""
    topology = app.Topology()
    chain = topology.addChain()
    residue_object = topology.addResidue(residue, chain)
    counts: Counter = Counter()
    atoms = []
    for index, number in enumerate(numbers):
        try:
            element = app.Element.getByAtomicNumber(int(number))
        except KeyError:
            raise ValueError(f"atom {index}: {number} is not an atomic number") from None
        counts[element.symbol] += 1
        atoms.append(topology.addAtom(f"{element.symbol}{counts[element.symbol]}", element, residue_object))
    for i, j in bonds:
        if not (0 <= int(i) < len(atoms) and 0 <= int(j) < len(atoms)) or int(i) == int(j):
            raise ValueError(f"bond ({i}, {j}) does not join two of the {len(atoms)} atoms")
        topology.addBond(atoms[int(i)], atoms[int(j)])
    if box_angstrom is not None:
        rows = np.asarray(box_angstrom, dtype=float).reshape(3, 3) / 10.0
        topology.setPeriodicBoxVectors([openmm.Vec3(*row) for row in rows] * unit.nanometer)
    return topology
