"""stable-md models as an OpenMM-ML potential: ``MLPotential('stable-md', modelPath='model.stable.pt')``.

Registered through the ``openmmml.potentials`` entry point (pyproject.toml), so once the package is
installed OpenMM-ML finds it without ``import stable_md``::

    from openmmml import MLPotential
    potential = MLPotential('stable-md', modelPath='model.stable.pt')
    system = potential.createSystem(topology)                        # every atom is the model's
    mixed = potential.createMixedSystem(topology, mm_system, ml_atoms)  # a solute in MM water

OpenMM-ML does the rest with its own semantics (its mechanical embedding removes the MM terms among
the ML atoms, ``interpolate=True`` adds ``lambda_interpolate``, ``forceGroup`` places the force). The
force is stable-md's PythonForce on the ML atoms alone (``PythonForce.setParticles``), so the System
may hold any number of other particles; units are converted at the edge (nm, kJ/mol outside).

Arguments of ``MLPotential(...)`` or ``createSystem(...)``: ``modelPath`` (the model file), or instead
``model`` (a model already loaded: a ``ModelFile`` or a module, used as it is, on its own device and in its own
precision; a System holding it cannot be serialized); ``device`` (default: cuda when torch sees a GPU, else cpu,
as OpenMM-ML's own potentials choose), ``precision`` (``'single'`` or ``'double'``: the model's float32 or
float64; default: as the file stores it).

This module imports only OpenMM-ML here; torch and the model load when a System is made.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import openmm
from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory

NAME = "stable-md"
PRECISIONS = {"single": "float32", "double": "float64"}


class StableMDPotentialImplFactory(MLPotentialImplFactory):
    """What OpenMM-ML instantiates for the name ``stable-md`` (the entry point's value)."""

    def createImpl(self, name: str, **args) -> "StableMDPotentialImpl":
        return StableMDPotentialImpl(name, **args)


class StableMDPotentialImpl(MLPotentialImpl):
    """A stable-md model file as an OpenMM-ML potential; see the module docstring for the arguments."""

    def __init__(self, name: str, modelPath: Optional[str] = None, model=None, **args) -> None:
        from pathlib import Path

        if (modelPath is None) == (model is None):
            raise ValueError(f"MLPotential('{name}') needs the model file: MLPotential('{name}', "
                             f"modelPath='model.stable.pt') (or model=, a model already loaded; not both)")
        self.name = name
        self.model = model
        self.model_path = None
        if modelPath is not None:
            path = Path(modelPath)
            if not path.is_file():
                raise FileNotFoundError(f"MLPotential('{name}'): modelPath {path} does not exist")
            self.model_path = path.resolve()
        self.args = args

    def getMLLongRange(self) -> bool:
        # the model sees neighbours within its cutoff only, so the MM long-range terms stay as they are
        return False

    def addForces(self, topology: openmm.app.Topology, system: openmm.System, atoms: Optional[Iterable[int]],
                  forceGroup: int, **args) -> None:
        from openmm_bridge.forces import ModelCallback, make_force
        from stable_md.potentials.model_file import load_model

        options = {**self.args, **args}
        chosen = list(range(topology.getNumAtoms())) if atoms is None else [int(a) for a in atoms]
        numbers = _atomic_numbers(topology, chosen, self.name)
        precision = options.get("precision")
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"MLPotential('{self.name}'): precision must be one of {list(PRECISIONS)}, got "
                             f"{precision!r}")
        if options.get("device") is None:  # OpenMM-ML passes device=None through: choose as it would
            options.pop("device", None)
        device = str(self._getTorchDevice(options))
        import torch

        if self.model is None:
            dtype = None if precision is None else getattr(torch, PRECISIONS[precision])
            model = load_model(self.model_path, device=device, dtype=dtype)
            known, cutoff, what = model.metadata["species"], model.metadata["cutoff"], self.model_path
        else:
            if precision is not None:
                raise ValueError(f"MLPotential('{self.name}', model=...): a loaded model runs in its own precision; "
                                 f"convert it before (model.to(torch.float64)) instead of passing precision")
            model = self.model
            module = getattr(model, "module", model)
            known, cutoff = module.species_numbers.tolist(), float(module.cutoff)
            device = str(next(module.parameters()).device)
            what = getattr(self.model, "path", None) or "the model"
        missing = sorted(set(numbers) - set(int(z) for z in known))
        if missing:
            raise ValueError(f"MLPotential('{self.name}'): the ML atoms hold elements {missing} that "
                             f"{what} was not trained on (it knows {sorted(int(z) for z in known)})")
        box = topology.getPeriodicBoxVectors()
        periodic = box is not None
        if periodic:
            from stable_md.geometry_checks import check_cell_fits_cutoff

            check_cell_fits_cutoff(np.asarray(box.value_in_unit(openmm.unit.angstrom)), cutoff,
                                   f"MLPotential('{self.name}') with {getattr(what, 'name', what)}")
        callback = ModelCallback(model, numbers, 1, periodic=periodic, device=device)
        force = make_force(callback, "python")
        if atoms is not None:
            force.setParticles(chosen)  # the callback sees these particles only, in this order
        force.setForceGroup(forceGroup)
        system.addForce(force)


def _atomic_numbers(topology: openmm.app.Topology, atoms: list[int], name: str) -> list[int]:
    by_index = list(topology.atoms())
    numbers = []
    for index in atoms:
        if not 0 <= index < len(by_index):
            raise ValueError(f"MLPotential('{name}'): atom index {index} is not in the topology "
                             f"({len(by_index)} atoms)")
        element = by_index[index].element
        if element is None:
            raise ValueError(f"MLPotential('{name}'): atom {index} ({by_index[index].name}) has no element (a "
                             f"virtual site?); leave it out of the ML atoms")
        numbers.append(int(element.atomic_number))
    return numbers
