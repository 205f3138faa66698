"""OpenMM integrators for replica sets: Langevin, Nosé-Hoover with one thermostat per replica, Verlet.

A single Nosé-Hoover thermostat (or a CMMotionRemover) over all replicas would couple
them: one hot replica would cool the others. Each replica therefore gets its own
subsystem thermostat.

OpenMM counts 3n degrees of freedom for a subsystem thermostat of n atoms. A replica
whose centre-of-mass momentum is zero and conserved (our forces have zero net force)
has only 3n - 3, so the thermostat is asked for T (3n - 3) / (3n): the internal
temperature, which is what :func:`replica_temperatures` reports, then equals T.
"""
from __future__ import annotations

from typing import Optional, Sequence

import openmm

from openmm_bridge.md_settings import MDSettings
from stable_md.units import PS_IN_FS


# Beads per Nosé-Hoover chain.
CHAIN_LENGTH = 3


def openmm_seed(seed: int, salt: int = 0) -> int:
    """A seed OpenMM will use as given: OpenMM treats 0 as 'pick one at random'."""
    return (int(seed) * 1_000_003 + int(salt)) % 2_147_483_646 + 1


def thermostat_temperature(temperature: float, n_atoms: int) -> float:
    """Target for an OpenMM subsystem thermostat so that the internal temperature is ``temperature``."""
    if n_atoms < 2:
        return temperature
    return temperature * (3 * n_atoms - 3) / (3 * n_atoms)


def build_integrator(settings: MDSettings, thermostat_groups: Optional[Sequence[Sequence[int]]],
                     salt: int = 0) -> openmm.Integrator:
    """An integrator for a System whose replicas are ``thermostat_groups`` (particle indices of running replicas).

    ``thermostat_groups=None``: the System is one replica with MM surroundings; Nosé-Hoover then holds it with
    one thermostat over the whole System, whose degrees of freedom OpenMM counts (constraints, a
    CMMotionRemover). ``salt`` varies the random stream between rebuilds of the same replica set.
    """
    step_ps = settings.timestep / PS_IN_FS
    if settings.integrator == "verlet":
        return openmm.VerletIntegrator(step_ps)
    if settings.integrator == "langevin":
        integrator = openmm.LangevinMiddleIntegrator(settings.temperature, settings.friction, step_ps)
        integrator.setRandomNumberSeed(openmm_seed(settings.seed, salt))
        return integrator
    integrator = openmm.NoseHooverIntegrator(step_ps)
    if thermostat_groups is None:
        integrator.addThermostat(settings.temperature, settings.collision_frequency, CHAIN_LENGTH, 3, 7)
        return integrator
    for group in thermostat_groups:
        target = thermostat_temperature(settings.temperature, len(group))
        integrator.addSubsystemThermostat([int(i) for i in group], [], target, settings.collision_frequency,
                                          target, settings.collision_frequency, CHAIN_LENGTH, 3, 7)
    return integrator
