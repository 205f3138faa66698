"""Small hyperparameters per architecture, so the shared backbone tests run in seconds.

Two message-passing layers and a 3 Å cutoff keep the receptive field (6 Å)
inside one periodic image of the 6.5 Å test box.
"""
from __future__ import annotations

SMALL_HYPERPARAMETERS: dict[str, dict] = {
    "schnet": {"cutoff": 3.0, "hidden_channels": 16, "num_filters": 16, "num_interactions": 2, "num_gaussians": 8},
}
