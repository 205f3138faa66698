"""Extended XYZ files that grow one frame at a time and survive being killed mid-write."""
from __future__ import annotations

import os
from pathlib import Path


def append_text(path: Path, text: str) -> None:
    """Append one frame with a single write and fsync, so a kill leaves at most one partial frame."""
    with open(path, "a", encoding="ascii") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` via a temporary file and rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def split_complete_frames(path: Path) -> tuple[str, bool]:
    """Return the text of the complete frames at the start of ``path``.

    Returns
    -------
    kept : str
        The file up to the end of its last complete frame.
    truncated : bool
        True when something (a frame cut off mid-write) followed it.

    A frame is complete when its atom-count line, comment line and all its atom
    lines are there, each ending in a newline. Since frames are only ever
    appended, only the tail can be incomplete; a malformed frame followed by
    more text means the file is not ours and raises ``ValueError``.
    """
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not an extended XYZ file written by stable-md data ({exc})") from exc
    lines = text.splitlines(keepends=True)
    n_kept_chars = 0
    i = 0
    while i < len(lines):
        head = lines[i]
        try:
            n_atoms = int(head)
        except ValueError:
            n_atoms = None
        rest = lines[i:]
        if n_atoms is None or n_atoms <= 0:
            # Only a cut-off count line (no newline yet) or trailing blank
            # lines may appear at the end; anything else is not our file.
            if (len(rest) == 1 and not head.endswith("\n")) or all(not s.strip() for s in rest):
                return text[:n_kept_chars], True
            raise ValueError(
                f"{path}: line {i + 1} should hold a positive atom count, found {head.strip()!r}; "
                "not an extended XYZ file written by stable-md data"
            )
        frame_lines = lines[i : i + n_atoms + 2]
        if len(frame_lines) < n_atoms + 2 or not frame_lines[-1].endswith("\n"):
            return text[:n_kept_chars], True
        n_kept_chars += sum(len(s) for s in frame_lines)
        i += n_atoms + 2
    return text, False
