"""Tests of the GFN2-xTB reference data generator and of the committed data set.

Real tblite and RDKit runs (no mocks), on water so that the whole file stays
well under a minute on one core.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import ase.io
import numpy as np
import pytest

from stable_md.units import KB_EV_PER_K

DATA_FILE = Path(__file__).resolve().parents[1] / "data" / "ethanol_xtb_500K.extxyz"

needs_xtb = pytest.mark.skipif(
    importlib.util.find_spec("tblite") is None or importlib.util.find_spec("rdkit") is None,
    reason="needs the [xtb] extra (tblite, rdkit)",
)

# Short but real MD: 5 frames, 2 steps apart, after 10 equilibration steps.
SHORT = dict(temperature_K=500.0, n_frames=5, every=2, equilibration_steps=10, seed=3, progress=False)


def _frame_blocks(text: str) -> list[str]:
    """Split extxyz text into the text of each frame."""
    lines = text.splitlines(keepends=True)
    blocks, i = [], 0
    while i < len(lines):
        n = int(lines[i])
        blocks.append("".join(lines[i : i + n + 2]))
        i += n + 2
    return blocks


@pytest.fixture(scope="module")
def water():
    from stable_md.refdata.xtb_md import molecule_from_smiles

    return molecule_from_smiles("O", seed=0)


@pytest.fixture(scope="module")
def short_run(water, tmp_path_factory) -> Path:
    from stable_md.refdata.xtb_md import run_xtb_md

    path = tmp_path_factory.mktemp("xtb") / "water.extxyz"
    assert run_xtb_md(water, path, **SHORT) == path
    return path


@needs_xtb
def test_molecule_from_smiles_builds_hydrogens_and_charge():
    from stable_md.refdata.xtb_md import molecule_from_smiles

    ethanol = molecule_from_smiles("CCO")
    assert ethanol.get_chemical_formula() == "C2H6O"
    assert not ethanol.pbc.any()
    d = ethanol.get_all_distances()
    assert 1.45 < d[0, 1] < 1.60  # C-C single bond after MMFF, Å
    ammonium = molecule_from_smiles("[NH4+]")
    assert ammonium.get_initial_charges().sum() == pytest.approx(1.0)


@needs_xtb
@pytest.mark.parametrize("smiles", ["C1CC", "not a molecule", "Xx"])
def test_bad_smiles_raises_naming_it(smiles):
    from stable_md.refdata.xtb_md import molecule_from_smiles

    with pytest.raises(ValueError, match=re.escape(repr(smiles))):
        molecule_from_smiles(smiles)


@needs_xtb
def test_frames_are_readable_with_energy_forces_momenta(short_run, water):
    frames = ase.io.read(short_run, ":")
    assert len(frames) == SHORT["n_frames"]
    for k, frame in enumerate(frames, start=1):
        assert frame.get_chemical_symbols() == water.get_chemical_symbols()
        energy = frame.get_potential_energy()
        forces = frame.get_forces()
        assert np.isfinite(energy)
        assert forces.shape == (len(water), 3) and np.all(np.isfinite(forces))
        assert frame.get_momenta().shape == (len(water), 3)
        assert frame.info["md_step"] == k * SHORT["every"]
        assert frame.info["md_temperature_K"] == SHORT["temperature_K"]
    # The molecule moves between frames, and stays a molecule (O-H in Å).
    assert not np.allclose(frames[0].positions, frames[-1].positions)
    oh = np.array([f.get_distances(0, [1, 2]) for f in frames])
    assert np.all((oh > 0.8) & (oh < 1.3))


@needs_xtb
def test_stored_energy_forces_match_fresh_single_point(short_run):
    from tblite.ase import TBLite

    for frame in ase.io.read(short_run, ":"):
        fresh = frame.copy()
        fresh.calc = TBLite(method="GFN2-xTB", verbosity=0)
        # The file holds forces to 1e-8 eV/Å and positions to 1e-8 Å.
        assert fresh.get_potential_energy() == pytest.approx(frame.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(fresh.get_forces(), frame.get_forces(), atol=1e-6)


@needs_xtb
@pytest.mark.parametrize("cut", ["mid_line", "line_boundary", "count_line"])
def test_killed_run_resumes_same_trajectory(short_run, water, tmp_path, cut):
    from stable_md.refdata.xtb_md import run_xtb_md

    full = short_run.read_text()
    blocks = _frame_blocks(full)
    kept = "".join(blocks[:2])
    partial = {
        "mid_line": blocks[2][: len(blocks[2]) // 2],  # cut inside an atom line
        "line_boundary": "".join(blocks[2].splitlines(keepends=True)[:3]),  # whole lines, too few
        "count_line": blocks[2][:1],  # only the start of the atom-count line
    }[cut]
    path = tmp_path / "killed.extxyz"
    path.write_text(kept + partial)

    with pytest.warns(RuntimeWarning, match="incomplete last frame"):
        run_xtb_md(water, path, **SHORT)

    resumed = path.read_text()
    assert resumed.startswith(kept)  # earlier frames untouched
    frames = ase.io.read(path, ":")
    assert len(frames) == SHORT["n_frames"]
    reference = ase.io.read(short_run, ":")
    for a, b in zip(frames, reference):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-6)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), atol=1e-5)
    assert not list(tmp_path.glob("*.tmp"))


@needs_xtb
def test_resume_extends_and_is_noop_when_complete(short_run, water, tmp_path):
    from stable_md.refdata.xtb_md import run_xtb_md

    path = tmp_path / "more.extxyz"
    shutil.copy(short_run, path)
    before = path.read_text()
    run_xtb_md(water, path, **SHORT)  # already has n_frames: nothing to do
    assert path.read_text() == before
    run_xtb_md(water, path, **{**SHORT, "n_frames": 7})
    frames = ase.io.read(path, ":")
    assert len(frames) == 7
    assert path.read_text().startswith(before)
    assert [f.info["md_step"] for f in frames] == [2 * k for k in range(1, 8)]


@needs_xtb
def test_no_resume_refuses_existing_file(short_run, water):
    from stable_md.refdata.xtb_md import run_xtb_md

    before = short_run.read_text()
    with pytest.raises(FileExistsError, match=re.escape(str(short_run))):
        run_xtb_md(water, short_run, **SHORT, resume=False)
    assert short_run.read_text() == before


@needs_xtb
def test_resume_with_other_settings_or_atoms_is_refused(short_run, tmp_path):
    from stable_md.refdata.xtb_md import molecule_from_smiles, run_xtb_md

    path = tmp_path / "other.extxyz"
    shutil.copy(short_run, path)
    with pytest.raises(ValueError, match="md_temperature_K"):
        run_xtb_md(molecule_from_smiles("O"), path, **{**SHORT, "temperature_K": 300.0, "n_frames": 6})
    with pytest.raises(ValueError, match="other.extxyz"):
        run_xtb_md(molecule_from_smiles("C"), path, **{**SHORT, "n_frames": 6})
    path.write_text("this is not\nan xyz file\nat all\n")
    with pytest.raises(ValueError, match="other.extxyz"):
        run_xtb_md(molecule_from_smiles("O"), path, **SHORT)


@needs_xtb
def test_cli_writes_frames_and_names_bad_input(tmp_path, capsys):
    from stable_md.cli import main as stable_md_main
    from stable_md.refdata.xtb_md import main

    out = tmp_path / "cli.extxyz"
    args = ["--smiles", "O", "-o", str(out), "--frames", "2", "--every", "2", "--equilibration", "4", "--quiet"]
    assert stable_md_main(["data", "xtb-md"] + args) == 0
    assert len(ase.io.read(out, ":")) == 2
    # friction is 1/ps as in every command (issue 12 row 19): the default 10/ps is the 0.01/fs recorded before
    assert ase.io.read(out, 0).info["md_friction_per_fs"] == 0.01
    slow = tmp_path / "slow.extxyz"
    assert stable_md_main(["data", "xtb-md", "--smiles", "O", "-o", str(slow), "--frames", "1", "--every", "2",
                           "--equilibration", "0", "--quiet", "--friction", "0.01"]) == 0
    assert "--friction 0.01 is in 1/ps (a coupling time of 100 ps)" in capsys.readouterr().err
    assert ase.io.read(slow, 0).info["md_friction_per_fs"] == pytest.approx(1e-5)
    assert main(args + ["--no-resume"]) == 1
    assert str(out) in capsys.readouterr().err
    assert stable_md_main(["data", "xtb-md", "--smiles", "C1CC", "-o", str(tmp_path / "x.extxyz")]) == 2
    assert "--smiles" in capsys.readouterr().err
    assert main(["--structure", str(tmp_path / "missing.xyz"), "-o", str(tmp_path / "x.extxyz")]) == 1
    assert "missing.xyz" in capsys.readouterr().err
    assert stable_md_main(["data", "xtb-md", "--smiles", "O", "-o", str(tmp_path / "y.extxyz"),
                           "--every", "0"]) == 2
    assert "--every must be >= 1" in capsys.readouterr().err
    for command in (["data", "xtb-md", "--smiles", "O"], ["data", "water"]):
        assert stable_md_main(command + ["-o", str(tmp_path / "frames.npz")]) == 2
        assert "the generator writes extended XYZ; name the output .extxyz or .xyz" in capsys.readouterr().err
        assert not (tmp_path / "frames.npz").exists()


def test_committed_ethanol_data_set():
    frames = ase.io.read(DATA_FILE, ":")
    assert len(frames) == 500
    energies = np.array([f.get_potential_energy() for f in frames])
    forces = np.array([f.get_forces() for f in frames])
    assert forces.shape == (500, 9, 3)
    assert np.all(np.isfinite(energies)) and np.all(np.isfinite(forces))
    assert all(f.get_chemical_formula() == "C2H6O" for f in frames)
    assert frames[0].info["md_temperature_K"] == 500.0
    # Kinetic temperature with the 3 centre-of-mass degrees of freedom removed:
    # a thermostat that overheats the molecule would show here.
    n_dof = 3 * 9 - 3
    t_kin = np.array([2 * f.get_kinetic_energy() / (n_dof * KB_EV_PER_K) for f in frames])
    assert 430.0 < t_kin.mean() < 580.0


@needs_xtb
def test_charged_molecule_keeps_its_charge(tmp_path):
    from tblite.ase import TBLite

    from stable_md.refdata.xtb_md import molecule_from_smiles, run_xtb_md

    path = run_xtb_md(molecule_from_smiles("[NH4+]"), tmp_path / "nh4.extxyz", **{**SHORT, "n_frames": 1})
    frame = ase.io.read(path)
    assert frame.get_initial_charges().sum() == pytest.approx(1.0)
    fresh = frame.copy()
    fresh.calc = TBLite(method="GFN2-xTB", charge=1, verbosity=0)
    assert fresh.get_potential_energy() == pytest.approx(frame.get_potential_energy(), abs=1e-6)
