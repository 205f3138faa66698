"""Refine epoch throughput on 2 ranks over 1 rank (`refine --nproc`), measured side by side in one run.

Both configurations build the same refine run (R replicas of aspirin, the default-size SchNet,
refine's default settings but for a shorter epoch) and time the same epochs through the code
refine itself runs: simulation epochs (t steps of every replica with checks and samples) and
learning epochs (rewind, t steps, the Boltzmann estimator over all samples and the energy/force
step). With --nproc 2 each rank runs R/2 replicas on its own core, its share of the estimator's
samples and of the energy/force minibatch; the sums and the gradient go over gloo. Target on a
2-core machine: >= 1.8x.

The bond criterion's threshold is raised (5 Å) so that replicas stop only on non-finite values (a
stopped replica costs nothing); the printed count of replicas still running at the end shows that
both configurations did the same work.

    python benchmarks/distributed.py [--model m.pt] [--replicas 32] [--steps 200] [--epochs 2]

Without --model it pretrains a default SchNet on data/aspirin_xtb_500K.npz first (a few minutes).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from stable_md.distributed import current_group, launch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "aspirin_xtb_500K.npz"


def time_epochs(model: str, data: str, directory: str, replicas: int, steps: int, epochs: int) -> dict:
    """Seconds per simulation epoch and per learning epoch of a refine run on this process's group."""
    from stable_md.refinement import RefineSettings, _Refinement

    group = current_group()
    settings = RefineSettings(n_replicas=replicas, steps_per_epoch=steps, threshold=5.0)
    run = _Refinement(model, data, Path(directory) / "out.pt", Path(directory), settings, resume=False,
                      progress=False, group=group)
    run._simulation_epoch()  # warm-up: first force calls, the estimator's first graph
    run._learning_epoch()
    seconds = {"simulation": [], "learning": []}
    for _ in range(epochs):
        group.barrier()
        started = time.perf_counter()
        run._simulation_epoch()
        group.barrier()
        seconds["simulation"].append(time.perf_counter() - started)
    for _ in range(epochs):
        group.barrier()
        started = time.perf_counter()
        row = run._learning_epoch()
        group.barrier()
        seconds["learning"].append(time.perf_counter() - started)
        assert "skipped" not in row, row
    running = int(group.sum(int(run.replicas.running.sum())))
    return {"simulation_s": float(np.median(seconds["simulation"])),
            "learning_s": float(np.median(seconds["learning"])), "running": running}


def pretrained_model(directory: Path) -> Path:
    from stable_md.data import load_dataset
    from stable_md.pretrain import PretrainSettings, SplitSettings, pretrain

    output = directory / "aspirin_schnet.pt"
    print(f"pretraining a default SchNet on {DATA.name} (400 frames, 10 epochs) ...", flush=True)
    pretrain(load_dataset(DATA), "schnet", output, split=SplitSettings(n_train=400, n_val=50, n_test=50, seed=0),
             settings=PretrainSettings(epochs=10, lr=1e-3, batch_size=10, seed=0), progress=False)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a stable-md model of aspirin (default: pretrain one)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--replicas", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="MD steps per epoch (refine's default is 1000)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs of each phase (median reported)")
    args = parser.parse_args()
    from stable_md._threads import limit_threads

    limit_threads()  # one thread per rank, as the launched ranks have
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = args.model or str(pretrained_model(scratch))
        results = {}
        for nproc in (1, 2):
            directory = scratch / f"ranks_{nproc}"
            directory.mkdir()
            results[nproc] = launch(nproc, time_epochs, (model, args.data, str(directory), args.replicas, args.steps,
                                                         args.epochs))
    one, two = results[1], results[2]
    print(f"\n{args.replicas} aspirin replicas, default SchNet, {args.steps} steps per epoch "
          f"(median of {args.epochs} epochs of each phase; running replicas at the end: {one['running']} and "
          f"{two['running']})")
    print(f"{'':>12} {'1 rank (s)':>11} {'2 ranks (s)':>12} {'speed-up':>9}")
    for phase in ("simulation", "learning"):
        a, b = one[f"{phase}_s"], two[f"{phase}_s"]
        print(f"{phase:>12} {a:>11.2f} {b:>12.2f} {a / b:>8.2f}x")
    total_one = one["simulation_s"] + one["learning_s"]
    total_two = two["simulation_s"] + two["learning_s"]
    print(f"{'both':>12} {total_one:>11.2f} {total_two:>12.2f} {total_one / total_two:>8.2f}x   (target >= 1.8x)")


if __name__ == "__main__":
    main()
