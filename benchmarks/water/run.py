"""The water benchmark: does refine with the localized estimator keep a weak water model stable, and does it
recover the RDFs and the diffusivity? (the paper's section 3.4, at a scale this 2-core machine can run)

From SPC/Fw water made here (``stable-md data water``: 32 molecules at 0.997 g/cm³ and 300 K, 2000 frames
100 fs apart, i.e. one 200 ps trajectory) it

1. takes the reference oxygen self-diffusion coefficient from the data's own trajectory (evaluate's
   ``reference_diffusion``: MSD of the unwrapped oxygens), in the same box the models run in;
2. pretrains the baseline: a small SchNet (4 Å cutoff, the most a 9.9 Å box allows) on 300 frames for 90
   epochs (a fixed budget, about 12 minutes; ``--n-train`` and ``--pretrain-epochs`` change both);
3. refines it with ``stable-md refine --estimator local --criterion imd`` (local observable: the O-H length of
   every molecule, the paper's balanced selection; 8 replicas as the paper) and refine's other defaults;
   only the budget is set;
4. evaluates both models on the same held-out starts at 300 K, once with the RDF criterion (the paper's
   evaluation criterion for water) and once with the minimum intermolecular distance (1.2 Å, its training
   criterion): survival with confidence intervals, the O-O, O-H and H-H RDF errors, the diffusivity;
5. writes ``results.md`` and ``results.json`` in the output directory.

Why this scale: 32 molecules run at about 260 replica-steps/s for 8 replicas of this SchNet on one core
(``stable-md simulate``, measured on this machine), so two models x 8 replicas x 20 ps per evaluation
would take about 40 minutes on two cores if every replica stayed stable; the paper's 64 molecules would
double every stage. Measured on 2026-12-03 (docs/results.md): 29.6 minutes with the data given (pretrain
12, refine 12, evaluations 5: every replica failed within 2 ps), and 10 minutes to make the data.
Every stage is an ordinary ``stable-md`` command, printed before it runs and skipped when its output exists,
so a killed benchmark resumes by running it again. Run from the repository root::

    python benchmarks/water/run.py                        # about 40 minutes on 2 cores
    python benchmarks/water/run.py --data water.extxyz    # reuse a data set made with the same settings
    python benchmarks/water/run.py --quick --output /tmp/w  # a few minutes: checks the pipeline
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aspirin.run import output_directories, run_parallel, stable_md  # noqa: E402  (the same stage runner)

REPO = Path(__file__).resolve().parents[2]
MOLECULES, FRAMES, EVERY_FS = 32, 2000, 100
ARCH = ["--arch", "schnet", "--hyper", "hidden_channels=32", "--hyper", "num_filters=32",
        "--hyper", "num_interactions=2", "--hyper", "cutoff=4.0"]
PAIRS = ("O-O", "O-H", "H-H")


def rdf_errors(result: dict, reference: dict) -> dict[str, float]:
    """∫|g − g_ref| dr of each element pair (the report's curve is the pairs' RDFs one after another)."""
    mean = np.asarray(result["observable"]["mean"])
    ref = np.asarray(reference["values"])
    x = np.asarray(result["observable"]["x"])
    bins = len(mean) // len(PAIRS)
    width = float(x[1] - x[0])
    return {pair: float(np.abs(mean[k * bins:(k + 1) * bins] - ref[k * bins:(k + 1) * bins]).sum() * width)
            for k, pair in enumerate(PAIRS)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(REPO / "benchmark_output" / "water"))
    parser.add_argument("--data", default=None, help="an existing data set made with this benchmark's settings "
                                                     "(default: make it, about 10 minutes)")
    parser.add_argument("--quick", action="store_true", help="tiny settings to check that everything runs")
    parser.add_argument("--replicas", type=int, default=8, help="evaluation replicas per model (default 8)")
    parser.add_argument("--time", default="20ps", help="evaluation time per replica (default 20ps)")
    parser.add_argument("--refine-epochs", type=int, default=30, help="refine's learning-epoch budget (default 30)")
    parser.add_argument("--n-train", type=int, default=300, help="training frames of the baseline (default 300)")
    parser.add_argument("--pretrain-epochs", type=int, default=90, help="pretraining epochs (default 90)")
    args = parser.parse_args()
    out, logs = output_directories(args.output)
    quick = args.quick
    started = time.perf_counter()

    data = Path(args.data).resolve() if args.data else out / "water.extxyz"
    if not data.exists():
        command = stable_md("data", "water", "-o", str(data), "--molecules", str(MOLECULES), "--frames",
                            "200" if quick else str(FRAMES), "--every", str(EVERY_FS), "--quiet")
        run_parallel([(command, data, None, None)], logs, slots=1)
    from stable_md.data import load_dataset
    from stable_md.reference_dynamics import reference_diffusion

    d_reference = reference_diffusion(load_dataset(data))["m2_per_s"]

    frames = 100 if quick else args.n_train
    base, refined = out / f"water_{frames}.pt", out / f"water_{frames}.stable.pt"
    # The safety net grows with the work: 30 minutes for 300 frames x 90 epochs (12 minutes measured).
    minutes = 1 if quick else max(30, round(30 * frames * args.pretrain_epochs / 27000))
    pretrain = stable_md("pretrain", "--data", str(data), *ARCH, "--n-train", str(frames),
                         "--n-val", "50", "--n-test", "50" if quick else "200",
                         "--epochs", "3" if quick else str(args.pretrain_epochs),
                         "--lr", "1e-3", "--batch-size", "16", "--patience", "40", "--max-time",
                         str(minutes), "--no-progress", "-o", str(base))
    refine = stable_md("refine", str(base), "--data", str(data), "--estimator", "local", "--criterion", "imd",
                       "--temperature", "300", "--replicas", "8", "--max-epochs", "2" if quick else
                       str(args.refine_epochs), "--max-time", "2" if quick else "60", "--no-progress",
                       "-o", str(refined))
    print(f"== 1. pretrain the baseline on {frames} frames, then refine it with the localized estimator")
    run_parallel([(pretrain, base, None, base.with_suffix(".ckpt.pt")),
                  (refine, refined, base, refined.with_suffix(".refine") / "checkpoint.pt")], logs, slots=1)

    print("== 2. evaluate both on identical held-out starts, with the RDF criterion and with the IMD criterion")
    replicas = "4" if quick else str(args.replicas)
    eval_time = "0.5ps" if quick else args.time
    tasks = []
    for criterion in ("rdf", "imd"):
        directory = out / f"eval_{criterion}"
        command = stable_md("evaluate", str(base), str(refined), "--data", str(data), "-o", str(directory),
                            "--temperature", "300", "--criterion", criterion, "--obs", "rdf", "--replicas", replicas,
                            "--time", eval_time, "--label", f"{frames} frames", "--label", f"{frames} frames+StABlE (local)",
                            "--no-progress")
        tasks.append((command, directory / "evaluation.json", None, directory / "models"))
    run_parallel(tasks, logs, slots=2)
    evaluations = {c: json.loads((out / f"eval_{c}" / "evaluation.json").read_text()) for c in ("rdf", "imd")}
    summary = json.loads((refined.with_suffix(".refine") / "summary.json").read_text())
    text = results_table(evaluations, summary, d_reference)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"evaluations": evaluations, "refine": summary,
                                                  "reference_diffusion_m2_per_s": d_reference},
                                                 indent=1, default=str))
    print(text)
    print(f"benchmark wall time this run: {(time.perf_counter() - started) / 60:.1f} min; outputs in {out}")
    return 0


def results_table(evaluations: dict, summary: dict, d_reference: float) -> str:
    """Survival per criterion (``stable-md evaluate``'s columns), RDF errors per pair and the diffusivity
    against the data's, as Markdown."""
    from stable_md.evaluation import TABLE_COLUMNS, table_rows, vacf_line

    columns = ["criterion"] + [c if c != "error" else "RDF error" for c in TABLE_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for criterion, report in evaluations.items():
        lines += ["| " + " | ".join((criterion,) + row) + " |" for row in table_rows(report)]
    lines += ["", "| criterion | model | O-O RDF error | O-H RDF error | H-H RDF error | D (1e-9 m²/s) | D error |",
              "|---|---|---|---|---|---|---|"]
    for criterion, report in evaluations.items():
        for result in report["models"]:
            errors = rdf_errors(result, report["reference_curve"]) if result["observable"]["samples"] else {}
            diffusion = result.get("diffusion") or {}
            d = diffusion.get("mean_m2_per_s")
            cells = [f"{errors[p]:.3f}" if p in errors else "n/a" for p in PAIRS]
            shown = "n/a" if d is None else f"{d * 1e9:.2f} ± {diffusion['std_m2_per_s'] * 1e9:.2f}"
            relative = "n/a" if d is None else f"{d / d_reference - 1:+.0%}"
            lines.append(f"| {criterion} | {result['label']} | " + " | ".join(cells) + f" | {shown} | {relative} |")
    lines += ["", f"Reference D of the data's SPC/Fw trajectory in the same box: {d_reference * 1e9:.2f}e-9 m²/s.",
              f"Refinement: {summary.get('message', '')}",
              f"Local samples per learning epoch (median): {summary.get('local_samples_median')}; deviation range "
              f"{summary.get('local_deviation_range')} Å."]
    lines += [f"{criterion} evaluation: {line}." for criterion, report in evaluations.items()
              for line in [vacf_line(report)] if line]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
