"""The two ways to hold R replicas in OpenMM, behind one small interface used by ReplicaSet.

``BatchedEngine``: one System of R*N particles (R non-interacting copies) and one
Context; a single force evaluates the model on all running replicas as one batch.
Frozen replicas get zero mass (OpenMM integrators leave massless particles where they
are) and no thermostat, so changing the frozen set rebuilds the Context (about 1-3 ms).

``PerReplicaEngine``: R Systems of N particles and R Contexts sharing one model; a
frozen replica's Context is simply not stepped. Slower for small molecules, but each
replica's integrator state (thermostat chain, random stream) is its own. It alone runs a model
inside MM surroundings (:mod:`openmm_bridge.mm_environment`): each replica's System is a copy of
the mixed template with the model's force on the model's atoms; copies in one box would interact.

All arrays here are in OpenMM units (nm, nm/ps); ReplicaSet converts.
"""
from __future__ import annotations

import copy
from typing import Optional, Protocol, Sequence

import numpy as np
import openmm
import torch

from openmm_bridge.forces import ModelCallback, make_force
from openmm_bridge.integrators import build_integrator
from openmm_bridge.md_settings import PLATFORMS, MDSettings


def make_platform(name: str, device: str = "cpu") -> tuple[openmm.Platform, dict[str, str]]:
    """OpenMM platform ``name`` and its properties: one CPU thread (the model owns the cores), or on CUDA the
    GPU of the torch ``device`` the model runs on."""
    if name not in PLATFORMS:
        raise ValueError(f"unknown OpenMM platform {name!r}; expected one of {list(PLATFORMS)}")
    try:
        platform = openmm.Platform.getPlatformByName(name)
    except Exception as error:
        available = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
        raise ValueError(f"OpenMM platform {name!r} is not available here (available: {available}); with "
                         f"--device {device}, pass --platform CPU to integrate on the CPU while the model runs "
                         f"on {device}, or install OpenMM's CUDA platform") from error
    properties = {"Threads": "1"} if name == "CPU" else {}
    if name == "CUDA":
        # mixed: single-precision forces, double-precision integration, so that NVE and Nosé-Hoover conserve
        # their energies as on the CPU platform (CUDA's default, single, drifts)
        properties.update(DeviceIndex=str(_gpu_index(device)), Precision="mixed")
    return platform, properties


def _gpu_index(device: str) -> int:
    parsed = torch.device(device)
    if parsed.type != "cuda":
        return 0
    return parsed.index if parsed.index is not None else torch.cuda.current_device()


# Relative tolerance to which written states are put on their constraints (OpenMM's default integrator one).
CONSTRAINT_TOLERANCE = 1e-5
# A velocity along a constraint above this (nm/ps; thermal speeds are ~1) is a state off its constraints.
VELOCITY_TOLERANCE_NM_PER_PS = 1e-3


class ReplicaEngine(Protocol):
    """What :class:`openmm_bridge.replicas.ReplicaSet` needs of a way to hold R replicas in OpenMM.

    A new backend implements these and adds itself to :data:`ENGINES` under the name ``mode`` selects.
    Arrays are [R, P, 3] in nm and nm/ps (P particles per replica: the model's N atoms, plus MM
    surroundings where the engine holds them); ``frozen`` masks are [R] bool.
    """

    builds: int  # how many times the Contexts were made; snapshots record it so a rewind rebuilds alike
    restores_subsets: bool  # whether load(..., replicas=...) restores the integrator state of some replicas only

    def build(self, frozen: np.ndarray, salt: Optional[int] = None) -> None:
        """(Re)create Systems, integrators and Contexts with ``frozen`` replicas held still; state is not kept."""

    def set_frozen(self, frozen: np.ndarray) -> None:
        """Hold ``frozen`` replicas still from now on (the caller writes positions and velocities afterwards)."""

    def step(self, n_steps: int) -> None:
        """Advance the running replicas; a failure of the model is recorded (see ``nonfinite``), not raised,
        where the backend can contain it."""

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions and velocities of every replica."""

    def write(self, positions: np.ndarray, velocities: np.ndarray, replicas: Optional[np.ndarray] = None) -> None:
        """Set positions and velocities of ``replicas`` (default: every replica; arrays hold all of them)."""

    def checkpoint(self) -> tuple[bytes, ...]:
        """The exact state (one OpenMM checkpoint per Context)."""

    def load(self, checkpoints: tuple[bytes, ...], frozen: np.ndarray, salt: int,
             replicas: Optional[np.ndarray] = None) -> None:
        """Return to ``checkpoints`` (of a build with ``salt``): all replicas, or ``replicas`` where supported."""

    def nonfinite(self) -> np.ndarray:
        """[R] bool: replicas whose model evaluation gave non-finite or exploding values since the last clear."""

    def clear_nonfinite(self) -> None:
        ...

    def last_error(self) -> Optional[BaseException]:
        """An exception the model raised that stopped the whole set (then re-raised by the caller), once."""

    def replica_error(self, replica: int) -> Optional[BaseException]:
        """The exception that stopped one replica alone, if the backend keeps them apart."""


class _Engine:
    """Common state: layout, masses, integrator settings, box.

    ``masses`` [P] amu of every particle of a replica; ``template``: a System of those P particles to copy
    for each replica (MM surroundings), whose ``model_atoms`` the model computes; without one, the P
    particles are the model's atoms (P = N) and nothing else acts on them.
    """

    def __init__(self, model, numbers: np.ndarray, masses: np.ndarray, n_replicas: int,
                 box_nm: Optional[np.ndarray], settings: MDSettings, backend: str,
                 platform: str, device: str, template: Optional[openmm.System] = None,
                 model_atoms: Optional[Sequence[int]] = None) -> None:
        self.model = model
        self.numbers = numbers
        self.masses = masses
        self.n_replicas = n_replicas
        self.n_atoms = len(masses)  # particles per replica
        self.template = template
        self.model_atoms = None if model_atoms is None else [int(i) for i in model_atoms]
        # the template's constraints as arrays (first atoms, second atoms, lengths in nm), to tell a written
        # state off them; None without any
        self._constraints = None
        if template is not None and template.getNumConstraints():
            rows = [template.getConstraintParameters(k) for k in range(template.getNumConstraints())]
            self._constraints = (np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                                 np.array([r[2].value_in_unit(openmm.unit.nanometer) for r in rows]))
        self.box_nm = box_nm
        self.settings = settings
        self.backend = backend
        self.platform_name = platform
        self.device = device
        self.builds = 0

    def _new_system(self, masses: np.ndarray) -> openmm.System:
        if self.template is not None:
            system = copy.deepcopy(self.template)
        else:
            system = openmm.System()
            for mass in masses.reshape(-1):
                system.addParticle(float(mass))
        if self.box_nm is not None:
            system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in self.box_nm))
        return system

    def _new_context(self, system: openmm.System, integrator: openmm.Integrator) -> openmm.Context:
        platform, properties = make_platform(self.platform_name, self.device)
        return openmm.Context(system, integrator, platform, properties)


class BatchedEngine(_Engine):
    """All replicas in one Context."""

    restores_subsets = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.template is not None:
            raise ValueError("a model inside MM surroundings runs with one Context per replica (mode "
                             "'per-replica', --mode per-replica): copies in one box would interact")
        self.callback = ModelCallback(self.model, self.numbers, self.n_replicas, periodic=self.box_nm is not None,
                                      device=self.device, on_failure="freeze")
        self.frozen = np.zeros(self.n_replicas, dtype=bool)
        self.context: Optional[openmm.Context] = None

    def build(self, frozen: np.ndarray, salt: Optional[int] = None) -> None:
        """(Re)create System, integrator and Context for the frozen mask ``frozen`` [R]; state is not kept."""
        self.frozen = np.array(frozen, dtype=bool)
        self.builds = self.builds + 1 if salt is None else salt
        masses = np.repeat(self.masses[None, :], self.n_replicas, axis=0)
        masses[self.frozen] = 0.0
        self.system = self._new_system(masses)
        self.force = make_force(self.callback, self.backend)
        self.system.addForce(self.force)
        groups = [range(r * self.n_atoms, (r + 1) * self.n_atoms) for r in np.flatnonzero(~self.frozen)]
        self.integrator = build_integrator(self.settings, groups, salt=self.builds)
        self.callback.active[:] = ~self.frozen
        self.context = self._new_context(self.system, self.integrator)

    def step(self, n_steps: int) -> None:
        self.integrator.step(int(n_steps))

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        state = self.context.getState(getPositions=True, getVelocities=True)
        return (self._vector(state, openmm.State.Positions), self._vector(state, openmm.State.Velocities))

    def _vector(self, state: openmm.State, kind) -> np.ndarray:
        out = np.empty((self.n_replicas * self.n_atoms, 3))
        state._getVectorAsNumpy(kind, out)
        return out.reshape(self.n_replicas, self.n_atoms, 3)

    def write(self, positions: np.ndarray, velocities: np.ndarray, replicas: Optional[np.ndarray] = None) -> None:
        # one Context: every replica is written; those not named get back what read() gave, bit for bit
        self.context.setPositions(positions.reshape(-1, 3))
        self.context.setVelocities(velocities.reshape(-1, 3))

    def checkpoint(self) -> tuple[bytes, ...]:
        return (self.context.createCheckpoint(),)

    def set_frozen(self, frozen: np.ndarray) -> None:
        self.build(frozen)  # a frozen replica has zero mass and no thermostat: another System

    def load(self, checkpoints: tuple[bytes, ...], frozen: np.ndarray, salt: int,
             replicas: Optional[np.ndarray] = None) -> None:
        if replicas is not None:
            raise ValueError("the batched engine restores all replicas at once")
        if self.context is None or not np.array_equal(frozen, self.frozen) or salt != self.builds:
            self.build(frozen, salt=salt)
        self.context.loadCheckpoint(checkpoints[0])

    def nonfinite(self) -> np.ndarray:
        return self.callback.nonfinite.copy()

    def clear_nonfinite(self) -> None:
        self.callback.nonfinite[:] = False

    def last_error(self) -> Optional[BaseException]:
        error, self.callback.last_error = self.callback.last_error, None
        return error

    def replica_error(self, replica: int) -> Optional[BaseException]:
        return None  # one Context: a model error stops the set (last_error)


class PerReplicaEngine(_Engine):
    """One Context per replica, all sharing the same model module."""

    restores_subsets = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        periodic = self.box_nm is not None
        self.callbacks = [ModelCallback(self.model, self.numbers, 1, periodic=periodic, device=self.device,
                                        on_failure="freeze")
                          for _ in range(self.n_replicas)]
        self.frozen = np.zeros(self.n_replicas, dtype=bool)
        self.contexts: list[openmm.Context] = []
        self.errors: list[Optional[BaseException]] = [None] * self.n_replicas

    def build(self, frozen: np.ndarray, salt: Optional[int] = None) -> None:
        self.frozen = np.array(frozen, dtype=bool)
        self.builds = self.builds + 1 if salt is None else salt
        self.contexts, self.integrators = [], []
        for replica, callback in enumerate(self.callbacks):
            system = self._new_system(self.masses)
            force = make_force(callback, self.backend)
            if self.model_atoms is not None:
                force.setParticles(self.model_atoms)  # the callback sees the model's atoms only, in its order
            system.addForce(force)
            # Each replica its own random stream: replica index and build count both salt the seed. In MM
            # surroundings one thermostat holds the whole System, its constraints counted by OpenMM.
            groups = None if self.template is not None else [range(self.n_atoms)]
            integrator = build_integrator(self.settings, groups, salt=self.builds * 100_003 + replica)
            self.integrators.append(integrator)
            self.contexts.append(self._new_context(system, integrator))

    def step(self, n_steps: int) -> None:
        for replica in np.flatnonzero(~self.frozen):
            if self.callbacks[replica].nonfinite[0]:
                continue
            try:
                self.integrators[replica].step(int(n_steps))
            except openmm.OpenMMException as error:
                # One replica's failure stays its own: ReplicaSet freezes it at its last good state.
                self.errors[replica] = self.callbacks[replica].last_error or error
                self.callbacks[replica].nonfinite[0] = True

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        positions = np.empty((self.n_replicas, self.n_atoms, 3))
        velocities = np.empty_like(positions)
        for replica, context in enumerate(self.contexts):
            state = context.getState(getPositions=True, getVelocities=True)
            state._getVectorAsNumpy(openmm.State.Positions, positions[replica])
            state._getVectorAsNumpy(openmm.State.Velocities, velocities[replica])
        return positions, velocities

    def write(self, positions: np.ndarray, velocities: np.ndarray, replicas: Optional[np.ndarray] = None) -> None:
        chosen = range(self.n_replicas) if replicas is None else [int(r) for r in replicas]
        for replica in chosen:
            context = self.contexts[replica]
            context.setPositions(positions[replica])
            context.setVelocities(velocities[replica])
            # Rigid waters, X-H bonds: a structure file's rounded positions and velocities drawn per atom are off
            # their constraints, and the integrator would drop the velocity along them at its first step, leaving
            # the replica colder than drawn. A state read from a replica is on them and is written as it is.
            off_positions, off_velocities = self._off_constraints(positions[replica], velocities[replica])
            if off_positions:
                context.applyConstraints(CONSTRAINT_TOLERANCE)
            if off_positions or off_velocities:
                context.applyVelocityConstraints(CONSTRAINT_TOLERANCE)

    def _off_constraints(self, positions: np.ndarray, velocities: np.ndarray) -> tuple[bool, bool]:
        """Whether positions [P, 3] nm leave a constraint's length, and velocities [P, 3] nm/ps move along one,
        by more than the integrator's tolerance would leave."""
        if self._constraints is None:
            return False, False
        i, j, length = self._constraints
        bond = positions[j] - positions[i]
        distance = np.linalg.norm(bond, axis=1)
        along = np.abs(((velocities[j] - velocities[i]) * bond).sum(axis=1)) / distance
        return (bool((np.abs(distance - length) > 2 * CONSTRAINT_TOLERANCE * length).any()),
                bool((along > VELOCITY_TOLERANCE_NM_PER_PS).any()))

    def checkpoint(self) -> tuple[bytes, ...]:
        return tuple(context.createCheckpoint() for context in self.contexts)

    def load(self, checkpoints: tuple[bytes, ...], frozen: np.ndarray, salt: int,
             replicas: Optional[np.ndarray] = None) -> None:
        if not self.contexts or salt != self.builds:
            self.build(frozen, salt=salt)
        self.frozen = np.array(frozen, dtype=bool)
        chosen = range(self.n_replicas) if replicas is None else replicas
        for replica in chosen:
            self.contexts[replica].loadCheckpoint(checkpoints[replica])

    def nonfinite(self) -> np.ndarray:
        return np.array([callback.nonfinite[0] for callback in self.callbacks])

    def clear_nonfinite(self) -> None:
        for callback in self.callbacks:
            callback.nonfinite[:] = False

    def set_frozen(self, frozen: np.ndarray) -> None:
        self.frozen = np.array(frozen, dtype=bool)  # a frozen replica's Context is simply not stepped

    def last_error(self) -> Optional[BaseException]:
        return None  # per-replica failures are contained, see step()

    def potential_energies(self, frozen: Optional[np.ndarray] = None) -> np.ndarray:
        """[R] potential energy (kJ/mol) of each replica's whole System now (the model's part and the MM
        surroundings'); NaN for those ``frozen`` (default: the engine's frozen ones). ReplicaSet asks for it when
        the replicas have MM surroundings."""
        frozen = self.frozen if frozen is None else np.asarray(frozen, dtype=bool)
        energies = np.full(self.n_replicas, np.nan)
        for replica in np.flatnonzero(~frozen):
            state = self.contexts[replica].getState(getEnergy=True)
            energies[replica] = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
        return energies

    def replica_error(self, replica: int) -> Optional[BaseException]:
        return self.errors[replica]


# The backends by the name ReplicaSet's ``mode`` gives (MDSettings.mode).
ENGINES: dict[str, type] = {"batched": BatchedEngine, "per-replica": PerReplicaEngine}
