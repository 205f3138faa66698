"""Small hyperparameters per architecture, so the shared backbone tests run in seconds; and the small
nequip run (a training directory and its deployed file) that the import and export tests share.

Two message-passing layers and a 3 Å cutoff keep the receptive field (6 Å)
inside one periodic image of the 6.5 Å test box.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

SMALL_HYPERPARAMETERS: dict[str, dict] = {
    "schnet": {"cutoff": 3.0, "hidden_channels": 16, "num_filters": 16, "num_interactions": 2, "num_gaussians": 8},
    "ani": {"cutoff": 3.0, "angular_cutoff": 2.5, "radial_start": 0.7, "radial_num_shifts": 6, "angular_start": 0.7,
            "angular_num_shifts": 3, "angular_num_sections": 4, "hidden_layers": {}, "default_hidden_layers": [16, 8]},
    "mace": {"cutoff": 3.0, "num_interactions": 2, "hidden_irreps": "8x0e + 8x1o", "MLP_irreps": "4x0e", "max_ell": 2,
             "correlation": 2, "num_bessel": 4, "radial_MLP": [8], "avg_num_neighbors": 4.0},
    "nequip": {"cutoff": 3.0, "num_layers": 2, "l_max": 1, "num_features": 8, "num_basis": 4, "invariant_layers": 1,
               "invariant_neurons": 8, "avg_num_neighbors": 4.0},
}


def periodic_test_box() -> tuple[np.ndarray, list[int], float]:
    """Eight atoms (positions Å, atomic numbers) in a cubic box of the returned edge (6.5 Å).

    No pair is closer than 1 Å under the minimum image; twice the 3 Å test cutoff fits the box.
    """
    rng = np.random.default_rng(3)
    box = 6.5
    points: list[np.ndarray] = []
    while len(points) < 8:
        candidate = rng.uniform(0, box, 3)
        ok = True
        for p in points:
            d = candidate - p
            d -= box * np.round(d / box)
            ok &= np.linalg.norm(d) > 1.0
        if ok:
            points.append(candidate)
    return np.array(points), [8, 1, 1, 6, 1, 8, 1, 1], box


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


NEQUIP_R_MAX = 3.0


def make_nequip_run(directory: Path) -> tuple[Path, Path]:
    """A nequip training directory (config.yaml + best_model.pth) and its `nequip-deploy build` output.

    The weights are nequip's initial ones, with non-trivial per-species scales and
    shifts and a global scale written into the state dict so that folding them
    into the Potential is exercised.
    """
    import yaml

    from stable_md.potentials._e3nn_env import import_nequip

    import_nequip()
    from nequip.model import model_from_config
    from nequip.scripts.train import default_config
    from nequip.utils import Config

    config = dict(default_config)
    config.update({
        "r_max": NEQUIP_R_MAX, "num_layers": 2, "l_max": 1, "parity": True, "num_features": 8,
        "num_basis": 4, "invariant_layers": 1, "invariant_neurons": 8, "avg_num_neighbors": 4.0,
        # listed out of order on purpose: nequip sorts chemical_symbols by atomic number
        "chemical_symbols": ["O", "H", "C"],
        "per_species_rescale_scales": 1.0,
        "default_dtype": "float64", "model_dtype": "float64", "device": "cpu",
    })
    config = Config.from_dict(config)
    torch.manual_seed(5)
    with default_dtype(torch.float64):
        model = model_from_config(config, initialize=False)
    state = model.state_dict()
    state["model.scale_by"].fill_(0.8)
    state["model.model.func.per_species_rescale.scales"].copy_(torch.tensor([0.9, 1.1, 1.2]))
    state["model.model.func.per_species_rescale.shifts"].copy_(torch.tensor([-13.6, -1029.0, -2040.0]))
    torch.save(state, directory / "best_model.pth")
    (directory / "config.yaml").write_text(yaml.dump(dict(config)))  # what nequip-train writes

    deployed = directory.parent / "deployed.pth"
    # nequip's own deploy CLI. e3nn 0.4.4 cannot import under torch>=2.6's weights-only
    # default, so the process allow-lists `slice` first instead of disabling safe loading.
    code = ("import sys, torch; torch.serialization.add_safe_globals([slice]); "
            "from nequip.scripts.deploy import main; main(sys.argv[1:])")
    result = subprocess.run(
        [sys.executable, "-c", code, "build", "--train-dir", str(directory), str(deployed)],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return directory, deployed
