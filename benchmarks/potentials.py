"""Parameters and energy+force cost of each backbone on aspirin-sized molecules (21 atoms).

Prints, for every installed architecture at its default hyperparameters, the time of one
energy+force evaluation for 1 molecule and for a batch of 128, on one thread, and the ratios
that decide defaults: batching gain (128 x single / batch) and cost relative to SchNet.
The last column compares our plain TorchScript execution (``plain_execution``) with torch's
default optimising graph executor on the same batch.

    python benchmarks/potentials.py [--repeats 5] [--batch 128]
"""
from __future__ import annotations

import argparse
import time

import torch

from stable_md.potentials import build_potential, energy_and_forces
from stable_md.potentials.model_file import script_potential
from stable_md.refdata.xtb_md import molecule_from_smiles

ASPIRIN = "CC(=O)OC1=CC=CC=C1C(=O)O"


def time_call(model, positions, numbers, repeats: int) -> float:
    """Seconds per energy+force call, after warm-up calls."""
    for _ in range(3):
        energy_and_forces(model, positions, numbers)
    start = time.perf_counter()
    for _ in range(repeats):
        energy_and_forces(model, positions, numbers)
    return (time.perf_counter() - start) / repeats


def time_default_executor(model, positions, numbers, repeats: int) -> float:
    """The same with torch's optimising executor, as a user calling the TorchScript module directly gets."""

    def call():
        positions_grad = positions.detach().requires_grad_(True)
        energy, _ = model(positions_grad, numbers, None)
        torch.autograd.grad(energy.sum(), positions_grad)

    for _ in range(4):  # the profiling executor specialises after a few calls
        call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--arch", action="append", help="architectures (default: all installed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    atoms = molecule_from_smiles(ASPIRIN, seed=0)
    numbers = torch.tensor(atoms.numbers)
    generator = torch.Generator().manual_seed(0)
    base = torch.tensor(atoms.positions, dtype=torch.float32)
    batch = base[None] + 0.05 * torch.randn((args.batch,) + base.shape, generator=generator)
    rows = []
    for arch in args.arch or ["schnet", "ani", "nequip", "mace"]:
        try:
            potential, hyper = build_potential(arch, sorted(set(atoms.numbers.tolist())))
        except ImportError as error:
            print(f"{arch}: skipped ({error})")
            continue
        model = script_potential(potential)
        single = time_call(model, base[None], numbers, args.repeats)
        batched = time_call(model, batch, numbers, max(1, args.repeats // 2))
        default = time_default_executor(model, batch, numbers, max(1, args.repeats // 2))
        rows.append((arch, sum(p.numel() for p in potential.parameters()), hyper["cutoff"], single, batched,
                     default))
    schnet = {r[0]: r for r in rows}.get("schnet")
    print(f"\naspirin ({len(atoms)} atoms), float32, 1 thread, energy+forces, TorchScript")
    print(f"{'arch':<8}{'params':>10}{'cutoff Å':>10}{'1 mol ms':>10}{f'{args.batch} mol ms':>12}"
          f"{'ms/mol batched':>16}{'batching gain':>15}{'vs schnet':>11}{'default executor':>18}")
    for arch, n_params, cutoff, single, batched, default in rows:
        per_molecule = batched / args.batch
        relative = per_molecule / (schnet[4] / args.batch) if schnet else float("nan")
        print(f"{arch:<8}{n_params:>10}{cutoff:>10.1f}{1e3 * single:>10.2f}{1e3 * batched:>12.1f}"
              f"{1e3 * per_molecule:>16.3f}{single / per_molecule:>14.1f}x{relative:>10.1f}x"
              f"{default / batched:>12.2f}x slower")


if __name__ == "__main__":
    main()
