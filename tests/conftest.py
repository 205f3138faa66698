"""Shared fixtures: the committed ethanol data set and a quickly pretrained small model."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
ETHANOL = REPO / "data" / "ethanol_xtb_500K.extxyz"

# A SchNet small enough to train in seconds, still a real SchNet.
FAST_SCHNET = {"hidden_channels": 32, "num_filters": 32, "num_interactions": 3, "num_gaussians": 16}


@pytest.fixture(scope="session")
def ethanol_path() -> Path:
    return ETHANOL


@pytest.fixture(scope="session")
def ethanol(ethanol_path):
    from stable_md.data import load_dataset

    return load_dataset(ethanol_path)


@pytest.fixture(scope="session")
def pretrained_model(tmp_path_factory, ethanol) -> Path:
    """A small SchNet fitted to 200 ethanol frames for 30 epochs (a few tens of seconds)."""
    from stable_md.pretrain import PretrainSettings, SplitSettings, pretrain

    output = tmp_path_factory.mktemp("pretrained") / "ethanol_schnet.pt"
    pretrain(ethanol, "schnet", output, split=SplitSettings(n_train=200, n_val=50, n_test=100, seed=0),
             settings=PretrainSettings(epochs=30, lr=3e-3, batch_size=10, seed=0),
             hyperparameters=FAST_SCHNET, progress=False)
    return output


@pytest.fixture(scope="session")
def nequip_run(tmp_path_factory):
    """A nequip training directory and its `nequip-deploy build` output (tests/small_models.py), made once."""
    from small_models import make_nequip_run

    return make_nequip_run(tmp_path_factory.mktemp("nequip_run"))


@pytest.fixture(autouse=True)
def safe_loading_stays_on():
    """Importing mace sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD; our code must never leave it set."""
    yield
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ, \
        "a test or library path left torch's safe loading disabled (import mace via _e3nn_env)"


def assert_same_simulate_runs(reference: Path, other: Path, n_replicas: int, n_frames: int) -> None:
    """Two `stable-md simulate` run directories hold the same state log and bit-identical trajectories."""
    import mdtraj
    import numpy as np

    assert (other / "state.csv").read_text() == (reference / "state.csv").read_text()
    for replica in range(n_replicas):
        name = f"replica_{replica:03d}.dcd"
        a = mdtraj.load(str(reference / name), top=str(reference / "topology.pdb"))
        b = mdtraj.load(str(other / name), top=str(other / "topology.pdb"))
        assert a.n_frames == b.n_frames == n_frames
        np.testing.assert_array_equal(a.xyz, b.xyz)


KILL_TEST_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_with_kills(command: list[str], moments: list[float], checkpoint: Path, done) -> int:
    """Start ``command`` and SIGKILL it ``moment`` seconds after each start, restarting with --resume when
    ``checkpoint`` exists (plainly otherwise); then run it to the end. Returns how many kills landed."""
    landed = 0
    for moment in moments + [None]:
        args = command + (["--resume"] if checkpoint.exists() else [])
        process = subprocess.Popen(args, env=KILL_TEST_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)
        try:
            _, error = process.communicate(timeout=moment if moment is not None else 600)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)  # ranks of --nproc die with it (PR_SET_PDEATHSIG)
            process.communicate()
            landed += 1
            continue
        assert process.returncode == 0, error
        if done():
            break
    assert done()
    return landed


def log_without_wall_time(path: Path) -> list[dict]:
    """The rows of a JSONL log without their wall-clock fields, which differ between otherwise identical runs."""
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("wall_time_s", "wall_seconds")} for row in rows]
