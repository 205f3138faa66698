"""One torch thread per process by default on CPU.

Measured on these 2-core machines: two threads on a shared core run 10-150x
slower than one. ``STABLE_MD_THREADS`` overrides the default.
"""
from __future__ import annotations

import os

_DONE = False


def limit_threads() -> None:
    """Set ``OMP_NUM_THREADS`` (if unset) and torch's intra-op threads to one, once."""
    global _DONE
    if _DONE:
        return
    _DONE = True
    requested = os.environ.get("STABLE_MD_THREADS")
    n_threads = int(requested) if requested else 1
    os.environ.setdefault("OMP_NUM_THREADS", str(n_threads))
    import torch

    torch.set_num_threads(n_threads)
