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
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from openmm_bridge.md_settings import RECORDED_BEFORE, MDSettings, flat_record, same_environment
from stable_md.compatibility import warn_if_other_structures
from stable_md.data import Dataset, data_record, load_dataset, same_data
from stable_md.devices import check_device, this_rank_device
from stable_md.estimator import (DEFAULT_BATCH_SIZE, EstimatorResult, ObservableTerm, balanced_selection,
                                 boltzmann_gradient, localized_boltzmann_gradient)
from stable_md.observables import OBSERVABLES, make_observable, reference_frames
from stable_md.files import (RunLayout, atomic_write, file_sha256, json_default, read_checkpoint, truncate_jsonl_log,
                             write_json)
from stable_md.guard import REFERENCE_KEY, stability_reference
from stable_md.potentials.model_file import ModelFile, build_metadata, load_model, save_model
from stable_md.potentials.base import check_finite_predictions
from stable_md.pretrain import DatasetTensors, EnergyForceLoss, prediction_errors, refit_energy_shifts
from stable_md.stability import CriterionInputs, default_threshold, detect_bonds, make_criterion
from stable_md.structures import spread_indices

if TYPE_CHECKING:
    from openmm_bridge.mm_environment import MMEnvironment

LOG_NAME = "log.jsonl"
CHECKPOINT_NAME = "checkpoint.pt"
SETTINGS_NAME = "settings.json"
SUMMARY_NAME = "summary.json"
BUDGETS = ("cycles", "epochs", "wall time", "simulation time")
OPTIMIZERS = ("sgd", "adam")
# Settings a resumed run must share with the original (budgets may change, and the model may move to another device).
BUDGET_KEYS = ("max_cycles", "max_epochs", "max_simulation_time", "max_wall_time")
# The model's device may change; OpenMM's platform may not (its checkpoints load only on the platform that wrote them).
MAY_CHANGE_ON_RESUME = BUDGET_KEYS + ("device",)
# Where refine's time goes: MD of both phases, the Boltzmann estimator, the energy/force step (with the update).
TIME_PARTS = ("simulation", "estimator", "energy_force")


# Below this median share of the total gradient the observable term does not steer learning (an explicit
# --obs-weight gets advice then); --obs-weight auto sets the weights so that the observable term holds at
# least DEFAULT_OBSERVABLE_SHARE of every learning step's gradient norm.
OBSERVABLE_GRADIENT_SHARE_LOW = 0.05
DEFAULT_OBSERVABLE_SHARE = 0.3
AUTO = "auto"


class RefineError(ValueError):
    """Refinement cannot go on with these inputs or settings; the message says what to change."""


ESTIMATORS = ("global", "local")
# The observable each estimator learns from when --obs is not given.
DEFAULT_OBSERVABLE = {"global": "hr", "local": "local-bonds"}
# What runs recorded before these settings existed did (they resume with these values).
REFINE_RECORDED_BEFORE = {"estimator": "global", "local_bins": 100, "local_per_bin": 5}


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

    Two defaults go beyond the paper: ``observable_weights=["auto"]`` calibrates the weights at
    the first learning epoch so that the observables hold ``observable_share`` (0.3) of the
    gradient norm, and raises them on any later epoch where they would hold less (see
    :func:`epoch_weights`), whatever the molecule's size, the backbone or how far the model has
    moved from its pretrained minimum; and ``simulation_patience``
    (10 epochs) turns a simulation phase to learning once any replica is unstable, even below
    f_max (``None``: wait for f_max as the paper does); ``learning_patience`` (20 epochs) ends a
    learning phase even above f_min, so that the replicas simulate on past the window the phase
    kept replaying (``None``: wait for f_min as the paper does). Measured on aspirin with a budget
    of 80 learning epochs: without it one learning phase replayed the first 0.5 ps for all 80
    (median stable time 3.5x the baseline's); with 20, four cycles ran and the median rose to
    10.4x (docs/results.md).
    """

    observables: Optional[list[str]] = None  # None: hr for the global estimator, local-bonds for the local one
    observable_weights: list = field(default_factory=lambda: [AUTO])
    observable_share: float = DEFAULT_OBSERVABLE_SHARE
    criterion: str = "bond"
    threshold: Optional[float] = None
    n_replicas: int = 32
    md: MDSettings = field(default_factory=MDSettings)
    steps_per_epoch: int = 1000
    sample_every: int = 10
    check_every: int = 50
    f_max: float = 0.2
    f_min: float = 0.05
    simulation_patience: Optional[int] = 10
    learning_patience: Optional[int] = 20
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
    holdout_fraction: float = 0.1
    estimator: str = "global"
    local_bins: int = 100
    local_per_bin: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.md, dict):  # as read back from settings.json or a model's history
            self.md = MDSettings.from_dict(self.md)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r} (--estimator); expected one of {list(ESTIMATORS)}")
        if self.observables is None:
            self.observables = [DEFAULT_OBSERVABLE[self.estimator]]
        self.observables = list(self.observables)
        autos = [w == AUTO for w in self.observable_weights]
        if any(autos) and not all(autos):
            raise ValueError(f"--obs-weight is either auto or one number per observable, got "
                             f"{self.observable_weights}")
        if not all(autos):
            try:
                self.observable_weights = [float(w) for w in self.observable_weights]
            except (TypeError, ValueError):
                raise ValueError(f"observable weights must be numbers or 'auto', got {self.observable_weights}")
        if not self.observables:
            raise ValueError("at least one observable is needed (--obs)")
        unknown = [name for name in self.observables if name not in OBSERVABLES]
        if unknown:
            raise ValueError(f"unknown observable(s) {unknown}; expected some of {list(OBSERVABLES)}")
        local = [name for name in self.observables if getattr(OBSERVABLES[name], "local", False)]
        if self.estimator == "global" and local:
            raise ValueError(f"--obs {local[0]} is an observable of neighbourhoods (molecules): it needs the "
                             f"localized estimator, --estimator local")
        if self.estimator == "local" and len(local) != len(self.observables):
            other = next(name for name in self.observables if name not in local)
            choices = ", ".join(sorted(n for n in OBSERVABLES if getattr(OBSERVABLES[n], "local", False)))
            raise ValueError(f"--estimator local learns from observables of neighbourhoods ({choices}); --obs {other} "
                             f"is an observable of the whole system: use --estimator global for it")
        if len(self.observable_weights) == 1 and len(self.observables) > 1:
            self.observable_weights = self.observable_weights * len(self.observables)
        if len(self.observable_weights) != len(self.observables):
            raise ValueError(f"{len(self.observables)} observables but {len(self.observable_weights)} weights "
                             f"(--obs-weight): give one weight, or one per --obs")
        if not self.auto_weights and any(not w >= 0 for w in self.observable_weights):
            raise ValueError(f"observable weights must be >= 0, got {self.observable_weights}")
        if not 0 < self.observable_share < 1:
            raise ValueError(f"observable_share must lie in (0, 1), got {self.observable_share}")
        default = default_threshold(self.criterion, "training")  # raises, naming the criteria, for an unknown one
        if self.threshold is None:
            self.threshold = default
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {list(OPTIMIZERS)}")
        if self.train_frames not in ("auto", "pretrain", "all"):
            raise ValueError(f"train_frames must be auto, pretrain or all, got {self.train_frames!r}")
        if not 0 <= self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must lie in [0, 1), got {self.holdout_fraction}")
        positive = {"threshold": self.threshold, "lr": self.lr, "lr_decay": self.lr_decay, "max_simulation_time": self.max_simulation_time}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        counts = {"n_replicas": self.n_replicas, "steps_per_epoch": self.steps_per_epoch,
                  "sample_every": self.sample_every, "check_every": self.check_every, "qm_batch": self.qm_batch,
                  "max_cycles": self.max_cycles, "max_epochs": self.max_epochs,
                  "estimator_batch": self.estimator_batch, "nan_patience": self.nan_patience,
                  "local_bins": self.local_bins, "local_per_bin": self.local_per_bin}
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
        for name, flag in (("qm_weight", "--qm-weight"), ("energy_weight", "--energy-weight"),
                           ("force_weight", "--force-weight")):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} ({flag}) must be a finite number >= 0, got {getattr(self, name)}")
        if self.energy_weight == self.force_weight == 0 and self.qm_weight > 0:
            raise ValueError("energy_weight and force_weight (--energy-weight, --force-weight) are both 0: the "
                             "energy/force loss would be empty; set qm_weight (--qm-weight) to 0 to refine "
                             "without it")
        for name, flag in (("simulation_patience", "--simulation-patience"),
                           ("learning_patience", "--learning-patience")):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"{name} ({flag}) must be a positive number of epochs or None, got {value}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be positive, got {self.clip_grad}")
        if self.max_wall_time is not None and not self.max_wall_time > 0:
            raise ValueError(f"max_wall_time must be positive, got {self.max_wall_time}")


    @property
    def auto_weights(self) -> bool:
        """Whether the observable weights are calibrated during learning (``--obs-weight auto``)."""
        return self.observable_weights[0] == AUTO


@dataclass
class RefineState:
    """Where a refine run is in Algorithm 1's loop; checkpointed (as JSON) after every epoch, so a run resumes
    at the epoch, of either phase, after the last one it finished."""

    phase: str = "simulation"  # the phase the next epoch belongs to
    cycle: int = 0  # complete simulation + learning cycles
    epoch: int = 0  # epochs of either phase done
    phase_epochs: int = 0  # epochs of the current phase done
    learning_epochs: int = 0
    simulated_steps: int = 0  # MD steps of the simulation phases
    nan_failures: int = 0  # learning steps skipped in a row
    first_check_done: bool = False
    observable_weights: Optional[list] = None  # in force (auto weights: from the first learning epoch on)
    first_weights: Optional[list] = None  # the first learning epoch's auto weights
    wall_seconds: float = 0.0
    stopped_by: Optional[str] = None  # the budget or the problem that ended the run
    seconds: dict = field(default_factory=lambda: {part: 0.0 for part in TIME_PARTS})  # where the time went

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RefineState":
        return cls(**json.loads(text))


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
           overwrite: bool = False, resume: bool = False, progress: bool = True,
           announce: Optional[Callable[[str], None]] = None, nproc: int = 1,
           environment: Optional["MMEnvironment"] = None) -> RefineResult:
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
    announce:
        Called once, before the first simulation, with a line saying which frames serve as starts,
        reference and regularizer and which are held out (the CLI prints it; a run can take hours).
    nproc:
        Local processes (ranks) to split the replicas over (:mod:`stable_md.distributed`): each
        runs R/nproc replicas, its share of the estimator's samples and of the energy/force
        minibatch, and the sums are shared. A resumed run needs the nproc it was started with.
        Under torchrun (``torchrun -m stable_md.cli refine ...``) the ranks are torchrun's and
        ``nproc`` stays 1.
    environment:
        MM surroundings (:class:`openmm_bridge.mm_environment.MMEnvironment`, e.g. the molecule in MM water)
        in which the replicas run, one Context each (``settings.md.mode`` ``per-replica``), all starting from
        the environment's positions. The model's atoms must be the data's atoms in the data's order; the
        observables, the criterion and the estimator see them alone, and the regularizer is the data's as ever.
    """
    from stable_md.distributed import check_ranks, current_group, launch

    settings = settings or RefineSettings()
    output = Path(output)
    directory = Path(run_directory) if run_directory is not None else default_run_directory(output)
    check_device(settings.md.device)
    check_ranks(nproc, settings.n_replicas)
    group = current_group()
    if group.main:
        _prepare(output, directory, overwrite, resume)
    group.barrier()
    arguments = (model, data, output, directory, settings, resume, progress, announce is not None)
    if nproc == 1:
        return _refine_on_this_rank(*arguments, announce=announce, environment=environment)
    # a launched rank loads the model file itself
    arguments = (model.path if isinstance(model, ModelFile) else model,) + arguments[1:] + (None, True,
                                                                                          environment)
    outcome = launch(nproc, _refine_on_this_rank, arguments)
    return RefineResult(model=load_model(output).module, history=outcome["history"], summary=outcome["summary"],
                        output=output)


def _refine_on_this_rank(model, data, output: Path, directory: Path, settings: RefineSettings, resume: bool,
                         progress: bool, announcing: bool, announce: Optional[Callable[[str], None]] = None,
                         launched: bool = False, environment: Optional["MMEnvironment"] = None
                         ) -> RefineResult | dict:
    """One rank's part of a refine run (the whole run with one process). A rank :func:`launch` started returns
    the history and summary (rank 0; the model is in the output file); the CLI's ``announce`` cannot cross
    processes, so such a rank prints the line itself."""
    from stable_md.distributed import current_group

    group = current_group()
    run = _Refinement(model, data, output, directory, settings, resume, progress and group.main, group,
                      environment=environment)
    if announcing and group.main:
        (announce or (lambda line: print(line, flush=True)))(f"frames: {run.frames_note}")
    result = run.execute()
    if launched:
        return {"history": result.history, "summary": result.summary} if group.main else {}
    return result


# settings.json alone (or with a partial log) is what a start that failed before its first checkpoint leaves:
# there is nothing to resume and nothing to keep, so it counts as no run.
RUN_LAYOUT = RunLayout("a refine run", files=(LOG_NAME, CHECKPOINT_NAME, SETTINGS_NAME, SUMMARY_NAME),
                       started_by=(CHECKPOINT_NAME, SUMMARY_NAME), resume_from=CHECKPOINT_NAME, patterns=("*.png",))


def _prepare(output: Path, directory: Path, overwrite: bool, resume: bool) -> None:
    if not resume and output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; refusing to overwrite it (pass --overwrite)")
    RUN_LAYOUT.clear(RUN_LAYOUT.prepare(directory, overwrite, resume))


class _Refinement:
    """One refine run: the replicas, the optimizer and the loop state, checkpointed every epoch."""

    def __init__(self, model, data, output: Path, directory: Path, settings: RefineSettings, resume: bool,
                 progress: bool, group=None, environment: Optional["MMEnvironment"] = None) -> None:
        from stable_md.distributed import SINGLE

        self.settings, self.output, self.directory, self.progress = settings, output, directory, progress
        self.environment = environment
        # this process's share of the replicas; the numbers that steer the run are sums over all ranks
        self.group = SINGLE if group is None else group
        # the user's --device, made this rank's own GPU under several ranks (settings.json keeps the user's)
        self.device = this_rank_device(str(check_device(settings.md.device)), self.group.rank)
        self.model_file = model if isinstance(model, ModelFile) else load_model(model, device=self.device)
        self.model = self.model_file.module.to(self.device)
        self.data = data if isinstance(data, Dataset) else load_dataset(data)
        self._check_species()
        self.train, self.test, self.frames_note = self._split()
        self.cell = None if self.train.cells is None else self.train.cells[0]
        self.bonds = detect_bonds(self.train.numbers, reference_frames(self.train), self.cell)
        self.terms = self._terms()
        self.criterion = self._criterion()
        self.starts = self._starting_frames()
        # a model that is NaN on its own starts would run no MD and write a NaN model
        check_finite_predictions(self.model, self._model_atoms(self.starts), self.train.numbers, self.cell,
                                 f"refine {self.model_file.path}: on the starting frames of {self.starts_source}")
        self._build_optimizer()
        # only built when used: with qm_weight = 0 both inner weights may be 0, which the loss refuses
        self.qm_loss = (EnergyForceLoss(settings.energy_weight, settings.force_weight) if settings.qm_weight > 0
                        else None)
        dtype = next(self.model.parameters()).dtype
        self.qm_data = DatasetTensors(self.train, dtype=dtype, device=self.device)
        self.rng = np.random.default_rng(settings.md.seed)
        self.state = RefineState(observable_weights=None if settings.auto_weights
                                 else list(settings.observable_weights))
        self.history: list[dict] = []
        self.first_means: Optional[dict[str, list]] = None
        self.last_means: Optional[dict[str, list]] = None
        self.replicas = self._build_replicas()
        self.rewind_positions = self.replicas.positions()
        self.rewind_velocities = self.replicas.velocities()
        self.initial_errors: Optional[dict] = None
        record = self._record()
        if resume:
            if self.group.main:
                self._check_same_run(record)
            self._load_checkpoint()
        elif self.group.main:
            write_json(directory / SETTINGS_NAME, record)
            self.initial_errors = self._test_errors()

    # -- set-up --------------------------------------------------------------------------------------
    def _check_species(self) -> None:
        known = set(self.model_file.species)
        missing = sorted(set(self.data.numbers.tolist()) - known)
        if missing:
            raise ValueError(f"{self.data.source} contains elements the model {self.model_file.path} was not "
                             f"trained on (atomic numbers {missing}; the model knows {sorted(known)})")
        if self.group.main:  # once, not once per process
            warn_if_other_structures(self.model_file.metadata, self.data.numbers, self.data.periodic,
                                     str(self.model_file.path), self.data.source)

    def _split(self) -> tuple[Dataset, Optional[Dataset], str]:
        """Training frames (starts, references, regularizer) and held-out frames (error report), with a note.

        ``auto``: a model pretrained on these frames (same fingerprint, whatever the path)
        uses its pretraining frames and reports errors on its pretraining test frames;
        any other model (imported, or pretrained on another file) holds out a
        reproducible ``holdout_fraction`` of the frames (permutation seeded by ``seed``).
        ``all``: every frame is used, none is held out.
        """
        s = self.settings
        data = self.data
        pretrain = next((h for h in self.model_file.metadata.get("history", []) if h.get("stage") == "pretrain"),
                        None)
        pretrained_here = pretrain is not None and same_data(pretrain, data)
        if s.train_frames == "pretrain" and not pretrained_here:
            raise RefineError(f"--train-frames pretrain needs the data file the model was pretrained on "
                              f"({None if pretrain is None else pretrain.get('data')}), got {data.source}; use "
                              f"--train-frames auto to hold out part of {data.source} instead")
        if s.train_frames == "all":
            return data, None, f"all {len(data)} frames of {data.source} (none held out: --train-frames all)"
        if pretrained_here:
            position = {int(index): k for k, index in enumerate(data.indices)}
            train_idx = [position[int(i)] for i in pretrain["train_indices"] if int(i) in position]
            test_idx = [position[int(i)] for i in pretrain.get("test_indices", []) if int(i) in position]
            if len(train_idx) == len(pretrain["train_indices"]):
                test = data.subset(test_idx) if test_idx else None
                return (data.subset(train_idx), test,
                        f"the model's {len(train_idx)} pretraining frames of {data.source}; errors on its "
                        f"{len(test_idx)} pretraining test frames")
            if s.train_frames == "pretrain":
                raise RefineError(f"{data.source} lacks {len(pretrain['train_indices']) - len(train_idx)} of the "
                                  f"model's pretraining frames; give the whole file")
        n_test = int(round(s.holdout_fraction * len(data)))
        if s.holdout_fraction > 0 and len(data) >= 2:
            n_test = min(max(n_test, 1), len(data) - 1)
        else:
            n_test = 0
        order = np.random.default_rng(s.md.seed).permutation(len(data))
        train = data.subset(np.sort(order[n_test:]))
        test = data.subset(np.sort(order[:n_test])) if n_test else None
        why = ("the model has no pretraining record on this file" if not pretrained_here
               else "the file lacks some of the model's pretraining frames")
        note = (f"{len(train)} of the {len(data)} frames of {data.source} ({why}); {n_test} held out "
                f"(random, seed {s.md.seed}) for the error report")
        if n_test:
            note += ", which may include frames the model was trained on elsewhere"
        return train, test, note

    def _terms(self) -> list[ObservableTerm]:
        terms = []
        for name, weight in zip(self.settings.observables, self.settings.observable_weights):
            observable = make_observable(name, self.train, bonds=self.bonds)
            # auto weights stay 1 until the first learning epoch sets them
            terms.append(ObservableTerm(observable, observable.reference(self.train),
                                        1.0 if weight == AUTO else weight))
        return terms

    def _criterion(self):
        return make_criterion(self.settings.criterion, CriterionInputs(self.bonds, self.cell), self.settings.threshold,
                              "training")

    def _model_atoms(self, positions: np.ndarray) -> np.ndarray:
        """[..., N, 3] the model's atoms of replica positions [..., P, 3] (the same array without surroundings)."""
        return positions if self.environment is None else positions[..., self.environment.model_atoms, :]

    def _starting_frames(self) -> np.ndarray:
        """R training frames spread over the set, skipping frames the criterion already rejects; with MM
        surroundings, the environment's positions for every replica."""
        if self.environment is not None:
            return self._environment_starts()
        self.starts_source = self.data.source
        acceptable = np.flatnonzero(~self.criterion(self.train.positions))
        if len(acceptable) == 0:
            raise ValueError(f"every training frame of {self.data.source} already fails the {self.settings.criterion}"
                             f" criterion at threshold {self.settings.threshold} Å; raise --threshold")
        return self.train.positions[acceptable[spread_indices(len(acceptable), self.settings.n_replicas)]]

    def _environment_starts(self) -> np.ndarray:
        environment, s = self.environment, self.settings
        self.starts_source = environment.source
        if not np.array_equal(environment.numbers, self.train.numbers):
            raise RefineError(f"the model atoms of {environment.source} are atomic numbers "
                              f"{environment.numbers.tolist()}; {self.data.source} holds {self.train.numbers.tolist()}"
                              f": select the data's molecule, its atoms in the data's order (--model-atoms)")
        if self.cell is not None:
            raise RefineError(f"{self.data.source} is periodic: MM surroundings are for a molecule's data (the "
                              f"solute's frames); a periodic box runs without --mm-system")
        if s.md.mode != "per-replica":
            raise RefineError(f"with MM surroundings the replicas run one Context each: mode 'per-replica' "
                              f"(--mode per-replica), not {s.md.mode!r}")
        start = environment.positions[None]
        if self.criterion(start[:, environment.model_atoms])[0]:
            raise RefineError(f"the model's atoms of {environment.source} already fail the {s.criterion} criterion "
                              f"at threshold {s.threshold} Å against the bonds of {self.data.source}; start from "
                              f"an equilibrated structure of this molecule")
        return np.repeat(start, s.n_replicas, axis=0)

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
        # this rank's block of the replicas, started as they would be in one process
        return ReplicaSet.from_settings(self.model, self.train.numbers, self.starts,
                                        s.md.with_changes(device=self.device),
                                        part=self.group.block(s.n_replicas), stream=self.group.rank, cell=self.cell,
                                        check_interval=min(50, s.check_every, s.sample_every),
                                        environment=self.environment)

    def _unstable_count(self) -> int:
        """Unstable replicas over all ranks."""
        return int(self.group.sum(int(self.replicas.unstable.sum())))

    def _record(self) -> dict:
        record = {"model": str(Path(self.model_file.path).resolve()),
                  "model_sha256": file_sha256(self.model_file.path), **data_record(self.data),
                  "output": str(self.output.resolve()), "train_frames": self.frames_note,
                  "settings": flat_record(self.settings)}
        if self.environment is not None:
            record["settings"]["environment"] = self.environment.record()
        return record

    def _check_same_run(self, record: dict) -> None:
        saved = json.loads((self.directory / SETTINGS_NAME).read_text())
        old = {k: v for k, v in saved["settings"].items() if k not in MAY_CHANGE_ON_RESUME}
        new = {k: v for k, v in record["settings"].items() if k not in MAY_CHANGE_ON_RESUME}
        before = {**RECORDED_BEFORE, **REFINE_RECORDED_BEFORE}
        different = [k for k in new if k != "environment" and old.get(k, before.get(k)) != new[k]]
        if not same_environment(old.get("environment"), new.get("environment")):
            different.append("environment (the MM surroundings: --structure, --mm-system, --model-atoms)")
        if "platform" in different:
            saved_platform = old.get("platform", RECORDED_BEFORE["platform"])
            different[different.index("platform")] = (
                f"platform: the run's OpenMM checkpoints are {saved_platform}'s, now {new['platform']}; pass "
                f"--platform {saved_platform}")
        # The model is the same file when its bytes are: a resume may name it by another path (a copy, another
        # working directory). Runs recorded before the hash was kept compare resolved paths.
        if "model_sha256" in saved:
            same_model = saved["model_sha256"] == record["model_sha256"]
        else:
            same_model = saved.get("model") == record["model"]
        if not same_model:
            different = ["model (other file contents)"] + different
        if saved.get("data_fingerprint") != record["data_fingerprint"]:
            different = ["data (other frames)"] + different
        if different:
            raise ValueError(f"cannot resume {self.directory}: settings differ from the original run "
                             f"({', '.join(different)}); only the budgets ({', '.join(BUDGET_KEYS)}) may change")
        write_json(self.directory / SETTINGS_NAME, record)

    # -- the loop ------------------------------------------------------------------------------------
    def execute(self) -> RefineResult:
        """Algorithm 1, one epoch at a time: repeat {simulation epochs until f_max (or patience); learning epochs
        until f_min (or patience)} until a budget is spent. After every epoch the state, the replicas and the
        model are checkpointed, so a resumed run continues at the next epoch of whichever phase it was in."""
        from tqdm.auto import tqdm

        s = self.settings
        started = time.perf_counter() - self.state.wall_seconds
        bar = tqdm(total=s.max_epochs, initial=self.state.learning_epochs,
                   disable=not (self.progress and self.group.main), desc="refine", unit="learning epoch")
        try:
            while self.state.stopped_by is None:
                # rank 0's clock decides a wall-time budget for every rank
                self.state.stopped_by = self.group.broadcast(self._budget_spent(started))
                if self.state.stopped_by is not None:
                    break
                if self.state.phase == "simulation":
                    row = self._simulation_epoch()
                else:
                    row = self._learning_epoch()
                    bar.update(1)
                self.state.epoch += 1
                self.state.wall_seconds = time.perf_counter() - started
                row.update(epoch=self.state.epoch, cycle=self.state.cycle,
                           wall_time_s=round(self.state.wall_seconds, 2))
                self._advance_phase(row)
                self.history.append(row)
                if self.group.main:
                    with open(self.directory / LOG_NAME, "a") as log:
                        log.write(json.dumps(row, default=json_default) + "\n")
                bar.set_postfix(phase=row["phase"], cycle=row["cycle"], unstable=f"{row['unstable_fraction']:.2f}",
                                refresh=False)
                self._save_checkpoint()
        finally:
            bar.close()
        return self._finish()

    def _budget_spent(self, started: float) -> Optional[str]:
        s = self.settings
        if self.state.cycle >= s.max_cycles:
            return "cycles"
        if self.state.learning_epochs >= s.max_epochs:
            return "epochs"
        if s.max_wall_time is not None and time.perf_counter() - started >= s.max_wall_time:
            return "wall time"
        if (self.state.phase == "simulation"
                and self.state.simulated_steps * s.md.timestep >= s.max_simulation_time):
            return "simulation time"
        return None

    def _advance_phase(self, row: dict) -> None:
        s = self.settings
        if row["phase"] == "simulation":
            self.state.phase_epochs += 1
            patient = (s.simulation_patience is not None and self.state.phase_epochs >= s.simulation_patience
                       and row["unstable_fraction"] > 0)
            if row["unstable_fraction"] >= s.f_max or patient:
                # a fairly stable model would otherwise simulate for tens of ps before learning anything
                row["learning_starts"] = "f_max" if row["unstable_fraction"] >= s.f_max else "simulation patience"
                self.state.phase = "learning"
                self.state.phase_epochs = 0
        elif row["phase"] == "learning":
            self.state.phase_epochs += 1
            patient = s.learning_patience is not None and self.state.phase_epochs >= s.learning_patience
            if row.get("stop"):
                self.state.stopped_by = row["stop"]
            elif row["unstable_fraction"] <= s.f_min or patient:
                # Measured on aspirin: a replayed window whose unstable fraction stays near 0.09 kept one
                # learning phase going for all 80 epochs, so the model only ever saw the first 0.5 ps.
                row["learning_ends"] = "f_min" if row["unstable_fraction"] <= s.f_min else "learning patience"
                self.state.phase = "simulation"
                self.state.phase_epochs = 0
                self.state.cycle += 1

    def _run_epoch(self) -> tuple[np.ndarray, np.ndarray]:
        """t steps of every running replica with stability checks; returns samples [S, N, 3] and newly unstable."""
        from stable_md.reporting import PositionSampler, StabilityMonitor

        s = self.settings
        replicas = self.replicas
        before = replicas.unstable.copy()
        # the sampler first: a frame is sampled whether or not the check at the same step stops its replica
        sampler = PositionSampler(s.sample_every, len(self.train.numbers))
        monitor = StabilityMonitor(self.criterion, s.check_every)
        start_step = replicas.step
        started = time.perf_counter()
        done = replicas.run(s.steps_per_epoch, reporters=[sampler, monitor])
        self.state.seconds["simulation"] += time.perf_counter() - started
        if not self.state.first_check_done:
            # a sum over the ranks, made by each whether or not its replicas reached the check
            # a rank whose replicas all stopped (non-finite) before the check counts them all as unstable
            first = self.group.sum([monitor.checks > 0, monitor.first_unstable if monitor.checks
                                    else int(replicas.unstable.sum())])
            self.state.first_check_done = bool(first[0] > 0)
            if self.state.first_check_done and int(first[1]) == s.n_replicas:
                raise RefineError(
                    f"all {s.n_replicas} replicas were unstable at the first check ({s.check_every} steps, "
                    f"{s.check_every * s.md.timestep:g} fs), e.g. {replicas.reasons.get(0, '')}; try a smaller "
                    f"--timestep, a larger --threshold, or check that --temperature suits the data")
        # The shared clock moves by whole epochs even when every replica stopped early, so that
        # sampling and checks keep falling on the same steps of each epoch.
        if done < s.steps_per_epoch:
            replicas.step = start_step + s.steps_per_epoch
        return sampler.samples(), replicas.unstable & ~before

    def _simulation_epoch(self) -> dict:
        replicas = self.replicas
        running = replicas.running.copy()
        # rewind points: where each running replica is now, t steps before its end if it stays stable
        self.rewind_positions[running] = replicas.positions()[running]
        self.rewind_velocities[running] = replicas.velocities()[running]
        samples, newly = self._run_epoch()
        self.state.simulated_steps += self.settings.steps_per_epoch
        counts = self.group.sum([replicas.unstable.sum(), newly.sum()])
        row = {"phase": "simulation", "unstable_fraction": float(counts[0] / self.settings.n_replicas),
               "newly_unstable": int(counts[1]), "lr": self.optimizer.param_groups[0]["lr"],
               "simulated_time_ps": self.state.simulated_steps * self.settings.md.timestep / 1000.0}
        row.update(self._observable_losses(samples))
        return row

    def _learning_epoch(self) -> dict:
        self.replicas.reset(self.rewind_positions, self.rewind_velocities)
        samples, newly = self._run_epoch()
        row = {"phase": "learning", "unstable_fraction": self._unstable_count() / self.settings.n_replicas}
        return self._learn(samples, row)

    def _learn(self, samples: np.ndarray, row: dict) -> dict:
        """One optimizer step from this rank's ``samples`` [S, N, 3] Å (the observable term, by the Boltzmann
        estimator over the samples of all ranks) and the energy/force term; fills and returns ``row``."""
        s = self.settings
        group = self.group
        n_samples = int(group.sum(len(samples)))
        row.update({"samples": n_samples, "lr": self.optimizer.param_groups[0]["lr"]})
        self.optimizer.zero_grad(set_to_none=True)
        problem = None
        # Auto weights are checked at every learning epoch: measured on aspirin, the energy/force gradient grew
        # 4-12x from the second learning epoch on (one step off the pretrained minimum), so first-epoch weights
        # left the observables 2.5-6% of the gradient instead of the 30% they were calibrated to.
        calibrating = s.auto_weights
        term_gradients: list[torch.Tensor] = []
        clock = time.perf_counter()
        if n_samples < 2:
            problem = "fewer than two samples"
        else:
            if calibrating:
                # one estimator pass per observable at unit weight, so each one's gradient is known
                losses, means = {}, {}
                for term in self.terms:
                    self.optimizer.zero_grad(set_to_none=True)
                    single = ObservableTerm(term.observable, term.reference, 1.0)
                    part = self._estimate(samples, [single], row)
                    losses.update(part.losses)
                    means.update(part.means)
                    term_gradients.append(self._shared_gradient())
                _set_flat_gradient(self.model, torch.stack(term_gradients).sum(dim=0))
                loss = float(sum(losses.values()))
            else:
                result = self._estimate(samples, self.terms, row)
                losses, means, loss = result.losses, result.means, result.loss
                if group.distributed:
                    _set_flat_gradient(self.model, self._shared_gradient())
            row.update({"observable_loss": loss, **{f"loss_{k}": v for k, v in losses.items()}})
            self._remember_means(means)
            if not math.isfinite(loss):
                problem = "non-finite observable loss"
        self.state.seconds["estimator"] += time.perf_counter() - clock
        clock = time.perf_counter()
        qm_gradient = None
        if s.qm_weight > 0 and problem is None:
            qm_gradient, problem = self._energy_force_step(row)
        if problem is None and calibrating:
            first = self.state.first_weights
            weights = epoch_weights(first, term_gradients, qm_gradient, s.observable_share)
            if weights is None:
                # e.g. an observable that no sample changes: keep the first epoch's weights if there are any
                weights = first
                row["weights_kept"] = "observable gradient is zero or not finite"
            if weights is None:
                problem = "observable gradient is zero, cannot calibrate --obs-weight auto"
            else:
                if first is None:
                    self.state.first_weights = list(weights)
                self._apply_weights(weights)
                row["observable_weights"] = weights
                row["observable_loss"] = float(sum(w * v for w, v in zip(weights, losses.values())))
                observable = sum(w * g for w, g in zip(weights, term_gradients))
                _set_flat_gradient(self.model, observable + (0 if qm_gradient is None else qm_gradient))
        if problem is None:
            total = _flat_gradient(self.model)
            observable_part = total - qm_gradient if qm_gradient is not None else total
            row["observable_grad_norm"] = float(observable_part.norm())
            norm = float(total.norm())
            row["grad_norm"] = norm
            if not math.isfinite(norm):
                problem = "non-finite gradient"
            elif s.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.clip_grad)
        if problem is None:
            self.optimizer.step()
            self.scheduler.step()
            self.state.nan_failures = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.nan_failures += 1
            row["skipped"] = problem
            if self.state.nan_failures >= s.nan_patience:
                row["stop"] = f"{s.nan_patience} skipped steps in a row ({problem})"
        self.state.seconds["energy_force"] += time.perf_counter() - clock
        self.state.learning_epochs += 1
        return row

    def _estimate(self, samples: np.ndarray, terms: Sequence[ObservableTerm], row: dict) -> EstimatorResult:
        """Accumulate the observable terms' gradient into ``.grad`` by the run's estimator; losses and means by
        observable name (the means [K] of a local observable pooled over its neighbourhoods)."""
        s = self.settings
        reduce = self.group.sum_tensor if self.group.distributed else None
        if s.estimator == "global":
            return boltzmann_gradient(self.model, samples, self.train.numbers, terms, s.md.temperature,
                                      cells=self.cell, batch_size=s.estimator_batch, reduce=reduce)
        # a selection drawn alike whenever this epoch is run again (a resume), its own on every rank
        rng = np.random.default_rng([s.md.seed, self.state.learning_epochs, self.group.rank])
        losses, means, loss, chosen_total, deviations = {}, {}, 0.0, 0, []
        for term in terms:
            observable = term.observable
            with torch.no_grad():
                values = (observable(samples, self.cell) if len(samples) else
                          torch.zeros((0, len(observable.membership), len(term.reference)), dtype=torch.float64))
                deviation = observable.deviation(values, term.reference).numpy()
            selection = balanced_selection(deviation, s.local_bins, s.local_per_bin, rng)
            result = localized_boltzmann_gradient(self.model, samples, self.train.numbers, values,
                                                  observable.membership, term.reference, s.md.temperature,
                                                  cells=self.cell, selection=selection,
                                                  batch_size=s.estimator_batch, weight=term.weight, reduce=reduce)
            losses[observable.name] = result.losses["local"]
            means[observable.name] = result.means["local"]
            loss += result.loss
            chosen_total += int(selection.sum())
            deviations.append(deviation[selection])
        chosen = np.concatenate(deviations) if deviations else np.zeros(0)
        row["local_samples"] = int(self.group.sum(chosen_total))
        # every neighbourhood of every sample, of which the selection kept local_samples
        row["local_neighbourhoods"] = int(self.group.sum(len(samples) * sum(len(t.observable.membership)
                                                                            for t in terms)))
        spans = self.group.gather([float(chosen.min()), float(chosen.max())] if len(chosen) else None)
        if self.group.main:
            spans = [span for span in spans if span is not None] if spans is not None else []
            if spans:
                row["local_deviation_range"] = [min(a for a, _ in spans), max(b for _, b in spans)]
        return EstimatorResult(loss=loss, losses=losses, means=means, n_samples=row["local_samples"],
                               weights=np.zeros(0))

    def _local_summary(self) -> dict:
        """With the localized estimator: local samples used per learning epoch (median, total) out of the
        neighbourhoods sampled, and the range of their deviations from the reference over the run."""
        rows = [row for row in self.history if "local_samples" in row]
        if self.settings.estimator != "local" or not rows:
            return {}
        spans = [row["local_deviation_range"] for row in rows if "local_deviation_range" in row]
        return {"local_samples_median": float(np.median([row["local_samples"] for row in rows])),
                "local_samples_total": int(sum(row["local_samples"] for row in rows)),
                "local_neighbourhoods_total": int(sum(row["local_neighbourhoods"] for row in rows)),
                "local_deviation_range": ([min(a for a, _ in spans), max(b for _, b in spans)] if spans else None)}

    def _shared_gradient(self) -> torch.Tensor:
        """The parameters' gradient summed over the ranks (this rank's alone with one process)."""
        return self.group.sum_tensor(_flat_gradient(self.model)) if self.group.distributed \
            else _flat_gradient(self.model)

    def _energy_force_step(self, row: dict) -> tuple[Optional[torch.Tensor], Optional[str]]:
        """Add λ ∇(energy/force loss) of one minibatch to the gradient; returns that part of it (or a problem).

        The minibatch is drawn by every rank alike and split among them; each rank's loss is scaled by its share
        of the frames, so the sum over ranks is the loss of the whole minibatch (all frames have N atoms)."""
        s, group = self.settings, self.group
        before = _flat_gradient(self.model)
        chosen = self.rng.choice(len(self.qm_data), size=min(s.qm_batch, len(self.qm_data)), replace=False)
        mine = chosen[group.block(len(chosen))]
        scale = len(mine) / len(chosen)
        qm_loss, stats = None, {"force_abs_sum": 0.0, "force_components": 0}
        if len(mine):
            qm_loss, stats = self.qm_loss(self.model, self.qm_data.batch(torch.as_tensor(mine)))
        local = float(qm_loss.detach()) * scale if qm_loss is not None else 0.0
        totals = group.sum([local, stats["force_abs_sum"], stats["force_components"]])
        row["qm_loss"] = float(totals[0])
        row["qm_force_mae_meV_per_A"] = 1000 * float(totals[1]) / float(totals[2])
        if not math.isfinite(row["qm_loss"]):
            return None, "non-finite energy/force loss"
        if qm_loss is not None:
            (s.qm_weight * (qm_loss * scale if scale != 1 else qm_loss)).backward()
        if not group.distributed:
            return _flat_gradient(self.model) - before, None
        qm_gradient = group.sum_tensor(_flat_gradient(self.model) - before)
        _set_flat_gradient(self.model, before + qm_gradient)
        return qm_gradient, None

    def _apply_weights(self, weights: list[float]) -> None:
        self.state.observable_weights = list(weights)
        for term, weight in zip(self.terms, weights):
            term.weight = weight

    def _observable_losses(self, samples: np.ndarray) -> dict:
        """The observable losses of a simulation epoch's samples (of all ranks)."""
        group = self.group
        if int(group.sum(len(samples))) == 0:
            return {}
        losses, total, means = {}, 0.0, {}
        with torch.no_grad():
            for term in self.terms:
                def frame_values():  # [F, K]; a local observable's pooled over its neighbourhoods
                    values = term.observable(samples, self.cell)
                    return term.observable.pooled(values) if term.observable.local else values

                if not group.distributed:
                    mean = frame_values().mean(dim=0)
                else:
                    local = (frame_values().sum(dim=0) if len(samples)
                             else torch.zeros(term.reference.shape[0], dtype=torch.float64))
                    shared = group.sum(np.concatenate([[len(samples)], local.double().numpy()]))
                    mean = torch.as_tensor(shared[1:] / shared[0])
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
        if self.test is None:
            return None
        frames = self.test.subset(np.arange(min(len(self.test), 500)))
        return prediction_errors(self.model, frames)

    # -- checkpoint ------------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        """Rank 0 writes one checkpoint (atomically) holding every rank's replicas."""
        from openmm_bridge.replicas import snapshot_to_arrays

        mine = {"snapshot": {k: torch.as_tensor(np.array(v)) for k, v in
                             snapshot_to_arrays(self.replicas.snapshot()).items() if k != "reasons"},
                "reasons": json.dumps({str(k): v for k, v in self.replicas.reasons.items()}),
                "rewind_positions": torch.as_tensor(self.rewind_positions),
                "rewind_velocities": torch.as_tensor(self.rewind_velocities)}
        ranks = self.group.gather(mine)
        if not self.group.main:
            return
        payload = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "ranks": ranks,
            "state": self.state.to_json(), "history": json.dumps(self.history, default=json_default),
            "rng": json.dumps(self.rng.bit_generator.state),
            "means": json.dumps({"first": self.first_means, "last": self.last_means}),
            "initial_errors": json.dumps(self.initial_errors),
        }
        atomic_write(self.directory / CHECKPOINT_NAME, lambda tmp: torch.save(payload, tmp))

    def _load_checkpoint(self) -> None:
        from openmm_bridge.replicas import snapshot_from_arrays

        path = self.directory / CHECKPOINT_NAME
        payload = None
        if self.group.main:
            # on the CPU: a run may resume on another device (load_state_dict moves each tensor to its place)
            payload = read_checkpoint(path, "refine",
                                      lambda path: torch.load(path, map_location="cpu", weights_only=True))
            if "ranks" not in payload:  # written before refine ran on several processes
                payload["ranks"] = [{key: payload.pop(key) for key in
                                     ("snapshot", "reasons", "rewind_positions", "rewind_velocities")}]
        # every rank gets rank 0's copy, so that ranks on other nodes need not see the run directory
        payload = self.group.broadcast(payload)
        if len(payload["ranks"]) != self.group.size:
            raise RefineError(f"cannot resume {self.directory}: it ran on {len(payload['ranks'])} process(es) "
                              f"(--nproc {len(payload['ranks'])}), this resume on {self.group.size}; resume it with "
                              f"--nproc {len(payload['ranks'])}")
        mine = payload["ranks"][self.group.rank]
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        arrays = {k: v.numpy() for k, v in mine["snapshot"].items()}
        arrays["reasons"] = np.array(mine["reasons"])
        self.replicas.restore(snapshot_from_arrays(arrays))
        self.rewind_positions = mine["rewind_positions"].numpy().copy()
        self.rewind_velocities = mine["rewind_velocities"].numpy().copy()
        self.state = RefineState.from_json(payload["state"])
        self.state.stopped_by = None
        if self.state.observable_weights is not None:
            self._apply_weights(self.state.observable_weights)
        self.history = json.loads(payload["history"])
        self.rng.bit_generator.state = json.loads(payload["rng"])
        means = json.loads(payload["means"])
        self.first_means, self.last_means = means["first"], means["last"]
        self.initial_errors = json.loads(payload["initial_errors"])
        if self.group.main:
            truncate_jsonl_log(self.directory / LOG_NAME, self.state.epoch)

    # -- the end ---------------------------------------------------------------------------------------
    def _gradient_shares(self) -> list[float]:
        return [row["observable_grad_norm"] / row["grad_norm"] for row in self.history
                if row["phase"] == "learning" and row.get("grad_norm") and "observable_grad_norm" in row]

    def _weight_advice(self) -> Optional[str]:
        """A hint when the observable gradient was too small next to the energy/force gradient to steer learning."""
        ratios = self._gradient_shares()
        if not ratios or self.settings.qm_weight == 0:
            return None
        ratio = float(np.median(ratios))
        if ratio >= OBSERVABLE_GRADIENT_SHARE_LOW:
            return None
        if self.settings.auto_weights:
            return (f"the observable gradient was {100 * ratio:.1g}% of the total gradient (median over learning "
                    f"epochs) although --obs-weight auto aims at {100 * self.settings.observable_share:g}%: its "
                    f"gradient was zero on most epochs; check that the observable suits the molecule")
        factor = DEFAULT_OBSERVABLE_SHARE / max(ratio, 1e-12)
        weights = ", ".join(f"{w * factor:.3g}" for w in self.settings.observable_weights)
        return (f"the observable gradient was only {100 * ratio:.1g}% of the total gradient (median over learning "
                f"epochs), so the energy/force term decided almost every step; try --obs-weight auto, or "
                f"--obs-weight {weights} (or a --qm-weight {factor:.3g} times smaller)")

    def _time_split(self) -> dict:
        seconds = {part: round(self.state.seconds[part], 1) for part in TIME_PARTS}
        total = sum(self.state.seconds.values())
        first = next((k for k, row in enumerate(self.history) if row["phase"] == "learning"), None)
        before = self.history[:first] if first is not None else []
        return {"seconds": seconds,
                "fractions": {part: round(self.state.seconds[part] / total, 3) if total else None
                              for part in TIME_PARTS},
                # how long the first simulation phase took to find enough unstable replicas to learn from
                "first_learning_epoch_after_ps": max((row.get("simulated_time_ps", 0.0) for row in before),
                                                     default=None if first is None else 0.0),
                "first_learning_epoch_after_s": before[-1]["wall_time_s"] if before else None}

    def _median_weights(self) -> Optional[list[float]]:
        """Per observable, the median of the weights the learning epochs used (auto weights may change from epoch to epoch)."""
        if not self.settings.auto_weights:
            return self.state.observable_weights
        used = [row["observable_weights"] for row in self.history if "observable_weights" in row]
        return [float(v) for v in np.median(np.asarray(used), axis=0)] if used else None

    def _finish(self) -> RefineResult:
        from stable_md import plots

        s = self.settings
        if not self.group.main:  # rank 0 holds the same model and history, and writes them
            return RefineResult(model=self.model, history=self.history, summary={}, output=self.output)
        learned = self.state.learning_epochs > 0 and any(
            row["phase"] == "learning" and "skipped" not in row for row in self.history)
        if learned:
            # Learning moves the constant energy offset, which no dynamics depend on; put it back.
            refit_energy_shifts(self.model, self.train)
            stop = self.state.stopped_by
            message = (f"{self.state.learning_epochs} learning epochs in {self.state.cycle} complete cycles; "
                       + (f"stopped by the {stop} budget" if stop in BUDGETS else f"stopped: {stop}"))
        else:
            message = (f"no replica became unstable enough to learn from (f_max = {s.f_max}) in "
                       f"{self.state.simulated_steps * s.md.timestep / 1000:g} ps of simulation; the model is unchanged")
        shares = self._gradient_shares()
        summary = {
            "message": message,
            "advice": self._weight_advice(),
            "observable_weights": self.state.observable_weights,
            "observable_weights_median": self._median_weights(),
            "observable_weights_first": self.state.first_weights,
            "observable_weights_from": (f"--obs-weight auto: calibrated at the first learning epoch and raised "
                                        f"on any epoch where the observables would hold less than "
                                        f"{100 * s.observable_share:g}% of its gradient norm"
                                        if s.auto_weights else "given (--obs-weight)"),
            "observable_gradient_share_median": float(np.median(shares)) if shares else None,
            "estimator": s.estimator,
            **self._local_summary(),
            "time_split": self._time_split(),
            "stopped_by": self.state.stopped_by,
            "refined": learned,
            "cycles": self.state.cycle,
            "learning_epochs": self.state.learning_epochs,
            "simulated_time_ps": self.state.simulated_steps * s.md.timestep / 1000.0,
            "wall_seconds": round(self.state.wall_seconds, 1),
            "train_frames": self.frames_note,
            "final_unstable_fraction": self.history[-1]["unstable_fraction"] if self.history else None,
            "test_errors_before": self.initial_errors,
            "test_errors_after": self._test_errors(),
            "output": str(self.output),
        }
        figures = plots.refine_figures(self.history, self.terms, self.first_means, self.last_means, self.directory)
        summary["figures"] = [str(p) for p in figures]
        write_json(self.directory / SUMMARY_NAME, summary)
        entry = {"stage": "refine", **data_record(self.data), "train_frames": self.frames_note,
                 **({} if self.environment is None else {"environment": self.environment.record()}),
                 "train_indices": self.train.indices.tolist(),
                 "test_indices": [] if self.test is None else self.test.indices.tolist(),
                 "settings": flat_record(s), "summary": {k: v for k, v in summary.items() if k != "figures"},
                 "history": self.history}
        metadata = build_metadata(self.model, dict(self.model_file.metadata.get("hyperparameters", {})),
                                  history=list(self.model_file.metadata.get("history", [])) + [entry],
                                  extra={**{k: v for k, v in self.model_file.metadata.items()
                                            if k not in ("history", "created", "stable_md_version", "torch_version")
                                            and k not in _METADATA_REBUILT},
                                         # what a stability guard needs from the model file alone
                                         REFERENCE_KEY: stability_reference(
                                             self.bonds, f"{len(self.train)} training frames of {self.data.source}")})
        save_model(self.model, self.output, metadata, overwrite=True)
        return RefineResult(model=self.model, history=self.history, summary=summary, output=self.output)


# Keys build_metadata recomputes from the module itself.
_METADATA_REBUILT = ("format", "format_version", "arch", "hyperparameters", "cutoff", "species", "units",
                     "energy_shift_eV", "energy_scale_eV", "dtype", "n_parameters")


def epoch_weights(first: Optional[Sequence[float]], term_gradients: Sequence[torch.Tensor],
                  qm_gradient: Optional[torch.Tensor], share: float) -> Optional[list[float]]:
    """The weights ``--obs-weight auto`` uses on one learning epoch: the observables hold at least ``share``.

    The first epoch's weights (``first``) are kept while they give the observables at least
    ``share`` of this step's gradient norm, which they do when the energy/force gradient shrinks
    (a model still improving on its data). When it grows, as it does one step off a converged
    model's minimum, the weights are solved anew for exactly ``share`` (:func:`calibrated_weights`).
    ``None`` when the weights cannot be solved for (zero or non-finite observable gradients).
    """
    if first is not None and qm_gradient is not None:
        observable = sum(w * g for w, g in zip(first, term_gradients))
        total = float((observable + qm_gradient).norm())
        if total > 0 and float(observable.norm()) >= share * total:
            return list(first)
    elif first is not None:
        return list(first)  # without an energy/force term the observables are the whole gradient
    return calibrated_weights(term_gradients, qm_gradient, share)


def calibrated_weights(term_gradients: Sequence[torch.Tensor], qm_gradient: Optional[torch.Tensor],
                       share: float) -> Optional[list[float]]:
    """Observable weights for ``--obs-weight auto``: each observable's gradient gets the same norm, and together
    they hold ``share`` of the norm of the total gradient ``Σ w_k g_k + g_qm``.

    With o = Σ g_k/|g_k| (a = |o|, b = |g_qm|, c = cos(o, g_qm)) the common factor x
    solves |x o| = share · |x o + g_qm|, i.e. x²a²(1 − s²) − 2 s² x a b c − s² b² = 0.
    Without an energy/force term (λ = 0) the share is 1 whatever the weights, so each
    observable gets weight 1/|g_k| (equal norms, unit total scale). ``None`` when an
    observable gradient is zero or not finite.
    """
    norms = [float(g.norm()) for g in term_gradients]
    if not norms or any(not (n > 0 and math.isfinite(n)) for n in norms):
        return None
    unit = sum(g / n for g, n in zip(term_gradients, norms))
    a = float(unit.norm())
    b = 0.0 if qm_gradient is None else float(qm_gradient.norm())
    if b == 0.0 or a == 0.0:
        factor = 1.0 / max(a, 1e-300)
    else:
        cosine = float(unit @ qm_gradient) / (a * b)
        s2 = share * share
        factor = (s2 * a * b * cosine + math.sqrt((s2 * a * b * cosine) ** 2 + (1 - s2) * a * a * s2 * b * b)) / (
            a * a * (1 - s2))
    return [factor / n for n in norms]


def _flat_gradient(model: nn.Module) -> torch.Tensor:
    """All parameter gradients as one float64 vector on the CPU (zeros where a parameter has none): the
    combining of terms and the sums over ranks work on it wherever the model runs."""
    return torch.cat([(p.grad.detach() if p.grad is not None else torch.zeros_like(p)).double().reshape(-1).cpu()
                      for p in model.parameters() if p.requires_grad])


def _set_flat_gradient(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        size = p.numel()
        p.grad = flat[offset:offset + size].reshape(p.shape).to(p.device, p.dtype, copy=True)
        offset += size

