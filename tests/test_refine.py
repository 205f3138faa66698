"""StABlE refinement: the loop, its checkpoints, its edge cases and, above all, that it stabilizes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import FAST_SCHNET
from stable_md.cli import main
from stable_md.data import Dataset
from stable_md.potentials import load_model, read_metadata
from stable_md.refinement import RefineError, RefineSettings, refine


def quick_settings(**overrides) -> RefineSettings:
    """A refine run of seconds: 16 replicas, 100-step epochs."""
    values = dict(n_replicas=16, steps_per_epoch=100, sample_every=10, check_every=50, threshold=0.15,
                  f_max=0.1, f_min=0.05, max_cycles=2, max_epochs=4, max_simulation_time=3000.0,
                  qm_batch=16, seed=3)
    values.update(overrides)
    return RefineSettings(**values)


def parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def without_wall_time(history):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in history]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="f_min < f_max"):
        RefineSettings(f_min=0.5, f_max=0.2)
    with pytest.raises(ValueError, match="multiple of sample_every"):
        RefineSettings(steps_per_epoch=100, sample_every=30)
    with pytest.raises(ValueError, match="unknown observable"):
        RefineSettings(observables=["vacf"])
    with pytest.raises(ValueError, match="2 observables but 3 weights"):
        RefineSettings(observables=["hr", "bonds"], observable_weights=[1, 2, 3])
    assert RefineSettings(criterion="imd").threshold == 1.2
    assert RefineSettings().threshold == 0.25


def test_resume_repeats_the_uninterrupted_run(tmp_path, pretrained_model, ethanol_path):
    whole = refine(pretrained_model, ethanol_path, tmp_path / "whole.pt", quick_settings(), progress=False)
    phases = {row["phase"] for row in whole.history}
    assert phases == {"simulation", "learning"}, whole.history

    # The same run stopped after two learning epochs (as a kill would stop it), then resumed.
    first = refine(pretrained_model, ethanol_path, tmp_path / "part.pt", quick_settings(max_epochs=2),
                   progress=False)
    assert first.summary["learning_epochs"] == 2
    resumed = refine(pretrained_model, ethanol_path, tmp_path / "part.pt", quick_settings(), resume=True,
                     progress=False)
    assert without_wall_time(resumed.history) == without_wall_time(whole.history)
    torch.testing.assert_close(parameters(resumed.model), parameters(whole.model), rtol=0, atol=0)
    log = [json.loads(line) for line in (tmp_path / "part.refine" / "log.jsonl").read_text().splitlines()]
    assert without_wall_time(log) == without_wall_time(whole.history)

    # the refined file records what was done and loads like any model
    metadata = read_metadata(tmp_path / "whole.pt")
    assert metadata["history"][-1]["stage"] == "refine"
    assert metadata["history"][-1]["settings"]["threshold"] == 0.15
    loaded = load_model(tmp_path / "whole.pt")
    torch.testing.assert_close(parameters(loaded.module), parameters(whole.model))
    for name in ("unstable_fraction.png", "hr.png", "summary.json", "checkpoint.pt", "settings.json"):
        assert (tmp_path / "whole.refine" / name).exists(), name

    with pytest.raises(FileExistsError, match="--overwrite"):
        refine(pretrained_model, ethanol_path, tmp_path / "whole.pt", quick_settings(), progress=False)
    with pytest.raises(ValueError, match="settings differ.*lr"):
        refine(pretrained_model, ethanol_path, tmp_path / "part.pt", quick_settings(lr=0.5), resume=True,
               progress=False)


def test_no_instability_leaves_the_model_unchanged(tmp_path, pretrained_model, ethanol_path):
    settings = quick_settings(threshold=1.5, max_simulation_time=300.0)
    result = refine(pretrained_model, ethanol_path, tmp_path / "same.pt", settings, progress=False)
    assert not result.summary["refined"]
    assert "no replica became unstable" in result.summary["message"]
    assert result.summary["stopped_by"] == "simulation time"
    original = load_model(pretrained_model).module
    torch.testing.assert_close(parameters(load_model(tmp_path / "same.pt").module), parameters(original),
                               rtol=0, atol=0)


def test_all_replicas_unstable_at_once_is_explained(tmp_path, pretrained_model, ethanol_path):
    settings = quick_settings(temperature=20000.0, threshold=0.25)
    with pytest.raises(RefineError, match="all 16 replicas were unstable at the first check.*smaller --timestep"):
        refine(pretrained_model, ethanol_path, tmp_path / "hot.pt", settings, progress=False)


def test_species_the_model_does_not_know(tmp_path, pretrained_model, ethanol):
    numbers = ethanol.numbers.copy()
    numbers[-1] = 9  # an F the model never saw
    data = Dataset(ethanol.positions, numbers, ethanol.energies, ethanol.forces, source="fluoro.xyz")
    with pytest.raises(ValueError, match=r"fluoro.xyz contains elements .*\[9\]"):
        refine(pretrained_model, data, tmp_path / "x.pt", quick_settings(), progress=False)


def test_non_finite_losses_are_skipped_then_stop(tmp_path, pretrained_model, ethanol_path, monkeypatch):
    import stable_md.refinement as refinement
    from stable_md.estimator import EstimatorResult

    def nan_gradient(*args, **kwargs):
        return EstimatorResult(loss=float("nan"), losses={"hr": float("nan")}, means={}, n_samples=10,
                               weights=np.zeros(10))

    monkeypatch.setattr(refinement, "boltzmann_gradient", nan_gradient)
    result = refine(pretrained_model, ethanol_path, tmp_path / "nan.pt", quick_settings(nan_patience=2,
                                                                                        max_epochs=10),
                    progress=False)
    learning = [row for row in result.history if row["phase"] == "learning"]
    assert [row.get("skipped") for row in learning] == ["non-finite observable loss"] * 2
    assert "2 skipped steps in a row" in result.summary["stopped_by"]
    original = load_model(pretrained_model).module
    torch.testing.assert_close(parameters(result.model), parameters(original), rtol=0, atol=0)


def test_cli_refine_writes_model_log_and_plots(tmp_path, pretrained_model, ethanol_path, capsys):
    output = tmp_path / "cli.stable.pt"
    code = main(["refine", str(pretrained_model), "--data", str(ethanol_path), "-o", str(output),
                 "--obs", "hr", "--obs", "bond-types", "--obs-weight", "1", "--obs-weight", "0.5",
                 "--replicas", "16", "--steps-per-epoch", "100", "--threshold", "0.15", "--f-max", "0.1",
                 "--f-min", "0.05", "--max-cycles", "1", "--max-epochs", "3", "--max-sim-time", "2ps",
                 "--qm-batch", "16", "--seed", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert output.exists()
    log = [json.loads(line) for line in (tmp_path / "cli.stable.refine" / "log.jsonl").read_text().splitlines()]
    learning = [row for row in log if row["phase"] == "learning"]
    assert learning and all("loss_hr" in row and "loss_bond-types" in row for row in learning)
    assert "held-out force MAE" in out and "bond-types.png" in out

    code = main(["refine", str(pretrained_model), "--data", str(ethanol_path), "-o", str(output), "--no-progress"])
    assert code == 2
    assert "exists" in capsys.readouterr().err


def unstable_count(model_path, data, starts_idx, threshold: float, steps: int) -> int:
    """Held-out replicas of ``model_path`` (Nosé-Hoover, 500 K) that break a bond within ``steps``."""
    from openmm_bridge.replicas import ReplicaSet
    from stable_md.stability import BondLengthCriterion, detect_bonds

    criterion = BondLengthCriterion(detect_bonds(data.numbers, data.positions), threshold)
    replicas = ReplicaSet(model_path, data.numbers, data.positions[starts_idx], integrator="nose-hoover",
                          temperature=500.0, timestep=0.5, seed=11)

    def check(frames):
        broken = np.flatnonzero(criterion(frames.positions) & frames.running)
        if len(broken):
            replicas.mark_unstable(broken)

    replicas.run(steps, callback=check, every=50)
    return int(replicas.unstable.sum())


def test_refine_stabilizes_a_weak_model_on_held_out_starts(tmp_path, ethanol):
    """The real measure: a model fitted (briefly) to 100 frames breaks bonds in MD; after refine, fewer
    replicas started from frames it never saw break within the same time."""
    from stable_md.pretrain import PretrainSettings, SplitSettings, pretrain

    weak = tmp_path / "weak.pt"
    pretrain(ethanol, "schnet", weak, split=SplitSettings(n_train=100, n_val=50, n_test=100, seed=0),
             settings=PretrainSettings(epochs=30, lr=3e-3, batch_size=10, seed=0),
             hyperparameters=FAST_SCHNET, progress=False)
    settings = RefineSettings(n_replicas=32, steps_per_epoch=400, max_cycles=3, max_epochs=30,
                              max_simulation_time=6000.0, seed=0)
    result = refine(weak, ethanol, tmp_path / "weak.stable.pt", settings, progress=False)
    assert result.summary["refined"] and result.summary["learning_epochs"] >= 2
    assert {row["phase"] for row in result.history} == {"simulation", "learning"}

    held_out = np.asarray(read_metadata(weak)["history"][0]["test_indices"])
    starts = held_out[np.linspace(0, len(held_out) - 1, 48).round().astype(int)]
    before = unstable_count(weak, ethanol, starts, threshold=0.25, steps=4000)
    after = unstable_count(tmp_path / "weak.stable.pt", ethanol, starts, threshold=0.25, steps=4000)
    print(f"held-out replicas unstable within 2 ps: {before} of 48 before refine, {after} after")
    assert before >= 4, "the weak model should break bonds often enough to measure"
    assert after < before
    errors_before = result.summary["test_errors_before"]["force_mae_meV_per_A"]
    errors_after = result.summary["test_errors_after"]["force_mae_meV_per_A"]
    assert errors_after < 1.25 * errors_before


def test_refine_advises_a_larger_observable_weight_when_the_observable_cannot_steer(tmp_path, pretrained_model,
                                                                                    ethanol_path):
    result = refine(pretrained_model, ethanol_path, tmp_path / "weak.stable.pt",
                    quick_settings(observable_weights=[1e-6], max_cycles=1, max_epochs=2), progress=False)
    learning = [row for row in result.history if row["phase"] == "learning"]
    assert learning and all(row["observable_grad_norm"] < 0.05 * row["grad_norm"] for row in learning)
    assert "--obs-weight" in result.summary["advice"]
    suggested = float(result.summary["advice"].split("--obs-weight ")[1].split()[0])
    assert suggested > 1e-4  # at least a hundred times the weight that was too small
    balanced = refine(pretrained_model, ethanol_path, tmp_path / "ok.stable.pt",
                      quick_settings(max_cycles=1, max_epochs=2, qm_weight=0.0), progress=False)
    assert balanced.summary["advice"] is None
