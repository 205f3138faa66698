"""Which torch device a command's model runs on: checked before any work, one GPU per rank.

``--device`` takes ``cpu``, ``cuda`` or ``cuda:N``. With several ranks (``--nproc`` or
torchrun), ``cuda`` gives each rank on a node its own GPU, ``cuda:<local rank>`` (ranks beyond
the node's GPU count share them round-robin), while ``cuda:N`` puts every rank on GPU N.
"""
from __future__ import annotations

import os

import torch

DEVICE_TYPES = ("cpu", "cuda")


def check_device(name: str, option: str = "--device") -> torch.device:
    """``name`` as a torch device this machine has, or a ValueError naming ``option`` and what was expected."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{option} {name!r} is not a torch device (expected cpu, cuda or cuda:N)") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{option} {name}: stable-md runs models on cpu or cuda (cuda:N), got device type "
                         f"{device.type!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {name}: torch {torch.__version__} sees no CUDA device on this machine; "
                             f"use {option} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{option} {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def rank_device(name: str, local_rank: int, gpus: int) -> str:
    """The device of the rank ``local_rank`` of a node with ``gpus`` CUDA devices, for the command's ``name``:
    ``cuda`` becomes that rank's own GPU; ``cpu`` and ``cuda:N`` are every rank's."""
    device = torch.device(name)
    if device.type != "cuda" or device.index is not None:
        return name
    if gpus < 1:
        raise ValueError(f"--device {name}: no CUDA device on this node")
    return f"cuda:{local_rank % gpus}"


def local_rank(rank: int) -> int:
    """This process's rank among the ranks on its node: torchrun's LOCAL_RANK, else ``rank`` (the ranks
    ``--nproc`` starts all share one node)."""
    from stable_md.distributed import started_by_torchrun

    return int(os.environ.get("LOCAL_RANK", rank)) if started_by_torchrun() else rank


def this_rank_device(name: str, rank: int) -> str:
    """:func:`rank_device` for the calling process (rank ``rank`` of its group)."""
    if torch.device(name).type != "cuda":
        return name
    return rank_device(name, local_rank(rank), torch.cuda.device_count())
