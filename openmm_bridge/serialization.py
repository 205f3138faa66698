"""Save and load Systems that contain a stable-md PythonForce, without OpenMM's segfault.

OpenMM stores a PythonForce's computation as a hex-encoded pickle in the XML. If the
module that pickle refers to cannot be imported, ``XmlSerializer.deserialize`` crashes
the interpreter instead of raising. :func:`load_system` therefore unpickles every
PythonForce function in Python first (which imports its modules and, for
:class:`~openmm_bridge.forces.ModelCallback`, checks that the model file exists) and
only then hands the XML to OpenMM.

Unpickling runs code named in the file: load only XML files you trust, as with any
pickle (OpenMM itself would run the same code).
"""
from __future__ import annotations

import os
import pickle
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import openmm

from stable_md.potentials.model_file import atomic_write


def save_system(system: openmm.System, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``system`` as OpenMM XML atomically; refuses to replace ``path`` unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (pass overwrite=True)")
    try:
        text = openmm.XmlSerializer.serialize(system)
    except openmm.OpenMMException as error:
        if "pickle" not in str(error):
            raise
        # OpenMM hides the pickling error; the usual cause with stable-md is an in-memory model.
        raise ValueError(
            f"cannot serialize the System for {path}: a PythonForce's function cannot be pickled ({error}). "
            "A stable-md force pickles as the path of its model file: build it from a saved model file "
            "(ModelCallback('model.pt', ...)), not from an in-memory module") from error
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def check_python_forces(xml_text: str, source: str = "<xml>") -> int:
    """Unpickle every PythonForce function in ``xml_text`` in Python; return how many there are.

    Raises ``ValueError`` naming ``source`` and the cause when one cannot be restored
    (missing module, missing model file, corrupt data), instead of letting OpenMM crash.
    """
    try:
        root = ElementTree.fromstring(xml_text)
    except ElementTree.ParseError as error:
        raise ValueError(f"{source}: not valid OpenMM XML ({error})") from error
    count = 0
    for element in root.iter("Force"):
        if element.get("type") != "PythonForce":
            continue
        count += 1
        encoded = element.get("function")
        if encoded is None:
            raise ValueError(f"{source}: PythonForce {count} has no 'function' attribute")
        try:
            payload = bytes.fromhex(encoded)
        except ValueError as error:
            raise ValueError(f"{source}: PythonForce {count} function is not hex-encoded data") from error
        try:
            pickle.loads(payload)
        except ModuleNotFoundError as error:
            raise ValueError(
                f"{source}: PythonForce {count} needs the Python module {error.name!r}, which does not import "
                f"here; install it (for stable-md forces: pip install stable-md) before loading this System"
            ) from error
        except Exception as error:
            raise ValueError(f"{source}: PythonForce {count} cannot be restored: {error}") from error
    return count


def load_system(path: str | os.PathLike) -> openmm.System:
    """Read an OpenMM System XML file, checking its PythonForces first (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"System file {path} does not exist")
    text = path.read_text()
    check_python_forces(text, source=str(path))
    return openmm.XmlSerializer.deserialize(text)
