"""Reference data for liquid water: flexible SPC/Fw in OpenMM (``stable-md data water``).

N molecules in a cubic box at a given density, PME electrostatics, Langevin
thermostat at constant volume. Every ``every`` steps a frame is appended to an
extended XYZ file with the OpenMM potential energy (eV) and forces (eV/Å), the box
and molecules wrapped into it. The force field is ``forcefields/spcfw.xml``
(Wu, Tepper & Voth 2006; OpenMM ships none). Resuming: after every frame the
Context is checkpointed atomically next to the output (``<output>.checkpoint.npz``),
so a killed run continues where it stopped.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
import numpy as np
import openmm
from openmm import app, unit

from stable_md.potentials.model_file import atomic_write
from stable_md.refdata.frame_file import append_text, split_complete_frames, write_atomically

FORCEFIELD = Path(__file__).with_name("forcefields") / "spcfw.xml"
WATER_MASS_AMU = 18.01528
AVOGADRO = 6.02214076e23
KJ_PER_MOL_IN_EV = 0.010364269656262174
# SPC/Fw equilibrium geometry (Å, degrees), used to build the starting box.
OH_LENGTH = 1.012
HOH_ANGLE = 113.24
_SETTING_KEYS = ("md_temperature_K", "md_timestep_fs", "md_friction_per_ps", "md_every", "md_seed",
                 "md_equilibration_steps", "water_molecules", "water_density_g_cm3")


def box_length(n_molecules: int, density: float) -> float:
    """Edge (Å) of the cubic box holding ``n_molecules`` waters at ``density`` g/cm³."""
    volume_cm3 = n_molecules * WATER_MASS_AMU / (density * AVOGADRO)
    return (volume_cm3 * 1e24) ** (1.0 / 3.0)


def build_box(n_molecules: int, density: float, seed: int = 0) -> tuple[app.Topology, np.ndarray, float]:
    """Randomly oriented waters on a grid: topology, positions [3n, 3] Å (O, H1, H2 each) and box edge (Å)."""
    if n_molecules < 2:
        raise ValueError(f"a water box needs at least 2 molecules, got {n_molecules}")
    if not density > 0:
        raise ValueError(f"density must be > 0 g/cm³, got {density}")
    length = box_length(n_molecules, density)
    per_side = int(np.ceil(n_molecules ** (1.0 / 3.0)))
    spacing = length / per_side
    rng = np.random.default_rng(seed)
    sites = np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    sites = sites[rng.permutation(len(sites))[:n_molecules]]
    half = np.radians(HOH_ANGLE) / 2
    local = np.array([[0.0, 0.0, 0.0],
                      [OH_LENGTH * np.sin(half), 0.0, OH_LENGTH * np.cos(half)],
                      [-OH_LENGTH * np.sin(half), 0.0, OH_LENGTH * np.cos(half)]])
    positions = []
    for site in sites:
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        positions.append((site + 0.5) * spacing + local @ rotation.T)
    topology = app.Topology()
    chain = topology.addChain()
    oxygen, hydrogen = app.Element.getBySymbol("O"), app.Element.getBySymbol("H")
    for _ in range(n_molecules):
        residue = topology.addResidue("HOH", chain)
        o = topology.addAtom("O", oxygen, residue)
        h1 = topology.addAtom("H1", hydrogen, residue)
        h2 = topology.addAtom("H2", hydrogen, residue)
        topology.addBond(o, h1)
        topology.addBond(o, h2)
    topology.setPeriodicBoxVectors(np.eye(3) * length / 10.0 * unit.nanometer)
    return topology, np.concatenate(positions), length


def water_system(topology: app.Topology, length: float) -> openmm.System:
    """SPC/Fw System with PME; real-space cutoff min(9 Å, 0.49 box) and a long-range LJ correction."""
    forcefield = app.ForceField(str(FORCEFIELD))
    cutoff = min(0.9, 0.49 * length / 10.0)
    system = forcefield.createSystem(topology, nonbondedMethod=app.PME, nonbondedCutoff=cutoff * unit.nanometer,
                                     constraints=None, rigidWater=False)
    for force in system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            force.setUseDispersionCorrection(True)
            force.setEwaldErrorTolerance(1e-5)
    return system


def run_water_md(output: str | os.PathLike, n_molecules: int = 64, density: float = 0.997,
                 temperature: float = 300.0, timestep_fs: float = 1.0, friction: float = 1.0, n_frames: int = 1000,
                 every: int = 100, equilibration_steps: int = 20_000, seed: int = 0, resume: bool = True,
                 progress: bool = True, platform: str = "CPU") -> Path:
    """Simulate SPC/Fw water and write ``n_frames`` labelled frames to ``output`` (extended XYZ); returns the path.

    Units: K, fs, 1/ps (friction), g/cm³. With ``resume`` an existing output of the same
    settings is continued from its checkpoint; otherwise an existing file is refused.
    """
    output = Path(output)
    for name, value, low in (("n_frames", n_frames, 1), ("every", every, 1),
                             ("equilibration_steps", equilibration_steps, 0), ("seed", seed, 0)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, value in (("temperature", temperature), ("timestep_fs", timestep_fs), ("friction", friction)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    settings = {"md_temperature_K": float(temperature), "md_timestep_fs": float(timestep_fs),
                "md_friction_per_ps": float(friction), "md_every": int(every), "md_seed": int(seed),
                "md_equilibration_steps": int(equilibration_steps), "water_molecules": int(n_molecules),
                "water_density_g_cm3": float(density)}
    checkpoint = output.with_name(output.name + ".checkpoint.npz")
    topology, positions, length = build_box(n_molecules, density, seed)
    system = water_system(topology, length)
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, friction / unit.picosecond,
                                                 timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(seed + 1)
    properties = {"Threads": "1"} if platform == "CPU" else {}
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform), properties)
    numbers = np.array([8, 1, 1] * n_molecules)
    cell = np.eye(3) * length

    n_done = 0
    if output.exists():
        if not resume:
            raise FileExistsError(f"{output} exists; pass resume to continue it or choose another file")
        n_done = _resume(output, checkpoint, context, settings, numbers, cell)
        if n_done >= n_frames:
            return output
    else:
        if checkpoint.exists():
            raise FileExistsError(f"{checkpoint} exists without {output}; delete it or choose another output")
        output.parent.mkdir(parents=True, exist_ok=True)
        context.setPositions(positions / 10.0 * unit.nanometer)
        openmm.LocalEnergyMinimizer.minimize(context, 10.0, 1000)
        context.setVelocitiesToTemperature(temperature * unit.kelvin, seed + 1)
        _steps(integrator, equilibration_steps, "equilibration", progress)

    from tqdm import tqdm

    with tqdm(total=n_frames, initial=n_done, unit="frame", desc=f"SPC/Fw water {output.name}",
              disable=not progress) as bar:
        for frame in range(n_done + 1, n_frames + 1):
            integrator.step(every)
            _save_checkpoint(checkpoint, context, frame)
            append_text(output, _frame_text(context, numbers, cell, settings, frame))
            bar.update(1)
    return output


def _steps(integrator, n_steps: int, label: str, progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=n_steps, unit="step", desc=label, disable=not progress or n_steps == 0) as bar:
        left = n_steps
        while left > 0:
            chunk = min(1000, left)
            integrator.step(chunk)
            bar.update(chunk)
            left -= chunk


def _frame_text(context: openmm.Context, numbers: np.ndarray, cell: np.ndarray, settings: dict, frame: int) -> str:
    """One extxyz frame: wrapped positions (Å), energy (eV), forces (eV/Å), box, run settings."""
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    state = context.getState(getPositions=True, getEnergy=True, getForces=True, enforcePeriodicBox=True)
    positions = state.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) * KJ_PER_MOL_IN_EV
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.angstrom)
    forces = np.asarray(forces) * KJ_PER_MOL_IN_EV
    if not (np.isfinite(energy) and np.isfinite(forces).all()):
        raise FloatingPointError(f"SPC/Fw water gave non-finite energy or forces at frame {frame}")
    every = settings["md_every"]
    info = dict(settings, md_step=frame * every, md_time_fs=frame * every * settings["md_timestep_fs"])
    atoms = ase.Atoms(numbers=numbers, positions=np.asarray(positions), cell=cell, pbc=True, info=info)
    atoms.calc = SinglePointCalculator(atoms, energy=float(energy), forces=forces)
    buffer = io.StringIO()
    ase.io.write(buffer, atoms, format="extxyz")
    return buffer.getvalue()


def _save_checkpoint(path: Path, context: openmm.Context, frame: int) -> None:
    arrays = {"frame": np.array(frame), "context": np.frombuffer(context.createCheckpoint(), dtype=np.uint8)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def _resume(output: Path, checkpoint: Path, context: openmm.Context, settings: dict, numbers: np.ndarray,
            cell: np.ndarray) -> int:
    """Restore the Context from the checkpoint and bring the file to the checkpoint's frame; returns frames done."""
    import ase.io

    kept, truncated = split_complete_frames(output)
    if truncated:
        write_atomically(output, kept)
    frames = ase.io.read(io.StringIO(kept), index=":", format="extxyz") if kept else []
    for k, atoms in enumerate(frames, start=1):
        if len(atoms) != len(numbers) or not np.array_equal(atoms.numbers, numbers):
            raise ValueError(f"{output}, frame {k}: holds other atoms than {len(numbers) // 3} SPC/Fw waters; "
                             f"use the same --molecules to resume, or write to a new file")
        for key in _SETTING_KEYS:
            if not np.isclose(float(atoms.info.get(key, np.nan)), float(settings[key]), rtol=1e-9, atol=0.0):
                raise ValueError(f"{output}, frame {k}: was made with {key}={atoms.info.get(key)}, this run asks for "
                                 f"{key}={settings[key]}; use the same settings to resume, or write to a new file")
    if not checkpoint.exists():
        raise FileNotFoundError(f"cannot resume {output}: its checkpoint {checkpoint} is missing")
    with np.load(checkpoint) as saved:
        frame = int(saved["frame"])
        context.loadCheckpoint(saved["context"].tobytes())
    if frame == len(frames) + 1:
        # Killed between the checkpoint and the frame it belongs to: write that frame now.
        append_text(output, _frame_text(context, numbers, cell, settings, frame))
    elif frame != len(frames):
        raise ValueError(f"cannot resume {output}: it holds {len(frames)} frames but its checkpoint is at "
                         f"frame {frame}")
    return frame

