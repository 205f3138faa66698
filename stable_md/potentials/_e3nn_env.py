"""Import mace, e3nn and nequip once, cleanly, with the traps measured here handled.

* e3nn 0.4.4 loads its constants with ``torch.load`` under torch >= 2.6's
  weights-only default, which rejects ``slice``: allow-list it first.
* importing mace sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole
  process, silently disabling safe loading for every later ``torch.load``:
  the variable is restored right after the import.
* nequip and mace print warnings and notices on import that our users did not
  ask for: they are silenced during the import only.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from types import ModuleType

import torch

_FLAG = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def _quiet_import():
    saved = os.environ.get(_FLAG)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(_FLAG, None)
            else:
                os.environ[_FLAG] = saved


def _allow_slice() -> None:
    torch.serialization.add_safe_globals([slice])


def import_mace() -> ModuleType:
    """``mace.modules``, imported before e3nn, leaving the environment as it was."""
    _allow_slice()
    with _quiet_import():
        import mace.modules  # noqa: F401  (mace must come before e3nn)
        import mace.tools  # noqa: F401
    import mace.modules as modules

    return modules


def import_e3nn_jit() -> ModuleType:
    """``e3nn.util.jit`` (its ``script`` compiles e3nn modules), imported safely."""
    import_mace_if_available()
    with _quiet_import():
        import e3nn.util.jit  # noqa: F401
    import e3nn.util.jit as jit

    return jit


def import_nequip() -> ModuleType:
    """The ``nequip`` package, imported quietly after mace/e3nn are set up."""
    import_mace_if_available()
    with _quiet_import():
        import nequip.model  # noqa: F401
        import nequip.data  # noqa: F401
    import nequip

    return nequip


def import_mace_if_available() -> None:
    """Import mace first when it is installed, so later e3nn imports see a consistent state."""
    _allow_slice()
    try:
        import_mace()
    except ImportError:
        pass
