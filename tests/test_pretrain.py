"""Pretraining on the committed ethanol set: it learns, it resumes exactly, it refuses to clobber."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import FAST_SCHNET
from stable_md.cli import main
from stable_md.potentials import build_potential, load_model
from stable_md.pretrain import (EnergyForceLoss, DatasetTensors, fit_energy_shifts, initialise_output_scale,
                                prediction_errors)


def test_pretraining_lowers_force_error_far_below_untrained(pretrained_model, ethanol):
    model = load_model(pretrained_model)
    entry = model.metadata["history"][0]
    assert entry["stage"] == "pretrain" and len(entry["train_indices"]) == 200
    assert not set(entry["train_indices"]) & set(entry["test_indices"])
    test = ethanol.subset(entry["test_indices"])

    torch.manual_seed(0)
    untrained, _ = build_potential("schnet", ethanol.species, **FAST_SCHNET)
    initialise_output_scale(untrained, ethanol.subset(entry["train_indices"]))
    before = prediction_errors(untrained, test)
    after = prediction_errors(model.module, test)
    assert after["force_mae_meV_per_A"] < 0.5 * before["force_mae_meV_per_A"], (before, after)
    assert after["energy_mae_meV"] < before["energy_mae_meV"]
    report = entry["report"]["test"]
    assert report["force_mae_meV_per_A"] == pytest.approx(after["force_mae_meV_per_A"], rel=1e-4)


def test_energy_shifts_reproduce_composition_energies():
    from stable_md.data import Dataset

    rng = np.random.default_rng(0)
    numbers = np.array([8, 1, 1])
    data = Dataset(positions=rng.normal(size=(5, 3, 3)), numbers=numbers, energies=np.full(5, -2000.5),
                   forces=np.zeros((5, 3, 3)))
    shifts = fit_energy_shifts(data, [1, 8])
    assert 2 * shifts[0] + shifts[1] == pytest.approx(-2000.5)


def test_loss_is_zero_for_exact_labels_and_positive_otherwise(ethanol):
    torch.manual_seed(0)
    potential, _ = build_potential("schnet", ethanol.species, **FAST_SCHNET)
    potential = potential.double()
    tensors = DatasetTensors(ethanol.first(4), dtype=torch.float64)
    batch = tensors.batch(torch.arange(4))
    from stable_md.potentials import energy_and_forces

    energy, forces = energy_and_forces(potential, batch.positions, batch.numbers)
    batch.energies, batch.forces = energy.detach(), forces.detach()
    loss, _ = EnergyForceLoss(1.0, 100.0)(potential, batch)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-20)
    batch.forces = batch.forces + 0.1
    loss, _ = EnergyForceLoss(1.0, 100.0)(potential, batch)
    assert float(loss.detach()) == pytest.approx(100.0 * 0.01, rel=1e-9)
    with pytest.raises(ValueError, match="weights"):
        EnergyForceLoss(0.0, 0.0)


def _cli_args(data, output, epochs):
    return ["pretrain", "--data", str(data), "-o", str(output), "--n-train", "60", "--n-val", "20",
            "--n-test", "20", "--epochs", str(epochs), "--batch-size", "10", "--patience", "100",
            "--no-progress", "--seed", "3"] + sum((["--hyper", f"{k}={v}"] for k, v in FAST_SCHNET.items()), [])


def test_killed_run_resumes_to_the_same_model(tmp_path, ethanol_path):
    epochs = 8
    reference = tmp_path / "straight.pt"
    assert main(_cli_args(ethanol_path, reference, epochs)) == 0

    resumed = tmp_path / "resumed.pt"
    checkpoint = resumed.with_suffix(".ckpt.pt")
    process = subprocess.Popen([sys.executable, "-m", "stable_md.cli"] + _cli_args(ethanol_path, resumed, epochs),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = resumed.with_suffix(".log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not resumed.exists(), "the run should have died mid-way"

    # Without --resume the interrupted run is protected, with it the run completes.
    assert main(_cli_args(ethanol_path, resumed, epochs)) == 2
    stale = tmp_path / ".resumed.ckpt.pt.k1ll3d.tmp"  # what a kill during a checkpoint write leaves
    stale.write_bytes(b"half a checkpoint")
    assert main(_cli_args(ethanol_path, resumed, epochs) + ["--resume"]) == 0
    assert not checkpoint.exists()
    assert not list(tmp_path.glob(".*.tmp")), "stale temporaries of our own naming are removed"

    epochs_logged = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs_logged == list(range(1, epochs + 1))

    from stable_md.data import load_dataset

    data = load_dataset(ethanol_path).first(10)
    a = prediction_errors(load_model(reference).module, data)
    b = prediction_errors(load_model(resumed).module, data)
    assert a["force_mae_meV_per_A"] == pytest.approx(b["force_mae_meV_per_A"], rel=1e-6)
    assert a["energy_mae_meV"] == pytest.approx(b["energy_mae_meV"], rel=1e-6)


class _Stopped(BaseException):
    """Stands for a SIGKILL at one exact point of pretrain (a BaseException, as nothing may catch it)."""


@pytest.mark.parametrize("stop_at_epoch", [1, 3])
def test_stop_between_checkpoint_and_log_row_resumes_to_the_same_log(tmp_path, ethanol_path, monkeypatch,
                                                                     stop_at_epoch):
    """A run stopped after an epoch's checkpoint but before its log row (in the first epoch too: CI once found a
    start killed there refused with "log.jsonl exists") resumes with every row once, as an unstopped run logs."""
    import stable_md.pretrain as pretrain_module

    epochs = 4
    reference = tmp_path / "straight.pt"
    assert main(_cli_args(ethanol_path, reference, epochs)) == 0

    stopped = tmp_path / "stopped.pt"
    append = pretrain_module._append_log_row

    def append_or_stop(path, row):
        if row["epoch"] == stop_at_epoch:
            raise _Stopped
        append(path, row)

    monkeypatch.setattr(pretrain_module, "_append_log_row", append_or_stop)
    with pytest.raises(_Stopped):
        main(_cli_args(ethanol_path, stopped, epochs))
    monkeypatch.setattr(pretrain_module, "_append_log_row", append)
    log = stopped.with_suffix(".log.jsonl")
    assert stopped.with_suffix(".ckpt.pt").exists()
    assert (len(log.read_text().splitlines()) if log.exists() else 0) == stop_at_epoch - 1

    assert main(_cli_args(ethanol_path, stopped, epochs) + ["--resume"]) == 0

    def rows(path):
        return [{k: v for k, v in json.loads(line).items() if k != "wall_time_s"}
                for line in path.read_text().splitlines()]

    assert rows(log) == rows(reference.with_suffix(".log.jsonl"))


def test_cli_refuses_to_overwrite_and_reports_bad_input(tmp_path, ethanol_path, capsys):
    existing = tmp_path / "model.pt"
    existing.write_text("user's file")
    assert main(_cli_args(ethanol_path, existing, 1)) == 2
    assert "model.pt exists" in capsys.readouterr().err
    assert existing.read_text() == "user's file"

    assert main(_cli_args(tmp_path / "nothing.xyz", tmp_path / "x.pt", 1)) == 2
    assert "nothing.xyz does not exist" in capsys.readouterr().err

    assert main(_cli_args(ethanol_path, tmp_path / "y.pt", 1) + ["--hyper", "width=3"]) == 2
    assert "unknown hyperparameter(s) ['width']" in capsys.readouterr().err
    # a cutoff of -1 once wrote a model whose forces were all zero; nan gave a TypeError traceback
    for value, expected in (("-1", "got -1"), ("nan", "got 'nan'"), ("0", "got 0")):
        assert main(_cli_args(ethanol_path, tmp_path / "c.pt", 1) + ["--hyper", f"cutoff={value}"]) == 2
        err = capsys.readouterr().err
        assert f"hyperparameter cutoff of architecture 'schnet' must be a finite number > 0; {expected}" in err, err
    assert not (tmp_path / "c.pt").exists()

    args = _cli_args(ethanol_path, tmp_path / "z.pt", 1)
    args[args.index("--n-train") + 1] = "600"
    assert main(args) == 2
    assert "has 500 frames, fewer than n_train + n_val" in capsys.readouterr().err


def test_refit_energy_shifts_removes_the_mean_residual_and_keeps_forces(ethanol):
    import torch

    from stable_md.potentials import build_potential, energy_and_forces
    from stable_md.pretrain import refit_energy_shifts

    torch.manual_seed(0)
    potential, _ = build_potential("schnet", ethanol.species, hidden_channels=16, num_filters=16, num_interactions=1)
    train = ethanol.first(50)
    positions = torch.as_tensor(train.positions, dtype=torch.float32)
    numbers = torch.as_tensor(train.numbers)
    _, forces_before = energy_and_forces(potential, positions, numbers, None)
    refit_energy_shifts(potential, train)
    energy, forces_after = energy_and_forces(potential, positions, numbers, None)
    residual = train.energies - energy.detach().double().numpy()
    assert abs(residual.mean()) < 5e-3  # eV; float32 energies of about -310 eV
    assert torch.allclose(forces_before, forces_after)


def test_numbers_must_be_finite_and_a_divergent_run_keeps_its_best_epoch(tmp_path, ethanol_path, capsys,
                                                                         monkeypatch):
    import stable_md.pretrain as pretrain_module

    for option, value in (("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"), ("--force-weight", "nan")):
        with pytest.raises(SystemExit) as exit_info:
            main(_cli_args(ethanol_path, tmp_path / "m.pt", 1) + [option, value])
        assert exit_info.value.code == 2
        assert f"argument {option}: expected a finite number" in capsys.readouterr().err

    # a learning rate this large diverges within the first epoch: one line, nothing written
    diverging = tmp_path / "diverging.pt"
    assert main(_cli_args(ethanol_path, diverging, 3) + ["--lr", "1e6"]) == 2
    err = capsys.readouterr().err
    assert "training loss became NaN or inf in epoch 1, before any epoch finished; lower --lr (now 1e+06)" in err
    assert "Traceback" not in err and not list(tmp_path.glob("diverging*"))

    # divergence after two good epochs (forced here in our own epoch function): the best epoch is written
    real_epoch = pretrain_module._train_epoch
    calls = {"n": 0}

    def fails_on_the_third_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise FloatingPointError("training loss became non-finite")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "_train_epoch", fails_on_the_third_epoch)
    kept = tmp_path / "kept.pt"
    assert main(_cli_args(ethanol_path, kept, 5)) == 1
    captured = capsys.readouterr()
    assert "stopped by diverged after 2 epochs" in captured.out
    assert "NaN or inf in epoch 3; the model of the best epoch" in captured.err
    model = load_model(kept)
    assert all(torch.isfinite(p).all() for p in model.module.parameters())
    assert model.metadata["history"][0]["report"]["stopped_by"] == "diverged"


def test_a_damaged_checkpoint_is_named(tmp_path, ethanol_path, capsys):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo this must not run",))

    model = tmp_path / "m.pt"
    checkpoint = model.with_suffix(".ckpt.pt")
    torch.save({"identity": "{}", "model": {}}, checkpoint)
    full = checkpoint.read_bytes()
    for name, content in (("truncated", full[: len(full) // 2]), ("not a torch file", b"hello"),
                          ("a code-running pickle", pickle.dumps(Payload(), protocol=2)), ("missing entries", full)):
        checkpoint.write_bytes(content)
        assert main(_cli_args(ethanol_path, model, 2) + ["--resume"]) == 2, name
        captured = capsys.readouterr()
        assert f"{checkpoint}: cannot read the pretrain checkpoint; it is damaged" in captured.err, (name, captured.err)
        assert "this must not run" not in captured.out and "Traceback" not in captured.err
    assert not model.exists()


def test_split_defaults_adapt_to_the_file_and_are_announced(tmp_path, ethanol, capsys):
    """Issue 12 row 16: a file under 1,100 frames once failed with the default 1000 + 100 split."""
    from stable_md.pretrain import SplitSettings

    assert SplitSettings().resolved(500) == SplitSettings(400, 50, 50, 0)
    assert SplitSettings().resolved(5000) == SplitSettings(1000, 100, 1000, 0)
    assert SplitSettings().resolved(1100) == SplitSettings(880, 100, 120, 0)
    assert SplitSettings(n_train=10).resolved(500) == SplitSettings(10, 50, 440, 0)
    small = ethanol.first(30).save_extxyz(tmp_path / "small.xyz")
    model = tmp_path / "small.pt"
    args = ["pretrain", "--data", str(small), "-o", str(model), "--epochs", "1", "--no-progress"] + \
        sum((["--hyper", f"{k}={v}"] for k, v in FAST_SCHNET.items()), [])
    assert main(args) == 0
    assert "split: 24 training, 3 validation, 3 test frames of 30 (seed 0)" in capsys.readouterr().out
    (entry,) = load_model(model).metadata["history"]
    assert entry["split"] == {"n_train": 24, "n_val": 3, "n_test": 3, "seed": 0}
    assert len(entry["train_indices"]) == 24 and len(entry["test_indices"]) == 3
    one = ethanol.first(1).save_extxyz(tmp_path / "one.xyz")
    assert main(args[:2] + [str(one), "-o", str(tmp_path / "one.pt")] + args[5:]) == 2
    err = capsys.readouterr().err
    assert "one.xyz: has 1 frame(s); pretraining needs at least 1 training and 1 validation frame" in err, err
    assert not (tmp_path / "one.pt").exists()
