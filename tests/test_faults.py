"""SIGKILL at random moments: pretrain, refine and simulate, killed several times each and resumed, end exactly
where an uninterrupted run ends, and leave no stale file of their own behind (issue 12, fault tests).

Each run is killed at moments drawn from a seeded generator as fractions of the uninterrupted run's wall time
(interpreter start-up included, so a kill may also land before the first checkpoint: such a start counts as
no run, and the next start needs neither --resume nor --overwrite)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST_SCHNET, assert_same_simulate_runs, log_without_wall_time, run_with_kills
from stable_md.potentials import load_model

pytest.importorskip("openmm")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
KILLS = 3


def _stable_md(*args: str) -> list[str]:
    return [sys.executable, "-m", "stable_md.cli", *args]


def _timed_run(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return time.perf_counter() - started


def _moments(reference_seconds: float, seed: int) -> list[float]:
    return list(np.random.default_rng(seed).uniform(0.15, 0.55, KILLS) * reference_seconds)


def _stale_files(*directories: Path) -> list[Path]:
    """Temporaries of our atomic writes (``.NAME.XXXX.tmp``) anywhere below ``directories``."""
    return [path for directory in directories for path in directory.rglob(".*.tmp")]


def _parameters(path: Path) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in load_model(path).module.parameters()])


def test_pretrain_killed_at_random_moments_resumes_to_the_same_model(tmp_path, ethanol_path):
    def command(output: Path) -> list[str]:
        return _stable_md("pretrain", "--data", str(ethanol_path), "-o", str(output), "--n-train", "60", "--n-val",
                          "20", "--n-test", "20", "--epochs", "25", "--batch-size", "10", "--patience", "100",
                          "--no-progress", "--seed", "3",
                          *sum((["--hyper", f"{k}={v}"] for k, v in FAST_SCHNET.items()), []))

    reference, killed = tmp_path / "reference" / "m.pt", tmp_path / "killed" / "m.pt"
    reference.parent.mkdir(), killed.parent.mkdir()
    seconds = _timed_run(command(reference))
    landed = run_with_kills(command(killed), _moments(seconds, seed=1), killed.with_suffix(".ckpt.pt"),
                             killed.exists)
    assert landed >= 2, f"only {landed} of {KILLS} kills landed before the run ended"
    torch.testing.assert_close(_parameters(killed), _parameters(reference), rtol=0, atol=0)
    assert log_without_wall_time(killed.with_suffix(".log.jsonl")) == \
        log_without_wall_time(reference.with_suffix(".log.jsonl"))
    assert not killed.with_suffix(".ckpt.pt").exists() and not _stale_files(killed.parent)


def test_refine_killed_at_random_moments_resumes_to_the_same_model(tmp_path, pretrained_model, ethanol_path):
    def command(output: Path) -> list[str]:
        return _stable_md("refine", str(pretrained_model), "--data", str(ethanol_path), "--obs", "hr", "-o",
                          str(output), "--replicas", "8", "--steps-per-epoch", "100", "--threshold", "0.15",
                          "--f-max", "0.1", "--max-cycles", "2", "--max-epochs", "6", "--learning-patience", "2",
                          "--max-sim-time", "3ps", "--qm-batch", "16", "--seed", "3", "--no-progress")

    reference, killed = tmp_path / "reference" / "m.stable.pt", tmp_path / "killed" / "m.stable.pt"
    reference.parent.mkdir(), killed.parent.mkdir()
    seconds = _timed_run(command(reference))
    run = killed.with_suffix(".refine")
    landed = run_with_kills(command(killed), _moments(seconds, seed=2), run / "checkpoint.pt",
                             lambda: (run / "summary.json").exists())
    assert landed >= 2, f"only {landed} of {KILLS} kills landed before the run ended"
    torch.testing.assert_close(_parameters(killed), _parameters(reference), rtol=0, atol=0)
    assert log_without_wall_time(run / "log.jsonl") == \
        log_without_wall_time(reference.with_suffix(".refine") / "log.jsonl")
    assert not _stale_files(killed.parent)


def test_simulate_killed_at_random_moments_resumes_to_the_same_trajectories(tmp_path, pretrained_model,
                                                                              ethanol_path):
    def command(output: Path) -> list[str]:
        return _stable_md("simulate", str(pretrained_model), "--data", str(ethanol_path), "-o", str(output),
                          "--replicas", "3", "--time", "1ps", "--integrator", "langevin", "--check-every", "20",
                          "--no-progress")

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    seconds = _timed_run(command(reference))
    landed = run_with_kills(command(killed), _moments(seconds, seed=3), killed / "checkpoint.npz",
                             lambda: (killed / "summary.json").exists())
    assert landed >= 2, f"only {landed} of {KILLS} kills landed before the run ended"
    assert_same_simulate_runs(reference, killed, n_replicas=3, n_frames=101)
    assert not _stale_files(killed)
