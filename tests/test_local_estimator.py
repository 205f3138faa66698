"""refine --estimator local (issue 15, item 1): the local observable of every molecule of a periodic water box,
the localized refine step against an explicit per-neighbourhood oracle, the balanced selection as refine uses
it, and the command line on a water box."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openmm")

from test_estimator import paper_estimator  # noqa: E402
from stable_md.cli import main  # noqa: E402
from stable_md.data import load_dataset  # noqa: E402
from stable_md.observables import LocalBondLengths, local_observables  # noqa: E402
from stable_md.potentials import build_potential  # noqa: E402
from stable_md.potentials.model_file import build_metadata, save_model  # noqa: E402
from stable_md.refdata.water_md import run_water_md  # noqa: E402
from stable_md.refinement import RefineSettings, _Refinement  # noqa: E402
from stable_md.stability import BondGraph, detect_bonds  # noqa: E402

# A 32-molecule SPC/Fw box (9.9 Å): as small as a model with a 4 Å cutoff allows.
SMALL_MODEL = {"hidden_channels": 16, "num_filters": 16, "num_interactions": 2, "num_gaussians": 12, "cutoff": 4.0}


@pytest.fixture(scope="module")
def water_path(tmp_path_factory):
    return run_water_md(tmp_path_factory.mktemp("water") / "water.extxyz", n_molecules=32, n_frames=16, every=20,
                        equilibration_steps=500, progress=False)


@pytest.fixture(scope="module")
def water(water_path):
    return load_dataset(water_path)


@pytest.fixture(scope="module")
def random_water_model(tmp_path_factory, water):
    """An untrained float64 SchNet for water: the estimator's algebra does not need a good model."""
    torch.manual_seed(3)
    potential, hyperparameters = build_potential("schnet", water.species, **SMALL_MODEL)
    potential = potential.double()
    path = tmp_path_factory.mktemp("model") / "water_random.pt"
    save_model(potential, path, build_metadata(potential, hyperparameters))
    return path


def _manual_oh_lengths(positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """[F, M] mean O-H length of each water (O followed by its two H, as the generator writes them), minimum
    image by hand."""
    oxygens = np.flatnonzero(numbers == 8)
    lengths = []
    for offset in (1, 2):
        vectors = positions[:, oxygens + offset] - positions[:, oxygens]
        fractional = vectors @ np.linalg.inv(cell)
        vectors = (fractional - np.round(fractional)) @ cell
        lengths.append(np.linalg.norm(vectors, axis=-1))
    return 0.5 * (lengths[0] + lengths[1])


def test_local_bond_lengths_of_every_water_in_the_box(water):
    cell = water.cells[0]
    observable = LocalBondLengths(detect_bonds(water.numbers, water.positions, cell))
    values = observable(water.positions, cell)
    assert values.shape == (len(water), 32, 1) and observable.labels == ["H-O"]
    np.testing.assert_allclose(values[..., 0].numpy(), _manual_oh_lengths(water.positions, water.numbers, cell),
                               atol=1e-12)
    assert observable.membership.shape == (32, 96) and (observable.membership.sum(axis=1) == 3).all()
    assert (observable.membership.sum(axis=0) == 1).all(), "every atom in exactly one neighbourhood"
    reference = observable.reference(water)
    assert reference.shape == (1,) and 0.98 < float(reference) < 1.06
    assert "local-bonds" in local_observables()


def test_a_molecule_through_the_box_face_is_one_neighbourhood():
    cell = np.diag([8.0, 8.0, 8.0])
    # water 0 wrapped: its O at x = 0.2 Å, its hydrogens at x = 7.6 Å (0.6 Å to the left through the face)
    positions = np.array([[0.2, 4.0, 4.0], [7.6, 4.75, 4.0], [7.6, 3.25, 4.0],
                          [4.0, 1.0, 1.0], [4.96, 1.0, 1.0], [3.76, 1.93, 1.0]])
    numbers = np.array([8, 1, 1, 8, 1, 1])
    observable = LocalBondLengths(detect_bonds(numbers, positions, cell))
    assert observable.membership.tolist() == [[True, True, True, False, False, False],
                                              [False, False, False, True, True, True]]
    values = observable(positions, cell)[0, :, 0].numpy()
    np.testing.assert_allclose(values, [np.hypot(0.6, 0.75), (0.96 + np.hypot(0.24, 0.93)) / 2], atol=1e-9)


def test_molecules_that_differ_are_refused_by_name():
    # a water and a methane: no bond type common to both
    bonds = BondGraph(pairs=np.array([[0, 1], [0, 2], [3, 4], [3, 5], [3, 6], [3, 7]]),
                      reference_lengths=np.ones(6), numbers=np.array([8, 1, 1, 6, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match=r"molecules that are alike: molecule 0 \(atoms from 1, O\) has bond types "
                                         r"\['H-O'\], the others \['C-H', 'H-O'\]"):
        LocalBondLengths(bonds)


def test_settings_pair_each_estimator_with_its_observables():
    assert RefineSettings(estimator="local").observables == ["local-bonds"]
    assert RefineSettings().observables == ["hr"]
    with pytest.raises(ValueError, match="--obs local-bonds is an observable of neighbourhoods.*--estimator local"):
        RefineSettings(observables=["local-bonds"])
    with pytest.raises(ValueError, match="--obs hr is an observable of the whole system"):
        RefineSettings(estimator="local", observables=["hr"])
    with pytest.raises(ValueError, match="unknown estimator 'site'"):
        RefineSettings(estimator="site")


def test_the_localized_refine_step_equals_the_per_neighbourhood_oracle(random_water_model, water_path, water,
                                                                       tmp_path):
    """λ = 0 as the paper's water run, every neighbourhood selected (one bin, room for all): the gradient refine
    puts into the model is weight · 2 (ĝ − g_ref) · (the paper's eq. 6 over molecules), with each molecule's
    energy the sum of its atoms' energies, computed one molecule at a time by autograd."""
    settings = RefineSettings(estimator="local", observable_weights=[2.5], qm_weight=0.0, n_replicas=2,
                              local_bins=1, local_per_bin=10 ** 6, steps_per_epoch=20, sample_every=10,
                              check_every=10, criterion="imd")
    directory = tmp_path / "run"
    directory.mkdir()
    run = _Refinement(random_water_model, water_path, tmp_path / "out.pt", directory, settings, resume=False,
                      progress=False)
    cell = water.cells[0]
    samples = water.positions[::3][:5]
    term = run.terms[0]
    train_lengths = _manual_oh_lengths(run.train.positions, run.train.numbers, cell)
    assert float(term.reference) == pytest.approx(train_lengths.mean(), abs=1e-12)

    run.model.zero_grad(set_to_none=True)
    row = {}
    result = run._estimate(samples, run.terms, row)
    ours = torch.cat([p.grad.reshape(-1) for p in run.model.parameters()])
    assert row["local_samples"] == 5 * 32 and row["local_neighbourhoods"] == 5 * 32

    g = torch.as_tensor(_manual_oh_lengths(samples, water.numbers, cell).reshape(-1, 1))  # [(f, m), 1]
    numbers = torch.as_tensor(water.numbers)
    cell_t = torch.as_tensor(cell)[None]
    rows = []
    for frame in torch.as_tensor(samples):
        _, atomic = run.model(frame[None], numbers, cell_t)
        for m in range(32):
            grads = torch.autograd.grad(atomic[0, 3 * m:3 * m + 3].sum(), list(run.model.parameters()),
                                        retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if d is None else d).reshape(-1)
                                   for d, p in zip(grads, run.model.parameters())]))
    expected = 2.5 * 2 * (g.mean(0) - term.reference) @ paper_estimator(g, torch.stack(rows), 500.0)
    assert float(ours.abs().max()) > 1e-6
    torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=1e-8, atol=1e-12)
    assert result.losses["local-bonds"] == pytest.approx(float((g.mean() - term.reference) ** 2), rel=1e-9)


def test_the_balanced_selection_refine_uses_keeps_the_rare_stretched_molecules(random_water_model, water_path,
                                                                               water, tmp_path):
    """The paper's scheme (100 bins, 5 per bin): one water with a bond pulled to 1.6 Å among 32 x 5 ordinary
    ones is always among the local samples, and the selection is the same when the epoch is run again."""
    settings = RefineSettings(estimator="local", qm_weight=0.0, n_replicas=2, steps_per_epoch=20, sample_every=10,
                              check_every=10, criterion="imd", observable_weights=[1.0])
    directory = tmp_path / "run"
    directory.mkdir()
    run = _Refinement(random_water_model, water_path, tmp_path / "out.pt", directory, settings, resume=False,
                      progress=False)
    samples = water.positions[:5].copy()
    oxygen, hydrogen = 3 * 7, 3 * 7 + 1
    direction = samples[2, hydrogen] - samples[2, oxygen]
    samples[2, hydrogen] = samples[2, oxygen] + 1.6 * direction / np.linalg.norm(direction)
    rows = []
    for _ in range(2):
        run.model.zero_grad(set_to_none=True)
        rows.append({})
        run._estimate(samples, run.terms, rows[-1])
    first, again = rows
    assert first == again
    assert first["local_neighbourhoods"] == 160 and 5 <= first["local_samples"] < 160
    low, high = first["local_deviation_range"]
    assert high == pytest.approx((1.6 + np.linalg.norm(direction)) / 2 - float(run.terms[0].reference), abs=0.02)


def test_refine_a_water_box_with_the_localized_estimator_from_the_command_line(water_path, tmp_path, capsys):
    """`stable-md refine water.pt --data water.extxyz --estimator local --criterion imd` end to end, and the
    misuse it names."""
    from stable_md.pretrain import PretrainSettings, SplitSettings, pretrain

    model = tmp_path / "water.pt"
    pretrain(load_dataset(water_path), "schnet", model, split=SplitSettings(n_train=12, n_val=2, n_test=2, seed=0),
             settings=PretrainSettings(epochs=3, lr=3e-3, batch_size=4, seed=0), hyperparameters=SMALL_MODEL,
             progress=False)
    output = tmp_path / "water.stable.pt"
    command = ["refine", str(model), "--data", str(water_path), "--estimator", "local", "--criterion", "imd",
               "--replicas", "4", "--steps-per-epoch", "40", "--check-every", "20", "--sample-every", "10",
               "--max-sim-time", "40fs", "--temperature", "300", "--threshold", "0.8", "-o", str(output),
               "--no-progress"]
    assert main(command) == 0
    assert "observables local-bonds (local estimator); imd criterion at 0.8 Å" in capsys.readouterr().out
    run = tmp_path / "water.stable.refine"
    settings = json.loads((run / "settings.json").read_text())["settings"]
    assert settings["estimator"] == "local" and settings["local_bins"] == 100 and settings["local_per_bin"] == 5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["estimator"] == "local"
    assert main(command[:4] + ["--obs", "local-bonds", "-o", str(tmp_path / "x.pt")]) == 2
    assert "--obs local-bonds is an observable of neighbourhoods" in capsys.readouterr().err


def _local_step(model: str, data: str, directory: str, samples: np.ndarray) -> dict:
    """One localized estimator pass of this process's block of ``samples``, every neighbourhood selected."""
    from stable_md.distributed import current_group

    group = current_group()
    settings = RefineSettings(estimator="local", observable_weights=[2.5], qm_weight=0.0, n_replicas=2,
                              local_bins=1, local_per_bin=10 ** 6, steps_per_epoch=20, sample_every=10,
                              check_every=10, criterion="imd")
    run = _Refinement(model, data, Path(directory) / "out.pt", Path(directory), settings, resume=False,
                      progress=False, group=group)
    run.model.zero_grad(set_to_none=True)
    row: dict = {}
    run._estimate(samples[group.block(len(samples))], run.terms, row)
    gradient = group.sum_tensor(torch.cat([p.grad.reshape(-1) for p in run.model.parameters()]).double())
    return {"row": row, "gradient": gradient}


def test_the_localized_step_on_two_ranks_is_the_step_of_one(random_water_model, water_path, water, tmp_path):
    """The weights use the mean over the molecules of both ranks' samples (5 frames split 3 + 2): with every
    neighbourhood selected, the summed gradient and the counts are those of one process."""
    from stable_md.distributed import launch

    samples = water.positions[::3][:5]
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    one = _local_step(str(random_water_model), str(water_path), str(tmp_path / "one"), samples)
    two = launch(2, _local_step, (str(random_water_model), str(water_path), str(tmp_path / "two"), samples))
    assert two["row"]["local_samples"] == one["row"]["local_samples"] == 160
    assert two["row"]["local_deviation_range"] == pytest.approx(one["row"]["local_deviation_range"])
    torch.testing.assert_close(two["gradient"], one["gradient"], rtol=1e-9, atol=1e-12)


def test_local_nearest_other_molecule_of_every_water(water):
    """local-imd: each water's distance to the nearest atom of another water, by hand with minimum image."""
    from stable_md.observables import LocalMinIntermolecularDistance

    cell = water.cells[0]
    observable = LocalMinIntermolecularDistance(detect_bonds(water.numbers, water.positions, cell))
    frames = water.positions[:3]
    values = observable(frames, cell)[..., 0].numpy()
    assert values.shape == (3, 32)
    inverse = np.linalg.inv(cell)
    for f in range(3):
        for m in (0, 17, 31):
            own = np.arange(3 * m, 3 * m + 3)
            others = np.setdiff1d(np.arange(96), own)
            vectors = frames[f][others][None] - frames[f][own][:, None]
            fractional = vectors @ inverse
            vectors = (fractional - np.round(fractional)) @ cell
            assert values[f, m] == pytest.approx(np.linalg.norm(vectors, axis=-1).min(), abs=1e-10)
    assert 1.4 < float(observable.reference(water)) < 2.2  # a hydrogen bond away
    assert "local-imd" in local_observables()
