"""--device on a GPU: every command runs there, and how much faster the replicas and refine epochs are.

Part 1 runs pretrain, refine (one process and --nproc 2), evaluate and simulate through the CLI with
--device DEVICE on bundled aspirin data and checks each exits 0 and writes its files.
Part 2 prints replica-steps/s of R aspirin replicas (default SchNet, untrained: speed does not depend
on training), side by side in one run:

- cpu: the model on one CPU thread, OpenMM's CPU platform (what the tests and CI run);
- DEVICE, CUDA platform: the default for --device cuda (the integrator on the same GPU);
- DEVICE, CPU platform: the model on the GPU, the integrator on the host (--platform CPU);
- DEVICE, per-replica: one Context per replica sharing the model (--mode per-replica);

Part 3 prints the seconds of one refine simulation epoch and one learning epoch on cpu and on DEVICE.

    python benchmarks/gpu.py [--device cuda] [--replicas 32 128 512] [--steps 50] [--skip-commands]

With ``--device cpu`` it runs on a machine without a GPU (every column then measures the CPU), which
checks the script itself.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "aspirin_xtb_500K.npz"
ASPIRIN = "CC(=O)OC1=CC=CC=C1C(=O)O"


def openmm_has_cuda() -> bool:
    import openmm

    return "CUDA" in [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def run_commands(device: str, folder: Path, extra: list[str]) -> None:
    """Each command with --device (and ``extra``): exit 0 and its files, or the command's stderr and exit 1."""
    cli = [sys.executable, "-m", "stable_md.cli"]
    model, refined = folder / "m.pt", folder / "m.stable.pt"
    small = ["--hyper", "hidden_channels=32", "--hyper", "num_filters=32", "--hyper", "num_interactions=2"]
    commands = [
        ("pretrain", ["pretrain", "--data", str(DATA), "-o", str(model), "--n-train", "200", "--n-val", "50",
                      "--n-test", "50", "--epochs", "5", "--no-progress", *small], [model]),
        ("refine", ["refine", str(model), "--data", str(DATA), "-o", str(refined), "--replicas", "16",
                    "--steps-per-epoch", "100", "--max-epochs", "4", "--no-progress"], [refined]),
        ("refine --nproc 2", ["refine", str(model), "--data", str(DATA), "-o", str(folder / "m2.pt"),
                              "--replicas", "16", "--steps-per-epoch", "100", "--max-epochs", "2", "--nproc", "2",
                              "--no-progress"], [folder / "m2.pt"]),
        ("evaluate", ["evaluate", str(model), str(refined), "--data", str(DATA), "--replicas", "8", "--time",
                      "0.5ps", "-o", str(folder / "evaluation"), "--no-progress"],
         [folder / "evaluation" / "evaluation.json"]),
        ("simulate", ["simulate", str(refined), "--data", str(DATA), "--replicas", "4", "--time", "0.2ps",
                      "-o", str(folder / "run"), "--no-progress"], [folder / "run" / "summary.json"]),
    ]
    for name, arguments, outputs in commands:
        started = time.perf_counter()
        extra_here = extra if name != "pretrain" else []
        result = subprocess.run(cli + arguments + ["--device", device] + extra_here, capture_output=True, text=True)
        missing = [str(path) for path in outputs if not path.exists()]
        if result.returncode not in (0, 1) or missing:  # refine exits 1 when it stops for another reason
            print(f"FAILED {name} --device {device}: exit {result.returncode}, missing {missing}\n{result.stderr}")
            sys.exit(1)
        print(f"ok {name} --device {device} ({time.perf_counter() - started:.0f} s, exit {result.returncode})",
              flush=True)


def replica_rate(model_path: Path, numbers, positions, steps: int, device: str, platform: str, mode: str) -> float:
    from openmm_bridge.replicas import ReplicaSet

    replicas = ReplicaSet(model_path, numbers, positions, integrator="langevin", temperature=500, timestep=0.5,
                          seed=0, mode=mode, device=device, platform=platform)
    replicas.run(5)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    replicas.run(steps)
    elapsed = time.perf_counter() - started
    assert not replicas.unstable.any(), "a benchmark replica went unstable; the rate would be wrong"
    return len(positions) * steps / elapsed


def refine_epochs(model: str, device: str, replicas: int, steps: int,
                  platform: str | None = None) -> tuple[float, float]:
    """Seconds of one simulation epoch and one learning epoch (after a warm-up of each)."""
    from openmm_bridge.md_settings import MDSettings
    from stable_md.refinement import RefineSettings, _Refinement

    with tempfile.TemporaryDirectory() as folder:
        settings = RefineSettings(n_replicas=replicas, steps_per_epoch=steps, threshold=5.0,
                                  md=MDSettings(device=device, platform=platform))
        run = _Refinement(model, str(DATA), Path(folder) / "out.pt", Path(folder), settings, resume=False,
                          progress=False)
        run._simulation_epoch()
        run._learning_epoch()
        started = time.perf_counter()
        run._simulation_epoch()
        simulation = time.perf_counter() - started
        started = time.perf_counter()
        run._learning_epoch()
        return simulation, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--replicas", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--steps", type=int, default=50, help="MD steps timed per configuration (default: 50)")
    parser.add_argument("--refine-replicas", type=int, default=32)
    parser.add_argument("--skip-commands", action="store_true", help="only the timings (parts 2 and 3)")
    args = parser.parse_args()
    from stable_md.devices import check_device
    from stable_md.potentials import build_metadata, build_potential, save_model
    from stable_md.refdata.xtb_md import molecule_from_smiles

    try:
        device = str(check_device(args.device))
    except ValueError as error:
        sys.exit(f"benchmarks/gpu.py: {error}; nothing measured")
    torch.set_num_threads(1)
    if device.startswith("cuda"):
        print(f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        extra = []
        if device.startswith("cuda") and not openmm_has_cuda():
            print("OpenMM has no CUDA platform here (pip install openmm[cuda12]); integrating on its CPU platform")
            extra = ["--platform", "CPU"]
        if not args.skip_commands:
            run_commands(device, folder, extra)
        atoms = molecule_from_smiles(ASPIRIN, seed=0)
        torch.manual_seed(0)
        potential, hyper = build_potential("schnet", sorted(set(atoms.numbers.tolist())))
        model_path = save_model(potential, folder / "aspirin.pt", build_metadata(potential, hyper))
        configurations = [("cpu", "cpu", "CPU", "batched"), (f"{device} CUDA", device, None, "batched"),
                          (f"{device} CPU-platform", device, "CPU", "batched"),
                          (f"{device} per-replica", device, None, "per-replica")]
        if not device.startswith("cuda"):
            configurations = configurations[:1] + [(f"{device} again", device, "CPU", "batched")]
        elif extra:
            configurations = [c if c[2] is not None else (c[0].replace("CUDA", "CPU-platform"), c[1], "CPU", c[3])
                              for c in configurations if c[0] != f"{device} CUDA"]
        print(f"\naspirin ({len(atoms)} atoms), default SchNet, Langevin 0.5 fs, {args.steps} steps; "
              f"replica-steps per second")
        print(f"{'R':>5}" + "".join(f"{name:>24}" for name, *_ in configurations) + f"{'best / cpu':>12}")
        for n in args.replicas:
            positions = np.repeat(atoms.positions[None], n, axis=0)
            rates = []
            for _, where, platform, mode in configurations:
                steps = args.steps if mode == "batched" else max(5, args.steps * 8 // n)
                rates.append(replica_rate(model_path, atoms.numbers, positions, steps, where,
                                          platform or ("CUDA" if where.startswith("cuda") else "CPU"), mode))
            print(f"{n:>5}" + "".join(f"{rate:>24.1f}" for rate in rates) + f"{max(rates[1:]) / rates[0]:>11.1f}x",
                  flush=True)
        trained = folder / "m.pt"  # part 1's; an untrained model would stop its replicas early
        if not trained.exists():
            from stable_md.pretrain import PretrainSettings, SplitSettings, pretrain

            pretrain(str(DATA), "schnet", trained, split=SplitSettings(n_train=200, n_val=50, n_test=50),
                     settings=PretrainSettings(epochs=5), progress=False, device=device)
        print(f"\nrefine epochs ({args.refine_replicas} replicas, 200 steps each, default settings otherwise); s")
        cpu = refine_epochs(str(trained), "cpu", args.refine_replicas, 200)
        other = refine_epochs(str(trained), device, args.refine_replicas, 200, platform="CPU" if extra else None)
        for phase, a, b in (("simulation", cpu[0], other[0]), ("learning", cpu[1], other[1])):
            print(f"{phase:>12}  cpu {a:7.2f}  {device} {b:7.2f}  {a / b:6.1f}x")


if __name__ == "__main__":
    main()
