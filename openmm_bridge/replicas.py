"""R replicas of one system driven by a stable-md model in OpenMM, with snapshots, rewind and freezing.

>>> replicas = ReplicaSet("model.pt", numbers, start_positions, n_replicas=32,
...                       integrator="nose-hoover", temperature=500, timestep=0.5)
>>> before = replicas.snapshot()
>>> replicas.run(2000, reporters=[StabilityMonitor(criterion, 100), PositionSampler(10)])
>>> replicas.restore(before)            # bit-exact rewind of every replica

The run loop knows nothing about what is recorded: as in OpenMM's ``Simulation``, each
reporter (:class:`openmm_bridge.reporters.Reporter`) says how many steps remain until it
wants the next frames, and gets them then.

Units at this API are stable-md's: positions Å, velocities Å/fs, energies eV, time fs.
``mode="batched"`` (default) holds the replicas as non-interacting copies in one
Context whose single force evaluates the model on all of them as one batch;
``mode="per-replica"`` gives each its own Context (useful for large systems and as a
check). A replica whose positions, energy or forces become non-finite is marked
unstable and frozen at its last finite state; the others carry on.

With ``environment`` (an :class:`openmm_bridge.mm_environment.MMEnvironment`) the model's atoms sit in
MM surroundings (a solute in MM water): each replica is the whole mixed System, one Context per
replica (``mode="per-replica"``). The state (:meth:`~ReplicaSet.positions`, snapshots, resets) is then
every particle's, [R, P, 3]; reporters' frames hold the model's atoms (what criteria, observables and
the estimator see) and, in ``system_positions``, every particle.
"""
from __future__ import annotations

import json

import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import openmm
from ase.data import atomic_masses
import torch
from torch import nn

from openmm_bridge.engines import ENGINES, ReplicaEngine
from openmm_bridge.forces import BACKENDS, MAX_FORCE_EV_PER_A, ModelCallback
from openmm_bridge.integrators import openmm_seed
from openmm_bridge.md_settings import MDSettings
from openmm_bridge.mm_environment import MMEnvironment, degrees_of_freedom
from openmm_bridge.reporters import CallbackReporter, Reporter
from stable_md.potentials.base import model_dtype_device
from stable_md.potentials.model_file import ModelFile, load_model
from stable_md.units import (ANGSTROM_PER_FS_IN_NM_PER_PS, KB_EV_PER_K, KB_KJ_PER_MOL_K, KJ_PER_MOL_IN_EV,
                             NM_IN_ANGSTROM)

# Kinetic energy of 1 amu moving at 1 Å/fs, in eV.
AMU_ANGSTROM2_PER_FS2_IN_EV = KJ_PER_MOL_IN_EV * ANGSTROM_PER_FS_IN_NM_PER_PS ** 2
DEFAULT_CHECK_INTERVAL = 50
NONFINITE_REASON = f"non-finite or exploding energy, forces or positions (|F| > {MAX_FORCE_EV_PER_A:g} eV/Å)"


class ReplicaFrames:
    """The replicas at one moment (handed to reporters).

    positions [R, N, 3] Å and velocities [R, N, 3] Å/fs of the model's atoms; system_positions
    [R, P, 3] Å of every particle (the same array without MM surroundings); potential_energy,
    kinetic_energy [R] eV of the whole System (NaN for replicas not running); temperature [R] K
    from the internal kinetic energy (3N - 3 degrees of freedom; with MM surroundings, OpenMM's
    count for the System); running [R] bool. The potential energy costs one model evaluation, made
    the first time a reporter asks for it.
    """

    def __init__(self, step: int, time: float, positions: np.ndarray, velocities: np.ndarray,
                 kinetic_energy: np.ndarray, temperature: np.ndarray, running: np.ndarray,
                 potential_energy: Callable[[], np.ndarray] | np.ndarray,
                 system_positions: Optional[np.ndarray] = None) -> None:
        self.step, self.time = step, time
        self.positions, self.velocities = positions, velocities
        self.system_positions = positions if system_positions is None else system_positions
        self.kinetic_energy, self.temperature, self.running = kinetic_energy, temperature, running
        self._potential = potential_energy

    @property
    def potential_energy(self) -> np.ndarray:
        if callable(self._potential):
            self._potential = self._potential()
        return self._potential


@dataclass
class ReplicaSnapshot:
    """Everything needed to put the replica set back exactly where it was."""

    step: int
    positions: np.ndarray
    velocities: np.ndarray
    frozen: np.ndarray
    unstable: np.ndarray
    unstable_step: np.ndarray
    checkpoints: tuple[bytes, ...] = field(repr=False)
    build: int = 0
    reasons: dict[int, str] = field(default_factory=dict)


class ReplicaSet:
    """R replicas of one system (molecule or periodic box) in OpenMM.

    Parameters
    ----------
    model:
        Model file path, loaded :class:`ModelFile`, or Potential-like module. A module
        can be trained between calls to :meth:`run`: the PythonForce always uses its
        current parameters (a TorchForce holds a copy made when the set is built).
    numbers:
        Atomic numbers ``[N]``.
    positions:
        Starting positions in Å: ``[N, 3]`` (every replica starts there) or ``[R, N, 3]``.
    n_replicas:
        R; taken from ``positions`` when that is ``[R, N, 3]``.
    cell:
        Periodic box ``[3, 3]`` in Å (rows are box vectors, in OpenMM's reduced form:
        a along x, b in the xy plane), shared by all replicas; ``None`` for molecules.
    integrator, temperature, timestep, friction, collision_frequency, seed:
        See :class:`~openmm_bridge.md_settings.MDSettings` (K, fs, 1/ps, 1/ps); ``settings`` holds them.
    velocities:
        ``[R, N, 3]`` Å/fs; default: Maxwell-Boltzmann at ``temperature`` with each
        replica's centre-of-mass velocity removed.
    mode:
        ``batched`` or ``per-replica``.
    backend:
        ``python`` (openmm.PythonForce) or ``torch`` (openmmtorch.TorchForce).
    platform:
        OpenMM platform; default: CUDA on the model's GPU for a ``cuda`` device, else CPU.
        ``CPU`` (one thread) gives every Context its own random stream; ``Reference`` shares
        one stream across the whole process, so two replica sets (or per-replica Contexts)
        stepped in turn would change each other's noise.
    device:
        Torch device the model runs on (``cpu``, ``cuda``, ``cuda:N``); a module elsewhere is moved there.
    masses:
        ``[N]`` amu; default: standard atomic masses.
    check_interval:
        Steps between non-finite checks (freezing happens at these boundaries).
    environment:
        MM surroundings of the model's atoms (:class:`~openmm_bridge.mm_environment.MMEnvironment`):
        ``numbers`` are then the model's atoms (the environment's), ``positions`` every particle's
        (``[P, 3]`` or ``[R, P, 3]`` Å), the box and the masses the environment's (``cell`` and
        ``masses`` stay None), and ``mode`` must be ``per-replica``.
    """

    def __init__(self, model: nn.Module | ModelFile | str | os.PathLike, numbers: Sequence[int],
                 positions: np.ndarray, n_replicas: Optional[int] = None, cell: Optional[np.ndarray] = None,
                 integrator: str = "langevin", temperature: float = 300.0, timestep: float = 0.5,
                 friction: float = 1.0, collision_frequency: float = 10.0, seed: int = 0,
                 velocities: Optional[np.ndarray] = None, mode: str = "batched", backend: str = "python",
                 platform: Optional[str] = None, device: str = "cpu", masses: Optional[Sequence[float]] = None,
                 check_interval: int = DEFAULT_CHECK_INTERVAL, environment: Optional[MMEnvironment] = None
                 ) -> None:
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model, device=device)
        self.model_file = model if isinstance(model, ModelFile) else None
        self.model = model.module if isinstance(model, ModelFile) else model
        self.numbers = np.asarray(numbers, dtype=np.int64)
        if self.numbers.ndim != 1 or len(self.numbers) == 0:
            raise ValueError(f"numbers must be a 1-D list of atomic numbers, got shape {self.numbers.shape}")
        self._check_species()
        self.n_atoms = len(self.numbers)
        self.environment = environment
        # particles per replica: the model's atoms, or with MM surroundings every particle of the System
        self.n_particles = self.n_atoms if environment is None else environment.n_particles
        if environment is not None:
            _check_environment(environment, self.numbers, cell, masses, mode, backend)
        start = self._start_positions(positions, n_replicas)
        self.n_replicas = len(start)
        if backend not in BACKENDS:
            raise ValueError(f"unknown force backend {backend!r}; expected one of {list(BACKENDS)}")
        if check_interval < 1:
            raise ValueError(f"check_interval must be at least 1 step, got {check_interval}")
        # checks the integrator, the mode, the platform and that the numbers are positive
        self.settings = MDSettings(integrator=integrator, temperature=float(temperature), timestep=float(timestep),
                                   friction=float(friction), collision_frequency=float(collision_frequency),
                                   seed=int(seed), platform=platform, mode=mode, device=str(device))
        if backend == "torch" and torch.device(device).type == "cuda" and self.settings.platform != "CUDA":
            raise ValueError(f"--force torch runs the model inside OpenMM, on the {self.settings.platform} "
                             f"platform's CPU, while --device {device} puts it on a GPU: use --platform CUDA, or "
                             f"--force python")
        if model_dtype_device(self.model)[1] != torch.device(device):
            self.model.to(device)  # in place: a refine's optimizer keeps the module's parameters
        self.mode, self.backend, self.check_interval = mode, backend, int(check_interval)
        self.masses = environment.masses if environment is not None else self._masses(masses)
        box = cell if environment is None else environment.box
        self.cell = None if box is None else _reduced_box(box)
        box_nm = None if self.cell is None else self.cell / NM_IN_ANGSTROM
        template = None if environment is None else environment.template(self.model)
        model_atoms = None if environment is None else environment.model_atoms
        # what temperatures are measured over: the model's atoms (3N - 3), or OpenMM's count for the mixed System
        self._degrees_of_freedom = None if template is None else degrees_of_freedom(template)
        self._engine: ReplicaEngine = ENGINES[mode](self.model, self.numbers, self.masses, self.n_replicas, box_nm,
                                                    self.settings, backend, self.settings.platform, device,
                                                    template=template, model_atoms=model_atoms)
        # Energies for reports come from their own batched evaluator, whatever the force backend (with MM
        # surroundings: from each replica's Context, the MM part included).
        self._energy_evaluator = None if environment is not None else ModelCallback(
            self.model, self.numbers, self.n_replicas, periodic=self.cell is not None, device=device,
            on_failure="freeze")
        self.frozen = np.zeros(self.n_replicas, dtype=bool)
        self.unstable = np.zeros(self.n_replicas, dtype=bool)
        # Step at which each replica was found unstable (-1: never).
        self.unstable_step = np.full(self.n_replicas, -1, dtype=np.int64)
        # Why each unstable replica was stopped (non-finite values, a model error, a criterion's verdict).
        self.reasons: dict[int, str] = {}
        self.step = 0
        self._engine.build(self.frozen)
        if velocities is None:
            velocities = self.maxwell_boltzmann(self.settings.temperature, self.settings.seed)
        self._write(start, _finite(velocities, (self.n_replicas, self.n_particles, 3), "velocities"))

    @classmethod
    def from_settings(cls, model: nn.Module | ModelFile | str | os.PathLike, numbers: Sequence[int],
                      positions: np.ndarray, md: MDSettings, part: Optional[np.ndarray] = None, stream: int = 0,
                      **options) -> "ReplicaSet":
        """Replicas that run the MD of ``md`` (an :class:`~openmm_bridge.md_settings.MDSettings`); ``options`` are
        the other arguments of the constructor (``cell``, ``velocities``, ``backend``, ``check_interval``, ...).

        ``part``: the indices, among all the replicas whose starts ``positions`` [R, N, 3] holds, of those this set
        runs (a process's block). They start with the velocities the whole set would give them, so the replicas
        start alike however they are split, and ``stream`` (the process's rank) gives the thermostat a random
        stream of its own; part ``None`` with stream 0 is the whole set as one.
        """
        if part is not None:
            positions = np.asarray(positions)
            masses = options.get("masses")
            if options.get("environment") is not None:
                masses = options["environment"].masses
            masses = cls.standard_masses(numbers) if masses is None else np.asarray(masses, dtype=np.float64)
            options.setdefault("velocities",
                               maxwell_boltzmann(masses, len(positions), md.temperature, md.seed)[part])
            positions = positions[part]
        return cls(model, numbers, positions, integrator=md.integrator, temperature=md.temperature,
                   timestep=md.timestep, friction=md.friction, collision_frequency=md.collision_frequency,
                   seed=md.seed + 7919 * int(stream), mode=md.mode, platform=md.platform, device=md.device,
                   **options)

    # -- construction helpers ---------------------------------------------------------------------
    def _check_species(self) -> None:
        known = getattr(self.model, "species_numbers", None)
        if known is None:
            return
        unknown = sorted(set(self.numbers.tolist()) - set(known.tolist()))
        if unknown:
            raise ValueError(f"the structure contains elements the model was not trained on: atomic numbers "
                             f"{unknown}; the model knows {sorted(known.tolist())}")

    def _start_positions(self, positions: np.ndarray, n_replicas: Optional[int]) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.float64)
        if positions.ndim == 2:
            positions = np.repeat(positions[None], 1 if n_replicas is None else int(n_replicas), axis=0)
        if positions.ndim != 3 or positions.shape[1:] != (self.n_particles, 3):
            if self.environment is not None:
                raise ValueError(f"positions must have shape [P, 3] or [R, P, 3] with P = {self.n_particles}, every "
                                 f"particle of {self.environment.source}, got {positions.shape}")
            raise ValueError(f"positions must have shape [N, 3] or [R, N, 3] with N = {self.n_atoms} atoms, "
                             f"got {positions.shape}")
        if n_replicas is not None and len(positions) != n_replicas:
            raise ValueError(f"positions hold {len(positions)} replicas but n_replicas = {n_replicas}")
        if len(positions) < 1:
            raise ValueError("at least one replica is needed")
        if not np.isfinite(positions).all():
            raise ValueError("starting positions contain NaN or infinite values")
        return positions

    def _masses(self, masses: Optional[Sequence[float]]) -> np.ndarray:
        if masses is None:
            return self.standard_masses(self.numbers)
        masses = np.asarray(masses, dtype=np.float64)
        if masses.shape != (self.n_atoms,) or not (masses > 0).all():
            raise ValueError(f"masses must be {self.n_atoms} positive values in amu, got {masses}")
        return masses

    # -- state access (Å, Å/fs) ---------------------------------------------------------------------
    @property
    def time(self) -> float:
        """Simulated time in fs since the start (every replica shares the clock)."""
        return self.step * self.settings.timestep

    @property
    def running(self) -> np.ndarray:
        """[R] bool: replicas that move when :meth:`run` is called."""
        return ~self.frozen

    def positions(self) -> np.ndarray:
        """[R, P, 3] positions in Å of every particle (the model's atoms, P = N, without MM surroundings)."""
        return self._engine.read()[0] * NM_IN_ANGSTROM

    def velocities(self) -> np.ndarray:
        """[R, P, 3] velocities in Å/fs (zero for frozen replicas)."""
        return self._engine.read()[1] / ANGSTROM_PER_FS_IN_NM_PER_PS

    def _write(self, positions: np.ndarray, velocities: np.ndarray, replicas: Optional[np.ndarray] = None) -> None:
        """Write ``replicas`` (default all; the arrays hold every replica) in OpenMM units; the others are left
        exactly as they are."""
        velocities = velocities.copy()
        velocities[self.frozen] = 0.0
        self._engine.write(positions / NM_IN_ANGSTROM, velocities * ANGSTROM_PER_FS_IN_NM_PER_PS, replicas)

    def set_state(self, positions: Optional[np.ndarray] = None, velocities: Optional[np.ndarray] = None,
                  replicas: Optional[Iterable[int]] = None) -> None:
        """Set positions (Å) and/or velocities (Å/fs) of ``replicas`` (default: all).

        Arrays are ``[R, P, 3]`` when ``replicas`` is None, else ``[len(replicas), P, 3]``.
        """
        chosen = self._indices(replicas)
        current_positions, current_velocities = self.positions(), self.velocities()
        if positions is not None:
            current_positions[chosen] = _finite(positions, (len(chosen), self.n_particles, 3), "positions")
        if velocities is not None:
            current_velocities[chosen] = _finite(velocities, (len(chosen), self.n_particles, 3), "velocities")
        self._write(current_positions, current_velocities, chosen)

    def maxwell_boltzmann(self, temperature: float, seed: int) -> np.ndarray:
        """[R, P, 3] velocities (Å/fs) drawn at ``temperature`` K, each replica's centre of mass at rest."""
        return maxwell_boltzmann(self.masses, self.n_replicas, temperature, seed)

    @staticmethod
    def standard_masses(numbers: Sequence[int]) -> np.ndarray:
        """[N] standard atomic masses in amu (what a set uses unless given ``masses``)."""
        return np.asarray(atomic_masses[np.asarray(numbers, dtype=np.int64)], dtype=np.float64)

    def randomize_velocities(self, temperature: Optional[float] = None, seed: Optional[int] = None,
                             replicas: Optional[Iterable[int]] = None) -> None:
        """Redraw Maxwell-Boltzmann velocities for ``replicas`` (default all)."""
        chosen = self._indices(replicas)
        drawn = self.maxwell_boltzmann(self.settings.temperature if temperature is None else temperature,
                                       self.settings.seed + 1 + self.step if seed is None else seed)
        self.set_state(velocities=drawn[chosen], replicas=chosen)

    # -- energies ---------------------------------------------------------------------------------------
    def potential_energies(self, positions: Optional[np.ndarray] = None) -> np.ndarray:
        """[R] potential energy in eV of running replicas (NaN for frozen ones), evaluated as one batch.

        With MM surroundings: the whole System's (model and MM) of the current state, from each replica's
        Context; ``positions`` must then be None."""
        if self.environment is not None:
            if positions is not None:
                raise ValueError("with MM surroundings the energies are those of the replicas' current state; "
                                 "call potential_energies() without positions")
            return self._engine.potential_energies(self.frozen) * KJ_PER_MOL_IN_EV
        positions = self.positions() if positions is None else positions
        callback = self._energy_evaluator
        callback.active[:] = ~self.frozen
        callback.nonfinite[:] = False
        box = None if self.cell is None else self.cell / NM_IN_ANGSTROM
        callback.compute(positions.reshape(-1, 3) / NM_IN_ANGSTROM, box)
        return callback.energies_eV.copy()

    def kinetic_energies(self, velocities: Optional[np.ndarray] = None) -> np.ndarray:
        """[R] total kinetic energy in eV."""
        velocities = self.velocities() if velocities is None else velocities
        return 0.5 * AMU_ANGSTROM2_PER_FS2_IN_EV * np.einsum("n,rnk,rnk->r", self.masses, velocities, velocities)

    def temperatures(self, velocities: Optional[np.ndarray] = None) -> np.ndarray:
        """[R] internal temperature in K: kinetic energy without the centre-of-mass part over 3N - 3 DOF; with MM
        surroundings, the kinetic energy over OpenMM's count of the System's degrees of freedom."""
        velocities = self.velocities() if velocities is None else velocities
        total = self.kinetic_energies(velocities)
        if self._degrees_of_freedom is not None:
            return 2.0 * total / (self._degrees_of_freedom * KB_EV_PER_K)
        if self.n_atoms < 2:
            return 2.0 * total / (3.0 * KB_EV_PER_K)
        com = (velocities * self.masses[None, :, None]).sum(axis=1) / self.masses.sum()
        com_energy = 0.5 * AMU_ANGSTROM2_PER_FS2_IN_EV * self.masses.sum() * (com ** 2).sum(axis=1)
        return 2.0 * (total - com_energy) / ((3 * self.n_atoms - 3) * KB_EV_PER_K)

    def frames(self) -> ReplicaFrames:
        """Positions, velocities, energies and temperatures of every replica now."""
        positions, velocities = self.positions(), self.velocities()
        kinetic = np.where(self.frozen, np.nan, self.kinetic_energies(velocities))
        temperature = np.where(self.frozen, np.nan, self.temperatures(velocities))
        frozen = self.frozen.copy()

        def potential() -> np.ndarray:
            # evaluated with the frozen mask of the moment the frames were taken
            current, self.frozen = self.frozen, frozen
            try:
                if self.environment is not None:
                    return self.potential_energies()  # the Contexts' state: reporters do not move replicas
                return self.potential_energies(positions)
            finally:
                self.frozen = current

        system_positions = positions
        if self.environment is not None:
            model_atoms = self.environment.model_atoms
            positions, velocities = positions[:, model_atoms], velocities[:, model_atoms]
        return ReplicaFrames(step=self.step, time=self.time, positions=positions, velocities=velocities,
                             potential_energy=potential, kinetic_energy=kinetic, temperature=temperature,
                             running=~frozen, system_positions=system_positions)

    # -- freezing ------------------------------------------------------------------------------------
    def freeze(self, replicas: Iterable[int]) -> None:
        """Stop ``replicas`` where they are (velocities zeroed) while the others continue."""
        self._set_frozen(self.frozen | self._mask(replicas))

    def unfreeze(self, replicas: Iterable[int], temperature: Optional[float] = None) -> None:
        """Let frozen ``replicas`` move again, with fresh Maxwell-Boltzmann velocities."""
        mask = self._mask(replicas) & self.frozen
        if not mask.any():
            return
        self._set_frozen(self.frozen & ~mask)
        self.randomize_velocities(temperature=temperature, replicas=np.flatnonzero(mask))

    def _set_frozen(self, frozen: np.ndarray) -> None:
        if np.array_equal(frozen, self.frozen):
            return
        positions, velocities = self.positions(), self.velocities()
        changed = np.flatnonzero(frozen != self.frozen)
        self.frozen = frozen
        self._engine.set_frozen(frozen)
        self._write(positions, velocities, changed)

    def reset(self, positions: np.ndarray, velocities: Optional[np.ndarray] = None) -> None:
        """Start every replica afresh from ``positions`` [R, P, 3] Å (and ``velocities`` Å/fs, default
        Maxwell-Boltzmann): all running, no instability recorded, thermostat state fresh (the
        Context is rebuilt), so what follows depends on nothing but the arguments and the seed.
        The clock keeps counting."""
        positions = _finite(positions, (self.n_replicas, self.n_particles, 3), "positions")
        if velocities is None:
            velocities = self.maxwell_boltzmann(self.settings.temperature, self.settings.seed + 1 + self.step)
        velocities = _finite(velocities, (self.n_replicas, self.n_particles, 3), "velocities")
        self.unstable[:] = False
        self.unstable_step[:] = -1
        self.reasons.clear()
        self.frozen = np.zeros(self.n_replicas, dtype=bool)
        self._engine.build(self.frozen)
        self._write(positions, velocities)

    # -- snapshots and rewind --------------------------------------------------------------------------
    def snapshot(self) -> ReplicaSnapshot:
        """The exact current state, including thermostat and random-number state."""
        positions, velocities = self.positions(), self.velocities()
        return ReplicaSnapshot(step=self.step, positions=positions, velocities=velocities,
                               frozen=self.frozen.copy(), unstable=self.unstable.copy(),
                               unstable_step=self.unstable_step.copy(), checkpoints=self._engine.checkpoint(),
                               build=self._engine.builds, reasons=dict(self.reasons))

    def restore(self, snapshot: ReplicaSnapshot, replicas: Optional[Iterable[int]] = None) -> None:
        """Put ``replicas`` (default: all) back to ``snapshot``.

        Restoring all replicas is bit-exact, integrator state included, so the run that
        follows repeats the one that followed the snapshot. Restoring a subset sets those
        replicas' positions, velocities and frozen/unstable flags exactly; in batched mode
        their thermostat variables continue from the present (per-replica mode restores
        them too).
        """
        if snapshot.positions.shape != (self.n_replicas, self.n_particles, 3):
            raise ValueError(f"snapshot holds positions of shape {snapshot.positions.shape}, this set "
                             f"{(self.n_replicas, self.n_particles, 3)}")
        if replicas is None:
            self._engine.load(snapshot.checkpoints, snapshot.frozen, snapshot.build)
            self.frozen = snapshot.frozen.copy()
            self.unstable = snapshot.unstable.copy()
            self.unstable_step = snapshot.unstable_step.copy()
            self.reasons = dict(snapshot.reasons)
            self.step = snapshot.step
            self._engine.clear_nonfinite()
            return
        chosen = self._indices(replicas)
        mask = np.zeros(self.n_replicas, dtype=bool)
        mask[chosen] = True
        frozen = np.where(mask, snapshot.frozen, self.frozen)
        self._set_frozen(frozen)
        self.unstable[chosen] = snapshot.unstable[chosen]
        self.unstable_step[chosen] = snapshot.unstable_step[chosen]
        for replica in chosen:
            self.reasons.pop(int(replica), None)
            if int(replica) in snapshot.reasons:
                self.reasons[int(replica)] = snapshot.reasons[int(replica)]
        if self._engine.restores_subsets:
            self._engine.load(snapshot.checkpoints, self.frozen, self._engine.builds, replicas=chosen)
        else:
            positions, velocities = self.positions(), self.velocities()
            positions[chosen] = snapshot.positions[chosen]
            velocities[chosen] = snapshot.velocities[chosen]
            self._write(positions, velocities, chosen)

    # -- running ---------------------------------------------------------------------------------------
    def run(self, n_steps: int, reporters: Sequence[Reporter] = (),
            progress: Optional[Callable[[int], None]] = None,
            callback: Optional[Callable[[ReplicaFrames], Optional[Iterable[int]]]] = None,
            every: Optional[int] = None, keep_clock: bool = False) -> int:
        """Advance every running replica by ``n_steps``; returns the steps taken.

        Before each stretch of steps every reporter is asked how many steps remain until its
        next report (``steps_to_next(step)``; ``None``: no more); those whose turn has come get
        ``report(replicas, frames)`` in list order, with one :class:`ReplicaFrames` shared among
        them (a reporter earlier in the list may mark replicas unstable; later ones see that in
        ``replicas``). ``progress(k)`` is told of every ``k`` steps done. Stops early when no
        replica is left running, or, with ``keep_clock``, goes on counting steps and reporting
        without moving anything (a set that shares its reports with other processes must keep
        reporting with them) until ``n_steps`` or until a reporter calls :meth:`halt`.

        ``callback(frames)`` every ``every`` steps, whose returned replica indices are frozen, is
        the older spelling of one reporter.
        """
        n_steps = int(n_steps)
        if n_steps < 0:
            raise ValueError(f"n_steps must be non-negative, got {n_steps}")
        reporters = list(reporters)
        if callback is not None:
            if every is None or every < 1:
                raise ValueError("a callback needs every >= 1 steps")
            reporters.append(CallbackReporter(callback, every))
        done = 0
        self.halted = False
        while done < n_steps and not self.halted and (keep_clock or not self.frozen.all()):
            chunk = min(n_steps - done, self.check_interval)
            waits = [reporter.steps_to_next(self.step) for reporter in reporters]
            for wait in waits:
                if wait is not None:
                    if wait < 1:
                        raise ValueError(f"a reporter asked for its next report in {wait} steps; it must be >= 1")
                    chunk = min(chunk, wait)
            if self.frozen.all():
                self.step += chunk  # nothing moves; the clock and the reports go on
            else:
                self._advance(chunk)
            done += chunk
            if progress is not None:
                progress(chunk)
            due = [reporter for reporter, wait in zip(reporters, waits) if wait == chunk]
            if due:
                frames = self.frames()
                for reporter in due:
                    reporter.report(self, frames)
        return done

    def halt(self) -> None:
        """End the current :meth:`run` after this report (for reporters that see more than this set)."""
        self.halted = True

    def _advance(self, n_steps: int) -> None:
        start_positions, start_velocities = self._engine.read()
        try:
            self._engine.step(n_steps)
        except openmm.OpenMMException:
            original = self._engine.last_error()
            if original is not None:
                raise original
            positions, velocities = self._engine.read()
            bad = ~(np.isfinite(positions).all(axis=(1, 2)) & np.isfinite(velocities).all(axis=(1, 2)))
            bad &= ~self.frozen
            if not bad.any():
                raise
            # The integrator stopped on NaN coordinates: put every replica back, retire the
            # exploded ones at their last finite state, and take the steps again.
            velocities = np.where(bad[:, None, None], 0.0, start_velocities)
            self._engine.write(start_positions, velocities)
            self._engine.clear_nonfinite()
            self._retire(bad)
            self._advance(n_steps)
            return
        self.step += n_steps
        positions, velocities = self._engine.read()
        bad = self._engine.nonfinite()
        bad |= ~np.isfinite(positions).all(axis=(1, 2)) | ~np.isfinite(velocities).all(axis=(1, 2))
        bad &= ~self.frozen
        self._engine.clear_nonfinite()
        if not bad.any():
            return
        # A replica that produced non-finite numbers is put back to its last finite state and frozen.
        positions[bad] = start_positions[bad]
        velocities[bad] = 0.0
        self._engine.write(positions, velocities, np.flatnonzero(bad))
        self._retire(bad)

    def _retire(self, bad: np.ndarray) -> None:
        """Record replicas ``bad`` [R] as unstable for non-finite values and freeze them."""
        for replica in np.flatnonzero(bad):
            error = self._engine.replica_error(int(replica))
            self.reasons[int(replica)] = (NONFINITE_REASON if error is None
                                          else f"{type(error).__name__}: {error}")
        self.unstable |= bad
        self.unstable_step[bad] = self.step
        self._set_frozen(self.frozen | bad)

    def mark_unstable(self, replicas: Iterable[int], reasons: Optional[Sequence[str]] = None) -> None:
        """Record ``replicas`` as unstable now (a stability criterion's verdict) and freeze them.

        ``reasons`` gives one message per replica, kept in :attr:`reasons`.
        """
        chosen = self._indices(replicas)
        if reasons is not None and len(reasons) != len(chosen):
            raise ValueError(f"{len(chosen)} replicas but {len(reasons)} reasons")
        for k, replica in enumerate(chosen):
            if self.unstable[replica]:
                continue
            self.unstable[replica] = True
            self.unstable_step[replica] = self.step
            self.reasons[int(replica)] = "marked unstable" if reasons is None else str(reasons[k])
        self.freeze(chosen)

    # -- helpers -------------------------------------------------------------------------------------
    def _indices(self, replicas: Optional[Iterable[int]]) -> np.ndarray:
        if replicas is None:
            return np.arange(self.n_replicas)
        indices = np.asarray(list(replicas) if not isinstance(replicas, np.ndarray) else replicas)
        if indices.dtype == bool:
            if indices.shape != (self.n_replicas,):
                raise ValueError(f"a replica mask must have {self.n_replicas} entries, got {indices.shape}")
            return np.flatnonzero(indices)
        indices = indices.astype(np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_replicas):
            raise ValueError(f"replica indices must lie in 0..{self.n_replicas - 1}, got {indices.tolist()}")
        return indices

    def _mask(self, replicas: Iterable[int]) -> np.ndarray:
        mask = np.zeros(self.n_replicas, dtype=bool)
        mask[self._indices(replicas)] = True
        return mask


def maxwell_boltzmann(masses: np.ndarray, n_replicas: int, temperature: float, seed: int) -> np.ndarray:
    """[R, N, 3] velocities (Å/fs) of ``n_replicas`` replicas of atoms of ``masses`` [N] amu drawn at
    ``temperature`` K from ``seed``, each replica's centre of mass at rest. Replica r's draw does not depend
    on how many replicas follow it, so a block of a larger draw is a valid start for part of the replicas.
    Massless particles (virtual sites) stay at rest."""
    masses = np.asarray(masses, dtype=np.float64)
    rng = np.random.default_rng(openmm_seed(seed, 7))
    # kT / m as before massless particles were allowed, so that every draw stays bit for bit what it was
    variance = np.divide(KB_KJ_PER_MOL_K * temperature, masses, out=np.zeros_like(masses), where=masses > 0)
    sigma = np.sqrt(variance)[None, :, None]  # nm/ps
    velocities = rng.standard_normal((int(n_replicas), len(masses), 3)) * sigma
    if len(masses) > 1:
        com = (velocities * masses[None, :, None]).sum(axis=1, keepdims=True) / masses.sum()
        velocities -= com
        velocities[:, masses == 0] = 0.0
    return velocities / ANGSTROM_PER_FS_IN_NM_PER_PS


def _check_environment(environment, numbers: np.ndarray, cell, masses, mode: str, backend: str) -> None:
    """What a set with MM surroundings refuses: other atoms than the environment's model atoms, a second box or
    masses, the batched engine and the TorchForce backend."""
    if not np.array_equal(numbers, environment.numbers):
        raise ValueError(f"the model's atoms of {environment.source} are atomic numbers "
                         f"{environment.numbers.tolist()}, not the {numbers.tolist()} given")
    if cell is not None or masses is not None:
        raise ValueError("with MM surroundings the box and the masses are the environment's; pass neither cell nor "
                         "masses")
    if mode != "per-replica":
        raise ValueError(f"a model inside MM surroundings runs with one Context per replica (--mode per-replica), "
                         f"not {mode!r}: copies in one box would interact")
    if backend != "python":
        raise ValueError("a model inside MM surroundings runs as a PythonForce on the model's atoms (--force python);"
                         " the TorchForce backend computes every particle of its System")


def _finite(values: np.ndarray, shape: tuple, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return values


def _reduced_box(cell: np.ndarray) -> np.ndarray:
    """Check that ``cell`` [3, 3] Å is in OpenMM's reduced form and return it as floats."""
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape != (3, 3) or not np.isfinite(cell).all():
        raise ValueError(f"cell must be a finite [3, 3] array of box vectors in Å, got shape {cell.shape}")
    a, b, c = cell
    reduced = (a[1] == 0 and a[2] == 0 and b[2] == 0 and a[0] > 0 and b[1] > 0 and c[2] > 0
               and abs(b[0]) <= 0.5 * a[0] + 1e-9 and abs(c[0]) <= 0.5 * a[0] + 1e-9
               and abs(c[1]) <= 0.5 * b[1] + 1e-9)
    if not reduced:
        raise ValueError("OpenMM needs the box in reduced form: a = (ax, 0, 0), b = (bx, by, 0), c = (cx, cy, cz) "
                         f"with |bx|, |cx| <= ax/2 and |cy| <= by/2; got {cell.tolist()}")
    return cell


def snapshot_to_arrays(snapshot: ReplicaSnapshot) -> dict[str, np.ndarray]:
    """A snapshot as plain numpy arrays (for ``np.savez`` or ``torch.save`` checkpoints)."""
    arrays = {
        "step": np.array(snapshot.step), "positions": snapshot.positions, "velocities": snapshot.velocities,
        "frozen": snapshot.frozen, "unstable": snapshot.unstable, "unstable_step": snapshot.unstable_step,
        "build": np.array(snapshot.build), "n_checkpoints": np.array(len(snapshot.checkpoints)),
        "reasons": np.array(json.dumps({str(k): v for k, v in snapshot.reasons.items()})),
    }
    for index, blob in enumerate(snapshot.checkpoints):
        arrays[f"checkpoint_{index}"] = np.frombuffer(blob, dtype=np.uint8)
    return arrays


def snapshot_from_arrays(arrays) -> ReplicaSnapshot:
    """The inverse of :func:`snapshot_to_arrays` (any mapping of names to arrays)."""
    checkpoints = tuple(np.asarray(arrays[f"checkpoint_{i}"], dtype=np.uint8).tobytes()
                        for i in range(int(arrays["n_checkpoints"])))
    return ReplicaSnapshot(step=int(arrays["step"]), positions=np.asarray(arrays["positions"]),
                           velocities=np.asarray(arrays["velocities"]), frozen=np.asarray(arrays["frozen"]),
                           unstable=np.asarray(arrays["unstable"]), unstable_step=np.asarray(arrays["unstable_step"]),
                           checkpoints=checkpoints, build=int(arrays["build"]),
                           reasons={int(k): v for k, v in json.loads(str(arrays["reasons"])).items()})
