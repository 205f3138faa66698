"""ANI (Smith, Isayev, Roitberg, Chem. Sci. 8, 3192, 2017) built from torchani 2.9 parts.

The atomic environment vectors (AEVs) come from :class:`torchani.aev.AEVComputer`
and the per-element multilayer perceptrons from :class:`torchani.nn.ANINetworks`,
joined by :class:`torchani.potentials.NNPotential`. torchani's own neighbour list is
bypassed: the backbone turns *our* edge list (``edge_index``, ``shifts``, see
:mod:`stable_md.potentials.neighbors`) into a torchani half neighbour list and calls
``compute_from_neighbors``, so batching over frames and periodic minimum images
behave exactly as for every other backbone. torchani builds the angular triplets
from that pair list itself (``torchani.neighbors.neighbors_to_triples``).

Defaults: an ANI-2x-like AEV (radial cutoff 5.2 Å, angular cutoff 3.5 Å, 16 radial
shifts, 8 angular shifts x 4 angle sections, cosine cutoff function) sized for the
elements of the training data, and ANI-1x-sized networks (160-128-96 hidden units for
H, 144-112-96 for C, 128-112-96 otherwise) with CELU(alpha=0.1) activations.

:func:`import_torchani_model` wraps a torchani model a user already has (an object, a
``torch.save``d module, or a state dict) into a :class:`~stable_md.potentials.base.Potential`.
"""
from __future__ import annotations

import copy
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from stable_md.potentials.base import Potential
from stable_md.potentials.hyperparameters import COUNT, NON_NEGATIVE, POSITIVE, Choice, Widths, WidthsByElement
from stable_md.units import HARTREE_IN_EV

with warnings.catch_warnings():
    # torchani warns at import that its optional CUDA extensions are not compiled;
    # stable-md always uses the pure-torch AEV ("pyaev"), so the notice is noise.
    warnings.filterwarnings("ignore", message=r".*extensions.*are not installed.*")
    import torchani
    from torchani.aev import AEVComputer, ANIAngular, ANIRadial
    from torchani.constants import PERIODIC_TABLE
    from torchani.cutoffs import CutoffCosine, CutoffSmooth
    from torchani.neighbors import Neighbors, discard_outside_cutoff
    from torchani.nn import AtomicContainer, AtomicNetwork, ANINetworks, Ensemble, TightCELU
    from torchani.potentials import NNPotential
    from torchani.potentials import Potential as TorchaniPotential

DEFAULT_HYPERPARAMETERS: dict[str, Any] = {
    # Radial AEV cutoff in Å; also the neighbour-list cutoff of the Potential.
    "cutoff": 5.2,
    # Angular AEV cutoff in Å (<= cutoff).
    "angular_cutoff": 3.5,
    # Radial terms 0.25 exp(-eta (r - r_s)^2), r_s evenly spaced from start to cutoff (Å, Å^-2).
    "radial_start": 0.8,
    "radial_eta": 19.7,
    "radial_num_shifts": 16,
    # Angular terms (ANI-2x values): distance shifts x angle sections.
    "angular_start": 0.8,
    "angular_eta": 12.5,
    "angular_zeta": 14.1,
    "angular_num_shifts": 8,
    "angular_num_sections": 4,
    # torchani cutoff function of both AEV parts: "cosine" (ANI-1x/2x) or "smooth".
    "cutoff_fn": "cosine",
    # Hidden layer widths of each element's network (ANI-1x sizes); others use the default.
    "hidden_layers": {"H": [160, 128, 96], "C": [144, 112, 96], "N": [128, 112, 96], "O": [128, 112, 96]},
    "default_hidden_layers": [128, 112, 96],
    # "celu" is torchani's CELU with alpha = 0.1 (as in ANI-1x/2x); "gelu" is also accepted.
    "activation": "celu",
}

HYPERPARAMETER_RULES = {
    "cutoff": POSITIVE, "angular_cutoff": POSITIVE, "radial_start": NON_NEGATIVE, "radial_eta": POSITIVE,
    "radial_num_shifts": COUNT, "angular_start": NON_NEGATIVE, "angular_eta": POSITIVE, "angular_zeta": POSITIVE,
    "angular_num_shifts": COUNT, "angular_num_sections": COUNT, "cutoff_fn": Choice(("cosine", "smooth")),
    "hidden_layers": WidthsByElement(), "default_hidden_layers": Widths(), "activation": Choice(("celu", "gelu")),
}

_CUTOFF_FUNCTIONS = ("cosine", "smooth")
_ACTIVATIONS = ("celu", "gelu")


class ANIBackbone(nn.Module):
    """torchani potentials evaluated on stable-md's neighbour list.

    Follows the backbone signature of :mod:`stable_md.potentials.base` and returns
    per-atom energies ``[M]`` in the unit of the torchani modules (Hartree for
    imported torchani models, "model units" scaled by the Potential otherwise).

    Parameters
    ----------
    potentials:
        torchani potentials by name; ``"nnp"`` is the AEV + networks
        :class:`torchani.potentials.NNPotential`, others (e.g. ``RepulsionXTB`` of an
        imported model) are evaluated on the same pairs within their own cutoff (Å).
    element_index:
        torchani element index of each stable-md species index.
    """

    def __init__(self, potentials: Dict[str, TorchaniPotential], element_index: Sequence[int]) -> None:
        super().__init__()
        if "nnp" not in potentials:
            raise ValueError("an ANI backbone needs an 'nnp' (AEV + networks) potential")
        for name, potential in potentials.items():
            if not math.isfinite(potential.cutoff):
                raise ValueError(
                    f"torchani potential {name!r} has an infinite cutoff; stable-md evaluates every "
                    "term on a finite neighbour list, so give it a finite cutoff (or disable it) first"
                )
        self.potentials = nn.ModuleDict(potentials)
        self.cutoff = float(max(p.cutoff for p in potentials.values()))
        self.register_buffer("element_index", torch.tensor(list(element_index), dtype=torch.long))

    def forward(self, positions: Tensor, species: Tensor, edge_index: Tensor, shifts: Tensor,
                batch: Tensor, num_frames: int) -> Tensor:
        # torchani wants each pair once; our list holds both directions (i->j with shift s
        # and j->i with -s), so keeping i < j keeps exactly one copy of every pair.
        half = edge_index[0] < edge_index[1]
        pairs = edge_index[:, half]
        # torchani's difference vector of pair (a, b) is r_a - r_b (the opposite of our
        # r_ab = r_b - r_a + shift); its angles only need the sign to be consistent.
        diff = positions[pairs[0]] - positions[pairs[1]] - shifts[half]
        distances = torch.linalg.norm(diff, dim=-1)
        # The cosine cutoff function rises again beyond its cutoff, so pairs past the
        # largest torchani cutoff (possible if the Potential's cutoff is larger) must go.
        within = (distances.detach() <= self.cutoff).nonzero().view(-1)
        neighbors = Neighbors(pairs.index_select(1, within), distances.index_select(0, within),
                              diff.index_select(0, within))
        # All frames are one "molecule" for torchani: pairs never cross frames.
        elements = self.element_index[species].unsqueeze(0)
        coords = positions.unsqueeze(0)
        energies = positions.new_zeros((1, positions.shape[0]))
        for potential in self.potentials.values():
            if potential._enabled:
                local = discard_outside_cutoff(neighbors, potential.cutoff)
                result = potential.compute_from_neighbors(elements, coords, local, 0, True, False)
                energies = energies + result.energies
        return energies.squeeze(0)


def _symbol(atomic_number: int) -> str:
    return PERIODIC_TABLE[int(atomic_number)]


def _atomic_network(in_dim: int, hidden: Sequence[int], activation: str, bias: bool = True) -> AtomicNetwork:
    layer_dims = [int(in_dim)] + [int(h) for h in hidden] + [1]
    return AtomicNetwork(layer_dims, activation=activation, bias=bias)


def _make_aev(num_species: int, cutoff: float, angular_cutoff: float, radial_start: float, radial_eta: float,
              radial_num_shifts: int, angular_start: float, angular_eta: float, angular_zeta: float,
              angular_num_shifts: int, angular_num_sections: int, cutoff_fn: str) -> AEVComputer:
    if cutoff_fn not in _CUTOFF_FUNCTIONS:
        raise ValueError(f"ani cutoff_fn must be one of {_CUTOFF_FUNCTIONS}, got {cutoff_fn!r}")
    if not 0.0 < angular_cutoff <= cutoff:
        raise ValueError(
            f"ani angular_cutoff ({angular_cutoff} Å) must be positive and at most the radial cutoff ({cutoff} Å)"
        )
    if not (radial_start < cutoff and angular_start < angular_cutoff):
        raise ValueError("ani radial_start/angular_start must be below their cutoffs")
    radial = ANIRadial.cover_linearly(start=float(radial_start), cutoff=float(cutoff), eta=float(radial_eta),
                                      num_shifts=int(radial_num_shifts), cutoff_fn=cutoff_fn)
    angular = ANIAngular.cover_linearly(start=float(angular_start), cutoff=float(angular_cutoff),
                                        eta=float(angular_eta), zeta=float(angular_zeta),
                                        num_shifts=int(angular_num_shifts),
                                        num_sections=int(angular_num_sections), cutoff_fn=cutoff_fn)
    return AEVComputer(radial=radial, angular=angular, num_species=num_species, strategy="pyaev")


def _make_networks(symbols: Sequence[str], in_dim: int, hidden_layers: Mapping[str, Sequence[int]],
                   default_hidden_layers: Sequence[int], activation: str, bias: bool = True) -> ANINetworks:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"ani activation must be one of {_ACTIVATIONS}, got {activation!r}")
    return ANINetworks({
        s: _atomic_network(in_dim, hidden_layers.get(s, default_hidden_layers), activation, bias) for s in symbols
    })


def build_backbone(species: Sequence[int], cutoff: float, angular_cutoff: float, radial_start: float,
                   radial_eta: float, radial_num_shifts: int, angular_start: float, angular_eta: float,
                   angular_zeta: float, angular_num_shifts: int, angular_num_sections: int, cutoff_fn: str,
                   hidden_layers: Mapping[str, Sequence[int]], default_hidden_layers: Sequence[int],
                   activation: str) -> ANIBackbone:
    """An ANI backbone for ``species`` (atomic numbers, in backbone index order).

    Hyperparameters as in ``DEFAULT_HYPERPARAMETERS`` (lengths in Å, ``radial_eta`` and
    ``angular_eta`` in Å^-2). The AEV has ``radial_num_shifts * S +
    angular_num_shifts * angular_num_sections * S (S + 1) / 2`` entries for S species.
    """
    symbols = [_symbol(z) for z in species]
    aev = _make_aev(len(symbols), cutoff, angular_cutoff, radial_start, radial_eta, radial_num_shifts,
                    angular_start, angular_eta, angular_zeta, angular_num_shifts, angular_num_sections,
                    cutoff_fn)
    networks = _make_networks(symbols, aev.out_dim, hidden_layers, default_hidden_layers, activation)
    return ANIBackbone({"nnp": NNPotential(aev, networks)}, range(len(symbols)))


# --------------------------------------------------------------------------------------
# Importing torchani models
# --------------------------------------------------------------------------------------


def import_torchani_model(model_or_path: Any, species: Optional[List[int]] = None,
                          trust_pickle: bool = False) -> Tuple[Potential, dict[str, Any]]:
    """Wrap a torchani model into a stable-md :class:`Potential` (Å, eV).

    Parameters
    ----------
    model_or_path:
        A torchani module (an ``ANI`` model such as ``torchani.models.ANI2x()`` or one
        made by ``torchani.arch.Assembler``, or a bare module holding one
        ``AEVComputer``, one network container and optionally a ``SelfEnergy``), or a
        path to a file holding either such a module saved with ``torch.save`` (a pickle,
        read only with ``trust_pickle``) or a state dict (of a torchani ``ANI`` model
        with ``ANINetworks``, or of a stable-md ani Potential/backbone). A state dict does
        not record cutoffs, cutoff function or activation: ours (5.2/3.5 Å, cosine, CELU)
        are assumed; layer sizes and AEV constants are read from the tensors.
    species:
        Atomic numbers the Potential should know (default: all the model's elements).
    trust_pickle:
        Allow unpickling a ``torch.save``d module, which can run arbitrary code.

    Returns
    -------
    (potential, hyperparameters):
        The Potential (arch ``"ani"``; the backbone stays in Hartree, ``energy_scale`` is
        Hartree->eV and torchani's self energies become ``energy_shift`` in eV) and a
        JSON-serialisable description for the model file's metadata.
    """
    source = "in-memory torchani model"
    obj = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        source = str(path)
        obj = _read_torchani_file(path, trust_pickle)
    if isinstance(obj, Mapping):
        potential, hyper = _import_state_dict(obj, species, source)
    elif isinstance(obj, nn.Module):
        potential, hyper = _import_module(obj, species, source)
    else:
        potential = None
    if potential is not None:
        if isinstance(model_or_path, (str, os.PathLike)):  # what export finds again from another directory
            hyper["imported_from"]["source"] = str(Path(model_or_path).resolve())
        return potential, hyper
    raise ValueError(
        f"{source} is not a torchani model: got a {type(obj).__name__}, expected a torchani module or state dict"
    )


def _read_torchani_file(path: Path, trust_pickle: bool) -> Any:
    """The object in a torchani model file: a state dict, or (with trust) an unpickled module."""
    if not path.exists():
        raise FileNotFoundError(f"torchani model file {path} does not exist")
    not_torchani = f"{path} is not a torchani model file"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("extra/stable_md.json") for n in names):
            raise ValueError(f"{path} is already a stable-md model file; load it with stable_md.potentials.load_model")
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise ValueError(
                f"{path} is a TorchScript archive; torchani models can be imported as the Python object, "
                "a torch.save'd module or a state dict (model.state_dict()), not as TorchScript"
            )
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise ValueError(f"{not_torchani} (a zip archive, but not one written by torch.save)")
    else:
        with open(path, "rb") as handle:
            head = handle.read(1)
        # torch.save's legacy (non-zip) format is a pickle, which starts with the PROTO opcode.
        if head != b"\x80":
            raise ValueError(f"{not_torchani} (neither a torch.save zip archive nor a pickle)")
    try:
        # weights_only refuses anything but tensors and plain containers: a state dict
        # loads safely, a whole pickled module does not.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # a torch.save file holding Python objects beyond weights: needs trust below
    except Exception as error:  # truncated or foreign content
        raise ValueError(f"{not_torchani} (torch.load cannot read it: {error})") from error
    if not trust_pickle:
        raise PermissionError(
            f"{path} holds a pickled Python object (a whole module saved with torch.save), not just weights. "
            "Unpickling runs code stored in the file, so it is refused by default. If you trust where the file "
            "comes from, pass trust_pickle=True (--trust-pickle on the command line); otherwise save and import "
            "its state dict instead: torch.save(model.state_dict(), path)"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*extensions.*are not installed.*")
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"{path}: could not be unpickled as a torchani model ({error})") from error


def _check_species(model_numbers: Sequence[int], species: Optional[Sequence[int]], source: str) -> list[int]:
    known = [int(z) for z in model_numbers]
    if any(not 1 <= z <= 118 for z in known) or len(set(known)) != len(known):
        raise ValueError(f"{source}: the torchani model's element list {known} is not a valid list of atomic numbers")
    wanted = sorted(set(known)) if species is None else sorted({int(z) for z in species})
    missing = [z for z in wanted if z not in known]
    if missing:
        raise ValueError(
            f"{source}: the torchani model does not cover the requested species: atomic numbers {missing} are "
            f"missing (the model knows {sorted(known)}, i.e. {[_symbol(z) for z in sorted(known)]})"
        )
    if not wanted:
        raise ValueError(f"{source}: empty species list")
    return wanted


def _finish(potentials: Dict[str, TorchaniPotential], model_numbers: Sequence[int],
            species: Optional[Sequence[int]], self_energies_eV: Optional[Tensor], energy_scale: float,
            dtype: torch.dtype, source: str) -> Potential:
    """Potential with our species order, torchani element mapping, shifts and scale."""
    known = [int(z) for z in model_numbers]
    wanted = _check_species(known, species, source)
    element_index = [known.index(z) for z in wanted]
    backbone = ANIBackbone(potentials, element_index)
    potential = Potential(backbone, wanted, backbone.cutoff, "ani")
    potential = potential.to(dtype)
    with torch.no_grad():
        potential.energy_scale.fill_(float(energy_scale))
        if self_energies_eV is not None:
            potential.energy_shift.copy_(self_energies_eV.to(dtype)[torch.tensor(element_index)])
    for parameter in potential.parameters():
        # torchani's pretrained factories freeze their weights; imports are for fine-tuning.
        parameter.requires_grad_(True)
    return potential


def _parameter_dtype(module: nn.Module) -> Tuple[torch.dtype, torch.device]:
    """Floating dtype and device of the first floating parameter or buffer of ``module``."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def _import_module(module: nn.Module, species: Optional[Sequence[int]], source: str) -> Tuple[Potential, dict]:
    if isinstance(module, torch.jit.ScriptModule):
        raise ValueError(
            f"{source} is a TorchScript module; import the Python torchani model (or its state dict) instead"
        )
    from torchani.arch import _ANI  # the common base of torchani.arch.ANI and ANIq

    dtype, device = _parameter_dtype(module)
    # Work on a copy: the caller's model must not change when our Potential is trained.
    module = copy.deepcopy(module)
    if isinstance(module, _ANI):
        potentials = {name: p for name, p in module.potentials.items() if p._enabled}
        if "nnp" not in potentials:
            raise ValueError(f"{source}: the torchani model has its neural network potential disabled")
        numbers = module.atomic_numbers.tolist()
        shifter = module.energy_shifter
        self_energies = shifter.self_energies.detach().double() if shifter._enabled else None
        kind = type(module).__name__
    else:
        aevs = [m for m in module.modules() if isinstance(m, AEVComputer)]
        containers = _outermost(module, AtomicContainer)
        if len(aevs) != 1 or len(containers) != 1:
            raise ValueError(
                f"{source} ({type(module).__name__}) is not a torchani model: expected one torchani "
                f"AEVComputer and one atomic network container (ANINetworks, Ensemble, ...), found "
                f"{len(aevs)} and {len(containers)}"
            )
        aev, networks = aevs[0], containers[0]
        numbers = networks.atomic_numbers.tolist()
        if aev.num_species != len(numbers):
            raise ValueError(
                f"{source}: the AEVComputer is built for {aev.num_species} elements but the networks "
                f"for {len(numbers)} ({numbers})"
            )
        potentials = {"nnp": NNPotential(aev, networks)}
        self_energies = _bare_self_energies(module, len(numbers), source)
        kind = f"{type(module).__name__}({type(aev).__name__}, {type(networks).__name__})"
    nnp = potentials["nnp"]
    if not isinstance(nnp, NNPotential):
        raise ValueError(f"{source}: unsupported torchani potential {type(nnp).__name__} (need an NNPotential)")
    # The cuAEV strategies need CUDA extensions; the pure-torch path is what we script.
    nnp.aev_computer.set_strategy("pyaev")
    shift = None if self_energies is None else self_energies * HARTREE_IN_EV
    potential = _finish(potentials, numbers, species, shift, HARTREE_IN_EV, dtype, source).to(device)
    hyper = _describe(potential.backbone, numbers, source, kind)
    return potential, hyper


def _outermost(module: nn.Module, kind: type) -> list[nn.Module]:
    """Submodules of type ``kind`` not nested in another one (ensemble members are skipped)."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        if isinstance(m, kind):
            found.append(m)
            return
        for child in m.children():
            visit(child)

    visit(module)
    return found


def _bare_self_energies(module: nn.Module, count: int, source: str) -> Optional[Tensor]:
    from torchani.sae import SelfEnergy
    from torchani.utils import EnergyShifter

    shifters = [m for m in module.modules() if isinstance(m, (SelfEnergy, EnergyShifter))]
    if not shifters:
        return None
    if len(shifters) > 1:
        raise ValueError(f"{source}: found {len(shifters)} self-energy modules, expected at most one")
    shifter = shifters[0]
    if isinstance(shifter, SelfEnergy) and not shifter._enabled:
        return None
    if getattr(shifter, "fit_intercept", False):
        raise ValueError(f"{source}: an EnergyShifter with fit_intercept adds a per-molecule constant, "
                         "which a per-atom model cannot represent")
    values = shifter.self_energies.detach().double().view(-1)
    if values.numel() != count:
        raise ValueError(f"{source}: {values.numel()} self energies for {count} elements")
    return values


def _number(value: Tensor) -> float:
    """A stored AEV constant as a short float for the metadata (19.7, not 19.700000762939453).

    torchani creates these constants in float32 (and a ``.double()`` model keeps the
    float32-rounded values), so the shortest decimal that reads back to the same
    float32 is the number the model was built from. The description is informational:
    the exact values travel in the model's buffers.
    """
    return float(str(np.float32(value.item())))


def _cutoff_fn_name(fn: nn.Module) -> str:
    if isinstance(fn, CutoffCosine):
        return "cosine"
    if isinstance(fn, CutoffSmooth) and fn.order == 2 and fn.eps == 1.0e-10:
        return "smooth"
    return type(fn).__name__


def _activation_name(activation: nn.Module) -> str:
    if isinstance(activation, TightCELU):
        return "celu"
    if isinstance(activation, nn.GELU):
        return "gelu"
    return type(activation).__name__


def _describe(backbone: ANIBackbone, numbers: Sequence[int], source: str, kind: str) -> dict[str, Any]:
    """Hyperparameters in the ``ani`` schema where they apply, plus what the import brought in."""
    nnp = backbone.potentials["nnp"]
    aev = nnp.aev_computer
    hyper: dict[str, Any] = {"cutoff": float(backbone.cutoff)}
    imported: dict[str, Any] = {
        "source": source,
        "torchani_version": str(getattr(torchani, "__version__", "unknown")),
        "model": kind,
        "elements": [int(z) for z in numbers],
        "backbone_energy_unit": "Hartree",
        "radial_cutoff": float(aev.radial.cutoff),
        "extra_potentials": {name: float(p.cutoff) for name, p in backbone.potentials.items() if name != "nnp"},
    }
    if isinstance(aev.radial, ANIRadial) and isinstance(aev.angular, ANIAngular):
        hyper.update({
            "angular_cutoff": float(aev.angular.cutoff),
            "radial_start": _number(aev.radial.shifts[0]),
            "radial_eta": _number(aev.radial.eta[0]),
            "radial_num_shifts": int(aev.radial.shifts.numel()),
            "angular_start": _number(aev.angular.shifts[0]),
            "angular_eta": _number(aev.angular.eta[0]),
            "angular_zeta": _number(aev.angular.zeta[0]),
            "angular_num_shifts": int(aev.angular.shifts.numel()),
            "angular_num_sections": int(aev.angular.sections.numel()),
            "cutoff_fn": _cutoff_fn_name(aev.radial.cutoff_fn),
        })
        imported["radial_shifts"] = [_number(v) for v in aev.radial.shifts]
        imported["angular_shifts"] = [_number(v) for v in aev.angular.shifts]
        imported["angular_sections"] = [_number(v) for v in aev.angular.sections]
    else:
        imported["aev_terms"] = [type(aev.radial).__name__, type(aev.angular).__name__]
        imported["angular_cutoff"] = float(aev.angular.cutoff)
    networks = nnp.neural_networks
    members = list(networks.members) if isinstance(networks, Ensemble) else [networks]
    imported["ensemble_size"] = len(members)
    first = members[0]
    if isinstance(first, ANINetworks):
        hidden: dict[str, list[int]] = {}
        activation = "celu"
        for symbol, net in first.atomics.items():
            if isinstance(net, AtomicNetwork):
                hidden[symbol] = [int(layer.out_features) for layer in net.layers]
                activation = _activation_name(net.activation)
        if len(hidden) == len(first.atomics):
            hyper.update({"hidden_layers": hidden, "default_hidden_layers": [], "activation": activation})
        else:
            kinds = sorted({type(n).__name__ for n in first.atomics.values()})
            imported["networks"] = "ANINetworks of " + ", ".join(kinds)
    else:
        imported["networks"] = type(first).__name__
    hyper["imported_from"] = imported
    return hyper


# State dicts ---------------------------------------------------------------------------

_NNP = "potentials.nnp."


def _import_state_dict(state: Mapping[str, Any], species: Optional[Sequence[int]],
                       source: str) -> Tuple[Potential, dict]:
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{source} is not a torchani model: it is a dictionary but not a state dict of tensors")
    keys = list(state)
    if any(k.startswith("backbone.") for k in keys):
        layout = "stable-md ani Potential"
        sub = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    else:
        sub = dict(state)
        layout = "torchani ANI" if "energy_shifter.self_energies" in sub else "stable-md ani backbone"
    nnp_keys = [k for k in sub if k.startswith(_NNP)]
    if not any(k.startswith(_NNP + "aev_computer.") for k in nnp_keys) or not any(
            k.startswith(_NNP + "neural_networks.") for k in nnp_keys):
        raise ValueError(
            f"{source} is not a torchani model: its state dict has no '{_NNP}aev_computer.*' and "
            f"'{_NNP}neural_networks.*' entries (keys start with {sorted({k.split('.')[0] for k in keys})[:6]})"
        )
    others = sorted({k.split(".")[1] for k in sub if k.startswith("potentials.") and not k.startswith(_NNP)})
    if others:
        raise ValueError(
            f"{source}: the state dict holds extra torchani potentials {others}, whose settings a state dict "
            "does not record; import the model object or a torch.save'd model (--trust-pickle) instead"
        )

    # Networks: "neural_networks.atomics.<symbol>.<layer>" or an ensemble's "members.<k>.atomics...".
    prefix = _NNP + "neural_networks."
    net_keys = [k[len(prefix):] for k in nnp_keys if k.startswith(prefix)]
    if all(k.startswith("members.") for k in net_keys):
        size = 1 + max(int(k.split(".")[1]) for k in net_keys)
        member_prefixes = [f"members.{m}.atomics." for m in range(size)]
    elif all(k.startswith("atomics.") for k in net_keys):
        size, member_prefixes = 0, ["atomics."]
    else:
        raise ValueError(f"{source}: unsupported network container in the state dict (expected ANINetworks "
                         "or an Ensemble of them, keys 'atomics.<element>...')")
    symbols: list[str] = []
    for k in net_keys:
        if k.startswith(member_prefixes[0]):
            symbol = k[len(member_prefixes[0]):].split(".")[0]
            if symbol not in symbols:
                symbols.append(symbol)
    if any(s not in PERIODIC_TABLE[1:] for s in symbols):
        raise ValueError(f"{source}: network names {symbols} are not element symbols")
    numbers = [PERIODIC_TABLE.index(s) for s in symbols]
    if "atomic_numbers" in sub and sub["atomic_numbers"].tolist() != numbers:
        raise ValueError(f"{source}: atomic_numbers {sub['atomic_numbers'].tolist()} disagree with the "
                         f"networks' elements {numbers}")

    def hidden_of(member: str, symbol: str) -> list[int]:
        base = prefix + member + symbol + "."
        count = sum(1 for k in sub if k.startswith(base + "layers.") and k.endswith(".weight"))
        return [int(sub[f"{base}layers.{i}.weight"].shape[0]) for i in range(count)]

    hidden = {s: hidden_of(member_prefixes[0], s) for s in symbols}
    bias = any(k.endswith(".bias") for k in net_keys)

    aev_prefix = _NNP + "aev_computer."
    try:
        radial_shifts = sub[aev_prefix + "radial.shifts"]
        angular_shifts = sub[aev_prefix + "angular.shifts"]
        sections = sub[aev_prefix + "angular.sections"]
        hyper = dict(DEFAULT_HYPERPARAMETERS)
        hyper.update({
            "radial_start": _number(radial_shifts[0]),
            "radial_eta": _number(sub[aev_prefix + "radial.eta"].view(-1)[0]),
            "radial_num_shifts": int(radial_shifts.numel()),
            "angular_start": _number(angular_shifts[0]),
            "angular_eta": _number(sub[aev_prefix + "angular.eta"].view(-1)[0]),
            "angular_zeta": _number(sub[aev_prefix + "angular.zeta"].view(-1)[0]),
            "angular_num_shifts": int(angular_shifts.numel()),
            "angular_num_sections": int(sections.numel()),
        })
        # Keep the default (documented) table when the file's layer sizes are what it gives.
        if any(hidden[s] != list(hyper["hidden_layers"].get(s, hyper["default_hidden_layers"])) for s in symbols):
            hyper["hidden_layers"] = hidden
    except KeyError as error:
        raise ValueError(f"{source}: the state dict lacks the standard ANI AEV constants ({error})") from error

    aev = _make_aev(len(symbols), hyper["cutoff"], hyper["angular_cutoff"], hyper["radial_start"],
                    hyper["radial_eta"], hyper["radial_num_shifts"], hyper["angular_start"], hyper["angular_eta"],
                    hyper["angular_zeta"], hyper["angular_num_shifts"], hyper["angular_num_sections"],
                    hyper["cutoff_fn"])

    def networks_() -> ANINetworks:
        return _make_networks(symbols, aev.out_dim, hidden, hyper["default_hidden_layers"], hyper["activation"],
                              bias)

    networks: AtomicContainer = networks_() if size == 0 else Ensemble([networks_() for _ in range(size)])
    nnp = NNPotential(aev, networks)
    element_index = list(range(len(symbols)))
    # Non-persistent buffers (species converters) are absent from saved state dicts anyway.
    nnp_state = {k[len(_NNP):]: v for k, v in sub.items() if k.startswith(_NNP)}
    try:
        nnp.load_state_dict(nnp_state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{source}: the state dict does not fit an ANI model with our layout ({layout}); "
            f"details: {error}"
        ) from error
    if layout != "torchani ANI" and "element_index" in sub:
        element_index = sub["element_index"].tolist()
    dtype = radial_shifts.dtype if radial_shifts.is_floating_point() else torch.float32
    for v in nnp_state.values():
        if v.is_floating_point():
            dtype = v.dtype

    # Our species order for the stored indices: stable-md files map index k -> element_index[k].
    stored_species = [numbers[i] for i in element_index]
    if layout == "torchani ANI":
        shift = sub["energy_shifter.self_energies"].double() * HARTREE_IN_EV
        scale = HARTREE_IN_EV
        unit = "Hartree"
    elif layout == "stable-md ani Potential":
        by_element = dict(zip(state["species_numbers"].tolist(), state["energy_shift"].double().tolist()))
        shift = torch.tensor([by_element.get(z, 0.0) for z in numbers], dtype=torch.float64)
        scale = float(state["energy_scale"])
        unit = "model units (energy_scale converts to eV)"
    else:
        shift = None
        scale = 1.0
        unit = "model units (energy_scale converts to eV)"
    potential = _finish({"nnp": nnp}, numbers, species if species is not None else stored_species,
                        shift, scale, dtype, source)
    hyper["default_hidden_layers"] = list(hyper["default_hidden_layers"])
    hyper["imported_from"] = {
        "source": source,
        "layout": layout,
        "elements": numbers,
        "ensemble_size": max(size, 1),
        "backbone_energy_unit": unit,
        "assumed_from_defaults": ["cutoff", "angular_cutoff", "cutoff_fn", "activation"],
    }
    if not bias:
        hyper["imported_from"]["bias"] = False
    return potential, hyper


def export_torchani_model(model, output: str | os.PathLike, template: Optional[str | os.PathLike] = None,
                          trust_pickle: bool = False) -> Path:
    """Write a stable-md model imported from a torchani ANI model (``model``: a loaded ModelFile) back as a
    ``torch.save``d torchani module, as it was imported.

    The module comes from ``template`` (default: the file it was imported from), unpickled, which needs
    ``trust_pickle``; it must be a torchani ``ANI`` model (``torchani.models.*``, ``torchani.arch.Assembler``).
    Its potentials take the refined parameters and its energy shifter the per-species shifts refine refits
    (eV to Hartree), so torchani computes the energies stable-md does.
    """
    from torchani.arch import _ANI

    from stable_md.files import atomic_write
    from stable_md.potentials.exporters import template_path, template_tensors

    origin = model.metadata.get("hyperparameters", {}).get("imported_from", {})
    recorded = origin.get("source") if isinstance(origin, dict) else None
    source = template_path(template, recorded, f"{model.path} was imported from {recorded or 'a torchani model'}, "
                                               f"which is not a file here; pass the torch.save'd torchani model as "
                                               f"--template")
    ani = _read_torchani_file(source, trust_pickle)
    if not isinstance(ani, _ANI):
        raise ValueError(f"{source} holds a {type(ani).__name__}; export to torchani writes torchani ANI models "
                         f"(torchani.models.*, torchani.arch.Assembler), so the template must be one")
    names = {name.split(".")[2] for name in model.module.state_dict() if name.startswith("backbone.potentials.")}
    # the template's potentials we hold (ours also holds buffers torchani does not save)
    theirs = {name: value for name, value in ani.state_dict().items()
              if name.startswith("potentials.") and name.split(".")[1] in names}
    ours = template_tensors(model, "backbone.", theirs, source, "torchani", extra_allowed=True)
    scale = float(model.module.energy_scale)
    if abs(scale - HARTREE_IN_EV) > 1e-9 * HARTREE_IN_EV:
        raise ValueError(f"{model.path} scales its backbone by {scale:g}, not Hartree to eV: not a torchani import")
    shifts = model.module.energy_shift.detach().to(torch.float64) / HARTREE_IN_EV
    element_index = model.module.backbone.element_index.tolist()
    with torch.no_grad():
        for name, value in theirs.items():
            value.copy_(ours[name])
        shifter = ani.energy_shifter
        if bool((shifts != 0).any()) and not shifter._enabled:
            shifter.self_energies.zero_()  # refine refits the shifts: a shifter that was off now holds them
            shifter._enabled = True
        for k, element in enumerate(element_index):
            shifter.self_energies[element] = shifts[k].to(shifter.self_energies.dtype)
    output = Path(output)
    atomic_write(output, lambda tmp: torch.save(ani, tmp))
    return output
