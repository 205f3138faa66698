"""Neighbour lists built inside torch, so an exported model needs only positions.

Conventions shared by every backbone:

* atoms of a batch ``[B, N, 3]`` are flattened to ``B*N`` rows, frame ``b``
  occupying rows ``b*N .. b*N+N-1``;
* ``edge_index[0]`` is the centre atom ``i``, ``edge_index[1]`` the neighbour ``j``;
* the edge vector is ``r_ij = r_j - r_i + shift`` where ``shift = unit_shift @ cell[b]``
  (Å), ``unit_shift`` being the integer lattice offset of the image of ``j``.

Molecules (``cell is None``) use all pairs closer than the cutoff. Periodic
frames use the minimum image, exact when the cutoff is at most half the
shortest perpendicular width of the cell; beyond that a ``ValueError`` is raised.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def perpendicular_widths(cell: Tensor) -> Tensor:
    """Distances between opposite faces of each cell, ``[B, 3]`` in Å, for ``cell [B, 3, 3]``."""
    a, b, c = cell[:, 0], cell[:, 1], cell[:, 2]
    volume = torch.abs((a * torch.cross(b, c, dim=-1)).sum(-1))
    areas = torch.stack(
        [
            torch.linalg.norm(torch.cross(b, c, dim=-1), dim=-1),
            torch.linalg.norm(torch.cross(c, a, dim=-1), dim=-1),
            torch.linalg.norm(torch.cross(a, b, dim=-1), dim=-1),
        ],
        dim=-1,
    )
    return volume[:, None] / areas


def neighbor_pairs(
    positions: Tensor, cell: Optional[Tensor], cutoff: float
) -> Tuple[Tensor, Tensor]:
    """Pairs closer than ``cutoff`` (Å) in each frame of ``positions [B, N, 3]``.

    Returns ``edge_index [2, E]`` (int64, flattened atom rows) and
    ``unit_shifts [E, 3]`` (lattice offsets as floats; zeros without a cell).
    Runs without gradient: distances are recomputed differentiably by the caller.
    """
    with torch.no_grad():
        n_atoms = positions.shape[1]
        delta = positions[:, None, :, :] - positions[:, :, None, :]  # [B, i, j, 3] = r_j - r_i
        images = torch.zeros_like(delta)
        if cell is not None:
            widths = perpendicular_widths(cell)
            if bool((2.0 * cutoff > widths.min()).item()):
                raise ValueError(
                    "cutoff of "
                    + str(cutoff)
                    + " Å exceeds half the shortest perpendicular width of the periodic cell ("
                    + str(float(widths.min().item()))
                    + " Å); minimum-image neighbour lists need a box at least twice the cutoff"
                )
            inverse = torch.linalg.inv(cell)
            fractional = torch.einsum("bijk,bkl->bijl", delta, inverse)
            images = -torch.round(fractional)
            delta = delta + torch.einsum("bijk,bkl->bijl", images, cell)
        distance2 = (delta * delta).sum(-1)
        not_self = ~torch.eye(n_atoms, dtype=torch.bool, device=positions.device)
        mask = (distance2 < cutoff * cutoff) & not_self[None, :, :]
        found = torch.nonzero(mask)
        frame, i, j = found[:, 0], found[:, 1], found[:, 2]
        offset = frame * n_atoms
        edge_index = torch.stack([offset + i, offset + j], dim=0)
        unit_shifts = images[frame, i, j]
    return edge_index, unit_shifts


def cartesian_shifts(
    unit_shifts: Tensor, cell: Optional[Tensor], edge_frame: Tensor
) -> Tensor:
    """Cartesian image shifts ``[E, 3]`` (Å), differentiable with respect to ``cell``."""
    if cell is None:
        return unit_shifts
    return torch.einsum("ek,ekl->el", unit_shifts, cell[edge_frame])


def frame_pointers(batch: Tensor, num_frames: int) -> Tensor:
    """Row offsets ``[B + 1]`` of each frame in the flattened atoms (``ptr`` of graph libraries)."""
    counts = torch.bincount(batch, minlength=num_frames)
    return torch.cat([torch.zeros(1, dtype=torch.long, device=batch.device), torch.cumsum(counts, 0)])
