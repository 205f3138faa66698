"""Observables against values computed by hand on tiny configurations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from openmm_bridge.md_settings import MDSettings
from stable_md.observables import (BondLengths, DistanceDistribution, ElementRDF, MinIntermolecularDistance,
                                   diffusion_coefficient, make_observable, mean_squared_displacement,
                                   velocity_autocorrelation)
from stable_md.stability import BondGraph, detect_bonds, molecules_of

WATER = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.24, 0.9266, 0.0]])


def two_waters(separation: float) -> tuple[np.ndarray, np.ndarray]:
    """Two water molecules; the second one's O sits ``separation`` Å from the first one's H."""
    second = WATER + WATER[1] + np.array([separation, 0.0, 0.0])
    return np.concatenate([WATER, second]), np.array([8, 1, 1, 8, 1, 1])


def test_hr_of_three_atoms_in_a_line():
    h = DistanceDistribution(3, r_max=5.0, n_bins=500)
    positions = np.array([[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0]])
    values = h(positions)[0].numpy()
    width = 5.0 / 500
    assert values.sum() * width == pytest.approx(1.0, abs=1e-6)
    # a third of the pairs at each of 1, 2 and 3 Å
    for distance in (1.0, 2.0, 3.0):
        near = np.abs(h.x - distance) < 0.1
        assert values[near].sum() * width == pytest.approx(1 / 3, abs=1e-6)
    assert (values * h.x).sum() * width == pytest.approx(2.0, abs=1e-4)  # mean distance


def test_hr_is_differentiable_and_batched():
    h = DistanceDistribution(3, r_max=5.0, n_bins=100)
    positions = torch.tensor(np.random.default_rng(0).uniform(0, 2, (4, 3, 3)), requires_grad=True)
    values = h(positions)
    assert values.shape == (4, 100)
    (values * torch.as_tensor(h.x)).sum().backward()
    # d/dx of the mean distance: gradient exists and is finite
    assert torch.isfinite(positions.grad).all() and positions.grad.abs().sum() > 0


def test_rdf_of_two_atoms_integrates_to_the_box_volume():
    box = 10.0 * np.eye(3)
    rdf = ElementRDF([8, 8], r_max=5.0, n_bins=250)
    values = rdf(np.array([[1.0, 1, 1], [3.5, 1, 1]]), box)[0].numpy()
    width = 5.0 / 250
    shell = 4 * np.pi * rdf.centres.numpy() ** 2
    # g(r) = V/(N(N-1)) * 2 δ(r - 2.5)/(4πr²): ∫ g 4πr² dr = V
    assert (values * shell).sum() * width == pytest.approx(1000.0, rel=1e-3)
    assert rdf.x[np.argmax(values)] == pytest.approx(2.5, abs=width)


def test_rdf_minimum_image_and_element_pairs():
    box = 6.0 * np.eye(3)
    rdf = ElementRDF([8, 1], r_max=3.0, n_bins=150)
    assert rdf.element_pairs == [("O", "H")]
    values = rdf.split(rdf(np.array([[0.5, 0.5, 0.5], [5.5, 0.5, 0.5]]), box)[0].numpy())["O-H"]
    assert rdf.centres.numpy()[np.argmax(values)] == pytest.approx(1.0, abs=0.02)  # across the boundary


def test_rdf_refuses_molecules_and_large_r_max():
    rdf = ElementRDF([8, 8], r_max=6.0)
    with pytest.raises(ValueError, match="periodic box"):
        rdf(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="exceeds half the box"):
        rdf(np.array([[0.0, 0, 0], [1.0, 0, 0]]), 10.0 * np.eye(3))


def test_bond_lengths_per_bond_and_per_type():
    positions, numbers = two_waters(2.0)
    bonds = detect_bonds(numbers, positions)
    assert len(bonds.pairs) == 4
    per_bond = BondLengths(bonds)(positions)[0].numpy()
    assert per_bond == pytest.approx([0.9572, np.linalg.norm(WATER[2]), 0.9572, np.linalg.norm(WATER[2])])
    per_type = BondLengths(bonds, per_type=True)
    assert per_type.labels == ["H-O"]
    assert per_type(positions)[0].numpy() == pytest.approx([per_bond.mean()])


def test_molecules_and_min_intermolecular_distance():
    positions, numbers = two_waters(2.0)
    bonds = detect_bonds(numbers, positions)
    assert [m.tolist() for m in molecules_of(bonds)] == [[0, 1, 2], [3, 4, 5]]
    imd = MinIntermolecularDistance(bonds)
    cross = np.linalg.norm(positions[:3, None] - positions[None, 3:], axis=-1)
    assert float(imd(positions)[0, 0]) == pytest.approx(cross.min())
    assert cross.min() < 2.0 + 1e-12
    single = BondGraph(pairs=np.array([[0, 1], [0, 2]]), reference_lengths=np.ones(2), numbers=numbers[:3])
    with pytest.raises(ValueError, match="at least two molecules"):
        MinIntermolecularDistance(single)


def test_reference_is_mean_over_data(ethanol):
    h = make_observable("hr", ethanol)
    reference = h.reference(ethanol)
    assert torch.allclose(reference, h(ethanol.positions).mean(dim=0))
    weights = np.zeros(len(ethanol))
    weights[3] = 1.0
    assert torch.allclose(h.reference(ethanol, weights), h(ethanol.positions[3])[0])
    with pytest.raises(ValueError, match="periodic box"):
        make_observable("rdf", ethanol)
    with pytest.raises(ValueError, match="unknown observable"):
        make_observable("vacf", ethanol)


def test_vacf_of_simple_signals():
    constant = np.ones((50, 2, 3))
    assert velocity_autocorrelation(constant, window=10) == pytest.approx(np.ones(10))
    alternating = np.ones((50, 1, 3)) * ((-1.0) ** np.arange(50))[:, None, None]
    assert velocity_autocorrelation(alternating, window=4) == pytest.approx([1, -1, 1, -1])
    with pytest.raises(ValueError, match="window"):
        velocity_autocorrelation(constant, window=60)


def test_msd_and_diffusion_of_a_random_walk():
    rng = np.random.default_rng(1)
    sigma = 0.1  # Å per frame per dimension
    steps = rng.normal(0.0, sigma, (4000, 64, 3))
    positions = np.cumsum(steps, axis=0)
    msd = mean_squared_displacement(positions, max_lag=50)
    assert msd[10] == pytest.approx(3 * sigma ** 2 * 10, rel=0.05)
    ballistic = mean_squared_displacement(np.arange(10)[:, None, None] * np.ones((10, 1, 3)), max_lag=5)
    assert ballistic == pytest.approx(3.0 * np.arange(6) ** 2)
    # MSD = 3σ² lag = 6 D t  ->  D = σ² / (2 dt); dt = 10 fs
    expected = sigma ** 2 / (2 * 10.0) * 1e-5
    assert diffusion_coefficient(msd, frame_interval_fs=10.0) == pytest.approx(expected, rel=0.05)


def test_figures_name_element_pairs_and_bond_types(ethanol):
    """Issue 12 row 20: rdf.png drew every element pair in one colour, end to end, with no legend; bond-types.png
    joined categories by lines over a numeric axis with no bond names."""
    from stable_md.observables import make_observable
    from stable_md.plots import build_observable_figure

    positions, numbers = two_waters(2.5)
    rdf = ElementRDF(numbers, r_max=3.0, n_bins=30)
    reference = rdf(positions, 7.0 * np.eye(3))[0].numpy()
    figure = build_observable_figure(rdf.x, reference, {"model": 1.1 * reference}, rdf.x_label, rdf.y_label,
                                     panels=rdf.panels(), categories=rdf.categories)
    tops = [axes for axes in figure.axes if axes.get_title()]
    assert [axes.get_title() for axes in tops] == ["O-O", "O-H", "H-H"]
    for axes in tops:  # each pair on its own r axis, 0-3 Å, not the three RDFs laid end to end
        for line in axes.get_lines():
            assert 0 < line.get_xdata().min() and line.get_xdata().max() < 3.0
    assert [text.get_text() for text in tops[0].get_legend().get_texts()] == ["reference (data)", "model"]
    assert all(axes.get_xlabel() == "r (Å)" for axes in figure.axes if axes.get_xlabel())

    types = make_observable("bond-types", ethanol)
    reference = types.reference(ethanol).numpy()
    figure = build_observable_figure(types.x, reference, {"model": reference + 0.01}, types.x_label, types.y_label,
                                     panels=types.panels(), categories=types.categories)
    top, bottom = figure.axes
    assert [label.get_text() for label in bottom.get_xticklabels()] == ["C-C", "C-H", "C-O", "H-O"]
    assert all(line.get_linestyle() == "None" for line in top.get_lines())  # markers, no lines between categories
    assert (top.get_ylabel(), bottom.get_ylabel(), bottom.get_xlabel()) == \
        ("bond length (Å)", "difference (Å)", "bond type")


@pytest.fixture
def gyration_observable():
    """An observable defined outside stable-md, registered for one test only."""
    from stable_md.observables import OBSERVABLES, Observable

    class Gyration(Observable):
        name = "gyration"
        description = "radius of gyration (Å)"
        y_label = "radius of gyration (Å)"

        @classmethod
        def build(cls, data, bonds=None, **options):
            return cls()

        def __init__(self):
            self.x = np.zeros(1)

        def __call__(self, positions, cell=None):
            frames = torch.as_tensor(positions, dtype=torch.float64).reshape(-1, *np.shape(positions)[-2:])
            centred = frames - frames.mean(dim=1, keepdim=True)
            return centred.pow(2).sum(dim=-1).mean(dim=1, keepdim=True).sqrt()

    yield Gyration
    del OBSERVABLES["gyration"]


def test_a_new_observable_is_one_subclass_refine_can_match(gyration_observable, pretrained_model, ethanol_path,
                                                           ethanol, tmp_path):
    """The observable registry (issue 13): a subclass is found by name by make_observable and refine, with no other
    file touched; evaluate, which compares binned curves, names the ones it takes."""
    from stable_md.evaluation import EvaluateSettings
    from stable_md.observables import binned_observables
    from stable_md.refinement import RefineSettings, refine

    assert binned_observables() == ["hr", "rdf"]
    gyration = make_observable("gyration", ethanol)
    assert gyration.reference(ethanol).shape == (1,) and 1.0 < float(gyration.reference(ethanol)[0]) < 2.0
    with pytest.raises(ValueError, match=r"evaluate compares the observables \['hr', 'rdf'\], got 'gyration'"):
        EvaluateSettings(observable="gyration")
    settings = RefineSettings(observables=["gyration"], n_replicas=8, steps_per_epoch=100, threshold=0.15, f_max=0.1,
                              max_cycles=1, max_epochs=2, max_simulation_time=2000.0, qm_batch=16,
                              md=MDSettings(seed=3))
    result = refine(pretrained_model, ethanol_path, tmp_path / "g.pt", settings, progress=False)
    learning = [row for row in result.history if row["phase"] == "learning"]
    assert learning and all("loss_gyration" in row for row in learning)
