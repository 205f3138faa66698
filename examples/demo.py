"""The main job on bundled data (``make demo``): pretrain, evaluate, refine, evaluate again, compare.

Uses the bundled ethanol GFN2-xTB set (data/ethanol_xtb_500K.extxyz, 500 frames at 500 K) and the
same ``stable-md`` commands a user types. The starting model is deliberately weak (a small SchNet
fitted briefly to 100 frames), the situation StABlE refinement is for: its MD replicas break bonds.
Writes everything into ``demo_output/`` (replaced on every run); measured: 10 minutes on 2 cores
while a test run shared them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "ethanol_xtb_500K.extxyz"
SMALL_SCHNET = ["--hyper", "hidden_channels=32", "--hyper", "num_filters=32", "--hyper", "num_interactions=3",
                "--hyper", "num_gaussians=16"]


def banner(text: str) -> None:
    print("\n" + "=" * 78 + f"\n  {text}\n" + "=" * 78, flush=True)


def stable_md(*args: str) -> None:
    """Run one ``stable-md`` command as a user would, echoing it first."""
    print("$ stable-md " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "stable_md.cli", *args], check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(REPO / "demo_output"))
    parser.add_argument("--replicas", type=int, default=64, help="evaluation replicas per model (default 64)")
    parser.add_argument("--time", default="10ps", help="evaluation time per replica (default 10ps)")
    args = parser.parse_args()
    out = Path(args.output)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model, refined, evaluation = out / "ethanol.pt", out / "ethanol.stable.pt", out / "evaluation"
    started = time.perf_counter()
    evaluate = ["--data", str(DATA), "-o", str(evaluation), "--replicas", str(args.replicas), "--time", args.time,
                "--temperature", "500", "--no-progress"]

    banner("1/4  pretrain: a small SchNet fitted briefly to 100 ethanol frames (GFN2-xTB, 500 K)")
    stable_md("pretrain", "--data", str(DATA), "-o", str(model), "--n-train", "100", "--n-val", "50",
              "--n-test", "200", "--epochs", "30", "--lr", "3e-3", "--batch-size", "10", "--no-progress",
              *SMALL_SCHNET)

    banner(f"2/4  evaluate: {args.replicas} Nosé-Hoover replicas at 500 K from held-out frames, up to {args.time};"
           " a bond stretched by more than 0.5 Å stops a replica")
    stable_md("evaluate", str(model), "--label", "before", *evaluate)

    banner("3/4  refine: StABlE training with the h(r) observable (no new QM data)")
    stable_md("refine", str(model), "--data", str(DATA), "--obs", "hr", "-o", str(refined), "--replicas", "32",
              "--steps-per-epoch", "400", "--max-cycles", "3", "--no-progress")

    banner("4/4  evaluate again: the refined model from the same starts with the same velocities "
           "(the 'before' result is reused)")
    stable_md("evaluate", str(model), str(refined), "--label", "before", "--label", "after", "--resume",
              "--jobs", "2", *evaluate)

    report = json.loads((evaluation / "evaluation.json").read_text())
    before, after = report["models"]
    banner(f"before / after ({(time.perf_counter() - started) / 60:.1f} min)")
    def median(result: dict) -> str:
        return ("≥ " if result["median_censored"] else "") + f"{result['median_stable_time_ps']:.2f}"

    def rmst(result: dict) -> str:
        low, high = result["survival"]["rmst_ci_ps"]
        return f"{result['survival']['rmst_ps']:.2f} [{low:.2f}, {high:.2f}]"

    (comparison,) = report["comparisons"]
    print(f"{'':<34}{'before':>24}{'after':>24}")
    print(f"{'median stable time (ps)':<34}{median(before):>24}{median(after):>24}")
    print(f"{'restricted mean (ps) [95% CI]':<34}{rmst(before):>24}{rmst(after):>24}")
    print(f"{'unstable at the end':<34}{before['n_unstable']:>21d}/{before['n_replicas']:<2d}"
          f"{after['n_unstable']:>21d}/{after['n_replicas']:<2d}")
    print(f"{'h(r) error ∫|h − h_ref| dr':<34}{before['observable']['error']:>24.4f}"
          f"{after['observable']['error']:>24.4f}")
    print(f"{'force MAE (meV/Å)':<34}{before['errors']['force_mae_meV_per_A']:>24.1f}"
          f"{after['errors']['force_mae_meV_per_A']:>24.1f}")
    print(f"{'energy MAE (meV)':<34}{before['errors']['energy_mae_meV']:>24.1f}"
          f"{after['errors']['energy_mae_meV']:>24.1f}")
    low, high = comparison["rmst_ratio_ci"]
    total = report["settings"]["total_time"] / 1000.0
    print(f"after / before: restricted mean ×{comparison['rmst_ratio']:.2f} [95% CI {low:.2f}, {high:.2f}], "
          f"log-rank p = {comparison['logrank_p']:.2g}")
    print(f"(stable times are right-censored at the {total:g} ps evaluated; restricted mean = area under the "
          f"Kaplan-Meier curve up to {total:g} ps)")
    print("\nplots:")
    for figure in report["figures"] + [str(out / (refined.stem + ".refine") / "unstable_fraction.png")]:
        print(f"  {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
