"""Time and peak memory of the Boltzmann-estimator gradient for F aspirin frames, side by side.

For each F (default 256, 1024, 4096) it measures, each in a fresh subprocess so that
peak memory (max RSS above the process's baseline) belongs to that method alone:

- ours: ``stable_md.estimator.boltzmann_gradient`` — detached per-frame weights, then
  ONE weighted batched energy backward (minibatches of 256 frames);
- plain backward: ∇θ Σ_i U(Γ_i) with the same batching, the cost floor of any estimator;
- per-sample: the paper's eq. 6 as written in its code, one gradient per frame stored as
  an [F, P] matrix, then the covariance with the observable.

It prints seconds and MiB per method and the ratios: ours/plain (target <= 1.3),
per-sample/ours time (target >= 20 at F = 1024) and memory (target >= 50 at F = 1024).
The observable is h(r) (0-10 Å, 500 bins); the model an untrained default SchNet
(cost does not depend on training); frames are RDKit aspirin with 0.1 Å noise.

    python benchmarks/estimator.py [--frames 256 1024 4096] [--arch schnet]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

ASPIRIN = "CC(=O)OC1=CC=CC=C1C(=O)O"
METHODS = ("ours", "plain", "per-sample")


def aspirin_frames(n_frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from stable_md.refdata.xtb_md import molecule_from_smiles

    atoms = molecule_from_smiles(ASPIRIN, seed=0)
    rng = np.random.default_rng(seed)
    positions = atoms.positions[None] + rng.normal(0.0, 0.1, (n_frames, len(atoms), 3))
    return positions, atoms.numbers.copy()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def measure(method: str, n_frames: int, arch: str) -> dict:
    """Run one method once (after a small warm-up) in this process; seconds and peak MiB above baseline."""
    from stable_md.estimator import ObservableTerm, boltzmann_gradient, boltzmann_weights
    from stable_md.observables import DistanceDistribution
    from stable_md.potentials import build_potential
    from stable_md.units import kT_eV

    torch.manual_seed(0)
    positions, numbers = aspirin_frames(n_frames)
    model, _ = build_potential(arch, sorted(set(numbers.tolist())))
    hr = DistanceDistribution(len(numbers))
    reference = hr(positions[:64]).mean(0) * 1.05
    terms = [ObservableTerm(hr, reference)]
    z = torch.as_tensor(numbers)
    frames = torch.as_tensor(positions, dtype=torch.float32)
    parameters = list(model.parameters())

    def ours() -> None:
        boltzmann_gradient(model, positions, numbers, terms, 500.0, batch_size=256)

    def plain() -> None:
        for begin in range(0, n_frames, 256):
            energy, _ = model(frames[begin:begin + 256], z, None)
            energy.sum().backward()

    def per_sample() -> None:
        rows = []
        for frame in frames:
            energy, _ = model(frame[None], z, None)
            grads = torch.autograd.grad(energy.sum(), parameters, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for g, p in zip(grads, parameters)]))
        gradients = torch.stack(rows).double()  # [F, P]: what the library never builds
        g = hr(positions)
        _, _, mean = boltzmann_weights(g, reference, 500.0)
        n = len(g)
        jacobian = n / (kT_eV(500.0) * (n - 1)) * (torch.outer(g.mean(0), gradients.mean(0))
                                                  - torch.einsum("nk,np->kp", g, gradients) / n)
        gradient = 2 * (mean - reference) @ jacobian
        offset = 0
        for p in parameters:
            p.grad = gradient[offset:offset + p.numel()].reshape(p.shape).to(p.dtype)
            offset += p.numel()

    run = {"ours": ours, "plain": plain, "per-sample": per_sample}[method]
    warm = aspirin_frames(8, seed=1)[0]
    boltzmann_gradient(model, warm, numbers, terms, 500.0)  # warm-up: allocator and kernels
    model.zero_grad(set_to_none=True)
    baseline = peak_rss_mib()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    return {"method": method, "frames": n_frames, "seconds": seconds, "peak_mib": peak_rss_mib() - baseline,
            "parameters": sum(p.numel() for p in parameters)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--arch", default="schnet")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.arch)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for n_frames in args.frames:
        for method in METHODS:
            out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--one", method, str(n_frames)],
                                 capture_output=True, text=True, env=env, check=True)
            results[method, n_frames] = json.loads(out.stdout.strip().splitlines()[-1])
    n_parameters = results[METHODS[0], args.frames[0]]["parameters"]
    print(f"Boltzmann-estimator gradient, {args.arch} ({n_parameters} parameters), aspirin, h(r) 500 bins, "
          f"one CPU thread")
    print(f"{'frames':>7} {'method':>11} {'seconds':>9} {'peak MiB':>9}")
    for n_frames in args.frames:
        for method in METHODS:
            r = results[method, n_frames]
            print(f"{n_frames:>7} {method:>11} {r['seconds']:>9.2f} {r['peak_mib']:>9.1f}")
    print(f"\n{'frames':>7} {'ours/plain time':>16} {'per-sample/ours time':>21} {'per-sample/ours memory':>23}")
    for n_frames in args.frames:
        ours, plain, per = (results[m, n_frames] for m in METHODS)
        memory = per["peak_mib"] / max(ours["peak_mib"], 1.0)
        print(f"{n_frames:>7} {ours['seconds'] / plain['seconds']:>16.2f} {per['seconds'] / ours['seconds']:>21.1f} "
              f"{memory:>23.1f}")
    print("targets: ours/plain <= 1.3; per-sample/ours >= 20x time and >= 50x memory at 1024 frames "
          "(memory ratios use max(ours, 1 MiB) as the denominator)")


if __name__ == "__main__":
    main()
