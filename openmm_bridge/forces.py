"""The OpenMM force that evaluates a stable-md model: PythonForce by default, TorchForce on request.

:class:`ModelCallback` is the computation behind ``openmm.PythonForce``: it evaluates R
non-interacting replicas of one system as one batch ``[R, N, 3]``, converts units at
the edge (nm and kJ/mol outside, Å and eV inside) and keeps each replica's last energy.

A replica whose positions, energy or forces are not finite, or whose largest force exceeds
:data:`MAX_FORCE_EV_PER_A`, has left physics. In a user's own System (``on_failure="raise"``,
the default) the callback raises :class:`ModelFailure` naming the replica, the atom and the
value, so OpenMM stops instead of integrating on anything made up. The replica engine passes
``on_failure="freeze"``: the replica is flagged in ``nonfinite``, gets zero forces and is no
longer evaluated, shielding the other replicas until the engine retires it.

It is a module-level class holding the model file's path, so a System containing it
pickles into OpenMM's XML (see :mod:`openmm_bridge.serialization`).
"""
from __future__ import annotations

import glob
import os
import pickle
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import openmm
import torch
from torch import nn

from stable_md.geometry_checks import MAX_FORCE_EV_PER_A
from stable_md.potentials.base import energy_and_forces
from stable_md.potentials.model_file import ModelFile, load_model
from stable_md.units import EV_IN_KJ_PER_MOL, EV_PER_ANGSTROM_IN_KJ_PER_MOL_NM, NM_IN_ANGSTROM

BACKENDS = ("python", "torch")
FORCE_NAME = "stable-md model"
ON_FAILURE = ("raise", "freeze")


class ModelFailure(ArithmeticError):
    """The model met a state it cannot describe: non-finite positions, energy or forces, or a force
    beyond :data:`MAX_FORCE_EV_PER_A`; the message names the replica and the atom."""


class ModelCallback:
    """PythonForce computation for ``n_replicas`` copies of a system of atomic numbers ``numbers``.

    Parameters
    ----------
    model:
        A Potential-like module (it may be trained while the simulation runs: the callback
        always uses its current parameters), a loaded :class:`ModelFile`, or a model file path.
    numbers:
        Atomic numbers of one replica, in particle order.
    n_replicas:
        Copies laid out consecutively: particle ``r * N + i`` is atom ``i`` of replica ``r``.
    periodic:
        Pass OpenMM's box vectors to the model as its cell (minimum image inside the model).
    model_path:
        File the module was loaded from; needed to pickle the callback (XML serialization).
    device:
        Torch device the model runs on.
    remove_net_force:
        Subtract each replica's mean force so that its centre-of-mass momentum is conserved
        exactly, as it is analytically for a translation-invariant potential; without this,
        float32 round-off makes molecules drift and upsets per-replica thermostats.
    on_failure:
        ``"raise"`` (default): a replica with non-finite positions, energy or forces, or a force
        above :data:`MAX_FORCE_EV_PER_A`, raises :class:`ModelFailure` (OpenMM then stops the step
        with an ``OpenMMException``; the original error is kept in ``last_error``).
        ``"freeze"``: flag it in ``nonfinite`` and give it zero forces from then on, for an engine
        that checks ``nonfinite`` after every step and retires the replica (ReplicaSet does).
    """

    def __init__(self, model: nn.Module | ModelFile | str | os.PathLike, numbers: Sequence[int],
                 n_replicas: int = 1, periodic: bool = False, model_path: Optional[str | os.PathLike] = None,
                 device: str | torch.device = "cpu", remove_net_force: bool = True,
                 on_failure: str = "raise") -> None:
        if isinstance(model, (str, os.PathLike)):
            model_path = model
            model = load_model(model, device=device)
        if isinstance(model, ModelFile):
            model_path = model.path if model_path is None else model_path
            model = model.module
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a model module, ModelFile or model file path, got {type(model).__name__}")
        if n_replicas < 1:
            raise ValueError(f"n_replicas must be at least 1, got {n_replicas}")
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
        self.on_failure = on_failure
        self.model = model
        self.model_path = None if model_path is None else Path(model_path).resolve()
        self.numbers = np.asarray(numbers, dtype=np.int64)
        if self.numbers.ndim != 1 or len(self.numbers) == 0:
            raise ValueError("numbers must be a non-empty list of atomic numbers")
        self.n_replicas = int(n_replicas)
        self.n_atoms = int(len(self.numbers))
        self.periodic = bool(periodic)
        self.device = torch.device(device)
        self.remove_net_force = bool(remove_net_force)
        self._setup()

    def _setup(self) -> None:
        parameter = next(self.model.parameters(), None)
        self.dtype = torch.float32 if parameter is None else parameter.dtype
        self._numbers_tensor = torch.as_tensor(self.numbers, device=self.device)
        self._positions = np.empty((self.n_replicas * self.n_atoms, 3), dtype=np.float64)
        self.active = np.ones(self.n_replicas, dtype=bool)
        self.nonfinite = np.zeros(self.n_replicas, dtype=bool)
        self.energies_eV = np.full(self.n_replicas, np.nan)
        self.last_error: Optional[BaseException] = None
        self.evaluations = 0
        self._size_checked = False

    # -- pickling: the path, never the module -------------------------------------------------
    def __getstate__(self) -> dict:
        if self.model_path is None:
            raise pickle.PicklingError(
                "this force's model was never saved to a file; save it (stable_md.potentials.save_model) and "
                "build the force from the file to serialize the System")
        return {"model_path": str(self.model_path), "numbers": self.numbers.tolist(),
                "n_replicas": self.n_replicas, "periodic": self.periodic, "device": str(self.device),
                "remove_net_force": self.remove_net_force, "active": self.active.tolist(),
                "on_failure": self.on_failure, "dtype": str(self.dtype).replace("torch.", "")}

    def __setstate__(self, state: dict) -> None:
        path = Path(state["model_path"])
        if not path.exists():
            raise FileNotFoundError(f"the serialized System's model file {path} does not exist")
        dtype = state.get("dtype")  # the precision it ran in (a float64 copy of a float32 file stays float64)
        device = state["device"]
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            device = "cpu"  # a System saved on a GPU node still loads on a CPU one
        state = {**state, "device": device}
        self.model = load_model(path, device=device, dtype=None if dtype is None else getattr(torch, dtype)).module
        self.model_path = path
        self.numbers = np.asarray(state["numbers"], dtype=np.int64)
        self.n_replicas = int(state["n_replicas"])
        self.n_atoms = int(len(self.numbers))
        self.periodic = bool(state["periodic"])
        self.device = torch.device(state["device"])
        self.remove_net_force = bool(state["remove_net_force"])
        # Systems serialized before on_failure existed: the safe choice for a user's own System.
        self.on_failure = state.get("on_failure", "raise")
        self._setup()
        self.active[:] = np.asarray(state["active"], dtype=bool)

    # -- the computation --------------------------------------------------------------------------
    def __call__(self, state: openmm.State):
        if not self._size_checked:
            # the fast reader below writes as many positions as the State holds into a buffer sized for this
            # callback: a System with other particles would corrupt memory (OpenMM then aborts with "double free")
            held = len(state.getPositions(asNumpy=True))
            if held != len(self._positions):
                self.last_error = ModelFailure(
                    f"this force computes {self.n_replicas * self.n_atoms} particles ({self.n_replicas} x "
                    f"{self.n_atoms} atoms) but OpenMM passed it {held}: in a System with other particles, apply "
                    f"it to the model's atoms with force.setParticles(indices), or use MLPotential('stable-md')."
                    f"createMixedSystem")
                raise self.last_error
            self._size_checked = True
        _read_positions(state, self._positions)
        box = None
        if self.periodic:
            box = np.asarray(state.getPeriodicBoxVectors(asNumpy=True)._value, dtype=np.float64)
        try:
            return self.compute(self._positions, box)
        except BaseException as error:
            # OpenMM re-raises this as a bare OpenMMException; keep the original for the caller.
            self.last_error = error
            raise

    def compute(self, positions_nm: np.ndarray, box_nm: Optional[np.ndarray] = None):
        """Total energy (kJ/mol) and forces ``[R*N, 3]`` (kJ/mol/nm) of all running replicas."""
        frames = positions_nm.reshape(self.n_replicas, self.n_atoms, 3)
        forces = np.zeros((self.n_replicas, self.n_atoms, 3), dtype=np.float64)
        self.energies_eV[:] = np.nan
        running = self.active & ~self.nonfinite
        finite_positions = np.isfinite(frames).all(axis=(1, 2))
        if self.on_failure == "raise" and (running & ~finite_positions).any():
            replica = int(np.flatnonzero(running & ~finite_positions)[0])
            atoms = np.flatnonzero(~np.isfinite(frames[replica]).all(axis=1))
            raise ModelFailure(f"{self._where(replica)}non-finite positions (NaN or inf) on atom(s) "
                               f"{atoms[:10].tolist()}: the simulation had already failed before this force call")
        self.nonfinite |= running & ~finite_positions
        replicas = np.flatnonzero(running & finite_positions)
        total = 0.0
        if len(replicas):
            energies, replica_forces = self._evaluate(frames[replicas], box_nm)
            # Forces beyond MAX_FORCE_EV_PER_A move a hydrogen by over an Å per step: the replica is
            # exploding, and a few steps later the integrator would fail on NaN coordinates.
            good = (np.isfinite(energies) & np.isfinite(replica_forces).all(axis=(1, 2))
                    & (np.abs(replica_forces).max(axis=(1, 2), initial=0.0) < MAX_FORCE_EV_PER_A))
            if self.on_failure == "raise" and not good.all():
                bad = int(np.flatnonzero(~good)[0])
                raise ModelFailure(self._failure_message(int(replicas[bad]), energies[bad], replica_forces[bad]))
            self.nonfinite[replicas[~good]] = True
            replicas, energies, replica_forces = replicas[good], energies[good], replica_forces[good]
            if self.remove_net_force:
                replica_forces = replica_forces - replica_forces.mean(axis=1, keepdims=True)
            forces[replicas] = replica_forces * EV_PER_ANGSTROM_IN_KJ_PER_MOL_NM
            self.energies_eV[replicas] = energies
            total = float(energies.sum()) * EV_IN_KJ_PER_MOL
        self.evaluations += 1
        return total, forces.reshape(-1, 3)

    def _where(self, replica: int) -> str:
        return f"replica {replica}: " if self.n_replicas > 1 else ""

    def _failure_message(self, replica: int, energy: float, forces: np.ndarray) -> str:
        """Why a replica's model output was refused: the energy, or the atom with the worst force (eV/Å)."""
        where = self._where(replica)
        if not np.isfinite(energy):
            return f"{where}the model returned a non-finite energy ({energy}): the structure has left physics"
        magnitudes = np.where(np.isfinite(forces).all(axis=1), np.linalg.norm(forces, axis=1), np.inf)
        atom = int(np.argmax(magnitudes))
        if not np.isfinite(magnitudes[atom]):
            return f"{where}the model returned a non-finite force on atom {atom}: the structure has left physics"
        return (f"{where}the force on atom {atom} is {magnitudes[atom]:.4g} eV/Å, above the "
                f"{MAX_FORCE_EV_PER_A:g} eV/Å an MD step can integrate: atoms have collapsed or the structure "
                f"has left the model's domain")

    def _evaluate(self, frames_nm: np.ndarray, box_nm: Optional[np.ndarray]):
        positions = torch.as_tensor(frames_nm * NM_IN_ANGSTROM, dtype=self.dtype, device=self.device)
        cell = None
        if box_nm is not None:
            cell = torch.as_tensor(box_nm * NM_IN_ANGSTROM, dtype=self.dtype, device=self.device)
            cell = cell.unsqueeze(0).expand(len(frames_nm), 3, 3)
        energy, forces = energy_and_forces(self.model, positions, self._numbers_tensor, cell)
        return (energy.detach().to("cpu", torch.float64).numpy(),
                forces.detach().to("cpu", torch.float64).numpy())



def _read_positions(state: openmm.State, out: np.ndarray) -> None:
    """Positions in nm into ``out`` without building unit-wrapped objects."""
    reader = getattr(state, "_getVectorAsNumpy", None)
    if reader is not None:
        reader(openmm.State.Positions, out)
    else:  # pragma: no cover - older OpenMM without the array path
        out[:] = state.getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer)


def torch_force_available() -> bool:
    """Whether ``openmmtorch`` imports (it needs a torch build matching the one it was compiled with)."""
    try:
        _import_openmmtorch()
    except ImportError:
        return False
    return True


def _import_openmmtorch():
    import torch  # noqa: F401  (openmmtorch needs torch's libraries loaded first)

    try:
        import openmmtorch
    except Exception as error:  # a torch/openmmtorch mismatch raises OSError or ImportError
        raise ImportError(
            f"the TorchForce backend needs the openmmtorch package built for this torch ({torch.__version__}): "
            f"{error}. Use the default PythonForce backend, or `make test-openmmtorch` for a matching environment"
        ) from error
    _reload_torch_plugins()
    return openmmtorch


def _reload_torch_plugins() -> None:
    """Load openmm-torch's platform plugins if OpenMM tried before torch's libraries were loaded.

    ``import openmm`` loads every plugin at once; when that happens before ``import torch``
    the Torch plugins fail (libtorch's dependencies are not yet in the process) and a
    TorchForce then has no kernels. Loading them again now succeeds.
    """
    failures = openmm.Platform.getPluginLoadFailures()
    if not any("libOpenMMTorch" in failure for failure in failures):
        return
    plugin_folder = os.path.join(openmm.version.openmm_library_path, "plugins")
    for library in sorted(glob.glob(os.path.join(plugin_folder, "libOpenMMTorch*"))):
        try:
            openmm.Platform.loadPluginLibrary(library)
        except Exception:  # e.g. the OpenCL variant without libOpenCL; the others still load
            pass


def make_force(callback: ModelCallback, backend: str = "python") -> openmm.Force:
    """The OpenMM force for ``callback``'s model and replica layout.

    ``backend="python"`` gives ``openmm.PythonForce(callback)``; ``"torch"`` gives an
    ``openmmtorch.TorchForce`` of the model exported in OpenMM units (forces computed
    inside the exported module). The TorchForce path does not shield replicas from
    non-finite values (:class:`openmm_bridge.replicas.ReplicaSet` then catches them from
    the positions instead), and it holds a copy of the model made when the force is built:
    parameters trained afterwards reach it only through a new force.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown force backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "python":
        force = openmm.PythonForce(callback)
    else:
        openmmtorch = _import_openmmtorch()
        from openmm_bridge.export import export_for_openmm

        module = export_for_openmm(callback.model, callback.numbers.tolist(), callback.n_replicas,
                                   return_forces=True)
        force = openmmtorch.TorchForce(module)
        force.setOutputsForces(True)
    force.setUsesPeriodicBoundaryConditions(callback.periodic)
    force.setName(FORCE_NAME)
    return force
