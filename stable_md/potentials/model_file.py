"""Model files: a TorchScript archive plus a JSON metadata extra file.

The archive loads with plain ``torch.jit.load`` (no pickle), keeps its
parameters trainable, and carries ``stable_md.json`` with the architecture,
hyperparameters, cutoff, species, units, energy shifts, training history and
package version.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from stable_md.files import atomic_write

METADATA_NAME = "stable_md.json"
FORMAT_VERSION = 1
UNITS = {"length": "Angstrom", "energy": "eV", "forces": "eV/Angstrom"}
E3NN_ARCHITECTURES = ("nequip", "mace")


@dataclass
class ModelFile:
    """A loaded model: the scripted module and its metadata."""

    module: torch.jit.ScriptModule
    metadata: dict[str, Any]
    path: Optional[Path] = None

    @property
    def species(self) -> list[int]:
        """Atomic numbers the model knows."""
        return list(self.metadata["species"])

    @property
    def cutoff(self) -> float:
        """Neighbour-list cutoff in Å."""
        return float(self.metadata["cutoff"])

    @property
    def arch(self) -> str:
        return str(self.metadata["arch"])


def script_potential(potential: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript-compile a Potential; e3nn-based backbones go through e3nn's scripter."""
    if isinstance(potential, torch.jit.ScriptModule):
        return potential
    arch = getattr(potential, "arch", "")
    with _no_jit_deprecation():
        if arch in E3NN_ARCHITECTURES:
            from stable_md.potentials._e3nn_env import import_e3nn_jit

            # e3nn scripts submodules in place by default, which would swap the caller's
            # eager modules for ScriptModules behind their back.
            return import_e3nn_jit().script(potential, in_place=False)
        return torch.jit.script(potential)


@contextlib.contextmanager
def _no_jit_deprecation():
    """TorchScript is what OpenMM and ASE consumers load; torch's deprecation notice is noise to our users.

    e3nn also warns about instance-level annotations while scripting, which users cannot act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*instance-level annotations.*", category=UserWarning)
        yield


def build_metadata(potential: nn.Module, hyperparameters: dict[str, Any], history: Optional[list] = None,
                   extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Metadata for a Potential (scripted or not)."""
    from stable_md import __version__

    shift = potential.energy_shift.detach().cpu().tolist()
    species = potential.species_numbers.detach().cpu().tolist()
    first_parameter = next(potential.parameters(), None)
    dtype = torch.float32 if first_parameter is None else first_parameter.dtype
    metadata = {
        "format": "stable-md model",
        "format_version": FORMAT_VERSION,
        "stable_md_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "arch": str(potential.arch),
        "hyperparameters": hyperparameters,
        "cutoff": float(potential.cutoff),
        "species": species,
        "units": dict(UNITS),
        "energy_shift_eV": {str(z): float(s) for z, s in zip(species, shift)},
        "energy_scale_eV": float(potential.energy_scale.detach().cpu()),
        "dtype": str(dtype).replace("torch.", ""),
        "n_parameters": int(sum(p.numel() for p in potential.parameters())),
        "history": list(history or []),
    }
    if extra:
        metadata.update(extra)
    return metadata


def save_model(potential: nn.Module, path: str | os.PathLike, metadata: dict[str, Any],
               overwrite: bool = False) -> Path:
    """Script ``potential`` and write it with ``metadata`` to ``path`` atomically.

    Refuses to replace an existing file unless ``overwrite`` is true. A model on a GPU is written
    with its tensors on the CPU (and moved back), so the file loads on a machine without one.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
    payload = json.dumps(metadata, indent=1, sort_keys=True)
    device = next(itertools.chain(potential.parameters(), potential.buffers()), torch.empty(0)).device
    try:
        # in place, so the optimizer's parameters stay the module's
        scripted = script_potential(potential.cpu() if device.type != "cpu" else potential)
        with _no_jit_deprecation():
            atomic_write(path, lambda tmp: torch.jit.save(scripted, str(tmp), _extra_files={METADATA_NAME: payload}))
    finally:
        if device.type != "cpu":
            potential.to(device)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a model file without loading its code."""
    path = _check_model_path(path)
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("extra/" + METADATA_NAME)]
        if not names:
            raise ValueError(_not_ours(path))
        return _parse_metadata(path, archive.read(names[0]).decode())


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: Optional[torch.dtype] = None) -> ModelFile:
    """Load a model file; parameters stay trainable. ``dtype`` converts floating parameters."""
    path = _check_model_path(path)
    extra = {METADATA_NAME: ""}
    try:
        with _no_jit_deprecation():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except RuntimeError as error:
        raise ValueError(f"{path}: cannot be read as a TorchScript model file ({error})") from error
    if not extra[METADATA_NAME]:
        raise ValueError(_not_ours(path))
    metadata = _parse_metadata(path, extra[METADATA_NAME])
    if dtype is not None:
        module = module.to(dtype)
    for parameter in module.parameters():
        parameter.requires_grad_(True)
    return ModelFile(module=module, metadata=metadata, path=path)


# What every reader of a model file relies on (the rest is optional or has a default).
REQUIRED_METADATA = ("arch", "species", "cutoff")


def _parse_metadata(path: Path, text: str) -> dict[str, Any]:
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: its {METADATA_NAME} is not valid JSON ({error}); the file is damaged") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: its {METADATA_NAME} is not a JSON object; the file is damaged")
    missing = [name for name in REQUIRED_METADATA if name not in metadata]
    if missing:
        raise ValueError(f"{path}: its {METADATA_NAME} lacks the field{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(repr(name) for name in missing)} (expected {', '.join(REQUIRED_METADATA)}); "
                         f"the file is damaged or was edited by hand")
    return metadata


def _check_model_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(_not_ours(path))
    return path


def _not_ours(path: Path) -> str:
    return (
        f"{path} is not a stable-md model file (a TorchScript archive with {METADATA_NAME}); "
        "import MACE, NequIP or torchani models first with `stable-md import`"
    )
