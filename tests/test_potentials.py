"""Behaviour every backbone must show behind the Potential interface.

Parametrized over the architectures whose small configuration is listed in
``small_models.SMALL_HYPERPARAMETERS`` and whose optional dependencies import.
"""
from __future__ import annotations

import math

import pytest
import torch
from ase.build import molecule

from small_models import SMALL_HYPERPARAMETERS, periodic_test_box
from stable_md.potentials import (ARCHITECTURES, architecture_module, build_metadata, build_potential, energy_and_forces,
                                  load_model, save_model)

ARCHES = sorted(SMALL_HYPERPARAMETERS)
SPECIES = [1, 6, 8]


def _small(arch: str, dtype=torch.float64, shifts=(-13.6, -1029.0, -2040.0)):
    torch.manual_seed(1)
    try:
        potential, hyper = build_potential(arch, SPECIES, **SMALL_HYPERPARAMETERS[arch])
    except ImportError as error:
        pytest.skip(f"{arch} not installed: {error}")
    with torch.no_grad():
        # Non-trivial shifts/scale so that the wrapper's own arithmetic is exercised.
        potential.energy_shift.copy_(torch.tensor(shifts))
        potential.energy_scale.fill_(0.7)
    return potential.to(dtype), hyper


def _ethanol(dtype=torch.float64):
    atoms = molecule("CH3CH2OH")
    positions = torch.tensor(atoms.positions, dtype=dtype)
    numbers = torch.tensor(atoms.numbers, dtype=torch.long)
    return positions, numbers


def _random_rotation(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _periodic_cluster(dtype=torch.float64):
    positions, numbers, box = periodic_test_box()
    return (torch.tensor(positions, dtype=dtype), torch.tensor(numbers, dtype=torch.long),
            torch.eye(3, dtype=dtype) * box)


@pytest.mark.parametrize("arch", ARCHES)
def test_forces_match_finite_differences(arch):
    potential, _ = _small(arch)
    positions, numbers = _ethanol()
    positions = positions + 0.05 * torch.randn(positions.shape, generator=torch.Generator().manual_seed(0),
                                                dtype=positions.dtype)
    _, forces = energy_and_forces(potential, positions[None], numbers)
    step = 1e-5
    numeric = torch.zeros_like(positions)
    for atom in range(positions.shape[0]):
        for axis in range(3):
            plus, minus = positions.clone(), positions.clone()
            plus[atom, axis] += step
            minus[atom, axis] -= step
            with torch.no_grad():
                e_plus = potential(plus[None], numbers)[0]
                e_minus = potential(minus[None], numbers)[0]
            numeric[atom, axis] = -(e_plus - e_minus).item() / (2 * step)
    assert forces.abs().max() > 1e-3, "forces are all ~zero: the test would prove nothing"
    torch.testing.assert_close(forces[0], numeric, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHES)
def test_energy_invariant_under_rotation_translation_permutation(arch):
    potential, _ = _small(arch)
    positions, numbers = _ethanol()
    with torch.no_grad():
        energy, atomic = potential(positions[None], numbers)
        rotated = positions @ _random_rotation(7).T + torch.tensor([1.3, -2.0, 0.4], dtype=positions.dtype)
        energy_rotated, _ = potential(rotated[None], numbers)
        order = torch.randperm(len(numbers), generator=torch.Generator().manual_seed(5))
        energy_permuted, atomic_permuted = potential(positions[order][None], numbers[order])
    torch.testing.assert_close(energy_rotated, energy, atol=1e-8, rtol=1e-10)
    torch.testing.assert_close(energy_permuted, energy, atol=1e-8, rtol=1e-10)
    torch.testing.assert_close(atomic_permuted[0], atomic[0][order], atol=1e-8, rtol=1e-10)


@pytest.mark.parametrize("arch", ARCHES)
def test_batched_equals_one_by_one_and_atomic_energies_sum(arch):
    potential, _ = _small(arch)
    positions, numbers = _ethanol()
    generator = torch.Generator().manual_seed(11)
    frames = positions[None] + 0.1 * torch.randn((5,) + positions.shape, generator=generator, dtype=positions.dtype)
    energy, forces = energy_and_forces(potential, frames, numbers)
    _, atomic = potential(frames, numbers)
    assert energy.shape == (5,) and atomic.shape == (5, len(numbers)) and forces.shape == frames.shape
    for b in range(5):
        e_single, f_single = energy_and_forces(potential, frames[b:b + 1], numbers)
        torch.testing.assert_close(e_single[0], energy[b], atol=1e-9, rtol=1e-12)
        torch.testing.assert_close(f_single[0], forces[b], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(atomic.sum(dim=1), energy.detach(), atol=1e-9, rtol=1e-12)
    assert energy.std() > 0, "frames gave identical energies: the comparison would prove nothing"


@pytest.mark.parametrize("arch", ARCHES)
def test_model_file_round_trip_and_still_trains(arch, tmp_path):
    # Zero shifts: float32 totals of O(1) eV resolve the small change one optimiser step makes.
    potential, hyper = _small(arch, dtype=torch.float32, shifts=(0.0, 0.0, 0.0))
    positions, numbers = _ethanol(torch.float32)
    generator = torch.Generator().manual_seed(2)
    frames = positions[None] + 0.05 * torch.randn((3,) + positions.shape, generator=generator)
    with torch.no_grad():
        reference, _ = potential(frames, numbers)
    module_types = [type(m) for m in potential.modules()]
    path = save_model(potential, tmp_path / "model.pt", build_metadata(potential, hyper))
    assert [type(m) for m in potential.modules()] == module_types, \
        "saving must not script the caller's eager modules in place"
    loaded = load_model(path)
    assert loaded.arch == arch and loaded.species == SPECIES and loaded.cutoff == hyper["cutoff"]
    assert loaded.metadata["hyperparameters"] == hyper
    with torch.no_grad():
        energy, _ = loaded.module(frames, numbers)
    torch.testing.assert_close(energy, reference, atol=1e-5, rtol=1e-6)

    parameters = [p for p in loaded.module.parameters()]
    assert parameters and all(p.requires_grad for p in parameters)
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    _, forces = energy_and_forces(loaded.module, frames, numbers, create_graph=True)
    loss = (forces ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)
    optimizer.step()
    with torch.no_grad():
        after, _ = loaded.module(frames, numbers)
    assert (after - reference).abs().max() > 1e-4

    # The trained, loaded module saves again and reloads to the same energies.
    again = save_model(loaded.module, tmp_path / "model2.pt", loaded.metadata)
    with torch.no_grad():
        reloaded, _ = load_model(again).module(frames, numbers)
    torch.testing.assert_close(reloaded, after, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHES)
def test_periodic_minimum_image_matches_explicit_images(arch):
    potential, hyper = _small(arch)
    positions, numbers, cell = _periodic_cluster()
    box = cell[0, 0].item()
    layers_reach = 2 * hyper["cutoff"]
    assert box >= layers_reach, "one image layer must cover the receptive field of the small model"
    with torch.no_grad():
        energy, atomic = potential(positions[None], numbers, cell[None])
        offsets = torch.tensor([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)],
                               dtype=positions.dtype) * box
        central = int(((offsets == 0).all(dim=1)).nonzero()[0])
        cluster = (positions[None] + offsets[:, None, :]).reshape(-1, 3)
        cluster_numbers = numbers.repeat(len(offsets))
        _, cluster_atomic = potential(cluster[None], cluster_numbers)
        central_atomic = cluster_atomic[0].reshape(len(offsets), -1)[central]
        # Wrapping atoms into other images leaves the energy unchanged.
        unwrapped = positions + torch.tensor([1, 0, -2], dtype=positions.dtype)[None] * box * (
            torch.arange(len(numbers))[:, None] % 2)
        energy_unwrapped, _ = potential(unwrapped[None], numbers, cell[None])
    torch.testing.assert_close(atomic[0], central_atomic, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(energy_unwrapped, energy, atol=1e-8, rtol=1e-10)


@pytest.mark.parametrize("arch", ARCHES)
def test_cutoff_larger_than_half_box_is_refused(arch):
    potential, hyper = _small(arch)
    positions, numbers, _ = _periodic_cluster()
    small_cell = torch.eye(3, dtype=torch.float64) * (1.9 * hyper["cutoff"])
    with pytest.raises(Exception, match="half the shortest perpendicular width"):
        potential(positions[None], numbers, small_cell[None])


def test_unknown_element_is_named():
    potential, _ = _small("schnet")
    positions, numbers = _ethanol()
    numbers = numbers.clone()
    numbers[0] = 7
    with pytest.raises(ValueError, match=r"atomic numbers \[7\]"):
        potential(positions[None], numbers)


def test_schnet_default_size_matches_paper_scale():
    potential, hyper = build_potential("schnet", SPECIES)
    n = sum(p.numel() for p in potential.parameters())
    assert hyper["cutoff"] == 5.0
    assert 0.08e6 < n < 0.15e6, n
    assert math.isclose(potential.cutoff, 5.0)


def test_atomic_write_gives_files_ordinary_permissions(tmp_path):
    import os
    import stat

    from stable_md.files import atomic_write

    old = os.umask(0o022)
    try:
        path = tmp_path / "out.json"
        atomic_write(path, lambda tmp: tmp.write_text("{}"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert not list(tmp_path.glob(".*.tmp"))
    finally:
        os.umask(old)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_hyperparameter_is_checked_with_a_message_naming_it(arch):
    try:
        module = architecture_module(arch)
    except ImportError as error:
        pytest.skip(f"{arch}: {error}")
    assert set(module.HYPERPARAMETER_RULES) == set(module.DEFAULT_HYPERPARAMETERS)
    from stable_md.potentials.hyperparameters import check_hyperparameters

    check_hyperparameters(arch, dict(module.DEFAULT_HYPERPARAMETERS), module.HYPERPARAMETER_RULES)  # defaults pass
    for bad in (-1.0, 0, float("nan"), float("inf"), "nan", True, None):
        with pytest.raises(ValueError, match=rf"hyperparameter cutoff of architecture '{arch}' must be a finite "
                                             rf"number > 0; got"):
            build_potential(arch, [1, 6, 8], cutoff=bad)
    counts = [name for name, rule in module.HYPERPARAMETER_RULES.items() if type(rule).__name__ == "Integer"]
    assert counts, "every backbone has some whole-number hyperparameter"
    for name in counts:
        for bad in (-1, 2.5, "3", False):
            with pytest.raises(ValueError, match=rf"hyperparameter {name} of architecture '{arch}' must be a whole "
                                                 rf"number >= \d"):
                build_potential(arch, [1, 6, 8], **{name: bad})


def test_info_prints_the_metadata_and_names_a_missing_field(pretrained_model, tmp_path, capsys):
    import json
    import zipfile

    from stable_md.cli import main

    assert main(["info", str(pretrained_model)]) == 0
    out = capsys.readouterr().out
    assert "architecture  schnet" in out and "species       [1, 6, 8]" in out and "history: pretrain on" in out
    # the same archive with one required field removed from its metadata
    for field in ("arch", "species", "cutoff"):
        damaged = tmp_path / f"no_{field}.pt"
        with zipfile.ZipFile(pretrained_model) as source, zipfile.ZipFile(damaged, "w") as target:
            for item in source.infolist():
                data = source.read(item.filename)
                if item.filename.endswith("extra/stable_md.json"):
                    metadata = json.loads(data)
                    del metadata[field]
                    data = json.dumps(metadata).encode()
                target.writestr(item, data)
        assert main(["info", str(damaged)]) == 2
        err = capsys.readouterr().err
        assert f"{damaged}: its stable_md.json lacks the field '{field}' (expected arch, species, cutoff)" in err, err
