"""How replicas are simulated: one list of MD options shared by refine, evaluate and simulate.

``MDSettings`` is embedded in each command's settings (``RefineSettings.md``, ...), the CLI
adds its options with one helper, and :meth:`openmm_bridge.replicas.ReplicaSet.from_settings`
builds replicas from it, so a name or default is written once. This module imports no
OpenMM, so settings can be made and checked where OpenMM is not installed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

import numpy as np

INTEGRATORS = ("langevin", "nose-hoover", "verlet")
MODES = ("batched", "per-replica")
PLATFORMS = ("CPU", "Reference", "CUDA", "OpenCL")


@dataclass(frozen=True)
class MDSettings:
    """The MD of a replica set. Units: K, fs, 1/ps.

    integrator: ``nose-hoover`` (one thermostat per replica), ``langevin`` (LangevinMiddle) or ``verlet`` (NVE).
    temperature: target temperature in K (and of the starting velocities).
    timestep: fs.
    friction: Langevin friction in 1/ps.
    collision_frequency: Nosé-Hoover collision frequency in 1/ps.
    seed: starting velocities and the thermostat's random stream.
    platform: OpenMM platform: CPU, Reference, CUDA or OpenCL; ``None`` (the default) matches the device:
        CUDA for a ``cuda`` device (on the same GPU), CPU otherwise.
    mode: ``batched`` (all replicas in one Context, one batched model call) or ``per-replica``.
    device: torch device of the model (``cpu``, ``cuda``, ``cuda:N``).
    """

    integrator: str = "nose-hoover"
    temperature: float = 500.0
    timestep: float = 0.5
    friction: float = 1.0
    collision_frequency: float = 10.0
    seed: int = 0
    platform: Optional[str] = None
    mode: str = "batched"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not (isinstance(self.device, str) and self.device):
            raise ValueError(f"device must name a torch device (cpu, cuda, cuda:N), got {self.device!r}")
        if self.platform is None:  # a frozen dataclass: the resolved name is what records and resumes compare
            object.__setattr__(self, "platform", platform_for_device(self.device))
        if self.integrator not in INTEGRATORS:
            raise ValueError(f"unknown integrator {self.integrator!r}; expected one of {list(INTEGRATORS)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown replica mode {self.mode!r}; expected one of {list(MODES)}")
        if self.platform not in PLATFORMS:
            raise ValueError(f"unknown OpenMM platform {self.platform!r}; expected one of {list(PLATFORMS)}")
        for name in ("temperature", "timestep", "friction", "collision_frequency"):
            value = getattr(self, name)
            try:
                positive = 0 < float(value) < float("inf")
            except (TypeError, ValueError):
                positive = False
            if not positive:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def with_changes(self, **changes: Any) -> "MDSettings":
        """A copy with some fields changed; a new device brings its platform when the platform was the old
        device's match (an explicitly chosen other platform is kept)."""
        if "device" in changes and "platform" not in changes and self.platform == platform_for_device(self.device):
            changes["platform"] = None
        return replace(self, **changes)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, values: dict) -> "MDSettings":
        """The MD fields of ``values`` (other keys ignored)."""
        return cls(**{name: values[name] for name in cls.names() if name in values})


# What the MD fields records had no place for before were in effect then (runs and evaluations written before the
# field was kept resume with these values).
RECORDED_BEFORE = {"platform": "CPU", "mode": "batched"}


def platform_for_device(device: str) -> str:
    """The OpenMM platform that matches a torch device: CUDA for ``cuda``/``cuda:N``, CPU otherwise."""
    return "CUDA" if device.split(":", 1)[0] == "cuda" else "CPU"


def flat_record(settings: Any) -> dict:
    """``asdict(settings)`` with its ``md`` fields at the top level: the layout settings.json files have had
    since before MDSettings, so runs and evaluations written then still resume."""
    record = asdict(settings)
    md = record.pop("md", None) or {}
    return {**record, **md}


def same_environment(saved: Optional[dict], new: Optional[dict]) -> bool:
    """Whether two records of MM surroundings (``MMEnvironment.record()``, or None for none) are the same: the
    same file contents and model atoms, wherever the files now lie."""
    def essence(record: Optional[dict]) -> Optional[dict]:
        return None if record is None else {k: v for k, v in record.items() if k != "environment"}

    return essence(saved) == essence(new)
