"""Instability criteria for replicas (appendix A.5 of the StABlE paper).

- :class:`BondLengthCriterion`: the largest bond-length deviation from reference (molecules);
- :class:`MinDistanceCriterion`: atoms of different molecules closer than 1.2 Å (liquids, training);
- :class:`RDFCriterion`: the RDF averaged over a time window drifts from the reference (liquids, evaluation).

Every criterion is a :class:`Criterion`: called with positions ``[R, N, 3]`` (Å) it answers
``[R]`` bool (unstable), and ``reasons(positions, replicas)`` gives one message per replica
asked about. Criteria register themselves by ``name`` in :data:`CRITERIA`, as ASE's
calculators are looked up by name: a new criterion is one subclass that declares its name,
thresholds and unit and implements ``build``, ``__call__`` and ``reasons``; refine, evaluate,
simulate and the CLI find it through :func:`make_criterion` and :func:`criterion_names`.

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
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
from ase.data import chemical_symbols, covalent_radii

DEFAULT_BOND_FACTOR = 1.25
EVALUATION_THRESHOLD = 0.5
TRAINING_THRESHOLD = 0.25
MIN_DISTANCE_THRESHOLD = 1.2
RDF_MAE_THRESHOLD = 3.0


@dataclass
class CriterionInputs:
    """What a criterion may be built from: the bond graph of the reference frames, the periodic cell (Å,
    None for molecules) and, for criteria that compare with the data (rdf), the data set, its optional
    Boltzmann weights and the number of consecutive checks averaged (``window``)."""

    bonds: "BondGraph"
    cell: Optional[np.ndarray] = None
    data: Any = None
    weights: Optional[np.ndarray] = None
    window: int = 20


CRITERIA: dict[str, type["Criterion"]] = {}


class Criterion:
    """Base class of instability criteria; subclasses register themselves under ``name``.

    Class attributes: ``description``; ``unit`` of the threshold; ``evaluation_threshold`` (the paper's
    evaluation value) and ``training_threshold`` (used by refine; None: not a training criterion);
    ``windowed``: the verdict depends on a window of consecutive checks, so single frames cannot be
    screened and :meth:`reset` must follow a rewind; ``needs_box``: only for periodic boxes.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    unit: ClassVar[str] = "Å"
    evaluation_threshold: ClassVar[float]
    training_threshold: ClassVar[Optional[float]] = None
    windowed: ClassVar[bool] = False
    needs_box: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            CRITERIA[cls.name] = cls

    @classmethod
    def build(cls, inputs: CriterionInputs, threshold: float) -> "Criterion":
        """The criterion for ``inputs`` at ``threshold`` (in ``unit``)."""
        raise NotImplementedError

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """``[R]`` bool: which replicas of ``positions`` ``[R, N, 3]`` (Å) are unstable."""
        raise NotImplementedError

    def reasons(self, positions: np.ndarray, replicas: Optional[Sequence[int]] = None) -> list[str]:
        """One message per replica in ``replicas`` (default: all) of ``positions`` ``[R, N, 3]``."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget recorded frames (after a rewind); a criterion that judges single frames has none."""

    def culprit(self, positions: np.ndarray, replica: int = 0) -> tuple[tuple[int, ...], float]:
        """The atoms (0-based) behind replica ``replica``'s verdict and the value judged (in ``unit``), for a
        guard's error; () and NaN where the verdict names no atoms."""
        return (), float("nan")


def criterion_names(purpose: str = "evaluation") -> list[str]:
    """Names of the registered criteria usable for ``purpose`` (``evaluation`` or ``training``)."""
    return [name for name, cls in CRITERIA.items() if purpose == "evaluation" or cls.training_threshold is not None]


def default_threshold(name: str, purpose: str = "evaluation") -> float:
    """The default threshold of criterion ``name`` for ``purpose`` (``evaluation`` or ``training``)."""
    cls = _criterion_class(name, purpose)
    return cls.training_threshold if purpose == "training" else cls.evaluation_threshold


def make_criterion(name: str, inputs: CriterionInputs, threshold: Optional[float] = None,
                   purpose: str = "evaluation") -> Criterion:
    """The registered criterion ``name`` built from ``inputs``; ``threshold`` None takes the default for
    ``purpose``. Raises ``ValueError`` naming what is wrong (unknown name, a box it needs)."""
    cls = _criterion_class(name, purpose)
    if cls.needs_box and inputs.cell is None:
        raise ValueError(f"--criterion {name} needs a periodic box; use --criterion bond for molecules")
    return cls.build(inputs, default_threshold(name, purpose) if threshold is None else threshold)


def _criterion_class(name: str, purpose: str) -> type[Criterion]:
    if purpose not in ("evaluation", "training"):
        raise ValueError(f"purpose must be 'evaluation' or 'training', got {purpose!r}")
    names = criterion_names(purpose)
    if name not in names:
        raise ValueError(f"unknown stability criterion {name!r}" + (" for training" if name in CRITERIA else "")
                         + f"; expected one of {names}")
    return CRITERIA[name]


def _chosen(values: list, replicas: Optional[Sequence[int]]) -> list:
    return values if replicas is None else [values[int(r)] for r in replicas]


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


class _OnBondGraph(Criterion):
    """A criterion built from the bond graph and the cell alone: ``cls(bonds, threshold, cell)``."""

    @classmethod
    def build(cls, inputs: CriterionInputs, threshold: float) -> Criterion:
        return cls(inputs.bonds, threshold, inputs.cell)


class BondLengthCriterion(_OnBondGraph):
    """A replica is unstable when a bond deviates from its reference length by more than ``threshold`` Å."""

    name = "bond"
    description = "bond-length deviation from the reference frames (molecules)"
    evaluation_threshold = EVALUATION_THRESHOLD
    training_threshold = TRAINING_THRESHOLD

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

    def reasons(self, positions: np.ndarray, replicas: Optional[Sequence[int]] = None) -> list[str]:
        """Per replica, the worst bond and its deviation, e.g. ``C1-O3 off by 0.62 Å``."""
        positions = np.asarray(positions)
        deviations = self.deviations(positions if replicas is None else positions[np.asarray(replicas, dtype=int)])
        worst = deviations.argmax(axis=1)
        return [f"bond {self.bonds.describe(b)} off by {deviations[r, b]:.2f} Å" for r, b in enumerate(worst)]

    def culprit(self, positions: np.ndarray, replica: int = 0) -> tuple[tuple[int, ...], float]:
        """The worst bond's atoms and its deviation (Å)."""
        deviations = self.deviations(np.asarray(positions)[[replica]])[0]
        worst = int(deviations.argmax())
        return tuple(int(a) for a in self.bonds.pairs[worst]), float(deviations[worst])


def molecules_of(bonds: BondGraph) -> list[np.ndarray]:
    """Atom indices of each molecule: the connected components of the bond graph, in order of first atom."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_atoms = len(bonds.numbers)
    pairs = np.asarray(bonds.pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n_atoms, n_atoms))
    _, labels = connected_components(graph, directed=False)
    order = {label: k for k, label in enumerate(dict.fromkeys(labels.tolist()))}
    return [np.flatnonzero(labels == label) for label in sorted(order, key=order.get)]


def intermolecular_pairs(bonds: BondGraph) -> np.ndarray:
    """``[P, 2]`` atom pairs that belong to different molecules; at least two molecules are required."""
    molecules = molecules_of(bonds)
    if len(molecules) < 2:
        raise ValueError("the minimum intermolecular distance needs at least two molecules, but the bonds join "
                         "every atom into one molecule (use the bond criterion for a single molecule)")
    labels = np.empty(len(bonds.numbers), dtype=np.int64)
    for k, members in enumerate(molecules):
        labels[members] = k
    i, j = np.triu_indices(len(labels), k=1)
    between = labels[i] != labels[j]
    return np.stack([i[between], j[between]], axis=1)


class MinDistanceCriterion(_OnBondGraph):
    """A replica is unstable when two atoms of different molecules come closer than ``threshold`` Å (1.2).

    Molecules are the connected components of the bond graph (water: one O and two H).
    """

    name = "imd"
    description = "minimum intermolecular distance (liquids)"
    evaluation_threshold = MIN_DISTANCE_THRESHOLD
    training_threshold = MIN_DISTANCE_THRESHOLD

    def __init__(self, bonds: BondGraph, threshold: float = MIN_DISTANCE_THRESHOLD,
                 cell: Optional[np.ndarray] = None) -> None:
        if not threshold > 0:
            raise ValueError(f"minimum-distance threshold must be positive, got {threshold}")
        self.pairs = intermolecular_pairs(bonds)
        self.bonds, self.threshold, self.cell = bonds, float(threshold), cell

    def distances(self, positions: np.ndarray) -> np.ndarray:
        """``[R, P]`` distances (Å) of all intermolecular atom pairs."""
        return pair_distances(positions, self.pairs, self.cell)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        return self.distances(positions).min(axis=1) < self.threshold

    def reasons(self, positions: np.ndarray, replicas: Optional[Sequence[int]] = None) -> list[str]:
        positions = np.asarray(positions)
        distances = self.distances(positions if replicas is None else positions[np.asarray(replicas, dtype=int)])
        closest = distances.argmin(axis=1)
        messages = []
        for r, p in enumerate(closest):
            i, j = self.pairs[p]
            label = (f"{chemical_symbols[self.bonds.numbers[i]]}{i + 1}-"
                     f"{chemical_symbols[self.bonds.numbers[j]]}{j + 1}")
            messages.append(f"atoms {label} of different molecules {distances[r, p]:.2f} Å apart")
        return messages

    def culprit(self, positions: np.ndarray, replica: int = 0) -> tuple[tuple[int, ...], float]:
        """The closest pair of atoms of different molecules and their distance (Å)."""
        distances = self.distances(np.asarray(positions)[[replica]])[0]
        closest = int(distances.argmin())
        return tuple(int(a) for a in self.pairs[closest]), float(distances[closest])


class RDFCriterion(Criterion):
    """A replica is unstable when its RDF, averaged over the last ``window`` checked frames, differs from the
    reference by more than ``threshold``: ∫ |g_ref(r) − <g(r)>| dr > Δ for any element pair (paper: τ = 1 ps,
    Δ = 3.0 for water).

    ``rdf`` is an :class:`stable_md.observables.ElementRDF`; ``reference`` its value on reference data.
    The criterion keeps the last frames per replica, so call it on consecutive checks in time
    order and :meth:`reset` it after a rewind. Until ``window`` frames are in, no replica is flagged.
    """

    name = "rdf"
    description = "RDF error over a window of checks (liquids, evaluation)"
    unit = ""
    evaluation_threshold = RDF_MAE_THRESHOLD
    windowed = True
    needs_box = True

    @classmethod
    def build(cls, inputs: CriterionInputs, threshold: float) -> "RDFCriterion":
        from stable_md.observables import make_observable

        rdf = make_observable("rdf", inputs.data)
        return cls(rdf, rdf.reference(inputs.data, inputs.weights).numpy(), inputs.cell, inputs.window, threshold)

    def __init__(self, rdf, reference, cell: np.ndarray, window: int, threshold: float = RDF_MAE_THRESHOLD) -> None:
        if window < 1:
            raise ValueError(f"the RDF window must hold at least one frame, got {window}")
        if not threshold > 0:
            raise ValueError(f"RDF threshold must be positive, got {threshold}")
        self.rdf, self.cell, self.window, self.threshold = rdf, cell, int(window), float(threshold)
        self.reference = np.asarray(reference, dtype=np.float64)
        self._history: list[np.ndarray] = []

    def reset(self) -> None:
        self._history.clear()

    def errors(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Record ``positions [R, N, 3]`` and return, per element pair, ``[R]`` ∫|Δg| dr over the window."""
        self._history.append(self.rdf(positions, self.cell).numpy())
        del self._history[:-self.window]
        return self._window_errors()

    def _window_errors(self) -> dict[str, np.ndarray]:
        mean = np.mean(self._history, axis=0)
        width = self.rdf.r_max / self.rdf.n_bins
        reference = self.rdf.split(self.reference)
        return {pair: np.abs(values - reference[pair]).sum(axis=-1) * width
                for pair, values in self.rdf.split(mean).items()}

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        errors = self.errors(positions)
        if len(self._history) < self.window:
            return np.zeros(len(positions), dtype=bool)
        return np.max(np.stack(list(errors.values())), axis=0) > self.threshold

    def reasons(self, positions: np.ndarray, replicas: Optional[Sequence[int]] = None) -> list[str]:
        """Messages from the frames recorded so far (does not record ``positions`` again)."""
        errors = self._window_errors()
        names = list(errors)
        stacked = np.stack([errors[n] for n in names])
        worst = stacked.argmax(axis=0)
        return _chosen([f"{names[w]} RDF error {stacked[w, r]:.2f} over {len(self._history)} frames"
                        for r, w in enumerate(worst)], replicas)
