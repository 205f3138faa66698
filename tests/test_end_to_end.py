"""Each backbone: pretrain on the committed data, write the model file, reload it in ASE and run MD."""
from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

from small_models import SMALL_HYPERPARAMETERS
from stable_md.calculator import StableCalculator
from stable_md.potentials import read_metadata
from stable_md.pretrain import PretrainSettings, SplitSettings, pretrain


@pytest.mark.parametrize("arch", sorted(SMALL_HYPERPARAMETERS))
def test_pretrain_export_reload_and_run_ase_md(arch, ethanol, tmp_path):
    hyper = {**SMALL_HYPERPARAMETERS[arch], "cutoff": 4.0}
    if arch == "ani":
        hyper["angular_cutoff"] = 3.0
    output = tmp_path / f"{arch}.pt"
    _, report = pretrain(ethanol, arch, output, split=SplitSettings(n_train=40, n_val=10, n_test=10, seed=1),
                         settings=PretrainSettings(epochs=3, lr=2e-3, batch_size=8, seed=1),
                         hyperparameters=hyper, progress=False)
    assert report["epochs"] == 3 and np.isfinite(report["test"]["force_mae_meV_per_A"])
    metadata = read_metadata(output)
    assert metadata["arch"] == arch and metadata["species"] == [1, 6, 8]

    atoms = ethanol.to_atoms(0)
    atoms.calc = StableCalculator(output)
    rng = np.random.default_rng(0)
    thermalize_momenta(atoms, temperature_K=300, rng=rng)
    atoms.set_constraint(FixCom())
    start = atoms.positions.copy()
    Langevin(atoms, timestep=0.25 * units.fs, temperature_K=300, friction=0.02 / units.fs, rng=rng,
             fixcm=False).run(20)
    assert np.isfinite(atoms.get_potential_energy())
    assert np.abs(atoms.positions - start).max() > 1e-3
