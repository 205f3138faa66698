"""Observables g(Γ) of MD frames (appendix A.4 of the StABlE paper).

Every structural observable maps frames ``positions [F, N, 3]`` (Å, torch or numpy)
and an optional box ``cell [3, 3]`` or ``[F, 3, 3]`` (Å) to a vector per frame,
``[F, K]`` float64, and knows its reference value ``g_ref [K]`` from a data set
(:meth:`reference`: the mean over the data frames, the paper's choice: no new QM
data). They are differentiable with respect to positions (Gaussian smearing
instead of hard histograms), although the Boltzmann estimator never needs that.

- :class:`DistanceDistribution` — h(r), the distribution of all interatomic distances (1/Å).
- :class:`ElementRDF` — element-resolved radial distribution functions of a periodic box.
- :class:`BondLengths` — per bond, or the mean per bond type (e.g. mean O-H), Å.
- :class:`MinIntermolecularDistance` — the closest approach of atoms in different molecules, Å.
- :class:`LocalBondLengths` — per molecule, the mean length of each bond type, ``[F, M, K]`` Å: a
  :class:`LocalObservable` of neighbourhoods, for the localized estimator (water: O-H per molecule).

Dynamical observables for evaluation work on numpy trajectories:
:func:`velocity_autocorrelation`, :func:`mean_squared_displacement`, :func:`diffusion_coefficient`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from ase.data import chemical_symbols
from torch import Tensor

from stable_md.data import Dataset
from stable_md.stability import BondGraph, detect_bonds, intermolecular_pairs

# Work per chunk of frames in the smeared histograms: frames x pairs x kernel width.
_CHUNK_ELEMENTS = 4_000_000
# Gaussians are cut at this many standard deviations.
_KERNEL_SIGMAS = 5.0


def _as_frames(positions) -> Tensor:
    frames = torch.as_tensor(positions, dtype=torch.float64) if not isinstance(positions, Tensor) else positions
    if frames.dim() == 2:
        frames = frames.unsqueeze(0)
    if frames.dim() != 3 or frames.shape[-1] != 3:
        raise ValueError(f"positions must be [F, N, 3] or [N, 3] (Å), got shape {tuple(frames.shape)}")
    return frames.to(torch.float64) if frames.dtype != torch.float64 else frames


def _as_cells(cell, n_frames: int) -> Optional[Tensor]:
    if cell is None:
        return None
    cells = torch.as_tensor(np.asarray(cell) if not isinstance(cell, Tensor) else cell, dtype=torch.float64)
    if cells.dim() == 2:
        cells = cells.expand(n_frames, 3, 3)
    if cells.shape != (n_frames, 3, 3):
        raise ValueError(f"cell must be [3, 3] or [{n_frames}, 3, 3] (Å), got shape {tuple(cells.shape)}")
    return cells


def pair_vectors(positions: Tensor, pairs: Tensor, cells: Optional[Tensor]) -> Tensor:
    """Vectors ``[F, P, 3]`` from atom ``pairs[:, 0]`` to ``pairs[:, 1]``; minimum image when ``cells``."""
    vectors = positions[:, pairs[:, 1]] - positions[:, pairs[:, 0]]
    if cells is not None:
        fractional = torch.linalg.solve(cells.transpose(1, 2), vectors.transpose(1, 2)).transpose(1, 2)
        vectors = (fractional - torch.round(fractional)) @ cells
    return vectors


def smeared_histogram(distances: Tensor, centres: Tensor, sigma: float, weights: Optional[Tensor] = None) -> Tensor:
    """Gaussian-smeared histogram ``[F, K]`` of ``distances [F, P]``: Σ_p w_p N(c_k; d_p, σ) (1/Å).

    Only the bins within 5σ of each distance are touched, so the cost is
    F × P × (10σ / bin width) rather than F × P × K.
    """
    width = float(centres[1] - centres[0])
    start = float(centres[0])
    reach = int(math.ceil(_KERNEL_SIGMAS * sigma / width))
    offsets = torch.arange(-reach, reach + 1, dtype=torch.long)
    n_bins = len(centres)
    n_frames, n_pairs = distances.shape
    if weights is None:
        weights = torch.ones(n_pairs, dtype=distances.dtype)
    out = []
    chunk = max(1, _CHUNK_ELEMENTS // max(1, n_pairs * len(offsets)))
    norm = 1.0 / (math.sqrt(2.0 * math.pi) * sigma)
    for begin in range(0, n_frames, chunk):
        d = distances[begin:begin + chunk]
        nearest = torch.round((d.detach() - start) / width).long()
        bins = nearest.unsqueeze(-1) + offsets  # [f, P, W]
        inside = (bins >= 0) & (bins < n_bins)
        safe = bins.clamp(0, n_bins - 1)
        kernel = norm * torch.exp(-0.5 * ((d.unsqueeze(-1) - centres[safe]) / sigma) ** 2)
        kernel = kernel * inside * weights[None, :, None]
        histogram = torch.zeros(d.shape[0], n_bins, dtype=d.dtype)
        histogram = histogram.scatter_add(1, safe.reshape(d.shape[0], -1), kernel.reshape(d.shape[0], -1))
        out.append(histogram)
    return torch.cat(out) if out else torch.zeros(0, n_bins, dtype=distances.dtype)


OBSERVABLES: dict[str, type["Observable"]] = {}


class Observable:
    """Base class: a vector observable per frame with a reference from a data set.

    Subclasses register themselves under ``name`` in :data:`OBSERVABLES` and are built by name with
    :func:`make_observable`: a new observable is one subclass that declares ``name``, ``description`` and
    ``binned`` (a curve over r whose error is ∫|g − g_ref| dr, as evaluate reports) and implements
    ``build`` and ``__call__``.
    """

    name: str = ""
    description: str = ""
    #: a curve over distance bins (h(r), RDF): evaluate compares such curves
    binned: bool = False
    #: an observable of each neighbourhood, [F, M, K] (:class:`LocalObservable`), for the localized estimator
    local: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            OBSERVABLES[cls.name] = cls

    @classmethod
    def build(cls, data: Dataset, bonds: Optional[BondGraph] = None, **options) -> "Observable":
        """The observable for ``data``'s system; by default one of its bond graph, ``cls(bonds)`` (``bonds`` None:
        detected from the data). Observables of other inputs override this."""
        return cls(_bonds_of(data, bonds), **options)
    #: what the vector's entries are along (bin centres in Å, or indices), for plots
    x: np.ndarray
    x_label: str = ""
    y_label: str = ""

    def __call__(self, positions, cell=None) -> Tensor:
        raise NotImplementedError

    def reference(self, data: Dataset, weights: Optional[np.ndarray] = None) -> Tensor:
        """g_ref ``[K]``: the (optionally weighted) mean of the observable over the data frames."""
        return _frame_mean(self(data.positions, data.cells), weights)

    def describe(self) -> dict:
        """Settings that identify this observable (kept in logs and model metadata)."""
        return {"name": self.name}

    def panels(self) -> list[tuple[str, np.ndarray]]:
        """How a plot splits the vector: (title, entry indices) per panel; one untitled panel by default."""
        return [("", np.arange(len(self.x)))]

    #: names of the entries when they are categories (bond types), not points on an axis; None otherwise
    categories: Optional[list[str]] = None


class DistanceDistribution(Observable):
    """h(r): distribution of all interatomic distances, Gaussian-smeared (1/Å).

    h(r) = 1/(N(N-1)) Σ_i Σ_{j≠i} δ(r − r_ij) with δ a Gaussian of width ``sigma``
    (default: one bin width), evaluated at ``n_bins`` bin centres on [0, ``r_max``] Å.
    It integrates to the fraction of pairs closer than ``r_max`` (1 for a molecule
    smaller than ``r_max``). In a periodic box distances are minimum-image ones.
    Defaults follow the paper's aspirin setting: 0-10 Å, 500 bins.
    """

    name = "hr"
    description = "distribution of interatomic distances h(r)"
    binned = True
    x_label = "r (Å)"
    y_label = "h(r) (1/Å)"

    @classmethod
    def build(cls, data: Dataset, bonds: Optional[BondGraph] = None, **options) -> "DistanceDistribution":
        return cls(data.n_atoms, **options)

    def __init__(self, n_atoms: int, r_max: float = 10.0, n_bins: int = 500, sigma: Optional[float] = None) -> None:
        if n_atoms < 2:
            raise ValueError("h(r) needs at least two atoms")
        if not r_max > 0 or n_bins < 2:
            raise ValueError(f"h(r) needs r_max > 0 and at least 2 bins, got r_max={r_max}, n_bins={n_bins}")
        self.n_atoms, self.r_max, self.n_bins = int(n_atoms), float(r_max), int(n_bins)
        width = self.r_max / self.n_bins
        self.sigma = float(width if sigma is None else sigma)
        if not self.sigma > 0:
            raise ValueError(f"h(r) smearing width must be positive, got {sigma}")
        self.centres = (torch.arange(self.n_bins, dtype=torch.float64) + 0.5) * width
        self.x = self.centres.numpy().copy()
        i, j = np.triu_indices(self.n_atoms, k=1)
        self.pairs = torch.as_tensor(np.stack([i, j], axis=1))

    def __call__(self, positions, cell=None) -> Tensor:
        frames = _as_frames(positions)
        if frames.shape[1] != self.n_atoms:
            raise ValueError(f"h(r) was set up for {self.n_atoms} atoms, got frames of {frames.shape[1]}")
        cells = _as_cells(cell, frames.shape[0])
        distances = pair_vectors(frames, self.pairs, cells).norm(dim=-1)
        return smeared_histogram(distances, self.centres, self.sigma) / len(self.pairs)

    def describe(self) -> dict:
        return {"name": self.name, "r_max": self.r_max, "n_bins": self.n_bins, "sigma": self.sigma}


class ElementRDF(Observable):
    """Element-resolved radial distribution functions g_ab(r) of a periodic box, concatenated.

    g_ab(r) = V / (N_a N_b') Σ_{i∈a} Σ_{j∈b, j≠i} δ(r − r_ij) / (4π r²), with N_b' = N_b − 1
    when a = b, Gaussian-smeared; ``pairs`` like ``[("O", "O"), ("O", "H"), ("H", "H")]``
    (default: every element pair present). The vector is the RDFs one after another,
    ``n_bins`` values each; ``r_max`` must not exceed half the shortest box height.
    """

    name = "rdf"
    description = "element-resolved radial distribution functions (periodic boxes)"
    binned = True
    x_label = "r (Å)"
    y_label = "g(r)"

    @classmethod
    def build(cls, data: Dataset, bonds: Optional[BondGraph] = None, **options) -> "ElementRDF":
        if not data.periodic:
            raise ValueError(f"--obs rdf needs a periodic box, but {data.source} holds molecules without one; "
                             "use --obs hr")
        options.setdefault("r_max", largest_rdf_range(data.cells[0]))
        return cls(data.numbers, **options)

    def __init__(self, numbers: Sequence[int], pairs: Optional[Sequence[tuple[str, str]]] = None,
                 r_max: float = 6.0, n_bins: int = 120, sigma: Optional[float] = None) -> None:
        self.numbers = np.asarray(numbers, dtype=np.int64)
        present = sorted(set(self.numbers.tolist()), reverse=True)
        if pairs is None:
            count = {z: int((self.numbers == z).sum()) for z in present}
            pairs = [(chemical_symbols[a], chemical_symbols[b]) for k, a in enumerate(present) for b in present[k:]
                     if a != b or count[a] > 1]
        self.element_pairs: list[tuple[str, str]] = []
        self._index_pairs: list[Tensor] = []
        self._norms: list[float] = []
        for a, b in pairs:
            za, zb = _atomic_number(a), _atomic_number(b)
            ia, ib = np.flatnonzero(self.numbers == za), np.flatnonzero(self.numbers == zb)
            if len(ia) == 0 or len(ib) == 0 or (za == zb and len(ia) < 2):
                raise ValueError(f"RDF {a}-{b}: the system has too few {a} or {b} atoms")
            if za == zb:
                i, j = np.triu_indices(len(ia), k=1)
                index = np.stack([ia[i], ia[j]], axis=1)
                norm = 2.0 / (len(ia) * (len(ia) - 1))  # each unordered pair stands for two ordered ones
            else:
                index = np.stack(np.meshgrid(ia, ib, indexing="ij"), axis=-1).reshape(-1, 2)
                index = index[index[:, 0] != index[:, 1]]
                norm = 1.0 / (len(ia) * len(ib))
            self.element_pairs.append((a, b))
            self._index_pairs.append(torch.as_tensor(index))
            self._norms.append(norm)
        if not r_max > 0 or n_bins < 2:
            raise ValueError(f"RDF needs r_max > 0 and at least 2 bins, got r_max={r_max}, n_bins={n_bins}")
        self.r_max, self.n_bins = float(r_max), int(n_bins)
        width = self.r_max / self.n_bins
        self.sigma = float(width if sigma is None else sigma)
        self.centres = (torch.arange(self.n_bins, dtype=torch.float64) + 0.5) * width
        self.x = np.tile(self.centres.numpy(), len(self.element_pairs))
        self._shell = 4.0 * math.pi * self.centres ** 2

    def __call__(self, positions, cell=None) -> Tensor:
        frames = _as_frames(positions)
        if cell is None:
            raise ValueError("an RDF needs a periodic box (cell); use h(r) (--obs hr) for molecules")
        cells = _as_cells(cell, frames.shape[0])
        volumes = torch.linalg.det(cells).abs()
        heights = volumes / torch.linalg.cross(cells[:, 1], cells[:, 2]).norm(dim=-1).clamp_min(1e-12)
        heights = torch.minimum(heights, volumes / torch.linalg.cross(cells[:, 2], cells[:, 0]).norm(dim=-1))
        heights = torch.minimum(heights, volumes / torch.linalg.cross(cells[:, 0], cells[:, 1]).norm(dim=-1))
        if float(heights.min()) < 2 * self.r_max - 1e-9:
            raise ValueError(f"RDF r_max = {self.r_max} Å exceeds half the box ({float(heights.min()) / 2:.2f} Å)")
        parts = []
        for index, norm in zip(self._index_pairs, self._norms):
            distances = pair_vectors(frames, index, cells).norm(dim=-1)
            counts = smeared_histogram(distances, self.centres, self.sigma)
            parts.append(counts * (norm * volumes)[:, None] / self._shell)
        return torch.cat(parts, dim=1)

    def split(self, values) -> dict[str, np.ndarray]:
        """``{"O-H": [..., n_bins], ...}``: one RDF per element pair from a concatenated vector."""
        values = np.asarray(values)
        return {f"{a}-{b}": values[..., k * self.n_bins:(k + 1) * self.n_bins]
                for k, (a, b) in enumerate(self.element_pairs)}

    def panels(self) -> list[tuple[str, np.ndarray]]:
        bins = len(self.centres)
        return [("-".join(pair), np.arange(k * bins, (k + 1) * bins)) for k, pair in enumerate(self.element_pairs)]

    def describe(self) -> dict:
        return {"name": self.name, "pairs": ["-".join(p) for p in self.element_pairs], "r_max": self.r_max,
                "n_bins": self.n_bins, "sigma": self.sigma}


class BondLengths(Observable):
    """Bond lengths (Å) of a bond graph: one per bond, or (``per_type``) the mean per bond type.

    Bond types are element pairs such as ``C-H``; :attr:`labels` names the entries.
    """

    name = "bonds"
    description = "length of every bond"
    x_label = "bond type"
    y_label = "bond length (Å)"

    @classmethod
    def build(cls, data: Dataset, bonds: Optional[BondGraph] = None, **options) -> "BondLengths":
        return BondLengths(_bonds_of(data, bonds), per_type=cls.name == "bond-types")

    def __init__(self, bonds: BondGraph, per_type: bool = False) -> None:
        if len(bonds.pairs) == 0:
            raise ValueError("bond lengths need at least one bond; none was detected in the reference frames")
        self.bonds, self.per_type = bonds, bool(per_type)
        self.name = "bond-types" if per_type else "bonds"
        self.pairs = torch.as_tensor(bonds.pairs)
        types = [_bond_type(bonds.numbers, i, j) for i, j in bonds.pairs]
        if per_type:
            self.labels = sorted(set(types))
            member = np.array([[t == label for t in types] for label in self.labels], dtype=np.float64)
            self._average = torch.as_tensor(member / member.sum(axis=1, keepdims=True))  # [T, B]
        else:
            self.labels = [bonds.describe(k) for k in range(len(bonds.pairs))]
            self._average = None
        self.x = np.arange(len(self.labels))
        self.categories = list(self.labels)
        if not per_type:
            self.x_label = "bond"

    def __call__(self, positions, cell=None) -> Tensor:
        frames = _as_frames(positions)
        lengths = pair_vectors(frames, self.pairs, _as_cells(cell, frames.shape[0])).norm(dim=-1)
        return lengths if self._average is None else lengths @ self._average.T

    def describe(self) -> dict:
        return {"name": self.name, "bonds": len(self.bonds.pairs), "labels": self.labels}


class BondTypeLengths(BondLengths):
    """The registry's ``bond-types``: :class:`BondLengths` averaged per bond type (``per_type=True``)."""

    name = "bond-types"
    description = "mean bond length per bond type (e.g. O-H)"


class MinIntermolecularDistance(Observable):
    """The shortest distance (Å) between atoms of different molecules, ``[F, 1]``.

    Molecules are the connected components of the bond graph; minimum image in a box.
    """

    name = "imd"
    description = "minimum intermolecular distance"
    x_label = ""
    y_label = "min. intermolecular distance (Å)"

    def __init__(self, bonds: BondGraph) -> None:
        self.pairs = torch.as_tensor(intermolecular_pairs(bonds))
        self.x = np.zeros(1)

    def __call__(self, positions, cell=None) -> Tensor:
        frames = _as_frames(positions)
        distances = pair_vectors(frames, self.pairs, _as_cells(cell, frames.shape[0])).norm(dim=-1)
        return distances.min(dim=1, keepdim=True).values


class LocalObservable(Observable):
    """An observable of every neighbourhood of a frame, ``[F, M, K]``: what the localized estimator learns from.

    A neighbourhood is a set of atoms (here a molecule: a connected component of the bond graph); its
    energy is the sum of those atoms' energies. The reference ``[K]`` is the mean over the data's frames
    and neighbourhoods, so every neighbourhood must be alike (a liquid of one species).
    """

    local = True
    #: [M, N] bool: the atoms of each neighbourhood
    membership: np.ndarray

    def reference(self, data: Dataset, weights: Optional[np.ndarray] = None) -> Tensor:
        """g_ref ``[K]``: the mean over the data's frames (optionally weighted) and neighbourhoods."""
        return _frame_mean(self.pooled(self(data.positions, data.cells)), weights)

    def _set_molecules(self, bonds: BondGraph) -> np.ndarray:
        """Make the bond graph's molecules the neighbourhoods (``membership``, ``n_molecules``); returns each atom's
        molecule index [N]."""
        from stable_md.stability import molecules_of

        molecules = molecules_of(bonds)
        molecule_of = np.empty(len(bonds.numbers), dtype=np.int64)
        self.membership = np.zeros((len(molecules), len(bonds.numbers)), dtype=bool)
        for k, members in enumerate(molecules):
            molecule_of[members] = k
            self.membership[k, members] = True
        self.n_molecules = len(molecules)
        return molecule_of

    @staticmethod
    def pooled(values: Tensor) -> Tensor:
        """``[F, K]``: the mean over the neighbourhoods of ``values [F, M, K]`` (what logs and plots show)."""
        return values.mean(dim=1)

    @staticmethod
    def deviation(values: Tensor, reference: Tensor) -> Tensor:
        """``[F, M]``: how far each neighbourhood is from the reference (the norm over K), for the balanced
        selection of local samples."""
        return (values - reference).norm(dim=-1)


class LocalBondLengths(LocalObservable):
    """Per molecule, the mean length of each of its bond types (Å), ``[F, M, K]``: water's O-H bond length.

    Molecules are the connected components of the bond graph; each must have the same bond types (K of
    them, e.g. ``O-H``); minimum image in a box.
    """

    name = "local-bonds"
    description = "per molecule, the mean length of each bond type (localized estimator; water: O-H)"
    x_label = "bond type"
    y_label = "bond length (Å)"

    def __init__(self, bonds: BondGraph) -> None:
        if len(bonds.pairs) == 0:
            raise ValueError("local bond lengths need bonds; none was detected in the reference frames")
        molecule_of = self._set_molecules(bonds)
        types = [_bond_type(bonds.numbers, i, j) for i, j in bonds.pairs]
        self.labels = sorted(set(types))
        per_molecule = [sorted({t for t, (i, _) in zip(types, bonds.pairs) if molecule_of[i] == k})
                        for k in range(self.n_molecules)]
        for k, kinds in enumerate(per_molecule):
            if kinds != self.labels:
                atom = int(np.flatnonzero(self.membership[k])[0])
                raise ValueError(f"local bond lengths need molecules that are alike: molecule {k} (atoms from "
                                 f"{atom + 1}, {chemical_symbols[bonds.numbers[atom]]}) has bond types "
                                 f"{kinds or 'none'}, the others {self.labels}")
        self.bonds = bonds
        self.pairs = torch.as_tensor(bonds.pairs)
        n_molecules, n_types = self.n_molecules, len(self.labels)
        # [B] -> one (molecule, type) slot; the mean over each slot's bonds
        slot = torch.as_tensor([molecule_of[i] * n_types + self.labels.index(t)
                                for t, (i, _) in zip(types, bonds.pairs)])
        counts = torch.zeros(n_molecules * n_types, dtype=torch.float64).index_add_(
            0, slot, torch.ones(len(slot), dtype=torch.float64))
        self._slot, self._counts = slot, counts
        self.n_types = n_types
        self.x = np.arange(n_types)
        self.categories = list(self.labels)

    def __call__(self, positions, cell=None) -> Tensor:
        frames = _as_frames(positions)
        lengths = pair_vectors(frames, self.pairs, _as_cells(cell, frames.shape[0])).norm(dim=-1)  # [F, B]
        sums = torch.zeros(frames.shape[0], self.n_molecules * self.n_types, dtype=lengths.dtype)
        sums = sums.index_add(1, self._slot, lengths)
        return (sums / self._counts).reshape(frames.shape[0], self.n_molecules, self.n_types)

    def describe(self) -> dict:
        return {"name": self.name, "molecules": self.n_molecules, "labels": self.labels}


class LocalMinIntermolecularDistance(LocalObservable):
    """Per molecule, the distance (Å) to the nearest atom of another molecule, ``[F, M, 1]``: the local form of
    the minimum-intermolecular-distance criterion, for liquids whose failures are collisions.

    Molecules are the connected components of the bond graph (at least two); minimum image in a box.
    """

    name = "local-imd"
    description = "per molecule, the distance to the nearest atom of another molecule (localized estimator)"
    x_label = ""
    y_label = "nearest other molecule (Å)"

    def __init__(self, bonds: BondGraph) -> None:
        pairs = intermolecular_pairs(bonds)  # refuses a single molecule by name
        molecule_of = self._set_molecules(bonds)
        self.pairs = torch.as_tensor(pairs)
        # each pair counts for both of its molecules
        self._owners = torch.as_tensor(np.concatenate([molecule_of[pairs[:, 0]], molecule_of[pairs[:, 1]]]))
        self.x = np.zeros(1)

    def __call__(self, positions, cell=None) -> Tensor:
        frames = _as_frames(positions)
        distances = pair_vectors(frames, self.pairs, _as_cells(cell, frames.shape[0])).norm(dim=-1)  # [F, P]
        both = torch.cat([distances, distances], dim=1)
        nearest = torch.full((frames.shape[0], self.n_molecules), math.inf, dtype=distances.dtype)
        index = self._owners.unsqueeze(0).expand_as(both)
        nearest = nearest.scatter_reduce(1, index, both, reduce="amin", include_self=True)
        return nearest.unsqueeze(-1)

    def describe(self) -> dict:
        return {"name": self.name, "molecules": self.n_molecules}


def local_observables() -> list[str]:
    """Names of the observables of neighbourhoods (those ``refine --estimator local`` takes)."""
    return [name for name, cls in OBSERVABLES.items() if getattr(cls, "local", False)]


def largest_rdf_range(cell: np.ndarray, limit: float = 6.0) -> float:
    """Largest RDF range (Å) the box ``cell [3, 3]`` (Å) allows: just under half its shortest height, at most
    ``limit``."""
    cell = np.asarray(cell, dtype=np.float64)
    volume = abs(float(np.linalg.det(cell)))
    heights = [volume / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)]
    return min(float(limit), 0.5 * min(heights) * 0.999)


def _frame_mean(values: Tensor, weights: Optional[np.ndarray]) -> Tensor:
    """``[K]``: the mean of ``values [F, K]`` over frames, weighted by ``weights [F]`` when given."""
    if weights is None:
        return values.mean(dim=0)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (values.shape[0],):
        raise ValueError(f"need one weight per data frame ({values.shape[0]}), got {tuple(weights.shape)}")
    return (weights[:, None] * values).sum(dim=0) / weights.sum()


def make_observable(name: str, data: Dataset, bonds: Optional[BondGraph] = None, **options) -> Observable:
    """The registered observable called ``name`` (see :data:`OBSERVABLES`) for ``data``'s system.

    Bond-based observables detect bonds on up to 1000 data frames unless ``bonds`` is given.
    """
    if name not in OBSERVABLES:
        raise ValueError(f"unknown observable {name!r}; expected one of {list(OBSERVABLES)}")
    return OBSERVABLES[name].build(data, bonds, **options)


def binned_observables() -> list[str]:
    """Names of the observables that are curves over distance bins (those evaluate compares)."""
    return [name for name, cls in OBSERVABLES.items() if cls.binned]


def _bonds_of(data: Dataset, bonds: Optional[BondGraph]) -> BondGraph:
    if bonds is not None:
        return bonds
    return detect_bonds(data.numbers, reference_frames(data), None if data.cells is None else data.cells[0])


def reference_frames(data: Dataset, limit: int = 1000) -> np.ndarray:
    """Up to ``limit`` frames ``[F, N, 3]`` spread evenly over ``data``."""
    if len(data) <= limit:
        return data.positions
    return data.positions[np.linspace(0, len(data) - 1, limit).round().astype(np.int64)]


def _atomic_number(symbol: str) -> int:
    try:
        return chemical_symbols.index(symbol)
    except ValueError:
        raise ValueError(f"unknown element symbol {symbol!r}") from None


def _bond_type(numbers: np.ndarray, i: int, j: int) -> str:
    a, b = sorted((chemical_symbols[numbers[i]], chemical_symbols[numbers[j]]))
    return f"{a}-{b}"


# -- dynamical observables (evaluation) ------------------------------------------------------------------

def velocity_autocorrelation(velocities: np.ndarray, window: int = 100, stride: int = 1) -> np.ndarray:
    """Normalized VACF ``[window]`` of a trajectory ``velocities [T, N, 3]`` (any units).

    C(Δ) = <v_i(t0) · v_i(t0 + Δ)> averaged over atoms and time origins t0 (every
    ``stride`` frames), divided by C(0) so that C(0) = 1. The paper uses a window of
    100 consecutive steps.
    """
    v = np.asarray(velocities, dtype=np.float64)
    if v.ndim != 3 or v.shape[-1] != 3:
        raise ValueError(f"velocities must be [T, N, 3], got shape {v.shape}")
    if not 1 <= window <= len(v):
        raise ValueError(f"the VACF window ({window} frames) must lie between 1 and the trajectory length ({len(v)})")
    origins = np.arange(0, len(v) - window + 1, max(1, int(stride)))
    correlation = np.array([np.einsum("tnk,tnk->", v[origins], v[origins + lag]) for lag in range(window)])
    if correlation[0] <= 0:
        raise ValueError("the velocities are all zero; the VACF is undefined")
    return correlation / correlation[0]


def mean_squared_displacement(positions: np.ndarray, atoms: Optional[Sequence[int]] = None,
                              max_lag: Optional[int] = None, stride: int = 1) -> np.ndarray:
    """MSD ``[max_lag + 1]`` (Å²) of unwrapped ``positions [T, N, 3]`` over time origins every ``stride`` frames."""
    x = np.asarray(positions, dtype=np.float64)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"positions must be [T, N, 3], got shape {x.shape}")
    if atoms is not None:
        x = x[:, np.asarray(atoms, dtype=np.int64)]
    max_lag = len(x) - 1 if max_lag is None else int(max_lag)
    if not 1 <= max_lag < len(x):
        raise ValueError(f"max_lag must lie between 1 and {len(x) - 1} frames, got {max_lag}")
    msd = np.zeros(max_lag + 1)
    for lag in range(1, max_lag + 1):
        origins = np.arange(0, len(x) - lag, max(1, int(stride)))
        msd[lag] = ((x[origins + lag] - x[origins]) ** 2).sum(axis=-1).mean()
    return msd


def diffusion_coefficient(msd: np.ndarray, frame_interval_fs: float, fit_from: float = 0.2) -> float:
    """Self-diffusion coefficient (m²/s) from the slope of ``msd`` (Å², one value per frame lag).

    Einstein relation MSD = 6 D t, fitted by least squares on lags from ``fit_from`` of
    the curve to its end (the short-time ballistic part is left out).
    """
    msd = np.asarray(msd, dtype=np.float64)
    lags = np.arange(len(msd)) * float(frame_interval_fs)
    first = max(1, int(fit_from * (len(msd) - 1)))
    if len(msd) - first < 2:
        raise ValueError("the MSD is too short to fit a slope; run longer or save frames more often")
    slope = np.polyfit(lags[first:], msd[first:], 1)[0]  # Å²/fs
    return slope / 6.0 * 1e-5  # 1 Å²/fs = 1e-20 m² / 1e-15 s
