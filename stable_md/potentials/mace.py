"""MACE (Batatia et al., NeurIPS 2022) behind the stable-md backbone signature.

Two ways in:

* :func:`build_backbone` builds a fresh ``mace.modules.MACE`` from explicit
  hyperparameters (``DEFAULT_HYPERPARAMETERS``: 32 scalar + 32 vector channels,
  ``max_ell`` 2, correlation 3, two interactions, 5 Å cutoff, about 66k
  parameters for three elements; ``max_ell`` 3 as in the MACE paper costs about
  3x more time on a CPU);
* :func:`import_mace_model` wraps a model file written by MACE's own training
  (a pickled ``torch.nn.Module``), moving its reference energies E0 into the
  Potential's per-species ``energy_shift`` so that the total energy is the one
  MACE itself predicts.

In both cases the MACE module is called with ``compute_force=False``: forces are
taken by autograd outside the model, like for every other backbone. In mace
0.3.16 the ``training`` flag of ``MACE.forward`` only decides whether MACE's own
force/virial gradients keep their graph; with ``compute_force=False`` it changes
nothing, and parameter gradients always flow through the returned energies.

Edge conventions agree with ours: MACE calls ``edge_index[0]`` the sender and
``edge_index[1]`` the receiver and uses ``vector = pos[receiver] - pos[sender] +
shift``, which is exactly ``r_ij = r_j - r_i + shift`` of
:mod:`stable_md.potentials.neighbors`. Since our neighbour lists hold both
directions of every pair, the edge list is passed unchanged.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from stable_md.potentials.base import Potential
from stable_md.potentials.hyperparameters import COUNT, ORDER, POSITIVE, Text, Widths
from stable_md.potentials.neighbors import frame_pointers

DEFAULT_HYPERPARAMETERS: dict[str, Any] = {
    "cutoff": 5.0,
    "num_bessel": 8,
    "num_polynomial_cutoff": 5,
    "max_ell": 2,
    "num_interactions": 2,
    "hidden_irreps": "32x0e + 32x1o",
    "MLP_irreps": "16x0e",
    "correlation": 3,
    "radial_MLP": [64, 64, 64],
    "avg_num_neighbors": 10.0,
    "interaction": "RealAgnosticResidualInteractionBlock",
    "interaction_first": "RealAgnosticResidualInteractionBlock",
    "gate": "silu",
}

HYPERPARAMETER_RULES = {
    "cutoff": POSITIVE, "num_bessel": COUNT, "num_polynomial_cutoff": COUNT, "max_ell": ORDER,
    "num_interactions": COUNT, "hidden_irreps": Text(), "MLP_irreps": Text(), "correlation": COUNT,
    "radial_MLP": Widths(), "avg_num_neighbors": POSITIVE, "interaction": Text(), "interaction_first": Text(),
    "gate": Text(),
}


class MACEBackbone(nn.Module):
    """A ``mace.modules.MACE`` (or subclass) called with our flattened graph.

    Parameters
    ----------
    model:
        The MACE module. Its own ``atomic_energies`` (E0) are added to the node
        energies it returns; models built here have them at zero.
    element_index:
        ``[S]`` int64: for each of our species indices, the column of MACE's
        one-hot element encoding (the position in ``model.atomic_numbers``).
    num_elements:
        Width of MACE's one-hot encoding (``len(model.atomic_numbers)``).
    head:
        Index of the output head to evaluate (0 for single-head models).
    """

    def __init__(self, model: nn.Module, element_index: Sequence[int], num_elements: int, head: int = 0) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("element_index", torch.tensor(list(element_index), dtype=torch.long))
        self.num_elements = int(num_elements)
        self.head = int(head)

    def forward(self, positions: Tensor, species: Tensor, edge_index: Tensor, shifts: Tensor,
                batch: Tensor, num_frames: int) -> Tensor:
        """Atomic energies ``[M]`` (model units, eV for MACE models) of the flattened frames."""
        # MACE's prepare_graph calls positions.requires_grad_(True); give it a tensor of
        # our own so that the caller's tensor is never modified behind its back.
        if not positions.requires_grad:
            positions = positions.clone()
        node_attrs = nn.functional.one_hot(self.element_index[species], self.num_elements).to(positions.dtype)
        ptr = frame_pointers(batch, num_frames)
        data: Dict[str, Tensor] = {
            "positions": positions,
            "node_attrs": node_attrs,
            "edge_index": edge_index,
            "shifts": shifts,
            # Only read for stress and virials, which are never asked for, but always looked up.
            "cell": torch.zeros(num_frames * 3, 3, dtype=positions.dtype, device=positions.device),
            "batch": batch,
            "ptr": ptr,
            "head": torch.full((num_frames,), self.head, dtype=torch.long, device=batch.device),
        }
        # `training` only keeps the graph of MACE's own force gradients, which are off here.
        output = self.model(data, training=True, compute_force=False)
        node_energy = output["node_energy"]
        assert node_energy is not None
        # ScaleShiftMACE returns node energies in float64 whatever the model dtype.
        return node_energy.to(positions.dtype)


@contextlib.contextmanager
def _quiet_build():
    """e3nn code generation warns about TorchScript annotations while MACE is built: noise to our users."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def build_backbone(species: Sequence[int], cutoff: float, num_bessel: int, num_polynomial_cutoff: int,
                   max_ell: int, num_interactions: int, hidden_irreps: str, MLP_irreps: str,
                   correlation: int | list[int], radial_MLP: list[int], avg_num_neighbors: float,
                   interaction: str, interaction_first: str, gate: str) -> MACEBackbone:
    """A fresh MACE for ``species`` (atomic numbers), in ``torch.get_default_dtype()``.

    ``cutoff`` (Å) is MACE's ``r_max``; the other names are MACE's own (see
    ``mace.modules.MACE``). ``atomic_energies`` are zeros: the Potential adds its
    own per-species shifts.
    """
    from stable_md.potentials._e3nn_env import import_mace

    modules = import_mace()
    from e3nn import o3

    for name, value in (("interaction", interaction), ("interaction_first", interaction_first)):
        if value not in modules.interaction_classes:
            raise ValueError(f"unknown MACE {name} {value!r}; expected one of {sorted(modules.interaction_classes)}")
    if gate not in modules.gate_dict:
        raise ValueError(f"unknown MACE gate {gate!r}; expected one of {sorted(modules.gate_dict)}")
    species = [int(z) for z in species]
    with _quiet_build():
        model = modules.MACE(
            r_max=float(cutoff),
            num_bessel=int(num_bessel),
            num_polynomial_cutoff=int(num_polynomial_cutoff),
            max_ell=int(max_ell),
            interaction_cls=modules.interaction_classes[interaction],
            interaction_cls_first=modules.interaction_classes[interaction_first],
            num_interactions=int(num_interactions),
            num_elements=len(species),
            hidden_irreps=o3.Irreps(hidden_irreps),
            MLP_irreps=o3.Irreps(MLP_irreps),
            atomic_energies=torch.zeros(len(species), dtype=torch.float64).numpy(),
            avg_num_neighbors=float(avg_num_neighbors),
            atomic_numbers=species,
            correlation=correlation,
            gate=modules.gate_dict[gate],
            radial_MLP=[int(width) for width in radial_MLP],
        )
    return MACEBackbone(model, list(range(len(species))), len(species))


def _pickle_refusal(path: Path) -> str:
    return (
        f"refusing to load {path}: a MACE model file is a Python pickle, and loading a pickle runs "
        "whatever code it contains. Load it only if you trust where it came from, then pass "
        "`--trust-pickle` on the command line or `trust_pickle=True` in Python."
    )


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _load_mace_module(path: Path) -> nn.Module:
    """Unpickle a MACE model file (the caller has accepted the pickle risk)."""
    from stable_md.potentials._e3nn_env import import_mace

    modules = import_mace()  # the pickle refers to mace classes: they must be importable
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for files that are not torch files
        raise ValueError(f"{path} cannot be read as a MACE model file ({type(error).__name__}: {error})") from error
    if not isinstance(obj, modules.MACE):
        what = type(obj).__module__ + "." + type(obj).__name__
        hint = ""
        if isinstance(obj, dict):
            hint = " (it looks like a state dict or checkpoint; MACE writes the whole model to `<name>.model`)"
        raise ValueError(
            f"{path} does not contain a MACE energy model: found {what}{hint}; "
            "expected mace.modules.MACE or ScaleShiftMACE"
        )
    return obj


def _choose_head(model: nn.Module, head: Optional[str]) -> int:
    heads = list(getattr(model, "heads", None) or ["Default"])
    if head is not None:
        if head not in heads:
            raise ValueError(f"MACE model has no head {head!r}; its heads are {heads}")
        return heads.index(head)
    if len(heads) == 1:
        return 0
    named_default = [i for i, name in enumerate(heads) if name.lower() == "default"]
    if named_default:
        return named_default[0]
    raise ValueError(f"MACE model has several heads {heads}; choose one with head=...")


def import_mace_model(path: str | os.PathLike, trust_pickle: bool = False, species: list[int] | None = None,
                      head: Optional[str] = None) -> Tuple[Potential, dict[str, Any]]:
    """A Potential from a MACE model file (``torch.save`` of the model, as MACE training writes).

    Parameters
    ----------
    path:
        The ``.model`` file.
    trust_pickle:
        Loading the file unpickles it, which can run arbitrary code. Without
        ``True`` a ``PermissionError`` is raised before the file is opened.
    species:
        Atomic numbers to keep (a subset of the model's elements, e.g. the
        elements of one system out of a foundation model); default all.
    head:
        Output head of a multi-head model; default the only head, or the one
        named ``Default``.

    Returns
    -------
    (Potential, hyperparameters)
        The Potential (arch ``mace``, cutoff = MACE ``r_max`` in Å, in the dtype
        of the model's parameters) and a JSON-serialisable description of where it
        came from. MACE's reference energies E0 are moved into
        ``Potential.energy_shift`` (eV) and zeroed in the module, so the total
        energy equals MACE's and per-species shifts live in one place.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MACE model file {path} does not exist")
    if _is_torchscript_archive(path):  # reading a zip directory executes nothing
        raise ValueError(
            f"{path} is a TorchScript archive, not a MACE model file as MACE training writes it "
            "(a pickled torch.nn.Module such as `MACE_model.model`); if it is a stable-md model "
            "file, load it with stable_md.potentials.load_model instead"
        )
    if not trust_pickle:
        raise PermissionError(_pickle_refusal(path))
    model = _load_mace_module(path)
    if hasattr(model, "joint_embedding"):
        raise ValueError(
            f"{path}: this MACE model embeds extra per-structure inputs (e.g. total charge/spin), "
            "which the stable-md Potential interface does not provide"
        )
    known = [int(z) for z in model.atomic_numbers.tolist()]
    chosen = known if species is None else [int(z) for z in species]
    missing = sorted(set(chosen) - set(known))
    if missing:
        raise ValueError(f"{path}: the MACE model does not know atomic numbers {missing}; it knows {known}")
    head_index = _choose_head(model, head)
    columns = [known.index(z) for z in chosen]

    e0_table = torch.atleast_2d(model.atomic_energies_fn.atomic_energies.detach().to(torch.float64))
    if e0_table.shape[-1] != len(known):
        raise ValueError(f"{path}: atomic_energies of shape {tuple(e0_table.shape)} do not match "
                         f"{len(known)} elements")
    e0 = e0_table[head_index, columns].clone()
    with torch.no_grad():
        model.atomic_energies_fn.atomic_energies.zero_()

    parameter = next(iter(model.parameters()), None)
    dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
    cutoff = float(model.r_max.item())
    backbone = MACEBackbone(model, columns, len(known), head_index)
    potential = Potential(backbone, chosen, cutoff, "mace").to(dtype)
    with torch.no_grad():
        potential.energy_shift.copy_(e0.to(dtype))
    for p in potential.parameters():
        p.requires_grad_(True)

    heads = list(getattr(model, "heads", None) or ["Default"])
    hyperparameters: dict[str, Any] = {
        "cutoff": cutoff,
        "imported_from": "mace",
        "source_file": str(path.resolve()),
        "model_class": type(model).__name__,
        "atomic_numbers": known,
        "head": heads[head_index],
        "num_interactions": int(model.num_interactions.item()),
        "e0_eV": {str(z): float(v) for z, v in zip(chosen, e0.tolist())},
        "dtype": str(dtype).replace("torch.", ""),
    }
    return potential, hyperparameters


def export_mace_model(model, output: str | os.PathLike, template: Optional[str | os.PathLike] = None,
                      trust_pickle: bool = False) -> Path:
    """Write a stable-md model imported from MACE (``model``: a loaded ModelFile) back as a MACE model file.

    The MACE module comes from ``template`` (default: the file it was imported from, as its metadata
    records), unpickled, which needs ``trust_pickle``; its parameters become the stable-md model's and
    its reference energies E0 of the model's elements become the Potential's per-species shifts (what
    refine refits), so MACE computes the energies stable-md does. Elements and heads the model did not
    keep keep the template's E0. The file is written atomically with ``torch.save``, as MACE training
    writes its models (``MACECalculator(model_paths=...)`` loads it).
    """
    from stable_md.files import atomic_write
    from stable_md.potentials.exporters import template_path, template_tensors

    hyper = model.metadata.get("hyperparameters", {})
    recorded = hyper.get("source_file")
    source = template_path(template, recorded, f"{model.path} was imported from the MACE file {recorded}, which "
                                               f"does not exist any more; pass that file, or one of the same "
                                               f"architecture, as --template")
    if not trust_pickle:
        raise PermissionError(_pickle_refusal(source))
    mace = _load_mace_module(source)
    ours = template_tensors(model, "backbone.model.", mace.state_dict(), source, "MACE")
    scale = float(model.module.energy_scale)
    if abs(scale - 1.0) > 1e-12:
        raise ValueError(f"{model.path} scales MACE's energies by {scale:g}, which a MACE file cannot hold")
    known = [int(z) for z in mace.atomic_numbers.tolist()]
    kept = [int(z) for z in model.module.species_numbers.tolist()]
    heads = list(getattr(mace, "heads", None) or ["Default"])
    head = heads.index(hyper["head"]) if hyper.get("head") in heads else 0
    e0 = mace.atomic_energies_fn.atomic_energies.detach().clone()  # the template's, for what the model did not keep
    with torch.no_grad():
        mace.load_state_dict(ours, strict=True)
        table = mace.atomic_energies_fn.atomic_energies
        table.copy_(e0)
        row = table[head] if table.dim() == 2 else table
        shifts = model.module.energy_shift.detach().to(table.dtype)
        for k, z in enumerate(kept):
            row[known.index(z)] = shifts[k]
    output = Path(output)
    atomic_write(output, lambda tmp: torch.save(mace, tmp))
    return output
