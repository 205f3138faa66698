"""Reference dynamics from the data (issue 15, item 4): the frames' times are read from the generators' files,
and evaluate measures the data's own self-diffusion the way it measures a model's."""
from __future__ import annotations

import numpy as np
import pytest

from stable_md.data import Dataset, load_dataset
from stable_md.evaluation import _diffusion_line, reference_diffusion

ANGSTROM2_PER_FS_IN_M2_PER_S = 1e-20 / 1e-15


def _brownian_box(d_m2_per_s: float, n_frames: int, spacing_fs: float, seed: int = 0) -> Dataset:
    """Oxygens (with a hydrogen each, which the measure ignores) on independent random walks of diffusion
    coefficient ``d_m2_per_s`` in a 20 Å box, written wrapped into it as a generator writes frames."""
    rng = np.random.default_rng(seed)
    n_heavy, box = 200, 20.0
    d = d_m2_per_s / ANGSTROM2_PER_FS_IN_M2_PER_S  # Å²/fs
    steps = rng.normal(scale=np.sqrt(2 * d * spacing_fs), size=(n_frames, n_heavy, 3))
    heavy = rng.uniform(0, box, size=(n_heavy, 3)) + np.cumsum(steps, axis=0)
    positions = np.concatenate([heavy, heavy + 0.96], axis=1) % box
    numbers = np.array([8] * n_heavy + [1] * n_heavy)
    return Dataset(positions=positions, numbers=numbers, energies=np.zeros(n_frames),
                   forces=np.zeros_like(positions), cells=np.repeat(np.eye(3)[None] * box, n_frames, axis=0),
                   times_fs=np.arange(1, n_frames + 1) * spacing_fs)


def test_the_data_diffusion_of_a_random_walk_is_its_coefficient():
    """200 walkers over 400 frames: the MSD fit recovers D (over seeds 0-4 it measured 0.94-1.07 times the
    true value, so 15% is the margin)."""
    for seed in range(2):
        measured = reference_diffusion(_brownian_box(2.3e-9, 400, 100.0, seed))
        assert measured["frames"] == 400 and measured["frame_interval_fs"] == 100.0
        assert measured["m2_per_s"] == pytest.approx(2.3e-9, rel=0.15)


def test_the_longest_evenly_spaced_run_is_measured():
    data = _brownian_box(2.3e-9, 300, 100.0)
    gapped = data.subset(list(range(0, 40)) + list(range(60, 300)))  # 2 ps missing after frame 40
    measured = reference_diffusion(gapped)
    assert measured["frames"] == 240
    assert reference_diffusion(data.subset(range(10))) is None  # too short a run
    molecule = Dataset(positions=data.positions[:, :3], numbers=data.numbers[:3], energies=data.energies,
                       forces=data.forces[:, :3], times_fs=data.times_fs)
    assert reference_diffusion(molecule) is None
    untimed = Dataset(positions=data.positions, numbers=data.numbers, energies=data.energies, forces=data.forces,
                      cells=data.cells)
    assert reference_diffusion(untimed) is None


def test_frame_times_come_from_the_generators_files(tmp_path, ethanol_path):
    data = _brownian_box(2.3e-9, 30, 100.0)
    path = tmp_path / "walk.extxyz"
    from ase import Atoms
    from ase.io import write

    frames = []
    for k in range(len(data)):
        atoms = Atoms(numbers=data.numbers, positions=data.positions[k], cell=data.cells[k], pbc=True)
        atoms.info.update(energy=0.0, md_time_fs=float(data.times_fs[k]))
        atoms.arrays["forces"] = data.forces[k]
        frames.append(atoms)
    write(path, frames, format="extxyz")
    loaded = load_dataset(path)
    np.testing.assert_allclose(loaded.times_fs, data.times_fs)
    np.testing.assert_allclose(loaded.subset([3, 5]).times_fs, data.times_fs[[3, 5]])
    assert load_dataset(ethanol_path).times_fs is not None  # the xTB generator records md_time_fs too
    line = _diffusion_line({"reference_diffusion": reference_diffusion(loaded),
                            "models": [{"label": "refined", "diffusion": {"mean_m2_per_s": 1.3 * 2.3e-9,
                                                                          "std_m2_per_s": 1e-10}},
                                       {"label": "broken", "diffusion": None}]})
    assert line.startswith("self-diffusion of the heavy atoms (1e-9 m²/s): data ")
    assert "(its 30 frames 100 fs apart)" in line and "broken n/a" in line
    measured = reference_diffusion(loaded)["m2_per_s"]
    assert f"refined 2.99 ± 0.10 ({1.3 * 2.3e-9 / measured - 1:+.0%})" in line
