"""``stable-md simulate``: R replicas of a model in OpenMM, with trajectories, a state log and a JSON summary.

The run directory holds ``topology.pdb``, ``replica_XXX.dcd`` (MDTraj:
``mdtraj.load("replica_000.dcd", top="topology.pdb")``), ``state.csv``,
``settings.json``, ``summary.json`` and ``checkpoint.npz``. The checkpoint is
written atomically after every frame, so ``resume=True`` continues a killed run
from its last frame, trajectories and log cut back to match.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from openmm_bridge.md_settings import MDSettings, flat_record
from openmm_bridge.replicas import ReplicaSet, ReplicaSnapshot, snapshot_from_arrays, snapshot_to_arrays
from openmm_bridge.reporters import (STATE_LOG_NAME, TOPOLOGY_NAME, Reporter, StateLog, StateLogReporter,
                                     TrajectoryReporter, TrajectoryWriter, replica_status, truncate_dcd,
                                     truncate_state_log, write_topology)
from stable_md.compatibility import warn_if_other_structures
from stable_md.geometry_checks import check_cell_fits_cutoff, check_finite_positions
from stable_md.reporting import StabilityMonitor
from stable_md.files import atomic_write, file_sha256, read_checkpoint, write_json
from stable_md.potentials.model_file import read_metadata
from stable_md.stability import CriterionInputs, default_threshold, detect_bonds, make_criterion
from stable_md.units import PS_IN_FS

SETTINGS_NAME = "settings.json"
SUMMARY_NAME = "summary.json"
CHECKPOINT_NAME = "checkpoint.npz"
# Settings that must agree between a run and its resumption.
RESUME_KEYS = ("model", "n_replicas", "numbers", "integrator", "temperature", "timestep", "friction",
               "collision_frequency", "seed", "frame_interval", "mode", "backend", "periodic", "stability",
               "bond_threshold")
STABILITY_CRITERIA = ("bond", "none")


@dataclass
class SimulationSettings:
    """What ``stable-md simulate`` runs. Units: fs; ``frame_interval`` in steps; the MD in ``md`` (default: Langevin
    at 300 K)."""

    model: str
    n_replicas: int
    numbers: list
    md: MDSettings = field(default_factory=lambda: MDSettings(integrator="langevin", temperature=300.0))
    total_time: float = 10_000.0
    frame_interval: int = 100
    backend: str = "python"
    periodic: bool = False
    stability: str = "bond"
    bond_threshold: float = default_threshold("bond")

    def __post_init__(self) -> None:
        if isinstance(self.md, dict):
            self.md = MDSettings.from_dict(self.md)

    @property
    def n_steps(self) -> int:
        return int(round(self.total_time / self.md.timestep))


def output_files(directory: Path) -> list[Path]:
    """The files of a run already in ``directory`` (any number of replicas)."""
    names = [TOPOLOGY_NAME, STATE_LOG_NAME, SETTINGS_NAME, SUMMARY_NAME, CHECKPOINT_NAME]
    fixed = [directory / name for name in names if (directory / name).exists()]
    return fixed + sorted(directory.glob("replica_*.dcd"))


def check_directory(directory: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to clobber an earlier run unless asked, before anything is written or deleted.

    Files of a start that failed before its first frame (no checkpoint, no summary) count as no run.
    """
    if resume:
        if not (directory / CHECKPOINT_NAME).exists():
            raise FileNotFoundError(f"cannot resume: {directory / CHECKPOINT_NAME} does not exist")
        return
    started = [directory / name for name in (CHECKPOINT_NAME, SUMMARY_NAME) if (directory / name).exists()]
    if started and not overwrite:
        raise FileExistsError(f"{directory} already holds a run ({started[0].name}, ...); pass --overwrite to "
                              f"replace it or --resume to continue it")


def clear_directory(directory: Path) -> None:
    """Delete only the files a run writes (any number of replicas) and make sure the directory exists."""
    for path in output_files(directory):
        path.unlink()
    directory.mkdir(parents=True, exist_ok=True)


def run_simulation(settings: SimulationSettings, starts: np.ndarray, directory: str | os.PathLike,
                   cell: Optional[np.ndarray] = None, overwrite: bool = False, resume: bool = False,
                   progress: bool = True, reference_positions: Optional[np.ndarray] = None) -> dict:
    """Run the replicas from ``starts`` [R, N, 3] Å and write the run directory; returns the summary.

    With ``settings.stability == "bond"``, bonds and their reference lengths come from
    ``reference_positions`` [F, N, 3] Å (default: the starting frames); at every frame a
    replica whose bond lengths deviate by more than ``settings.bond_threshold`` Å is
    marked unstable and frozen (its trajectory ends with that frame).
    """
    directory = Path(directory)
    if settings.stability not in STABILITY_CRITERIA:
        raise ValueError(f"unknown stability criterion {settings.stability!r}; expected one of "
                         f"{list(STABILITY_CRITERIA)}")
    criterion = None
    if settings.stability == "bond":
        reference = starts if reference_positions is None else reference_positions
        criterion = make_criterion("bond", CriterionInputs(detect_bonds(np.asarray(settings.numbers), reference, cell),
                                                           cell), settings.bond_threshold)
    metadata = read_metadata(settings.model)
    check_cell_fits_cutoff(cell, metadata["cutoff"], f"simulate {settings.model}")
    warn_if_other_structures(metadata, settings.numbers, cell is not None, settings.model, "the starting structures")
    check_finite_positions(starts, "simulate: starting structures")
    check_directory(directory, overwrite, resume)
    record = {**flat_record(settings), "model_sha256": file_sha256(settings.model)}
    if resume:
        _check_same_run(directory, record)
    # Everything that can fail on the user's input (the model, the device, the force backend) fails here,
    # before the run directory is touched.
    replicas = ReplicaSet.from_settings(settings.model, settings.numbers, starts, settings.md, cell=cell,
                                        backend=settings.backend, check_interval=min(settings.frame_interval, 50))
    if not resume:
        clear_directory(directory)
        write_json(directory / SETTINGS_NAME, record)
        write_topology(directory / TOPOLOGY_NAME, settings.numbers, starts[0], cell)
    wall_before = 0.0
    if resume:
        saved = _load_checkpoint(directory / CHECKPOINT_NAME)
        replicas.restore(saved["snapshot"])
        wall_before = saved["wall_seconds"]
        for replica, frames in enumerate(saved["frames_written"]):
            truncate_dcd(directory / f"replica_{replica:03d}.dcd", int(frames))
        truncate_state_log(directory / STATE_LOG_NAME, replicas.step)
    trajectories = TrajectoryWriter(directory, settings.numbers, settings.n_replicas, settings.md.timestep,
                                    settings.frame_interval, cell=cell, append=resume)
    state_log = StateLog(directory / STATE_LOG_NAME, append=resume)
    every = settings.frame_interval
    # A frame is written while its replica runs, then judged; the log shows the verdict; the checkpoint
    # comes last, so that a resume starts after a frame whose files are complete.
    logger = StateLogReporter(state_log, every, settings.n_replicas)
    reporters = [TrajectoryReporter(trajectories, every)]
    if criterion is not None:
        reporters.append(StabilityMonitor(criterion, every))
    reporters += [logger, _CheckpointReporter(directory / CHECKPOINT_NAME, every, trajectories, logger)]
    if resume:
        logger.temperature_sum, logger.temperature_count = saved["temperature_sum"], saved["temperature_count"]
    clock = reporters[-1]
    clock.wall_before = wall_before
    if not resume:
        frames = replicas.frames()
        for reporter in reporters:
            reporter.report(replicas, frames)
    bar = _progress_bar(settings.n_steps, replicas.step, progress)
    try:
        def advance(steps: int) -> None:
            if bar is not None:
                bar.update(steps)
                bar.set_postfix(unstable=int(replicas.unstable.sum()), refresh=False)

        replicas.run(settings.n_steps - replicas.step, reporters=reporters, progress=advance)
    finally:
        if bar is not None:
            bar.close()
        trajectories.close()
        state_log.close()
    wall = clock.wall_seconds()
    summary = _summary(settings, replicas, trajectories, logger.mean_temperatures(), wall, directory)
    write_json(directory / SUMMARY_NAME, summary)
    return summary


class _CheckpointReporter(Reporter):
    """Writes the run's checkpoint (replicas, frames written, temperature sums, wall time) after every frame."""

    def __init__(self, path: Path, interval: int, trajectories: TrajectoryWriter, logger: StateLogReporter) -> None:
        super().__init__(interval)
        self.path, self.trajectories, self.logger = path, trajectories, logger
        self.wall_before = 0.0
        self.started = time.perf_counter()

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def report(self, replicas: ReplicaSet, frames) -> None:
        _save_checkpoint(self.path, replicas.snapshot(), self.trajectories.frames_written,
                         self.logger.temperature_sum, self.logger.temperature_count, self.wall_seconds())


def _summary(settings: SimulationSettings, replicas: ReplicaSet, trajectories: TrajectoryWriter,
             mean_temperatures: list, wall: float, directory: Path) -> dict:
    steps_run = replicas.step
    replica_steps = float(np.where(replicas.unstable, replicas.unstable_step, steps_run).sum())
    per_replica = []
    for r in range(settings.n_replicas):
        entry = {
            "replica": r,
            "status": replica_status(replicas)[r],
            "unstable_at_ps": (float(replicas.unstable_step[r] * settings.md.timestep / PS_IN_FS)
                               if replicas.unstable[r] else None),
            "frames": int(trajectories.frames_written[r]),
            "mean_temperature_K": mean_temperatures[r],
            "trajectory": trajectories.paths[r].name,
        }
        if r in replicas.reasons:
            entry["reason"] = replicas.reasons[r]
        per_replica.append(entry)
    simulated_ns = replica_steps * settings.md.timestep * 1e-6
    return {
        "settings": flat_record(settings),
        "completed": steps_run >= settings.n_steps,
        "steps": int(steps_run),
        "time_ps": steps_run * settings.md.timestep / PS_IN_FS,
        "n_unstable": int(replicas.unstable.sum()),
        "wall_seconds": wall,
        "replica_steps_per_second": replica_steps / wall if wall > 0 else None,
        "ns_per_day_all_replicas": simulated_ns / wall * 86400 if wall > 0 else None,
        "topology": TOPOLOGY_NAME,
        "state_log": STATE_LOG_NAME,
        "replicas": per_replica,
        "directory": str(directory),
    }


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="simulate", dynamic_ncols=True)


def _check_same_run(directory: Path, record: dict) -> None:
    path = directory / SETTINGS_NAME
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: {path} does not exist")
    saved = json.loads(path.read_text())
    # The model is the same when its bytes are (a copy or another path to it resumes; a different file copied
    # over the same path does not). Runs recorded before the hash was kept compare the resolved path.
    keys = [key for key in RESUME_KEYS if not (key == "model" and "model_sha256" in saved)]
    different = [key for key in keys if saved.get(key) != record.get(key)]
    details = [f"{key}: run has {saved.get(key)!r}, now {record.get(key)!r}" for key in different]
    if "model_sha256" in saved and saved["model_sha256"] != record["model_sha256"]:
        details.insert(0, f"model: {record['model']} is not the file the run started with (other contents)")
    if details:
        details = ", ".join(details)
        raise ValueError(f"cannot resume {directory}: settings differ from the original run ({details})")
    if saved.get("total_time") != record.get("total_time") or saved.get("model") != record["model"]:
        # Extending (or shortening) a run is allowed, and so is naming the same model by another path.
        write_json(path, {**saved, "total_time": record["total_time"], "model": record["model"],
                          "model_sha256": record["model_sha256"]})


def _save_checkpoint(path: Path, snapshot: ReplicaSnapshot, frames_written: np.ndarray,
                     temperature_sum: np.ndarray, temperature_count: np.ndarray, wall_seconds: float) -> None:
    arrays = {**snapshot_to_arrays(snapshot), "frames_written": frames_written, "temperature_sum": temperature_sum,
              "temperature_count": temperature_count, "wall_seconds": np.array(wall_seconds)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def _load_checkpoint(path: Path) -> dict:
    def read(path: Path) -> dict:
        with np.load(path, allow_pickle=False) as data:
            return {"snapshot": snapshot_from_arrays(data), "frames_written": data["frames_written"],
                    "temperature_sum": data["temperature_sum"].copy(),
                    "temperature_count": data["temperature_count"].copy(),
                    "wall_seconds": float(data["wall_seconds"])}

    return read_checkpoint(path, "simulate", read)
