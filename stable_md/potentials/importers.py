"""Turn models users already have (MACE, NequIP, torchani) into stable-md Potentials."""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from stable_md.potentials import architecture_module
from stable_md.potentials.base import Potential

IMPORT_FORMATS = {
    "mace": "a MACE model file (pickled torch module written by MACE training); needs trust_pickle",
    "nequip": "a NequIP deployed model (`nequip-deploy build` output)",
    "ani": "a torchani model saved with torch.save (pickle; needs trust_pickle)",
}


def import_model(kind: str, source: str | os.PathLike, trust_pickle: bool = False,
                 species: Optional[Sequence[int]] = None) -> tuple[Potential, dict[str, Any]]:
    """Import ``source`` of format ``kind`` (``mace``, ``nequip``, ``ani``) as a Potential.

    Returns the potential and its hyperparameters for the model file's metadata.
    """
    species_list = None if species is None else [int(z) for z in species]
    if kind == "mace":
        return architecture_module("mace").import_mace_model(source, trust_pickle=trust_pickle, species=species_list)
    if kind == "nequip":
        return architecture_module("nequip").import_nequip_deployed(source, species=species_list)
    if kind == "ani":
        return architecture_module("ani").import_torchani_model(source, species=species_list,
                                                                trust_pickle=trust_pickle)
    raise ValueError(f"unknown model format {kind!r}; expected one of {sorted(IMPORT_FORMATS)}")
