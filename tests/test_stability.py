"""Bond detection and the bond-length instability criterion, alone and inside `stable-md simulate`."""
from __future__ import annotations

import json

import numpy as np
import pytest

from openmm_bridge.replicas import ReplicaSet
from stable_md.cli import main
from stable_md.stability import BondLengthCriterion, detect_bonds, pair_distances


def test_ethanol_bonds_are_the_chemical_ones(ethanol):
    bonds = detect_bonds(ethanol.numbers, ethanol.positions[::5])
    labels = sorted(bonds.describe(b) for b in range(len(bonds.pairs)))
    # ethanol as stored: C1 C2 O3 H4..H9; H4-H6 on C1, H7-H8 on C2, H9 on O3. No 1-3 pairs.
    assert labels == sorted(["C1-C2", "C1-H4", "C1-H5", "C1-H6", "C2-O3", "C2-H7", "C2-H8", "O3-H9"])
    np.testing.assert_allclose(bonds.reference_lengths,
                               pair_distances(ethanol.positions[::5], bonds.pairs).mean(axis=0))


def test_criterion_flags_a_stretched_bond_and_names_it(ethanol):
    bonds = detect_bonds(ethanol.numbers, ethanol.positions)
    criterion = BondLengthCriterion(bonds, threshold=0.5)
    frames = np.repeat(ethanol.positions[:1], 3, axis=0).copy()
    direction = frames[0, 8] - frames[0, 2]
    direction /= np.linalg.norm(direction)
    frames[1, 8] += 0.45 * direction  # O-H stretched but within 0.5 Å of its mean length
    frames[2, 8] += 0.80 * direction
    assert criterion(frames).tolist() == [False, False, True]
    reason = criterion.reasons(frames[2:])[0]
    assert reason.startswith("bond O3-H9 off by ") and reason.endswith(" Å")
    assert float(reason.split()[-2]) == pytest.approx(0.8, abs=0.05)  # frame 0 is not exactly at the mean
    with pytest.raises(ValueError, match="no bonds"):
        BondLengthCriterion(detect_bonds([1, 1], np.array([[0, 0, 0], [5.0, 0, 0]])))


def test_bonds_across_a_periodic_boundary():
    cell = np.eye(3) * 10.0
    water = np.array([[9.9, 5.0, 5.0], [0.85, 5.0, 5.0], [9.6, 5.9, 5.0]])  # O near x=10, one H wrapped to x~0.85
    bonds = detect_bonds([8, 1, 1], water, cell)
    assert len(bonds.pairs) == 2
    np.testing.assert_allclose(sorted(bonds.reference_lengths), [np.hypot(0.3, 0.9), 0.95], atol=1e-9)
    assert len(detect_bonds([8, 1, 1], water).pairs) == 1  # without the box the wrapped H looks far away


def test_mark_unstable_freezes_and_survives_rewind(pretrained_model, ethanol):
    replicas = ReplicaSet(pretrained_model, ethanol.numbers, ethanol.positions[[0, 10, 20]], seed=0)
    replicas.run(20)
    before = replicas.snapshot()
    replicas.mark_unstable([1], ["bond C1-C2 off by 0.7 Å"])
    assert replicas.unstable.tolist() == [False, True, False] and replicas.frozen[1]
    assert replicas.unstable_step[1] == 20 and replicas.reasons == {1: "bond C1-C2 off by 0.7 Å"}
    replicas.restore(before)
    assert not replicas.unstable.any() and replicas.reasons == {}


def test_simulate_stops_replicas_that_break_a_bond(pretrained_model, ethanol_path, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["simulate", str(pretrained_model), "--data", str(ethanol_path), "-o", str(run), "--replicas", "2",
            "--time", "50fs", "--frame-interval", "10", "--no-progress", "--bond-threshold", "0.02"]
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "unstable replicas: 2 of 2" in printed.out
    # the spellings of before 2026-12 still work (issue 12 row 19: one name per idea across commands)
    assert "--frame-interval is deprecated; use --check-every" in printed.err
    assert "--bond-threshold is deprecated; use --threshold" in printed.err
    summary = json.loads((run / "summary.json").read_text())
    assert not summary["completed"] and summary["n_unstable"] == 2
    for entry in summary["replicas"]:
        assert entry["status"] == "unstable" and "off by" in entry["reason"]
        assert entry["frames"] >= 1
    # The default 0.5 Å threshold keeps this model's replicas running over the same time.
    assert main(args[:-2] + ["--overwrite"]) == 0
    assert json.loads((run / "summary.json").read_text())["n_unstable"] == 0


def _two_waters(separation: float) -> tuple[np.ndarray, np.ndarray]:
    water = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.24, 0.9266, 0.0]])
    second = water + water[1] + np.array([separation, 0.0, 0.0])
    return np.concatenate([water, second]), np.array([8, 1, 1, 8, 1, 1])


def test_min_distance_criterion_on_colliding_molecules():
    from stable_md.stability import MinDistanceCriterion

    apart, numbers = _two_waters(2.0)
    criterion = MinDistanceCriterion(detect_bonds(numbers, apart), threshold=1.2)
    colliding, _ = _two_waters(1.0)
    frames = np.stack([apart, colliding])
    assert criterion(frames).tolist() == [False, True]
    reason = criterion.reasons(frames[1:])[0]
    assert "of different molecules" in reason and "1.00 Å" in reason
    with pytest.raises(ValueError, match="at least two molecules"):
        MinDistanceCriterion(detect_bonds(numbers[:3], apart[:3]))


def test_rdf_criterion_flags_a_drifting_box_after_its_window():
    from stable_md.observables import ElementRDF
    from stable_md.stability import RDFCriterion

    rng = np.random.default_rng(0)
    box = 8.0 * np.eye(3)
    numbers = np.array([8] * 20)
    reference_frames = rng.uniform(0, 8.0, (50, 20, 3))
    rdf = ElementRDF(numbers, r_max=4.0, n_bins=40, sigma=0.2)
    reference = rdf(reference_frames, box).mean(0)
    criterion = RDFCriterion(rdf, reference, box, window=4, threshold=20.0)  # noise ~3, collapse ~230
    collapsed = rng.uniform(0, 1.5, (20, 3))  # every atom squeezed into one corner
    verdicts = []
    for step in range(4):
        frames = np.stack([rng.uniform(0, 8.0, (20, 3)), collapsed])  # a fresh ideal-gas frame each check
        verdicts.append(criterion(frames).tolist())
    assert verdicts[:3] == [[False, False]] * 3  # the window is not full yet
    assert verdicts[3] == [False, True]
    assert "O-O RDF error" in criterion.reasons(frames)[1]
    criterion.reset()
    assert criterion(frames).tolist() == [False, False]


@pytest.fixture
def drift_criterion():
    """A criterion defined outside stable-md, registered for one test only."""
    from stable_md.stability import CRITERIA, Criterion

    class CentreDrift(Criterion):
        name = "drift"
        description = "centre of mass farther than the threshold from where it started"
        evaluation_threshold = 50.0
        windowed = True  # it compares with the first check it saw

        def reset(self):
            self.origin = None

        @classmethod
        def build(cls, inputs, threshold):
            return cls(threshold)

        def __init__(self, threshold):
            self.threshold, self.origin = threshold, None

        def _drift(self, positions):
            centres = np.asarray(positions).mean(axis=1)
            if self.origin is None:
                self.origin = centres
            return np.linalg.norm(centres - self.origin, axis=1)

        def __call__(self, positions):
            return self._drift(positions) > self.threshold

        def reasons(self, positions, replicas=None):
            drift = self._drift(positions)
            return [f"centre drifted {drift[r]:.2f} Å" for r in (range(len(drift)) if replicas is None else replicas)]

    yield CentreDrift
    del CRITERIA["drift"]


def test_a_new_criterion_is_one_subclass_found_by_name_everywhere(drift_criterion, pretrained_model, ethanol,
                                                                   tmp_path):
    """The criterion registry (issue 13): declaring a subclass makes it a choice of evaluate, with its default
    threshold, and keeps it out of refine (no training threshold), touching no other file."""
    from stable_md.cli import build_parser
    from stable_md.evaluation import EvaluateSettings, evaluate
    from stable_md.refinement import RefineSettings
    from stable_md.stability import CriterionInputs, criterion_names, default_threshold, make_criterion

    assert "drift" in criterion_names() and "drift" not in criterion_names("training")
    assert default_threshold("drift") == 50.0 and default_threshold("bond", "training") == 0.25
    with pytest.raises(ValueError, match=r"unknown stability criterion 'drift' for training; expected one of "
                                         r"\['bond', 'imd'\]"):
        RefineSettings(criterion="drift")
    with pytest.raises(ValueError, match="--criterion rdf needs a periodic box"):
        make_criterion("rdf", CriterionInputs(bonds=None))
    parser = build_parser()
    assert parser.parse_args(["evaluate", "m.pt", "--data", "d.xyz", "-o", "e", "--criterion", "drift"]).criterion == \
        "drift"
    report = evaluate([pretrained_model], ethanol, tmp_path / "e",
                      EvaluateSettings(n_replicas=3, total_time=100.0, check_every=20, vacf_window=0, error_frames=10,
                                       criterion="drift", threshold=1e-4), progress=False)
    (result,) = report["models"]
    assert result["n_unstable"] == 3 and all("centre drifted" in reason for reason in result["reasons"].values())
    assert report["settings"]["threshold"] == 1e-4
