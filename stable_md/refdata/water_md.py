"""Reference data for liquid water: flexible SPC/Fw in OpenMM (``stable-md data water``).

N molecules in a cubic box at a given density, Langevin thermostat at constant volume
(the OpenMM side is :class:`openmm_bridge.water_box.WaterSimulation`). Every ``every``
steps a frame is appended to an extended XYZ file with the potential energy (eV) and
forces (eV/Å), the box and molecules wrapped into it. Resuming: after every frame the
simulation is checkpointed atomically next to the output (``<output>.checkpoint.npz``),
so a killed run continues where it stopped.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from stable_md.files import atomic_write
from stable_md.refdata.frame_file import append_text, split_complete_frames, write_atomically

_SETTING_KEYS = ("md_temperature_K", "md_timestep_fs", "md_friction_per_ps", "md_every", "md_seed",
                 "md_equilibration_steps", "water_molecules", "water_density_g_cm3")


def run_water_md(output: str | os.PathLike, n_molecules: int = 64, density: float = 0.997,
                 temperature: float = 300.0, timestep_fs: float = 1.0, friction: float = 1.0, n_frames: int = 1000,
                 every: int = 100, equilibration_steps: int = 20_000, seed: int = 0, resume: bool = True,
                 progress: bool = True, platform: str = "CPU") -> Path:
    """Simulate SPC/Fw water and write ``n_frames`` labelled frames to ``output`` (extended XYZ); returns the path.

    Units: K, fs, 1/ps (friction), g/cm³. With ``resume`` an existing output of the same
    settings is continued from its checkpoint; otherwise an existing file is refused.
    """
    from openmm_bridge.water_box import WaterSimulation

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
    water = WaterSimulation(n_molecules, density, temperature, timestep_fs, friction, seed, platform)

    n_done = 0
    if output.exists():
        if not resume:
            raise FileExistsError(f"{output} exists; pass resume to continue it or choose another file")
        n_done = _resume(output, checkpoint, water, settings)
        if n_done >= n_frames:
            return output
    else:
        if checkpoint.exists():
            raise FileExistsError(f"{checkpoint} exists without {output}; delete it or choose another output")
        output.parent.mkdir(parents=True, exist_ok=True)
        water.start()
        _steps(water, equilibration_steps, "equilibration", progress)

    from tqdm import tqdm

    with tqdm(total=n_frames, initial=n_done, unit="frame", desc=f"SPC/Fw water {output.name}",
              disable=not progress) as bar:
        for frame in range(n_done + 1, n_frames + 1):
            water.step(every)
            _save_checkpoint(checkpoint, water, frame)
            append_text(output, _frame_text(water, settings, frame))
            bar.update(1)
    return output


def _steps(water, n_steps: int, label: str, progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=n_steps, unit="step", desc=label, disable=not progress or n_steps == 0) as bar:
        left = n_steps
        while left > 0:
            chunk = min(1000, left)
            water.step(chunk)
            bar.update(chunk)
            left -= chunk


def _frame_text(water, settings: dict, frame: int) -> str:
    """One extxyz frame: wrapped positions (Å), energy (eV), forces (eV/Å), box, run settings."""
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    positions, energy, forces = water.labelled_frame()
    if not (np.isfinite(energy) and np.isfinite(forces).all()):
        raise FloatingPointError(f"SPC/Fw water gave non-finite energy or forces at frame {frame}")
    every = settings["md_every"]
    info = dict(settings, md_step=frame * every, md_time_fs=frame * every * settings["md_timestep_fs"])
    atoms = ase.Atoms(numbers=water.numbers, positions=positions, cell=water.cell, pbc=True, info=info)
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    buffer = io.StringIO()
    ase.io.write(buffer, atoms, format="extxyz")
    return buffer.getvalue()


def _save_checkpoint(path: Path, water, frame: int) -> None:
    arrays = {"frame": np.array(frame), "context": np.frombuffer(water.checkpoint(), dtype=np.uint8)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def _resume(output: Path, checkpoint: Path, water, settings: dict) -> int:
    """Restore the simulation from the checkpoint and bring the file to the checkpoint's frame; returns frames done."""
    import ase.io

    numbers = water.numbers
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
        water.load(saved["context"].tobytes())
    if frame == len(frames) + 1:
        # Killed between the checkpoint and the frame it belongs to: write that frame now.
        append_text(output, _frame_text(water, settings, frame))
    elif frame != len(frames):
        raise ValueError(f"cannot resume {output}: it holds {len(frames)} frames but its checkpoint is at "
                         f"frame {frame}")
    return frame
