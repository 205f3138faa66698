"""``stable-md evaluate``: the paper's stability and accuracy protocol (appendix A.7-A.8) for several models.

Every model runs R replicas from the same held-out starting frames with the same
initial velocities (Nosé-Hoover at a temperature, up to a maximum time). Every
``check_every`` steps a stability criterion is applied (bond-length deviation,
0.5 Å, for molecules; RDF error, 3.0, for liquids); a replica that fails it is
stopped there, and its stable time is the time of that check. Observable samples
are taken at the checks a replica passes, so h(r) (or the RDFs) come from the
stable part only. Reported per model:

- time to instability per replica with survival statistics (replicas still stable
  at the end are right-censored there): the Kaplan-Meier curve with its 95 % band,
  the median stable time with its interval, the restricted mean up to the cap, and
  against the first model the ratios of both with bootstrap intervals and the
  log-rank p-value (:mod:`stable_md.survival`);
- h(r) (or RDF) of the stable part and its error ∫|h − h_ref| dr against the data's
  (optionally Boltzmann-reweighted to the evaluation temperature, appendix A.9);
- the VACF of the first ``vacf_window`` steps, and the self-diffusion coefficient
  for periodic systems (MSD of the heavy atoms over the stable part);
- energy and force MAE on held-out data frames.

Held-out means: not among the training or validation frames that any of the models
recorded (pretrain history) for this data file. Results go to ``evaluation.json`` and
PNG figures in the output directory; each model's result is also kept in
``models/<label>.json`` so that an interrupted evaluation resumes model by model.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from openmm_bridge.md_settings import RECORDED_BEFORE, MDSettings, flat_record
from stable_md.compatibility import warn_if_other_structures
from stable_md.data import Dataset, data_record, load_dataset, same_data
from stable_md.devices import check_device, this_rank_device
from stable_md.observables import (Observable, binned_observables, diffusion_coefficient, make_observable,
                                   mean_squared_displacement, reference_frames, velocity_autocorrelation)
from stable_md.potentials.base import check_finite_predictions
from stable_md.files import RunLayout, file_sha256, write_json
from stable_md.potentials.model_file import load_model, read_metadata
from stable_md.reference_dynamics import reference_diffusion, reference_vacf, vacf_error
from stable_md.reweighting import temperature_weights
from stable_md.stability import BondGraph, Criterion, CriterionInputs, default_threshold, detect_bonds, make_criterion
from stable_md.structures import spread_indices
from stable_md.survival import compare, summarize

REPORT_NAME = "evaluation.json"
MODELS_DIRECTORY = "models"
# Settings that must agree between a model result on disk and a resumed evaluation.
_RESUME_KEYS = ("n_replicas", "temperature", "timestep", "total_time", "integrator", "collision_frequency",
                "friction", "criterion", "threshold", "check_every", "observable", "seed", "rdf_window",
                "vacf_window", "mode")


@dataclass
class EvaluateSettings:
    """How models are evaluated. Units: K, fs, 1/ps, Å; intervals in MD steps."""

    n_replicas: int = 64
    md: MDSettings = field(default_factory=MDSettings)
    total_time: float = 10_000.0
    criterion: str = "bond"
    threshold: Optional[float] = None
    check_every: int = 100
    observable: str = "hr"
    data_temperature: Optional[float] = None
    error_frames: int = 1000
    vacf_window: int = 100
    rdf_window: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.md, dict):  # as read back from a report
            self.md = MDSettings.from_dict(self.md)
        if self.observable not in binned_observables():
            raise ValueError(f"evaluate compares the observables {binned_observables()}, got {self.observable!r}")
        default = default_threshold(self.criterion)  # raises, naming the criteria, for an unknown one
        if self.threshold is None:
            self.threshold = default
        for name in ("n_replicas", "check_every", "error_frames", "rdf_window"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.vacf_window < 0:
            raise ValueError(f"vacf_window must be >= 0 steps (0: no VACF), got {self.vacf_window}")
        for name in ("total_time", "threshold"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.data_temperature is not None and not self.data_temperature > 0:
            raise ValueError(f"data_temperature must be positive (K), got {self.data_temperature}")
        if self.total_time < self.check_every * self.md.timestep:
            raise ValueError(f"the evaluation time ({self.total_time:g} fs) is shorter than one stability check "
                             f"interval ({self.check_every} steps of {self.md.timestep:g} fs)")

    @property
    def n_steps(self) -> int:
        return int(round(self.total_time / self.md.timestep))


@dataclass
class _ModelJob:
    """Everything one model's evaluation needs (picklable, so it can run in another process)."""

    model: str
    model_sha256: str
    label: str
    settings: EvaluateSettings
    numbers: np.ndarray
    starts: np.ndarray
    cell: Optional[np.ndarray]
    criterion: Any
    observable: Observable
    observable_reference: np.ndarray
    error_data: Dataset
    output: str
    progress: bool


def evaluate(models: Sequence[str | os.PathLike], data: str | os.PathLike | Dataset, output: str | os.PathLike,
             settings: Optional[EvaluateSettings] = None, labels: Optional[Sequence[str]] = None, jobs: int = 1,
             overwrite: bool = False, resume: bool = False, progress: bool = True, nproc: int = 1) -> dict:
    """Evaluate ``models`` on identical held-out starts of ``data``; writes ``output``/evaluation.json and PNGs.

    Returns the report (the content of evaluation.json). ``jobs`` > 1 evaluates that
    many models at once, each in its own process with one thread; ``nproc`` > 1 instead splits
    each model's replicas over that many processes (:mod:`stable_md.distributed`), which also
    uses several cores for a single model. The results do not depend on ``nproc`` beyond the
    rounding of the model's batches (the replicas start alike; Nosé-Hoover has no noise).
    """
    settings = settings or EvaluateSettings()
    # Resolved, so that a resumed evaluation from another working directory finds the same files.
    models = [str(Path(m).resolve()) for m in models]
    if not models:
        raise ValueError("evaluate needs at least one model file")
    labels = _labels(models, labels)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if nproc != 1 and jobs != 1:
        raise ValueError(f"--jobs {jobs} and --nproc {nproc}: give one (--jobs runs models side by side, --nproc "
                         f"splits each model's replicas)")
    from stable_md.distributed import check_ranks

    check_ranks(nproc, settings.n_replicas)
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other")
    metadata = {model: read_metadata(model) for model in models}
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    for model, meta in metadata.items():
        missing = sorted(set(dataset.numbers.tolist()) - set(int(z) for z in meta["species"]))
        if missing:
            raise ValueError(f"{dataset.source} contains elements the model {model} was not trained on (atomic "
                             f"numbers {missing}; the model knows {sorted(meta['species'])})")
    from openmm_bridge.engines import make_platform

    check_device(settings.md.device)
    make_platform(settings.md.platform, settings.md.device)  # an unavailable one is named before anything is written
    directory = Path(output)
    earlier = _prepare(directory, overwrite, resume)

    held_out, overlap_note = _held_out_frames(dataset, metadata.values())
    cell = None if dataset.cells is None else dataset.cells[0]
    reweighting = None
    if settings.data_temperature is not None and not math.isclose(settings.data_temperature, settings.md.temperature):
        reweighting = temperature_weights(dataset.energies, settings.data_temperature, settings.md.temperature)
    weights = None if reweighting is None else reweighting.weights
    bonds = detect_bonds(dataset.numbers, reference_frames(dataset), cell)
    criterion = _criterion(settings, bonds, cell, dataset, weights)
    starts, start_indices = _starting_frames(dataset, held_out, settings, criterion)
    observable = make_observable(settings.observable, dataset)
    reference = observable.reference(dataset, weights).numpy()
    error_indices = held_out[spread_indices(len(held_out), min(len(held_out), settings.error_frames))]
    error_data = dataset.subset(np.unique(error_indices))

    plan = {
        **data_record(dataset),
        "frames": len(dataset),
        "held_out_frames": int(len(held_out)),
        "held_out_note": overlap_note,
        "start_frames": [int(dataset.indices[i]) for i in start_indices],
        "error_frames": int(len(error_data)),
        "observable": observable.describe(),
        "reference": {"temperature_K": settings.md.temperature,
                      "data_temperature_K": settings.data_temperature,
                      "reweighting": None if reweighting is None else reweighting.describe()},
        "bonds": int(len(bonds.pairs)),
    }
    hashes = {model: file_sha256(model) for model in models}
    for model in models:
        warn_if_other_structures(metadata[model], dataset.numbers, dataset.periodic, model, dataset.source)
        check_finite_predictions(load_model(model, device=settings.md.device).module, starts, dataset.numbers, cell,
                                 f"evaluate {model}: on the starting frames")
    finished = {}
    if resume:
        # all checked before the plan is rewritten, so a refused resume leaves the earlier evaluation as it was
        _check_same_plan(directory, plan, flat_record(settings))
        finished = {label: _load_result(directory, label, settings, model, hashes[model])
                    for model, label in zip(models, labels)}
    _clear(directory, earlier)
    write_json(directory / "plan.json", {"settings": flat_record(settings), **plan})
    pending = [_ModelJob(model=model, model_sha256=hashes[model], label=label, settings=settings,
                         numbers=dataset.numbers, starts=starts, cell=cell, criterion=copy.deepcopy(criterion),
                         observable=observable, observable_reference=reference, error_data=error_data,
                         output=str(directory), progress=progress and jobs == 1)
               for model, label in zip(models, labels) if finished.get(label) is None]
    _run_jobs(pending, jobs, nproc)
    # results finished before this run were checked above; only the ones just written are read here
    results = [finished.get(label) or _load_result(directory, label, settings, model, hashes[model])
               for model, label in zip(models, labels)]
    report = {"settings": flat_record(settings), **plan, "reference_curve": {"x": observable.x.tolist(),
                                                                         "values": reference.tolist()},
              "reference_diffusion": reference_diffusion(dataset), "reference_vacf": reference_vacf(dataset),
              "models": results, "comparisons": survival_statistics(results, settings)}
    if report["reference_vacf"] is not None:
        report["reference_vacf"]["errors"] = {result["label"]: vacf_error(result.get("vacf"), report["reference_vacf"])
                                              for result in results}
    report["figures"] = [str(p) for p in _figures(report, observable, directory)]
    write_json(directory / REPORT_NAME, report)
    return report


def survival_sample(result: dict) -> tuple[np.ndarray, np.ndarray]:
    """A model result's (stable times in ps, became-unstable flags): the input of :mod:`stable_md.survival`."""
    return np.asarray(result["stable_time_ps"], dtype=float), np.asarray(result["unstable"], dtype=bool)


def survival_statistics(results: list[dict], settings: EvaluateSettings) -> list[dict]:
    """Add ``survival`` to each model's result and compare every model after the first with the first.

    Computed from the stored stable times, so results resumed from disk get them too;
    the bootstrap seed is the evaluation's, so a report is reproducible.
    """
    cap = settings.n_steps * settings.md.timestep / 1000.0
    samples = [survival_sample(r) for r in results]
    for result, (times, events) in zip(results, samples):
        result["survival"] = summarize(times, events, cap, seed=settings.md.seed).to_json()
        median = result["survival"]["median_ps"]
        result["median_stable_time_ps"] = cap if median is None else median  # None: beyond the cap
        result["median_censored"] = result["survival"]["median_censored"]
    return [{"label": result["label"], "baseline": results[0]["label"],
             **compare(samples[0], pair, cap, seed=settings.md.seed)}
            for result, pair in zip(results[1:], samples[1:])]


TABLE_COLUMNS = ("model", "median stable (ps) [95% CI]", "RMST (ps) [95% CI], ratio", "median ratio [95% CI]",
                 "log-rank p", "unstable at end", "error", "force MAE (meV/Å)", "energy MAE (meV)")


def _interval(values: list, cap: Optional[float] = None) -> str:
    """``[low, high]``; a bound the data cannot give within the cap reads ``> cap`` (or ``∞`` for ratios)."""
    beyond = "∞" if cap is None else f"> {cap:g}"
    return "[" + ", ".join(beyond if v is None or not math.isfinite(v) else f"{v:.2f}" for v in values) + "]"


def table_rows(report: dict) -> list[tuple[str, ...]]:
    """One row of formatted cells per model, in :data:`TABLE_COLUMNS` order.

    ≥ marks a median reached by the time cap (fewer than half of the replicas failed);
    an interval bound of ∞ is one the data cannot give within the cap.
    """
    rows = []
    against = {c["label"]: c for c in report.get("comparisons", [])}
    for result in report["models"]:
        survival = result["survival"]
        median = ("≥ " if survival["median_censored"] else "") + f"{result['median_stable_time_ps']:.2f}"
        comparison = against.get(result["label"])
        if comparison is None:
            ratio, p_value = "1 (baseline)", "–"
        elif comparison["median_ratio"] is None:
            ratio, p_value = "n/a (median ≥ cap)", f"{comparison['logrank_p']:.2g}"
        else:
            ratio = ("≥ " if comparison["median_ratio_censored"] else "") + \
                f"{comparison['median_ratio']:.2f} {_interval(comparison['median_ratio_ci'])}"
            p_value = f"{comparison['logrank_p']:.2g}"
        rmst_ratio = "" if comparison is None else \
            f" ×{comparison['rmst_ratio']:.2f} {_interval(comparison['rmst_ratio_ci'])}"
        error = result["observable"]["error"]
        cap = survival["cap_ps"]
        rows.append((result["label"], f"{median} {_interval(survival['median_ci_ps'], cap)}",
                     f"{survival['rmst_ps']:.2f} {_interval(survival['rmst_ci_ps'])}{rmst_ratio}", ratio, p_value,
                     f"{result['n_unstable']}/{result['n_replicas']}",
                     "n/a" if error is None else f"{error:.4f}", f"{result['errors']['force_mae_meV_per_A']:.1f}",
                     f"{result['errors']['energy_mae_meV']:.1f}"))
    return rows


def summary_table(report: dict) -> list[str]:
    """The comparison table of a report as fixed-width lines, as printed by the CLI."""
    name = "h(r)" if report["observable"]["name"] == "hr" else report["observable"]["name"]
    columns = [c if c != "error" else f"{name} error" for c in TABLE_COLUMNS]
    rows = table_rows(report)
    widths = [max(22, *(len(row[0]) + 2 for row in rows))] + [
        max(len(c), *(len(row[k]) for row in rows)) + 3 for k, c in enumerate(columns) if k]
    lines = ["".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(columns, widths)))]
    for row in rows:
        lines.append("".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths))))
    total = report["settings"]["total_time"] / 1000.0
    lines.append(f"(stable times are right-censored at the {total:g} ps evaluated: Kaplan-Meier medians, RMST = "
                 f"restricted mean up to {total:g} ps; ratios (×) and log-rank p against {rows[0][0]}; ≥ marks a "
                 f"median reached by the cap, > {total:g} a bound the data cannot give)")
    for line in (vacf_line(report), _diffusion_line(report)):
        if line:
            lines.append(line)
    return lines


def vacf_line(report: dict) -> Optional[str]:
    """Each model's VACF against the data's dense segment, when the data has one."""
    reference = report.get("reference_vacf")
    if not reference:
        return None
    parts = []
    for label, error in reference["errors"].items():
        parts.append(f"{label} n/a" if error is None else f"{label} {error['mean_abs']:.3f}")
    lags = [error["max_lag_fs"] for error in reference["errors"].values() if error]
    span = f" over lags 0-{max(lags):g} fs" if lags else ""
    return (f"VACF against the data's ({reference['frames']} frames {reference['interval_fs']:g} fs apart), mean "
            f"|C - C_data|{span}: " + "; ".join(parts))


def _diffusion_line(report: dict) -> Optional[str]:
    """Heavy-atom self-diffusion of each model (periodic boxes), against the data's own when it has one."""
    reference = report.get("reference_diffusion")
    models = [(result["label"], result.get("diffusion")) for result in report["models"]]
    if reference is None and not any(d for _, d in models):
        return None
    parts = []
    for label, diffusion in models:
        if not diffusion:
            parts.append(f"{label} n/a")
            continue
        value = diffusion["mean_m2_per_s"]
        shown = f"{label} {value * 1e9:.2f} ± {diffusion['std_m2_per_s'] * 1e9:.2f}"
        if reference is not None:
            shown += f" ({value / reference['m2_per_s'] - 1:+.0%})"
        parts.append(shown)
    head = "self-diffusion of the heavy atoms (1e-9 m²/s): "
    if reference is not None:
        head += (f"data {reference['m2_per_s'] * 1e9:.2f} (its {reference['frames']} frames "
                 f"{reference['frame_interval_fs']:g} fs apart); ")
    return head + "; ".join(parts)


# -- set-up -------------------------------------------------------------------------------------------------------

def _labels(models: list[str], labels: Optional[Sequence[str]]) -> list[str]:
    if labels:
        if len(labels) != len(models):
            raise ValueError(f"{len(models)} models but {len(labels)} labels; give one --label per model")
        chosen = [str(label) for label in labels]
    else:
        chosen = [Path(m).name.removesuffix(".pt") for m in models]
    bad = [label for label in chosen if not label or "/" in label or label.startswith(".")]
    if bad:
        raise ValueError(f"labels must be non-empty file-name-safe words, got {bad}")
    if len(set(chosen)) != len(chosen):
        if labels:
            raise ValueError(f"labels must be distinct, got {chosen}")
        chosen = [f"{k}-{label}" for k, label in enumerate(chosen)]
    return chosen


# An empty models/ (a start that failed before its first plan or result) counts as no evaluation.
RUN_LAYOUT = RunLayout("an evaluation", files=(REPORT_NAME, "plan.json", MODELS_DIRECTORY),
                       started_by=(REPORT_NAME, "plan.json", MODELS_DIRECTORY, "*.png"),
                       resume_from=MODELS_DIRECTORY, patterns=("*.png",), resume_verb="finish it")


def _prepare(directory: Path, overwrite: bool, resume: bool) -> list[Path]:
    """Check that ``directory`` may take this evaluation; return what an overwrite will clear (nothing is
    touched here: every input is checked before the first write)."""
    return RUN_LAYOUT.prepare(directory, overwrite, resume)


def _clear(directory: Path, existing: list[Path]) -> None:
    """Remove an earlier evaluation's files (``_prepare``'s list) and make ``directory``/models."""
    RUN_LAYOUT.clear(existing)
    (directory / MODELS_DIRECTORY).mkdir(parents=True, exist_ok=True)


def _differing_settings(recorded: dict, current: dict) -> list[str]:
    """The settings a resumed evaluation must share with the earlier one (:data:`_RESUME_KEYS`) that differ."""
    return [key for key in _RESUME_KEYS
            if recorded.get(key, RECORDED_BEFORE.get(key)) != current.get(key, RECORDED_BEFORE.get(key))]


def _check_same_plan(directory: Path, plan: dict, settings: dict) -> None:
    """A resumed evaluation may add models, but every model must run with the same settings from the same frames
    of the same data.

    The held-out starts follow from the training frames the given models record, so a model
    trained on other frames (or another data file) would otherwise be compared from other starts.
    """
    path = directory / "plan.json"
    if not path.exists():
        return
    earlier = json.loads(path.read_text())
    different = _differing_settings(earlier.get("settings", {}), settings)
    if different:
        raise ValueError(f"cannot resume {directory}: it was made with other settings ({', '.join(different)} "
                         f"differ); use --overwrite or another --output")
    for key, what in (("data_fingerprint", "data"), ("start_frames", "held-out starting frames")):
        if earlier.get(key) is not None and earlier.get(key) != plan[key]:
            raise ValueError(f"cannot resume {directory}: its finished models ran on other {what} than these models "
                             f"and --data give now (the models' recorded training frames decide the held-out "
                             f"starts); use --overwrite or another --output")


def _held_out_frames(data: Dataset, metadata: Sequence[dict]) -> tuple[np.ndarray, str]:
    """Positions in ``data`` of frames no model trained, validated or refined on (from their histories, matched
    by the frames' fingerprint, so the path and working directory do not matter)."""
    used: set[int] = set()
    recorded = 0
    for meta in metadata:
        for entry in meta.get("history", []):
            if entry.get("stage") not in ("pretrain", "refine") or not same_data(entry, data):
                continue
            recorded += 1
            used.update(int(i) for i in entry.get("train_indices", []))
            used.update(int(i) for i in entry.get("val_indices", []))
    keep = np.array([int(index) not in used for index in data.indices], dtype=bool)
    if recorded == 0:
        return np.arange(len(data)), ("no model records pretraining on this file, so every frame counts as held "
                                      "out; starts and errors may overlap the models' training data")
    if not keep.any():
        raise ValueError(f"every frame of {data.source} was used to train or validate one of the models; evaluate on "
                         f"a file with held-out frames")
    return np.flatnonzero(keep), f"{int(keep.sum())} frames no model trained or validated on"


def _criterion(settings: EvaluateSettings, bonds: BondGraph, cell: Optional[np.ndarray], data: Dataset,
               weights: Optional[np.ndarray]) -> Criterion:
    """The stability criterion; the rdf one compares with the data's (optionally reweighted) RDFs."""
    inputs = CriterionInputs(bonds=bonds, cell=cell, data=data, weights=weights, window=settings.rdf_window)
    return make_criterion(settings.criterion, inputs, settings.threshold)


def _starting_frames(data: Dataset, held_out: np.ndarray, settings: EvaluateSettings, criterion
                     ) -> tuple[np.ndarray, np.ndarray]:
    """R held-out frames spread over the set, skipping frames that already fail the bond or imd criterion."""
    candidates = held_out
    if not criterion.windowed:  # a windowed criterion (rdf) judges consecutive checks, not one frame
        candidates = held_out[~criterion(data.positions[held_out])]
        if len(candidates) == 0:
            raise ValueError(f"every held-out frame of {data.source} already fails the {settings.criterion} criterion "
                             f"at {settings.threshold:g} {criterion.unit}; raise --threshold")
    chosen = candidates[spread_indices(len(candidates), settings.n_replicas)]
    if data.cells is not None and not np.allclose(data.cells[chosen], data.cells[0], atol=1e-6):
        raise ValueError(f"{data.source}: the frames have different boxes; evaluation runs at constant volume")
    return data.positions[chosen], chosen


# -- one model ------------------------------------------------------------------------------------------------------

def _run_jobs(jobs_to_run: list[_ModelJob], jobs: int, nproc: int = 1) -> None:
    if nproc > 1 and jobs_to_run:
        from stable_md.distributed import launch

        launch(nproc, _evaluate_models, (jobs_to_run,))
        return
    if jobs == 1 or len(jobs_to_run) <= 1:
        _evaluate_models(jobs_to_run)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a forked child would inherit torch's and OpenMM's threads and state.
    with ProcessPoolExecutor(max_workers=min(jobs, len(jobs_to_run)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        for label in pool.map(_evaluate_model, jobs_to_run):
            print(f"evaluated {label}", flush=True)


def _evaluate_models(jobs_to_run: list[_ModelJob]) -> None:
    """The models one after the other, each on this process's share of the replicas."""
    for job in jobs_to_run:
        _evaluate_model(job)


def _evaluate_model(job: _ModelJob) -> str:
    """Run one model's replicas (this process's block of them) and, on process 0, write ``models/<label>.json``;
    returns the label."""
    from stable_md._threads import limit_threads
    from stable_md.distributed import current_group

    limit_threads()
    group = current_group()
    from openmm_bridge.replicas import ReplicaSet
    from openmm_bridge.reporters import VelocityRecorder
    from stable_md.pretrain import prediction_errors
    from stable_md.reporting import DisplacementRecorder, ObservableAverager, StabilityMonitor

    s = job.settings
    started = time.perf_counter()
    device = this_rank_device(s.md.device, group.rank)  # several ranks with cuda: each its own GPU
    model = load_model(job.model, device=device)
    errors = prediction_errors(model.module, job.error_data) if group.main else None
    criterion, observable = job.criterion, job.observable
    n_replicas = len(job.starts)
    mine = group.block(n_replicas)
    # this process's block, started as in one process whatever nproc
    replicas = ReplicaSet.from_settings(model, job.numbers, job.starts, s.md.with_changes(device=device), part=mine,
                                        stream=group.rank, cell=job.cell, check_interval=min(s.check_every, 50))
    # Order matters: the sampler and the recorders after the monitor skip the replicas it has just stopped.
    monitor = StabilityMonitor(criterion, s.check_every)
    averager = ObservableAverager(observable, s.check_every, job.cell)
    recorder = VelocityRecorder(min(s.vacf_window, s.n_steps))
    reporters = [monitor, averager, recorder]
    displacements = None
    if job.cell is not None:
        heavy = np.flatnonzero(job.numbers > 1) if (job.numbers > 1).any() else np.arange(len(job.numbers))
        displacements = DisplacementRecorder(s.check_every, heavy, job.cell, len(mine))
        reporters.append(displacements)
    # The starts are data frames, not the model's: they are checked (and are the MSD's origin) but not sampled,
    # so a model none of whose replicas passes a check after t = 0 gets no observable error.
    start = replicas.frames()
    monitor.check(replicas, start.positions, start.running)
    if displacements is not None:
        displacements.record(start.positions, start.running & ~replicas.unstable)
    bar = _bar(job, s.n_steps) if group.main else None

    def advance(steps: int) -> None:
        if bar is not None:
            bar.update(steps)
            bar.set_postfix(unstable=int(replicas.unstable.sum()), refresh=False)

    try:
        replicas.run(s.n_steps, reporters=reporters, progress=advance)
    finally:
        if bar is not None:
            bar.close()
    # every process's part, in replica order, to process 0
    parts = group.gather({
        "unstable": replicas.unstable, "unstable_step": replicas.unstable_step,
        "reasons": {int(mine[k]): reason for k, reason in replicas.reasons.items()},
        "total": averager.total, "count": averager.count,
        "vacf_curves": _vacf_curves(recorder.stacked(), recorder.stable) if recorder.velocities else None,
        "diffusion": (None if displacements is None
                      else _diffusion_values(displacements.unwrapped, displacements.stable_frames, s))})
    if not group.main:
        return job.label
    unstable = np.concatenate([part["unstable"] for part in parts])
    unstable_step = np.concatenate([part["unstable_step"] for part in parts])
    reasons = {k: v for part in parts for k, v in part["reasons"].items()}
    totals = [part["total"] for part in parts if part["total"] is not None]
    count = sum(part["count"] for part in parts)
    curves = [part["vacf_curves"] for part in parts if part["vacf_curves"] is not None and len(part["vacf_curves"])]
    vacf = _vacf(np.concatenate(curves), s) if curves else None
    # A replica that never failed ran the whole time (the run only ends early when all have failed).
    stable_steps = np.where(unstable, unstable_step, s.n_steps)
    stable_ps = stable_steps * s.md.timestep / 1000.0
    mean_curve = (sum(totals[1:], totals[0]) / count if totals else np.zeros(len(job.observable_reference)))
    width = float(observable.x[1] - observable.x[0])
    error = float(np.abs(mean_curve - job.observable_reference).sum() * width) if count else None
    times = np.arange(0, s.n_steps + 1, s.check_every) * s.md.timestep / 1000.0
    fraction = [float(np.mean(unstable & (stable_ps <= t + 1e-9))) for t in times]
    result: dict[str, Any] = {
        "label": job.label,
        "model": job.model,
        "model_sha256": job.model_sha256,
        "settings": flat_record(s),
        "n_replicas": n_replicas,
        "stable_time_ps": stable_ps.tolist(),
        "unstable": unstable.tolist(),
        "reasons": {str(k): v for k, v in sorted(reasons.items())},
        "n_unstable": int(unstable.sum()),
        "unstable_fraction_end": float(unstable.mean()),
        "mean_stable_time_ps": float(stable_ps.mean()),
        "unstable_fraction_curve": {"time_ps": times.tolist(), "fraction": fraction},
        "observable": {"name": observable.name, "x": observable.x.tolist(), "mean": mean_curve.tolist(),
                       "samples": int(count), "error": error,
                       "error_definition": "∫|g − g_ref| dr over the bins (0: identical)"},
        "vacf": vacf,
        "diffusion": None if displacements is None else _diffusion(
            [value for part in parts for value in part["diffusion"]], s),
        "errors": errors,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json(Path(job.output) / MODELS_DIRECTORY / f"{job.label}.json", result)
    return job.label


def _vacf_curves(velocities: np.ndarray, stable: np.ndarray) -> Optional[np.ndarray]:
    """[k, lags] normalised VACFs of the k replicas still stable after the window; velocities [R, T, N, 3]."""
    chosen = np.flatnonzero(stable)
    window = velocities.shape[1]
    if len(chosen) == 0 or window < 2:
        return None
    return np.stack([velocity_autocorrelation(velocities[r], window=window // 2) for r in chosen])


def _vacf(curves: np.ndarray, s: EvaluateSettings) -> dict:
    """Mean and spread of the VACFs ``curves`` [k, lags] of the stable replicas."""
    lags = np.arange(curves.shape[1]) * s.md.timestep
    return {"lag_fs": lags.tolist(), "mean": curves.mean(axis=0).tolist(),
            "std": curves.std(axis=0).tolist(), "replicas": int(len(curves))}


def _diffusion_values(unwrapped: list[np.ndarray], samples: np.ndarray, s: EvaluateSettings) -> list[float]:
    """Self-diffusion coefficient (m²/s) of the heavy atoms of each replica with 10 or more stable checks."""
    if not unwrapped:
        return []
    trajectory = np.stack(unwrapped, axis=1)  # [R, T, heavy, 3]
    interval = s.check_every * s.md.timestep
    values = []
    for r, n_frames in enumerate(samples):
        if n_frames < 10:
            continue
        msd = mean_squared_displacement(trajectory[r, :n_frames], max_lag=n_frames // 2)
        values.append(diffusion_coefficient(msd, interval))
    return values


def _diffusion(values: list[float], s: EvaluateSettings) -> Optional[dict]:
    """Mean and spread of the replicas' self-diffusion coefficients (m²/s)."""
    interval = s.check_every * s.md.timestep
    if not values:
        return None
    return {"mean_m2_per_s": float(np.mean(values)), "std_m2_per_s": float(np.std(values)),
            "per_replica_m2_per_s": [float(v) for v in values], "frame_interval_fs": interval}


def _bar(job: _ModelJob, total: int):
    if not job.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", desc=f"evaluate {job.label}", dynamic_ncols=True)


def _load_result(directory: Path, label: str, settings: EvaluateSettings, model: str,
                 model_sha256: str) -> Optional[dict]:
    """The finished result of ``label`` in ``directory``, if it was made from the same model file (by content;
    results written before contents were recorded compare resolved paths) with the same settings."""
    path = directory / MODELS_DIRECTORY / f"{label}.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    different = _differing_settings(result.get("settings", {}), flat_record(settings))
    if different:
        raise ValueError(f"cannot resume {directory}: {path.name} was made with other settings "
                         f"({', '.join(different)} differ); use --overwrite")
    recorded = result.get("model_sha256")
    same = recorded == model_sha256 if recorded else Path(result.get("model", "")).resolve() == Path(model)
    if not same:
        raise ValueError(f"cannot resume {directory}: {path.name} was made from another model file "
                         f"({result.get('model')}) than {model} (their contents differ); give that file, another "
                         f"--label, or --overwrite")
    return result


# -- figures ------------------------------------------------------------------------------------------------------

def _figures(report: dict, observable, directory: Path) -> list[Path]:
    from stable_md import plots

    results = report["models"]
    temperature = report["settings"]["temperature"]
    paths = [
        plots.stability_curves_figure({r["label"]: r["survival"]["kaplan_meier"] for r in results},
                                      report["settings"]["total_time"] / 1000.0, directory / "stability.png",
                                      title=f"{temperature:g} K"),
        plots.stable_time_figure({r["label"]: r["stable_time_ps"] for r in results},
                                 report["settings"]["total_time"] / 1000.0, directory / "stable_times.png"),
    ]
    curves = {r["label"]: np.asarray(r["observable"]["mean"]) for r in results if r["observable"]["samples"]}
    if curves:
        paths.append(plots.observable_figure(np.asarray(report["reference_curve"]["x"]),
                                             np.asarray(report["reference_curve"]["values"]), curves,
                                             directory / f"{observable.name}.png", observable.x_label,
                                             observable.y_label, title=f"stable part of the runs, {temperature:g} K",
                                             panels=observable.panels(), categories=observable.categories))
    vacfs = {r["label"]: r["vacf"] for r in results if r.get("vacf")}
    if vacfs:
        paths.append(plots.vacf_figure(vacfs, directory / "vacf.png", reference=report.get("reference_vacf")))
    return paths
