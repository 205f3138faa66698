"""StABlE training: Algorithm 1 of the paper (appendix A.3) as a resumable run.

Simulation phase: R replicas of the current model run in OpenMM, ``steps_per_epoch``
(t) steps at a time, checked for instability every ``check_every`` steps; an unstable
replica is frozen. When the unstable fraction reaches ``f_max`` the learning phase
starts: every epoch puts all replicas back to where they were t steps before their
end (the near-unstable states), simulates t steps with the current model sampling
every ``sample_every`` (S) steps, and takes one optimizer step on

    Σ_obs w_obs ||ĝ_obs − g_ref,obs||²  (gradient: the Boltzmann estimator)
    + λ · energy/force loss on the training frames (ordinary backprop),

until the unstable fraction of an epoch drops to ``f_min``. The phases alternate
until a budget (cycles, learning epochs, simulated time or wall time) is spent.

The run directory holds ``settings.json``, ``log.jsonl`` (one line per epoch of
either phase), ``checkpoint.pt`` (atomic, every epoch; ``resume=True`` continues
from it and repeats the uninterrupted run exactly), ``summary.json`` and PNG plots.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from stable_md.data import Dataset, load_dataset, same_file
from stable_md.estimator import DEFAULT_BATCH_SIZE, ObservableTerm, boltzmann_gradient
from stable_md.observables import OBSERVABLES, make_observable, reference_frames
from stable_md.potentials.model_file import (ModelFile, json_default, atomic_write, build_metadata, load_model,
                                            save_model, truncate_jsonl_log, write_json)
from stable_md.pretrain import DatasetTensors, EnergyForceLoss, prediction_errors, refit_energy_shifts
from stable_md.stability import (MIN_DISTANCE_THRESHOLD, TRAINING_THRESHOLD, BondLengthCriterion,
                                 MinDistanceCriterion, detect_bonds)
from stable_md.structures import spread_indices

LOG_NAME = "log.jsonl"
CHECKPOINT_NAME = "checkpoint.pt"
SETTINGS_NAME = "settings.json"
SUMMARY_NAME = "summary.json"
CRITERIA = ("bond", "imd")
BUDGETS = ("cycles", "epochs", "wall time", "simulation time")
OPTIMIZERS = ("sgd", "adam")
# Settings a resumed run must share with the original (budgets may change).
BUDGET_KEYS = ("max_cycles", "max_epochs", "max_simulation_time", "max_wall_time")


# Below this median share of the total gradient the observable term does not steer learning; advice aims at
# the share seen where refinement stabilized ethanol (about a third).
OBSERVABLE_GRADIENT_SHARE_LOW = 0.05
OBSERVABLE_GRADIENT_SHARE_TARGET = 0.3


class RefineError(ValueError):
    """Refinement cannot go on with these inputs or settings; the message says what to change."""


@dataclass
class RefineSettings:
    """What ``stable-md refine`` does. Units: K, fs, Å, eV; times of budgets in fs and s.

    Defaults follow the paper's Table 2 where our scales allow (bond criterion 0.25 Å, h(r),
    λ = 10, Nosé-Hoover at 500 K, 0.5 fs) with replicas and t scaled down for a CPU: 32
    replicas, t = 1000 steps (0.5 ps), S = 10. The optimizer is Adam at 1e-4 rather than the
    paper's SGD at 1e-3: with our eV-based losses (force weight 100 Å²/eV²) a pretrained
    model's energy/force gradient can reach norms of several hundred, and one SGD step at
    1e-3 with λ = 10 wrecked a test model, while Adam's step size does not depend on that
    scale. f_max = 0.2 and f_min = 0.05 (the paper does not state its values).
    """

    observables: list[str] = field(default_factory=lambda: ["hr"])
    observable_weights: list[float] = field(default_factory=lambda: [1.0])
    criterion: str = "bond"
    threshold: Optional[float] = None
    n_replicas: int = 32
    temperature: float = 500.0
    timestep: float = 0.5
    integrator: str = "nose-hoover"
    collision_frequency: float = 10.0
    friction: float = 1.0
    steps_per_epoch: int = 1000
    sample_every: int = 10
    check_every: int = 50
    f_max: float = 0.2
    f_min: float = 0.05
    qm_weight: float = 10.0
    qm_batch: int = 64
    energy_weight: float = 1.0
    force_weight: float = 100.0
    optimizer: str = "adam"
    lr: float = 1e-4
    lr_decay: float = 1.0
    momentum: float = 0.0
    clip_grad: Optional[float] = None
    max_cycles: int = 4
    max_epochs: int = 100
    max_simulation_time: float = 50_000.0
    max_wall_time: Optional[float] = None
    estimator_batch: int = DEFAULT_BATCH_SIZE
    nan_patience: int = 3
    train_frames: str = "auto"
    seed: int = 0
    mode: str = "batched"
    platform: str = "CPU"

    def __post_init__(self) -> None:
        self.observables = list(self.observables)
        self.observable_weights = [float(w) for w in self.observable_weights]
        if not self.observables:
            raise ValueError("at least one observable is needed (--obs)")
        unknown = [name for name in self.observables if name not in OBSERVABLES]
        if unknown:
            raise ValueError(f"unknown observable(s) {unknown}; expected some of {list(OBSERVABLES)}")
        if len(self.observable_weights) == 1 and len(self.observables) > 1:
            self.observable_weights = self.observable_weights * len(self.observables)
        if len(self.observable_weights) != len(self.observables):
            raise ValueError(f"{len(self.observables)} observables but {len(self.observable_weights)} weights "
                             f"(--obs-weight): give one weight, or one per --obs")
        if any(not w >= 0 for w in self.observable_weights):
            raise ValueError(f"observable weights must be >= 0, got {self.observable_weights}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown stability criterion {self.criterion!r}; expected one of {list(CRITERIA)}")
        if self.threshold is None:
            self.threshold = TRAINING_THRESHOLD if self.criterion == "bond" else MIN_DISTANCE_THRESHOLD
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {list(OPTIMIZERS)}")
        if self.train_frames not in ("auto", "pretrain", "all"):
            raise ValueError(f"train_frames must be auto, pretrain or all, got {self.train_frames!r}")
        positive = {"threshold": self.threshold, "temperature": self.temperature, "timestep": self.timestep,
                    "lr": self.lr, "lr_decay": self.lr_decay, "max_simulation_time": self.max_simulation_time}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        counts = {"n_replicas": self.n_replicas, "steps_per_epoch": self.steps_per_epoch,
                  "sample_every": self.sample_every, "check_every": self.check_every, "qm_batch": self.qm_batch,
                  "max_cycles": self.max_cycles, "max_epochs": self.max_epochs,
                  "estimator_batch": self.estimator_batch, "nan_patience": self.nan_patience}
        for name, value in counts.items():
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if self.n_replicas < 2:
            raise ValueError("refinement needs at least 2 replicas")
        if self.steps_per_epoch % self.sample_every or self.steps_per_epoch % self.check_every:
            raise ValueError(f"steps_per_epoch ({self.steps_per_epoch}) must be a multiple of sample_every "
                             f"({self.sample_every}) and of check_every ({self.check_every})")
        if not 0 <= self.f_min < self.f_max <= 1:
            raise ValueError(f"need 0 <= f_min < f_max <= 1, got f_min={self.f_min}, f_max={self.f_max}")
        if self.qm_weight < 0:
            raise ValueError(f"qm_weight (λ) must be >= 0, got {self.qm_weight}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be positive, got {self.clip_grad}")
        if self.max_wall_time is not None and not self.max_wall_time > 0:
            raise ValueError(f"max_wall_time must be positive, got {self.max_wall_time}")


@dataclass
class RefineResult:
    """The refined model (in memory), the per-epoch history and the run summary."""

    model: nn.Module
    history: list[dict]
    summary: dict[str, Any]
    output: Path


def default_run_directory(output: Path) -> Path:
    """``model.stable.pt`` -> ``model.stable.refine/``."""
    return output.with_name(output.stem + ".refine")


def refine(model: str | Path | ModelFile, data: str | Path | Dataset, output: str | Path,
           settings: Optional[RefineSettings] = None, run_directory: Optional[str | Path] = None,
           overwrite: bool = False, resume: bool = False, progress: bool = True) -> RefineResult:
    """Run StABlE training of ``model`` on ``data`` and write the refined model to ``output``.

    Parameters
    ----------
    model:
        A stable-md model file (or a loaded :class:`ModelFile`).
    data:
        The fixed data set: starting frames, reference observables and the energy/force
        regularizer. When the model was pretrained on this file, only its training frames
        are used (``settings.train_frames="auto"``), so held-out frames stay held out.
    output:
        Refined model file. ``run_directory`` (default ``<output stem>.refine/``) gets the
        log, checkpoint, summary and plots.
    resume:
        Continue an interrupted run from its checkpoint (losing at most one epoch).
    """
    settings = settings or RefineSettings()
    output = Path(output)
    directory = Path(run_directory) if run_directory is not None else default_run_directory(output)
    _prepare(output, directory, overwrite, resume)
    run = _Refinement(model, data, output, directory, settings, resume, progress)
    return run.execute()


def _prepare(output: Path, directory: Path, overwrite: bool, resume: bool) -> None:
    if resume:
        if not (directory / CHECKPOINT_NAME).exists():
            raise FileNotFoundError(f"cannot resume: {directory / CHECKPOINT_NAME} does not exist")
        return
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; refusing to overwrite it (pass --overwrite)")
    ours = [directory / name for name in (LOG_NAME, CHECKPOINT_NAME, SETTINGS_NAME, SUMMARY_NAME)]
    ours += sorted(directory.glob("*.png")) if directory.exists() else []
    existing = [path for path in ours if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{directory} already holds a refine run ({existing[0].name}, ...); pass --overwrite "
                              f"to replace it or --resume to continue it")
    for path in existing:
        path.unlink()


class _Refinement:
    """One refine run: the replicas, the optimizer and the loop state, checkpointed every epoch."""

    def __init__(self, model, data, output: Path, directory: Path, settings: RefineSettings, resume: bool,
                 progress: bool) -> None:
        self.settings, self.output, self.directory, self.progress = settings, output, directory, progress
        self.model_file = model if isinstance(model, ModelFile) else load_model(model)
        self.model = self.model_file.module
        self.data = data if isinstance(data, Dataset) else load_dataset(data)
        self._check_species()
        self.train, self.test, self.frames_note = self._split()
        self.cell = None if self.train.cells is None else self.train.cells[0]
        self.bonds = detect_bonds(self.train.numbers, reference_frames(self.train), self.cell)
        self.terms = self._terms()
        self.criterion = self._criterion()
        self.starts = self._starting_frames()
        self._build_optimizer()
        self.qm_loss = EnergyForceLoss(settings.energy_weight, settings.force_weight)
        dtype = next(self.model.parameters()).dtype
        self.qm_data = DatasetTensors(self.train, dtype=dtype)
        self.rng = np.random.default_rng(settings.seed)
        self.state = {"cycle": 0, "phase": "simulation", "epoch": 0, "learning_epochs": 0, "simulated_steps": 0,
                      "nan_failures": 0, "wall_seconds": 0.0, "stopped_by": None, "first_check_done": False}
        self.history: list[dict] = []
        self.first_means: Optional[dict[str, list]] = None
        self.last_means: Optional[dict[str, list]] = None
        self.replicas = self._build_replicas()
        self.rewind_positions = self.replicas.positions()
        self.rewind_velocities = self.replicas.velocities()
        self.initial_errors: Optional[dict] = None
        record = self._record()
        if resume:
            self._check_same_run(record)
            self._load_checkpoint()
        else:
            write_json(directory / SETTINGS_NAME, record)
            self.initial_errors = self._test_errors()

    # -- set-up --------------------------------------------------------------------------------------
    def _check_species(self) -> None:
        known = set(self.model_file.species)
        missing = sorted(set(self.data.numbers.tolist()) - known)
        if missing:
            raise ValueError(f"{self.data.source} contains elements the model {self.model_file.path} was not "
                             f"trained on (atomic numbers {missing}; the model knows {sorted(known)})")

    def _split(self) -> tuple[Dataset, Dataset, str]:
        """Training frames (starts, references, regularizer) and held-out frames (error report)."""
        choice = self.settings.train_frames
        pretrain = next((h for h in self.model_file.metadata.get("history", []) if h.get("stage") == "pretrain"),
                        None)
        pretrained_here = pretrain is not None and same_file(pretrain.get("data"), self.data.source)
        if choice == "pretrain" and not pretrained_here:
            raise ValueError(f"train_frames='pretrain' needs the data file the model was pretrained on "
                             f"({None if pretrain is None else pretrain.get('data')}), got {self.data.source}")
        if choice != "all" and pretrained_here:
            train_idx = np.asarray(pretrain["train_indices"], dtype=np.int64)
            test_idx = np.asarray(pretrain.get("test_indices", []), dtype=np.int64)
            position = {int(index): k for k, index in enumerate(self.data.indices)}
            if all(int(i) in position for i in train_idx):
                train = self.data.subset([position[int(i)] for i in train_idx])
                test = self.data.subset([position[int(i)] for i in test_idx if int(i) in position])
                return train, test, f"the model's {len(train)} pretraining frames of {self.data.source}"
        return self.data, self.data.subset([]), f"all {len(self.data)} frames of {self.data.source}"

    def _terms(self) -> list[ObservableTerm]:
        terms = []
        for name, weight in zip(self.settings.observables, self.settings.observable_weights):
            observable = make_observable(name, self.train, bonds=self.bonds)
            terms.append(ObservableTerm(observable, observable.reference(self.train), weight))
        return terms

    def _criterion(self):
        if self.settings.criterion == "bond":
            return BondLengthCriterion(self.bonds, self.settings.threshold, self.cell)
        return MinDistanceCriterion(self.bonds, self.settings.threshold, self.cell)

    def _starting_frames(self) -> np.ndarray:
        """R training frames spread over the set, skipping frames the criterion already rejects."""
        acceptable = np.flatnonzero(~self.criterion(self.train.positions))
        if len(acceptable) == 0:
            raise ValueError(f"every training frame of {self.data.source} already fails the {self.settings.criterion}"
                             f" criterion at threshold {self.settings.threshold} Å; raise --threshold")
        return self.train.positions[acceptable[spread_indices(len(acceptable), self.settings.n_replicas)]]

    def _build_optimizer(self) -> None:
        s = self.settings
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        if s.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(parameters, lr=s.lr, momentum=s.momentum)
        else:
            self.optimizer = torch.optim.Adam(parameters, lr=s.lr)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=s.lr_decay)

    def _build_replicas(self):
        from openmm_bridge.replicas import ReplicaSet

        s = self.settings
        return ReplicaSet(self.model, self.train.numbers, self.starts, cell=self.cell, integrator=s.integrator,
                          temperature=s.temperature, timestep=s.timestep, friction=s.friction,
                          collision_frequency=s.collision_frequency, seed=s.seed, mode=s.mode, platform=s.platform,
                          check_interval=min(50, s.check_every, s.sample_every))

    def _record(self) -> dict:
        return {"model": str(self.model_file.path), "data": self.data.source, "output": str(self.output),
                "train_frames": self.frames_note, "settings": asdict(self.settings)}

    def _check_same_run(self, record: dict) -> None:
        saved = json.loads((self.directory / SETTINGS_NAME).read_text())
        old = {k: v for k, v in saved["settings"].items() if k not in BUDGET_KEYS}
        new = {k: v for k, v in record["settings"].items() if k not in BUDGET_KEYS}
        different = [k for k in new if old.get(k) != new[k]]
        if saved.get("model") != record["model"] or saved.get("data") != record["data"]:
            different = ["model/data"] + different
        if different:
            raise ValueError(f"cannot resume {self.directory}: settings differ from the original run "
                             f"({', '.join(different)}); only the budgets ({', '.join(BUDGET_KEYS)}) may change")
        write_json(self.directory / SETTINGS_NAME, record)

    # -- the loop ------------------------------------------------------------------------------------
    def execute(self) -> RefineResult:
        from tqdm.auto import tqdm

        s = self.settings
        started = time.perf_counter() - self.state["wall_seconds"]
        bar = tqdm(total=s.max_epochs, initial=self.state["learning_epochs"], disable=not self.progress,
                   desc="refine", unit="learning epoch")
        try:
            while self.state["stopped_by"] is None:
                self.state["stopped_by"] = self._budget_spent(started)
                if self.state["stopped_by"] is not None:
                    break
                if self.state["phase"] == "simulation":
                    row = self._simulation_epoch()
                else:
                    row = self._learning_epoch()
                    bar.update(1)
                self.state["epoch"] += 1
                self.state["wall_seconds"] = time.perf_counter() - started
                row.update(epoch=self.state["epoch"], cycle=self.state["cycle"],
                           wall_time_s=round(self.state["wall_seconds"], 2))
                self.history.append(row)
                with open(self.directory / LOG_NAME, "a") as log:
                    log.write(json.dumps(row, default=json_default) + "\n")
                bar.set_postfix(phase=row["phase"], cycle=row["cycle"], unstable=f"{row['unstable_fraction']:.2f}",
                                refresh=False)
                self._advance_phase(row)
                self._save_checkpoint()
        finally:
            bar.close()
        return self._finish()

    def _budget_spent(self, started: float) -> Optional[str]:
        s = self.settings
        if self.state["cycle"] >= s.max_cycles:
            return "cycles"
        if self.state["learning_epochs"] >= s.max_epochs:
            return "epochs"
        if s.max_wall_time is not None and time.perf_counter() - started >= s.max_wall_time:
            return "wall time"
        if (self.state["phase"] == "simulation"
                and self.state["simulated_steps"] * s.timestep >= s.max_simulation_time):
            return "simulation time"
        return None

    def _advance_phase(self, row: dict) -> None:
        s = self.settings
        if row["phase"] == "simulation" and row["unstable_fraction"] >= s.f_max:
            self.state["phase"] = "learning"
        elif row["phase"] == "learning":
            if row.get("stop"):
                self.state["stopped_by"] = row["stop"]
            elif row["unstable_fraction"] <= s.f_min:
                self.state["phase"] = "simulation"
                self.state["cycle"] += 1

    def _run_epoch(self, record_samples: bool) -> tuple[np.ndarray, np.ndarray]:
        """t steps of every running replica with stability checks; returns samples [S, N, 3] and newly unstable."""
        s = self.settings
        replicas = self.replicas
        samples: list[np.ndarray] = []
        before = replicas.unstable.copy()
        every = math.gcd(s.sample_every, s.check_every)

        def observe(frames) -> None:
            since_start = frames.step - start_step
            if record_samples and since_start % s.sample_every == 0:
                samples.append(frames.positions[frames.running])
            if since_start % s.check_every == 0:
                broken = np.flatnonzero(self.criterion(frames.positions) & frames.running)
                if len(broken):
                    replicas.mark_unstable(broken, self.criterion.reasons(frames.positions[broken]))
                if not self.state["first_check_done"]:
                    self.state["first_check_done"] = True
                    if replicas.unstable.all():
                        raise RefineError(
                            f"all {s.n_replicas} replicas were unstable at the first check ({s.check_every} steps, "
                            f"{s.check_every * s.timestep:g} fs), e.g. {replicas.reasons.get(0, '')}; try a smaller "
                            f"--timestep, a larger --threshold, or check that --temperature suits the data")

        start_step = replicas.step
        done = replicas.run(s.steps_per_epoch, callback=observe, every=every)
        # The shared clock moves by whole epochs even when every replica stopped early, so that
        # sampling and checks keep falling on the same steps of each epoch.
        if done < s.steps_per_epoch:
            replicas.step = start_step + s.steps_per_epoch
        newly = replicas.unstable & ~before
        stacked = np.concatenate(samples) if samples else np.zeros((0, len(self.train.numbers), 3))
        return stacked, newly

    def _simulation_epoch(self) -> dict:
        replicas = self.replicas
        running = replicas.running.copy()
        # rewind points: where each running replica is now, t steps before its end if it stays stable
        self.rewind_positions[running] = replicas.positions()[running]
        self.rewind_velocities[running] = replicas.velocities()[running]
        samples, newly = self._run_epoch(record_samples=True)
        self.state["simulated_steps"] += self.settings.steps_per_epoch
        row = {"phase": "simulation", "unstable_fraction": float(replicas.unstable.mean()),
               "newly_unstable": int(newly.sum()), "lr": self.optimizer.param_groups[0]["lr"],
               "simulated_time_ps": self.state["simulated_steps"] * self.settings.timestep / 1000.0}
        row.update(self._observable_losses(samples))
        return row

    def _learning_epoch(self) -> dict:
        s = self.settings
        self.replicas.reset(self.rewind_positions, self.rewind_velocities)
        samples, newly = self._run_epoch(record_samples=True)
        row = {"phase": "learning", "unstable_fraction": float(self.replicas.unstable.mean()),
               "samples": int(len(samples)), "lr": self.optimizer.param_groups[0]["lr"]}
        self.optimizer.zero_grad(set_to_none=True)
        problem = None
        if len(samples) < 2:
            problem = "fewer than two samples"
        else:
            result = boltzmann_gradient(self.model, samples, self.train.numbers, self.terms, s.temperature,
                                        cells=self.cell, batch_size=s.estimator_batch)
            row.update({"observable_loss": result.loss, **{f"loss_{k}": v for k, v in result.losses.items()}})
            self._remember_means(result.means)
            row["observable_grad_norm"] = _gradient_norm(self.model)
            if not math.isfinite(result.loss):
                problem = "non-finite observable loss"
        if s.qm_weight > 0 and problem is None:
            batch = self.qm_data.batch(torch.as_tensor(
                self.rng.choice(len(self.qm_data), size=min(s.qm_batch, len(self.qm_data)), replace=False)))
            qm_loss, stats = self.qm_loss(self.model, batch)
            row["qm_loss"] = float(qm_loss.detach())
            row["qm_force_mae_meV_per_A"] = 1000 * stats["force_abs_sum"] / stats["force_components"]
            if math.isfinite(row["qm_loss"]):
                (s.qm_weight * qm_loss).backward()
            else:
                problem = "non-finite energy/force loss"
        if problem is None:
            norm = _gradient_norm(self.model)
            row["grad_norm"] = norm
            if not math.isfinite(norm):
                problem = "non-finite gradient"
            elif s.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.clip_grad)
        if problem is None:
            self.optimizer.step()
            self.scheduler.step()
            self.state["nan_failures"] = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.state["nan_failures"] += 1
            row["skipped"] = problem
            if self.state["nan_failures"] >= s.nan_patience:
                row["stop"] = f"{s.nan_patience} skipped steps in a row ({problem})"
        self.state["learning_epochs"] += 1
        return row

    def _observable_losses(self, samples: np.ndarray) -> dict:
        if len(samples) == 0:
            return {}
        losses, total, means = {}, 0.0, {}
        with torch.no_grad():
            for term in self.terms:
                mean = term.observable(samples, self.cell).mean(dim=0)
                losses[f"loss_{term.observable.name}"] = float(((mean - term.reference) ** 2).sum())
                total += term.weight * losses[f"loss_{term.observable.name}"]
                means[term.observable.name] = mean.numpy()
        self._remember_means(means)
        return {"observable_loss": total, **losses}

    def _remember_means(self, means: dict) -> None:
        as_lists = {name: np.asarray(value).tolist() for name, value in means.items()}
        if self.first_means is None:
            self.first_means = as_lists
        self.last_means = as_lists

    def _test_errors(self) -> Optional[dict]:
        if len(self.test) == 0:
            return None
        frames = self.test.subset(np.arange(min(len(self.test), 500)))
        return prediction_errors(self.model, frames)

    # -- checkpoint ------------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        from openmm_bridge.replicas import snapshot_to_arrays

        snapshot = {k: torch.as_tensor(np.array(v)) for k, v in
                    snapshot_to_arrays(self.replicas.snapshot()).items() if k != "reasons"}
        payload = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "snapshot": snapshot,
            "reasons": json.dumps({str(k): v for k, v in self.replicas.reasons.items()}),
            "rewind_positions": torch.as_tensor(self.rewind_positions),
            "rewind_velocities": torch.as_tensor(self.rewind_velocities),
            "state": json.dumps(self.state), "history": json.dumps(self.history, default=json_default),
            "rng": json.dumps(self.rng.bit_generator.state),
            "means": json.dumps({"first": self.first_means, "last": self.last_means}),
            "initial_errors": json.dumps(self.initial_errors),
        }
        atomic_write(self.directory / CHECKPOINT_NAME, lambda tmp: torch.save(payload, tmp))

    def _load_checkpoint(self) -> None:
        from openmm_bridge.replicas import snapshot_from_arrays

        path = self.directory / CHECKPOINT_NAME
        try:
            payload = torch.load(path, weights_only=True)
        except Exception as error:  # a damaged file must name itself
            raise ValueError(f"{path}: cannot read the refine checkpoint ({error})") from error
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        arrays = {k: v.numpy() for k, v in payload["snapshot"].items()}
        arrays["reasons"] = np.array(payload["reasons"])
        self.replicas.restore(snapshot_from_arrays(arrays))
        self.rewind_positions = payload["rewind_positions"].numpy().copy()
        self.rewind_velocities = payload["rewind_velocities"].numpy().copy()
        self.state = json.loads(payload["state"])
        self.state["stopped_by"] = None
        self.history = json.loads(payload["history"])
        self.rng.bit_generator.state = json.loads(payload["rng"])
        means = json.loads(payload["means"])
        self.first_means, self.last_means = means["first"], means["last"]
        self.initial_errors = json.loads(payload["initial_errors"])
        truncate_jsonl_log(self.directory / LOG_NAME, self.state["epoch"])

    # -- the end ---------------------------------------------------------------------------------------
    def _weight_advice(self) -> Optional[str]:
        """A hint when the observable gradient was too small next to the energy/force gradient to steer learning."""
        ratios = [row["observable_grad_norm"] / row["grad_norm"] for row in self.history
                  if row["phase"] == "learning" and row.get("grad_norm") and "observable_grad_norm" in row]
        if not ratios or self.settings.qm_weight == 0:
            return None
        ratio = float(np.median(ratios))
        if ratio >= OBSERVABLE_GRADIENT_SHARE_LOW:
            return None
        factor = OBSERVABLE_GRADIENT_SHARE_TARGET / max(ratio, 1e-12)
        weights = ", ".join(f"{w * factor:.3g}" for w in self.settings.observable_weights)
        return (f"the observable gradient was only {100 * ratio:.1g}% of the total gradient (median over learning "
                f"epochs), so the energy/force term decided almost every step; try --obs-weight {weights} (or a "
                f"--qm-weight {factor:.3g} times smaller)")

    def _finish(self) -> RefineResult:
        from stable_md import plots

        s = self.settings
        learned = self.state["learning_epochs"] > 0 and any(
            row["phase"] == "learning" and "skipped" not in row for row in self.history)
        if learned:
            # Learning moves the constant energy offset, which no dynamics depend on; put it back.
            refit_energy_shifts(self.model, self.train)
            stop = self.state["stopped_by"]
            message = (f"{self.state['learning_epochs']} learning epochs in {self.state['cycle']} complete cycles; "
                       + (f"stopped by the {stop} budget" if stop in BUDGETS else f"stopped: {stop}"))
        else:
            message = (f"no replica became unstable enough to learn from (f_max = {s.f_max}) in "
                       f"{self.state['simulated_steps'] * s.timestep / 1000:g} ps of simulation; the model is unchanged")
        summary = {
            "message": message,
            "advice": self._weight_advice(),
            "stopped_by": self.state["stopped_by"],
            "refined": learned,
            "cycles": self.state["cycle"],
            "learning_epochs": self.state["learning_epochs"],
            "simulated_time_ps": self.state["simulated_steps"] * s.timestep / 1000.0,
            "wall_seconds": round(self.state["wall_seconds"], 1),
            "train_frames": self.frames_note,
            "final_unstable_fraction": self.history[-1]["unstable_fraction"] if self.history else None,
            "test_errors_before": self.initial_errors,
            "test_errors_after": self._test_errors(),
            "output": str(self.output),
        }
        figures = plots.refine_figures(self.history, self.terms, self.first_means, self.last_means, self.directory)
        summary["figures"] = [str(p) for p in figures]
        write_json(self.directory / SUMMARY_NAME, summary)
        entry = {"stage": "refine", "data": self.data.source, "train_frames": self.frames_note,
                 "settings": asdict(s), "summary": {k: v for k, v in summary.items() if k != "figures"},
                 "history": self.history}
        metadata = build_metadata(self.model, dict(self.model_file.metadata.get("hyperparameters", {})),
                                  history=list(self.model_file.metadata.get("history", [])) + [entry],
                                  extra={k: v for k, v in self.model_file.metadata.items()
                                         if k not in ("history", "created", "stable_md_version", "torch_version")
                                         and k not in _METADATA_REBUILT})
        save_model(self.model, self.output, metadata, overwrite=True)
        return RefineResult(model=self.model, history=self.history, summary=summary, output=self.output)


# Keys build_metadata recomputes from the module itself.
_METADATA_REBUILT = ("format", "format_version", "arch", "hyperparameters", "cutoff", "species", "units",
                     "energy_shift_eV", "energy_scale_eV", "dtype", "n_parameters")


def _gradient_norm(model: nn.Module) -> float:
    squares = [p.grad.detach().double().pow(2).sum() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0

