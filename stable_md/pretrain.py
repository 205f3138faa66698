"""Energy/force training of a Potential (the ordinary NNIP fit that precedes StABlE).

The same :class:`EnergyForceLoss` is the QM regularizer of StABlE training.
Loss per frame: ``w_E * ((E - E_ref) / N)^2 + w_F * mean_atoms,xyz (F - F_ref)^2`` (eV², eV²/Å²).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor, nn

from stable_md.data import Dataset, data_record, load_dataset
from stable_md.devices import check_device
from stable_md.potentials import (Potential, build_metadata, build_potential, energy_and_forces, model_dtype_device,
                                  save_model)
from stable_md.files import atomic_write, read_checkpoint, truncate_jsonl_log
from stable_md.guard import REFERENCE_KEY, stored_reference_of

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class FrameBatch:
    """Frames as tensors: positions [B, N, 3] Å, numbers [N], energies [B] eV, forces [B, N, 3] eV/Å."""

    positions: Tensor
    numbers: Tensor
    energies: Tensor
    forces: Tensor
    cells: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.positions.shape[0]


class DatasetTensors:
    """A Dataset converted to tensors once, cut into batches without copying back to numpy."""

    def __init__(self, data: Dataset, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.positions = torch.as_tensor(data.positions, dtype=dtype, device=device)
        self.numbers = torch.as_tensor(data.numbers, dtype=torch.long, device=device)
        self.energies = torch.as_tensor(data.energies, dtype=dtype, device=device)
        self.forces = torch.as_tensor(data.forces, dtype=dtype, device=device)
        self.cells = None if data.cells is None else torch.as_tensor(data.cells, dtype=dtype, device=device)

    def __len__(self) -> int:
        return self.positions.shape[0]

    def batch(self, index: Tensor) -> FrameBatch:
        index = index.to(self.positions.device)
        return FrameBatch(self.positions[index], self.numbers, self.energies[index], self.forces[index],
                          None if self.cells is None else self.cells[index])

    def batches(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Iterator[FrameBatch]:
        """Consecutive batches; shuffled when a generator is given."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self.batch(order[start:start + batch_size])


class EnergyForceLoss(nn.Module):
    """Weighted energy (per atom) and force mean squared errors of a Potential on a batch."""

    def __init__(self, energy_weight: float = 1.0, force_weight: float = 100.0) -> None:
        super().__init__()
        if energy_weight < 0 or force_weight < 0 or energy_weight + force_weight == 0:
            raise ValueError("energy and force weights must be >= 0 and not both zero")
        self.energy_weight = float(energy_weight)
        self.force_weight = float(force_weight)

    def forward(self, model: nn.Module, batch: FrameBatch) -> tuple[Tensor, dict[str, float]]:
        energy, forces = energy_and_forces(model, batch.positions, batch.numbers, batch.cells, create_graph=True)
        n_atoms = batch.positions.shape[1]
        energy_error = (energy - batch.energies) / n_atoms
        force_error = forces - batch.forces
        loss = self.energy_weight * energy_error.pow(2).mean() + self.force_weight * force_error.pow(2).mean()
        stats = {
            "energy_abs_sum": float((energy.detach() - batch.energies).abs().sum()),
            "force_abs_sum": float(force_error.detach().abs().sum()),
            "frames": len(batch),
            "force_components": force_error.numel(),
        }
        return loss, stats


def prediction_errors(model: nn.Module, data: Dataset | DatasetTensors, batch_size: int = 64,
                      dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """Energy MAE/RMSE (meV per frame) and force MAE/RMSE (meV/Å) of ``model`` on ``data``."""
    if isinstance(data, Dataset):
        model_dtype, device = model_dtype_device(model)
        data = DatasetTensors(data, dtype=model_dtype if dtype is None else dtype, device=device)
    energy_errors, force_errors = [], []
    for batch in data.batches(batch_size):
        energy, forces = energy_and_forces(model, batch.positions, batch.numbers, batch.cells)
        energy_errors.append((energy.detach() - batch.energies).double())
        force_errors.append((forces.detach() - batch.forces).double().reshape(-1))
    e = torch.cat(energy_errors)
    f = torch.cat(force_errors)
    return {
        "energy_mae_meV": 1000 * float(e.abs().mean()),
        "energy_rmse_meV": 1000 * float(e.pow(2).mean().sqrt()),
        "force_mae_meV_per_A": 1000 * float(f.abs().mean()),
        "force_rmse_meV_per_A": 1000 * float(f.pow(2).mean().sqrt()),
        "frames": len(e),
    }


def fit_energy_shifts(data: Dataset, species: list[int]) -> np.ndarray:
    """Per-species energies (eV) that best explain the frame energies by composition alone.

    Least squares over composition counts; when every frame has the same composition the
    problem is degenerate and the minimum-norm solution is used (only the sum matters).
    """
    return _composition_fit(data.numbers, data.energies, species)


def _composition_fit(numbers: np.ndarray, energies: np.ndarray, species: list[int]) -> np.ndarray:
    """Least-squares per-species energies [S] (eV) for frames ``energies [F]`` of atoms ``numbers [N]``."""
    counts = np.array([[np.count_nonzero(numbers == z) for z in species]], dtype=np.float64)
    shifts, *_ = np.linalg.lstsq(np.repeat(counts, len(energies), axis=0), energies, rcond=None)
    return shifts


def initialise_output_scale(potential: Potential, data: Dataset) -> dict[str, Any]:
    """Set per-species shifts (least squares) and the energy scale (RMS force, eV) from training data."""
    species = potential.species_numbers.tolist()
    shifts = fit_energy_shifts(data, species)
    rms_force = float(np.sqrt(np.mean(data.forces ** 2)))
    scale = rms_force if rms_force > 1e-6 else 1.0
    with torch.no_grad():
        potential.energy_shift.copy_(torch.as_tensor(shifts, dtype=potential.energy_shift.dtype))
        potential.energy_scale.fill_(scale)
    return {"energy_shift_eV": dict(zip(map(str, species), map(float, shifts))), "energy_scale_eV": scale}


def refit_energy_shifts(potential: Potential, train: Dataset, batch_size: int = 64) -> dict[str, float]:
    """Absorb the mean energy residual on ``train`` into the per-species shifts; returns the new shifts (eV).

    The loss weighs forces far above per-atom energies, so a constant energy offset is
    learned slowly; the shifts enter the energy linearly, so least squares over the
    composition counts removes that offset exactly without changing any force.
    """
    species = potential.species_numbers.tolist()
    dtype, device = potential.energy_shift.dtype, potential.energy_shift.device
    residuals = []
    for batch in DatasetTensors(train, dtype, device).batches(batch_size):
        energy, _ = energy_and_forces(potential, batch.positions, batch.numbers, batch.cells)
        residuals.append((batch.energies - energy.detach()).double().cpu())
    correction = _composition_fit(train.numbers, torch.cat(residuals).numpy(), species)
    with torch.no_grad():
        potential.energy_shift.add_(torch.as_tensor(correction, dtype=dtype, device=device))
    return dict(zip(map(str, species), map(float, potential.energy_shift.double().tolist())))


@dataclass
class PretrainSettings:
    """Optimisation settings of :func:`pretrain` (epochs are passes over the training frames)."""

    epochs: int = 300
    lr: float = 1e-3
    batch_size: int = 16
    energy_weight: float = 1.0
    force_weight: float = 100.0
    patience: int = 40
    lr_patience: int = 10
    lr_factor: float = 0.5
    min_lr: float = 1e-6
    max_time_s: Optional[float] = None
    seed: int = 0
    dtype: str = "float32"


@dataclass
class SplitSettings:
    """How frames of the data file are split: counts and the permutation seed.

    ``None`` counts adapt to the file, as MACE's ``valid_fraction`` does: validation 10 % of the
    frames (at least 1, at most 100), training 80 % (at most 1000), test what remains (at most 1000).
    A file of 1,250 frames or more gets 1000/100/1000.
    """

    n_train: Optional[int] = None
    n_val: Optional[int] = None
    n_test: Optional[int] = 1000
    seed: int = 0

    def resolved(self, n_frames: int, source: str = "data") -> "SplitSettings":
        """The counts used on a file of ``n_frames`` frames; raises ``ValueError`` naming ``source``."""
        n_val = self.n_val if self.n_val is not None else min(MAX_DEFAULT_VAL, max(1, round(0.1 * n_frames)))
        n_train = (self.n_train if self.n_train is not None
                   else min(MAX_DEFAULT_TRAIN, int(0.8 * n_frames), n_frames - n_val))
        if n_train < 1 or n_val < 1:
            raise ValueError(f"{source}: has {n_frames} frame(s); pretraining needs at least 1 training and "
                             f"1 validation frame")
        if n_train + n_val > n_frames:
            raise ValueError(f"{source}: has {n_frames} frames, fewer than n_train + n_val = {n_train} + {n_val} "
                             f"(--n-train/--n-val; leave them out to use 80%/10% of the file)")
        remaining = n_frames - n_train - n_val
        n_test = remaining if self.n_test is None else min(self.n_test, remaining)
        return SplitSettings(n_train=n_train, n_val=n_val, n_test=n_test, seed=self.seed)


MAX_DEFAULT_TRAIN, MAX_DEFAULT_VAL = 1000, 100


def pretrain(data: Dataset | str | Path, arch: str, output: str | Path, *,
             split: SplitSettings = SplitSettings(), settings: PretrainSettings = PretrainSettings(),
             hyperparameters: Optional[dict[str, Any]] = None, units: Optional[str] = None,
             overwrite: bool = False, resume: bool = False, progress: bool = True,
             log_path: Optional[str | Path] = None, announce: Optional[Callable[[str], None]] = None,
             device: str = "cpu") -> tuple[Potential, dict[str, Any]]:
    """Fit a new ``arch`` Potential to energies and forces and save it to ``output``.

    Checkpoints every epoch to ``<output stem>.ckpt.pt`` (atomic), logs one JSON line per
    epoch to ``<output stem>.log.jsonl``, stops early when the validation force MAE has not
    improved for ``settings.patience`` epochs, and keeps the best model.

    ``announce`` receives one line saying how the frames were split, before training starts.
    ``device`` is the torch device training runs on (``cpu``, ``cuda``, ``cuda:N``); the written
    model and the checkpoint load on any device, so a run may resume on another one.

    Returns the trained potential (best validation epoch) and the final report.
    """
    from tqdm.auto import tqdm

    output = Path(output)
    checkpoint_path = output.with_suffix(".ckpt.pt")
    log_path = Path(log_path) if log_path is not None else output.with_suffix(".log.jsonl")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; refusing to overwrite it (use --overwrite)")
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(f"{checkpoint_path} holds an interrupted run; continue it with --resume "
                              f"or delete it to start afresh")
    if settings.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {settings.dtype!r}")
    device = check_device(device)
    dtype = DTYPES[settings.dtype]
    if not isinstance(data, Dataset):
        data = load_dataset(data, units=units)
    split = split.resolved(len(data), str(data.source))
    if announce is not None:
        announce(f"split: {split.n_train} training, {split.n_val} validation, {split.n_test} test frames "
                 f"of {len(data)} (seed {split.seed})")
    train, val, test = data.split(split.n_train, split.n_val, split.n_test, seed=split.seed)

    torch.manual_seed(settings.seed)
    potential, hyper = build_potential(arch, data.species, **(hyperparameters or {}))
    scale_info = initialise_output_scale(potential, train)
    potential = potential.to(device, dtype)
    loss_fn = EnergyForceLoss(settings.energy_weight, settings.force_weight)
    optimizer = torch.optim.Adam(potential.parameters(), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=settings.lr_factor, patience=settings.lr_patience, min_lr=settings.min_lr)
    # the frames' fingerprint, not the path as typed: a resume from another directory is the same run
    run_identity = {"arch": arch, "hyperparameters": hyper, "data": data_record(data)["data_fingerprint"],
                    "split": asdict(split),
                    "settings": {k: v for k, v in asdict(settings).items() if k != "max_time_s"}}
    generator = torch.Generator().manual_seed(settings.seed)
    state = {"epoch": 0, "best_val": math.inf, "best_epoch": -1, "best_model": None, "elapsed_s": 0.0}
    if resume and checkpoint_path.exists():
        state = _load_checkpoint(checkpoint_path, run_identity, potential, optimizer, scheduler, generator)
        truncate_jsonl_log(log_path, state["epoch"])
        _restore_last_log_row(log_path, state.get("last_row"))
    elif log_path.exists() and not overwrite:
        raise FileExistsError(f"{log_path} exists; refusing to overwrite it (use --overwrite)")
    elif log_path.exists():
        log_path.unlink()

    train_tensors = DatasetTensors(train, dtype, device)
    val_tensors = DatasetTensors(val, dtype, device)
    start = time.perf_counter() - state["elapsed_s"]
    stopped = "epochs"
    bar = tqdm(total=settings.epochs, initial=state["epoch"], disable=not progress, desc=f"pretrain {arch}",
               unit="epoch")
    while state["epoch"] < settings.epochs:
        try:
            epoch_stats = _train_epoch(potential, loss_fn, optimizer, train_tensors, settings.batch_size, generator)
        except FloatingPointError:
            lr = optimizer.param_groups[0]["lr"]
            if state["best_model"] is None:
                bar.close()
                raise TrainingDiverged(
                    f"the training loss became NaN or inf in epoch {state['epoch'] + 1}, before any epoch "
                    f"finished; lower --lr (now {lr:g}) or check {data.source} for outliers. Nothing was "
                    f"written") from None
            # keep what was learned: the best epoch so far is written below, and the report says why it stopped
            stopped = "diverged"
            break
        val_errors = prediction_errors(potential, val_tensors, batch_size=max(settings.batch_size, 32))
        val_force = val_errors["force_mae_meV_per_A"]
        scheduler.step(val_force)
        state["epoch"] += 1
        if val_force < state["best_val"]:
            state.update(best_val=val_force, best_epoch=state["epoch"],
                         best_model={k: v.detach().clone() for k, v in potential.state_dict().items()})
        state["elapsed_s"] = time.perf_counter() - start
        state["last_row"] = {"epoch": state["epoch"], "lr": optimizer.param_groups[0]["lr"], **epoch_stats,
                             "val_energy_mae_meV": val_errors["energy_mae_meV"],
                             "val_force_mae_meV_per_A": val_force, "wall_time_s": round(state["elapsed_s"], 3)}
        # checkpoint before log: a log without a checkpoint then only ever belongs to a finished run (a start killed
        # in its first epoch leaves nothing, so the next start needs no --overwrite), and a row lost between the two
        # is written again from the checkpoint on --resume
        _save_checkpoint(checkpoint_path, run_identity, state, potential, optimizer, scheduler, generator)
        _append_log_row(log_path, state["last_row"])
        bar.update(1)
        bar.set_postfix(val_F_MAE=f"{val_force:.1f}", best=f"{state['best_val']:.1f}")
        if state["epoch"] - state["best_epoch"] >= settings.patience:
            stopped = "early stopping"
            break
        if settings.max_time_s is not None and state["elapsed_s"] >= settings.max_time_s:
            stopped = "time limit"
            break
    bar.close()

    if state["best_model"] is not None:
        potential.load_state_dict(state["best_model"])
    scale_info["energy_shift_eV"] = refit_energy_shifts(potential, train)
    report = {
        "arch": arch,
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "stopped_by": stopped,
        "wall_time_s": round(state["elapsed_s"], 1),
        "n_parameters": sum(p.numel() for p in potential.parameters()),
        "validation": prediction_errors(potential, val_tensors),
        "test": prediction_errors(potential, test, dtype=dtype) if len(test) else None,
    }
    history_entry = {
        "stage": "pretrain",
        **data_record(data),
        "units": units,
        "split": asdict(split),
        "train_indices": train.indices.tolist(),
        "val_indices": val.indices.tolist(),
        "test_indices": test.indices.tolist(),
        "settings": asdict(settings),
        **scale_info,
        "report": report,
    }
    # what a stability guard needs from the model file alone: the bonds of the training frames
    metadata = build_metadata(potential, hyper, history=[history_entry], extra={REFERENCE_KEY: stored_reference_of(
        train.numbers, train.positions, None if train.cells is None else train.cells[0],
        f"{len(train)} training frames of {data.source}")})
    save_model(potential, output, metadata, overwrite=True)
    checkpoint_path.unlink(missing_ok=True)
    return potential, report


def _append_log_row(path: Path, row: dict) -> None:
    with open(path, "a") as log:
        log.write(json.dumps(row) + "\n")


def _restore_last_log_row(path: Path, row: Optional[dict]) -> None:
    """Append the checkpoint's last epoch row when the run was stopped after its checkpoint, before its log row."""
    if row is None:  # a checkpoint written before the row was kept in it
        return
    rows = path.read_text().splitlines() if path.exists() else []
    epochs = [json.loads(line).get("epoch", 0) for line in rows if line.strip()]
    if not epochs or epochs[-1] < row["epoch"]:
        _append_log_row(path, row)


class TrainingDiverged(ValueError):
    """The loss became non-finite before any epoch finished, so there is no model to keep."""


def _train_epoch(potential: nn.Module, loss_fn: EnergyForceLoss, optimizer: torch.optim.Optimizer,
                 data: DatasetTensors, batch_size: int, generator: torch.Generator) -> dict[str, float]:
    totals = {"loss": 0.0, "energy": 0.0, "force": 0.0, "frames": 0, "components": 0}
    for batch in data.batches(batch_size, generator):
        loss, stats = loss_fn(potential, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError("training loss became non-finite; lower --lr or check the data for "
                                     "outliers")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals["loss"] += float(loss.detach()) * stats["frames"]
        totals["energy"] += stats["energy_abs_sum"]
        totals["force"] += stats["force_abs_sum"]
        totals["frames"] += stats["frames"]
        totals["components"] += stats["force_components"]
    return {
        "train_loss": totals["loss"] / totals["frames"],
        "train_energy_mae_meV": 1000 * totals["energy"] / totals["frames"],
        "train_force_mae_meV_per_A": 1000 * totals["force"] / totals["components"],
    }


def _save_checkpoint(path: Path, identity: dict, state: dict, potential: nn.Module, optimizer, scheduler,
                     generator: torch.Generator) -> None:
    payload = {
        "identity": json.dumps(identity, sort_keys=True),
        "state": {k: v for k, v in state.items() if k != "best_model"},
        "best_model": state["best_model"],
        "model": potential.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _load_checkpoint(path: Path, identity: dict, potential: nn.Module, optimizer, scheduler,
                     generator: torch.Generator) -> dict:
    def read(path: Path) -> dict:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # resumable on another device
        missing = [key for key in ("identity", "model", "optimizer", "scheduler", "generator", "state", "best_model")
                   if key not in payload]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        return payload

    payload = read_checkpoint(path, "pretrain", read)
    if payload["identity"] != json.dumps(identity, sort_keys=True):
        saved = json.loads(payload["identity"])
        differences = sorted(k for k in identity if saved.get(k) != identity[k])
        raise ValueError(f"{path} was written by a run with different {differences}; "
                         f"resume with the same arguments or delete the checkpoint")
    potential.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    generator.set_state(payload["generator"])
    return {**payload["state"], "best_model": payload["best_model"]}
