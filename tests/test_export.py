"""`stable-md export`: imported MACE and NequIP models, changed as refine changes them (parameters and
per-species energy shifts), written back as a MACE model file / a deployed NequIP file that MACE's
MACECalculator / NequIP's NequIPCalculator load and that give stable-md's energies and forces, on a molecule
and a periodic box (issue 14, item 4); and what export refuses."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase import Atoms

from stable_md import StableCalculator
from stable_md.cli import main
from stable_md.potentials import load_model, save_model

if importlib.util.find_spec("mace") is None or importlib.util.find_spec("nequip") is None:
    pytest.skip("mace-torch and nequip are needed for these tests", allow_module_level=True)

from small_models import default_dtype  # noqa: E402
from test_import_mace_nequip import _build_mace, _ethanol, _periodic_box  # noqa: E402

# MACE's calculator, in a process of its own: importing mace turns torch's safe loading off for the process
MACE_CALCULATOR = """
import json, sys
import numpy as np
from ase import Atoms
from mace.calculators import MACECalculator
calculator = MACECalculator(model_paths=sys.argv[1], device="cpu", default_dtype="float64")
out = []
for frame in json.loads(sys.argv[2]):
    atoms = Atoms(numbers=frame["numbers"], positions=frame["positions"], cell=frame["cell"], pbc=frame["pbc"])
    atoms.calc = calculator
    out.append({"energy": atoms.get_potential_energy(), "forces": atoms.get_forces().tolist()})
print("RESULT" + json.dumps(out))
"""


def _mace_energies(model_file, structures: list[Atoms]) -> list[dict]:
    frames = [{"numbers": a.numbers.tolist(), "positions": a.positions.tolist(), "cell": np.asarray(a.cell).tolist(),
               "pbc": bool(a.pbc.all())} for a in structures]
    result = subprocess.run([sys.executable, "-c", MACE_CALCULATOR, str(model_file), json.dumps(frames)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.split("RESULT", 1)[1])


@pytest.fixture(params=["ScaleShiftMACE", "MACE"])
def imported_and_changed(request, tmp_path):
    """A MACE file, its import (H, C, O of its H, C, N, O), and that import with every parameter and per-species
    energy shift moved, as a refine moves them."""
    source = tmp_path / "original.model"
    torch.save(_build_mace(request.param, [1, 6, 7, 8]), source)
    imported = tmp_path / "imported.pt"
    assert main(["import", "mace", str(source), "-o", str(imported), "--trust-pickle", "--species", "1,6,8"]) == 0
    model = load_model(imported)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.module.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        model.module.energy_shift.add_(torch.tensor([0.1, -0.2, 0.3], dtype=model.module.energy_shift.dtype))
    changed = save_model(model.module, tmp_path / "refined.pt", model.metadata)
    return source, changed


def test_an_imported_mace_model_goes_back_to_mace_with_our_energies(imported_and_changed, tmp_path, capsys):
    source, refined = imported_and_changed
    exported = tmp_path / "refined.model"
    assert main(["export", str(refined), "--format", "mace", "-o", str(exported), "--trust-pickle"]) == 0
    assert f"wrote {exported}: mace model file" in capsys.readouterr().out
    structures = [_ethanol(), _periodic_box()]
    assert set(structures[1].numbers.tolist()) <= {1, 6, 8}
    theirs = _mace_energies(exported, structures)
    original = _mace_energies(source, structures)
    for atoms, mace in zip(structures, theirs):
        atoms.calc = StableCalculator(refined, default_dtype="float64")
        assert mace["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(mace["forces"], atoms.get_forces(), atol=1e-6)
    # the change reached MACE: the exported file is not the original
    assert abs(theirs[0]["energy"] - original[0]["energy"]) > 1e-3


def test_export_refuses_what_it_cannot_write(imported_and_changed, pretrained_model, tmp_path, capsys):
    source, refined = imported_and_changed
    out = tmp_path / "out.model"
    assert main(["export", str(pretrained_model), "--format", "mace", "-o", str(out), "--trust-pickle"]) == 2
    assert "is a schnet model made with stable-md, not imported from mace: it has no mace format" in \
        capsys.readouterr().err
    assert main(["export", str(refined), "--format", "mace", "-o", str(out)]) == 2
    assert "refusing to load" in capsys.readouterr().err and not out.exists()
    # the original file moved away: named, with the way out
    moved = tmp_path / "moved.model"
    shutil.move(source, moved)
    assert main(["export", str(refined), "--format", "mace", "-o", str(out), "--trust-pickle"]) == 2
    assert "which does not exist any more; pass that file, or one of the same architecture, as --template" in \
        capsys.readouterr().err
    assert main(["export", str(refined), "--format", "mace", "-o", str(out), "--trust-pickle",
                 "--template", str(moved)]) == 0
    # another architecture as template
    other = tmp_path / "other.model"
    torch.save(_build_mace("MACE", [1, 6, 8]), other)
    assert main(["export", str(refined), "--format", "mace", "-o", str(tmp_path / "x.model"), "--trust-pickle",
                 "--template", str(other)]) == 2
    assert "is not the MACE architecture" in capsys.readouterr().err
    assert main(["export", str(refined), "--format", "mace", "-o", str(out), "--trust-pickle",
                 "--template", str(moved)]) == 2
    assert "out.model exists; refusing to overwrite it" in capsys.readouterr().err


def test_an_imported_mace_model_refined_here_exports_to_our_energies(tmp_path, ethanol_path):
    """The whole path a MACE user takes: import, refine (3 learning epochs of a small random MACE, whose ethanol
    breaks within 25 fs at 1.2 Å), export, and MACE's own calculator."""
    source = tmp_path / "original.model"
    torch.save(_build_mace("ScaleShiftMACE", [1, 6, 7, 8]), source)
    imported, refined, exported = tmp_path / "imported.pt", tmp_path / "refined.pt", tmp_path / "refined.model"
    assert main(["import", "mace", str(source), "-o", str(imported), "--trust-pickle", "--species", "1,6,8"]) == 0
    assert main(["refine", str(imported), "--data", str(ethanol_path), "-o", str(refined), "--replicas", "8",
                 "--steps-per-epoch", "50", "--sample-every", "10", "--check-every", "50", "--max-epochs", "3",
                 "--threshold", "1.2", "--timestep", "0.25", "--temperature", "300", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "refined.refine" / "summary.json").read_text())
    assert summary["refined"] and summary["learning_epochs"] >= 1
    assert main(["export", str(refined), "--format", "mace", "-o", str(exported), "--trust-pickle"]) == 0
    atoms = _ethanol()
    [mace] = _mace_energies(exported, [atoms])
    atoms.calc = StableCalculator(refined, default_dtype="float64")
    assert mace["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
    np.testing.assert_allclose(mace["forces"], atoms.get_forces(), atol=1e-6)
    atoms.calc = StableCalculator(imported, default_dtype="float64")
    assert abs(mace["energy"] - atoms.get_potential_energy()) > 1e-4, "refine changed the model that went back"


def _changed_copy(imported, output, shifts):
    """``imported`` with every parameter and the per-species energy shifts moved, as a refine moves them."""
    model = load_model(imported)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.module.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        model.module.energy_shift.add_(torch.tensor(shifts, dtype=model.module.energy_shift.dtype))
    return save_model(model.module, output, model.metadata)


def test_an_imported_nequip_model_goes_back_to_nequip_with_our_energies(nequip_run, tmp_path, capsys):
    from nequip.ase import NequIPCalculator

    directory, deployed = nequip_run
    imported = tmp_path / "imported.pt"
    assert main(["import", "nequip", str(deployed), "-o", str(imported)]) == 0
    refined = _changed_copy(imported, tmp_path / "refined.pt", [0.1, -0.2, 0.3])
    exported = tmp_path / "refined.pth"
    assert main(["export", str(refined), "--format", "nequip", "-o", str(exported)]) == 0
    for atoms in (_ethanol(), _periodic_box()):
        ours = atoms.copy()
        ours.calc = StableCalculator(refined, default_dtype="float64")
        with default_dtype(torch.float64):  # nequip builds positions in the default dtype
            atoms.calc = NequIPCalculator.from_deployed_model(str(exported), device="cpu")
            energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        assert energy == pytest.approx(ours.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(forces, ours.get_forces(), atol=1e-6)
        original = atoms.copy()
        with default_dtype(torch.float64):
            original.calc = NequIPCalculator.from_deployed_model(str(deployed), device="cpu")
            assert abs(original.get_potential_energy() - energy) > 1e-3, "the change reached nequip"
    # a training directory's import has no deployed file to start from: named, with the way out
    from stable_md.potentials import build_metadata
    from stable_md.potentials.nequip import import_nequip_training_dir

    potential, hyper = import_nequip_training_dir(directory)
    from_dir = save_model(potential, tmp_path / "from_dir.pt", build_metadata(potential, hyper))
    assert main(["export", str(from_dir), "--format", "nequip", "-o", str(tmp_path / "x.pth")]) == 2
    assert "is not a deployed file here; pass a `nequip-deploy build` file of the same model as --template" in \
        capsys.readouterr().err
    assert main(["export", str(from_dir), "--format", "nequip", "-o", str(tmp_path / "x.pth"),
                 "--template", str(deployed)]) == 0
    # a MACE import asked for as NequIP
    assert main(["export", str(refined), "--format", "mace", "-o", str(tmp_path / "y.model")]) == 2
    assert "was imported from nequip, not mace; export it with --format nequip" in capsys.readouterr().err


def test_an_imported_torchani_model_goes_back_to_torchani_with_our_energies(tmp_path, capsys):
    pytest.importorskip("torchani")
    from test_import_ani import _assembled_ani, _ethanol_frames, _torchani_energy_forces

    source = tmp_path / "ani.pt"
    torch.save(_assembled_ani(ensemble=2, dtype=torch.float64), source)
    imported = tmp_path / "imported.pt"
    assert main(["import", "ani", str(source), "-o", str(imported), "--trust-pickle", "--species", "1,6,8"]) == 0
    refined = _changed_copy(imported, tmp_path / "refined.pt", [0.1, -0.2, 0.3])
    exported = tmp_path / "refined_ani.pt"
    assert main(["export", str(refined), "--format", "ani", "-o", str(exported)]) == 2
    assert "holds a pickled Python object" in capsys.readouterr().err and not exported.exists()
    assert main(["export", str(refined), "--format", "ani", "-o", str(exported), "--trust-pickle"]) == 0
    back = torch.load(exported, weights_only=False)
    frames, numbers = _ethanol_frames(2)
    energies, forces = _torchani_energy_forces(back, frames, numbers)
    for frame, energy, force in zip(frames, energies, forces):
        atoms = Atoms(numbers=numbers.numpy(), positions=frame.numpy())
        atoms.calc = StableCalculator(refined, default_dtype="float64")
        assert float(energy) == pytest.approx(atoms.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(force.numpy(), atoms.get_forces(), atol=1e-6)
    original, _ = _torchani_energy_forces(torch.load(source, weights_only=False), frames, numbers)
    assert abs(float(original[0] - energies[0])) > 1e-3, "the change reached torchani"
