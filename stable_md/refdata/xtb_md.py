"""GFN2-xTB reference data: Langevin MD with tblite, frames to extended XYZ.

Typical use, from the shell::

    python -m stable_md.refdata.xtb_md --smiles CCO -o data/ethanol_xtb_500K.extxyz

or from Python::

    atoms = molecule_from_smiles("CCO")
    run_xtb_md(atoms, Path("ethanol.extxyz"), temperature_K=500.0, n_frames=500)

Each frame of the output holds positions (Å), the GFN2-xTB energy (eV) and
forces (eV/Å) as a single-point result, so ``ase.io.read(path, ":")`` returns
atoms whose ``get_potential_energy()`` / ``get_forces()`` give them back. The
momenta are stored too (column ``momenta``, ASE units amu·Å/t_ASE with
t_ASE = 1/ase.units.fs ≈ 10.18 fs; ``atoms.get_velocities()`` turns them into
Å/t_ASE), together with the run settings in the comment line, so that an
interrupted run resumes the same trajectory.

Reproducibility: the random numbers between frame ``i-1`` and frame ``i`` come
from ``numpy.random.default_rng([seed, i])`` and every frame restarts the xTB
calculator from the stored (rounded) positions, so a resumed run continues
exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import os

# tblite's OpenMP runtime reads OMP_NUM_THREADS once, when the shared library
# is loaded, and on small molecules two threads are ~5x slower than one on
# these machines. So set it here, before tblite is imported (lazily, in
# ``_make_calculator``); a value the user exported wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import inspect
import io
import math
import sys
import warnings
from pathlib import Path
from typing import Sequence

import ase
import ase.io
import numpy as np
from ase import units as ase_units
from ase.calculators.calculator import CalculationFailed
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation

try:  # ase >= 3.29 deprecates MaxwellBoltzmannDistribution for this name
    from ase.md.velocitydistribution import thermalize_momenta as _thermalize
except ImportError:  # older ase
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as _mb

    def _thermalize(atoms: ase.Atoms, temperature_K: float, *, rng=None) -> None:
        _mb(atoms, temperature_K=temperature_K, rng=rng)
from tqdm import tqdm

from stable_md.refdata.frame_file import append_text as _append_text
from stable_md.refdata.frame_file import split_complete_frames as _split_complete_frames
from stable_md.refdata.frame_file import write_atomically as _write_atomically

__all__ = ["run_xtb_md", "molecule_from_smiles", "main"]

# Hamiltonians tblite knows (tblite.interface.Calculator._loader).
XTB_METHODS: tuple[str, ...] = ("GFN2-xTB", "GFN1-xTB", "IPEA1-xTB")

# Run settings stored in every frame's comment line. A resumed run must use the
# same values, otherwise one file would silently mix two ensembles.
_SETTING_KEYS: tuple[str, ...] = (
    "xtb_method",
    "md_temperature_K",
    "md_timestep_fs",
    "md_friction_per_fs",
    "md_every",
    "md_seed",
    "md_equilibration_steps",
)

# Only newer ASE versions have ``fixcm``; where it exists it must be switched
# off, because its COM correction overheats small molecules (FixCom does it
# right).
_LANGEVIN_KWARGS: dict[str, bool] = (
    {"fixcm": False} if "fixcm" in inspect.signature(Langevin.__init__).parameters else {}
)


def _make_calculator(method: str):
    """A fresh, silent tblite calculator for ``method`` (electronic T default, 300 K)."""
    from tblite.ase import TBLite  # lazy: OMP_NUM_THREADS is set above

    return TBLite(method=method, accuracy=1.0, verbosity=0)


def _segment_rng(seed: int, segment: int) -> np.random.Generator:
    """Random numbers of one stretch of MD: 0 = equilibration, i = up to frame i."""
    return np.random.default_rng([seed, segment])


def _settings(
    method: str,
    temperature_K: float,
    timestep_fs: float,
    friction_per_fs: float,
    every: int,
    seed: int,
    equilibration_steps: int,
) -> dict[str, object]:
    return {
        "xtb_method": method,
        "md_temperature_K": float(temperature_K),
        "md_timestep_fs": float(timestep_fs),
        "md_friction_per_fs": float(friction_per_fs),
        "md_every": int(every),
        "md_seed": int(seed),
        "md_equilibration_steps": int(equilibration_steps),
    }


def _frame_text(state: ase.Atoms, info: dict[str, object], energy=None, forces=None) -> str:
    """One extxyz frame (positions, momenta, optional energy/forces) as text."""
    frame = ase.Atoms(
        numbers=state.numbers,
        positions=state.positions,
        momenta=state.get_momenta(),
        cell=state.cell,
        pbc=state.pbc,
        info=dict(info),
    )
    # Total charge and unpaired electrons travel with the frame so that a
    # single point on it reproduces the stored energy.
    if state.has("initial_charges"):
        frame.set_initial_charges(state.get_initial_charges())
    if state.has("initial_magmoms"):
        frame.set_initial_magnetic_moments(state.get_initial_magnetic_moments())
    if energy is not None:
        frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
    buffer = io.StringIO()
    ase.io.write(buffer, frame, format="extxyz")
    return buffer.getvalue()


def _snap_to_file_precision(state: ase.Atoms) -> None:
    """Round positions and momenta to exactly what the extxyz file will hold.

    The trajectory then continues from the stored numbers, so a run resumed
    from the file is the same as the uninterrupted one.
    """
    text = _frame_text(state, {})
    stored = ase.io.read(io.StringIO(text), format="extxyz")
    # apply_constraint=False: FixCom would shift the rounded positions back to
    # the old (unrounded) centre of mass.
    state.set_positions(stored.positions, apply_constraint=False)
    state.set_momenta(stored.get_momenta(), apply_constraint=False)


def _read_existing(path: Path, template: ase.Atoms, settings: dict[str, object]) -> tuple[list[ase.Atoms], str, bool]:
    """Frames already in ``path``, checked against the atoms and settings of this run.

    Returns the frames, their text and whether a truncated tail was found.
    Raises ``ValueError`` naming the file when it cannot be continued.
    """
    kept, truncated = _split_complete_frames(path)
    if not kept:
        return [], kept, truncated
    try:
        frames = ase.io.read(io.StringIO(kept), index=":", format="extxyz")
    except Exception as exc:  # ase raises many types on malformed input
        raise ValueError(f"{path}: cannot be read as extended XYZ ({exc})") from exc
    every = int(settings["md_every"])
    for k, frame in enumerate(frames, start=1):
        where = f"{path}, frame {k}"
        if frame.get_chemical_symbols() != template.get_chemical_symbols():
            raise ValueError(
                f"{where}: atoms {frame.get_chemical_formula()} differ from the requested "
                f"{template.get_chemical_formula()} (same elements in the same order needed to resume)"
            )
        if frame.calc is None or "forces" not in frame.calc.results or not frame.has("momenta"):
            raise ValueError(f"{where}: no energy, forces or momenta; not written by run_xtb_md")
        for key, wanted in settings.items():
            found = frame.info.get(key)
            same = (
                found == wanted
                if isinstance(wanted, str)
                else found is not None and np.isclose(float(found), float(wanted), rtol=1e-9, atol=0.0)
            )
            if not same:
                raise ValueError(
                    f"{where}: was made with {key}={found}, this run asks for {key}={wanted}; "
                    "use the same settings to resume, or write to a new file"
                )
        if int(frame.info.get("md_step", -1)) != k * every:
            raise ValueError(f"{where}: md_step={frame.info.get('md_step')!r}, expected {k * every}")
    return frames, kept, truncated


def run_xtb_md(
    atoms: ase.Atoms,
    output: Path,
    temperature_K: float = 500.0,
    n_frames: int = 500,
    every: int = 20,
    timestep_fs: float = 0.5,
    friction_per_fs: float = 0.01,
    equilibration_steps: int = 2000,
    seed: int = 0,
    method: str = "GFN2-xTB",
    progress: bool = True,
    resume: bool = True,
) -> Path:
    """Run Langevin MD with tblite xTB and write frames to extended XYZ.

    Parameters
    ----------
    atoms : ase.Atoms
        Starting structure (Å). It is copied, never modified; its constraints
        are replaced by ``FixCom``. Initial charges / magnetic moments set the
        total charge / unpaired electrons for tblite.
    output : Path
        Extended XYZ file; frames are appended as they are made.
    temperature_K : float
        Thermostat temperature (K), also used for the initial velocities.
    n_frames : int
        Number of frames the file holds when the run ends.
    every : int
        MD steps between stored frames.
    timestep_fs : float
        Integration time step (fs).
    friction_per_fs : float
        Langevin friction (1/fs); 0.01 fs⁻¹ is a coupling time of 100 fs.
    equilibration_steps : int
        Steps run (not stored) before the first frame.
    seed : int
        Seed (≥ 0) of the initial velocities and of the Langevin noise.
    method : str
        tblite Hamiltonian: "GFN2-xTB", "GFN1-xTB" or "IPEA1-xTB".
    progress : bool
        Show tqdm progress bars.
    resume : bool
        Continue an existing ``output`` (same atoms and settings) up to
        ``n_frames``. With False an existing file raises FileExistsError.

    Returns
    -------
    Path
        ``output``.

    Notes
    -----
    Energies are in eV and forces in eV/Å (raw xTB forces, not projected by
    the FixCom constraint). Frame ``i`` is ``i * every`` steps after the end of
    equilibration (``md_step`` and ``md_time_fs`` in its comment line).
    """
    output = Path(output)
    if not isinstance(atoms, ase.Atoms):
        raise TypeError(f"atoms must be an ase.Atoms, got {type(atoms).__name__}")
    if len(atoms) < 2:
        raise ValueError(f"atoms: need at least 2 atoms for MD with a fixed centre of mass, got {len(atoms)}")
    if method not in XTB_METHODS:
        raise ValueError(f"method: unknown xTB method {method!r}; expected one of {XTB_METHODS}")
    if not temperature_K > 0:
        raise ValueError(f"temperature_K must be > 0 K, got {temperature_K}")
    if not timestep_fs > 0:
        raise ValueError(f"timestep_fs must be > 0 fs, got {timestep_fs}")
    if not friction_per_fs >= 0:
        raise ValueError(f"friction_per_fs must be >= 0 1/fs, got {friction_per_fs}")
    for name, value, low in (("n_frames", n_frames, 1), ("every", every, 1),
                             ("equilibration_steps", equilibration_steps, 0), ("seed", seed, 0)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    settings = _settings(method, temperature_K, timestep_fs, friction_per_fs, every, seed, equilibration_steps)

    state = atoms.copy()
    state.calc = None
    state.set_constraint(FixCom())

    n_done = 0
    if output.exists():
        if not resume:
            raise FileExistsError(f"{output} exists; pass resume=True to continue it or choose another file")
        frames, kept, truncated = _read_existing(output, state, settings)
        if truncated:
            warnings.warn(
                f"{output}: dropped an incomplete last frame (interrupted write); "
                f"continuing after frame {len(frames)}",
                RuntimeWarning,
                stacklevel=2,
            )
            _write_atomically(output, kept)
        n_done = len(frames)
        if n_done >= n_frames:
            return output
        if n_done > 0:
            last = frames[-1]
            state.set_positions(last.positions, apply_constraint=False)
            state.set_momenta(last.get_momenta(), apply_constraint=False)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)

    dt = timestep_fs * ase_units.fs
    friction = friction_per_fs / ase_units.fs

    def langevin(rng: np.random.Generator) -> Langevin:
        return Langevin(state, dt, temperature_K=temperature_K, friction=friction, rng=rng, **_LANGEVIN_KWARGS)

    state.calc = _make_calculator(method)
    if n_done == 0:
        rng = _segment_rng(seed, 0)
        _thermalize(state, temperature_K, rng=rng)  # Maxwell-Boltzmann momenta
        # Start without drift or overall spin: FixCom keeps the centre of mass
        # still from here on, and the bath brings rotation to temperature
        # during equilibration instead of a random initial spin.
        Stationary(state)
        ZeroRotation(state)
        dyn = langevin(rng)
        chunk = 100
        with tqdm(total=equilibration_steps, desc="equilibration", unit="step", disable=not progress) as bar:
            left = equilibration_steps
            while left > 0:
                n = min(chunk, left)
                dyn.run(n)
                bar.update(n)
                left -= n

    with tqdm(total=n_frames, initial=n_done, desc=f"xTB MD {output.name}", unit="frame",
              disable=not progress) as bar:
        for i in range(n_done + 1, n_frames + 1):
            try:
                langevin(_segment_rng(seed, i)).run(every)
                _snap_to_file_precision(state)
                # Restart the calculator from the stored geometry: its SCF
                # guess then no longer depends on history, so a resumed run is
                # identical to an uninterrupted one.
                state.calc = _make_calculator(method)
                energy = state.get_potential_energy()
                forces = state.get_forces(apply_constraint=False)
            except CalculationFailed as exc:
                raise CalculationFailed(
                    f"{output}: xTB failed on the way to frame {i} ({exc}); "
                    f"the {i - 1} frames before it are saved"
                ) from exc
            if not (np.isfinite(energy) and np.all(np.isfinite(forces))):
                raise FloatingPointError(f"{output}: xTB gave non-finite energy/forces at frame {i}")
            info = dict(settings, md_step=i * every, md_time_fs=i * every * float(timestep_fs))
            _append_text(output, _frame_text(state, info, energy, forces))
            bar.update(1)
    return output


def molecule_from_smiles(smiles: str, seed: int = 0) -> ase.Atoms:
    """3D structure (Å) of a SMILES string with hydrogens, from RDKit ETKDG + MMFF.

    Parameters
    ----------
    smiles : str
        The molecule, e.g. ``"CCO"``; several fragments (``"O.O"``) are allowed.
    seed : int
        Seed (≥ 0) of the conformer embedding.

    Returns
    -------
    ase.Atoms
        Non-periodic atoms. Formal charges are set as initial charges and
        radical electrons as initial magnetic moments, which tblite uses as
        total charge and number of unpaired electrons.

    Raises
    ------
    ValueError
        Naming the SMILES, when RDKit cannot parse or embed it.
    """
    from rdkit import Chem, rdBase
    from rdkit.Chem import AllChem

    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(smiles, str) or not smiles.strip():
        raise ValueError(f"SMILES {smiles!r} is empty")
    # RDKit prints parse errors to stderr; the ValueError below says it instead.
    _blocker = rdBase.BlockLogs()
    mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        raise ValueError(f"RDKit cannot parse SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    if AllChem.EmbedMolecule(mol, params) != 0:
        # Strained or large molecules often embed only from random coordinates.
        params.useRandomCoords = True
        if AllChem.EmbedMolecule(mol, params) != 0:
            raise ValueError(f"RDKit cannot embed SMILES {smiles!r} in 3D")
    # A force-field cleanup gives xTB a sensible start; MMFF lacks parameters
    # for some elements, where UFF still works.
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    elif AllChem.UFFHasAllMoleculeParams(mol):
        AllChem.UFFOptimizeMolecule(mol, maxIters=2000)
    del _blocker
    positions = mol.GetConformer().GetPositions()
    atoms = ase.Atoms(
        numbers=[a.GetAtomicNum() for a in mol.GetAtoms()],
        positions=positions,
    )
    charges = [a.GetFormalCharge() for a in mol.GetAtoms()]
    if any(charges):
        atoms.set_initial_charges(charges)
    radicals = [a.GetNumRadicalElectrons() for a in mol.GetAtoms()]
    if any(radicals):
        atoms.set_initial_magnetic_moments(radicals)
    atoms.info["smiles"] = smiles
    return atoms


DESCRIPTION = ("Langevin MD with tblite xTB (GFN2-xTB by default) of a molecule from a SMILES string (RDKit 3D "
               "structure) or a structure file; writes frames with energies (eV), forces (eV/Å) and momenta to "
               "extended XYZ, one frame at a time, and resumes an existing output file. Runs with one OpenMP "
               "thread (tblite is 5-10x slower with two on small molecules): start two runs with different "
               "--seed to use two cores.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``stable-md data xtb-md`` (and ``python -m stable_md.refdata.xtb_md``)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--smiles", help="molecule as SMILES (3D structure from RDKit)")
    source.add_argument("--structure", type=Path, help="starting structure, any file ASE reads (first frame)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="extended XYZ file to write")
    parser.add_argument("--temperature", type=float, default=500.0, help="temperature in K (default 500)")
    parser.add_argument("--frames", type=int, default=500, help="number of frames (default 500)")
    parser.add_argument("--every", type=int, default=20, help="MD steps between frames (default 20)")
    parser.add_argument("--timestep", type=float, default=0.5, help="time step in fs (default 0.5)")
    parser.add_argument("--friction", type=float, default=10.0,
                        help="Langevin friction in 1/ps, as in every stable-md command (default 10, a coupling "
                             "time of 100 fs; before 2026-12 this option was in 1/fs: 0.01/fs = 10/ps)")
    parser.add_argument("--equilibration", type=int, default=2000,
                        help="unstored equilibration steps (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--method", default="GFN2-xTB", choices=XTB_METHODS, help="xTB Hamiltonian")
    parser.add_argument("--no-resume", action="store_true",
                        help="fail if the output exists instead of continuing it")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_from_arguments(args: argparse.Namespace) -> int:
    """Check parsed options, build the molecule and run; ``ValueError`` names a bad option."""
    for name in ("temperature", "timestep"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    for name, low in (("frames", 1), ("every", 1), ("equilibration", 0), ("seed", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not (math.isfinite(args.friction) and args.friction >= 0):
        raise ValueError(f"--friction must be a finite number >= 0 (1/ps), got {args.friction}")
    if 0 < args.friction < 0.1:
        # 0.01 was the documented value when the option was in 1/fs: say what it means now
        print(f"stable-md data xtb-md: --friction {args.friction:g} is in 1/ps (a coupling time of "
              f"{1 / args.friction:g} ps); the option was in 1/fs before 2026-12, where 0.01 meant 10/ps",
              file=sys.stderr)
    if args.smiles is not None:
        try:
            atoms = molecule_from_smiles(args.smiles, seed=args.seed)
        except ValueError as exc:
            raise ValueError(f"--smiles: {exc}") from exc
    else:
        if not args.structure.is_file():
            raise FileNotFoundError(f"--structure: no such file {str(args.structure)!r}")
        try:
            atoms = ase.io.read(args.structure, index=0)
        except Exception as exc:  # ase raises many types for unreadable files
            raise ValueError(f"--structure: cannot read {str(args.structure)!r}: {exc}") from exc
    run_xtb_md(atoms, args.output, temperature_K=args.temperature, n_frames=args.frames, every=args.every,
               timestep_fs=args.timestep, friction_per_fs=args.friction / 1000.0, equilibration_steps=args.equilibration,
               seed=args.seed, method=args.method, progress=not args.quiet, resume=not args.no_resume)
    print(f"wrote {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (same as ``stable-md data xtb-md``); returns 0, or 1 with a message."""
    parser = argparse.ArgumentParser(prog="python -m stable_md.refdata.xtb_md", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_arguments(args)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
