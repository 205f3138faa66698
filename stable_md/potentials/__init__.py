"""Model backbones behind one interface (see :mod:`stable_md.potentials.base`).

Each architecture module provides ``DEFAULT_HYPERPARAMETERS`` (including ``cutoff``
in Å) and ``build_backbone(species, **hyperparameters) -> nn.Module``. Optional
backbones are imported only when asked for, so a missing extra gives a clear
message instead of an import error at start-up.
"""
from __future__ import annotations

import importlib
from typing import Any, Sequence

from stable_md.potentials.base import (Potential, check_finite_predictions, energy_and_forces, model_dtype_device,
                                      species_list)
from stable_md.potentials.hyperparameters import check_hyperparameters
from stable_md.potentials.model_file import ModelFile, build_metadata, load_model, read_metadata, save_model

ARCHITECTURES: dict[str, tuple[str, str]] = {
    # name: (module, pip extra that provides its dependencies)
    "schnet": ("stable_md.potentials.schnet", ""),
    "ani": ("stable_md.potentials.ani", "ani"),
    "nequip": ("stable_md.potentials.nequip", "nequip"),
    "mace": ("stable_md.potentials.mace", "mace"),
}


def architecture_module(arch: str):
    """The module implementing ``arch``; clear errors for unknown names or missing extras."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    module_name, extra = ARCHITECTURES[arch]
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        hint = f" (install it with: pip install 'stable-md[{extra}]')" if extra else ""
        raise ImportError(f"architecture {arch!r} needs a package that is not installed: {error}{hint}") from error


def default_hyperparameters(arch: str) -> dict[str, Any]:
    """A copy of the default hyperparameters of ``arch`` (``cutoff`` in Å among them)."""
    return dict(architecture_module(arch).DEFAULT_HYPERPARAMETERS)


def build_potential(arch: str, species: Sequence[int], **overrides: Any) -> tuple[Potential, dict[str, Any]]:
    """A fresh Potential of architecture ``arch`` for ``species`` (atomic numbers).

    Returns the potential and the full hyperparameter dictionary used, which is what
    the model file's metadata records. Unknown hyperparameter names raise ``ValueError``.
    """
    module = architecture_module(arch)
    hyperparameters = dict(module.DEFAULT_HYPERPARAMETERS)
    unknown = sorted(set(overrides) - set(hyperparameters))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {unknown} for architecture {arch!r}; known: {sorted(hyperparameters)}"
        )
    hyperparameters.update(overrides)
    check_hyperparameters(arch, hyperparameters, module.HYPERPARAMETER_RULES, names=list(overrides))
    species = species_list(species)
    backbone = module.build_backbone(species, **hyperparameters)
    return Potential(backbone, species, hyperparameters["cutoff"], arch), hyperparameters


__all__ = [
    "ARCHITECTURES",
    "ModelFile",
    "Potential",
    "architecture_module",
    "build_metadata",
    "build_potential",
    "default_hyperparameters",
    "energy_and_forces",
    "check_finite_predictions",
    "load_model",
    "model_dtype_device",
    "read_metadata",
    "save_model",
    "species_list",
]
