"""Importing torchani models: same energies and forces as torchani's own forward, in eV.

Every torchani model here is built locally with random weights (pretrained ANI
weights would be downloaded, and the test machines are offline).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase.build import molecule

torchani = pytest.importorskip("torchani")

from stable_md.potentials import (build_metadata, build_potential, energy_and_forces, load_model,  # noqa: E402
                                  save_model)
from stable_md.potentials.ani import import_torchani_model  # noqa: E402
from stable_md.units import HARTREE_IN_EV  # noqa: E402

from torchani.aev import AEVComputer, ANIAngular, ANIRadial  # noqa: E402
from torchani.arch import Assembler, simple_ani  # noqa: E402
from torchani.nn import ANINetworks, AtomicNetwork  # noqa: E402
from torchani.sae import SelfEnergy  # noqa: E402

SELF_ENERGIES = {"H": -0.5, "C": -37.8, "N": -54.6, "O": -75.0}  # Hartree


def _assembled_ani(ensemble: int = 2, dtype=torch.float64, symbols=("H", "C", "N", "O"), seed: int = 0):
    """An ANI-1x-like torchani model with random weights and self energies."""
    torch.manual_seed(seed)
    asm = Assembler()
    asm.set_symbols(list(symbols))
    asm.set_global_cutoff_fn("cosine")
    asm.set_aev_computer(radial="ani1x", angular="ani1x")
    asm.set_atomic_networks(ctor="ani1x")
    asm.set_self_energies({s: SELF_ENERGIES[s] for s in symbols})
    return asm.assemble(ensemble).to(dtype)


def _ethanol_frames(n: int = 3, dtype=torch.float64):
    atoms = molecule("CH3CH2OH")
    positions = torch.tensor(atoms.positions, dtype=dtype)
    numbers = torch.tensor(atoms.numbers, dtype=torch.long)
    noise = 0.05 * torch.randn((n,) + positions.shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
    return positions[None] + noise, numbers


def _torchani_energy_forces(model, frames, numbers, cell=None):
    """Energies (eV) and forces (eV/Å) from torchani's own forward, frame by frame."""
    energies, forces = [], []
    for frame in frames:
        coords = frame[None].clone().requires_grad_(True)
        if cell is None:
            energy = model((numbers[None], coords)).energies
        else:
            energy = model((numbers[None], coords), cell=cell, pbc=torch.tensor([True, True, True])).energies
        (gradient,) = torch.autograd.grad(energy.sum(), coords)
        energies.append(energy.detach()[0] * HARTREE_IN_EV)
        forces.append(-gradient[0] * HARTREE_IN_EV)
    return torch.stack(energies), torch.stack(forces)


def _assert_matches(potential, model, frames, numbers, cell=None):
    expected_e, expected_f = _torchani_energy_forces(model, frames, numbers, cell)
    batch_cell = None if cell is None else cell[None].expand(len(frames), 3, 3)
    energy, forces = energy_and_forces(potential, frames, numbers, batch_cell)
    assert expected_f.abs().max() > 1e-2, "torchani forces ~0: the comparison would prove nothing"
    torch.testing.assert_close(energy.detach(), expected_e, atol=1e-7, rtol=1e-10)
    torch.testing.assert_close(forces, expected_f, atol=1e-7, rtol=1e-7)


def test_ensemble_model_matches_torchani_forward_including_self_energies():
    model = _assembled_ani()
    potential, hyper = import_torchani_model(model)
    frames, numbers = _ethanol_frames()
    _assert_matches(potential, model, frames, numbers)
    assert potential.species_numbers.tolist() == [1, 6, 7, 8]
    torch.testing.assert_close(potential.energy_shift, torch.tensor([-0.5, -37.8, -54.6, -75.0],
                                                                    dtype=torch.float64) * HARTREE_IN_EV)
    assert potential.cutoff == pytest.approx(5.2) and hyper["cutoff"] == pytest.approx(5.2)
    assert hyper["imported_from"]["ensemble_size"] == 2
    assert hyper["hidden_layers"]["H"] == [160, 128, 96]
    assert all(p.requires_grad for p in potential.parameters())


def test_subset_of_species_and_model_left_untouched():
    model = _assembled_ani(ensemble=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    potential, _ = import_torchani_model(model, species=[8, 1, 6])
    assert potential.species_numbers.tolist() == [1, 6, 8]
    frames, numbers = _ethanol_frames(2)
    _assert_matches(potential, model, frames, numbers)
    with torch.no_grad():
        for p in potential.parameters():
            p.add_(0.1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_model_with_repulsion_in_periodic_box_matches_torchani():
    torch.manual_seed(2)
    model = simple_ani(["H", "C", "O"], lot="wb97x-631gd", cutoff_fn="smooth", repulsion=True,
                       self_energies={"H": -0.6, "C": -38.1, "O": -75.2}, strategy="pyaev").double()
    potential, hyper = import_torchani_model(model)
    assert "repulsion_xtb" in hyper["imported_from"]["extra_potentials"]
    rng = np.random.default_rng(0)
    box = 11.0
    ethanol = molecule("CH3CH2OH")
    positions, numbers = [], []
    for corner in ([1.0, 1.0, 1.0], [6.5, 6.0, 6.5], [1.5, 6.5, 9.0]):
        rotated = ethanol.copy()
        rotated.rotate(float(rng.uniform(0, 360)), "z")
        positions.append(rotated.positions - rotated.positions.mean(0) + corner)
        numbers.extend(rotated.numbers)
    frames = torch.tensor(np.concatenate(positions), dtype=torch.float64)[None]
    numbers = torch.tensor(numbers)
    cell = torch.eye(3, dtype=torch.float64) * box
    _assert_matches(potential, model, frames, numbers, cell)
    with torch.no_grad():
        periodic, _ = potential(frames, numbers, cell[None])
        isolated, _ = potential(frames, numbers)
    assert (periodic - isolated).abs().max() > 1e-4, "no pair crosses the box: periodicity untested"


class _BareModel(torch.nn.Module):
    """What a user might write by hand: AEVComputer + ANINetworks + SelfEnergy."""

    def __init__(self) -> None:
        super().__init__()
        symbols = ["H", "C", "O"]
        self.aev = AEVComputer(ANIRadial.cover_linearly(0.9, 4.6, 16.0, 8),
                               ANIAngular.cover_linearly(0.9, 3.1, 8.0, 32.0, 4, 4), num_species=3)
        self.networks = ANINetworks({s: AtomicNetwork([self.aev.out_dim, 24, 16, 1], "celu", bias=True)
                                     for s in symbols})
        self.sae = SelfEnergy(symbols, [-0.4, -38.0, -75.1])
        self.register_buffer("to_index", torch.tensor([-1, 0, -1, -1, -1, -1, 1, -1, 2]))

    def forward(self, species_coordinates):
        numbers, coords = species_coordinates
        elements = self.to_index[numbers]
        energies = self.networks(elements, self.aev(elements, coords)) + self.sae(elements)
        return torchani.tuples.SpeciesEnergies(elements, energies)


def test_bare_aev_plus_networks_module():
    torch.manual_seed(3)
    model = _BareModel().double()
    potential, hyper = import_torchani_model(model)
    assert potential.cutoff == pytest.approx(4.6)
    assert hyper["angular_cutoff"] == pytest.approx(3.1)
    frames, numbers = _ethanol_frames(2)
    _assert_matches(potential, model, frames, numbers)


def test_imported_model_saves_loads_and_trains(tmp_path):
    model = _assembled_ani(ensemble=1, dtype=torch.float32)
    potential, hyper = import_torchani_model(model, species=[1, 6, 8])
    frames, numbers = _ethanol_frames(2, dtype=torch.float32)
    with torch.no_grad():
        reference, _ = potential(frames, numbers)
    path = save_model(potential, tmp_path / "imported.pt", build_metadata(potential, hyper))
    loaded = load_model(path)
    assert loaded.arch == "ani" and loaded.species == [1, 6, 8] and loaded.metadata["hyperparameters"] == hyper
    with torch.no_grad():
        energy, _ = loaded.module(frames, numbers)
    torch.testing.assert_close(energy, reference, atol=2e-3, rtol=1e-6)
    _, forces = energy_and_forces(loaded.module, frames, numbers, create_graph=True)
    (forces ** 2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in loaded.module.parameters())
    # float64 after loading, as refine may ask for.
    energy64, _ = loaded.module.to(torch.float64)(frames.double(), numbers)
    torch.testing.assert_close(energy64.float(), reference, atol=2e-3, rtol=1e-6)


def test_pickled_module_needs_trust(tmp_path):
    model = _assembled_ani(ensemble=1)
    path = tmp_path / "ani.pt"
    torch.save(model, path)
    with pytest.raises(PermissionError, match="--trust-pickle") as info:
        import_torchani_model(path)
    assert str(path) in str(info.value)
    potential, hyper = import_torchani_model(path, trust_pickle=True)
    assert hyper["imported_from"]["source"] == str(path)
    frames, numbers = _ethanol_frames(2)
    _assert_matches(potential, model, frames, numbers)


def test_state_dict_of_torchani_model_with_our_defaults(tmp_path):
    """A torchani model built with our default ani layout, saved as a state dict (no pickle needed)."""
    torch.manual_seed(5)
    asm = Assembler()
    asm.set_symbols(["H", "C", "O"])
    asm.set_global_cutoff_fn("cosine")
    asm.set_aev_computer(radial=ANIRadial.cover_linearly(0.8, 5.2, 19.7, 16),
                         angular=ANIAngular.cover_linearly(0.8, 3.5, 12.5, 14.1, 8, 4))
    asm.set_atomic_networks(ctor="ani1x")
    asm.set_self_energies({"H": -0.5, "C": -37.8, "O": -75.0})
    model = asm.assemble(1).double()
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    potential, hyper = import_torchani_model(path)
    frames, numbers = _ethanol_frames(2)
    _assert_matches(potential, model, frames, numbers)
    _, ours = build_potential("ani", [1, 6, 8])
    assert {k: v for k, v in hyper.items() if k != "imported_from"} == ours


def test_state_dict_of_our_own_ani_potential(tmp_path):
    torch.manual_seed(6)
    potential, _ = build_potential("ani", [1, 6, 8], default_hidden_layers=[16], hidden_layers={})
    with torch.no_grad():
        potential.energy_shift.copy_(torch.tensor([-13.0, -1030.0, -2040.0]))
        potential.energy_scale.fill_(0.3)
    path = tmp_path / "ours.pt"
    torch.save(potential.state_dict(), path)
    imported, _ = import_torchani_model(path)
    frames, numbers = _ethanol_frames(2, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(imported(frames, numbers)[0], potential(frames, numbers)[0])


def test_not_a_torchani_model_is_named(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a model\n")
    with pytest.raises(ValueError, match="notes.pt is not a torchani model"):
        import_torchani_model(text)
    tensors = tmp_path / "tensors.pt"
    torch.save({"weight": torch.zeros(3)}, tensors)
    with pytest.raises(ValueError, match="tensors.pt is not a torchani model"):
        import_torchani_model(tensors)
    linear = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(3, 1), linear)
    with pytest.raises(ValueError, match="linear.pt .*is not a torchani model"):
        import_torchani_model(linear, trust_pickle=True)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        import_torchani_model(tmp_path / "missing.pt")
    scripted = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_assembled_ani(ensemble=1)), str(scripted))
    with pytest.raises(ValueError, match="scripted.pt is a TorchScript archive"):
        import_torchani_model(scripted)


def test_species_not_covered_by_the_model():
    model = _assembled_ani(ensemble=1, symbols=("H", "C", "O"))
    with pytest.raises(ValueError, match=r"does not cover the requested species: atomic numbers \[7, 16\]"):
        import_torchani_model(model, species=[1, 6, 7, 8, 16])
    potential, _ = import_torchani_model(model, species=[1, 8])
    with pytest.raises(ValueError, match=r"atomic numbers \[6\]"):
        potential(*_ethanol_frames(1))


def test_cli_import_needs_trust_and_writes_a_model_file(tmp_path, capsys):
    from stable_md.cli import main

    model = _assembled_ani(ensemble=1, dtype=torch.float32)
    source = tmp_path / "ani_module.pt"
    torch.save(model, source)
    output = tmp_path / "imported.pt"
    assert main(["import", "ani", str(source), "-o", str(output)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not output.exists()
    assert main(["import", "ani", str(source), "-o", str(output), "--trust-pickle", "--species", "1,6,8"]) == 0
    loaded = load_model(output)
    assert loaded.species == [1, 6, 8] and loaded.metadata["history"][0]["stage"] == "import"
    frames, numbers = _ethanol_frames(2, dtype=torch.float32)
    expected, _ = _torchani_energy_forces(model, frames, numbers)
    energy, _ = energy_and_forces(loaded.module, frames, numbers)
    torch.testing.assert_close(energy.detach(), expected.to(energy.dtype), atol=2e-3, rtol=1e-6)
    assert main(["import", "ani", str(source), "-o", str(output), "--trust-pickle"]) == 2
    assert "exists" in capsys.readouterr().err
