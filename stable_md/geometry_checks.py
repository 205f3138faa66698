"""Checks of a structure against a model before the model runs, with messages that name what is wrong.

A model would otherwise fail deep inside TorchScript (a cell smaller than twice the cutoff) or, worse,
return a finite energy for coordinates that are not numbers.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

# Forces above this move a hydrogen by more than an Å in one 0.5 fs step: the structure is exploding (eV/Å).
MAX_FORCE_EV_PER_A = 1.0e3


def check_finite_positions(positions: np.ndarray, where: str) -> None:
    """Raise ValueError naming the first atoms whose coordinates (``[N, 3]`` or ``[F, N, 3]``, Å) are NaN or inf."""
    positions = np.asarray(positions, dtype=np.float64)
    bad = ~np.isfinite(positions).all(axis=-1)
    if not bad.any():
        return
    found = np.argwhere(bad)
    if positions.ndim == 2:
        atoms = [int(k) for k in found[:, 0]]
        detail = f"atom{'s' if len(atoms) > 1 else ''} {', '.join(map(str, atoms[:10]))}"
    else:
        pairs = [(int(f), int(a)) for f, a in found]
        detail = ", ".join(f"frame {f} atom {a}" for f, a in pairs[:10])
    more = f" and {len(found) - 10} more" if len(found) > 10 else ""
    raise ValueError(f"{where}: positions of {detail}{more} are not finite (NaN or inf)")


def cell_widths(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of a periodic cell ``[3, 3]`` (rows are lattice vectors), ``[3]`` Å."""
    cell = np.asarray(cell, dtype=np.float64)
    volume = abs(float(np.dot(cell[0], np.cross(cell[1], cell[2]))))
    areas = np.array([np.linalg.norm(np.cross(cell[1], cell[2])), np.linalg.norm(np.cross(cell[2], cell[0])),
                      np.linalg.norm(np.cross(cell[0], cell[1]))])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(areas > 0, volume / np.where(areas > 0, areas, 1.0), 0.0)


def check_cell_fits_cutoff(cell: Optional[np.ndarray], cutoff: float, where: str) -> None:
    """Raise ValueError when a periodic cell (``[3, 3]`` or ``[F, 3, 3]`` Å) is not finite or is narrower than
    twice the model's cutoff (Å): the minimum-image neighbour list would miss or double-count pairs."""
    if cell is None:
        return
    cells = np.asarray(cell, dtype=np.float64).reshape(-1, 3, 3)
    for k, one in enumerate(cells):
        frame = f" (frame {k})" if len(cells) > 1 else ""
        if not np.isfinite(one).all():
            raise ValueError(f"{where}: the periodic cell{frame} is not finite: {one.tolist()}")
        widths = cell_widths(one)
        if widths.min() < 2.0 * cutoff:
            shown = ", ".join(f"{w:.3f}" for w in widths)
            raise ValueError(f"{where}: the periodic cell{frame} is {shown} Å between opposite faces; the model's "
                             f"cutoff is {cutoff:g} Å, so every width must be at least twice that "
                             f"({2 * cutoff:g} Å). Use a larger box (e.g. ase.build.make_supercell) or a model "
                             f"with a shorter cutoff")
