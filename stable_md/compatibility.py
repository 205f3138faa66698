"""Does a structure look like what a model was trained on? A warning when it does not.

A model extrapolates on another molecule: an ethanol model evaluated on aspirin frames gave energy errors
of hundreds of eV without a word. Models record the composition of their training structures (the
``data_numbers`` of their pretrain entry); refine, evaluate and simulate compare it with the structures
they are given. Molecules must have the same composition; periodic systems the same composition per
formula unit (a larger box of the same liquid is fine).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

from ase.data import chemical_symbols
from ase.formula import Formula


class OtherStructuresWarning(UserWarning):
    """The structures differ in composition from those the model was trained on."""


def training_structures(metadata: dict) -> Optional[dict]:
    """``{"numbers", "periodic", "data"}`` of the first history entry that recorded its structures, or None
    (models imported from elsewhere, or made before compositions were recorded)."""
    for entry in metadata.get("history", []):
        if entry.get("data_numbers"):
            return {"numbers": entry["data_numbers"], "periodic": bool(entry.get("data_periodic")),
                    "data": entry.get("data")}
    return None


def _formula(numbers: Sequence[int]) -> Formula:
    return Formula.from_list([chemical_symbols[int(z)] for z in numbers])


def composition_mismatch(metadata: dict, numbers: Sequence[int], periodic: bool) -> Optional[str]:
    """Why ``numbers`` (one structure's atomic numbers) differ from the model's training structures, or None."""
    trained = training_structures(metadata)
    if trained is None:
        return None
    before, now = _formula(trained["numbers"]), _formula(numbers)
    if trained["periodic"] and periodic:
        if before.reduce()[0] == now.reduce()[0]:
            return None
    elif before == now and trained["periodic"] == periodic:
        return None
    kind = lambda flag: "periodic cells" if flag else "molecules"  # noqa: E731
    return (f"it was trained on {kind(trained['periodic'])} of {len(trained['numbers'])} atoms "
            f"({before.format('hill')}, from {trained['data']}), these are {kind(periodic)} of {len(numbers)} "
            f"atoms ({now.format('hill')}): its predictions here are an extrapolation (errors can be orders of "
            f"magnitude larger than on its own data)")


def warn_if_other_structures(metadata: dict, numbers: Sequence[int], periodic: bool, model: str,
                             source: str) -> Optional[str]:
    """Warn (OtherStructuresWarning) when ``source``'s structures differ from ``model``'s training structures;
    returns the message, or None when they match or the model recorded none."""
    reason = composition_mismatch(metadata, numbers, periodic)
    if reason is not None:
        message = f"model {model} on {source}: {reason}"
        warnings.warn(message, OtherStructuresWarning, stacklevel=3)
        return message
    return None
