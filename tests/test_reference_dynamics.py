"""Reference dynamics from the data (issue 15, item 4): the frames' times are read from the generators' files,
and evaluate measures the data's own self-diffusion and VACF (from the dense segment) the way it measures a
model's."""
from __future__ import annotations

import numpy as np
import pytest

from stable_md.data import DataError, Dataset, load_dataset, save_dataset
from stable_md.evaluation import _diffusion_line
from stable_md.reference_dynamics import reference_diffusion, reference_vacf, vacf_error

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


def _ornstein_uhlenbeck(n_frames: int, n_atoms: int, spacing_fs: float, tau_fs: float, seed: int = 0) -> np.ndarray:
    """Velocities [T, N, 3] of independent Ornstein-Uhlenbeck processes: their VACF is exp(-lag / tau)."""
    rng = np.random.default_rng(seed)
    decay = np.exp(-spacing_fs / tau_fs)
    velocities = np.empty((n_frames, n_atoms, 3))
    velocities[0] = rng.normal(size=(n_atoms, 3))
    for t in range(1, n_frames):
        velocities[t] = decay * velocities[t - 1] + np.sqrt(1 - decay ** 2) * rng.normal(size=(n_atoms, 3))
    return velocities


def _with_dense(data: Dataset, velocities: np.ndarray, times_fs: np.ndarray) -> Dataset:
    n_frames, n_atoms = velocities.shape[:2]
    numbers = data.numbers[:n_atoms]
    dense = Dataset(positions=np.zeros((n_frames, n_atoms, 3)), numbers=numbers, energies=np.zeros(n_frames),
                    forces=np.zeros((n_frames, n_atoms, 3)), velocities=velocities, times_fs=times_fs)
    frames = data.positions[:, :n_atoms]
    return Dataset(positions=frames, numbers=numbers, energies=data.energies, forces=np.zeros_like(frames),
                   dense=dense)


def test_the_reference_vacf_of_an_ornstein_uhlenbeck_segment_is_its_exponential():
    """400 atoms over 200 frames: the normalised VACF is exp(-lag/tau) to 0.05 (over seeds 0-4 the largest
    deviation over the 100 lags measured 0.009-0.024)."""
    base = _brownian_box(2.3e-9, 5, 100.0)
    for seed in range(2):
        data = _with_dense(base, _ornstein_uhlenbeck(200, 400, 0.5, 10.0, seed), 1000.0 + 0.5 * np.arange(200))
        reference = reference_vacf(data)
        assert reference["frames"] == 200 and reference["interval_fs"] == 0.5 and len(reference["values"]) == 100
        np.testing.assert_allclose(reference["values"], np.exp(-np.asarray(reference["lag_fs"]) / 10.0), atol=0.05)
    assert reference_vacf(base) is None
    uneven = _with_dense(base, _ornstein_uhlenbeck(20, 4, 0.5, 10.0), np.r_[0.5 * np.arange(10), 6 + np.arange(10)])
    with pytest.raises(DataError, match="not evenly spaced.*from 0.5 to 1.5 fs"):
        reference_vacf(uneven)
    with pytest.raises(DataError, match="holds 4 frames; a reference VACF needs at least 8"):
        reference_vacf(_with_dense(base, _ornstein_uhlenbeck(4, 4, 0.5, 10.0), 0.5 * np.arange(4)))


def test_a_model_vacf_is_compared_on_its_own_lags():
    """The reference is interpolated onto the model's lags where it covers them: a model curve equal to the data's
    at half its spacing has no error on the shared lags, and a constant offset is the error."""
    reference = {"lag_fs": [0.0, 1.0, 2.0, 3.0], "values": [1.0, 0.5, 0.0, -0.5]}
    lags = 0.5 * np.arange(10)  # up to 4.5 fs; the reference reaches 3 fs
    exact = {"lag_fs": lags.tolist(), "mean": np.interp(lags, reference["lag_fs"], reference["values"]).tolist()}
    assert vacf_error(exact, reference) == {"mean_abs": 0.0, "max_lag_fs": 3.0, "lags": 7}
    shifted = dict(exact, mean=(np.asarray(exact["mean"]) + 0.1).tolist())
    assert vacf_error(shifted, reference)["mean_abs"] == pytest.approx(0.1)
    assert vacf_error(None, reference) is None and vacf_error(exact, None) is None


def test_the_dense_segment_round_trips_through_npz_and_extxyz_and_stays_out_of_the_frames(tmp_path):
    base = _brownian_box(2.3e-9, 12, 100.0)
    data = _with_dense(base, _ornstein_uhlenbeck(10, 6, 0.5, 10.0), 2000.0 + 0.5 * np.arange(10))
    for name in ("d.npz", "d.extxyz"):
        save_dataset(data, tmp_path / name)
        loaded = load_dataset(tmp_path / name)
        assert len(loaded) == 12 and len(loaded.dense) == 10
        np.testing.assert_allclose(loaded.dense.velocities, data.dense.velocities, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(loaded.dense.times_fs, data.dense.times_fs)
        train, _, _ = loaded.split(8, 2, 2, seed=0)
        assert len(train) == 8 and train.dense is loaded.dense  # a split keeps the file's segment, not its frames
    extxyz = (tmp_path / "d.extxyz").read_text()
    assert extxyz.count("md_segment=dense") == 10 and extxyz.count("momenta") == 10
    # A file of dense frames alone has no frames to train on, and says so
    save_dataset(data.dense, tmp_path / "alone.extxyz")
    (tmp_path / "alone.extxyz").write_text((tmp_path / "alone.extxyz").read_text().replace(
        "pbc=", "md_segment=dense pbc="))
    with pytest.raises(DataError, match="alone.extxyz: holds only a dense segment"):
        load_dataset(tmp_path / "alone.extxyz")
    with pytest.raises(DataError, match="dense segment needs the keys"):
        arrays = dict(np.load(tmp_path / "d.npz"))
        del arrays["dense_V"]
        np.savez(tmp_path / "broken.npz", **arrays)
        load_dataset(tmp_path / "broken.npz")
