"""Small hyperparameters per architecture, so the shared backbone tests run in seconds.

Two message-passing layers and a 3 Å cutoff keep the receptive field (6 Å)
inside one periodic image of the 6.5 Å test box.
"""
from __future__ import annotations

import numpy as np

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
