"""stable-md: StABlE training for neural-network interatomic potentials.

Units inside the package: Å, eV, fs, amu (see :mod:`stable_md.units`).
"""
from __future__ import annotations

__version__ = "0.1.0"

from stable_md._threads import limit_threads as _limit_threads

_limit_threads()
