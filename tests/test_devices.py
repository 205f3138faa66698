"""--device on every command: checked before anything is written, one GPU per rank, the OpenMM platform matched.

The CUDA paths themselves run only where a GPU is (benchmarks/gpu.py); here the checks, the rules and
the CPU device are tested, on this machine's real torch and OpenMM.
"""
from __future__ import annotations

import json
import re

import openmm
import pytest
import torch

from conftest import FAST_SCHNET
from openmm_bridge.engines import make_platform
from openmm_bridge.md_settings import MDSettings
from stable_md.cli import main
from stable_md.devices import check_device, rank_device

NO_CUDA = not torch.cuda.is_available()
OPENMM_CUDA = "CUDA" in [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def test_check_device_names_the_option_and_what_it_expects():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device 'banana' is not a torch device \(expected cpu, cuda or cuda:N\)"):
        check_device("banana")
    with pytest.raises(ValueError, match="--device meta: stable-md runs models on cpu or cuda"):
        check_device("meta")
    if NO_CUDA:
        for name in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match=f"--device {name}: torch .* sees no CUDA device on this machine; "
                                                 f"use --device cpu"):
                check_device(name)
    else:
        count = torch.cuda.device_count()
        with pytest.raises(ValueError, match=f"this machine has {count} CUDA device"):
            check_device(f"cuda:{count}")


def test_each_rank_takes_its_own_gpu_unless_one_is_named():
    assert [rank_device("cuda", rank, 4) for rank in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [rank_device("cuda", rank, 2) for rank in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [rank_device("cuda:1", rank, 4) for rank in range(3)] == ["cuda:1"] * 3
    assert rank_device("cpu", 3, 0) == "cpu"
    with pytest.raises(ValueError, match="no CUDA device on this node"):
        rank_device("cuda", 0, 0)


def test_the_openmm_platform_follows_the_device_unless_chosen():
    assert MDSettings().platform == "CPU"
    assert MDSettings(device="cuda").platform == "CUDA" and MDSettings(device="cuda:1").platform == "CUDA"
    assert MDSettings(device="cuda", platform="CPU").platform == "CPU"
    # a new device brings its platform; a platform chosen apart from the device stays
    assert MDSettings().with_changes(device="cuda:0").platform == "CUDA"
    assert MDSettings(platform="Reference").with_changes(device="cuda").platform == "Reference"
    assert MDSettings(device="cuda").with_changes(device="cpu").platform == "CPU"
    platform, properties = make_platform("CPU", "cpu")
    assert platform.getName() == "CPU" and properties == {"Threads": "1"}
    if not OPENMM_CUDA:
        with pytest.raises(ValueError, match=r"OpenMM platform 'CUDA' is not available here \(available: .*'CPU'"
                                             r".*with --device cuda, pass --platform CPU"):
            make_platform("CUDA", "cuda")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["pretrain", "refine", "evaluate", "simulate"])
def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(tmp_path, ethanol_path, pretrained_model,
                                                                           command, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arguments = {
        "pretrain": ["pretrain", "--data", str(ethanol_path), "-o", "m.pt", "--epochs", "1"],
        "refine": ["refine", str(pretrained_model), "--data", str(ethanol_path), "-o", "m.pt"],
        "evaluate": ["evaluate", str(pretrained_model), "--data", str(ethanol_path), "-o", "m.pt"],
        "simulate": ["simulate", str(pretrained_model), "--data", str(ethanol_path), "-o", "m.pt"],
    }[command]
    for device, expected in (("cuda", "--device cuda: torch .* sees no CUDA device on this machine"),
                             ("cuda:1", "--device cuda:1: torch .* sees no CUDA device"),
                             ("mps", "--device mps: stable-md runs models on cpu or cuda"),
                             ("tpu", r"--device 'tpu' is not a torch device \(expected cpu, cuda or cuda:N\)")):
        assert main(arguments + ["--no-progress", "--device", device]) == 2, (command, device)
        err = capsys.readouterr().err
        assert re.search(expected, err) and "Traceback" not in err, err
        assert list(tmp_path.iterdir()) == [], f"{command} --device {device} wrote {list(tmp_path.iterdir())}"


def test_pretrain_on_the_named_device_trains_and_writes_a_model(tmp_path, ethanol_path):
    from stable_md.potentials import load_model

    output = tmp_path / "m.pt"
    assert main(["pretrain", "--data", str(ethanol_path), "-o", str(output), "--n-train", "30", "--n-val", "10",
                 "--n-test", "10", "--epochs", "2", "--no-progress", "--device", "cpu",
                 *sum((["--hyper", f"{k}={v}"] for k, v in FAST_SCHNET.items()), [])]) == 0
    model = load_model(output)
    assert all(p.device.type == "cpu" for p in model.module.parameters())
    assert [json.loads(line)["epoch"] for line in output.with_suffix(".log.jsonl").read_text().splitlines()] == [1, 2]


def test_the_torch_force_on_a_gpu_needs_the_cuda_platform(pretrained_model, ethanol):
    """openmm-torch runs the model where OpenMM's platform is: a GPU model under the CPU platform would fail on
    its first step inside OpenMM, so it is refused by name (checked before the model or OpenMM is touched)."""
    from openmm_bridge.replicas import ReplicaSet
    from stable_md.potentials import load_model

    module = load_model(pretrained_model).module
    with pytest.raises(ValueError, match="--force torch runs the model inside OpenMM, on the CPU platform's CPU, "
                                         "while --device cuda puts it on a GPU: use --platform CUDA"):
        ReplicaSet(module, ethanol.numbers, ethanol.positions[:2], backend="torch", device="cuda", platform="CPU")
    assert all(p.device.type == "cpu" for p in module.parameters())
