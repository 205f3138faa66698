"""Refine and evaluate on the inputs users bring: an imported model, another working directory, a copy of the
data file under another name, --train-frames all, a resumed pretraining from elsewhere."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from openmm_bridge.md_settings import MDSettings
from stable_md.cli import main
from stable_md.data import data_record, load_dataset, same_data
from stable_md.potentials import read_metadata
from stable_md.refinement import RefineSettings, refine

pytest.importorskip("openmm")

# A refine run of seconds with the default observable weight (auto).
QUICK = ["--replicas", "8", "--steps-per-epoch", "100", "--threshold", "0.15", "--f-max", "0.1", "--max-cycles",
         "1", "--max-epochs", "2", "--max-sim-time", "2ps", "--qm-batch", "16", "--seed", "3", "--no-progress"]
HARTREE_IN_EV = 27.211386245988


@pytest.fixture(scope="module")
def torchani_source(tmp_path_factory, ethanol) -> str:
    """A torchani model trained by torchani's own modules and plain torch (not by stable-md) on 200 ethanol
    frames, pickled as users save them: the input of ``stable-md import ani``."""
    pytest.importorskip("torchani")
    from torchani.arch import Assembler

    torch.manual_seed(0)
    assembler = Assembler()
    assembler.set_symbols(["H", "C", "O"])
    assembler.set_global_cutoff_fn("cosine")
    assembler.set_aev_computer(radial="ani1x", angular="ani1x")
    assembler.set_atomic_networks(ctor="ani1x")
    assembler.set_self_energies({"H": 0.0, "C": 0.0, "O": 0.0})
    model = assembler.assemble(1).float()
    numbers = torch.as_tensor(ethanol.numbers)[None]
    positions = torch.as_tensor(ethanol.positions[:200], dtype=torch.float32)
    energies = torch.as_tensor(ethanol.energies[:200], dtype=torch.float32) / HARTREE_IN_EV
    forces = torch.as_tensor(ethanol.forces[:200], dtype=torch.float32) / HARTREE_IN_EV
    offset = energies.mean()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(20):
        for batch in torch.randperm(200).split(20):
            coordinates = positions[batch].clone().requires_grad_(True)
            energy = model((numbers.expand(len(batch), -1), coordinates)).energies + offset
            predicted = -torch.autograd.grad(energy.sum(), coordinates, create_graph=True)[0]
            loss = ((energy - energies[batch]) ** 2).mean() + 100 * ((predicted - forces[batch]) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    source = tmp_path_factory.mktemp("torchani") / "ethanol_ani.pt"
    torch.save(model, source)
    return str(source)


def test_refine_an_imported_model_from_another_directory_with_default_weights(tmp_path, monkeypatch,
                                                                              torchani_source, ethanol_path, capsys):
    """The command users type, on a model they trained elsewhere, with relative paths from their own directory."""
    work = tmp_path / "project"
    work.mkdir()
    shutil.copy(ethanol_path, work / "train.xyz")
    monkeypatch.chdir(work)
    assert main(["import", "ani", torchani_source, "--trust-pickle", "-o", "m.pt"]) == 0
    capsys.readouterr()
    assert main(["refine", "m.pt", "--data", "train.xyz", "--obs", "hr"] + QUICK) == 0
    out = capsys.readouterr().out
    assert "no pretraining record" in out and "held-out force MAE" in out
    assert "calibrated at the first learning epoch and raised" in out

    metadata = read_metadata(work / "m.stable.pt")
    entry = metadata["history"][-1]
    assert entry["stage"] == "refine"
    data = load_dataset(ethanol_path)
    # recorded by content and by absolute path, so other directories and names find it
    assert entry["data_fingerprint"] == data_record(data)["data_fingerprint"]
    assert entry["data"] == str((work / "train.xyz").resolve())
    train, test = set(entry["train_indices"]), set(entry["test_indices"])
    assert not train & test and train | test == set(range(len(data)))
    assert len(test) == round(0.1 * len(data))
    summary = entry["summary"]
    assert summary["test_errors_before"]["frames"] == min(500, len(test))
    assert summary["test_errors_after"] is not None
    weights = summary["observable_weights"]
    assert len(weights) == 1 and weights[0] > 0
    learning = [row for row in entry["history"] if row["phase"] == "learning"]
    assert learning and learning[-1]["observable_weights"] == weights
    assert learning[0]["observable_grad_norm"] / learning[0]["grad_norm"] == pytest.approx(0.3, rel=1e-6)
    assert all(row["observable_grad_norm"] / row["grad_norm"] >= 0.3 * (1 - 1e-6) for row in learning)

    # evaluate from yet another directory counts the refine run's training frames as used
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", "../project/m.pt", "../project/m.stable.pt", "--data", str(ethanol_path),
                 "--replicas", "2", "--time", "0.05ps", "--check-every", "20", "--vacf-window", "0",
                 "--error-frames", "20", "-o", "eval", "--no-progress"]) == 0
    plan = json.loads((elsewhere / "eval" / "plan.json").read_text())
    assert plan["held_out_frames"] == len(test)
    assert set(plan["start_frames"]) <= test


def test_a_copy_of_the_pretraining_file_from_another_directory_is_the_same_data(tmp_path, monkeypatch,
                                                                                 pretrained_model, ethanol_path):
    copy_directory = tmp_path / "copy"
    copy_directory.mkdir()
    shutil.copy(ethanol_path, copy_directory / "renamed.extxyz")
    monkeypatch.chdir(copy_directory)
    settings = RefineSettings(n_replicas=8, steps_per_epoch=100, threshold=0.15, f_max=0.1, max_cycles=1,
                              max_epochs=1, max_simulation_time=1000.0, qm_batch=16, md=MDSettings(seed=3))
    result = refine(pretrained_model, "renamed.extxyz", "out.pt", settings, progress=False)
    pretrain_entry = read_metadata(pretrained_model)["history"][0]
    assert result.summary["train_frames"].startswith(f"the model's {len(pretrain_entry['train_indices'])} "
                                                     f"pretraining frames")
    assert result.summary["test_errors_before"]["frames"] == len(pretrain_entry["test_indices"])
    refined_entry = read_metadata(copy_directory / "out.pt")["history"][-1]
    assert refined_entry["train_indices"] == pretrain_entry["train_indices"]
    assert refined_entry["test_indices"] == pretrain_entry["test_indices"]


def test_train_frames_all_uses_every_frame_and_holds_none_out(tmp_path, pretrained_model, ethanol_path, capsys):
    output = tmp_path / "all.pt"
    assert main(["refine", str(pretrained_model), "--data", str(ethanol_path), "-o", str(output),
                 "--train-frames", "all", "--energy-weight", "10"] + QUICK) == 0
    out = capsys.readouterr().out
    assert "none held out" in out and "held-out force MAE" not in out
    # said before the run, not only at its end: a refine can take hours
    assert out.index("frames: all") < out.index(read_metadata(output)["history"][-1]["summary"]["message"])
    entry = read_metadata(output)["history"][-1]
    assert len(entry["train_indices"]) == len(load_dataset(ethanol_path)) and entry["test_indices"] == []
    assert entry["summary"]["test_errors_before"] is None
    assert entry["settings"]["energy_weight"] == 10 and entry["settings"]["force_weight"] == 100


def test_train_frames_pretrain_on_other_data_is_refused_by_name(tmp_path, pretrained_model, ethanol, capsys):
    other = ethanol.subset(np.arange(0, 300))
    other.origin = None
    path = tmp_path / "other.xyz"
    other.save_extxyz(path)
    code = main(["refine", str(pretrained_model), "--data", str(path), "-o", str(tmp_path / "x.pt"),
                 "--train-frames", "pretrain"] + QUICK)
    assert code == 2
    error = capsys.readouterr().err
    assert "--train-frames pretrain" in error and "other.xyz" in error and "Traceback" not in error


def test_small_data_file_without_record_keeps_at_least_one_frame_out(tmp_path, pretrained_model, ethanol):
    small = ethanol.subset(np.arange(0, 40, 4))
    small.origin = None
    path = tmp_path / "small.xyz"
    small.save_extxyz(path)
    settings = RefineSettings(n_replicas=4, steps_per_epoch=100, threshold=0.15, f_max=0.1, max_cycles=1,
                              max_epochs=1, max_simulation_time=1000.0, qm_batch=4, md=MDSettings(seed=1))
    result = refine(pretrained_model, path, tmp_path / "small.stable.pt", settings, progress=False)
    assert result.summary["test_errors_before"]["frames"] == 1
    assert result.summary["train_frames"].startswith("9 of the 10 frames")


def test_same_data_compares_frames_not_paths(tmp_path, monkeypatch, ethanol_path):
    monkeypatch.chdir(ethanol_path.parent)
    relative = load_dataset(ethanol_path.name)
    shutil.copy(ethanol_path, tmp_path / "copy.xyz")
    copied = load_dataset(tmp_path / "copy.xyz")
    assert data_record(relative)["data"] == str(ethanol_path.resolve())
    assert same_data(data_record(relative), copied)
    assert same_data(data_record(relative), copied.subset([0, 5]))  # a subset still names its file
    changed = load_dataset(tmp_path / "copy.xyz")
    changed.positions[3, 0, 0] += 1e-3
    changed.origin = None
    assert not same_data(data_record(relative), changed)
    # a record written before fingerprints existed falls back to the resolved path
    assert same_data({"data": ethanol_path.name}, relative)
    with pytest.raises(ValueError, match="contains no frames"):
        relative.subset([])


def test_pretraining_resumes_from_another_directory(tmp_path, monkeypatch, ethanol_path):
    import stable_md.pretrain as pretraining
    from stable_md.pretrain import PretrainSettings, SplitSettings, pretrain

    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    shutil.copy(ethanol_path, first / "train.xyz")
    tiny = {"hidden_channels": 16, "num_filters": 16, "num_interactions": 1, "num_gaussians": 8}
    split = SplitSettings(n_train=40, n_val=20, n_test=20, seed=0)
    settings = PretrainSettings(epochs=3, batch_size=10, seed=0)
    whole = pretrain(ethanol_path, "schnet", tmp_path / "whole.pt", split=split, settings=settings,
                     hyperparameters=tiny, progress=False)[1]

    # a run killed after its second epoch, started in one directory with one relative path ...
    real_epoch, calls = pretraining._train_epoch, []

    def dies_in_the_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(pretraining, "_train_epoch", dies_in_the_third_epoch)
    monkeypatch.chdir(first)
    with pytest.raises(KeyboardInterrupt):
        pretrain("train.xyz", "schnet", "m.pt", split=split, settings=settings, hyperparameters=tiny,
                 progress=False)
    monkeypatch.setattr(pretraining, "_train_epoch", real_epoch)
    assert (first / "m.ckpt.pt").exists() and not (first / "m.pt").exists()
    # ... resumes from another directory naming the same file by another path
    monkeypatch.chdir(second)
    report = pretrain("../a/train.xyz", "schnet", first / "m.pt", split=split, settings=settings,
                      hyperparameters=tiny, progress=False, resume=True)[1]
    assert report["epochs"] == 3
    assert report["validation"] == whole["validation"]
    assert read_metadata(first / "m.pt")["history"][0]["data"] == str((first / "train.xyz").resolve())


def test_a_model_that_returns_nan_is_refused_and_nothing_is_written(tmp_path, pretrained_model, ethanol_path, capsys):
    """Issue 12 row 17: refine on a NaN model once exited 1 with nothing on stderr and wrote a NaN model file;
    evaluate ran it. Both now stop with one line naming the model, before any output is made."""
    from stable_md.potentials import load_model, save_model

    loaded = load_model(pretrained_model)
    with torch.no_grad():
        next(loaded.module.parameters()).fill_(float("nan"))
    broken = save_model(loaded.module, tmp_path / "nan.pt", loaded.metadata)
    output = tmp_path / "nan.stable.pt"
    assert main(["refine", str(broken), "--data", str(ethanol_path), "-o", str(output)] + QUICK) == 2
    error = capsys.readouterr().err
    assert f"refine {broken}: on the starting frames" in error and "non-finite (NaN or inf) energy or force on 8 of 8" \
        in error and "Traceback" not in error, error
    assert not output.exists() and not output.with_suffix(".refine").exists()
    report = tmp_path / "eval"
    assert main(["evaluate", str(pretrained_model), str(broken), "--data", str(ethanol_path), "-o", str(report),
                 "--replicas", "4", "--time", "0.1ps", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert f"evaluate {broken}: on the starting frames" in error and "Traceback" not in error, error
    assert not report.exists(), "a refused evaluation leaves no directory behind"


def test_resume_refuses_other_bytes_under_the_same_path_and_a_damaged_checkpoint(tmp_path, pretrained_model,
                                                                                 ethanol_path, capsys):
    """Issue 12 rows 4 and 8: a model file replaced in place (same path, other bytes) is refused on refine and
    evaluate --resume, naming why; a truncated refine checkpoint is named as damaged, with no traceback."""
    from stable_md.potentials import load_model, save_model

    model = tmp_path / "model.pt"
    shutil.copyfile(pretrained_model, model)
    output = tmp_path / "model.stable.pt"
    refine_args = ["refine", str(model), "--data", str(ethanol_path), "-o", str(output)] + QUICK
    first = list(refine_args)
    first[first.index("--max-epochs") + 1] = "1"  # a run whose budget a resume extends
    assert main(first) == 0
    evaluate_args = ["evaluate", str(model), "--data", str(ethanol_path), "-o", str(tmp_path / "eval"), "--replicas",
                     "2", "--time", "0.05ps", "--error-frames", "10", "--no-progress"]
    assert main(evaluate_args) == 0
    capsys.readouterr()
    other = load_model(model)
    with torch.no_grad():
        next(other.module.parameters()).add_(0.01)
    save_model(other.module, model, other.metadata, overwrite=True)  # other bytes, the same path
    assert main(refine_args + ["--resume"]) == 2
    assert "settings differ from the original run (model (other file contents)" in capsys.readouterr().err
    assert main(evaluate_args + ["--resume"]) == 2
    assert "was made from another model file" in capsys.readouterr().err

    shutil.copyfile(pretrained_model, model)  # the original bytes again: the resume goes on
    checkpoint = output.with_suffix(".refine") / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    assert main(refine_args + ["--resume"]) == 2
    error = capsys.readouterr().err
    assert f"{checkpoint}: cannot read the refine checkpoint; it is damaged" in error and "Traceback" not in error
