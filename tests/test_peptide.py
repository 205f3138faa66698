"""stable-md data amber-peptide (issue 15, item 3): Ac-Ala3-NHMe with L-alanines under Amber14 in OpenMM, frames
labelled in eV and eV/Å that a fresh Amber14 System agrees with, a resumable file, and bad input named."""
from __future__ import annotations

import numpy as np
import pytest

openmm = pytest.importorskip("openmm")
pytest.importorskip("rdkit")
import openmm.app as app  # noqa: E402
import openmm.unit as unit  # noqa: E402

from openmm_bridge.peptide import PeptideSimulation  # noqa: E402
from stable_md.cli import main  # noqa: E402
from stable_md.data import load_dataset  # noqa: E402
from stable_md.refdata.peptide_md import capped_alanine_heavy_atoms, run_peptide_md  # noqa: E402
from stable_md.units import EV_IN_KJ_PER_MOL  # noqa: E402

SMALL = dict(n_frames=6, every=50, equilibration_steps=500, progress=False)


@pytest.fixture(scope="module")
def peptide_file(tmp_path_factory):
    return run_peptide_md(tmp_path_factory.mktemp("peptide") / "peptide.extxyz", **SMALL)


def _handedness(positions: np.ndarray, topology: app.Topology) -> list[float]:
    """Signed volume (N − CA)·((C − CA) × (CB − CA)) of each alanine, Å³."""
    volumes = []
    for residue in topology.residues():
        if residue.name != "ALA":
            continue
        index = {atom.name: atom.index for atom in residue.atoms()}
        n, ca, c, cb = (positions[index[name]] for name in ("N", "CA", "C", "CB"))
        volumes.append(float(np.dot(n - ca, np.cross(c - ca, cb - ca))))
    return volumes


def _l_alanine_sign() -> float:
    """The signed volume's sign of L-alanine (CIP S), from RDKit's own embedding of its SMILES."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    molecule = Chem.AddHs(Chem.MolFromSmiles("N[C@@H](C)C(=O)O"))
    assert Chem.FindMolChiralCenters(molecule) == [(1, "S")]
    AllChem.EmbedMolecule(molecule, randomSeed=1)
    x = molecule.GetConformer().GetPositions()
    n, ca, cb, c = x[0], x[1], x[2], x[3]
    return float(np.sign(np.dot(n - ca, np.cross(c - ca, cb - ca))))


def test_the_peptide_is_ac_ala3_nhme_with_l_alanines_throughout_the_run(peptide_file):
    data = load_dataset(peptide_file)
    assert len(data) == 6 and data.n_atoms == 42 and not data.periodic
    counts = {z: int((data.numbers == z).sum()) for z in (1, 6, 7, 8)}
    assert counts == {1: 22, 6: 12, 7: 4, 8: 4}  # C12H22N4O4
    simulation = PeptideSimulation(capped_alanine_heavy_atoms(3, 0), "vacuum", 500.0, 0.5, 1.0, 0)
    assert [r.name for r in simulation.topology.residues()] == ["ACE", "ALA", "ALA", "ALA", "NME"]
    sign = _l_alanine_sign()
    for frame in data.positions:
        volumes = _handedness(frame, simulation.topology)
        assert len(volumes) == 3 and all(np.sign(v) == sign for v in volumes), volumes
    np.testing.assert_allclose(data.times_fs, np.arange(1, 7) * 50 * 0.5)


def test_frames_are_labelled_in_ev_as_a_fresh_amber14_system_says(peptide_file):
    data = load_dataset(peptide_file)
    simulation = PeptideSimulation(capped_alanine_heavy_atoms(3, 0), "vacuum", 500.0, 0.5, 1.0, 0)
    forcefield = app.ForceField("amber14-all.xml")
    system = forcefield.createSystem(simulation.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    context = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName("Reference"))
    frame = data.positions[3]

    def energy(positions: np.ndarray) -> float:
        context.setPositions(positions * 0.1 * unit.nanometer)
        return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) \
            / EV_IN_KJ_PER_MOL

    # the xyz file rounds positions to 1e-8 Å: energies agree to that rounding
    assert data.energies[3] == pytest.approx(energy(frame), abs=1e-4)
    # the forces are minus the gradient of those energies (central differences, eV/Å)
    h = 1e-4
    for atom, axis in ((0, 0), (9, 1), (30, 2)):
        plus, minus = frame.copy(), frame.copy()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        assert data.forces[3, atom, axis] == pytest.approx(-(energy(plus) - energy(minus)) / (2 * h), abs=2e-3)


def test_implicit_solvent_changes_the_energy_not_the_atoms(tmp_path, peptide_file):
    solvated = load_dataset(run_peptide_md(tmp_path / "obc2.extxyz", solvent="obc2", **{**SMALL, "n_frames": 1}))
    vacuum = load_dataset(peptide_file)
    assert np.array_equal(solvated.numbers, vacuum.numbers)
    # OBC2 solvation of a polar peptide lowers the energy by several eV
    assert solvated.energies[0] < vacuum.energies.mean() - 1.0


def test_a_run_extends_its_own_trajectory_and_refuses_other_settings(tmp_path):
    path = tmp_path / "p.extxyz"
    run_peptide_md(path, **{**SMALL, "n_frames": 3})
    before = path.read_text()
    run_peptide_md(path, **{**SMALL, "n_frames": 5})
    assert path.read_text().startswith(before) and len(load_dataset(path)) == 5
    with pytest.raises(ValueError, match="peptide_solvent=vacuum, this run asks for peptide_solvent=obc2"):
        run_peptide_md(path, solvent="obc2", **{**SMALL, "n_frames": 8})
    with pytest.raises(ValueError, match="holds other atoms than Ac-\\(Ala\\)2-NHMe"):
        run_peptide_md(path, n_alanines=2, **{**SMALL, "n_frames": 8})


def test_the_command_line_makes_and_names(tmp_path, capsys):
    output = tmp_path / "peptide.extxyz"
    assert main(["data", "amber-peptide", "-o", str(output), "--frames", "2", "--every", "20", "--equilibration",
                 "100", "--quiet"]) == 0
    assert len(load_dataset(output)) == 2
    assert main(["data", "amber-peptide", "-o", str(tmp_path / "p.npz"), "--frames", "2", "--quiet"]) == 2
    assert "-o" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:  # argparse's own refusal of a choice, exit code 2
        main(["data", "amber-peptide", "-o", str(tmp_path / "q.extxyz"), "--solvent", "water"])
    assert caught.value.code == 2 and "invalid choice: 'water'" in capsys.readouterr().err


def test_the_same_command_writes_the_same_file(tmp_path, peptide_file):
    """Modeller places hydrogens from Python's global random stream: the generator seeds it, and leaves the
    caller's stream as it was."""
    import random

    random.seed(123)
    expected = random.random()
    random.seed(123)
    again = run_peptide_md(tmp_path / "again.extxyz", **SMALL)
    assert again.read_bytes() == peptide_file.read_bytes()
    assert random.random() == expected
