"""Pretrain a SchNet on the bundled ethanol GFN2-xTB set, then run it in ASE and as OpenMM replicas.

Run with ``make demo`` or ``python examples/pretrain_ethanol.py [--arch ani] [--epochs 60]``.
Writes into ``demo_output/`` (replaced on every run). Takes a few minutes on one CPU core.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "ethanol_xtb_500K.extxyz"


def banner(text: str) -> None:
    print("\n" + "=" * 78 + f"\n  {text}\n" + "=" * 78, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="schnet", choices=["schnet", "ani", "nequip", "mace"])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--output", default=str(REPO / "demo_output"))
    args = parser.parse_args()
    out = Path(args.output)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = out / f"ethanol_{args.arch}.pt"

    banner(f"1/4  stable-md pretrain: {args.arch} on 400 ethanol frames (GFN2-xTB, 500 K)")
    command = ["stable-md", "pretrain", "--arch", args.arch, "--data", str(DATA), "-o", str(model),
               "--n-train", "400", "--n-val", "50", "--n-test", "50", "--epochs", str(args.epochs),
               "--lr", "2e-3", "--batch-size", "8"]
    print("$ " + " ".join(command), flush=True)
    subprocess.run([sys.executable, "-m", "stable_md.cli"] + command[1:], check=True)

    banner("2/4  stable-md info")
    subprocess.run([sys.executable, "-m", "stable_md.cli", "info", str(model)], check=True)

    banner("3/4  the model in an ASE script: 1 ps of Langevin MD at 500 K with StableCalculator")
    import numpy as np
    from ase import units
    from ase.io import Trajectory
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

    from stable_md.calculator import StableCalculator
    from stable_md.data import load_dataset

    atoms = load_dataset(DATA).to_atoms(0)
    atoms.calc = StableCalculator(model)
    rng = np.random.default_rng(0)
    thermalize_momenta(atoms, temperature_K=500, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    # ASE's default Langevin (fixcm=True) overheats small molecules; FixCom keeps the centre of mass instead.
    atoms.set_constraint(FixCom())
    dynamics = Langevin(atoms, timestep=0.5 * units.fs, temperature_K=500, friction=0.01 / units.fs, rng=rng,
                        fixcm=False, trajectory=Trajectory(str(out / "md.traj"), "w", atoms))
    start = time.perf_counter()
    temperatures = []
    # Kinetic temperature over the 3N - 3 degrees of freedom left by FixCom.
    dof = 3 * len(atoms) - 3
    dynamics.attach(lambda: temperatures.append(2 * atoms.get_kinetic_energy() / (dof * units.kB)), interval=20)
    dynamics.run(2000)
    elapsed = time.perf_counter() - start
    distances = atoms.get_all_distances()[np.triu_indices(len(atoms), 1)]
    print(f"2000 steps in {elapsed:.1f} s ({2000 / elapsed:.0f} steps/s); "
          f"mean temperature {np.mean(temperatures[10:]):.0f} K; "
          f"shortest/longest interatomic distance at the end {distances.min():.2f}/{distances.max():.2f} Å")
    print(f"trajectory: {out / 'md.traj'}  (ase gui {out / 'md.traj'})")

    banner("4/4  stable-md simulate: 16 replicas in one OpenMM Context, Nose-Hoover at 500 K, 1 ps")
    command = ["stable-md", "simulate", str(model), "--data", str(DATA), "--replicas", "16", "--temperature",
               "500", "--timestep", "0.5", "--time", "1ps", "--integrator", "nose-hoover", "-o",
               str(out / "replicas")]
    print("$ " + " ".join(command), flush=True)
    subprocess.run([sys.executable, "-m", "stable_md.cli"] + command[1:], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
