"""Loading, validating, splitting and saving data sets; every bad input names its problem."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from stable_md.data import DataError, Dataset, load_dataset
from stable_md.units import KCAL_PER_MOL_IN_EV


def _frames(n=6, numbers=(8, 1, 1), periodic=False, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        atoms = Atoms(numbers=list(numbers), positions=rng.normal(size=(len(numbers), 3)))
        if periodic:
            atoms.cell = np.diag([8.0, 9.0, 10.0])
            atoms.pbc = True
        atoms.calc = SinglePointCalculator(atoms, energy=-10.0 - k, forces=rng.normal(size=(len(numbers), 3)))
        frames.append(atoms)
    return frames


def test_extxyz_round_trip_keeps_everything(tmp_path):
    path = tmp_path / "frames.xyz"
    frames = _frames(periodic=True)
    write(path, frames, format="extxyz")
    data = load_dataset(path)
    assert len(data) == 6 and data.n_atoms == 3 and data.periodic and data.species == [1, 8]
    np.testing.assert_allclose(data.energies, [-10.0 - k for k in range(6)])
    np.testing.assert_allclose(data.forces[2], frames[2].get_forces(), atol=1e-7)
    np.testing.assert_allclose(data.cells[0], np.diag([8.0, 9.0, 10.0]))
    out = data.save_extxyz(tmp_path / "copy.xyz")
    again = load_dataset(out)
    np.testing.assert_allclose(again.positions, data.positions)
    np.testing.assert_allclose(again.forces, data.forces)
    with pytest.raises(FileExistsError, match="copy.xyz"):
        data.save_extxyz(out)


def test_custom_keys_and_unit_override(tmp_path):
    path = tmp_path / "ref.xyz"
    frames = _frames()
    for atoms in frames:
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces().copy()
        atoms.calc = None
    write(path, frames, format="extxyz")
    with pytest.raises(DataError, match=r"ref.xyz: frame 0 has no energy"):
        load_dataset(path)
    data = load_dataset(path, energy_key="REF_energy", forces_key="REF_forces", units="kcal/mol")
    np.testing.assert_allclose(data.energies[0], -10.0 * KCAL_PER_MOL_IN_EV)


def test_md17_npz_is_converted_from_kcal_per_mol(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "md17.npz"
    np.savez(path, R=rng.normal(size=(4, 3, 3)), z=np.array([8, 1, 1]), E=np.arange(4.0)[:, None],
             F=np.ones((4, 3, 3)))
    data = load_dataset(path)
    np.testing.assert_allclose(data.energies, np.arange(4.0) * KCAL_PER_MOL_IN_EV)
    np.testing.assert_allclose(data.forces, KCAL_PER_MOL_IN_EV)
    data_ev = load_dataset(path, units="eV")
    np.testing.assert_allclose(data_ev.forces, 1.0)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"R": np.zeros((2, 3, 3)), "z": np.array([8, 1, 1]), "E": np.zeros(2)}, r"missing key\(s\) \['F'\]"),
        ({"R": np.zeros((2, 3, 3)), "z": np.array([8, 1, 1]), "E": np.zeros(3), "F": np.zeros((2, 3, 3))},
         "R has shape"),
        ({"R": np.zeros((2, 3, 3)), "z": np.array([8, 1]), "E": np.zeros(2), "F": np.zeros((2, 3, 3))},
         "atomic numbers must have shape"),
        ({"R": np.zeros((2, 3, 3)), "z": np.array([8, 1, 1]), "E": np.array([0.0, np.nan]),
          "F": np.zeros((2, 3, 3))}, "non-finite energies in 1 frame.*frame 1"),
    ],
)
def test_bad_npz_files_name_the_problem(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(path)
    assert "bad.npz" in str(info.value)


def test_bad_xyz_files_name_the_problem(tmp_path):
    missing = tmp_path / "missing.xyz"
    with pytest.raises(FileNotFoundError, match="missing.xyz"):
        load_dataset(missing)
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.xyz: file is empty"):
        load_dataset(empty)
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is\nnot an xyz file\n")
    with pytest.raises(DataError, match="garbage.xyz: cannot be read"):
        load_dataset(garbage)

    no_forces = tmp_path / "noforces.xyz"
    frames = _frames()
    for atoms in frames:
        atoms.calc = SinglePointCalculator(atoms, energy=1.0)
    write(no_forces, frames, format="extxyz")
    with pytest.raises(DataError, match="noforces.xyz: frame 0 has no forces"):
        load_dataset(no_forces)

    mixed = tmp_path / "mixed.xyz"
    write(mixed, _frames(2) + _frames(1, numbers=(1, 8, 1)), format="extxyz")
    with pytest.raises(DataError, match="mixed.xyz: frame 2 has atoms HOH.*same atoms in the same order"):
        load_dataset(mixed)

    infinite = tmp_path / "inf.xyz"
    frames = _frames()
    frames[3].calc.results["forces"][0, 0] = np.inf
    write(infinite, frames, format="extxyz")
    with pytest.raises(DataError, match="inf.xyz: non-finite forces .* frame 3"):
        load_dataset(infinite)

    slab = tmp_path / "slab.xyz"
    frames = _frames(periodic=True)
    for atoms in frames:
        atoms.pbc = [True, True, False]
    write(slab, frames, format="extxyz")
    with pytest.raises(DataError, match="periodic along some axes only"):
        load_dataset(slab)

    with pytest.raises(ValueError, match="unknown energy unit 'kcal'"):
        load_dataset(infinite, units="kcal")


def test_splits_are_reproducible_disjoint_and_keep_source_indices():
    rng = np.random.default_rng(0)
    data = Dataset(positions=rng.normal(size=(50, 3, 3)), numbers=[8, 1, 1], energies=np.arange(50.0),
                   forces=np.zeros((50, 3, 3)), source="synthetic")
    train, val, test = data.split(30, 5, seed=4)
    train2, _, _ = data.split(30, 5, seed=4)
    other, _, _ = data.split(30, 5, seed=5)
    np.testing.assert_array_equal(train.indices, train2.indices)
    assert not np.array_equal(train.indices, other.indices)
    everything = np.concatenate([train.indices, val.indices, test.indices])
    assert len(test) == 15 and sorted(everything.tolist()) == list(range(50))
    np.testing.assert_allclose(train.energies, train.indices.astype(float))
    assert data.first(7).indices.tolist() == list(range(7))
    assert data.every(10).indices.tolist() == [0, 10, 20, 30, 40]
    assert data.every(10).subset([1, 3]).indices.tolist() == [10, 30]
    with pytest.raises(ValueError, match="cannot split 50 frames"):
        data.split(45, 10)
    with pytest.raises(ValueError, match="k must be >= 1"):
        data.every(0)


def test_convert_to_md17_npz_round_trips(tmp_path, capsys, ethanol_path):
    from stable_md.cli import main
    from stable_md.data import concatenate, load_dataset

    source = load_dataset(ethanol_path)
    out = tmp_path / "ethanol.npz"
    assert main(["data", "convert", str(ethanol_path), str(ethanol_path), "-o", str(out)]) == 0
    assert "1000 frames of 9 atoms" in capsys.readouterr().out
    back = load_dataset(out)  # MD17 default units: kcal/mol
    both = concatenate([source, source])
    assert len(back) == 1000 and np.array_equal(back.numbers, source.numbers)
    assert np.allclose(back.positions, both.positions, atol=1e-5)
    assert np.allclose(back.energies, both.energies, atol=1e-9)
    assert np.allclose(back.forces, both.forces, atol=1e-5)
    assert main(["data", "convert", str(ethanol_path), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite replaces it (it used to stop at the same refusal); one file keeps its frame times and velocities
    assert main(["data", "convert", str(ethanol_path), "-o", str(out), "--overwrite"]) == 0
    one = load_dataset(out)
    assert len(one) == 500 and np.allclose(one.times_fs, source.times_fs)
    assert np.allclose(one.velocities, source.velocities, atol=1e-6)
    assert main(["data", "convert", str(ethanol_path), str(tmp_path / "missing.xyz"), "-o",
                 str(tmp_path / "b.npz")]) == 2
    assert "missing.xyz" in capsys.readouterr().err
    # a name whose suffix promises another format is refused, and nothing is written
    assert main(["data", "convert", str(ethanol_path), "-o", str(tmp_path / "out.csv")]) == 2
    assert "out.csv: cannot write a data set as .csv; name it .npz" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()
