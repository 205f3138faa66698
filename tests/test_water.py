"""stable-md data water (SPC/Fw in OpenMM) and the periodic path of evaluate (RDF criterion, diffusivity)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openmm")

from openmm_bridge.md_settings import MDSettings  # noqa: E402
from openmm_bridge.water_box import box_length  # noqa: E402
from stable_md.data import load_dataset  # noqa: E402
from stable_md.refdata.water_md import run_water_md  # noqa: E402

SMALL = dict(n_molecules=32, n_frames=12, every=20, equilibration_steps=500, progress=False)


@pytest.fixture(scope="module")
def water_file(tmp_path_factory):
    return run_water_md(tmp_path_factory.mktemp("water") / "water.extxyz", **SMALL, dense_frames=40)


def test_water_frames_are_labelled_spcfw(water_file):
    data = load_dataset(water_file)
    assert len(data) == 12 and data.periodic and data.n_atoms == 96
    assert np.allclose(data.cells[0], np.eye(3) * box_length(32, 0.997))
    assert box_length(64, 0.997) == pytest.approx(12.42, abs=0.01)
    oxygens = np.flatnonzero(data.numbers == 8)
    bonds = data.positions[:, oxygens + 1] - data.positions[:, oxygens]
    # SPC/Fw: r0 = 1.012 Å; at 300 K the mean O-H length is slightly longer.
    assert 1.0 < np.linalg.norm(bonds, axis=-1).mean() < 1.06
    assert np.isfinite(data.forces).all() and 0.1 < np.abs(data.forces).mean() < 3.0
    # Liquid SPC/Fw water: about -41 kJ/mol = -0.43 eV per molecule (intramolecular energy included).
    assert -0.55 < data.energies.mean() / 32 < -0.3


def test_water_run_resumes_and_drops_a_torn_frame(tmp_path):
    path = tmp_path / "w.extxyz"
    run_water_md(path, **{**SMALL, "n_frames": 4})
    before = path.read_text()
    with open(path, "a") as handle:
        handle.write("96\nLattice=\"1 0 0")  # a frame cut off mid-write
    run_water_md(path, **{**SMALL, "n_frames": 6})
    after = path.read_text()
    assert after.startswith(before) and len(load_dataset(path)) == 6
    with pytest.raises(ValueError, match="w.extxyz, frame 1: holds other atoms"):
        run_water_md(path, **{**SMALL, "n_molecules": 30, "n_frames": 8})
    with pytest.raises(ValueError, match="md_temperature_K"):
        run_water_md(path, **{**SMALL, "n_frames": 8}, temperature=350.0)
    with pytest.raises(FileExistsError):
        run_water_md(path, **SMALL, resume=False)


def test_the_dense_segment_follows_the_frames_and_resumes(tmp_path, water_file):
    """The dense segment continues the trajectory one step at a time with velocities; the frames before it are
    the file a run without it writes, and a run killed inside it resumes to the same file."""
    data = load_dataset(water_file)
    assert len(data) == 12 and len(data.dense) == 40  # the frames stay the frames
    np.testing.assert_allclose(data.dense.times_fs, 12 * 20 * 1.0 + np.arange(1, 41))
    # Velocities in Å/fs: LangevinMiddle's velocity of a frame is its last step's displacement per fs, up to the
    # thermostat's kick in the middle of the step (2.6 % of the norm here; 6 % is the margin).
    steps = np.diff(data.dense.positions, axis=0)
    length = data.cells[0][0, 0]
    steps -= length * np.round(steps / length)  # frames are wrapped into the box
    velocities = data.dense.velocities[1:]
    assert np.linalg.norm(steps / 1.0 - velocities) < 0.06 * np.linalg.norm(velocities)
    plain = run_water_md(tmp_path / "plain.extxyz", **SMALL)
    text = water_file.read_text()
    assert text.startswith(plain.read_text()) and "md_segment" not in plain.read_text()
    # A run stopped after 10 dense frames and one torn frame, then resumed, writes the same frames (OpenMM's CPU
    # platform continues a checkpoint to rounding, not bit for bit: 1e-8 relative in the energies here).
    torn = tmp_path / "torn.extxyz"
    run_water_md(torn, **SMALL, dense_frames=10)
    with open(torn, "a") as handle:
        handle.write("96\nLattice=\"1 0 0")
    run_water_md(torn, **SMALL, dense_frames=40)
    resumed = load_dataset(torn)
    assert len(resumed) == 12 and len(resumed.dense) == 40
    for name in ("positions", "velocities", "energies", "times_fs"):
        np.testing.assert_allclose(getattr(resumed.dense, name), getattr(data.dense, name), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="already ends with its dense segment after 12 frames"):
        run_water_md(torn, **{**SMALL, "n_frames": 14}, dense_frames=40)


def test_evaluate_a_water_model_with_the_rdf_criterion(tmp_path, water_file):
    from stable_md.evaluation import EvaluateSettings, evaluate
    from stable_md.pretrain import PretrainSettings, SplitSettings, pretrain

    data = load_dataset(water_file)
    model = tmp_path / "water.pt"
    pretrain(data, "schnet", model, split=SplitSettings(n_train=8, n_val=2, n_test=2, seed=0),
             settings=PretrainSettings(epochs=3, lr=3e-3, batch_size=4, seed=0),
             hyperparameters={"hidden_channels": 16, "num_filters": 16, "num_interactions": 1, "num_gaussians": 16,
                              "cutoff": 4.0}, progress=False)
    settings = dict(n_replicas=2, md=MDSettings(temperature=300.0, timestep=0.5), total_time=150.0, criterion="rdf",
                    rdf_window=3, check_every=10, observable="rdf", vacf_window=20, error_frames=2)
    # A strict threshold stops both replicas of this barely trained model, naming the RDF. Two copies of
    # the model see the same verdicts: the criterion's window does not carry over from one model to the next.
    strict = evaluate([model, model], data, tmp_path / "strict", EvaluateSettings(**settings, threshold=0.5),
                      labels=["a", "b"], progress=False)
    first, second = strict["models"]
    assert first["n_unstable"] == 2 and first["stable_time_ps"] == second["stable_time_ps"]
    assert all("RDF error" in reason for reason in first["reasons"].values())
    # The rdf criterion keeps its own RDF reference when h(r) is the compared observable.
    mixed = evaluate([model], data, tmp_path / "mixed",
                     EvaluateSettings(**{**settings, "observable": "hr"}, threshold=0.5), progress=False)
    assert mixed["observable"]["name"] == "hr"
    assert mixed["models"][0]["reasons"] == first["reasons"]
    assert mixed["models"][0]["stable_time_ps"] == first["stable_time_ps"]
    with pytest.raises(ValueError, match="observables"):
        EvaluateSettings(**{**settings, "observable": "bonds"})
    # A loose one lets them run: RDFs of the stable part and a diffusivity from their MSD.
    report = evaluate([model], data, tmp_path / "eval", EvaluateSettings(**settings, threshold=50.0), progress=False)
    result = report["models"][0]
    assert report["observable"]["name"] == "rdf" and result["observable"]["samples"] > 0
    assert np.isfinite(result["observable"]["error"])
    assert result["n_unstable"] < 2, result["reasons"]
    diffusion = result["diffusion"]
    assert diffusion is not None and diffusion["frame_interval_fs"] == 5.0
    assert np.isfinite(diffusion["mean_m2_per_s"]) and diffusion["mean_m2_per_s"] > 0
    assert (tmp_path / "eval" / "rdf.png").exists()
    # The data's dense segment (40 frames 1 fs apart) is the VACF reference: 20 lags of 1 fs cover the model's
    # 10 lags of 0.5 fs, and the line evaluate prints names the error.
    reference = report["reference_vacf"]
    assert reference["frames"] == 40 and reference["interval_fs"] == 1.0 and len(reference["lag_fs"]) == 20
    error = reference["errors"]["water"]
    assert error["lags"] == 10 and error["max_lag_fs"] == 4.5 and 0 <= error["mean_abs"] < 1
    from stable_md.evaluation import summary_table

    assert any(line.startswith("VACF against the data's (40 frames 1 fs apart), mean |C - C_data| over lags 0-4.5 fs: "
                               f"water {error['mean_abs']:.3f}") for line in summary_table(report))
    assert (tmp_path / "eval" / "vacf.png").exists()
    # The periodic box split over two processes (one replica each): the same verdicts, the MSD's diffusivities and
    # the RDFs from the displacements and samples each process kept (float32 batches of 1 instead of 2 round
    # differently, so to 1e-3 relative, and 1e-4 on RDF values of order 1).
    split = evaluate([model], data, tmp_path / "split", EvaluateSettings(**settings, threshold=50.0),
                     progress=False, nproc=2)["models"][0]
    assert split["unstable"] == result["unstable"] and split["observable"]["samples"] == result["observable"]["samples"]
    np.testing.assert_allclose(split["diffusion"]["per_replica_m2_per_s"], diffusion["per_replica_m2_per_s"],
                               rtol=1e-3)
    np.testing.assert_allclose(split["observable"]["mean"], result["observable"]["mean"], rtol=0, atol=1e-4)
