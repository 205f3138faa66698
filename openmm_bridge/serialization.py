"""Save and load Systems that contain a stable-md PythonForce, without OpenMM's segfault.

OpenMM stores a PythonForce's computation as a hex-encoded pickle in the XML. If the
module that pickle refers to cannot be imported, ``XmlSerializer.deserialize`` crashes
the interpreter instead of raising. :func:`load_system` therefore unpickles every
PythonForce function in Python first (which imports its modules and, for
:class:`~openmm_bridge.forces.ModelCallback`, checks that the model file exists) and
only then hands the XML to OpenMM.

Unpickling runs code named in the file, so by default only stable-md's own force
(:class:`~openmm_bridge.forces.ModelCallback`, whose state is plain numbers, strings and
the model file's path) is let through; any other PythonForce is refused unless the caller
passes ``trust_pickle=True``, as the model importers require for pickled models. OpenMM's own
``XmlSerializer.deserialize`` would run whatever the file names.
"""
from __future__ import annotations

import io
import os
import pickle
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import openmm

from stable_md.files import atomic_write


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


# The only class a stable-md force's pickle names (protocol 4: one STACK_GLOBAL, NEWOBJ, BUILD).
_OWN_FORCES = {("openmm_bridge.forces", "ModelCallback")}


class _ForeignCode(pickle.UnpicklingError):
    """A pickle names a global outside ``_OWN_FORCES``."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class _OwnForcesUnpickler(pickle.Unpickler):
    """Restores only stable-md's own forces: any other global is refused before it is imported."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _OWN_FORCES:
            raise _ForeignCode(module, name)
        return super().find_class(module, name)


def check_python_forces(xml_text: str, source: str = "<xml>", trust_pickle: bool = False) -> int:
    """Unpickle every PythonForce function in ``xml_text`` in Python; return how many there are.

    Without ``trust_pickle`` only stable-md's own force may be named; a pickle naming anything
    else is refused before any of its code is imported. Raises ``ValueError`` naming ``source``
    and the cause when a force is refused or cannot be restored (missing module, missing model
    file, corrupt data), instead of letting OpenMM run it or crash.
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
            if trust_pickle:
                pickle.loads(payload)
            else:
                _OwnForcesUnpickler(io.BytesIO(payload)).load()
        except _ForeignCode as error:
            raise ValueError(
                f"{source}: PythonForce {count} is not a stable-md force: loading it would import and run "
                f"{error.module}.{error.name}. Pass trust_pickle=True only if you trust where this file comes from "
                f"(unpickling runs the code it names)") from None
        except ModuleNotFoundError as error:
            raise ValueError(
                f"{source}: PythonForce {count} needs the Python module {error.name!r}, which does not import "
                f"here; install it (for stable-md forces: pip install stable-md) before loading this System"
            ) from error
        except Exception as error:
            raise ValueError(f"{source}: PythonForce {count} cannot be restored: {error}") from error
    return count


def load_system(path: str | os.PathLike, trust_pickle: bool = False) -> openmm.System:
    """Read an OpenMM System XML file, checking its PythonForces first (see module docstring).

    ``trust_pickle=True`` also loads PythonForces other than stable-md's own, which runs the code
    their pickles name: only for files you trust.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"System file {path} does not exist")
    text = path.read_text()
    check_python_forces(text, source=str(path), trust_pickle=trust_pickle)
    return openmm.XmlSerializer.deserialize(text)
