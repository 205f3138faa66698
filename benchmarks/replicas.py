"""Replica-steps per second for R aspirin replicas: batched ReplicaSet vs the alternatives, side by side.

For each R it measures, in one run on one thread:

- model only: one batched energy+force evaluation of R molecules (the limit: no integrator);
- batched: ReplicaSet(mode="batched"), R copies in one OpenMM Context, one batched force;
- per-replica: ReplicaSet(mode="per-replica"), one OpenMM Context per replica;
- ASE: a plain loop of R ASE Langevin integrators over StableCalculator, what a user
  would otherwise write.

and prints the ratios: batched/model-only (target >= 0.85), batched over per-replica
(target >= 5 at R = 128) and batched over ASE (target >= 20 at R = 128).

The model is an untrained default-size network (speed does not depend on training);
replicas start from one RDKit aspirin geometry with different velocities.

    python benchmarks/replicas.py [--arch ani] [--replicas 1 8 32 128] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from openmm_bridge.replicas import ReplicaSet
from stable_md.potentials import build_metadata, build_potential, energy_and_forces, load_model, save_model
from stable_md.refdata.xtb_md import molecule_from_smiles

ASPIRIN = "CC(=O)OC1=CC=CC=C1C(=O)O"


def model_only_rate(module, positions: np.ndarray, numbers: np.ndarray, repeats: int) -> float:
    """Replica-steps/s if an MD step cost nothing but one batched energy+force call."""
    batch = torch.as_tensor(positions, dtype=torch.float32)
    z = torch.as_tensor(numbers)
    for _ in range(2):
        energy_and_forces(module, batch, z)
    start = time.perf_counter()
    for _ in range(repeats):
        energy_and_forces(module, batch, z)
    return len(positions) * repeats / (time.perf_counter() - start)


def replica_set_rate(model_path: Path, numbers, positions, mode: str, steps: int) -> float:
    replicas = ReplicaSet(model_path, numbers, positions, integrator="langevin", temperature=500, timestep=0.5,
                          seed=0, mode=mode)
    replicas.run(2)
    start = time.perf_counter()
    replicas.run(steps)
    elapsed = time.perf_counter() - start
    assert not replicas.unstable.any(), "a benchmark replica went unstable; the rate would be wrong"
    return len(positions) * steps / elapsed


def ase_loop_rate(model_path: Path, atoms, n_replicas: int, steps: int) -> float:
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    from stable_md.calculator import StableCalculator

    dynamics = []
    for replica in range(n_replicas):
        copy = atoms.copy()
        copy.calc = StableCalculator(model_path)
        copy.set_constraint(FixCom())
        thermalize_momenta(copy, temperature_K=500, rng=np.random.default_rng(replica))
        dynamics.append(Langevin(copy, 0.5 * units.fs, temperature_K=500, friction=0.01, fixcm=False,
                                 rng=np.random.default_rng(replica)))
    for md in dynamics:
        md.run(1)
    start = time.perf_counter()
    for md in dynamics:
        md.run(steps)
    return n_replicas * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ani", choices=["schnet", "ani", "nequip", "mace"])
    parser.add_argument("--hyper", action="append", default=[], metavar="NAME=VALUE",
                        help="architecture hyperparameter (JSON value), repeatable; e.g. a smaller model: "
                             "--arch schnet --hyper hidden_channels=16 --hyper num_filters=16 "
                             "--hyper num_interactions=2 --hyper num_gaussians=8")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--steps", type=int, default=20, help="MD steps timed per R (default: 20)")
    parser.add_argument("--ase-steps", type=int, default=5, help="ASE steps timed per replica (default: 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    atoms = molecule_from_smiles(ASPIRIN, seed=0)
    torch.manual_seed(0)
    overrides = {name: json.loads(value) for name, value in (item.split("=", 1) for item in args.hyper)}
    potential, hyper = build_potential(args.arch, sorted(set(atoms.numbers.tolist())), **overrides)
    with tempfile.TemporaryDirectory() as folder:
        model_path = save_model(potential, Path(folder) / "aspirin.pt", build_metadata(potential, hyper))
        module = load_model(model_path).module
        print(f"{args.arch} {json.dumps(overrides) if overrides else '(default size)'}, "
              f"{sum(p.numel() for p in module.parameters())} parameters, aspirin "
              f"({len(atoms)} atoms), one thread, Langevin 0.5 fs; replica-steps per second")
        header = (f"{'R':>5}{'model only':>12}{'batched':>10}{'per-replica':>13}{'ASE loop':>10}"
                  f"{'batched/model':>15}{'batched/per-replica':>21}{'batched/ASE':>13}")
        print(header)
        for n in args.replicas:
            positions = np.repeat(atoms.positions[None], n, axis=0)
            limit = model_only_rate(module, positions, atoms.numbers, repeats=max(3, args.steps // 2))
            batched = replica_set_rate(model_path, atoms.numbers, positions, "batched", args.steps)
            separate = replica_set_rate(model_path, atoms.numbers, positions, "per-replica",
                                        max(2, args.steps * 8 // max(n, 8)))
            ase = ase_loop_rate(model_path, atoms, n, max(1, args.ase_steps * 8 // max(n, 8)))
            print(f"{n:>5}{limit:>12.1f}{batched:>10.1f}{separate:>13.1f}{ase:>10.1f}"
                  f"{batched / limit:>15.2f}{batched / separate:>21.2f}{batched / ase:>13.2f}", flush=True)
        print("targets at R = 128: batched/model >= 0.85, batched/per-replica >= 5, batched/ASE >= 20")


if __name__ == "__main__":
    main()
