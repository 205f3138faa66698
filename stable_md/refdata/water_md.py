"""Reference data for liquid water: flexible SPC/Fw in OpenMM (``stable-md data water``).

N molecules in a cubic box at a given density, Langevin thermostat at constant volume
(the OpenMM side is :class:`openmm_bridge.water_box.WaterSimulation`). Every ``every``
steps a frame is appended to an extended XYZ file with the potential energy (eV) and
forces (eV/Å), the box and molecules wrapped into it; the file resumes
(:func:`stable_md.refdata.openmm_md.run_labelled_md`).
"""
from __future__ import annotations

import os
from pathlib import Path

from stable_md.refdata.openmm_md import md_settings, run_labelled_md


def run_water_md(output: str | os.PathLike, n_molecules: int = 64, density: float = 0.997,
                 temperature: float = 300.0, timestep_fs: float = 1.0, friction: float = 1.0, n_frames: int = 1000,
                 every: int = 100, equilibration_steps: int = 20_000, seed: int = 0, resume: bool = True,
                 progress: bool = True, platform: str = "CPU",
                 dense_frames: int = 0) -> Path:
    """Simulate SPC/Fw water and write ``n_frames`` labelled frames to ``output`` (extended XYZ); returns the path.

    Units: K, fs, 1/ps (friction), g/cm³. With ``resume`` an existing output of the same
    settings is continued from its checkpoint; otherwise an existing file is refused. ``dense_frames`` frames
    one step apart with velocities follow the regular ones (the dense segment: the reference VACF).
    """
    from openmm_bridge.water_box import WaterSimulation

    settings = {**md_settings(temperature, timestep_fs, friction, n_frames, every, equilibration_steps, seed),
                "water_molecules": int(n_molecules), "water_density_g_cm3": float(density)}
    water = WaterSimulation(n_molecules, density, temperature, timestep_fs, friction, seed, platform)
    return run_labelled_md(water, Path(output), settings, n_frames, equilibration_steps, resume, progress, "SPC/Fw water",
                           lambda: f"{n_molecules} SPC/Fw waters (--molecules {n_molecules})", dense_frames)
