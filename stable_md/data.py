"""Data sets of QM frames: load extended XYZ and MD17-style ``.npz``, validate, split, save.

Every frame of a :class:`Dataset` holds the same atoms in the same order (a molecule,
or a periodic box of fixed composition). Units inside: Å, eV, eV/Å.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from stable_md.units import energy_factor

MD17_DEFAULT_ENERGY_UNIT = "kcal/mol"


class DataError(ValueError):
    """A data file is unusable; the message names the file and the problem."""


@dataclass
class Dataset:
    """Frames of one system with reference energies and forces.

    Attributes
    ----------
    positions: ``[F, N, 3]`` Å.
    numbers: ``[N]`` atomic numbers.
    energies: ``[F]`` eV.
    forces: ``[F, N, 3]`` eV/Å.
    cells: ``[F, 3, 3]`` Å (rows are lattice vectors), or ``None`` for molecules.
    source: where the frames came from (used in messages).
    indices: index of each frame in ``source`` (kept through subsetting and splits).
    origin: the file the frames were read from, ``{"path": absolute path, "size_bytes",
        "fingerprint", "frames"}`` (kept through subsetting; ``None`` for data made in
        memory). Models record it, so "the same data" means the same frames, whatever
        path or working directory names the file.
    times_fs: ``[F]`` simulated time of each frame in fs when the file records it (``md_time_fs``, as
        ``stable-md data`` writes), else ``None``: frames of one MD trajectory give reference dynamics.
    velocities: ``[F, N, 3]`` Å/fs when every frame records them (``momenta`` in extended XYZ, ``V`` in
        ``.npz``), else ``None``.
    dense: the file's dense segment, if it has one: frames written at every MD step after the regular ones
        (``md_segment=dense`` in extended XYZ, ``dense_*`` keys in ``.npz``), with ``times_fs`` and
        ``velocities``. It is the reference for velocity autocorrelation functions; it is not part of the
        frames (training, splits and reference observables never see it) and subsets keep it.
    """

    positions: np.ndarray
    numbers: np.ndarray
    energies: np.ndarray
    forces: np.ndarray
    cells: Optional[np.ndarray] = None
    source: str = "<memory>"
    indices: np.ndarray = field(default=None)  # type: ignore[assignment]
    origin: Optional[dict] = None
    times_fs: Optional[np.ndarray] = None
    velocities: Optional[np.ndarray] = None
    dense: Optional["Dataset"] = None

    def __post_init__(self) -> None:
        self.positions = np.asarray(self.positions, dtype=np.float64)
        self.numbers = np.asarray(self.numbers, dtype=np.int64)
        self.energies = np.asarray(self.energies, dtype=np.float64).reshape(-1)
        self.forces = np.asarray(self.forces, dtype=np.float64)
        if self.cells is not None:
            self.cells = np.asarray(self.cells, dtype=np.float64)
        if self.times_fs is not None:
            self.times_fs = np.asarray(self.times_fs, dtype=np.float64).reshape(-1)
        if self.velocities is not None:
            self.velocities = np.asarray(self.velocities, dtype=np.float64)
        if self.indices is None:
            self.indices = np.arange(len(self.positions))
        self.indices = np.asarray(self.indices, dtype=np.int64)
        validate(self)

    def __len__(self) -> int:
        return len(self.energies)

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @property
    def species(self) -> list[int]:
        """Sorted unique atomic numbers."""
        return sorted(int(z) for z in np.unique(self.numbers))

    @property
    def periodic(self) -> bool:
        return self.cells is not None

    def subset(self, selection: Sequence[int] | np.ndarray | slice) -> "Dataset":
        """Frames picked by an index array or slice (indices into this data set)."""
        if isinstance(selection, slice):
            picked = np.arange(len(self))[selection]
        else:
            picked = np.asarray(selection)
            if picked.dtype != bool:
                picked = picked.astype(np.int64)  # an empty list would otherwise be a float array
        if picked.size and (picked.min() < -len(self) or picked.max() >= len(self)):
            raise IndexError(f"{self.source}: frame index out of range 0..{len(self) - 1}")
        return Dataset(
            positions=self.positions[picked],
            numbers=self.numbers,
            energies=self.energies[picked],
            forces=self.forces[picked],
            cells=None if self.cells is None else self.cells[picked],
            source=self.source,
            indices=self.indices[picked],
            origin=self.origin,
            times_fs=None if self.times_fs is None else self.times_fs[picked],
            velocities=None if self.velocities is None else self.velocities[picked],
            dense=self.dense,
        )

    def first(self, n: int) -> "Dataset":
        """The first ``n`` frames."""
        return self.subset(slice(0, n))

    def every(self, k: int) -> "Dataset":
        """Every ``k``-th frame (k >= 1)."""
        if k < 1:
            raise ValueError(f"every: k must be >= 1, got {k}")
        return self.subset(slice(None, None, k))

    def split(self, n_train: int, n_val: int, n_test: Optional[int] = None,
              seed: int = 0) -> tuple["Dataset", "Dataset", "Dataset"]:
        """Random, reproducible train/validation/test split (disjoint).

        ``n_test=None`` puts every remaining frame into the test set.
        """
        n_test_value = len(self) - n_train - n_val if n_test is None else n_test
        if min(n_train, n_val, n_test_value) < 0 or n_train + n_val + n_test_value > len(self):
            raise ValueError(
                f"{self.source}: cannot split {len(self)} frames into train={n_train}, "
                f"validation={n_val}, test={n_test_value}"
            )
        order = np.random.default_rng(seed).permutation(len(self))
        train = order[:n_train]
        val = order[n_train:n_train + n_val]
        test = order[n_train + n_val:n_train + n_val + n_test_value]
        return self.subset(np.sort(train)), self.subset(np.sort(val)), self.subset(np.sort(test))

    def to_atoms(self, frame: int = 0):
        """Frame ``frame`` as an :class:`ase.Atoms` with a single-point calculator attached."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = Atoms(numbers=self.numbers, positions=self.positions[frame])
        if self.cells is not None:
            atoms.cell = self.cells[frame]
            atoms.pbc = True
        if self.velocities is not None:
            from ase.units import fs

            atoms.set_velocities(self.velocities[frame] / fs)  # ASE's time unit is 1/ase.units.fs fs
        if self.times_fs is not None:
            atoms.info["md_time_fs"] = float(self.times_fs[frame])
        atoms.calc = SinglePointCalculator(atoms, energy=float(self.energies[frame]),
                                           forces=self.forces[frame].copy())
        return atoms

    def save_extxyz(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the frames as extended XYZ with energies and forces (eV, eV/Å), atomically."""
        from ase.io import write

        from stable_md.files import atomic_write

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; refusing to overwrite it")
        frames = [self.to_atoms(i) for i in range(len(self))]
        if self.dense is not None:
            for k in range(len(self.dense)):
                atoms = self.dense.to_atoms(k)
                atoms.info[SEGMENT_KEY] = DENSE_SEGMENT
                frames.append(atoms)
        atomic_write(path, lambda tmp: write(str(tmp), frames, format="extxyz"))
        return path

    def save_npz(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write an MD17-style compressed ``.npz`` atomically (molecules only).

        Keys ``R`` (Å, float32), ``z``, ``E`` (kcal/mol, float64), ``F`` (kcal/mol/Å, float32),
        so that :func:`load_dataset` reads it with its ``.npz`` default units. float32
        keeps positions to about 1e-6 Å and forces to about 1e-6 relative. Velocities and times, when
        present, go to ``V`` (Å/fs, float32) and ``t`` (fs); the dense segment to the same keys prefixed
        with ``dense_``.
        """
        from stable_md.files import atomic_write

        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"{path}: an MD17-style file needs the suffix .npz")
        if self.periodic:
            raise ValueError(f"{path}: MD17-style .npz holds molecules; write periodic boxes as extended XYZ")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; refusing to overwrite it")
        arrays = _md17_arrays(self)
        if self.dense is not None:
            arrays.update({DENSE_PREFIX + key: value for key, value in _md17_arrays(self.dense).items() if key != "z"})

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, **arrays)

        atomic_write(path, write)
        return path


SAVE_SUFFIXES = (".npz", ".extxyz", ".xyz")
SEGMENT_KEY, DENSE_SEGMENT = "md_segment", "dense"
DENSE_PREFIX = "dense_"


def _md17_arrays(data: Dataset) -> dict[str, np.ndarray]:
    """The MD17-style arrays of ``data``'s frames: R, z, E, F, and V, t when it has them."""
    per_kcal = 1.0 / energy_factor("kcal/mol")
    arrays = {"R": data.positions.astype(np.float32), "z": data.numbers.astype(np.int64),
              "E": data.energies * per_kcal, "F": (data.forces * per_kcal).astype(np.float32)}
    if data.velocities is not None:
        arrays["V"] = data.velocities.astype(np.float32)
    if data.times_fs is not None:
        arrays["t"] = data.times_fs
    return arrays


def save_dataset(data: Dataset, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``data`` as MD17-style ``.npz`` or as extended XYZ (``.extxyz``, ``.xyz``); other names are refused
    rather than given contents their suffix does not promise."""
    suffix = Path(path).suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise DataError(f"{path}: cannot write a data set as {suffix or 'a file without a suffix'}; name it .npz "
                        f"(MD17-style) or .extxyz / .xyz (extended XYZ)")
    if suffix == ".npz":
        return data.save_npz(path, overwrite=overwrite)
    return data.save_extxyz(path, overwrite=overwrite)


def concatenate(datasets: Sequence[Dataset]) -> Dataset:
    """The frames of several data sets of the same atoms, one after another (indices renumbered 0..F-1); one data
    set is returned as it is (frame times included)."""
    if not datasets:
        raise ValueError("nothing to concatenate")
    first = datasets[0]
    if len(datasets) == 1:
        return first
    for other in datasets[1:]:
        if not np.array_equal(other.numbers, first.numbers):
            raise DataError(f"{other.source} holds other atoms than {first.source}; only data sets of the same atoms "
                            f"in the same order can be joined")
        if other.periodic != first.periodic:
            raise DataError(f"{other.source} and {first.source} differ in periodicity")
    return Dataset(
        positions=np.concatenate([d.positions for d in datasets]), numbers=first.numbers,
        energies=np.concatenate([d.energies for d in datasets]), forces=np.concatenate([d.forces for d in datasets]),
        cells=np.concatenate([d.cells for d in datasets]) if first.periodic else None,
        source=" + ".join(d.source for d in datasets) if len(datasets) > 1 else first.source,
        velocities=(np.concatenate([d.velocities for d in datasets])
                    if all(d.velocities is not None for d in datasets) else None),
        # one trajectory's dense segment is the reference for all (their times restart, so none is kept)
        dense=next((d.dense for d in datasets if d.dense is not None), None))


def validate(data: Dataset) -> None:
    """Raise :class:`DataError` naming the source when shapes or values are unusable."""
    name = data.source
    n_frames = len(data.positions)
    if n_frames == 0:
        raise DataError(f"{name}: contains no frames")
    if data.positions.ndim != 3 or data.positions.shape[2] != 3:
        raise DataError(f"{name}: positions must have shape [frames, atoms, 3], got {data.positions.shape}")
    n_atoms = data.positions.shape[1]
    if data.numbers.shape != (n_atoms,):
        raise DataError(f"{name}: atomic numbers must have shape [{n_atoms}], got {data.numbers.shape}")
    if data.energies.shape != (n_frames,):
        raise DataError(f"{name}: expected {n_frames} energies (one per frame), got {data.energies.shape[0]}")
    if data.forces.shape != data.positions.shape:
        raise DataError(f"{name}: forces have shape {data.forces.shape}, positions {data.positions.shape}")
    if data.cells is not None and data.cells.shape != (n_frames, 3, 3):
        raise DataError(f"{name}: cells must have shape [{n_frames}, 3, 3], got {data.cells.shape}")
    if data.times_fs is not None and data.times_fs.shape != (n_frames,):
        raise DataError(f"{name}: expected {n_frames} frame times, got {data.times_fs.shape[0]}")
    if data.velocities is not None and data.velocities.shape != data.positions.shape:
        raise DataError(f"{name}: velocities have shape {data.velocities.shape}, positions {data.positions.shape}")
    if data.dense is not None:
        if not np.array_equal(data.dense.numbers, data.numbers):
            raise DataError(f"{name}: its dense segment holds other atoms than its frames")
        if data.dense.velocities is None or data.dense.times_fs is None:
            raise DataError(f"{name}: its dense segment needs velocities and times (md_time_fs) in every frame")
    if (data.numbers < 1).any() or (data.numbers > 118).any():
        raise DataError(f"{name}: atomic numbers must lie in 1..118")
    for label, values in (("positions", data.positions), ("energies", data.energies),
                          ("forces", data.forces), ("cells", data.cells), ("velocities", data.velocities),
                          ("times", data.times_fs)):
        if values is None:
            continue
        bad = ~np.isfinite(values.reshape(n_frames, -1)).all(axis=1)
        if bad.any():
            frames = np.flatnonzero(bad)
            raise DataError(
                f"{name}: non-finite {label} in {bad.sum()} frame(s), first at frame {int(data.indices[frames[0]])}"
            )


def load_dataset(path: str | os.PathLike, units: Optional[str] = None, energy_key: str = "energy",
                 forces_key: str = "forces", index: str | slice = ":") -> Dataset:
    """Load frames with energies and forces from extended XYZ (or any ASE format) or MD17 ``.npz``.

    Parameters
    ----------
    path: the file.
    units: energy unit of the file (``eV``, ``kcal/mol``, ``kJ/mol``, ``Hartree``, ``meV``);
        forces are taken in that unit per Å. Default: eV for ASE formats, kcal/mol for ``.npz``.
    energy_key, forces_key: names of the energy and forces entries in extended XYZ files
        (``REF_energy``-style keys as written by some training codes).
    index: ASE frame selection for ASE formats (``":"`` = all frames).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected an extended XYZ or .npz file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".npz":
        return _with_origin(_load_md17(path, units or MD17_DEFAULT_ENERGY_UNIT), path)
    data = _load_ase(path, units or "eV", energy_key, forces_key, index)
    # a frame selection is a different set of frames, and its indices count from the selection
    return _with_origin(data, path) if index in (":", slice(None)) else data


def _load_md17(path: Path, units: str) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npz archive ({error})") from error
    with archive:
        arrays = {key: np.asarray(archive[key]) for key in archive.files}
    missing = [key for key in ("R", "z", "E", "F") if key not in arrays]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; MD17-style files need R, z, E, F "
                        f"(found {sorted(arrays)})")
    dense = {key for key in arrays if key.startswith(DENSE_PREFIX)}
    needed = [DENSE_PREFIX + key for key in ("R", "E", "F", "V", "t")]
    if dense and dense != set(needed):
        raise DataError(f"{path}: a dense segment needs the keys {needed}, found {sorted(dense)}")
    return _md17_frames(path, arrays, "", units,
                        dense=_md17_frames(path, arrays, DENSE_PREFIX, units) if dense else None)


def _md17_frames(path: Path, arrays: dict, prefix: str, units: str, dense: Optional[Dataset] = None) -> Dataset:
    """The frames of the MD17 keys ``prefix`` + R, E, F (and V, t when present) of ``arrays``, atoms ``z``, with
    the dense segment ``dense``."""
    factor = energy_factor(units)
    positions = np.asarray(arrays[prefix + "R"], dtype=np.float64)
    energies = np.asarray(arrays[prefix + "E"], dtype=np.float64)
    forces = np.asarray(arrays[prefix + "F"], dtype=np.float64)
    if energies.ndim == 2 and energies.shape[1] == 1:
        energies = energies[:, 0]
    if energies.ndim != 1:
        raise DataError(f"{path}: {prefix}E must have shape [frames] or [frames, 1], got {energies.shape}")
    if positions.ndim != 3 or positions.shape[0] != energies.shape[0]:
        raise DataError(f"{path}: {prefix}R has shape {positions.shape}; expected [{energies.shape[0]}, atoms, 3] "
                        f"to match {prefix}E")
    return Dataset(positions=positions, numbers=np.asarray(arrays["z"]).reshape(-1), energies=energies * factor,
                   forces=forces * factor, source=str(path),
                   velocities=arrays.get(prefix + "V"), times_fs=arrays.get(prefix + "t"), dense=dense)


def frames_fingerprint(data: Dataset) -> str:
    """SHA-256 of the frames themselves: atomic numbers, positions and cells (energies are left out, so that
    the same file read in other units is still the same frames, and frame indices keep their meaning)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(data.numbers, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(data.positions, dtype=np.float64).tobytes())
    if data.cells is not None:
        digest.update(np.ascontiguousarray(data.cells, dtype=np.float64).tobytes())
    return digest.hexdigest()


def data_record(data: Dataset) -> dict:
    """What a model or run records about its data: ``{"data": absolute path or source, "data_fingerprint", ...}``.

    For frames read from a file this is that file's record (whatever subset is at
    hand, since recorded frame indices refer to the whole file).
    """
    origin = data.origin or {"path": data.source, "fingerprint": frames_fingerprint(data), "frames": len(data),
                             "size_bytes": None}
    return {"data": origin["path"], "data_fingerprint": origin["fingerprint"], "data_frames": origin["frames"],
            "data_size_bytes": origin["size_bytes"], "data_numbers": [int(z) for z in data.numbers],
            "data_periodic": data.periodic}


def same_data(entry: Optional[dict], data: Dataset) -> bool:
    """Whether a recorded history entry (pretrain, refine) was made on the frames of ``data``'s file.

    Compares fingerprints; entries written before fingerprints were recorded fall back
    to comparing resolved paths.
    """
    if not entry:
        return False
    recorded = entry.get("data_fingerprint")
    if recorded is not None:
        return recorded == data_record(data)["data_fingerprint"]
    path = entry.get("data")
    if not path:
        return False
    try:
        return Path(path).resolve() == Path(data.origin["path"] if data.origin else data.source).resolve()
    except OSError:
        return False


def _with_origin(data: Dataset, path: Path) -> Dataset:
    data.origin = {"path": str(path.resolve()), "size_bytes": path.stat().st_size,
                   "fingerprint": frames_fingerprint(data), "frames": len(data)}
    return data


def read_ase_frames(path: Path, index: str | slice = ":", noun: str = "frames") -> list:
    """Every ``ase.Atoms`` of ``path`` at ``index``; :class:`DataError` naming the file if none can be read."""
    from ase.io import read

    try:
        frames = read(str(path), index=index)
    except Exception as error:  # ASE raises many types for unreadable files
        raise DataError(f"{path}: cannot be read by ASE ({type(error).__name__}: {error})") from error
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise DataError(f"{path}: contains no {noun}")
    return frames


def _load_ase(path: Path, units: str, energy_key: str, forces_key: str, index: str | slice) -> Dataset:
    frames = read_ase_frames(path, index)
    regular = [(k, atoms) for k, atoms in enumerate(frames) if atoms.info.get(SEGMENT_KEY) != DENSE_SEGMENT]
    dense = [(k, atoms) for k, atoms in enumerate(frames) if atoms.info.get(SEGMENT_KEY) == DENSE_SEGMENT]
    if not regular:
        raise DataError(f"{path}: holds only a dense segment ({SEGMENT_KEY}={DENSE_SEGMENT}), no frames")
    segment = _ase_frames(path, dense, frames[0], units, energy_key, forces_key) if dense else None
    return _ase_frames(path, regular, frames[0], units, energy_key, forces_key, dense=segment)


def _ase_frames(path: Path, frames: list, first, units: str, energy_key: str, forces_key: str,
                dense: Optional[Dataset] = None) -> Dataset:
    """A Dataset of ``frames``, (index in the file, ase.Atoms) of ``path``, checked against ``first``, the file's
    first frame, with the dense segment ``dense``."""
    from ase.units import fs

    factor = energy_factor(units)
    numbers = first.numbers.copy()
    periodic = _periodicity(path, first, 0)
    positions, energies, forces, cells, times, velocities = [], [], [], [], [], []
    for k, atoms in frames:
        if len(atoms) != len(numbers) or not np.array_equal(atoms.numbers, numbers):
            raise DataError(
                f"{path}: frame {k} has atoms {atoms.get_chemical_formula(mode='all')}, "
                f"frame 0 has {first.get_chemical_formula(mode='all')}; every frame needs the same atoms in "
                f"the same order"
            )
        if _periodicity(path, atoms, k) != periodic:
            raise DataError(f"{path}: frame {k} differs from frame 0 in periodicity")
        positions.append(atoms.positions)
        energies.append(_frame_energy(path, atoms, k, energy_key))
        forces.append(_frame_forces(path, atoms, k, forces_key))
        if periodic:
            cells.append(np.asarray(atoms.cell))
        times.append(atoms.info.get("md_time_fs"))
        velocities.append(atoms.get_velocities() * fs if "momenta" in atoms.arrays else None)
    timed = all(isinstance(t, (int, float)) and np.isfinite(t) for t in times)
    moving = all(v is not None for v in velocities)
    return Dataset(
        positions=np.array(positions), numbers=numbers, energies=np.array(energies) * factor,
        forces=np.array(forces) * factor, cells=np.array(cells) if periodic else None, source=str(path),
        times_fs=np.array(times, dtype=np.float64) if timed else None,
        velocities=np.array(velocities) if moving else None, dense=dense,
    )


def _periodicity(path: Path, atoms, k: int) -> bool:
    pbc = np.asarray(atoms.pbc)
    if pbc.all():
        if atoms.cell.rank < 3:
            raise DataError(f"{path}: frame {k} is periodic but its cell is degenerate")
        return True
    if pbc.any():
        raise DataError(f"{path}: frame {k} is periodic along some axes only (pbc={pbc.tolist()}); "
                        f"stable-md supports molecules (no pbc) or fully periodic boxes")
    return False


def _frame_energy(path: Path, atoms, k: int, key: str) -> float:
    if key in atoms.info:
        return float(atoms.info[key])
    if key == "energy" and atoms.calc is not None:
        try:
            return float(atoms.get_potential_energy())
        except Exception:
            pass
    raise DataError(f"{path}: frame {k} has no energy (looked for '{key}'; set the key with energy_key=/"
                    f"--energy-key)")


def _frame_forces(path: Path, atoms, k: int, key: str) -> np.ndarray:
    if key in atoms.arrays:
        values = np.asarray(atoms.arrays[key], dtype=np.float64)
    elif key == "forces" and atoms.calc is not None and "forces" in getattr(atoms.calc, "results", {}):
        values = np.asarray(atoms.calc.results["forces"], dtype=np.float64)
    else:
        raise DataError(f"{path}: frame {k} has no forces (looked for '{key}'; set the key with forces_key=/"
                        f"--forces-key)")
    if values.shape != (len(atoms), 3):
        raise DataError(f"{path}: frame {k} forces have shape {values.shape}, expected ({len(atoms)}, 3)")
    return values
