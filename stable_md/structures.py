"""Starting structures for simulations: any file ASE reads, or frames of a data set."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from stable_md.data import DataError, _periodicity, load_dataset, read_ase_frames


def read_structures(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Atomic numbers ``[N]``, positions ``[F, N, 3]`` Å and cells ``[F, 3, 3]`` Å (or None) of every frame.

    No energies or forces are needed. Every frame must hold the same atoms in the same order.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"structure file {path} does not exist")
    frames = read_ase_frames(path, ":", noun="structures")
    numbers = frames[0].numbers.copy()
    periodic = _periodicity(path, frames[0], 0)
    for k, atoms in enumerate(frames):
        if not np.array_equal(atoms.numbers, numbers):
            raise DataError(f"{path}: structure {k} has different atoms from structure 0; every structure "
                            f"needs the same atoms in the same order")
        if _periodicity(path, atoms, k) != periodic:
            raise DataError(f"{path}: structure {k} differs from structure 0 in periodicity")
    positions = np.array([atoms.positions for atoms in frames], dtype=np.float64)
    cells = np.array([np.asarray(atoms.cell) for atoms in frames], dtype=np.float64) if periodic else None
    return numbers, positions, cells


def spread_indices(n_frames: int, n_replicas: int) -> np.ndarray:
    """``n_replicas`` frame indices spread evenly over ``n_frames`` (cycling when there are fewer frames)."""
    if n_frames < 1:
        raise ValueError("no frames to start from")
    if n_replicas <= n_frames:
        return np.linspace(0, n_frames - 1, n_replicas).round().astype(np.int64)
    return np.arange(n_replicas) % n_frames


def starting_frames(structure: Optional[str] = None, data: Optional[str] = None, n_replicas: int = 1,
                    energy_key: str = "energy", forces_key: str = "forces"
                    ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], str, np.ndarray]:
    """Numbers, starting positions ``[R, N, 3]`` Å, the box (Å, or None), a description of the source,
    and up to 1000 frames spread over the file as reference frames ``[F, N, 3]`` (bond detection).

    Exactly one of ``structure`` (any ASE-readable file) and ``data`` (a data set file)
    is given. Replicas start from frames spread evenly over the file. All chosen
    frames of a periodic system must share one box (the replicas run at constant volume).
    """
    if (structure is None) == (data is None):
        raise ValueError("give exactly one of a structure file (--structure) and a data set (--data)")
    if structure is not None:
        numbers, positions, cells = read_structures(structure)
        source = str(structure)
    else:
        dataset = load_dataset(data, energy_key=energy_key, forces_key=forces_key)
        numbers, positions, cells = dataset.numbers, dataset.positions, dataset.cells
        source = str(data)
    chosen = spread_indices(len(positions), n_replicas)
    cell = None
    if cells is not None:
        boxes = cells[chosen]
        if not np.allclose(boxes, boxes[0], atol=1e-6):
            raise DataError(f"{source}: the chosen starting frames have different boxes; replicas run at constant "
                            f"volume, so start them from frames with one box")
        cell = boxes[0]
    frames_text = f"{len(np.unique(chosen))} of {len(positions)} frames"
    reference = positions[spread_indices(len(positions), min(len(positions), 1000))]
    return numbers, positions[chosen], cell, f"{source} ({frames_text})", reference
