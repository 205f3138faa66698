"""Labelled frames from an OpenMM simulation, written one at a time to a resumable extended XYZ file.

The loop behind ``stable-md data water`` and ``stable-md data amber-peptide``: equilibrate, then every
``every`` steps append a frame with the potential energy (eV) and forces (eV/Å). After every frame the
simulation is checkpointed atomically next to the output (``<output>.checkpoint.npz``), so a killed run
continues where it stopped, and a later run with more frames extends the same trajectory. Each frame
records the run's settings, its step and its time (``md_time_fs``: evaluate measures the data's own
diffusivity from it).

After the regular frames, ``dense_frames`` frames may follow at every step, marked ``md_segment=dense`` and
carrying velocities (``momenta``): the dense segment, from which evaluate takes the reference velocity
autocorrelation function. Readers (:func:`stable_md.data.load_dataset`) keep it apart from the frames, so it
never becomes training data. A file that has its dense segment is complete: it cannot be extended by more
regular frames, since its trajectory has moved on.

A simulation is anything with ``numbers`` [N], ``cell`` ([3, 3] Å or None), ``start()``, ``step(n)``,
``labelled_frame()`` -> (positions Å, energy eV, forces eV/Å), ``velocities()`` -> Å/fs,
``checkpoint()`` -> bytes and ``load(bytes)``; :class:`openmm_bridge.water_box.WaterSimulation` is one.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np

from stable_md.data import DENSE_SEGMENT, SEGMENT_KEY
from stable_md.files import atomic_write
from stable_md.refdata.frame_file import append_text, split_complete_frames, write_atomically


def md_settings(temperature: float, timestep_fs: float, friction: float, n_frames: int, every: int,
                equilibration_steps: int, seed: int) -> dict:
    """The run's settings every frame records (K, fs, 1/ps, steps), after checking them."""
    for name, value, low in (("n_frames", n_frames, 1), ("every", every, 1),
                             ("equilibration_steps", equilibration_steps, 0), ("seed", seed, 0)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, value in (("temperature", temperature), ("timestep_fs", timestep_fs), ("friction", friction)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    return {"md_temperature_K": float(temperature), "md_timestep_fs": float(timestep_fs),
            "md_friction_per_ps": float(friction), "md_every": int(every), "md_seed": int(seed),
            "md_equilibration_steps": int(equilibration_steps)}


def run_labelled_md(simulation, output: Path, settings: dict, n_frames: int, equilibration_steps: int,
                    resume: bool, progress: bool, what: str, atoms_note: Callable[[], str],
                    dense_frames: int = 0) -> Path:
    """Write ``n_frames`` frames of ``simulation`` to ``output``, ``settings["md_every"]`` steps apart, after
    ``equilibration_steps`` unstored steps, then ``dense_frames`` frames one step apart with velocities (the dense
    segment); continue an existing output of the same ``settings`` when ``resume``. ``what`` names the system in
    the progress bar and errors; ``atoms_note()`` says how to resume when a file holds other atoms."""
    if int(dense_frames) != dense_frames or dense_frames < 0:
        raise ValueError(f"dense_frames must be an integer >= 0, got {dense_frames!r}")
    output = Path(output)
    checkpoint = output.with_name(output.name + ".checkpoint.npz")
    n_done, dense_done = 0, 0
    if output.exists():
        if not resume:
            raise FileExistsError(f"{output} exists; pass resume to continue it or choose another file")
        n_done, dense_done = _resume(output, checkpoint, simulation, settings, what, atoms_note)
        if dense_done and n_frames > n_done:
            raise ValueError(f"{output} already ends with its dense segment after {n_done} frames, so its trajectory "
                             f"cannot be extended to {n_frames} frames; write to a new file")
        if n_done >= n_frames and dense_done >= dense_frames:
            return output
    else:
        if checkpoint.exists():
            raise FileExistsError(f"{checkpoint} exists without {output}; delete it or choose another output")
        output.parent.mkdir(parents=True, exist_ok=True)
        simulation.start()
        _steps(simulation, equilibration_steps, "equilibration", progress)

    from tqdm import tqdm

    with tqdm(total=n_frames + dense_frames, initial=n_done + dense_done, unit="frame",
              desc=f"{what} {output.name}", disable=not progress) as bar:
        for frame in range(n_done + 1, n_frames + 1):
            simulation.step(settings["md_every"])
            _save_checkpoint(checkpoint, simulation, frame, 0)
            append_text(output, _frame_text(simulation, settings, frame, 0, what))
            bar.update(1)
        regular = max(n_frames, n_done)
        for dense in range(dense_done + 1, dense_frames + 1):
            simulation.step(1)
            _save_checkpoint(checkpoint, simulation, regular, dense)
            append_text(output, _frame_text(simulation, settings, regular, dense, what))
            bar.update(1)
    return output


def _steps(simulation, n_steps: int, label: str, progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=n_steps, unit="step", desc=label, disable=not progress or n_steps == 0) as bar:
        left = n_steps
        while left > 0:
            chunk = min(1000, left)
            simulation.step(chunk)
            bar.update(chunk)
            left -= chunk


def _frame_text(simulation, settings: dict, frame: int, dense: int, what: str) -> str:
    """One extxyz frame: positions (Å), energy (eV), forces (eV/Å), the box if any, the run's settings; frame
    ``dense`` of the dense segment (with velocities) after regular frame ``frame`` when ``dense`` > 0."""
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.units import fs

    positions, energy, forces = simulation.labelled_frame()
    where = f"dense frame {dense}" if dense else f"frame {frame}"
    if not (np.isfinite(energy) and np.isfinite(forces).all()):
        raise FloatingPointError(f"{what} gave non-finite energy or forces at {where}")
    step = frame * settings["md_every"] + dense
    info = dict(settings, md_step=step, md_time_fs=step * settings["md_timestep_fs"])
    if dense:
        info[SEGMENT_KEY] = DENSE_SEGMENT
    periodic = simulation.cell is not None
    atoms = ase.Atoms(numbers=simulation.numbers, positions=positions, cell=simulation.cell if periodic else None,
                      pbc=periodic, info=info)
    if dense:
        atoms.set_velocities(simulation.velocities() / fs)  # Å/fs -> ASE's time unit
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    buffer = io.StringIO()
    ase.io.write(buffer, atoms, format="extxyz")
    return buffer.getvalue()


def _save_checkpoint(path: Path, simulation, frame: int, dense: int) -> None:
    arrays = {"frame": np.array(frame), "dense": np.array(dense),
              "context": np.frombuffer(simulation.checkpoint(), dtype=np.uint8)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def _resume(output: Path, checkpoint: Path, simulation, settings: dict, what: str,
            atoms_note: Callable[[], str]) -> tuple[int, int]:
    """Restore the simulation from the checkpoint and bring the file to the checkpoint's frame; returns the regular
    and dense frames done."""
    import ase.io

    numbers = simulation.numbers
    kept, truncated = split_complete_frames(output)
    if truncated:
        write_atomically(output, kept)
    frames = ase.io.read(io.StringIO(kept), index=":", format="extxyz") if kept else []
    for k, atoms in enumerate(frames, start=1):
        if len(atoms) != len(numbers) or not np.array_equal(atoms.numbers, numbers):
            raise ValueError(f"{output}, frame {k}: holds other atoms than {atoms_note()}; use the same settings "
                             f"to resume, or write to a new file")
        for key, value in settings.items():
            recorded = atoms.info.get(key)
            same = (recorded == value if isinstance(value, str)
                    else np.isclose(float(np.nan if recorded is None else recorded), float(value), rtol=1e-9,
                                    atol=0.0))
            if not same:
                raise ValueError(f"{output}, frame {k}: was made with {key}={recorded}, this run asks for "
                                 f"{key}={value}; use the same settings to resume, or write to a new file")
    if not checkpoint.exists():
        raise FileNotFoundError(f"cannot resume {output}: its checkpoint {checkpoint} is missing")
    with np.load(checkpoint) as saved:
        frame = int(saved["frame"])
        dense = int(saved["dense"]) if "dense" in saved.files else 0
        simulation.load(saved["context"].tobytes())
    written = sum(atoms.info.get(SEGMENT_KEY) == DENSE_SEGMENT for atoms in frames)
    regular = len(frames) - written
    if (frame, dense) in ((regular + 1, 0), (regular, written + 1)) and not (dense == 0 and written):
        # Killed between the checkpoint and the frame it belongs to: write that frame now.
        append_text(output, _frame_text(simulation, settings, frame, dense, what))
    elif (frame, dense) != (regular, written):
        raise ValueError(f"cannot resume {output}: it holds {regular} frames and {written} dense frames but its "
                         f"checkpoint is at frame {frame}, dense frame {dense}")
    return frame, dense
