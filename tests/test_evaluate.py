"""stable-md evaluate: identical held-out starts, stable times, observable errors, reweighting, resume, CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from openmm_bridge.md_settings import MDSettings
from stable_md.cli import main
from stable_md.evaluation import EvaluateSettings, evaluate
from stable_md.potentials.model_file import load_model, save_model
from stable_md.reweighting import temperature_weights
from stable_md.units import KB_EV_PER_K

pytest.importorskip("openmm")

QUICK = dict(n_replicas=6, total_time=300.0, check_every=20, vacf_window=40, error_frames=40)


def test_temperature_weights_reproduce_a_harmonic_oscillator_at_another_temperature():
    rng = np.random.default_rng(0)
    k = 2.0  # eV/Å²
    t1, t2 = 500.0, 350.0
    x = rng.normal(0.0, np.sqrt(KB_EV_PER_K * t1 / k), size=200_000)
    energies = 0.5 * k * x ** 2 - 1500.0  # absolute offsets must not matter
    reweighted = temperature_weights(energies, t1, t2)
    assert np.isclose(reweighted.weights.sum(), 1.0)
    assert (reweighted.weights * x ** 2).sum() == pytest.approx(KB_EV_PER_K * t2 / k, rel=0.01)
    assert 0.5 * len(x) < reweighted.effective_samples < len(x)
    same = temperature_weights(energies, t1, t1)
    assert same.effective_samples == pytest.approx(len(x), rel=1e-9)
    with pytest.raises(ValueError, match="to_temperature"):
        temperature_weights(energies, t1, 0.0)


def test_two_copies_of_a_model_see_identical_held_out_starts(tmp_path, pretrained_model, ethanol):
    report = evaluate([pretrained_model, pretrained_model], ethanol, tmp_path / "eval",
                      EvaluateSettings(**QUICK), labels=["a", "b"], progress=False)
    a, b = report["models"]
    # Same starts and velocities, same model: the same trajectories and verdicts.
    assert a["stable_time_ps"] == b["stable_time_ps"]
    assert a["observable"]["mean"] == b["observable"]["mean"]
    assert a["errors"] == b["errors"]

    from stable_md.potentials import read_metadata

    history = read_metadata(pretrained_model)["history"][0]
    trained = set(history["train_indices"]) | set(history["val_indices"])
    assert len(report["start_frames"]) == 6 and not trained & set(report["start_frames"])
    assert report["held_out_frames"] == len(ethanol) - len(trained)

    total_ps = QUICK["total_time"] / 1000.0
    times = np.array(a["stable_time_ps"])
    assert np.all((times >= 0) & (times <= total_ps + 1e-9))
    assert a["n_unstable"] == int(np.sum(a["unstable"])) == int(np.sum(times < total_ps - 1e-9))
    # survival statistics: KM median (the cap when fewer than half failed), RMST = mean of the capped times
    survival = a["survival"]
    assert survival["n"] == 6 and survival["n_unstable"] == a["n_unstable"]
    ordered = np.sort(times)
    expected_median = ordered[2] if a["n_unstable"] >= 3 else total_ps
    assert a["median_stable_time_ps"] == pytest.approx(expected_median)
    assert a["median_censored"] == (a["n_unstable"] < 3)
    assert survival["rmst_ps"] == pytest.approx(times.mean())
    assert survival["rmst_ci_ps"][0] <= survival["rmst_ps"] <= survival["rmst_ci_ps"][1]
    (comparison,) = report["comparisons"]
    assert comparison["label"] == "b" and comparison["baseline"] == "a"
    assert comparison["logrank_p"] == pytest.approx(1.0) and comparison["rmst_ratio"] == pytest.approx(1.0)
    from stable_md.evaluation import summary_table

    table = summary_table(report)
    assert "log-rank p" in table[0] and "1 (baseline)" in table[1] and "Kaplan-Meier" in table[-1]
    fraction = np.array(a["unstable_fraction_curve"]["fraction"])
    assert np.all(np.diff(fraction) >= 0) and fraction[-1] == pytest.approx(a["unstable_fraction_end"])

    # The h(r) error is ∫|h − h_ref| dr of the stored curves.
    x = np.array(a["observable"]["x"])
    mean, reference = np.array(a["observable"]["mean"]), np.array(report["reference_curve"]["values"])
    assert a["observable"]["samples"] > 0
    assert a["observable"]["error"] == pytest.approx(np.abs(mean - reference).sum() * (x[1] - x[0]))
    assert np.trapezoid(mean, x) == pytest.approx(1.0, abs=0.02)
    for name in ("stability.png", "stable_times.png", "hr.png", "evaluation.json"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["models"][0]["label"] == "a"


def test_reweighted_reference_and_resume(tmp_path, pretrained_model, ethanol, monkeypatch):
    settings = EvaluateSettings(**{**QUICK, "n_replicas": 3, "vacf_window": 0}, md=MDSettings(temperature=350.0),
                                data_temperature=500.0)
    first = evaluate([pretrained_model], ethanol, tmp_path / "cold", settings, labels=["m"], progress=False)
    reweighting = first["reference"]["reweighting"]
    assert reweighting["to_temperature_K"] == 350.0 and 1 < reweighting["effective_samples"] < len(ethanol)
    plain = evaluate([pretrained_model], ethanol, tmp_path / "plain",
                     EvaluateSettings(**{**QUICK, "n_replicas": 3, "vacf_window": 0}, md=MDSettings(temperature=350.0)),
                     labels=["m"], progress=False)
    assert plain["reference"]["reweighting"] is None
    assert not np.allclose(first["reference_curve"]["values"], plain["reference_curve"]["values"])

    # Nothing is silently replaced; --resume keeps finished models as they are.
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate([pretrained_model], ethanol, tmp_path / "cold", settings, labels=["m"], progress=False)
    resumed = evaluate([pretrained_model], ethanol, tmp_path / "cold", settings, labels=["m"], resume=True,
                       progress=False)
    assert resumed["models"][0]["wall_seconds"] == first["models"][0]["wall_seconds"]
    with pytest.raises(ValueError, match="temperature"):
        evaluate([pretrained_model], ethanol, tmp_path / "cold", EvaluateSettings(**QUICK), labels=["m"],
                 resume=True, progress=False)
    # a resume may add a model, but only one that leaves the same held-out starts of the same data
    moved = ethanol.subset(np.arange(len(ethanol)))
    moved.positions = moved.positions + 1e-3
    moved.origin = None  # other frames than the file's: another fingerprint, and no model trained on them
    other_frames = moved
    with pytest.raises(ValueError, match="other data"):
        evaluate([pretrained_model], other_frames, tmp_path / "cold", settings, labels=["m"], resume=True,
                 progress=False)
    added = evaluate([pretrained_model, pretrained_model], ethanol, tmp_path / "cold", settings,
                     labels=["m", "again"], resume=True, progress=False)
    assert added["models"][0]["wall_seconds"] == first["models"][0]["wall_seconds"]
    assert added["start_frames"] == first["start_frames"] and [m["label"] for m in added["models"]] == ["m", "again"]

    # The same model file named by a relative path from another working directory, or a byte-identical copy,
    # resumes; another model under a finished label is refused, and nothing is rewritten.
    copy = tmp_path / "elsewhere" / "copy.pt"
    copy.parent.mkdir()
    shutil.copyfile(pretrained_model, copy)
    monkeypatch.chdir(copy.parent)
    again = evaluate(["copy.pt"], ethanol, "../cold", settings, labels=["m"], resume=True, progress=False)
    assert again["models"][0]["wall_seconds"] == first["models"][0]["wall_seconds"]
    changed = load_model(pretrained_model)
    with torch.no_grad():
        next(changed.module.parameters()).add_(1e-3)
    save_model(changed.module, "changed.pt", changed.metadata)
    plan = (tmp_path / "cold" / "plan.json").read_bytes()
    with pytest.raises(ValueError, match="another model file"):
        evaluate(["changed.pt"], ethanol, "../cold", settings, labels=["m"], resume=True, progress=False)
    assert (tmp_path / "cold" / "plan.json").read_bytes() == plan


def test_cli_evaluate_prints_the_table_and_names_bad_input(tmp_path, pretrained_model, ethanol_path, capsys):
    out = tmp_path / "cli"
    args = ["evaluate", str(pretrained_model), "--data", str(ethanol_path), "-o", str(out), "--replicas", "4",
            "--time", "0.2ps", "--check-every", "20", "--vacf-window", "20", "--error-frames", "20", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "median stable (ps)" in printed and "ethanol_schnet" in printed and "evaluation.json" in printed
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args[:4] + ["-o", str(tmp_path / "x"), "--label", "a", "--label", "b"]) == 2
    assert "1 models but 2 labels" in capsys.readouterr().err
    assert main(args[:4] + ["-o", str(tmp_path / "y"), "--criterion", "rdf"]) == 2
    assert "periodic box" in capsys.readouterr().err
    # an OpenMM platform this machine lacks is named before the output directory is made (issue 12 row 11)
    import openmm

    present = {openmm.Platform.getPlatform(k).getName() for k in range(openmm.Platform.getNumPlatforms())}
    absent = [name for name in ("CUDA", "OpenCL") if name not in present]
    if absent:
        assert main(args[:4] + ["-o", str(tmp_path / "z"), "--platform", absent[0]]) == 2
        assert f"OpenMM platform '{absent[0]}' is not available here" in capsys.readouterr().err
        assert not (tmp_path / "z").exists()


def test_evaluate_refuses_elements_the_model_does_not_know(tmp_path, pretrained_model, ethanol):
    from stable_md.data import Dataset

    other = Dataset(positions=ethanol.positions[:50], numbers=np.where(ethanol.numbers == 8, 7, ethanol.numbers),
                    energies=ethanol.energies[:50], forces=ethanol.forces[:50], source="nitrogen.xyz")
    with pytest.raises(ValueError, match=r"nitrogen.xyz contains elements .*\[7\]"):
        evaluate([pretrained_model], other, tmp_path / "n", EvaluateSettings(**QUICK), progress=False)


def test_an_empty_models_directory_counts_as_no_evaluation(tmp_path):
    from stable_md.evaluation import _prepare

    directory = tmp_path / "eval"
    (directory / "models").mkdir(parents=True)  # what a start that failed before its first result leaves
    _prepare(directory, overwrite=False, resume=False)
    (directory / "models" / "a.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds an evaluation \\(models, ...\\); pass --overwrite"):
        _prepare(directory, overwrite=False, resume=False)


def test_a_replica_failing_at_the_last_check_counts_and_no_passed_check_means_no_observable_error(
        tmp_path, pretrained_model, ethanol):
    """Issue 12 row 18: with one check in the run and every replica broken at it, evaluate once reported the
    replicas as never failing ('>= 0.05 ps') and an h(r) error (from the start frames, which are data)."""
    from stable_md.evaluation import TABLE_COLUMNS, table_rows

    models = {}
    for name, factor in (("inverted", -1.0), ("exploding", 1e5)):
        loaded = load_model(pretrained_model)
        with torch.no_grad():
            # inverted: every bond minimum becomes a maximum, atoms fly apart at ordinary forces; exploding:
            # forces far beyond what a step can integrate, caught by the engine's non-finite check
            loaded.module.energy_scale.mul_(factor)
        models[name] = save_model(loaded.module, tmp_path / f"{name}.pt", loaded.metadata)
    settings = EvaluateSettings(**{**QUICK, "n_replicas": 4, "total_time": 50.0, "check_every": 100,
                                   "vacf_window": 0})
    report = evaluate([pretrained_model, models["inverted"], models["exploding"]], ethanol, tmp_path / "e", settings,
                      labels=["fit", "inverted", "exploding"], progress=False)
    fit, inverted, exploding = report["models"]
    assert inverted["unstable"] == [True] * 4
    assert inverted["stable_time_ps"] == [0.05] * 4  # found at the only check, at the end of the run
    assert all("bond" in reason for reason in inverted["reasons"].values())
    assert exploding["unstable"] == [True] * 4 and all(0 < t <= 0.05 for t in exploding["stable_time_ps"])
    for broken in (inverted, exploding):
        assert broken["observable"]["error"] is None and broken["observable"]["samples"] == 0
    assert fit["observable"]["samples"] == 4 - fit["n_unstable"]  # only the check at 50 fs is sampled
    rows = {row[0]: dict(zip(TABLE_COLUMNS, row)) for row in table_rows(report)}
    assert rows["inverted"]["error"] == "n/a" and rows["inverted"]["unstable at end"] == "4/4"
    assert rows["inverted"]["median stable (ps) [95% CI]"].startswith("0.05 ")


def test_an_overwrite_deletes_nothing_it_did_not_write(tmp_path):
    """--overwrite clears an earlier evaluation's files, but a file of the user's in models/ stops it, named, before
    anything is deleted."""
    from stable_md.evaluation import RUN_LAYOUT

    directory = tmp_path / "eval"
    (directory / "models").mkdir(parents=True)
    (directory / "models" / "a.json").write_text("{}")
    (directory / "models" / "notes.txt").write_text("mine")
    (directory / "evaluation.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"already holds an evaluation \(evaluation.json, ...\)"):
        RUN_LAYOUT.prepare(directory, overwrite=False, resume=False)
    existing = RUN_LAYOUT.prepare(directory, overwrite=True, resume=False)
    with pytest.raises(FileExistsError, match="models holds files stable-md did not write \\(notes.txt"):
        RUN_LAYOUT.clear(existing)
    assert (directory / "evaluation.json").exists() and (directory / "models" / "a.json").exists()
    (directory / "models" / "notes.txt").unlink()
    RUN_LAYOUT.clear(existing)
    assert not (directory / "evaluation.json").exists() and not (directory / "models").exists()
