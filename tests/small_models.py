"""Small hyperparameters per architecture, so the shared backbone tests run in seconds.

Two message-passing layers and a 3 Å cutoff keep the receptive field (6 Å)
inside one periodic image of the 6.5 Å test box.
"""
from __future__ import annotations

SMALL_HYPERPARAMETERS: dict[str, dict] = {
    "schnet": {"cutoff": 3.0, "hidden_channels": 16, "num_filters": 16, "num_interactions": 2, "num_gaussians": 8},
    "ani": {"cutoff": 3.0, "angular_cutoff": 2.5, "radial_start": 0.7, "radial_num_shifts": 6, "angular_start": 0.7,
            "angular_num_shifts": 3, "angular_num_sections": 4, "hidden_layers": {}, "default_hidden_layers": [16, 8]},
    "mace": {"cutoff": 3.0, "num_interactions": 2, "hidden_irreps": "8x0e + 8x1o", "MLP_irreps": "4x0e", "max_ell": 2,
             "correlation": 2, "num_bessel": 4, "radial_MLP": [8], "avg_num_neighbors": 4.0},
    "nequip": {"cutoff": 3.0, "num_layers": 2, "l_max": 1, "num_features": 8, "num_basis": 4, "invariant_layers": 1,
               "invariant_neurons": 8, "avg_num_neighbors": 4.0},
}
