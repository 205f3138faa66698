"""A model's atoms inside MM surroundings (a solute in MM water): the mixed ML/MM system replicas run in.

The user's MM System (every particle, e.g. ``ForceField.createSystem`` of a solvated topology) becomes
the mixed System of OpenMM-ML's ``createMixedSystem`` with the ``stable-md`` potential: its mechanical
embedding removes the MM terms among the model's atoms (bonds, angles, torsions, their Lennard-Jones
and Coulomb pairs, constraints), so a replica here runs exactly the Hamiltonian a production
``MLPotential('stable-md').createMixedSystem(...)`` run uses. :meth:`MMEnvironment.template` is that
System without the model's force; :class:`openmm_bridge.engines.PerReplicaEngine` copies it once per
replica and adds the model's force on the model's atoms alone (``PythonForce.setParticles``).

>>> environment = MMEnvironment.from_files("solvated.pdb", "system.xml", "resname:ETH")
>>> replicas = ReplicaSet(model, environment.numbers, environment.positions, n_replicas=8,
...                       environment=environment, mode="per-replica")

Units here are stable-md's: positions and the box in Å, masses in amu.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

from stable_md.files import file_sha256
from stable_md.units import NM_IN_ANGSTROM

# Forces a replica set cannot run under: each replica is held at constant volume and thermostatted by its
# own integrator (refine's and evaluate's protocol), so another thermostat or a barostat would change the
# ensemble the Boltzmann estimator assumes.
_REFUSED_FORCES = {
    "MonteCarloBarostat": "a barostat: replicas run at constant volume (equilibrate the density first, then "
                          "save the System without its barostat)",
    "MonteCarloAnisotropicBarostat": "a barostat: replicas run at constant volume",
    "MonteCarloFlexibleBarostat": "a barostat: replicas run at constant volume",
    "MonteCarloMembraneBarostat": "a barostat: replicas run at constant volume",
    "AndersenThermostat": "a thermostat force: the replicas' thermostat is the --integrator's",
}
STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdbx")


class MMEnvironment:
    """The particles around the model's atoms and the MM force field that acts on them.

    Parameters
    ----------
    topology:
        OpenMM Topology of every particle (elements of the model's atoms are read from it; a
        periodic box, if any, is the replicas' box).
    mm_system:
        OpenMM System of every particle, modelled entirely by the MM force field (the model's atoms
        too: OpenMM-ML removes what the model replaces).
    model_atoms:
        Particle indices the model computes, in the order of the model's atoms; they must form whole
        molecules (no bond to a particle outside).
    positions:
        [P, 3] Å, every particle: where the replicas start.
    source:
        What the environment was read from, for messages.
    """

    def __init__(self, topology: app.Topology, mm_system: openmm.System, model_atoms: Sequence[int],
                 positions: np.ndarray, source: str = "the MM environment") -> None:
        self.source = source
        self.topology = topology
        self.mm_system = mm_system
        n_particles = mm_system.getNumParticles()
        if topology.getNumAtoms() != n_particles:
            raise ValueError(f"{source}: the structure has {topology.getNumAtoms()} atoms but the MM System "
                             f"{n_particles} particles; they must describe the same particles in the same order")
        positions = np.asarray(positions, dtype=np.float64)
        if positions.shape != (n_particles, 3) or not np.isfinite(positions).all():
            raise ValueError(f"{source}: positions must be {n_particles} finite [x, y, z] rows in Å, got shape "
                             f"{positions.shape}")
        self.positions = positions
        self.model_atoms = _checked_atoms(model_atoms, n_particles, source)
        atoms = list(topology.atoms())
        numbers = []
        for index in self.model_atoms:
            element = atoms[index].element
            if element is None or mm_system.isVirtualSite(int(index)) or mm_system.getParticleMass(int(index)) \
                    .value_in_unit(unit.dalton) == 0:
                raise ValueError(f"{source}: model atom {index} ({atoms[index].name}) is a virtual site or has no "
                                 f"element or mass; the model computes real atoms only")
            numbers.append(int(element.atomic_number))
        self.numbers = np.asarray(numbers, dtype=np.int64)
        _check_whole_molecules(topology, mm_system, self.model_atoms, source)
        for force in mm_system.getForces():
            why = _REFUSED_FORCES.get(type(force).__name__)
            if why is not None:
                raise ValueError(f"{source}: the MM System holds {type(force).__name__}, {why}")
        self.masses = np.array([mm_system.getParticleMass(i).value_in_unit(unit.dalton)
                                for i in range(n_particles)], dtype=np.float64)
        self.box = _box_angstrom(topology, mm_system)
        self.positions = whole_molecules(self.positions, topology, self.model_atoms, self.box)
        self.files: dict[str, str] = {}  # content hashes of the files it was read from (from_files)

    @property
    def n_particles(self) -> int:
        return len(self.masses)

    @classmethod
    def from_files(cls, structure: str | os.PathLike, system: str | os.PathLike,
                   model_atoms: str | Sequence[int]) -> "MMEnvironment":
        """Read the environment from a PDB or PDBx/mmCIF ``structure`` (topology, positions, box), an OpenMM
        System XML file ``system`` (e.g. ``XmlSerializer.serialize(forcefield.createSystem(topology, ...))``)
        and a selection ``model_atoms`` (see :func:`select_atoms`)."""
        structure, system = Path(structure).resolve(), Path(system).resolve()
        topology, positions = read_structure(structure)
        from openmm_bridge.serialization import load_system

        try:
            mm_system = load_system(system)
        except (openmm.OpenMMException, ValueError) as error:
            raise ValueError(f"--mm-system {system}: not an OpenMM System XML file ({error})") from error
        if isinstance(model_atoms, str):
            model_atoms = select_atoms(topology, model_atoms, f"--model-atoms for {structure}")
        environment = cls(topology, mm_system, model_atoms, positions, source=f"{structure} with {system}")
        environment.files = {"structure_sha256": file_sha256(structure), "system_sha256": file_sha256(system)}
        return environment

    def template(self, model) -> openmm.System:
        """The mixed System of every particle without the model's force: OpenMM-ML's ``createMixedSystem`` of
        the ``stable-md`` potential (``model``, a module or ModelFile, supplies only the elements check), with
        the force that potential adds taken out again, so an engine adds its own per replica."""
        from openmmml import MLPotential

        from openmm_bridge.forces import FORCE_NAME

        mixed = MLPotential("stable-md", model=model).createMixedSystem(self._embedding_topology(), self.mm_system,
                                                                         self.model_atoms.tolist())
        if mixed.getNumParticles() != self.n_particles:  # link atoms; _check_whole_molecules prevents them
            raise ValueError(f"{self.source}: OpenMM-ML added particles to the System (link atoms?); the model's "
                             f"atoms must be whole molecules")
        for index in reversed(range(mixed.getNumForces())):
            if mixed.getForce(index).getName() == FORCE_NAME:
                mixed.removeForce(index)
        return mixed

    def _embedding_topology(self) -> app.Topology:
        """The topology OpenMM-ML is given: the replicas' box (none for a non-periodic System, whatever CRYST1
        line the file had), and a placeholder element for virtual sites (TIP4P's M), which OpenMM-ML reads an
        atomic number of although only link atoms would use it."""
        topology = copy.deepcopy(self.topology)
        for atom in topology.atoms():
            if atom.element is None:
                atom.element = app.element.hydrogen
        box = None if self.box is None else [openmm.Vec3(*row) for row in self.box / NM_IN_ANGSTROM] * unit.nanometer
        topology.setPeriodicBoxVectors(box)
        return topology

    def record(self) -> dict:
        """What a run's settings keep of the environment (compared on resume)."""
        return {"environment": self.source, "model_atoms": self.model_atoms.tolist(),
                "particles": self.n_particles, **self.files}


def degrees_of_freedom(system: openmm.System) -> int:
    """OpenMM's count for a System's temperature: 3 per massive particle, less one per constraint between
    massive particles, less 3 when a CMMotionRemover holds the centre of mass."""
    massive = [system.getParticleMass(i).value_in_unit(unit.dalton) > 0 for i in range(system.getNumParticles())]
    count = 3 * sum(massive)
    for k in range(system.getNumConstraints()):
        i, j, _ = system.getConstraintParameters(k)
        if massive[i] and massive[j]:
            count -= 1
    if any(isinstance(force, openmm.CMMotionRemover) for force in system.getForces()):
        count -= 3
    return count


def read_structure(path: str | os.PathLike) -> tuple[app.Topology, np.ndarray]:
    """Topology and positions [P, 3] Å of a PDB or PDBx/mmCIF file (OpenMM's readers: residues, bonds, box)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in STRUCTURE_SUFFIXES:
        raise ValueError(f"{path}: a structure with MM surroundings must be a PDB or PDBx/mmCIF file "
                         f"({', '.join(STRUCTURE_SUFFIXES)}), which hold the residues and bonds the force field "
                         f"needs; got {suffix or 'no suffix'}")
    pdb = suffix in (".pdb", ".ent")
    reader = app.PDBFile if pdb else app.PDBxFile
    try:
        structure = reader(str(path))
    except Exception as error:  # OpenMM's readers raise anything from ValueError to IndexError on bad files
        raise ValueError(f"{path}: cannot read it as {'PDB' if pdb else 'PDBx/mmCIF'} ({error})") \
            from error
    positions = np.asarray(structure.getPositions(asNumpy=True).value_in_unit(unit.angstrom), dtype=np.float64)
    return structure.topology, positions


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def select_atoms(topology: app.Topology, selection: str, what: str = "--model-atoms") -> list[int]:
    """Particle indices of ``selection``: ``resname:NAME`` (every atom of residues named NAME, in file
    order) or comma-separated 0-based indices and inclusive ranges, e.g. ``0-8`` or ``0-8,20``."""
    text = selection.strip()
    atoms = list(topology.atoms())
    if text.lower().startswith("resname:"):
        name = text.split(":", 1)[1].strip()
        chosen = [atom.index for atom in atoms if atom.residue.name == name]
        if not chosen:
            names = sorted({atom.residue.name for atom in atoms})
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"{what}: no residue is named {name!r}; the structure's residues are {shown}")
        return chosen
    chosen = []
    for part in text.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise ValueError(f"{what}: {part.strip()!r} is not an index or range; expected resname:NAME or "
                             f"0-based indices and inclusive ranges such as 0-8,20")
        first = int(match.group(1))
        last = first if match.group(2) is None else int(match.group(2))
        if last < first:
            raise ValueError(f"{what}: range {part.strip()} runs backwards")
        chosen.extend(range(first, last + 1))
    return chosen


def _checked_atoms(model_atoms: Sequence[int], n_particles: int, source: str) -> np.ndarray:
    indices = np.asarray(list(model_atoms), dtype=np.int64).reshape(-1)
    if len(indices) == 0:
        raise ValueError(f"{source}: no model atoms selected")
    if indices.min() < 0 or indices.max() >= n_particles:
        raise ValueError(f"{source}: model atom indices must lie in 0..{n_particles - 1}, got "
                         f"{indices[(indices < 0) | (indices >= n_particles)][:5].tolist()}")
    if len(np.unique(indices)) != len(indices):
        raise ValueError(f"{source}: a model atom is selected twice")
    if len(indices) == n_particles:
        raise ValueError(f"{source}: every particle is a model atom, so there is no MM environment; run the "
                         f"structure without --mm-system")
    return indices


def _check_whole_molecules(topology: app.Topology, system: openmm.System, model_atoms: np.ndarray,
                           source: str) -> None:
    """A bond between a model atom and an MM atom would need link atoms, which stable-md's models never saw.
    Bonds come from the topology and, as a PDB may lack CONECT records, from the System's bond terms and
    constraints."""
    inside = set(int(i) for i in model_atoms)
    pairs = [(bond[0].index, bond[1].index) for bond in topology.bonds()]
    for force in system.getForces():
        if isinstance(force, openmm.HarmonicBondForce):
            pairs += [tuple(force.getBondParameters(k)[:2]) for k in range(force.getNumBonds())]
    pairs += [tuple(system.getConstraintParameters(k)[:2]) for k in range(system.getNumConstraints())]
    atoms = list(topology.atoms())
    for a, b in pairs:
        if (a in inside) != (b in inside):
            model, other = (atoms[a], atoms[b]) if a in inside else (atoms[b], atoms[a])
            raise ValueError(f"{source}: model atom {model.index} ({model.residue.name} {model.name}) is bonded to "
                             f"atom {other.index} ({other.residue.name} {other.name}) outside the selection; select "
                             f"whole molecules")


def whole_molecules(positions: np.ndarray, topology: app.Topology, atoms: np.ndarray,
                    box: Optional[np.ndarray]) -> np.ndarray:
    """``positions`` [P, 3] Å with the molecules of ``atoms`` made whole in ``box`` [3, 3] Å: each atom moved to
    the periodic image nearest the bonded atom it is reached from (a structure file may wrap a solute through
    the box's faces; the criteria, observables and estimator measure it without a box)."""
    if box is None:
        return positions
    inside = set(int(i) for i in atoms)
    neighbours: dict[int, list[int]] = {i: [] for i in inside}
    for bond in topology.bonds():
        a, b = bond[0].index, bond[1].index
        if a in inside and b in inside:
            neighbours[a].append(b)
            neighbours[b].append(a)
    whole = positions.copy()
    inverse = np.linalg.inv(box)
    placed: set[int] = set()
    for root in (int(i) for i in atoms):
        if root in placed:
            continue
        placed.add(root)
        stack = [root]
        while stack:
            atom = stack.pop()
            for other in neighbours[atom]:
                if other in placed:
                    continue
                step = whole[other] - whole[atom]
                fractional = step @ inverse
                whole[other] = whole[atom] + (fractional - np.round(fractional)) @ box
                placed.add(other)
                stack.append(other)
    return whole


def _box_angstrom(topology: app.Topology, system: openmm.System) -> Optional[np.ndarray]:
    """[3, 3] Å: the structure's box, else the System's default box, when the System is periodic."""
    if not system.usesPeriodicBoundaryConditions():
        return None
    vectors = topology.getPeriodicBoxVectors()  # one Quantity of Vec3s; the System's, a Quantity per vector
    rows = (vectors.value_in_unit(unit.nanometer) if vectors is not None
            else [vector.value_in_unit(unit.nanometer) for vector in system.getDefaultPeriodicBoxVectors()])
    return np.array([[row.x, row.y, row.z] for row in rows]) * NM_IN_ANGSTROM
