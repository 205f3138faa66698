"""The aspirin benchmark: does StABlE refinement make a 1k-frame model stable, and at what cost?

From the committed GFN2-xTB data set (data/aspirin_xtb_500K.npz, 12,000 frames at 500 K) it

1. pretrains the baseline SchNet on 1,000 frames and, in parallel on the second core, a
   comparison SchNet on 10,000 frames (10x the data);
2. refines the 1k model with ``stable-md refine --obs hr`` and refine's defaults; only the budget
   is set (64 replicas, 80 learning epochs, a 4-hour safety net; ``--refine-replicas``/``--refine-epochs``
   change the first two). Each ``--variant NAME=FLAGS``
   refines once more with extra flags, to measure a loop setting against the default;
3. evaluates all models on the same held-out starts at 500 K (48 replicas, 50 ps), and the 1k
   baseline and the refined model at 350 K and 700 K (reference h(r) Boltzmann-reweighted from 500 K);
4. writes ``results.md`` (the survival table and the targets of docs/results.md) and
   ``results.json`` in the output directory; the Kaplan-Meier plots with their bands are each
   evaluation's ``stability.png``.

Every stage is an ordinary ``stable-md`` command, printed before it runs, and is skipped
when its output already exists, so a killed benchmark resumes by running it again. An evaluation
made before a ``--variant`` was added is resumed (``evaluate --resume``) to add the new model on the
same starts, without rerunning the models it already holds.
``--data other.extxyz --name other --n-big 0`` runs the same experiment on another molecule
(no comparison model when the data set is too small for one); ``--n-train N`` sets the baseline's
training frames (default 1000). Run from the repository root::

    python benchmarks/aspirin/run.py                             # about 3 hours on 2 cores
    python benchmarks/aspirin/run.py --variant 'lpat0=--learning-patience 0'   # the paper's loop
    python benchmarks/aspirin/run.py --variant 'lr3e-4=--lr 3e-4 --learning-patience 0'
    python benchmarks/aspirin/run.py --quick --output /tmp/quick # a few minutes: smoke test of the pipeline
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "aspirin_xtb_500K.npz"
# The baseline architecture: a small SchNet (see the README's benchmark of backbones). Small enough that
# 64 replicas run at several thousand replica-steps per second on one core, and weak enough on 1k frames
# that its median stable time can be measured within minutes.
ARCH = ["--arch", "schnet", "--hyper", "hidden_channels=32", "--hyper", "num_filters=32",
        "--hyper", "num_interactions=2", "--hyper", "cutoff=5.0"]


def stable_md(*args: str) -> list[str]:
    return [sys.executable, "-m", "stable_md.cli", *args]


def show(command: list[str]) -> None:
    shown = ["stable-md" if part.endswith("python") or part.endswith("python3") else part for part in command]
    if shown[:3] == ["stable-md", "-m", "stable_md.cli"]:
        shown = ["stable-md"] + shown[3:]
    print("$ " + " ".join(str(part) for part in shown), flush=True)


def _log_path(log_directory: Path, output: Path) -> Path:
    return log_directory / (str(output.relative_to(log_directory.parent)).replace("/", "_") + ".log")


def run_parallel(tasks: list[tuple[list[str], Path, Path | None, Path | None]], log_directory: Path,
                 slots: int = 2, done=lambda output: output.exists()) -> None:
    """Run tasks whose output is not ``done`` yet, ``slots`` at a time.

    A task is (command, output, a file it needs first or None, a file whose presence means an
    interrupted run to continue with ``--resume`` or None).

    Each task logs to a file in ``log_directory`` named after its output.
    """
    pending = [task for task in tasks if not done(task[1])]
    running: list[tuple[subprocess.Popen, list[str], Path]] = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    while pending or running:
        ready = [task for task in pending if task[2] is None or task[2].exists()]
        while ready and len(running) < slots:
            task = ready.pop(0)
            pending.remove(task)
            command, output, _, marker = task
            if marker is not None and marker.exists():
                command = command + ["--resume"]
            show(command)
            log = open(_log_path(log_directory, output), "w")
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), command,
                            output))
        if not running:
            raise SystemExit(f"cannot start {[str(task[1]) for task in pending]}: what they need is missing")
        time.sleep(2)
        for entry in list(running):
            process, command, output = entry
            if process.poll() is not None:
                running.remove(entry)
                if process.returncode not in (0, 1) or not done(output):
                    for other, _, _ in running:
                        other.terminate()
                    raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}; "
                                     f"see {_log_path(log_directory, output)}")


def output_directories(path: str) -> tuple[Path, Path]:
    """The benchmark's output directory (absolute) and its ``logs`` folder, made if missing."""
    out = Path(path).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    return out, out / "logs"


def _size_label(frames: int) -> str:
    """``1000`` -> ``1k``, ``10000`` -> ``10k``, ``200`` -> ``200``: the models' labels and file names."""
    return f"{frames // 1000}k" if frames and frames % 1000 == 0 else str(frames)


def _variants(values: list[str]) -> list[tuple[str, list[str]]]:
    """``NAME=ARGS`` pairs of --variant: a refine of the baseline with extra flags, e.g. ``lr3e-4=--lr 3e-4``."""
    variants = []
    for value in values:
        name, separator, flags = value.partition("=")
        if not separator or not name or not name.replace("-", "").replace(".", "").isalnum():
            raise SystemExit(f"--variant {value!r}: expected NAME=FLAGS with a file-name-safe NAME, e.g. "
                             f"'lr3e-4=--lr 3e-4'")
        variants.append((name, flags.split()))
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(REPO / "benchmark_output" / "aspirin"))
    parser.add_argument("--data", default=str(DATA), help="data set (default: the committed aspirin set)")
    parser.add_argument("--name", default="aspirin", help="prefix of the model files (default: aspirin)")
    parser.add_argument("--n-train", type=int, default=1000,
                        help="training frames of the baseline (default 1000, labelled 1k)")
    parser.add_argument("--n-big", type=int, default=10000,
                        help="frames of the comparison model (default 10000; 0: no comparison model)")
    parser.add_argument("--n-test", type=int, default=1000,
                        help="test frames of each pretraining (default 1000; fewer for a small data set)")
    parser.add_argument("--quick", action="store_true", help="tiny settings to check that everything runs")
    parser.add_argument("--replicas", type=int, default=48, help="evaluation replicas per model (default 48)")
    parser.add_argument("--time", default="50ps", help="evaluation time per replica (default 50ps)")
    parser.add_argument("--refine-replicas", type=int, default=64, help="refine's replicas (default 64)")
    parser.add_argument("--refine-epochs", type=int, default=80, help="refine's learning-epoch budget (default 80)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="also refine with these extra refine flags and evaluate it at 500 K beside the "
                             "default refine, e.g. 'lr3e-4=--lr 3e-4' (repeatable)")
    args = parser.parse_args()
    out, logs = output_directories(args.output)
    quick = args.quick
    replicas = "8" if quick else str(args.replicas)
    eval_time = "0.5ps" if quick else args.time
    # Fixed epoch budgets (not wall-clock limits) keep the result independent of machine load; the
    # --max-time values are only a safety net.
    epochs_1k, epochs_big = ("2", "2") if quick else ("400", "80")
    time_1k, time_big = ("1", "1") if quick else ("60", "120")
    n_big = min(args.n_big, 2000) if quick and args.n_big else args.n_big

    name = args.name
    small = _size_label(args.n_train)
    base, big, refined = (out / f"{name}_{small}.pt", out / f"{name}_{_size_label(n_big)}.pt",
                          out / f"{name}_{small}.stable.pt")
    data = str(Path(args.data).resolve())
    common = ["--data", data, "--n-val", "100", "--lr", "1e-3", "--batch-size", "16", "--patience", "40",
              "--no-progress"] + ARCH
    pretrain_base = stable_md("pretrain", *common, "--n-train", str(args.n_train), "--n-test", str(args.n_test),
                              "--epochs", epochs_1k,
                              "--max-time", time_1k, "-o", str(base))
    pretrain_big = stable_md("pretrain", *common, "--n-train", str(n_big), "--n-test", str(args.n_test),
                             "--epochs", epochs_big, "--max-time", time_big, "-o", str(big))

    def refine_command(output: Path, extra: list[str]) -> list[str]:
        # Only the budget is set (replicas, epochs, a wall-clock safety net): every other setting is
        # refine's default, --obs-weight auto included.
        return stable_md("refine", str(base), "--data", data, "--obs", "hr", "-o", str(output),
                         "--replicas", "8" if quick else str(args.refine_replicas),
                         "--max-epochs", "3" if quick else str(args.refine_epochs),
                         "--max-time", "2" if quick else "240", "--no-progress", *extra)

    variants = {label: (out / f"{name}_{small}.stable-{label}.pt", flags) for label, flags in _variants(args.variant)}
    started = time.perf_counter()
    print(f"== 1. pretrain the {small} baseline{' and the comparison model' if n_big else ''}, then refine the {small} "
          f"model (two processes at a time)")
    tasks = [(pretrain_base, base, None, base.with_suffix(".ckpt.pt"))]
    if n_big:
        tasks.append((pretrain_big, big, None, big.with_suffix(".ckpt.pt")))
    for output, flags in [(refined, [])] + list(variants.values()):
        tasks.append((refine_command(output, flags), output, base, output.with_suffix(".refine") / "checkpoint.pt"))
    run_parallel(tasks, logs)

    print("== 2. evaluate on identical held-out starts (the three temperatures side by side)")
    first = [base] + ([big] if n_big else [])
    first_labels = [small] + ([_size_label(n_big)] if n_big else [])
    refined_label = f"{small}+StABlE"
    plans = {500: (first + [refined] + [v[0] for v in variants.values()],
                   first_labels + [refined_label] + [f"{refined_label}-{label}" for label in variants]),
             350: ([base, refined], [small, refined_label]), 700: ([base, refined], [small, refined_label])}
    tasks = []
    for temperature, (models, labels) in plans.items():
        directory = out / f"eval_{temperature}K"
        command = stable_md("evaluate", *map(str, models), "--data", data, "-o", str(directory),
                            "--temperature", str(temperature), "--data-temperature", "500",
                            "--replicas", replicas, "--time", eval_time, "--jobs", "2", "--no-progress")
        for label in labels:
            command += ["--label", label]
        tasks.append((command, directory / "evaluation.json", None, directory / "models"))
    expected = {str(out / f"eval_{t}K" / "evaluation.json"): set(labels) for t, (_, labels) in plans.items()}

    def evaluated(output: Path) -> bool:
        # An evaluation from an earlier run without this run's --variant models is resumed to add them.
        if not output.exists():
            return False
        present = {result["label"] for result in json.loads(output.read_text())["models"]}
        return expected[str(output)] <= present

    # Each evaluation uses two processes; running all three at once keeps both cores busy to the end.
    run_parallel(tasks, logs, slots=3, done=evaluated)
    evaluations = {t: json.loads((out / f"eval_{t}K" / "evaluation.json").read_text()) for t in plans}

    summaries = {refined_label: json.loads((refined.with_suffix(".refine") / "summary.json").read_text())}
    for label, (output, _) in variants.items():
        summaries[f"{refined_label}-{label}"] = json.loads((output.with_suffix(".refine") / "summary.json").read_text())
    text = (results_table(evaluations, summaries) + "\n"
            + targets_table(evaluations, first_labels, refined_label) + "\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"evaluations": {str(k): v for k, v in evaluations.items()},
                                                  "refine": summaries}, indent=1, default=str))
    print(text)
    print(f"benchmark wall time this run: {(time.perf_counter() - started) / 60:.1f} min; outputs in {out}")
    return 0


def results_table(evaluations: dict, summaries: dict) -> str:
    """The survival table of every evaluation (``stable-md evaluate``'s columns) with notes on references and
    refine runs, as Markdown."""
    from stable_md.evaluation import TABLE_COLUMNS, table_rows

    columns = ["T (K)"] + [c if c != "error" else "h(r) error" for c in TABLE_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for temperature, report in evaluations.items():
        lines += ["| " + " | ".join((str(temperature),) + row) + " |" for row in table_rows(report)]
    notes = []
    for temperature, report in evaluations.items():
        reweighting = report["reference"]["reweighting"]
        if reweighting:
            notes.append(f"- {temperature} K reference h(r): reweighted from 500 K, effective sample size "
                         f"{reweighting['effective_samples']:.0f} of {reweighting['frames']} frames.")
    for label, summary in summaries.items():
        notes.append(f"- Refinement {label}: {summary.get('message', '')}")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def targets_table(evaluations: dict, first_labels: list[str], refined_label: str = "1k+StABlE") -> str:
    """The benchmark's targets (issue 11) against the measured numbers, as a Markdown table."""
    from stable_md.evaluation import survival_sample
    from stable_md.survival import compare

    main = evaluations[500]
    by_label = {result["label"]: result for result in main["models"]}
    base, new = by_label[first_labels[0]], by_label[refined_label]
    cap = main["settings"]["total_time"] / 1000.0
    against_base = compare(survival_sample(base), survival_sample(new), cap, seed=main["settings"]["seed"])
    rows = ["| target | measured | met? |", "|---|---|---|"]
    ratio, ci = against_base["median_ratio"], against_base["median_ratio_ci"]
    if ratio is None:
        rows.append(f"| median stable time ≥ 10x the {first_labels[0]} baseline's, CI above 3x | baseline median "
                    f"beyond the cap | "
                    f"n/a |")
    else:
        bound = "≥ " if against_base["median_ratio_censored"] else ""
        rows.append(f"| median stable time ≥ 10x the {first_labels[0]} baseline's, CI above 3x | {bound}{ratio:.2f}x "
                    f"[{ci[0]:.2f}, {ci[1]:.2f}] | {'yes' if ratio >= 10 and ci[0] > 3 else 'no'} |")
    if len(first_labels) > 1:
        big = by_label[first_labels[1]]
        against_big = compare(survival_sample(big), survival_sample(new), cap, seed=main["settings"]["seed"])
        better = against_big["rmst_ratio"] > 1 and against_big["logrank_p"] < 0.05
        rows.append(f"| refined {first_labels[0]} more stable than {first_labels[1]} (log-rank p < 0.05) | RMST ×"
                    f"{against_big['rmst_ratio']:.2f} [{against_big['rmst_ratio_ci'][0]:.2f}, "
                    f"{against_big['rmst_ratio_ci'][1]:.2f}], p = {against_big['logrank_p']:.2g} | "
                    f"{'yes' if better else 'no'} |")
    for key, label, limit in (("force_mae_meV_per_A", "force MAE", 0.25), ("energy_mae_meV", "energy MAE", 0.30)):
        before, after = base["errors"][key], new["errors"][key]
        change = after / before - 1
        rows.append(f"| held-out {label} +≤ {limit:.0%} | {before:.1f} → {after:.1f} ({change:+.1%}) | "
                    f"{'yes' if change <= limit else 'no'} |")
    lower = []
    for temperature, report in evaluations.items():
        errors = {result["label"]: result["observable"]["error"] for result in report["models"]}
        lower.append((temperature, errors[first_labels[0]], errors[refined_label]))

    def shown(error) -> str:
        return "n/a" if error is None else f"{error:.4f}"

    cells = ", ".join(f"{t} K {shown(a)} → {shown(b)}" for t, a, b in lower)
    met = all(a is not None and b is not None and b < a for _, a, b in lower)
    rows.append(f"| h(r) error lower at every temperature | {cells} | {'yes' if met else 'no'} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
