"""`stable-md simulate`: files MDTraj reads, the summary, resume after a kill, refusals and bad input."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import mdtraj
import numpy as np
import pytest
import torch

from conftest import assert_same_simulate_runs
from stable_md.cli import main


def _args(model, data, output, *extra):
    return ["simulate", str(model), "--data", str(data), "-o", str(output), "--replicas", "3",
            "--temperature", "500", "--timestep", "0.5", "--time", "60fs", "--check-every", "20",
            "--no-progress", *extra]


def test_simulate_writes_trajectories_log_and_summary(pretrained_model, ethanol_path, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(pretrained_model, ethanol_path, run, "--integrator", "nose-hoover")) == 0
    printed = capsys.readouterr().out
    assert "3 replicas of 9 atoms" in printed and "unstable replicas: 0 of 3" in printed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 120 and summary["n_unstable"] == 0
    assert summary["time_ps"] == pytest.approx(0.06)
    assert summary["settings"]["integrator"] == "nose-hoover"
    assert summary["replica_steps_per_second"] > 0
    assert summary["stability_reference"] == "bonds of the data file's frames"
    for entry in summary["replicas"]:
        trajectory = mdtraj.load(str(run / entry["trajectory"]), top=str(run / "topology.pdb"))
        assert trajectory.n_frames == entry["frames"] == 7  # steps 0, 20, ..., 120
        assert trajectory.n_atoms == 9
        assert [atom.element.symbol for atom in trajectory.topology.atoms] == ["C", "C", "O"] + ["H"] * 6
        assert 100 < entry["mean_temperature_K"] < 1500
    # Frame 0 is the starting frame the data set gave (MDTraj reads nm, DCD stores float32).
    first = mdtraj.load_frame(str(run / "replica_000.dcd"), 0, top=str(run / "topology.pdb"))
    from stable_md.data import load_dataset

    np.testing.assert_allclose(first.xyz[0] * 10, load_dataset(ethanol_path).positions[0], atol=1e-4)
    with open(run / "state.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 * 3
    assert {row["status"] for row in rows} == {"running"}
    assert [int(row["step"]) for row in rows[::3]] == list(range(0, 121, 20))
    assert all(float(row["potential_eV"]) < 0 for row in rows)


def test_a_structure_alone_is_guarded_by_the_bonds_the_model_stores(pretrained_model, ethanol, tmp_path, capsys):
    from ase import Atoms
    from ase.io import write

    structure = tmp_path / "ethanol.xyz"
    write(structure, Atoms(numbers=ethanol.numbers, positions=ethanol.positions[7]))
    run = tmp_path / "run"
    assert main(["simulate", str(pretrained_model), "--structure", str(structure), "-o", str(run), "--replicas", "2",
                 "--time", "20fs", "--check-every", "10", "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stability_reference"].startswith("bonds the model stores (200 training frames of")
    # a molecule the model stores no bonds for: its starting structure's, said so
    water = tmp_path / "water.xyz"
    water.write_text("3\n\nO 0 0 0\nH 0.96 0 0\nH 0 0.96 0\n")
    assert main(["simulate", str(pretrained_model), "--structure", str(water), "-o", str(tmp_path / "w"),
                 "--replicas", "1", "--time", "5fs", "--check-every", "10", "--no-progress"]) == 0
    note = json.loads((tmp_path / "w" / "summary.json").read_text())["stability_reference"]
    assert note.startswith("bonds of the starting structure") and "is for other atoms" in note


def test_simulate_refuses_to_overwrite_and_names_bad_input(pretrained_model, ethanol_path, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(pretrained_model, ethanol_path, run)) == 0
    capsys.readouterr()
    assert main(_args(pretrained_model, ethanol_path, run)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(_args(pretrained_model, ethanol_path, run, "--overwrite", "--integrator", "verlet")) == 0
    assert json.loads((run / "summary.json").read_text())["settings"]["integrator"] == "verlet"
    capsys.readouterr()
    assert main(_args(pretrained_model, ethanol_path, tmp_path / "r2") + ["--time", "ten"]) == 2
    assert "cannot read 'ten' as a time" in capsys.readouterr().err
    water = tmp_path / "water.xyz"
    water.write_text("3\n\nO 0 0 0\nH 0.96 0 0\nS 0 0.96 0\n")
    assert main(["simulate", str(pretrained_model), "--structure", str(water), "-o", str(tmp_path / "r3"),
                 "--no-progress"]) == 2
    assert "not trained on: atomic numbers [16]" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "none.pt"), "--structure", str(water), "-o", str(tmp_path / "r4"),
                 "--no-progress"]) == 2
    assert "none.pt does not exist" in capsys.readouterr().err
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is\nnot a structure\n")
    assert main(["simulate", str(pretrained_model), "--structure", str(garbage), "-o", str(tmp_path / "r5"),
                 "--no-progress"]) == 2
    assert "garbage.xyz: cannot be read by ASE" in capsys.readouterr().err


def test_simulate_checks_input_before_it_writes_anything(pretrained_model, ethanol_path, tmp_path, capsys):
    from ase import Atoms
    from ase.io import write

    from stable_md.potentials import read_metadata

    # a periodic box narrower than twice the cutoff: the widths and the cutoff, no traceback, no run folder
    cutoff = read_metadata(pretrained_model)["cutoff"]
    box = tmp_path / "small_box.xyz"
    write(box, Atoms("OH2", positions=[[1, 1, 1], [1.96, 1, 1], [1, 1.96, 1]], cell=[4, 4, 4], pbc=True))
    run = tmp_path / "boxed"
    assert main(["simulate", str(pretrained_model), "--structure", str(box), "-o", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"4.000, 4.000, 4.000 Å between opposite faces; the model's cutoff is {cutoff:g} Å" in err, err
    assert not run.exists()
    # coordinates that are not numbers
    nan = tmp_path / "nan.xyz"
    nan.write_text("3\n\nO 0 0 0\nH 0.96 0 0\nH nan 0.96 0\n")
    assert main(["simulate", str(pretrained_model), "--structure", str(nan), "-o", str(run), "--no-progress"]) == 2
    assert "frame 0 atom 2" in capsys.readouterr().err and not run.exists()
    # a device this machine lacks fails before the run directory is made
    if not torch.cuda.is_available():
        assert main(_args(pretrained_model, ethanol_path, run, "--device", "cuda")) == 2
        assert "sees no CUDA device" in capsys.readouterr().err and not run.exists()
    # what a start that failed before its first frame left (no checkpoint, no summary) counts as no run
    run.mkdir()
    (run / "settings.json").write_text("{}")
    (run / "topology.pdb").write_text("")
    (run / "notes.txt").write_text("mine")
    assert main(_args(pretrained_model, ethanol_path, run)) == 0
    capsys.readouterr()
    assert json.loads((run / "settings.json").read_text())["n_replicas"] == 3
    assert (run / "notes.txt").read_text() == "mine"  # only files a run writes are replaced
    # a truncated checkpoint is named, not a BadZipFile traceback
    checkpoint = run / "checkpoint.npz"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert main(_args(pretrained_model, ethanol_path, run, "--resume")) == 2
    assert f"{checkpoint}: cannot read the simulate checkpoint; it is damaged" in capsys.readouterr().err


def test_killed_run_resumes_to_the_same_trajectories(pretrained_model, ethanol_path, tmp_path, capsys):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    long = ["--time", "1ps", "--integrator", "langevin"]
    assert main(_args(pretrained_model, ethanol_path, reference, *long)) == 0
    command = [sys.executable, "-m", "stable_md.cli", *_args(pretrained_model, ethanol_path, resumed, *long)]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = resumed / "state.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= 1 + 3 * 15:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (resumed / "summary.json").exists(), "the run should have died mid-way"

    assert main(_args(pretrained_model, ethanol_path, resumed, *long, "--resume")) == 0
    assert_same_simulate_runs(reference, resumed, n_replicas=3, n_frames=101)

    # OpenMM loads a checkpoint only on the platform that wrote it: another one is named, not a traceback
    assert main(_args(pretrained_model, ethanol_path, resumed, "--integrator", "langevin", "--time", "1.1ps",
                      "--platform", "Reference", "--resume")) == 2
    err = capsys.readouterr().err
    assert "platform: run has 'CPU', now 'Reference' (pass --platform CPU)" in err and "Traceback" not in err, err
    # A finished run can be extended with a longer --time (a record from before platforms were kept: CPU).
    settings = json.loads((resumed / "settings.json").read_text())
    del settings["platform"]
    (resumed / "settings.json").write_text(json.dumps(settings))
    assert main(_args(pretrained_model, ethanol_path, resumed, "--integrator", "langevin", "--time", "1.1ps",
                      "--resume")) == 0
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 2200
    # The same model named by another path (a copy) resumes; other bytes under that path are refused.
    copy = tmp_path / "elsewhere" / "model-copy.pt"
    copy.parent.mkdir()
    copy.write_bytes(pretrained_model.read_bytes())
    assert main(_args(copy, ethanol_path, resumed, "--integrator", "langevin", "--time", "1.15ps", "--resume")) == 0
    from conftest import FAST_SCHNET
    from stable_md.potentials import build_metadata, build_potential, save_model

    torch.manual_seed(5)
    other, hyper = build_potential("schnet", [1, 6, 8], **FAST_SCHNET)
    save_model(other, copy, build_metadata(other, hyper), overwrite=True)
    capsys.readouterr()
    assert main(_args(copy, ethanol_path, resumed, "--integrator", "langevin", "--time", "1.2ps", "--resume")) == 2
    assert "model-copy.pt is not the file the run started with" in capsys.readouterr().err
    # Changing what the run is about is refused.
    assert main(_args(pretrained_model, ethanol_path, resumed, "--integrator", "verlet", "--time", "1.2ps",
                      "--resume")) == 2
