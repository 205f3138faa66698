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
from typing import TYPE_CHECKING, Optional

import numpy as np

from openmm_bridge.md_settings import RECORDED_BEFORE, MDSettings, flat_record, same_environment
from openmm_bridge.replicas import ReplicaSet, snapshot_from_arrays, snapshot_to_arrays
from openmm_bridge.reporters import (STATE_LOG_NAME, TOPOLOGY_NAME, Reporter, StateLog, TrajectoryReporter,
                                     TrajectoryWriter, dcd_name, replica_status, truncate_dcd, truncate_state_log,
                                     write_topology)
from stable_md.compatibility import warn_if_other_structures
from stable_md.devices import check_device, this_rank_device
from stable_md.geometry_checks import check_cell_fits_cutoff, check_finite_positions
from stable_md.guard import StabilityGuard
from stable_md.reporting import StabilityMonitor
from stable_md.files import RunLayout, atomic_write, file_sha256, read_checkpoint, write_json
from stable_md.potentials.model_file import read_metadata
from stable_md.stability import CriterionInputs, default_threshold, detect_bonds, make_criterion
from stable_md.units import PS_IN_FS

if TYPE_CHECKING:
    from openmm_bridge.mm_environment import MMEnvironment

SETTINGS_NAME = "settings.json"
SUMMARY_NAME = "summary.json"
CHECKPOINT_NAME = "checkpoint.npz"
# Settings that must agree between a run and its resumption.
RESUME_KEYS = ("model", "n_replicas", "numbers", "integrator", "temperature", "timestep", "friction",
               "collision_frequency", "seed", "frame_interval", "mode", "backend", "periodic", "stability",
               "bond_threshold", "platform")
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
    environment: Optional[dict] = None  # MMEnvironment.record() of MM surroundings, set by run_simulation

    def __post_init__(self) -> None:
        if isinstance(self.md, dict):
            self.md = MDSettings.from_dict(self.md)

    @property
    def n_steps(self) -> int:
        return int(round(self.total_time / self.md.timestep))


# Files of a start that failed before its first frame (no checkpoint, no summary) count as no run.
RUN_LAYOUT = RunLayout("a run", files=(TOPOLOGY_NAME, STATE_LOG_NAME, SETTINGS_NAME, SUMMARY_NAME, CHECKPOINT_NAME),
                       started_by=(CHECKPOINT_NAME, SUMMARY_NAME), resume_from=CHECKPOINT_NAME,
                       patterns=("replica_*.dcd",))


def clear_directory(directory: Path) -> None:
    """Delete only the files a run writes (any number of replicas) and make sure the directory exists."""
    RUN_LAYOUT.clear(RUN_LAYOUT.existing(directory))
    directory.mkdir(parents=True, exist_ok=True)


def run_simulation(settings: SimulationSettings, starts: np.ndarray, directory: str | os.PathLike,
                   cell: Optional[np.ndarray] = None, overwrite: bool = False, resume: bool = False,
                   progress: bool = True, reference_positions: Optional[np.ndarray] = None, nproc: int = 1,
                   environment: Optional["MMEnvironment"] = None) -> dict:
    """Run the replicas from ``starts`` [R, N, 3] Å and write the run directory; returns the summary.

    ``environment``: MM surroundings of the model's atoms (:class:`openmm_bridge.mm_environment.MMEnvironment`;
    ``settings.numbers`` are its model atoms, ``starts`` [R, P, 3] every particle, ``cell`` None, the mode
    per-replica). Trajectories and ``topology.pdb`` then hold every particle; the criterion judges the model's
    atoms; the state log's potential energy is the whole System's.

    With ``settings.stability == "bond"``, bonds and their reference lengths come from
    ``reference_positions`` [F, N, 3] Å (default: those the model file stores when its atoms are
    these, else the starting frames; the summary's ``stability_reference`` says which); at every frame a
    replica whose bond lengths deviate by more than ``settings.bond_threshold`` Å is
    marked unstable and frozen (its trajectory ends with that frame).

    ``nproc`` > 1 splits the replicas over that many processes (:mod:`stable_md.distributed`), each
    with its own OpenMM Context, writing its replicas' trajectories; process 0 writes the state log,
    the checkpoint and the summary. The replicas start as they would in one process (the thermostat's
    noise is each process's own), and a resume needs the same ``nproc``.
    """
    from stable_md.distributed import check_ranks, current_group, launch

    directory = Path(directory)
    if settings.stability not in STABILITY_CRITERIA:
        raise ValueError(f"unknown stability criterion {settings.stability!r}; expected one of "
                         f"{list(STABILITY_CRITERIA)}")
    check_device(settings.md.device)
    check_ranks(nproc, settings.n_replicas)
    group = current_group()
    metadata = read_metadata(settings.model)
    check_cell_fits_cutoff(cell, metadata["cutoff"], f"simulate {settings.model}")
    if group.main:
        warn_if_other_structures(metadata, settings.numbers, cell is not None, settings.model,
                                 "the starting structures")
    check_finite_positions(starts, "simulate: starting structures")
    if environment is not None:
        if cell is not None or reference_positions is not None:
            raise ValueError("with MM surroundings the box is the environment's and the bonds are the model "
                             "file's or the structure's: pass neither cell nor reference_positions")
        settings.environment = environment.record()
    RUN_LAYOUT.prepare(directory, overwrite, resume)  # refuses to clobber an earlier run; touches nothing
    record = {**flat_record(settings), "model_sha256": file_sha256(settings.model)}
    if resume and group.main:
        _check_same_run(directory, record)
    arguments = (settings, np.asarray(starts), directory, cell, resume, progress, reference_positions, record,
                 environment)
    if nproc == 1:
        return _simulate_on_this_rank(*arguments)
    return launch(nproc, _simulate_on_this_rank, arguments)


def _simulate_on_this_rank(settings: SimulationSettings, starts: np.ndarray, directory: Path,
                           cell: Optional[np.ndarray], resume: bool, progress: bool,
                           reference_positions: Optional[np.ndarray], record: dict,
                           environment: Optional["MMEnvironment"] = None) -> Optional[dict]:
    """This process's replicas of the run (all of them with one process); rank 0 returns the summary."""
    from stable_md.distributed import current_group

    group = current_group()
    # what the criterion judges: the model's atoms of each start (every particle without MM surroundings)
    model_starts = starts if environment is None else starts[:, environment.model_atoms]
    criterion, reference_note = None, None
    if settings.stability == "bond" and reference_positions is not None:
        criterion = make_criterion("bond", CriterionInputs(detect_bonds(np.asarray(settings.numbers),
                                                                        reference_positions, cell), cell),
                                   settings.bond_threshold)
        reference_note = "bonds of the data file's frames"
    elif settings.stability == "bond":
        # a structure alone: the bonds the model file stores (its training frames') when its atoms are these
        guard = StabilityGuard.from_model(settings.model, settings.numbers, model_starts, cell, "bond",
                                          settings.bond_threshold)
        criterion, reference_note = guard.criterion, guard.note
    mine = group.block(settings.n_replicas)
    md = settings.md.with_changes(device=this_rank_device(settings.md.device, group.rank))
    # Everything that can fail on the user's input (the model, the device, the force backend) fails here,
    # before the run directory is touched.
    replicas = ReplicaSet.from_settings(settings.model, settings.numbers, starts, md, part=mine, stream=group.rank,
                                        cell=cell, backend=settings.backend,
                                        check_interval=min(settings.frame_interval, 50), environment=environment)
    group.barrier()
    if not resume and group.main:
        clear_directory(directory)
        write_json(directory / SETTINGS_NAME, record)
        write_topology(directory / TOPOLOGY_NAME, settings.numbers, starts[0], replicas.cell,
                       topology=None if environment is None else environment.topology)
    saved = None
    if resume:
        saved = group.broadcast(_load_checkpoint(directory / CHECKPOINT_NAME) if group.main else None)
        if len(saved["ranks"]) != group.size:
            ranks = len(saved["ranks"])
            raise ValueError(f"cannot resume {directory}: it ran on {ranks} process(es) (--nproc {ranks}), this "
                             f"resume on {group.size}; resume it with --nproc {ranks}")
        part = saved["ranks"][group.rank]
        replicas.restore(part["snapshot"])
        for replica, frames in zip(mine, part["frames_written"]):
            truncate_dcd(directory / dcd_name(int(replica)), int(frames))
        if group.main:
            truncate_state_log(directory / STATE_LOG_NAME, replicas.step)
    group.barrier()
    trajectories = TrajectoryWriter(directory, settings.numbers, len(mine), md.timestep, settings.frame_interval,
                                    cell=replicas.cell, append=resume, indices=mine,
                                    topology=None if environment is None else environment.topology)
    state_log = StateLog(directory / STATE_LOG_NAME, append=resume) if group.main else None
    every = settings.frame_interval
    # A frame is written while its replica runs, then judged; the log shows the verdict; the checkpoint
    # comes last, so that a resume starts after a frame whose files are complete.
    logger = _SharedStateLog(state_log, every, group, mine)
    checkpoint = _CheckpointReporter(directory / CHECKPOINT_NAME, every, trajectories, logger, group)
    reporters = [TrajectoryReporter(trajectories, every)]
    if criterion is not None:
        reporters.append(StabilityMonitor(criterion, every))
    reporters += [logger, checkpoint]
    if saved is not None:
        logger.temperature_sum = part["temperature_sum"]
        logger.temperature_count = part["temperature_count"]
        checkpoint.wall_before = saved["wall_seconds"]
    if not resume:
        frames = replicas.frames()
        for reporter in reporters:
            reporter.report(replicas, frames)
    bar = _progress_bar(settings.n_steps, replicas.step, progress and group.main)
    try:
        def advance(steps: int) -> None:
            if bar is not None:
                bar.update(steps)
                bar.set_postfix(unstable=int(replicas.unstable.sum()), refresh=False)

        # with several processes each goes on reporting (and its clock on) until all replicas everywhere stopped
        if group.sum(int(replicas.running.sum())) > 0:
            replicas.run(settings.n_steps - replicas.step, reporters=reporters, progress=advance,
                         keep_clock=group.distributed)
    finally:
        if bar is not None:
            bar.close()
        trajectories.close()
        if state_log is not None:
            state_log.close()
    wall = checkpoint.wall_seconds()
    mine_summary = _replica_entries(settings, replicas, trajectories, logger, mine)
    everyone = group.gather(mine_summary)
    if not group.main:
        return None
    summary = _summary(settings, replicas.step, [entry for part in everyone for entry in part], wall, directory)
    summary["stability_reference"] = reference_note
    write_json(directory / SUMMARY_NAME, summary)
    return summary


class _SharedStateLog(Reporter):
    """State-log rows of every process's replicas, written by process 0, and each replica's mean temperature
    over its running frames. With several processes it also ends the run everywhere once no replica runs."""

    def __init__(self, log: Optional[StateLog], interval: int, group, indices: np.ndarray) -> None:
        super().__init__(interval)
        self.log, self.group, self.indices = log, group, indices
        self.temperature_sum = np.zeros(len(indices))
        self.temperature_count = np.zeros(len(indices), dtype=np.int64)

    def report(self, replicas: ReplicaSet, frames) -> None:
        rows = StateLog.rows(frames, replica_status(replicas), self.indices)
        measured = np.isfinite(frames.temperature)
        self.temperature_sum[measured] += frames.temperature[measured]
        self.temperature_count[measured] += 1
        if not self.group.distributed:
            self.log.write_rows(rows)
            return
        gathered = self.group.gather((rows, bool(replicas.running.any())))
        halt = None
        if self.group.main:
            self.log.write_rows([row for part, _ in gathered for row in part])
            halt = not any(running for _, running in gathered)
        if self.group.broadcast(halt):
            replicas.halt()

    def mean_temperatures(self) -> list[Optional[float]]:
        return [float(total / count) if count else None
                for total, count in zip(self.temperature_sum, self.temperature_count)]


class _CheckpointReporter(Reporter):
    """Writes the run's checkpoint (every process's replicas, frames written, temperature sums; process 0's wall
    time) after every frame, atomically, from process 0."""

    def __init__(self, path: Path, interval: int, trajectories: TrajectoryWriter, logger: _SharedStateLog,
                 group) -> None:
        super().__init__(interval)
        self.path, self.trajectories, self.logger, self.group = path, trajectories, logger, group
        self.wall_before = 0.0
        self.started = time.perf_counter()

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def report(self, replicas: ReplicaSet, frames) -> None:
        part = {"snapshot": snapshot_to_arrays(replicas.snapshot()),
                "frames_written": self.trajectories.frames_written.copy(),
                "temperature_sum": self.logger.temperature_sum.copy(),
                "temperature_count": self.logger.temperature_count.copy()}
        parts = self.group.gather(part)
        if self.group.main:
            _save_checkpoint(self.path, parts, self.wall_seconds())


def _replica_entries(settings: SimulationSettings, replicas: ReplicaSet, trajectories: TrajectoryWriter,
                     logger: _SharedStateLog, indices: np.ndarray) -> list[dict]:
    """The summary's entry of each of this process's replicas, and the steps it ran stably."""
    status = replica_status(replicas)
    temperatures = logger.mean_temperatures()
    entries = []
    for local, replica in enumerate(indices):
        entry = {
            "replica": int(replica),
            "status": status[local],
            "unstable_at_ps": (float(replicas.unstable_step[local] * settings.md.timestep / PS_IN_FS)
                               if replicas.unstable[local] else None),
            "frames": int(trajectories.frames_written[local]),
            "mean_temperature_K": temperatures[local],
            "trajectory": trajectories.paths[local].name,
        }
        if local in replicas.reasons:
            entry["reason"] = replicas.reasons[local]
        entry["_stable_steps"] = int(replicas.unstable_step[local]) if replicas.unstable[local] else None
        entries.append(entry)
    return entries


def _summary(settings: SimulationSettings, steps_run: int, entries: list[dict], wall: float,
             directory: Path) -> dict:
    replica_steps = float(sum(steps_run if entry["_stable_steps"] is None else entry["_stable_steps"]
                              for entry in entries))
    per_replica = [{k: v for k, v in entry.items() if k != "_stable_steps"} for entry in entries]
    simulated_ns = replica_steps * settings.md.timestep * 1e-6
    return {
        "settings": flat_record(settings),
        "completed": steps_run >= settings.n_steps,
        "steps": int(steps_run),
        "time_ps": steps_run * settings.md.timestep / PS_IN_FS,
        "n_unstable": sum(entry["status"] == "unstable" for entry in per_replica),
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
    saved = {**RECORDED_BEFORE, **saved}
    different = [key for key in keys if saved.get(key) != record.get(key)]
    details = [f"{key}: run has {saved.get(key)!r}, now {record.get(key)!r}" for key in different]
    if not same_environment(saved.get("environment"), record.get("environment")):
        details.append("the MM surroundings (--structure, --mm-system, --model-atoms) differ from the run's")
    if "platform" in different:  # OpenMM loads a checkpoint only on the platform that wrote it
        details[different.index("platform")] += f" (pass --platform {saved['platform']})"
    if "model_sha256" in saved and saved["model_sha256"] != record["model_sha256"]:
        details.insert(0, f"model: {record['model']} is not the file the run started with (other contents)")
    if details:
        details = ", ".join(details)
        raise ValueError(f"cannot resume {directory}: settings differ from the original run ({details})")
    if saved.get("total_time") != record.get("total_time") or saved.get("model") != record["model"]:
        # Extending (or shortening) a run is allowed, and so is naming the same model by another path.
        write_json(path, {**saved, "total_time": record["total_time"], "model": record["model"],
                          "model_sha256": record["model_sha256"]})


_PART_ARRAYS = ("frames_written", "temperature_sum", "temperature_count")


def _save_checkpoint(path: Path, parts: list[dict], wall_seconds: float) -> None:
    """One npz for every process's part (a single part keeps the layout of checkpoints from before processes)."""
    def flat(part: dict) -> dict:
        return {**part["snapshot"], **{name: part[name] for name in _PART_ARRAYS}}

    if len(parts) == 1:
        arrays = flat(parts[0])
    else:
        arrays = {"n_ranks": np.array(len(parts))}
        for rank, part in enumerate(parts):
            arrays.update({f"rank{rank}__{name}": value for name, value in flat(part).items()})
    arrays["wall_seconds"] = np.array(wall_seconds)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def _load_checkpoint(path: Path) -> dict:
    """``{"ranks": [each process's snapshot, frames written and temperature sums], "wall_seconds": s}``."""
    def part(data, prefix: str) -> dict:
        arrays = {name[len(prefix):]: data[name] for name in data.files if name.startswith(prefix)}
        return {"snapshot": snapshot_from_arrays(arrays),
                **{name: np.array(arrays[name]) for name in _PART_ARRAYS}}

    def read(path: Path) -> dict:
        with np.load(path, allow_pickle=False) as data:
            prefixes = ([f"rank{rank}__" for rank in range(int(data["n_ranks"]))] if "n_ranks" in data.files
                        else [""])
            return {"ranks": [part(data, prefix) for prefix in prefixes],
                    "wall_seconds": float(data["wall_seconds"])}

    return read_checkpoint(path, "simulate", read)
