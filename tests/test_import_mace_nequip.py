"""Importing models users already have: MACE model files and NequIP deployed files / training dirs.

Every import is checked against the upstream code's own evaluation of the same
file (MACE's data pipeline; nequip's deployed model on nequip's AtomicData), on a
molecule and on a periodic box, in float64.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from small_models import NEQUIP_R_MAX, default_dtype, periodic_test_box
from stable_md.potentials import build_metadata, energy_and_forces, load_model, save_model

# find_spec, not importorskip: importing the `mace` package itself sets
# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD for the whole process, which stable-md's own import avoids.
if importlib.util.find_spec("mace") is None or importlib.util.find_spec("nequip") is None:
    pytest.skip("mace-torch and nequip are needed for these tests", allow_module_level=True)

FLAG = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
E0 = {1: -13.6, 6: -1029.0, 7: -1484.0, 8: -2040.0}


def _ethanol() -> Atoms:
    atoms = molecule("CH3CH2OH")
    rng = np.random.default_rng(2)
    atoms.positions += 0.05 * rng.standard_normal(atoms.positions.shape)
    return atoms


def _periodic_box() -> Atoms:
    """The shared eight-atom 6.5 Å test box (twice the 3 Å cutoff fits)."""
    positions, numbers, box = periodic_test_box()
    return Atoms(numbers=numbers, positions=positions, cell=np.eye(3) * box, pbc=True)


def _ours(potential, atoms: Atoms):
    """Energy (eV) and forces (eV/Å) of a Potential (or a loaded model file's module) on ``atoms``."""
    positions = torch.tensor(atoms.positions, dtype=torch.float64)[None]
    numbers = torch.tensor(atoms.numbers, dtype=torch.long)
    cell = torch.tensor(np.asarray(atoms.cell), dtype=torch.float64)[None] if atoms.pbc.all() else None
    energy, forces = energy_and_forces(potential, positions, numbers, cell)
    return energy.detach()[0], forces.detach()[0]


STRUCTURES = {"molecule": _ethanol, "periodic": _periodic_box}


# ---------------------------------------------------------------------------------------------
# MACE
# ---------------------------------------------------------------------------------------------


def _build_mace(kind: str, atomic_numbers: list[int]):
    from stable_md.potentials._e3nn_env import import_mace

    modules = import_mace()
    from e3nn import o3

    torch.manual_seed(4)
    kwargs = dict(
        r_max=3.0, num_bessel=6, num_polynomial_cutoff=5, max_ell=2,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2, num_elements=len(atomic_numbers), hidden_irreps=o3.Irreps("8x0e + 8x1o"),
        MLP_irreps=o3.Irreps("8x0e"), atomic_energies=np.array([E0[z] for z in atomic_numbers]),
        avg_num_neighbors=4.0, atomic_numbers=atomic_numbers, correlation=2,
        gate=torch.nn.functional.silu, radial_MLP=[16, 16],
    )
    with default_dtype(torch.float64):
        if kind == "ScaleShiftMACE":
            model = modules.ScaleShiftMACE(atomic_inter_scale=1.7, atomic_inter_shift=0.03, **kwargs)
        else:
            model = modules.MACE(**kwargs)
    return model


def _mace_reference(model, atoms: Atoms):
    """Energy and forces from MACE's own data pipeline and forward pass."""
    from mace import data as mace_data
    from mace.tools import AtomicNumberTable
    from mace.tools.torch_geometric.dataloader import DataLoader

    table = AtomicNumberTable([int(z) for z in model.atomic_numbers.tolist()])
    with default_dtype(torch.float64):
        config = mace_data.config_from_atoms(atoms)
        graph = mace_data.AtomicData.from_config(config, z_table=table, cutoff=float(model.r_max))
        batch = next(iter(DataLoader([graph], batch_size=1, shuffle=False, drop_last=False)))
        output = model(batch.to_dict(), compute_force=True)
    return output["energy"].detach()[0], output["forces"].detach()


@pytest.fixture(scope="module")
def plain_mace_file(tmp_path_factory):
    """A plain ``MACE`` model file for the tests that need one file only."""
    path = tmp_path_factory.mktemp("mace_plain") / "plain_MACE.model"
    torch.save(_build_mace("MACE", [1, 6, 8]), path)
    return path


@pytest.fixture(scope="module", params=["ScaleShiftMACE", "MACE"])
def mace_file(request, tmp_path_factory):
    """A MACE model file as MACE training writes it (torch.save of the module), and a pristine copy."""
    model = _build_mace(request.param, [1, 6, 7, 8])
    path = tmp_path_factory.mktemp("mace") / "small_MACE.model"
    torch.save(model, path)
    reference = torch.load(path, weights_only=False)  # what MACE itself would load
    return path, reference


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_mace_import_matches_mace(mace_file, structure):
    from stable_md.potentials.mace import import_mace_model

    path, reference = mace_file
    atoms = STRUCTURES[structure]()
    expected_energy, expected_forces = _mace_reference(reference, atoms)
    potential, hyper = import_mace_model(path, trust_pickle=True)
    assert potential.arch == "mace" and potential.cutoff == 3.0
    assert potential.species_numbers.tolist() == [1, 6, 7, 8] and hyper["cutoff"] == 3.0
    # E0s now live in the Potential's shifts, and MACE's own copy is zero.
    torch.testing.assert_close(potential.energy_shift, torch.tensor([E0[z] for z in (1, 6, 7, 8)],
                                                                    dtype=torch.float64))
    assert potential.backbone.model.atomic_energies_fn.atomic_energies.abs().max() == 0
    energy, forces = _ours(potential, atoms)
    assert expected_forces.abs().max() > 1e-3
    torch.testing.assert_close(energy, expected_energy, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(forces, expected_forces, atol=1e-9, rtol=1e-9)

    # Restricting a model to the elements of one system changes nothing for that system.
    subset, _ = import_mace_model(path, trust_pickle=True, species=[1, 6, 8])
    assert subset.species_numbers.tolist() == [1, 6, 8]
    energy_subset, forces_subset = _ours(subset, atoms)
    torch.testing.assert_close(energy_subset, expected_energy, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(forces_subset, expected_forces, atol=1e-9, rtol=1e-9)


def test_mace_import_saves_loads_and_trains(mace_file, tmp_path):
    from stable_md.potentials.mace import import_mace_model

    path, reference = mace_file
    potential, hyper = import_mace_model(path, trust_pickle=True, species=[1, 6, 8])
    atoms = _ethanol()
    expected_energy, expected_forces = _mace_reference(reference, atoms)
    saved = save_model(potential, tmp_path / "imported.pt", build_metadata(potential, hyper))
    loaded = load_model(saved)
    assert loaded.arch == "mace" and loaded.species == [1, 6, 8] and loaded.cutoff == 3.0
    energy, forces = _ours(loaded.module, atoms)
    torch.testing.assert_close(energy, expected_energy, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(forces, expected_forces, atol=1e-9, rtol=1e-9)
    _assert_trains(loaded.module, atoms)


def test_mace_import_refuses_pickle_without_trust(plain_mace_file):
    from stable_md.potentials.mace import import_mace_model

    path = plain_mace_file
    with pytest.raises(PermissionError, match=r"pickle.*--trust-pickle.*trust_pickle=True"):
        import_mace_model(path)


def test_mace_import_rejects_files_that_are_not_mace_models(plain_mace_file, tmp_path):
    from stable_md.potentials.mace import import_mace_model

    text = tmp_path / "notes.model"
    text.write_text("not a model\n")
    with pytest.raises(ValueError, match="cannot be read as a MACE model file"):
        import_mace_model(text, trust_pickle=True)

    state = tmp_path / "state.model"
    torch.save({"weight": torch.zeros(3)}, state)
    with pytest.raises(ValueError, match="does not contain a MACE energy model.*state dict"):
        import_mace_model(state, trust_pickle=True)

    scripted = tmp_path / "scripted.model"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(ValueError, match="TorchScript archive"):
        import_mace_model(scripted, trust_pickle=True)

    with pytest.raises(FileNotFoundError):
        import_mace_model(tmp_path / "missing.model", trust_pickle=True)
    with pytest.raises(ValueError, match=r"does not know atomic numbers \[9\]"):
        import_mace_model(plain_mace_file, trust_pickle=True, species=[1, 9])


def test_mace_head_choice():
    from types import SimpleNamespace

    from stable_md.potentials.mace import _choose_head

    assert _choose_head(SimpleNamespace(heads=["Default"]), None) == 0
    assert _choose_head(SimpleNamespace(heads=["pt_head", "Default"]), None) == 1
    assert _choose_head(SimpleNamespace(heads=["a", "b"]), "b") == 1
    with pytest.raises(ValueError, match="several heads"):
        _choose_head(SimpleNamespace(heads=["a", "b"]), None)
    with pytest.raises(ValueError, match="no head 'c'"):
        _choose_head(SimpleNamespace(heads=["a", "b"]), "c")


class _NotATensor:
    """A class torch's safe loader does not know: loading it needs full unpickling."""


SAFE_LOADING_SCRIPT = """
import os, pickle, sys, torch
flag = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
assert flag not in os.environ
from stable_md.potentials.mace import import_mace_model
import_mace_model(sys.argv[1], trust_pickle=True)
assert flag not in os.environ, "importing a MACE model left " + flag + " set"
try:
    torch.load(sys.argv[2])
except pickle.UnpicklingError:
    print("refused")
else:
    print("loaded: safe loading was disabled")
"""


def test_importing_mace_keeps_safe_loading(plain_mace_file, tmp_path):
    """In a fresh interpreter (mace's import side effect happens once per process)."""
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"payload": _NotATensor()}, unsafe)
    env = {k: v for k, v in os.environ.items() if k != FLAG}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", SAFE_LOADING_SCRIPT, str(plain_mace_file), str(unsafe)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "refused"


# ---------------------------------------------------------------------------------------------
# NequIP
# ---------------------------------------------------------------------------------------------

def _nequip_reference(deployed: Path, atoms: Atoms):
    """Energy and forces of the deployed model evaluated by nequip itself."""
    from nequip.data import AtomicData, AtomicDataDict
    from nequip.data.transforms import TypeMapper
    from nequip.scripts.deploy import load_deployed_model

    model, metadata = load_deployed_model(deployed, freeze=False, set_global_options=False)
    mapper = TypeMapper(chemical_symbols=metadata["type_names"].split())
    with default_dtype(torch.float64):  # nequip builds positions in the default dtype
        data = mapper(AtomicData.from_ase(atoms, r_max=float(metadata["r_max"])))
        output = model(AtomicData.to_AtomicDataDict(data))
    return (output[AtomicDataDict.TOTAL_ENERGY_KEY].detach().reshape(()),
            output[AtomicDataDict.FORCE_KEY].detach())


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_nequip_deployed_import_matches_nequip(nequip_run, structure):
    from stable_md.potentials.nequip import import_nequip_deployed, import_nequip_training_dir

    directory, deployed = nequip_run
    atoms = STRUCTURES[structure]()
    expected_energy, expected_forces = _nequip_reference(deployed, atoms)
    assert expected_forces.abs().max() > 1e-3
    for potential, hyper in (import_nequip_deployed(deployed), import_nequip_training_dir(directory)):
        assert potential.arch == "nequip" and potential.cutoff == NEQUIP_R_MAX
        assert potential.species_numbers.tolist() == [1, 6, 8]
        assert hyper["global_scale"] == pytest.approx(0.8)
        assert all(p.requires_grad for p in potential.parameters())
        energy, forces = _ours(potential, atoms)
        torch.testing.assert_close(energy, expected_energy, atol=1e-9, rtol=1e-12)
        torch.testing.assert_close(forces, expected_forces, atol=1e-9, rtol=1e-9)


def test_nequip_import_saves_loads_and_trains(nequip_run, tmp_path):
    from stable_md.potentials.nequip import import_nequip_deployed

    _, deployed = nequip_run
    atoms = _periodic_box()
    expected_energy, expected_forces = _nequip_reference(deployed, atoms)
    potential, hyper = import_nequip_deployed(deployed)
    saved = save_model(potential, tmp_path / "imported.pt", build_metadata(potential, hyper))
    loaded = load_model(saved)
    assert loaded.arch == "nequip" and loaded.species == [1, 6, 8]
    energy, forces = _ours(loaded.module, atoms)
    torch.testing.assert_close(energy, expected_energy, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(forces, expected_forces, atol=1e-9, rtol=1e-9)
    _assert_trains(loaded.module, atoms)


def test_nequip_frozen_file_is_refused_with_a_way_out(nequip_run, tmp_path):
    from nequip.scripts.deploy import load_deployed_model

    from stable_md.potentials.nequip import import_nequip_deployed

    _, deployed = nequip_run
    frozen, metadata = load_deployed_model(deployed, freeze=True, set_global_options=False)
    path = tmp_path / "frozen.pth"
    torch.jit.save(frozen, str(path), _extra_files={k: v.encode() for k, v in metadata.items()})
    with pytest.raises(ValueError, match=r"frozen.*import_nequip_training_dir"):
        import_nequip_deployed(path)


def test_nequip_import_rejects_other_files(tmp_path):
    from stable_md.potentials.nequip import import_nequip_deployed, import_nequip_training_dir

    scripted = tmp_path / "linear.pth"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(ValueError, match="without nequip deployment metadata"):
        import_nequip_deployed(scripted)
    text = tmp_path / "notes.pth"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match="not a deployed NequIP model"):
        import_nequip_deployed(text)
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        import_nequip_training_dir(tmp_path)


def test_nequip_training_dir_with_pickled_objects_needs_trust(nequip_run, tmp_path):
    from stable_md.potentials.nequip import import_nequip_training_dir

    directory, _ = nequip_run
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "config.yaml").write_text((directory / "config.yaml").read_text())
    state = torch.load(directory / "best_model.pth")
    state["_note"] = _NotATensor()  # anything that is not a tensor forces full unpickling
    torch.save(state, copy / "best_model.pth")
    with pytest.raises(PermissionError, match="trust_pickle=True"):
        import_nequip_training_dir(copy)


def test_nequip_type_names_that_are_not_elements_need_species():
    from stable_md.potentials.nequip import _type_atomic_numbers

    with pytest.raises(ValueError, match="pass species="):
        _type_atomic_numbers({}, ["Hw", "Ow"], None, "model.pth")
    assert _type_atomic_numbers({}, ["Hw", "Ow"], [1, 8], "model.pth") == [1, 8]
    assert _type_atomic_numbers({"chemical_symbols": ["O", "H"]}, ["H", "O"], None, "m") == [1, 8]
    with pytest.raises(ValueError, match="disagree"):
        _type_atomic_numbers({"chemical_symbols": ["O", "H"]}, ["H", "O"], [8, 1], "m")


# ---------------------------------------------------------------------------------------------


def _assert_trains(module, atoms: Atoms) -> None:
    """One optimiser step on a force loss gives gradients and moves the (atomic) energies."""
    positions = torch.tensor(atoms.positions, dtype=torch.float64)[None]
    numbers = torch.tensor(atoms.numbers, dtype=torch.long)
    cell = torch.tensor(np.asarray(atoms.cell), dtype=torch.float64)[None] if atoms.pbc.all() else None
    parameters = list(module.parameters())
    assert parameters and all(p.requires_grad for p in parameters)
    with torch.no_grad():
        _, before = module(positions, numbers, cell)
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    _, forces = energy_and_forces(module, positions, numbers, cell, create_graph=True)
    optimizer.zero_grad()
    (forces ** 2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)
    optimizer.step()
    with torch.no_grad():
        _, after = module(positions, numbers, cell)
    assert (after - before).abs().max() > 1e-6
