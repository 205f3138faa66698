"""A model given structures unlike those it was trained on: a warning naming both, in refine, evaluate and
simulate, and none on the model's own kind of structures."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from stable_md.cli import main
from stable_md.compatibility import OtherStructuresWarning, composition_mismatch, training_structures
from stable_md.data import load_dataset, save_dataset
from stable_md.potentials import read_metadata
from stable_md.refinement import RefineError, RefineSettings, refine

ASPIRIN = Path(__file__).resolve().parents[1] / "data" / "aspirin_xtb_500K.npz"


def test_composition_rules():
    ethanol = {"history": [{"data_numbers": [6, 6, 8, 1, 1, 1, 1, 1, 1], "data_periodic": False,
                            "data": "/data/ethanol.xyz"}]}
    assert composition_mismatch(ethanol, [8, 6, 6, 1, 1, 1, 1, 1, 1], periodic=False) is None  # order is free
    reason = composition_mismatch(ethanol, [6] * 9 + [1] * 8 + [8] * 4, periodic=False)
    assert "molecules of 9 atoms (C2H6O, from /data/ethanol.xyz)" in reason and "21 atoms (C9H8O4)" in reason
    assert "periodic cells" in composition_mismatch(ethanol, [6, 6, 8, 1, 1, 1, 1, 1, 1], periodic=True)
    water = {"history": [{"data_numbers": [8, 1, 1] * 64, "data_periodic": True, "data": "water.xyz"}]}
    assert composition_mismatch(water, [8, 1, 1] * 32, periodic=True) is None  # a smaller box of the same liquid
    assert "(H64O64" in composition_mismatch(water, [8, 1, 8, 1] * 32, periodic=True)
    # imported models (and older files) record no training structures: nothing to compare, no warning
    assert training_structures({"history": [{"stage": "import"}]}) is None
    assert composition_mismatch({"history": []}, [6, 1], periodic=False) is None


def test_commands_warn_on_another_molecule(pretrained_model, ethanol_path, tmp_path, capsys):
    assert training_structures(read_metadata(pretrained_model))["numbers"] == load_dataset(ethanol_path).numbers.tolist()
    aspirin = tmp_path / "aspirin_40.npz"
    save_dataset(load_dataset(ASPIRIN).subset(np.arange(40)), aspirin)
    tiny = ["--replicas", "2", "--time", "0.05ps", "--error-frames", "5", "--no-progress"]

    assert main(["evaluate", str(pretrained_model), "--data", str(aspirin), "-o", str(tmp_path / "eval"), *tiny]) == 0
    err = capsys.readouterr().err
    assert (f"stable-md evaluate: warning: model {pretrained_model} on {aspirin}: it was trained on molecules of "
            f"9 atoms (C2H6O") in err and "molecules of 21 atoms (C9H8O4)" in err, err
    # on its own kind of molecule: no warning
    assert main(["evaluate", str(pretrained_model), "--data", str(ethanol_path), "-o", str(tmp_path / "own"),
                 *tiny]) == 0
    assert "warning" not in capsys.readouterr().err

    water = tmp_path / "water.xyz"
    water.write_text("3\n\nO 0 0 0\nH 0.96 0 0\nH 0 0.96 0\n")
    assert main(["simulate", str(pretrained_model), "--structure", str(water), "-o", str(tmp_path / "sim"),
                 "--replicas", "1", "--time", "10fs", "--no-progress"]) == 0
    assert "stable-md simulate: warning:" in capsys.readouterr().err

    settings = RefineSettings(n_replicas=2, steps_per_epoch=50, sample_every=10, check_every=50, max_epochs=1, max_cycles=1,
                              max_simulation_time=25.0)
    # the warning comes before the run, which here explains why every replica breaks at once
    with pytest.warns(OtherStructuresWarning, match="molecules of 21 atoms"), pytest.raises(RefineError):
        refine(pretrained_model, aspirin, tmp_path / "aspirin.stable.pt", settings, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OtherStructuresWarning)
        refine(pretrained_model, ethanol_path, tmp_path / "own.stable.pt", settings, progress=False)
