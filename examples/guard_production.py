"""A model that breaks bonds in long runs, caught by the stability guard in OpenMM and in ASE, then refined
and run again under the same guard.

    python examples/guard_production.py [--model m.pt --refined m.stable.pt] [--runs 6] [--time 5] [--temperature 650]

Without --model it pretrains the deliberately weak SchNet of ``make demo`` (100 ethanol frames, 30 epochs)
and refines it as the demo does (a few minutes each); with ``demo_output/`` present it takes the demo's
two models. Each production run starts from a held-out frame with its own velocities and runs
Langevin MD at --temperature until --time ps or until the guard stops it:

- OpenMM: ``MLPotential('stable-md', modelPath=...).createSystem(topology)`` with a
  ``StabilityReporter`` checking every 100 steps (0.05 ps);
- ASE: ``StableCalculator`` with a ``StabilityObserver`` attached every 100 steps.

It prints, per model and engine, how many runs the guard stopped, when, and why. The runs are chaotic:
single runs differ between machines; the comparison that carries statistics is ``stable-md evaluate``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "ethanol_xtb_500K.extxyz"
DEMO = REPO / "demo_output"
SMALL_SCHNET = ["--hyper", "hidden_channels=32", "--hyper", "num_filters=32", "--hyper", "num_interactions=3",
                "--hyper", "num_gaussians=16"]
CHECK_EVERY = 100  # steps between guard checks (0.05 ps at 0.5 fs)


def models(args, folder: Path) -> tuple[Path, Path]:
    """The weak model and its refined version: given, the demo's, or made here as the demo makes them."""
    if args.model:
        return Path(args.model), Path(args.refined)
    if (DEMO / "ethanol.pt").exists() and (DEMO / "ethanol.stable.pt").exists():
        return DEMO / "ethanol.pt", DEMO / "ethanol.stable.pt"
    weak, refined = folder / "ethanol.pt", folder / "ethanol.stable.pt"
    cli = [sys.executable, "-m", "stable_md.cli"]
    subprocess.run(cli + ["pretrain", "--data", str(DATA), "-o", str(weak), "--n-train", "100", "--n-val", "50",
                          "--n-test", "200", "--epochs", "30", "--lr", "3e-3", "--batch-size", "10", "--no-progress",
                          *SMALL_SCHNET], check=True)
    subprocess.run(cli + ["refine", str(weak), "--data", str(DATA), "--obs", "hr", "-o", str(refined), "--replicas",
                          "32", "--steps-per-epoch", "400", "--max-cycles", "3", "--no-progress"], check=True)
    return weak, refined


def openmm_run(model: Path, numbers, bonds, start, temperature: float, steps: int, seed: int):
    """One OpenMM production run under the guard: (steps run, why it stopped or None)."""
    import openmm
    import openmm.app as app
    import openmm.unit as unit
    from openmmml import MLPotential

    from openmm_bridge.topology import molecule_topology
    from stable_md import InstabilityError, StabilityReporter

    topology = molecule_topology(numbers, bonds, residue="ETH")
    system = MLPotential("stable-md", modelPath=str(model)).createSystem(topology)
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1 / unit.picosecond,
                                                 0.5 * unit.femtosecond)
    integrator.setRandomNumberSeed(seed)
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("CPU"),
                                {"Threads": "1"})
    simulation.context.setPositions(start * 0.1)
    simulation.context.setVelocitiesToTemperature(temperature * unit.kelvin, seed)
    simulation.reporters.append(StabilityReporter(str(model), CHECK_EVERY))
    try:
        simulation.step(steps)
    except InstabilityError as error:
        return error.step, error.reason
    except openmm.OpenMMException as error:  # a blow-up between two checks: OpenMM stops on the model's message
        return simulation.currentStep, str(error).splitlines()[0]
    return steps, None


def ase_run(model: Path, numbers, start, temperature: float, steps: int, seed: int):
    """One ASE production run under the guard: (steps run, why it stopped or None)."""
    from ase import Atoms, units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    from stable_md import InstabilityError, StabilityGuard, StabilityObserver, StableCalculator

    atoms = Atoms(numbers=numbers, positions=start)
    atoms.calc = StableCalculator(str(model))
    atoms.set_constraint(FixCom())
    thermalize_momenta(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
    dynamics = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature, friction=0.01, fixcm=False,
                        rng=np.random.default_rng(seed))
    guard = StabilityGuard.from_model(str(model), atoms.numbers, atoms.positions)
    dynamics.attach(StabilityObserver(atoms, guard, dynamics=dynamics), interval=CHECK_EVERY)
    try:
        dynamics.run(steps)
    except InstabilityError as error:
        return error.step, error.reason
    return steps, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the weak model (default: the demo's, or made here)")
    parser.add_argument("--refined", default=None, help="its refined version (with --model)")
    parser.add_argument("--runs", type=int, default=6, help="production runs per model and engine (default 6)")
    parser.add_argument("--time", type=float, default=5.0, help="ps per run at most (default 5)")
    parser.add_argument("--temperature", type=float, default=650.0, help="K (default 650: hotter than the data)")
    parser.add_argument("--output", default=str(REPO / "guard_output"))
    args = parser.parse_args()
    if bool(args.model) != bool(args.refined):
        parser.error("give --model and --refined together")
    from stable_md.data import load_dataset
    from stable_md.potentials import read_metadata
    from stable_md.stability import detect_bonds

    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    weak, refined = models(args, folder)
    data = load_dataset(DATA)
    bonds = detect_bonds(data.numbers, data.positions[:200]).pairs
    held_out = read_metadata(weak)["history"][0].get("test_indices") or list(range(len(data)))
    position = {int(index): k for k, index in enumerate(data.indices)}
    starts = [data.positions[position[int(i)]] for i in held_out[:args.runs]]
    steps = int(round(args.time * 2000))
    print(f"{args.runs} runs per model and engine, Langevin at {args.temperature:g} K, up to {args.time:g} ps "
          f"({steps} steps of 0.5 fs), guard checks every {CHECK_EVERY} steps (bond off by > 0.5 Å)")
    for label, model in (("weak", weak), ("refined", refined)):
        for engine in ("OpenMM", "ASE"):
            started, stops = time.perf_counter(), []
            for run, start in enumerate(starts):
                if engine == "OpenMM":
                    ran, why = openmm_run(model, data.numbers, bonds, start, args.temperature, steps, seed=run + 1)
                else:
                    ran, why = ase_run(model, data.numbers, start, args.temperature, steps, seed=run + 1)
                if why is not None:
                    stops.append(ran)
                    print(f"  {label:>7} {engine:<6} run {run}: stopped at {ran * 0.0005:.2f} ps: {why}")
            times = "" if not stops else " at " + ", ".join(f"{s * 0.0005:.2f}" for s in sorted(stops)) + " ps"
            print(f"{label:>7} {engine:<6}: {len(stops)} of {len(starts)} runs stopped by the guard{times}; "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
