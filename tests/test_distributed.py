"""refine on several processes (torch.distributed, gloo): one learning step on two ranks is the step of one rank,
a two-rank run resumes after SIGKILL to the model of an uninterrupted one, torchrun runs the same code, and the
ranks' sums are sums (issue 13, item 5)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from openmm_bridge.md_settings import MDSettings
from conftest import log_without_wall_time, run_with_kills
from stable_md.distributed import SINGLE, ReplicaGroup, current_group, launch

pytest.importorskip("openmm")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
REFINE_ARGS = ["--obs", "hr", "--replicas", "8", "--steps-per-epoch", "100", "--threshold", "0.15", "--f-max", "0.1",
               "--max-cycles", "2", "--max-epochs", "6", "--learning-patience", "2", "--max-sim-time", "3ps",
               "--qm-batch", "16", "--seed", "3", "--no-progress"]


def _stable_md(*args: str) -> list[str]:
    return [sys.executable, "-m", "stable_md.cli", *args]


def _parameters(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in module.parameters()])


def _gradient(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().reshape(-1) for p in module.parameters() if p.grad is not None])


def _one_learning_step(model: str, data: str, directory: str, weights: list, samples: np.ndarray) -> dict:
    """Build a refine run on this process's group and take one learning step from its block of ``samples``."""
    from stable_md.refinement import RefineSettings, _Refinement

    group = current_group()
    settings = RefineSettings(observables=["hr", "bonds"], observable_weights=weights, n_replicas=4, qm_batch=10,
                              md=MDSettings(seed=5))
    run = _Refinement(model, data, Path(directory) / "out.pt", Path(directory), settings, resume=False,
                      progress=False, group=group)
    row = run._learn(samples[group.block(len(samples))], {"phase": "learning"})
    result = {"row": row, "parameters": _parameters(run.model), "gradient": _gradient(run.model)}
    everyone = group.gather(result["parameters"])
    if group.main:
        result["parameters_of_every_rank"] = everyone
    return result


@pytest.fixture(scope="module")
def samples(ethanol) -> np.ndarray:
    """41 frames near the data (an odd count, so that the ranks hold different numbers of samples)."""
    rng = np.random.default_rng(0)
    return ethanol.positions[:41] + rng.normal(0.0, 0.03, (41, *ethanol.positions.shape[1:]))


@pytest.mark.parametrize("weights", [["auto"], [3.0, 0.5]], ids=["auto-weights", "fixed-weights"])
def test_one_learning_step_on_two_ranks_is_the_step_of_one_rank(tmp_path, pretrained_model, ethanol_path, samples,
                                                                weights):
    """The estimator's weights use the mean over the samples of both ranks, the gradients and the energy/force
    minibatch (split 5 + 5 frames) are summed: gradient, parameters and logged numbers agree with one process to
    the rounding of the float32 model, and both ranks hold the same parameters. Measured here: the gradient
    differs by 2-4e-7 of its norm, the parameters by 4e-9 after an Adam step of 1e-4; the test allows 1e-5 and
    1e-6 (a rank estimating from its own samples alone is off by orders of magnitude more)."""
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    arguments = (str(pretrained_model), str(ethanol_path), weights, samples)
    one = _one_learning_step(arguments[0], arguments[1], str(tmp_path / "one"), weights, samples)
    two = launch(2, _one_learning_step, (arguments[0], arguments[1], str(tmp_path / "two"), weights, samples))
    assert "skipped" not in one["row"] and one["row"]["samples"] == two["row"]["samples"] == 41
    difference = float((two["gradient"] - one["gradient"]).norm() / one["gradient"].norm())
    moved = float((two["parameters"] - one["parameters"]).abs().max())
    assert difference < 1e-5
    assert moved < 1e-6
    assert not torch.equal(one["parameters"], _parameters(_loaded(pretrained_model)))  # a step was taken
    first, second = two["parameters_of_every_rank"]
    assert torch.equal(first, second)
    for key in ("observable_loss", "qm_loss", "qm_force_mae_meV_per_A", "grad_norm", "observable_grad_norm"):
        assert two["row"][key] == pytest.approx(one["row"][key], rel=1e-6), key


def _loaded(path: Path) -> torch.nn.Module:
    from stable_md.potentials import load_model

    return load_model(path).module


def _sum_on_ranks(values: list) -> dict:
    group = current_group()
    return {"sum": group.sum(values[group.rank]).tolist(), "block": group.block(7).tolist(),
            "broadcast": group.broadcast(f"from rank {group.rank}"), "gathered": group.gather(group.rank)}


def test_ranks_share_sums_blocks_and_rank_zeros_word():
    assert SINGLE.block(5).tolist() == [0, 1, 2, 3, 4] and SINGLE.sum([1.5, 2]).tolist() == [1.5, 2.0]
    assert [ReplicaGroup(r, 3).block(7).tolist() for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    result = launch(2, _sum_on_ranks, ([[1.0, 2.0], [10.0, 20.0]],))
    assert result == {"sum": [11.0, 22.0], "block": [0, 1, 2, 3], "broadcast": "from rank 0", "gathered": [0, 1]}


def _fail_on_rank_one() -> None:
    if current_group().rank == 1:
        raise ValueError("rank one refuses")
    current_group().barrier()  # rank 0 would wait here forever; the launcher stops it


def _raise_on_rank_one(kind: str) -> None:
    import json

    if current_group().rank == 1:
        if kind == "json":
            json.loads('{"epoch": 3, "cut')  # a log line cut by a kill: JSONDecodeError needs more than a message
        raise KeyError("energy")
    current_group().barrier()


def test_a_failing_rank_stops_the_others_and_its_error_reaches_the_caller():
    """A user-input error raised on one rank reaches the caller as the CLI's one-line kind (its own type, or the
    nearest one that can be made from its message), while the rank waiting for it is stopped."""
    started = time.perf_counter()
    with pytest.raises(ValueError, match="rank one refuses"):
        launch(2, _fail_on_rank_one)
    with pytest.raises(ValueError, match="Unterminated string") as caught:
        launch(2, _raise_on_rank_one, ("json",))
    assert type(caught.value) is ValueError
    with pytest.raises(KeyError, match="energy"):
        launch(2, _raise_on_rank_one, ("key",))
    assert time.perf_counter() - started < 180


def test_two_rank_refine_killed_at_random_moments_resumes_to_the_same_model(tmp_path, pretrained_model,
                                                                            ethanol_path):
    """Like tests/test_faults.py for one process: three SIGKILLs of `stable-md refine --nproc 2` (kill moments
    seeded, 15-55 % of an uninterrupted run), each followed by --resume, end with the model and log of the
    uninterrupted two-rank run, bit for bit; a resume with another --nproc is refused, naming the right one."""
    def command(output: Path) -> list[str]:
        return _stable_md("refine", str(pretrained_model), "--data", str(ethanol_path), "-o", str(output),
                          "--nproc", "2", *REFINE_ARGS)

    reference, killed = tmp_path / "reference" / "m.stable.pt", tmp_path / "killed" / "m.stable.pt"
    reference.parent.mkdir(), killed.parent.mkdir()
    started = time.perf_counter()
    result = subprocess.run(command(reference), env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    seconds = time.perf_counter() - started
    run = killed.with_suffix(".refine")
    moments = list(np.random.default_rng(4).uniform(0.15, 0.55, 3) * seconds)
    landed = run_with_kills(command(killed), moments, run / "checkpoint.pt", lambda: (run / "summary.json").exists())
    assert landed >= 2, f"only {landed} of 3 kills landed before the run ended"
    torch.testing.assert_close(_parameters(_loaded(killed)), _parameters(_loaded(reference)), rtol=0, atol=0)
    assert log_without_wall_time(run / "log.jsonl") == \
        log_without_wall_time(reference.with_suffix(".refine") / "log.jsonl")
    other = subprocess.run(_stable_md("refine", str(pretrained_model), "--data", str(ethanol_path), "-o",
                                      str(killed), *REFINE_ARGS, "--resume"),
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "--nproc 2" in other.stderr and "Traceback" not in other.stderr, other.stderr


def test_torchrun_ranks_refine_as_nproc_ranks_do(tmp_path, pretrained_model, ethanol_path):
    """The same two ranks started by torchrun (env:// rendezvous) instead of --nproc give the same model: the code
    that runs across nodes is the code tested here."""
    outputs = {}
    for how in ("nproc", "torchrun"):
        output = tmp_path / how / "m.stable.pt"
        output.parent.mkdir()
        args = ["refine", str(pretrained_model), "--data", str(ethanol_path), "-o", str(output), *REFINE_ARGS]
        if how == "nproc":
            command = _stable_md(*args, "--nproc", "2")
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                       "-m", "stable_md.cli", *args]
        result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("wrote ") == 1, result.stdout  # rank 0 alone reports
        outputs[how] = output
    torch.testing.assert_close(_parameters(_loaded(outputs["torchrun"])), _parameters(_loaded(outputs["nproc"])),
                               rtol=0, atol=0)


def test_bad_rank_counts_and_a_rank_s_input_error_are_one_line(tmp_path, pretrained_model, ethanol_path, monkeypatch,
                                                              capsys):
    """--nproc above the replica count, --nproc under torchrun, and an input error raised inside the ranks (every
    training frame fails the criterion) each end with one line and exit code 2, and leave no run behind."""
    from stable_md import cli

    def refine(*extra: str) -> tuple[int, str]:
        code = cli.main(["refine", str(pretrained_model), "--data", str(ethanol_path), "-o",
                         str(tmp_path / "m.stable.pt"), "--replicas", "4", "--no-progress", *extra])
        return code, capsys.readouterr().err

    code, err = refine("--nproc", "5")
    assert code == 2 and "--nproc must lie in 1..4" in err and err.count("\n") == 1
    code, err = refine("--nproc", "2", "--threshold", "0.0001")
    assert code == 2 and "already fails the bond criterion" in err and "Traceback" not in err, err
    assert not (tmp_path / "m.stable.refine" / "checkpoint.pt").exists() and not (tmp_path / "m.stable.pt").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, err = refine("--nproc", "2")
    assert code == 2 and "under torchrun the ranks are torchrun's" in err


SIMULATE_ARGS = ["--replicas", "3", "--time", "1ps", "--integrator", "langevin", "--check-every", "20", "--no-progress"]


def test_simulate_on_two_processes_tracks_one_process(tmp_path, pretrained_model, ethanol_path):
    """`simulate --nproc 2` (blocks of 2 and 1 replicas, Nosé-Hoover: no noise) writes the files one process
    writes, with the same replica numbering, steps and statuses; the replicas start alike, so their energies stay
    within 1e-3 eV of the one-process run over 0.5 ps (measured: 3e-5 eV; only the model's batch differs)."""
    import csv

    import mdtraj

    logs = {}
    for nproc in ("1", "2"):
        output = tmp_path / f"nproc{nproc}"
        result = subprocess.run(_stable_md("simulate", str(pretrained_model), "--data", str(ethanol_path), "-o",
                                           str(output), "--replicas", "3", "--time", "0.5ps", "--integrator",
                                           "nose-hoover", "--check-every", "20", "--no-progress", "--nproc", nproc),
                                env=ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        logs[nproc] = list(csv.reader(open(output / "state.csv")))
        frames = [mdtraj.load(str(output / f"replica_{r:03d}.dcd"), top=str(output / "topology.pdb")).n_frames
                  for r in range(3)]
        assert frames == [51, 51, 51]
    one, two = logs["1"], logs["2"]
    assert [row[:4] for row in two] == [row[:4] for row in one]
    energies = np.array([[float(row[4]) for row in log[1:]] for log in (one, two)])
    assert np.abs(energies[0] - energies[1]).max() < 1e-3


def test_two_process_simulate_killed_at_random_moments_resumes_to_the_same_trajectories(tmp_path, pretrained_model,
                                                                                         ethanol_path):
    """Three SIGKILLs of `simulate --nproc 2` (seeded moments), each resumed, end with the state log and the
    bit-identical DCDs of an uninterrupted two-process run; a resume on one process is refused, naming --nproc 2."""
    from conftest import assert_same_simulate_runs

    def command(output: Path) -> list[str]:
        return _stable_md("simulate", str(pretrained_model), "--data", str(ethanol_path), "-o", str(output),
                          "--nproc", "2", *SIMULATE_ARGS)

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    started = time.perf_counter()
    result = subprocess.run(command(reference), env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    moments = list(np.random.default_rng(5).uniform(0.15, 0.55, 3) * (time.perf_counter() - started))
    landed = run_with_kills(command(killed), moments, killed / "checkpoint.npz",
                            lambda: (killed / "summary.json").exists())
    assert landed >= 2, f"only {landed} of 3 kills landed before the run ended"
    assert_same_simulate_runs(reference, killed, n_replicas=3, n_frames=101)
    other = subprocess.run(_stable_md("simulate", str(pretrained_model), "--data", str(ethanol_path), "-o",
                                      str(killed), *SIMULATE_ARGS, "--resume"),
                           env=ENV, capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "--nproc 2" in other.stderr and "Traceback" not in other.stderr, other.stderr


def test_evaluate_on_two_processes_matches_one_process(tmp_path, pretrained_model, ethanol):
    """evaluate --nproc 2 splits each model's 6 replicas 3 + 3: same starts, velocities (Nosé-Hoover, no noise),
    verdicts and stable times, equal errors, and h(r) and VACF that differ from one process's only as far as the
    float32 model's batches of 3 instead of 6 round differently (measured: 3e-6 on h(r) values up to 0.4, 2e-8
    on the VACF; allowed 1e-4)."""
    from stable_md.evaluation import EvaluateSettings, evaluate

    settings = EvaluateSettings(n_replicas=6, total_time=300.0, check_every=20, vacf_window=40, error_frames=40,
                                threshold=0.3)
    reports = {nproc: evaluate([pretrained_model], ethanol, tmp_path / f"nproc{nproc}", settings, labels=["m"],
                               progress=False, nproc=nproc)["models"][0] for nproc in (1, 2)}
    one, two = reports[1], reports[2]
    assert two["stable_time_ps"] == one["stable_time_ps"] and two["unstable"] == one["unstable"]
    assert two["reasons"].keys() == one["reasons"].keys() and two["errors"] == one["errors"]
    assert two["observable"]["samples"] == one["observable"]["samples"] > 0
    np.testing.assert_allclose(two["observable"]["mean"], one["observable"]["mean"], rtol=0, atol=1e-4)
    assert two["vacf"]["replicas"] == one["vacf"]["replicas"]
    with pytest.raises(ValueError, match="--jobs 2 and --nproc 2: give one"):
        evaluate([pretrained_model], ethanol, tmp_path / "both", settings, jobs=2, nproc=2, progress=False)
    with pytest.raises(ValueError, match=r"--nproc must lie in 1\.\.6"):
        evaluate([pretrained_model], ethanol, tmp_path / "many", settings, nproc=7, progress=False)
    assert not (tmp_path / "both").exists() and not (tmp_path / "many").exists()
    np.testing.assert_allclose(two["vacf"]["mean"], one["vacf"]["mean"], rtol=0, atol=1e-4)
