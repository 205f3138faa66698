"""Instability criteria for replicas (appendix A.5 of the StABlE paper): bond-length deviation.

Bonds are detected once, on reference frames: atoms i and j are bonded when their mean
distance over the frames is below ``factor`` times the sum of their covalent radii
(Cordero et al., via ASE). There is no neighbour-list skin: a skin of a few tenths of
an Å makes 1-3 pairs (H-C-H, C-C-C) look bonded. The mean over frames keeps thermally
stretched bonds (C-H at 500 K) in and transient close contacts out. A replica is
unstable when any bond deviates from its reference length by more than a threshold
(0.5 Å in the paper's evaluation, 0.25 Å while training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from ase.data import chemical_symbols, covalent_radii

DEFAULT_BOND_FACTOR = 1.25
EVALUATION_THRESHOLD = 0.5
TRAINING_THRESHOLD = 0.25


def pair_distances(positions: np.ndarray, pairs: np.ndarray, cell: Optional[np.ndarray] = None) -> np.ndarray:
    """Distances ``[F, P]`` (Å) of atom ``pairs`` ``[P, 2]`` in frames ``[F, N, 3]``; minimum image if ``cell``."""
    positions = np.asarray(positions, dtype=np.float64)
    vectors = positions[:, pairs[:, 1]] - positions[:, pairs[:, 0]]
    if cell is not None:
        cell = np.asarray(cell, dtype=np.float64)
        fractional = vectors @ np.linalg.inv(cell)
        vectors = (fractional - np.round(fractional)) @ cell
    return np.linalg.norm(vectors, axis=-1)


@dataclass
class BondGraph:
    """Bonds ``pairs`` [B, 2] with reference lengths [B] (Å) for atoms ``numbers`` [N]."""

    pairs: np.ndarray
    reference_lengths: np.ndarray
    numbers: np.ndarray

    def describe(self, bond: int) -> str:
        """``C1-O3`` style label of bond ``bond`` (1-based atom indices)."""
        i, j = self.pairs[bond]
        return f"{chemical_symbols[self.numbers[i]]}{i + 1}-{chemical_symbols[self.numbers[j]]}{j + 1}"


def detect_bonds(numbers: np.ndarray, reference_positions: np.ndarray, cell: Optional[np.ndarray] = None,
                 factor: float = DEFAULT_BOND_FACTOR) -> BondGraph:
    """Bonds of atoms ``numbers`` from reference frames ``[F, N, 3]`` (Å) or one frame ``[N, 3]``."""
    numbers = np.asarray(numbers, dtype=np.int64)
    frames = np.asarray(reference_positions, dtype=np.float64)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3 or frames.shape[1:] != (len(numbers), 3):
        raise ValueError(f"reference positions must be [F, {len(numbers)}, 3], got {frames.shape}")
    i, j = np.triu_indices(len(numbers), k=1)
    pairs = np.stack([i, j], axis=1)
    mean_lengths = pair_distances(frames, pairs, cell).mean(axis=0)
    limits = factor * (covalent_radii[numbers[i]] + covalent_radii[numbers[j]])
    bonded = mean_lengths < limits
    return BondGraph(pairs=pairs[bonded], reference_lengths=mean_lengths[bonded], numbers=numbers)


class BondLengthCriterion:
    """A replica is unstable when a bond deviates from its reference length by more than ``threshold`` Å."""

    def __init__(self, bonds: BondGraph, threshold: float = EVALUATION_THRESHOLD,
                 cell: Optional[np.ndarray] = None) -> None:
        if not threshold > 0:
            raise ValueError(f"bond-length threshold must be positive, got {threshold}")
        if len(bonds.pairs) == 0:
            raise ValueError("no bonds were found in the reference frames, so the bond-length criterion cannot "
                             "apply (atoms farther apart than their covalent radii allow)")
        self.bonds = bonds
        self.threshold = float(threshold)
        self.cell = cell

    def deviations(self, positions: np.ndarray) -> np.ndarray:
        """``[R, B]`` absolute deviation of each bond from its reference length (Å)."""
        lengths = pair_distances(positions, self.bonds.pairs, self.cell)
        return np.abs(lengths - self.bonds.reference_lengths)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """``[R]`` bool: replicas of ``positions`` [R, N, 3] that are unstable."""
        return self.deviations(positions).max(axis=1) > self.threshold

    def reasons(self, positions: np.ndarray) -> list[str]:
        """Per replica, the worst bond and its deviation, e.g. ``C1-O3 off by 0.62 Å``."""
        deviations = self.deviations(positions)
        worst = deviations.argmax(axis=1)
        return [f"bond {self.bonds.describe(b)} off by {deviations[r, b]:.2f} Å" for r, b in enumerate(worst)]
