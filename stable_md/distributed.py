"""Data-parallel replicas on ``torch.distributed``: which replicas a process runs, and the sums it shares.

Every rank runs its own block of the R replicas in its own OpenMM Context; the numbers that
decide what happens next (unstable counts, the observable's mean over all samples, the
gradient) are summed over the ranks, so every rank takes the same decisions and the same
optimizer steps. With one process (:data:`SINGLE`) every operation is the identity and
nothing of ``torch.distributed`` is touched.

Two ways to start ranks:

- ``stable-md refine --nproc N`` (or :func:`launch`): N local processes on the gloo backend,
  rendezvous through a file, no network port;
- ``torchrun --nproc-per-node N [--nnodes M ...] -m stable_md.cli refine ...``: the ranks
  torchrun starts on one or several nodes (:func:`join_from_environment`, gloo).

Rule for code that uses a group: every collective (``sum``, ``broadcast``, ``gather``) is
called by all ranks in the same order, whatever their local state, or the ranks wait
forever.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class ReplicaGroup:
    """This process's place among the ranks: ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this rank writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def block(self, n: int) -> np.ndarray:
        """Indices of this rank's share of ``n`` items: contiguous blocks, the first ranks one larger."""
        return np.array_split(np.arange(n), self.size)[self.rank]

    def sum(self, values) -> np.ndarray:
        """``values`` (a number or an array) summed over the ranks, as float64."""
        array = np.asarray(values, dtype=np.float64)
        if not self.distributed:
            return array.copy()
        tensor = torch.from_numpy(array.copy()).reshape(-1)
        _all_reduce(tensor)
        return tensor.numpy().reshape(array.shape)

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A float64 copy of ``tensor`` summed over the ranks."""
        out = tensor.detach().to(torch.float64).clone()
        if self.distributed:
            _all_reduce(out)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: Any) -> Optional[list]:
        """Every rank's ``value``, in rank order, on rank 0 (``None`` on the others)."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.size if self.main else None
        torch.distributed.gather_object(value, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


SINGLE = ReplicaGroup()


def _all_reduce(tensor: torch.Tensor) -> None:
    if torch.distributed.get_backend() == "nccl":
        # NCCL reduces GPU tensors only
        moved = tensor.to(f"cuda:{torch.cuda.current_device()}")
        torch.distributed.all_reduce(moved)
        tensor.copy_(moved.cpu())
    else:
        torch.distributed.all_reduce(tensor)


def current_group() -> ReplicaGroup:
    """The group of this process: the initialised ``torch.distributed`` one, else :data:`SINGLE`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return ReplicaGroup(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return SINGLE


def check_ranks(nproc: int, n_replicas: int) -> int:
    """The number of ranks a command will run on, checked: ``nproc`` local ones or torchrun's, not both, and at
    most one per replica."""
    group = current_group()
    if nproc != 1 and group.distributed:
        raise ValueError(f"--nproc {nproc} cannot be combined with ranks torchrun started ({group.size}); give one")
    ranks = max(nproc, group.size)
    if not 1 <= ranks <= n_replicas:
        raise ValueError(f"--nproc must lie in 1..{n_replicas} (the number of replicas), got {ranks}")
    return ranks


def started_by_torchrun() -> bool:
    """Whether this process is one of several ranks started by torchrun (its environment says so)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def join_from_environment() -> ReplicaGroup:
    """Join the ranks torchrun started (``env://``), on gloo whatever the device.

    Everything the ranks sum is a CPU copy (counts, the estimator's sums, the flattened gradient of
    a few MB; see :meth:`ReplicaGroup.sum`), so NCCL would only add copies to the GPU and its abort
    on a collective that waits longer than its timeout, while rank 0 writes plots. Each rank's model
    takes its own GPU by :func:`stable_md.devices.this_rank_device`."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        torch.distributed.init_process_group("gloo", init_method="env://")
    return current_group()


class RankFailed(RuntimeError):
    """A rank failed with an error that is not one of the user-input errors passed on as they are."""


# Errors a rank passes to the launcher as they are: the ones the CLI turns into one line and exit code 2.
_PASSED_ON = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ImportError,
              KeyError, KeyboardInterrupt)


def _passable(error: BaseException) -> tuple[Optional[type], str]:
    """The type and message the launcher re-raises for ``error``: its own type when that type can be made from
    the message alone (``json.JSONDecodeError`` cannot), else the nearest passed-on type it derives from; ``None``
    for an error that is not the user's (re-raised as :class:`RankFailed` with the rank's traceback)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    for kind in type(error).__mro__:
        if not (isinstance(kind, type) and issubclass(kind, _PASSED_ON)):
            continue
        try:
            kind(message)
        except Exception:
            continue
        return kind, message
    return None, message


def launch(nproc: int, target: Callable[..., Any], args: Sequence = ()) -> Any:
    """Run ``target(*args)`` on ``nproc`` local gloo ranks and return rank 0's result.

    Each rank is a fresh (spawned) process with one thread, killed if this process dies
    (so a SIGKILL of ``stable-md`` leaves no rank running). When a rank fails, the others
    are stopped and its error is raised here: a user-input error (ValueError,
    FileNotFoundError, ...) with its own type and message, anything else as
    :class:`RankFailed` with the rank's traceback.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if nproc == 1:
        return target(*args)
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="stable-md-ranks-") as rendezvous:
        results = context.SimpleQueue()
        store = Path(rendezvous) / "store"
        processes = [context.Process(target=_rank_main, args=(rank, nproc, str(store), target, args, results),
                                     name=f"stable-md rank {rank}", daemon=False) for rank in range(nproc)]
        outcome = None
        try:
            for process in processes:
                process.start()
            outcome = _wait(processes, results)
        finally:
            for process in processes:
                if process.is_alive():
                    process.terminate()
            for process in processes:
                if process.pid is not None:  # started
                    process.join()
    kind, payload = outcome
    if kind == "result":
        return pickle.loads(payload)
    error_type, message, trace = payload
    raise error_type(message) if error_type is not None else RankFailed(trace)


def _wait(processes: list, results) -> tuple[str, Any]:
    """Rank 0's result, or the first failure (an error a rank reported, or a rank that died)."""
    import multiprocessing.connection

    result, finished = None, set()

    def read_reports() -> Optional[tuple[str, Any]]:
        nonlocal result
        while not results.empty():
            kind, rank, payload = results.get()
            if kind == "error":
                return "error", payload
            finished.add(rank)
            if rank == 0:
                result = payload
        return None

    pending = {process.sentinel: (rank, process) for rank, process in enumerate(processes)}
    while pending:
        ready = multiprocessing.connection.wait(list(pending) + [results._reader], timeout=None)
        failure = read_reports()
        if failure is not None:
            return failure
        for sentinel in ready:
            if sentinel not in pending:
                continue
            rank, process = pending.pop(sentinel)
            process.join()  # its sentinel is ready: it has ended, join reaps it and sets exitcode
            failure = read_reports()  # its own report, if it made one before it ended
            if failure is not None:
                return failure
            if rank not in finished:
                return "error", (None, None, f"{process.name} ended with exit code {process.exitcode} before it "
                                            f"finished (a negative code is the signal that ended it)")
    return "result", result


def _rank_main(rank: int, size: int, store: str, target: Callable, args: Sequence, results) -> None:
    _die_with_parent()
    from stable_md._threads import limit_threads

    limit_threads()
    try:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
        value = target(*args)
        torch.distributed.barrier()  # every rank done before any tears its connections down
        # plain pickle bytes: torch's queue pickler would pass tensors as shared memory, gone once the rank exits
        results.put(("result", rank, pickle.dumps(value) if rank == 0 else None))
    except BaseException as error:  # reported to the launcher, which stops the other ranks
        passed, message = _passable(error)
        results.put(("error", rank, (passed, message, f"rank {rank}: " + traceback.format_exc())))
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # the work is done and reported; a failing teardown changes nothing
        pass
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() == 1:  # the parent died before the request was made
        os._exit(1)
