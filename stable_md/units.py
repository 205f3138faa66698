"""The one place for units.

Inside stable-md everything is in Å, eV, fs and amu (atomic mass units).
OpenMM works in nm, kJ/mol and ps; MD17-style ``.npz`` files store kcal/mol.
Every conversion in the package goes through the constants below.
"""
from __future__ import annotations

# Boltzmann constant in eV/K (CODATA 2018).
KB_EV_PER_K: float = 8.617333262e-5
# 1 kcal/mol in eV.
KCAL_PER_MOL_IN_EV: float = 0.0433641043
# 1 kJ/mol in eV.
KJ_PER_MOL_IN_EV: float = 0.0103642688
# 1 Hartree in eV.
HARTREE_IN_EV: float = 27.211386245988
# 1 Bohr in Å.
BOHR_IN_ANGSTROM: float = 0.529177210903
# 1 nm in Å.
NM_IN_ANGSTROM: float = 10.0
# 1 ps in fs.
PS_IN_FS: float = 1000.0

# Energy units a user may name (``--units``) with their value in eV.
ENERGY_UNITS_IN_EV: dict[str, float] = {
    "eV": 1.0,
    "meV": 1e-3,
    "kcal/mol": KCAL_PER_MOL_IN_EV,
    "kJ/mol": KJ_PER_MOL_IN_EV,
    "Hartree": HARTREE_IN_EV,
    "Ha": HARTREE_IN_EV,
}
# Length units a user may name with their value in Å.
LENGTH_UNITS_IN_ANGSTROM: dict[str, float] = {
    "Angstrom": 1.0,
    "Å": 1.0,
    "A": 1.0,
    "nm": NM_IN_ANGSTROM,
    "Bohr": BOHR_IN_ANGSTROM,
}


def kT_eV(temperature_K: float) -> float:
    """Thermal energy k_B T in eV at ``temperature_K`` kelvin."""
    return KB_EV_PER_K * float(temperature_K)


def energy_factor(unit: str) -> float:
    """Factor that converts energies given in ``unit`` to eV.

    Raises ``ValueError`` naming the accepted units when ``unit`` is unknown.
    """
    try:
        return ENERGY_UNITS_IN_EV[unit]
    except KeyError:
        raise ValueError(
            f"unknown energy unit {unit!r}; expected one of {sorted(ENERGY_UNITS_IN_EV)}"
        ) from None


def length_factor(unit: str) -> float:
    """Factor that converts lengths given in ``unit`` to Å."""
    try:
        return LENGTH_UNITS_IN_ANGSTROM[unit]
    except KeyError:
        raise ValueError(
            f"unknown length unit {unit!r}; expected one of {sorted(LENGTH_UNITS_IN_ANGSTROM)}"
        ) from None


# OpenMM's units, for the one edge where they are needed (openmm_bridge).
# 1 eV in kJ/mol.
EV_IN_KJ_PER_MOL: float = 1.0 / KJ_PER_MOL_IN_EV
# Forces: 1 eV/Å in kJ/mol/nm.
EV_PER_ANGSTROM_IN_KJ_PER_MOL_NM: float = EV_IN_KJ_PER_MOL * NM_IN_ANGSTROM
# Velocities: 1 Å/fs in nm/ps.
ANGSTROM_PER_FS_IN_NM_PER_PS: float = PS_IN_FS / NM_IN_ANGSTROM
# Boltzmann constant in kJ/mol/K.
KB_KJ_PER_MOL_K: float = KB_EV_PER_K * EV_IN_KJ_PER_MOL


def parse_time_fs(text: str | float, default_unit: str = "ps") -> float:
    """A duration such as ``"10ps"``, ``"500 fs"``, ``"1ns"`` or ``2.5`` in fs.

    A bare number is read in ``default_unit``. Raises ``ValueError`` naming the
    accepted units for anything else.
    """
    factors = {"fs": 1.0, "ps": PS_IN_FS, "ns": 1e6}
    if isinstance(text, (int, float)):
        value, unit = float(text), default_unit
    else:
        stripped = str(text).strip()
        unit = default_unit
        for name in factors:
            if stripped.endswith(name):
                stripped, unit = stripped[: -len(name)].strip(), name
                break
        try:
            value = float(stripped)
        except ValueError:
            raise ValueError(
                f"cannot read {text!r} as a time; expected a number with fs, ps or ns, e.g. 10ps"
            ) from None
    if unit not in factors:
        raise ValueError(f"unknown time unit {unit!r}; expected one of {sorted(factors)}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"time {text!r} must be a positive finite duration")
    return value * factors[unit]
