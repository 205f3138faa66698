"""The stabilization case of tests/test_refine.py, shared with benchmarks/stabilization_margin.py, which measures
its margin over seeds and dtypes: a SchNet fitted briefly to 100 ethanol frames, refined with default weights
and a test-sized budget, evaluated on 96 held-out starts for 3 ps against the 0.25 Å bond criterion (the
training threshold: more events in 3 ps than 0.5 Å, so more power per CPU second)."""
from __future__ import annotations

from pathlib import Path

from conftest import FAST_SCHNET
from openmm_bridge.md_settings import MDSettings


def pretrain_weak_model(data, output: Path, dtype: str = "float32") -> Path:
    from stable_md.pretrain import PretrainSettings, SplitSettings, pretrain

    pretrain(data, "schnet", output, split=SplitSettings(n_train=100, n_val=50, n_test=100, seed=0),
             settings=PretrainSettings(epochs=30, lr=3e-3, batch_size=10, seed=0, dtype=dtype),
             hyperparameters=FAST_SCHNET, progress=False)
    return output


def refine_settings(seed: int):
    """Defaults (auto weights, simulation patience) except the budget: at most 30 learning epochs, 10 cycles
    and 12 ps of simulation phases (whichever ends first; 11-30 learning epochs were measured)."""
    from stable_md.refinement import RefineSettings

    return RefineSettings(n_replicas=32, steps_per_epoch=400, max_cycles=10, max_epochs=30,
                          max_simulation_time=12_000.0, md=MDSettings(seed=seed))


def evaluate_settings(seed: int):
    from stable_md.evaluation import EvaluateSettings

    return EvaluateSettings(n_replicas=96, total_time=3000.0, threshold=0.25, check_every=50, vacf_window=0,
                            error_frames=100, md=MDSettings(seed=seed + 100))


def run_case(data, directory: Path, seed: int = 0, dtype: str = "float32", jobs: int = 2) -> tuple[dict, dict]:
    """Pretrain, refine and evaluate; returns refine's summary and the evaluation report."""
    from stable_md.evaluation import evaluate
    from stable_md.refinement import refine

    directory.mkdir(parents=True, exist_ok=True)
    weak = pretrain_weak_model(data, directory / "weak.pt", dtype)
    refined = directory / "weak.stable.pt"
    result = refine(weak, data, refined, refine_settings(seed), progress=False)
    report = evaluate([weak, refined], data, directory / "eval", evaluate_settings(seed),
                      labels=["before", "after"], jobs=jobs, progress=False)
    return result.summary, report
