"""Which exceptions the CLI turns into one line (exit 2) and which keep their traceback (issue 12 row 10).

A user can cause ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
ImportError and KeyError (a missing field); each source of torch.jit.Error, RuntimeError, zipfile.BadZipFile and
FloatingPointError that a user can reach is checked or converted where it arises (a damaged file is named, a
cell too small for the cutoff or NaN positions are refused before the model runs, a divergent pretraining stops
with one line) and is tested there. What still reaches the CLI as one of those four is a bug in stable-md: it
must show its traceback, not hide behind a one-line message."""
from __future__ import annotations

import zipfile

import pytest
import torch

from stable_md import cli

USER_CAUSED = [ValueError("bad value"), FileNotFoundError("no such file"), FileExistsError("exists"),
               NotADirectoryError("not a directory"), PermissionError("denied"), ImportError("missing package"),
               KeyError("a missing field")]
BUGS = [RuntimeError("internal"), torch.jit.Error("internal"), zipfile.BadZipFile("internal"),
        FloatingPointError("internal")]


@pytest.mark.parametrize("error", USER_CAUSED, ids=lambda e: type(e).__name__)
def test_a_user_caused_error_is_one_line_with_exit_code_2(error, monkeypatch, capsys):
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "_info", fails)
    assert cli.main(["info", "model.pt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stable-md info: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(error.args[0]) in err
    with pytest.raises(type(error)):  # --debug shows the traceback
        cli.main(["--debug", "info", "model.pt"])


@pytest.mark.parametrize("error", BUGS, ids=lambda e: type(e).__name__)
def test_an_internal_error_keeps_its_traceback(error, monkeypatch):
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "_info", fails)
    with pytest.raises(type(error)):
        cli.main(["info", "model.pt"])


def test_fraction_options_take_their_own_ranges(capsys):
    """--f-max takes (0, 1] (1: learn only once every replica is unstable), --f-min [0, 1], --holdout-fraction
    [0, 1) and --obs-share (0, 1]: each bound is checked where the option is parsed, naming the range."""
    parser = cli.build_parser()
    base = ["refine", "model.pt", "--data", "d.xyz"]
    args = parser.parse_args(base + ["--f-max", "1", "--f-min", "0", "--holdout-fraction", "0", "--obs-share", "1"])
    assert (args.f_max, args.f_min, args.holdout_fraction, args.obs_share) == (1.0, 0.0, 0.0, 1.0)
    for option, value, expected in (("--f-max", "0", "(0, 1]"), ("--holdout-fraction", "1", "[0, 1)"),
                                    ("--f-min", "1.5", "[0, 1]"), ("--obs-share", "nan", "(0, 1]")):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(base + [option, value])
        assert exit_info.value.code == 2
        assert f"expected a fraction in {expected}, got {value}" in capsys.readouterr().err
