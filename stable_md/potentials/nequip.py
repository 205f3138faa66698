"""NequIP (Batzner et al., Nat. Commun. 13, 2453, 2022) behind the stable-md backbone signature.

Built with nequip 0.6.x's own ``model_from_config`` from the builders
``SimpleIrrepsConfig``, ``EnergyModel`` and ``PerSpeciesRescale`` (identity
scales and shifts: the Potential keeps its own). ``ForceOutput`` and
``RescaleEnergyEtc`` are left out on purpose: forces are taken by autograd
outside the model, and nequip's global rescaling is skipped in training mode,
which would make a model give different energies in ``train()`` and ``eval()``.
nequip's ``GraphModel`` wrapper is skipped as well: it casts every input to the
dtype the model was built in, which would defeat ``Potential.to(torch.float64)``.

The backbone hands nequip precomputed edge vectors (``edge_vectors``), so nequip
never needs a cell: ``with_edge_vectors`` only fills in the lengths when vectors
are present. nequip's edge convention is ours: ``edge_index[0]`` is the centre
atom that receives messages and ``edge_vectors = pos[j] - pos[i] + shift``.

Importers: :func:`import_nequip_deployed` for a ``nequip-deploy build`` file and
:func:`import_nequip_training_dir` for a training directory (``config.yaml`` +
``best_model.pth``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from stable_md.potentials.base import Potential
from stable_md.potentials.hyperparameters import COUNT, ORDER, POSITIVE, Choice, Flag
from stable_md.potentials.neighbors import frame_pointers

DEFAULT_HYPERPARAMETERS: dict[str, Any] = {
    "cutoff": 5.0,
    "num_layers": 3,
    "l_max": 1,
    "parity": True,
    "num_features": 32,
    "num_basis": 8,
    "BesselBasis_trainable": True,
    "PolynomialCutoff_p": 6,
    "invariant_layers": 2,
    "invariant_neurons": 64,
    "avg_num_neighbors": 10.0,
    "use_sc": True,
    "resnet": False,
    "nonlinearity_type": "gate",
}

HYPERPARAMETER_RULES = {
    "cutoff": POSITIVE, "num_layers": COUNT, "l_max": ORDER, "parity": Flag(), "num_features": COUNT,
    "num_basis": COUNT, "BesselBasis_trainable": Flag(), "PolynomialCutoff_p": COUNT, "invariant_layers": COUNT,
    "invariant_neurons": COUNT, "avg_num_neighbors": POSITIVE, "use_sc": Flag(), "resnet": Flag(),
    "nonlinearity_type": Choice(("gate", "norm")),
}

# Keys of nequip's AtomicDataDict (nequip/data/_keys.py), for eager code here.
_POS = "pos"
_EDGE_INDEX = "edge_index"
_EDGE_VECTORS = "edge_vectors"
_ATOM_TYPES = "atom_types"
_BATCH = "batch"
_PTR = "ptr"
_ATOMIC_ENERGY = "atomic_energy"

# Extra files of a `nequip-deploy build` archive (nequip/scripts/deploy.py, 0.6.x).
_DEPLOY_KEYS = ("config", "nequip_version", "r_max", "n_species", "type_names", "model_dtype", "default_dtype")


class NequIPBackbone(nn.Module):
    """A nequip energy network (``SequentialGraphNetwork``, eager or scripted) on our flattened graph.

    Parameters
    ----------
    model:
        Module mapping a nequip ``AtomicDataDict`` to one holding per-atom energies
        ``atomic_energy [M, 1]``.
    type_index:
        ``[S]`` int64: the nequip type of each of our species indices.
    """

    def __init__(self, model: nn.Module, type_index: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("type_index", torch.tensor(list(type_index), dtype=torch.long))

    def forward(self, positions: Tensor, species: Tensor, edge_index: Tensor, shifts: Tensor,
                batch: Tensor, num_frames: int) -> Tensor:
        """Atomic energies ``[M]`` (model units, eV for models trained on eV) of the flattened frames."""
        vectors = positions[edge_index[1]] - positions[edge_index[0]] + shifts
        ptr = frame_pointers(batch, num_frames)
        # Literal keys (TorchScript cannot read module-level strings); see the _POS... constants.
        data: Dict[str, Tensor] = {
            "pos": positions,
            "edge_index": edge_index,
            "edge_vectors": vectors,
            "atom_types": self.type_index[species].unsqueeze(-1),
            "batch": batch,
            "ptr": ptr,
        }
        output = self.model(data)
        return output["atomic_energy"].reshape(-1).to(positions.dtype)


@contextlib.contextmanager
def _quiet_nequip() -> Iterator[None]:
    """nequip warns and logs at model build (unused keys, TorchScript annotations): not our users' concern."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[int(z)]


def build_backbone(species: Sequence[int], cutoff: float, num_layers: int, l_max: int, parity: bool,
                   num_features: int, num_basis: int, BesselBasis_trainable: bool, PolynomialCutoff_p: int,
                   invariant_layers: int, invariant_neurons: int, avg_num_neighbors: float, use_sc: bool,
                   resnet: bool, nonlinearity_type: str) -> NequIPBackbone:
    """A fresh NequIP energy network for ``species`` (atomic numbers), in ``torch.get_default_dtype()``.

    ``cutoff`` (Å) is nequip's ``r_max``; the other names are nequip's own config keys.
    Species index ``k`` is nequip type ``k``, named by its chemical symbol.
    """
    from stable_md.potentials._e3nn_env import import_nequip

    import_nequip()
    from nequip.model import model_from_config

    species = [int(z) for z in species]
    dtype = _dtype_name(torch.get_default_dtype())
    config: dict[str, Any] = {
        "model_builders": ["SimpleIrrepsConfig", "EnergyModel", "PerSpeciesRescale"],
        "r_max": float(cutoff),
        "num_layers": int(num_layers),
        "l_max": int(l_max),
        "parity": bool(parity),
        "num_features": int(num_features),
        "num_basis": int(num_basis),
        "BesselBasis_trainable": bool(BesselBasis_trainable),
        "PolynomialCutoff_p": int(PolynomialCutoff_p),
        "invariant_layers": int(invariant_layers),
        "invariant_neurons": int(invariant_neurons),
        "avg_num_neighbors": float(avg_num_neighbors),
        "use_sc": bool(use_sc),
        "resnet": bool(resnet),
        "nonlinearity_type": str(nonlinearity_type),
        "chemical_symbol_to_type": {_symbol(z): k for k, z in enumerate(species)},
        # Identity per-species rescaling: the Potential owns energy shifts and scale.
        "per_species_rescale_scales": 1.0,
        "per_species_rescale_shifts": 0.0,
        "default_dtype": dtype,
        "model_dtype": dtype,
    }
    with _quiet_nequip():
        graph_model = model_from_config(config, initialize=False)
    energy_model, scale = _energy_network(graph_model, "built NequIP model")
    assert scale == 1.0
    return NequIPBackbone(energy_model, list(range(len(species))))


# ---------------------------------------------------------------------------------------------
# Importers
# ---------------------------------------------------------------------------------------------


def _class_name(module: nn.Module) -> str:
    """Class name of an eager module, or of the class a ScriptModule was compiled from."""
    if isinstance(module, torch.jit.ScriptModule):
        return str(module.original_name)
    return type(module).__name__


def _energy_network(model: nn.Module, source: str) -> Tuple[nn.Module, float]:
    """Unwrap a complete nequip model to the network that outputs per-atom energies.

    Peels ``GraphModel`` (dtype casting), ``RescaleOutput`` (global scale, returned
    as a float to be folded into ``Potential.energy_scale``) and gradient wrappers
    (``ForceOutput``/``StressForceOutput``: ``.func``). Works on eager modules and on
    the submodules of a TorchScript archive alike.
    """
    scale = 1.0
    module = model
    for _ in range(16):  # nesting depth of nequip wrappers is small; never loop forever
        name = _class_name(module)
        if name == "GraphModel":
            module = module.model
        elif name == "RescaleOutput":
            if bool(module.has_shift) and float(module.shift_by.detach().abs().max()) != 0.0:
                raise ValueError(
                    f"{source}: the model adds a global shift to the total energy "
                    f"({module.shift_by.detach().tolist()}), which is not a sum of atomic energies "
                    "and cannot be represented by a stable-md Potential"
                )
            if bool(module.has_scale):
                scale *= float(module.scale_by.detach().to(torch.float64))
            module = module.model
        elif hasattr(module, "func") and isinstance(getattr(module, "func"), nn.Module):
            module = module.func
        else:
            return module, scale
    raise ValueError(f"{source}: could not find the energy network inside nested nequip wrappers")


class _SafeConfigLoader:
    """YAML loading of nequip configs without executing anything.

    nequip writes configs with ``yaml.dump``, which tags tuples as
    ``!!python/tuple``; those (and only those) python tags are accepted.
    """

    @staticmethod
    def load(text: str, source: str) -> dict[str, Any]:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def tuple_constructor(loader, node):
            return tuple(loader.construct_sequence(node))

        Loader.add_constructor("tag:yaml.org,2002:python/tuple", tuple_constructor)
        try:
            config = yaml.load(text, Loader=Loader)
        except yaml.YAMLError as error:
            raise ValueError(f"{source}: the nequip config is not readable YAML ({error})") from error
        if not isinstance(config, dict):
            raise ValueError(f"{source}: the nequip config is not a mapping of options")
        return config


def _type_atomic_numbers(config: dict[str, Any], type_names: List[str], species: Optional[Sequence[int]],
                         source: str) -> List[int]:
    """Atomic number of each nequip type, in type order."""
    from ase.data import atomic_numbers as symbol_to_z

    n_types = len(type_names)
    known: Optional[List[int]] = None
    if config.get("chemical_symbol_to_type"):
        mapping = {int(t): symbol_to_z[s] for s, t in config["chemical_symbol_to_type"].items()}
        known = [mapping.get(t, 0) for t in range(n_types)]
    elif config.get("chemical_symbols"):
        # nequip's TypeMapper orders `chemical_symbols` by atomic number
        known = sorted(symbol_to_z[s] for s in config["chemical_symbols"])
    elif config.get("type_to_chemical_symbol"):
        mapping = {int(t): symbol_to_z[s] for t, s in config["type_to_chemical_symbol"].items()}
        known = [mapping.get(t, 0) for t in range(n_types)]
    elif all(name in symbol_to_z and name != "X" for name in type_names):
        known = [symbol_to_z[name] for name in type_names]
    if known is not None and (len(known) != n_types or 0 in known):
        raise ValueError(f"{source}: the config's element mapping does not cover the types {type_names}")
    if species is not None:
        species = [int(z) for z in species]
        if len(species) != n_types:
            raise ValueError(
                f"{source}: species must give one atomic number per nequip type {type_names}, got {species}"
            )
        if known is not None and known != species:
            raise ValueError(
                f"{source}: species {species} disagree with the model's own element mapping {known} "
                f"for types {type_names}"
            )
        known = species
    if known is None:
        raise ValueError(
            f"{source}: the nequip type names {type_names} are not chemical symbols and the config "
            "maps no elements to them; pass species=[atomic number of each type, in type order]"
        )
    if len(set(known)) != len(known):
        raise ValueError(
            f"{source}: several nequip types {type_names} are the same element {known}; a stable-md "
            "Potential tells atoms apart by atomic number only"
        )
    return known


def _check_energy_network(network: nn.Module, n_types: int, r_max: float, dtype: torch.dtype, source: str) -> None:
    """Evaluate a two-atom graph once, so that a wrong kind of model fails here with a clear message."""
    positions = torch.tensor([[0.0, 0.0, 0.0], [0.5 * r_max, 0.0, 0.0]], dtype=dtype)
    data: Dict[str, Tensor] = {
        _POS: positions,
        _EDGE_INDEX: torch.tensor([[0, 1], [1, 0]]),
        _EDGE_VECTORS: torch.stack([positions[1] - positions[0], positions[0] - positions[1]]),
        _ATOM_TYPES: torch.zeros(2, 1, dtype=torch.long),
        _BATCH: torch.zeros(2, dtype=torch.long),
        _PTR: torch.tensor([0, 2]),
    }
    try:
        with torch.no_grad():
            output = network(data)
    except Exception as error:
        raise ValueError(
            f"{source}: the nequip network did not evaluate on a plain graph ({type(error).__name__}: {error}); "
            "only energy models whose inputs are positions, types and edges are supported"
        ) from error
    if _ATOMIC_ENERGY not in output:
        raise ValueError(f"{source}: the nequip network gives no per-atom energies ({_ATOMIC_ENERGY!r})")


def _finish_import(network: nn.Module, scale: float, atomic_numbers: List[int], r_max: float,
                   dtype: torch.dtype, source: str, extra: dict[str, Any]) -> Tuple[Potential, dict[str, Any]]:
    backbone = NequIPBackbone(network, list(range(len(atomic_numbers))))
    potential = Potential(backbone, atomic_numbers, r_max, "nequip").to(dtype)
    with torch.no_grad():
        potential.energy_scale.fill_(scale)
    for parameter in potential.parameters():
        parameter.requires_grad_(True)
    potential.train()
    hyperparameters = {
        "cutoff": r_max,
        "imported_from": "nequip",
        "type_atomic_numbers": atomic_numbers,
        "global_scale": scale,
        "dtype": _dtype_name(dtype),
        **extra,
    }
    _check_energy_network(backbone.model, len(atomic_numbers), r_max, dtype, source)
    return potential, hyperparameters


def import_nequip_deployed(path: str | os.PathLike, species: list[int] | None = None) -> Tuple[Potential, dict[str, Any]]:
    """A trainable Potential from a ``nequip-deploy build`` file (TorchScript, nequip 0.6.x).

    ``nequip-deploy build`` scripts the model and saves it *unfrozen* (nequip freezes
    only when loading for inference), so its parameters are still in the archive:
    the energy network inside it is used as is, without nequip's force wrapper,
    and the global energy scale becomes ``Potential.energy_scale``. A file that was
    frozen afterwards holds its weights as graph constants with no names, which
    cannot be mapped back onto a model reliably: it is refused, pointing to
    :func:`import_nequip_training_dir`. No pickle is involved.

    Parameters
    ----------
    path:
        The deployed ``.pth`` file.
    species:
        Atomic number of each nequip type in type order; needed only when the
        model's type names are not chemical symbols and its config maps none.

    Returns
    -------
    (Potential, hyperparameters)
        Potential (arch ``nequip``, cutoff = ``r_max`` in Å, in the model's dtype,
        energies in the units it was trained on, normally eV) and a JSON-serialisable
        description of its origin.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"deployed NequIP model {path} does not exist")
    module, metadata = _load_deployed(path)
    if not metadata["r_max"] or not metadata["type_names"]:
        raise ValueError(
            f"{path} is a TorchScript file without nequip deployment metadata (r_max, type_names); "
            "is it a `nequip-deploy build` output?"
        )
    if not any(True for _ in module.parameters()):
        raise ValueError(
            f"{path} is a frozen TorchScript model (torch.jit.freeze): its weights were turned into "
            "unnamed graph constants and cannot be recovered for training. Import the training "
            "directory instead (config.yaml + best_model.pth) with import_nequip_training_dir, or "
            "deploy it again with `nequip-deploy build --train-dir ...` and import that file."
        )
    config = _SafeConfigLoader.load(metadata["config"], str(path)) if metadata["config"] else {}
    type_names = metadata["type_names"].split()
    atomic_numbers = _type_atomic_numbers(config, type_names, species, str(path))
    r_max = float(metadata["r_max"])
    network, scale = _energy_network(module, str(path))
    dtype = next(iter(network.parameters())).dtype
    return _finish_import(network, scale, atomic_numbers, r_max, dtype, str(path), {
        "source_file": str(path.resolve()),
        "nequip_version": metadata["nequip_version"],
        "type_names": type_names,
    })


def _load_state_dict(path: Path, trust_pickle: bool) -> dict[str, Tensor]:
    """A nequip ``best_model.pth`` (a state dict): safe loading first, pickle only when trusted."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust_pickle:
            raise PermissionError(
                f"refusing to load {path}: it holds more than tensors, so reading it means unpickling, "
                "which runs whatever code the file contains. If you trust its origin, pass "
                "`--trust-pickle` on the command line or `trust_pickle=True` in Python."
            ) from error
        state = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"{path} cannot be read as a torch state dict ({type(error).__name__}: {error})") from error
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a nequip model state dict (best_model.pth)")
    return state


def import_nequip_training_dir(path: str | os.PathLike, trust_pickle: bool = False,
                               species: list[int] | None = None,
                               checkpoint: str = "best_model.pth") -> Tuple[Potential, dict[str, Any]]:
    """A trainable Potential from a nequip 0.6.x training directory.

    The model is rebuilt with nequip's ``model_from_config`` from ``config.yaml`` (read
    as plain YAML, nothing executed) and the weights of ``checkpoint`` are loaded with
    ``strict=True``. A state dict of tensors loads without unpickling; anything else
    needs ``trust_pickle=True``.

    Parameters
    ----------
    path:
        The training directory (``root/run_name``) or its ``config.yaml``.
    trust_pickle:
        Allow unpickling a checkpoint that is not a plain state dict.
    species:
        As for :func:`import_nequip_deployed`.
    checkpoint:
        File name of the weights inside the directory.
    """
    path = Path(path)
    directory = path.parent if path.is_file() else path
    config_path = directory / "config.yaml"
    weights_path = directory / checkpoint
    for needed in (config_path, weights_path):
        if not needed.exists():
            raise FileNotFoundError(f"nequip training directory {directory} has no {needed.name}")
    from stable_md.potentials._e3nn_env import import_nequip

    import_nequip()
    from nequip.model import model_from_config
    from nequip.scripts.train import default_config
    from nequip.utils import Config, dtype_from_name, torch_default_dtype

    config = dict(default_config)
    config.update(_SafeConfigLoader.load(config_path.read_text(), str(config_path)))
    state = _load_state_dict(weights_path, trust_pickle)
    # nequip trains with torch's default dtype set to `default_dtype` (per-species shifts
    # and scales live in it); rebuild the same way, then put the global default back.
    built_config = Config.from_dict(config)
    with _quiet_nequip(), torch_default_dtype(dtype_from_name(config.get("default_dtype", "float64"))):
        model = model_from_config(built_config, initialize=False, deploy=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{weights_path} does not fit the model described by {config_path}: {error}") from error
    # model_from_config fills in type_names from the config's element options
    type_names = list(built_config.get("type_names") or [])
    atomic_numbers = _type_atomic_numbers(config, type_names, species, str(directory))
    network, scale = _energy_network(model, str(directory))
    dtype = next(iter(network.parameters())).dtype
    return _finish_import(network, scale, atomic_numbers, float(config["r_max"]), dtype, str(directory), {
        "source_dir": str(directory.resolve()),
        "type_names": type_names,
    })


def export_nequip_deployed(model, output: str | os.PathLike, template: Optional[str | os.PathLike] = None,
                           trust_pickle: bool = False) -> Path:
    """Write a stable-md model imported from a deployed NequIP file (``model``: a loaded ModelFile) back as a
    deployed NequIP file that ``NequIPCalculator.from_deployed_model`` and nequip's tools load.

    The architecture and deployment metadata come from ``template`` (default: the deployed file it was
    imported from; TorchScript, no pickle, so ``trust_pickle`` is not needed); its energy network takes the
    refined parameters, and the per-species shifts refine refits are added to nequip's own per-species
    shifts (divided by the global scale, which multiplies them in nequip).
    """
    from stable_md.files import atomic_write
    from stable_md.potentials.exporters import template_path, template_tensors

    recorded = model.metadata.get("hyperparameters", {}).get("source_file")
    origin = recorded or "a NequIP training directory"
    source = template_path(template, recorded, f"{model.path} was imported from {origin}, which is not a deployed "
                                               f"file here; pass a `nequip-deploy build` file of the same model as "
                                               f"--template")
    deployed, extra = _load_deployed(source)
    if not extra["r_max"]:
        raise ValueError(f"{source} is not a deployed NequIP model (no deployment metadata)")
    network, scale = _energy_network(deployed, str(source))
    theirs = network.state_dict()
    ours = template_tensors(model, "backbone.model.", theirs, source, "NequIP")
    our_scale = float(model.module.energy_scale)
    if abs(our_scale - scale) > 1e-9 * max(1.0, abs(scale)):
        raise ValueError(f"{model.path} scales energies by {our_scale:g}, {source} by {scale:g}: not the same model")
    shifts = model.module.energy_shift.detach().to(torch.float64)
    holder = next((module for _, module in network.named_modules() if _class_name(module) == "PerSpeciesScaleShift"),
                  None)
    with torch.no_grad():
        for name, value in theirs.items():
            value.copy_(ours[name])
        if bool((shifts != 0).any()):
            if holder is None or not bool(holder.has_shifts):
                raise ValueError(f"{model.path} has per-species energy shifts, and {source} has no per-species "
                                 f"shifts to hold them")
            type_index = model.module.backbone.type_index.tolist()
            for k, nequip_type in enumerate(type_index):
                holder.shifts[nequip_type] += (shifts[k] / scale).to(holder.shifts.dtype)
    output = Path(output)
    atomic_write(output, lambda tmp: torch.jit.save(deployed, str(tmp), _extra_files=extra))
    return output


def _load_deployed(path: Path) -> Tuple[torch.jit.ScriptModule, dict[str, str]]:
    """A deployed NequIP file and every metadata file in it (decoded), so that a re-save keeps them all."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a deployed NequIP model (not a TorchScript archive)")
    with zipfile.ZipFile(path) as archive:
        names = {name.split("/extra/", 1)[1] for name in archive.namelist() if "/extra/" in name}
    extra = {key: "" for key in sorted(names | set(_DEPLOY_KEYS))}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as error:
        raise ValueError(f"{path} is not a deployed NequIP model (cannot load as TorchScript: {error})") from error
    return module, {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in extra.items()}
