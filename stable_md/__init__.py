"""stable-md: StABlE training for neural-network interatomic potentials.

Units inside the package: Å, eV, fs, amu (see :mod:`stable_md.units`).
"""
from __future__ import annotations

__version__ = "0.1.0"

from stable_md._threads import limit_threads as _limit_threads

_limit_threads()


__all__ = ["StableCalculator", "refine", "RefineSettings", "RefineResult", "evaluate", "EvaluateSettings",
           "load_model", "StabilityGuard", "InstabilityError", "StabilityObserver", "StabilityReporter"]
_GUARD = {"StabilityGuard": "stable_md.guard", "InstabilityError": "stable_md.guard",
          "StabilityObserver": "stable_md.guard_ase", "StabilityReporter": "stable_md.guard_openmm"}


def __getattr__(name: str):
    # The Python API without importing OpenMM-facing modules (or torch) at package import.
    if name == "StableCalculator":
        from stable_md.calculator import StableCalculator

        return StableCalculator
    if name == "load_model":
        from stable_md.potentials.model_file import load_model

        return load_model
    if name in ("refine", "RefineSettings", "RefineResult"):
        from stable_md import refinement

        return getattr(refinement, name)
    if name in ("evaluate", "EvaluateSettings"):
        from stable_md import evaluation

        return getattr(evaluation, name)
    if name in _GUARD:
        import importlib

        return getattr(importlib.import_module(_GUARD[name]), name)
    raise AttributeError(f"module 'stable_md' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
