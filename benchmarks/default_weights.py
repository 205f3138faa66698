"""Does the default observable weight (``--obs-weight auto``) steer on every molecule and backbone?

For each data file and backbone it pretrains a deliberately short model (``--epochs``, on
``--n-train`` frames), then runs ``stable-md refine model.pt --data file --obs hr`` with default
settings except the budget (``--max-epochs`` learning epochs, ``--max-sim-time``), and reads
from the refine log the share of the gradient norm that the observable term held in each learning
epoch (``observable_grad_norm / grad_norm``). The floor we promise: a median share of at least
10 % on every row. It prints a markdown table (docs/results.md, "The default observable weight"),
and writes it with the raw numbers to ``<output>/default_weights.{md,json}``.

Run from the repository root (two processes at a time; finished rows are skipped on a rerun)::

    python benchmarks/default_weights.py --data data/ethanol_xtb_500K.extxyz data/aspirin_xtb_500K.npz \\
        mol/malonaldehyde.extxyz mol/toluene.extxyz --arch schnet ani

The extra molecules are made with ``stable-md data xtb-md`` (see docs/results.md for the commands).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SMALL = {"schnet": ["--hyper", "hidden_channels=32", "--hyper", "num_filters=32", "--hyper", "num_interactions=2"],
         "ani": []}


def run(command: list[str], log: Path) -> None:
    print("$ stable-md " + " ".join(command), flush=True)
    with open(log, "w") as handle:
        subprocess.run([sys.executable, "-m", "stable_md.cli", *command], check=True, stdout=handle,
                       stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def one_row(data: Path, arch: str, args: argparse.Namespace) -> dict:
    directory = Path(args.output) / f"{data.stem}_{arch}"
    directory.mkdir(parents=True, exist_ok=True)
    model, refined = directory / "model.pt", directory / "model.stable.pt"
    from stable_md.data import load_dataset

    frames = len(load_dataset(data))
    n_train = min(args.n_train, frames - 250)  # keep 50 validation and 200 test frames
    if not model.exists():
        run(["pretrain", "--data", str(data), "--arch", arch, "-o", str(model), "--n-train", str(n_train),
             "--n-val", "50", "--n-test", "200", "--epochs", str(args.epochs), "--no-progress", *SMALL[arch]],
            directory / "pretrain.log")
    if not refined.exists():
        run(["refine", str(model), "--data", str(data), "--obs", "hr", "--max-epochs", str(args.max_epochs),
             "--max-sim-time", args.max_sim_time, "--no-progress", "--overwrite"], directory / "refine.log")
    summary = json.loads((directory / "model.stable.refine" / "summary.json").read_text())
    log = [json.loads(line) for line in (directory / "model.stable.refine" / "log.jsonl").read_text().splitlines()]
    shares = [row["observable_grad_norm"] / row["grad_norm"] for row in log
              if row["phase"] == "learning" and row.get("grad_norm")]
    before, after = summary["test_errors_before"], summary["test_errors_after"]
    return {"data": data.name, "arch": arch, "atoms": load_dataset(data).n_atoms, "n_train": n_train, "learning_epochs": summary["learning_epochs"],
            "weight": summary["observable_weights"], "share_median": float(np.median(shares)) if shares else None,
            "share_min": float(np.min(shares)) if shares else None, "shares": shares,
            "force_mae_before": before and before["force_mae_meV_per_A"],
            "force_mae_after": after and after["force_mae_meV_per_A"],
            "time_split": summary["time_split"], "message": summary["message"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, type=Path)
    parser.add_argument("--arch", nargs="+", default=["schnet", "ani"], choices=sorted(SMALL))
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=20, help="pretraining epochs (few on purpose)")
    parser.add_argument("--max-epochs", type=int, default=6, help="refine's learning-epoch budget")
    parser.add_argument("--max-sim-time", default="10ps")
    parser.add_argument("--output", default=str(REPO / "benchmark_output" / "default_weights"))
    parser.add_argument("--jobs", type=int, default=2, help="rows run at once, one process each (default: 2)")
    args = parser.parse_args()
    jobs = [(data, arch) for data in args.data for arch in args.arch]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda job: one_row(job[0], job[1], args), jobs))
    lines = ["| data | atoms | backbone | learning epochs | calibrated weight | observable share, median (min) | "
             "held-out force MAE before → after (meV/Å) | first learning epoch after (ps of MD) | share of time in MD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        share = "n/a" if row["share_median"] is None else f"{100 * row['share_median']:.0f}% ({100 * row['share_min']:.0f}%)"
        weight = "n/a" if row["weight"] is None else f"{row['weight'][0]:.3g}"
        errors = ("n/a" if row["force_mae_before"] is None else
                  f"{row['force_mae_before']:.1f} → {row['force_mae_after']:.1f}")
        split = row["time_split"]
        lines.append(f"| {row['data']} | {row['atoms']} | {row['arch']} | {row['learning_epochs']} | {weight} | "
                     f"{share} | {errors} | {split['first_learning_epoch_after_ps']} | "
                     f"{100 * split['fractions']['simulation']:.0f}% |")
    text = "\n".join(lines)
    print(text)
    Path(args.output, "default_weights.md").write_text(text + "\n")
    Path(args.output, "default_weights.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
