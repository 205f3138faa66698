"""Write refined models back to the framework they were imported from (MACE, NequIP, torchani; see EXPORT_FORMATS)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from stable_md.potentials import architecture_module
from stable_md.potentials.model_file import load_model

EXPORT_FORMATS = {
    "mace": "a MACE model file (torch.save of the module, as MACE training writes; MACECalculator loads it)",
    "nequip": "a deployed NequIP model (as `nequip-deploy build` writes; NequIPCalculator.from_deployed_model)",
    "ani": "a torch.save'd torchani ANI model (torchani.models.*, torchani.arch.Assembler)",
}
# the function of each format's architecture module that writes it
_EXPORTERS = {"mace": "export_mace_model", "nequip": "export_nequip_deployed", "ani": "export_torchani_model"}


def export_model(model: str | os.PathLike, kind: str, output: str | os.PathLike,
                 template: Optional[str | os.PathLike] = None, trust_pickle: bool = False,
                 overwrite: bool = False) -> Path:
    """Write the stable-md model file ``model`` as a ``kind`` model file ``output``.

    Only a model imported from ``kind`` has that format: its refined parameters go back into the
    original architecture (``template``: the file it was imported from, by default).
    """
    if kind not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {kind!r}; expected one of {sorted(EXPORT_FORMATS)}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; refusing to overwrite it (use --overwrite)")
    loaded = load_model(model)
    # what the import recorded (a name, or for torchani a description); the architecture names the framework
    imported = loaded.metadata.get("hyperparameters", {}).get("imported_from")
    imported_from = None if imported is None else loaded.arch
    if imported_from is None:
        raise ValueError(f"{model} is a {loaded.arch} model made with stable-md, not imported from {kind}: it has no "
                         f"{kind} format. Export writes a model back to the framework it was imported from; use "
                         f"the stable-md file itself (StableCalculator, OpenMM-ML's MLPotential('stable-md'))")
    if imported_from != kind:
        raise ValueError(f"{model} was imported from {imported_from}, not {kind}; export it with --format "
                         f"{imported_from}")
    exporter = getattr(architecture_module(kind), _EXPORTERS[kind])
    return exporter(loaded, output, template=template, trust_pickle=trust_pickle)


def template_tensors(model, prefix: str, theirs: dict, source: Path, framework: str,
                     extra_allowed: bool = False) -> dict:
    """The model's tensors under ``prefix`` renamed as the template's (``theirs``: its state dict), checked to
    be the same architecture: the same names (ours may hold more with ``extra_allowed``) and shapes."""
    ours = {name[len(prefix):]: value for name, value in model.module.state_dict().items() if name.startswith(prefix)}
    missing = sorted(set(theirs) - set(ours))
    unexpected = [] if extra_allowed else sorted(set(ours) - set(theirs))
    shapes = sorted(name for name in set(ours) & set(theirs) if tuple(ours[name].shape) != tuple(theirs[name].shape))
    different = missing + unexpected + shapes
    if different:
        raise ValueError(f"{source} is not the {framework} architecture {model.path} holds ({len(different)} tensors "
                         f"differ, e.g. {different[0]}); pass the file it was imported from as --template")
    return ours


def template_path(template: Optional[str | os.PathLike], recorded: Optional[str], missing: str) -> Path:
    """The template file: ``template`` when given, else ``recorded`` (the file the model was imported from);
    ``missing`` is the message when that recorded file is not there."""
    if template is None:
        if recorded is None or not Path(recorded).is_file():
            raise FileNotFoundError(missing)
        return Path(recorded)
    if not Path(template).is_file():
        raise FileNotFoundError(f"--template {template} does not exist")
    return Path(template)
