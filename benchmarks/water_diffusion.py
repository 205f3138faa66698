"""Check the SPC/Fw water generator against the literature: O self-diffusion of `stable-md data water`.

Runs ``stable-md data water`` (64 molecules, 300 K, 0.997 g/cm³) into a temporary directory,
unwraps the oxygen trajectory and fits D from the MSD, printed next to the SPC/Fw value of Wu,
Tepper & Voth (2006), 2.32e-9 m²/s (their larger box; D grows with box size as 1/L). About 2
minutes on one core.

    python benchmarks/water_diffusion.py [--frames 400]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stable_md.refdata.water_md import run_water_md
from stable_md.data import load_dataset
from stable_md.observables import diffusion_coefficient, mean_squared_displacement

LITERATURE_D = 2.32e-9  # m²/s, SPC/Fw at 298 K (Wu, Tepper & Voth 2006)


def unwrap(positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Continuous trajectory [T, N, 3] from wrapped positions, by minimum-image steps between frames."""
    steps = np.diff(positions, axis=0)
    fractional = steps @ np.linalg.inv(cell)
    steps = (fractional - np.round(fractional)) @ cell
    return np.concatenate([positions[:1], positions[:1] + np.cumsum(steps, axis=0)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=400, help="frames 100 fs apart (default 400 = 40 ps)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "water.extxyz"
        started = time.perf_counter()
        run_water_md(path, n_molecules=64, n_frames=args.frames, every=100, equilibration_steps=20_000,
                     progress=False)
        elapsed = time.perf_counter() - started
        data = load_dataset(path)
    oxygens = np.flatnonzero(data.numbers == 8)
    trajectory = unwrap(data.positions[:, oxygens], data.cells[0])
    msd = mean_squared_displacement(trajectory, max_lag=len(trajectory) // 2)
    d = diffusion_coefficient(msd, frame_interval_fs=100.0)
    steps = 20_000 + 100 * args.frames
    print(f"{steps} steps of 64 SPC/Fw waters in {elapsed:.0f} s ({steps / elapsed:.0f} steps/s)")
    print(f"O self-diffusion: {d:.2e} m²/s; literature {LITERATURE_D:.2e} m²/s; ratio {d / LITERATURE_D:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
