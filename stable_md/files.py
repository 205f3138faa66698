"""Small file helpers every workflow uses: atomic writes, JSON, checkpoints, logs, content hashes, run directories.

Nothing a user made is ever left half-written: every file goes to a temporary next to its
target and is renamed onto it (:func:`atomic_write`).
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A process killed mid-write leaves its temporary behind; the next write of the same file removes it.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes the file private (0600); give it the permissions an ordinary new file gets.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(path: Path, what: str, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, with any failure (truncated, not ours, missing entries) reported as a ValueError that
    names the file: ``what`` says whose checkpoint it is (e.g. "pretrain")."""
    try:
        return read(path)
    except Exception as error:
        raise ValueError(f"{path}: cannot read the {what} checkpoint; it is damaged (e.g. truncated) or was not "
                         f"written by stable-md ({type(error).__name__}: {error}). Delete it to start over, or "
                         f"rerun with --overwrite") from error


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON atomically (numpy scalars and arrays become numbers and lists)."""
    text = json.dumps(payload, indent=1, default=json_default)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text + "\n"))


def json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def truncate_jsonl_log(path: Path, last_epoch: int) -> None:
    """Drop log rows of epochs after the checkpoint (a run killed between log and checkpoint)."""
    path = Path(path)
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("epoch", 0) <= last_epoch]
    if len(kept) != len(rows):
        atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: what identifies a model file whatever path or working directory names it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RunLayout:
    """What a command writes into a run directory, and when that directory may take a new run.

    A run has started there when one of ``started_by`` exists (a folder: when it holds a
    file), so the files of a start that failed before its first checkpoint count as no run and
    are cleared without --overwrite. Nothing is touched until :meth:`clear`, so every input
    can be checked before the first write.
    """

    what: str  # "a refine run", "an evaluation": for messages
    files: tuple[str, ...]  # the files (or folders of files) the command writes, by name
    started_by: tuple[str, ...]  # names or glob patterns of those whose presence means a run started
    resume_from: str  # the file (or folder) ``--resume`` continues from
    patterns: tuple[str, ...] = ()  # further files the command writes, as glob patterns
    resume_verb: str = "continue it"
    folder_files: str = "*.json"  # what the command writes into a folder of ``files`` (only those are cleared)

    def prepare(self, directory: Path, overwrite: bool, resume: bool) -> list[Path]:
        """Check that ``directory`` may take a run (``resume``: continue the one there); return what :meth:`clear`
        removes before a new run."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory; choose another output")
        if resume:
            if not (directory / self.resume_from).exists():
                raise FileNotFoundError(f"cannot resume: {directory / self.resume_from} does not exist, so {directory} "
                                        f"holds no {self.what.split(' ', 1)[1]} to resume")
            return []
        existing = [path for path in self.existing(directory)]
        started = [path for path in existing if any(fnmatch.fnmatch(path.name, name) for name in self.started_by)
                   and (not path.is_dir() or any(path.glob(self.folder_files)))]
        if started and not overwrite:
            raise FileExistsError(f"{directory} already holds {self.what} ({started[0].name}, ...); pass --overwrite "
                                  f"to replace it or --resume to {self.resume_verb}")
        return existing

    def existing(self, directory: Path) -> list[Path]:
        """The command's files now in ``directory``, in the order of ``files``, then the patterns' matches."""
        directory = Path(directory)
        if not directory.is_dir():
            return []
        named = [directory / name for name in self.files if (directory / name).exists()]
        return named + [path for pattern in self.patterns for path in sorted(directory.glob(pattern))]

    def clear(self, paths: list[Path]) -> None:
        """Delete ``paths`` (:meth:`prepare`'s list): files, and folders with the files the command put there (a
        folder holding anything else is refused, naming it, before anything is deleted)."""
        for path in paths:
            strangers = [child for child in path.iterdir() if not child.match(self.folder_files)] \
                if path.is_dir() else []
            if strangers:
                raise FileExistsError(f"{path} holds files stable-md did not write ({strangers[0].name}, ...); "
                                      f"move them or choose another output")
        for path in paths:
            if path.is_dir():
                for child in path.glob(self.folder_files):
                    child.unlink()
                path.rmdir()
            elif path.exists():
                path.unlink()
