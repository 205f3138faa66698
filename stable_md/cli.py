"""The ``stable-md`` command."""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from openmm_bridge.md_settings import INTEGRATORS, MODES, PLATFORMS, MDSettings
from stable_md import __version__

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ImportError,
               KeyError)


# simulate's MD: a Langevin run at room temperature; refine and evaluate use MDSettings' defaults (the paper's
# Nosé-Hoover at 500 K)
SIMULATE_MD = MDSettings(integrator="langevin", temperature=300.0)
_INTEGRATOR_HELP = {"nose-hoover": "nose-hoover (one chain per replica, as the paper)",
                    "langevin": "langevin (LangevinMiddle)", "verlet": "verlet (NVE)"}


def _add_md_options(p: argparse.ArgumentParser, defaults: MDSettings, integrators: Sequence[str],
                    seed_help: str) -> None:
    """The MD options of simulate, refine and evaluate: one list of names (the fields of MDSettings)."""
    p.add_argument("--temperature", type=_positive_float, default=defaults.temperature,
                   help=f"K (default: {defaults.temperature:g})")
    p.add_argument("--timestep", type=_positive_float, default=defaults.timestep,
                   help=f"fs (default: {defaults.timestep:g})")
    p.add_argument("--integrator", choices=list(integrators), default=defaults.integrator,
                   help=", ".join(_INTEGRATOR_HELP[name] for name in integrators)
                        + f"; default: {defaults.integrator}")
    p.add_argument("--friction", type=_positive_float, default=defaults.friction,
                   help=f"Langevin friction, 1/ps (default: {defaults.friction:g})")
    p.add_argument("--collision-frequency", type=_positive_float, default=defaults.collision_frequency,
                   help=f"Nosé-Hoover collision frequency, 1/ps (default: {defaults.collision_frequency:g})")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"{seed_help} (default: {defaults.seed})")
    p.add_argument("--mode", choices=list(MODES), default=None,
                   help=f"batched: all replicas in one OpenMM Context, the model called once for all; per-replica: "
                        f"one Context each (default: {defaults.mode}; per-replica with --mm-system)")
    p.add_argument("--platform", default=None, choices=list(PLATFORMS),
                   help="OpenMM platform for integration (default: CUDA with a cuda --device, on the same GPU, "
                        "else CPU with one thread; the model runs in torch)")
    _add_device_option(p, defaults.device, "the model runs on")


def _add_device_option(p: argparse.ArgumentParser, default: str, what: str) -> None:
    p.add_argument("--device", default=default,
                   help=f"torch device {what}: cpu, cuda or cuda:N; with several processes (--nproc, torchrun) "
                        f"cuda gives each its own GPU (default: {default})")


def _add_nproc_option(p: argparse.ArgumentParser, command: str, shared: str) -> None:
    p.add_argument("--nproc", type=_positive_int, default=1,
                   help=f"processes to split the replicas over, one core each (default: 1); {shared}. For several "
                        f"nodes start the processes with torchrun instead: torchrun --nproc-per-node N -m "
                        f"stable_md.cli {command} ...")


def _join_torchrun(args: argparse.Namespace) -> None:
    """Join the ranks torchrun started, if it started this process; ranks other than 0 print to /dev/null."""
    from stable_md.devices import check_device
    from stable_md.distributed import join_from_environment, started_by_torchrun

    if not started_by_torchrun():
        return
    if args.nproc != 1:
        raise ValueError("--nproc is for local processes started by stable-md; under torchrun the ranks are "
                         "torchrun's (--nproc-per-node), so leave --nproc out")
    check_device(args.device)
    if not join_from_environment().main:
        sys.stdout = open(os.devnull, "w")


def _md_settings(args: argparse.Namespace, defaults: MDSettings = MDSettings()) -> MDSettings:
    """The MDSettings the MD options of ``args`` give; without --mode, per-replica in MM surroundings (the only
    mode they run in), else ``defaults``'."""
    mode = args.mode
    if mode is None:
        mode = "per-replica" if getattr(args, "mm_system", None) else defaults.mode
    return MDSettings(integrator=args.integrator, temperature=args.temperature, timestep=args.timestep,
                      friction=args.friction, collision_frequency=args.collision_frequency, seed=args.seed,
                      platform=args.platform, mode=mode, device=args.device)


def _add_environment_options(p: argparse.ArgumentParser, structure: bool) -> None:
    """--mm-system and --model-atoms (and refine's --structure): the model's atoms inside MM surroundings."""
    group = p.add_argument_group(
        "MM surroundings", "run the model on part of a System (a solute in MM water) as OpenMM-ML's "
                           "createMixedSystem does: the model computes --model-atoms, the MM force field the rest "
                           "and the coupling between them (mechanical embedding); one Context per replica")
    if structure:
        group.add_argument("--structure", default=None,
                           help="with --mm-system: PDB or PDBx/mmCIF file of every particle (an equilibrated "
                                "solvated molecule); every replica starts there")
    group.add_argument("--mm-system", default=None,
                       help="OpenMM System XML of every particle of --structure, modelled entirely by an MM force "
                            "field (XmlSerializer.serialize(forcefield.createSystem(topology, ...))); no barostat")
    group.add_argument("--model-atoms", default=None,
                       help="the atoms the model computes: resname:NAME (every atom of the residues named NAME) or "
                            "0-based indices and inclusive ranges, e.g. 0-8; whole molecules, in the data's atom "
                            "order")


def _ranges(indices: Sequence[int]) -> str:
    """0-8,20: indices as the inclusive ranges --model-atoms takes."""
    parts, start = [], None
    ordered = [int(i) for i in indices]
    for k, index in enumerate(ordered):
        if start is None:
            start = index
        if k + 1 == len(ordered) or ordered[k + 1] != index + 1:
            parts.append(str(start) if start == index else f"{start}-{index}")
            start = None
    return ",".join(parts)


def _environment(args: argparse.Namespace):
    """The MMEnvironment the options name, or None; the options that need each other are checked here."""
    given = {"--mm-system": args.mm_system, "--model-atoms": args.model_atoms}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if args.structure is None:
        missing.append("--structure")
    if missing:
        raise ValueError(f"MM surroundings need --structure, --mm-system and --model-atoms together; missing "
                         f"{', '.join(missing)}")
    from openmm_bridge.mm_environment import MMEnvironment

    return MMEnvironment.from_files(args.structure, args.mm_system, args.model_atoms)


def _add_run_options(p: argparse.ArgumentParser, overwrite_help: str, resume_help: str) -> None:
    """--overwrite, --resume and --no-progress of the long-running commands."""
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


class _DeprecatedSpelling(argparse.Action):
    """An old spelling of an option, still accepted with a note on stderr; hidden from --help."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated; use {self.new} (same meaning and unit)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_deprecated_spelling(p: argparse.ArgumentParser, old: str, new: str, type) -> None:
    dest = new.lstrip("-").replace("-", "_")
    p.add_argument(old, dest=dest, type=type, action=_DeprecatedSpelling, new=new)


def _add_criterion_options(p: argparse.ArgumentParser, purpose: str, what: str) -> None:
    """--criterion and --threshold from the criterion registry, with each criterion's default for ``purpose``."""
    from stable_md.stability import CRITERIA, criterion_names, default_threshold

    names = criterion_names(purpose)
    described = "; ".join(f"{name}: {CRITERIA[name].description}" for name in names)
    p.add_argument("--criterion", choices=names, default="bond", help=f"{what}: {described} (default: bond)")
    defaults = ", ".join(f"{default_threshold(name, purpose):g}{' ' + CRITERIA[name].unit if CRITERIA[name].unit else ''}"
                         f" for {name}" for name in names)
    p.add_argument("--threshold", type=_positive_float, default=None,
                   help=f"criterion threshold (default: {defaults})")


def _add_energy_force_weights(p: argparse.ArgumentParser) -> None:
    """The energy/force loss weights, shared by pretrain and refine (refine's regularizer is the same loss)."""
    p.add_argument("--energy-weight", type=_non_negative_float, default=1.0,
                   help="weight of the per-atom energy MSE in the energy/force loss, eV^-2 (default: 1)")
    p.add_argument("--force-weight", type=_non_negative_float, default=100.0,
                   help="weight of the force MSE in the energy/force loss, (eV/Å)^-2 (default: 100)")


def _hyper_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--hyper expects NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return name.strip(), parsed


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _fraction_or_zero(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def _observable_weight(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number >= 0, got {text}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a finite number >= 0, got {text}")
    return value


def _fraction_below_one(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 <= value < 1):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stable-md",
        description="StABlE training: make neural-network interatomic potentials stable in MD "
                    "without new QM data.")
    parser.add_argument("--version", action="version", version=f"stable-md {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("pretrain", help="fit a new model to energies and forces",
                            description="Fit a new model to the energies and forces of a data set "
                                        "(the ordinary NNIP training that precedes StABlE refinement).")
    p.add_argument("--arch", choices=["schnet", "ani", "nequip", "mace"], default="schnet",
                   help="backbone architecture (default: schnet)")
    p.add_argument("--data", required=True, help="extended XYZ (energies, forces) or MD17-style .npz file")
    p.add_argument("-o", "--output", required=True, help="model file to write, e.g. model.pt")
    p.add_argument("--units", default=None,
                   help="energy unit of the data file (eV, kcal/mol, kJ/mol, Hartree, meV); forces in "
                        "that unit per Å. Default: eV for xyz, kcal/mol for .npz")
    p.add_argument("--energy-key", default="energy", help="energy key in extended XYZ (default: energy)")
    p.add_argument("--forces-key", default="forces", help="forces key in extended XYZ (default: forces)")
    p.add_argument("--n-train", type=_positive_int, default=None,
                   help="training frames (default: 80%% of the file, at most 1000)")
    p.add_argument("--n-val", type=_positive_int, default=None,
                   help="validation frames (default: 10%% of the file, at least 1, at most 100)")
    p.add_argument("--n-test", type=int, default=1000,
                   help="test frames, at most what remains (default: 1000; -1 = all remaining)")
    p.add_argument("--epochs", type=_positive_int, default=300, help="maximum epochs (default: 300)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="frames per step (default: 16)")
    _add_energy_force_weights(p)
    p.add_argument("--patience", type=_positive_int, default=40,
                   help="stop after this many epochs without validation improvement (default: 40)")
    p.add_argument("--max-time", type=_positive_float, default=None,
                   help="stop after this many minutes, keeping the best model")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and shuffling")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cpu", help="torch device to train on: cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--hyper", type=_hyper_value, action="append", default=[], metavar="NAME=VALUE",
                   help="architecture hyperparameter, repeatable (e.g. --hyper cutoff=4.5)")
    _add_run_options(p, "replace an existing output file", "continue an interrupted run from its checkpoint")
    p.set_defaults(func=_pretrain)

    p = commands.add_parser("info", help="print a model file's metadata")
    p.add_argument("model", help="stable-md model file")
    p.add_argument("--json", action="store_true", help="print the raw metadata as JSON")
    p.set_defaults(func=_info)

    p = commands.add_parser("import", help="turn a MACE, NequIP or torchani model into a stable-md model file",
                            description="Import a model trained elsewhere so that stable-md can refine it. "
                                        "MACE and torchani files are pickles: loading them runs code from the "
                                        "file, so it needs --trust-pickle.")
    p.add_argument("format", choices=["mace", "nequip", "ani"], help="format of SOURCE")
    p.add_argument("source", help="the model file to import")
    p.add_argument("-o", "--output", required=True, help="stable-md model file to write")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading pickle-based files (only for files you trust)")
    p.add_argument("--species", default=None,
                   help="comma-separated atomic numbers to keep (default: all the model knows)")
    p.add_argument("--reference", default=None,
                   help="structures (any file ASE reads, e.g. the training data) whose bonds the model file stores "
                        "for stability guards (StabilityReporter, simulate --structure); default: none stored")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_import)

    p = commands.add_parser("export", help="write a refined model back in the format it was imported from",
                            description="Write a stable-md model imported from MACE, NequIP or torchani (and "
                                        "refined) back in that framework's format: a MACE model file for "
                                        "MACECalculator, a deployed NequIP file for NequIPCalculator, a "
                                        "torch.save'd torchani model. The architecture comes from the file it "
                                        "was imported from (or --template); MACE and torchani files are "
                                        "pickles, so loading them needs --trust-pickle.")
    p.add_argument("model", help="stable-md model file (imported, then refined)")
    p.add_argument("--format", required=True, choices=["mace", "nequip", "ani"], help="the framework to write for")
    p.add_argument("-o", "--output", required=True, help="the file to write (e.g. refined.model)")
    p.add_argument("--template", default=None,
                   help="the original file of that framework (default: the path the model was imported from)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading the pickle-based template (only files you trust)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_export)

    p = commands.add_parser("simulate", help="run many MD replicas of a model in OpenMM",
                            description="Run R replicas of a model side by side in OpenMM (batched in one "
                                        "Context by default) and write one DCD trajectory per replica, a "
                                        "topology PDB, a per-replica state log and a JSON summary. A replica "
                                        "whose energy, forces or positions become non-finite is frozen and "
                                        "reported as unstable; the others continue.")
    p.add_argument("model", help="stable-md model file")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--structure", help="starting structure(s): any file ASE reads; with several frames, "
                                           "replicas start from frames spread over the file")
    start.add_argument("--data", help="data set (extended XYZ or MD17 .npz); replicas start from frames "
                                      "spread evenly over it")
    p.add_argument("-o", "--output", required=True, help="run directory to write")
    p.add_argument("--replicas", type=_positive_int, default=32, help="number of replicas (default: 32)")
    _add_nproc_option(p, "simulate", "each writes its replicas' trajectories; process 0 the log and checkpoint")
    _add_md_options(p, SIMULATE_MD, INTEGRATORS, "seed of velocities and Langevin noise")
    p.add_argument("--time", default="10ps",
                   help="simulated time per replica, e.g. 10ps, 500fs, 1ns; a bare number is ps (default: 10ps)")
    p.add_argument("--check-every", type=_positive_int, default=100,
                   help="steps between stability checks, trajectory frames and state-log rows (default: 100)")
    _add_deprecated_spelling(p, "--frame-interval", "--check-every", _positive_int)
    p.add_argument("--stability", choices=["bond", "none"], default="bond",
                   help="bond: stop a replica whose bond lengths deviate from the reference frames' by more "
                        "than --threshold (default); none: stop only on non-finite values")
    p.add_argument("--threshold", type=_positive_float, default=0.5,
                   help="largest bond-length deviation in Å before a replica counts as unstable (default: 0.5, "
                        "the paper's evaluation threshold)")
    _add_deprecated_spelling(p, "--bond-threshold", "--threshold", _positive_float)
    p.add_argument("--force", choices=["python", "torch"], default="python",
                   help="python: openmm.PythonForce (default); torch: openmmtorch.TorchForce")
    p.add_argument("--energy-key", default="energy", help="energy key for --data extended XYZ")
    p.add_argument("--forces-key", default="forces", help="forces key for --data extended XYZ")
    _add_environment_options(p, structure=False)
    _add_run_options(p, "replace an earlier run in the output directory",
                     "continue an interrupted run from its checkpoint")
    p.set_defaults(func=_simulate)

    _add_refine_parser(commands)
    _add_evaluate_parser(commands)
    _add_data_parser(commands)
    return parser


def _add_refine_parser(commands) -> None:
    from stable_md.observables import OBSERVABLES
    from stable_md.refinement import ESTIMATORS

    p = commands.add_parser(
        "refine", help="StABlE training: make a model stable in MD without new QM data",
        description="StABlE training (Algorithm 1 of the paper): simulate replicas of the model, catch the ones "
                    "that become unstable, rewind them, and fine-tune the model so that its simulations reproduce "
                    "the reference observable of the data set (Boltzmann estimator), regularized by the "
                    "energy/force loss on the same data. Simulation and learning phases alternate until a budget "
                    "is spent. Writes the refined model and a run directory with log.jsonl, checkpoint.pt, "
                    "summary.json and PNG plots.")
    p.add_argument("model", help="stable-md model file to refine")
    p.add_argument("--data", required=True, help="the data set (extended XYZ or MD17 .npz): starting frames, "
                                                 "reference observables and energy/force regularizer")
    p.add_argument("-o", "--output", default=None,
                   help="refined model file (default: <model>.stable.pt next to the model)")
    p.add_argument("--run-dir", default=None, help="run directory (default: <output stem>.refine/)")
    p.add_argument("--obs", action="append", choices=sorted(OBSERVABLES), default=None,
                   help="observable to match, repeatable: " + "; ".join(f"{k}: {v.description}" for k, v in OBSERVABLES.items())
                        + " (default: hr; local-bonds with --estimator local)")
    p.add_argument("--estimator", choices=list(ESTIMATORS), default="global",
                   help="global (default): the Boltzmann estimator over whole frames; local: the localized estimator "
                        "(the paper's for water): every molecule of every sample is a neighbourhood with its own "
                        "energy and observable, and a balanced selection of them (--local-bins, --local-per-bin) "
                        "gives the gradient, so that a few distorted molecules in a liquid are not averaged away")
    p.add_argument("--local-bins", type=_positive_int, default=100,
                   help="with --estimator local: bins of the neighbourhoods' deviation from the reference "
                        "(default: 100, as the paper)")
    p.add_argument("--local-per-bin", type=_positive_int, default=5,
                   help="with --estimator local: neighbourhoods drawn from each bin (default: 5, as the paper)")
    p.add_argument("--obs-weight", type=_observable_weight, action="append", default=None,
                   help="weight of each --obs, in the same order, or auto (default): calibrated at the first "
                        "learning epoch and raised on later ones so that the observables hold at least "
                        "--obs-share of every step's gradient norm, whatever the molecule's size or the backbone")
    p.add_argument("--obs-share", type=_fraction, default=0.3,
                   help="with --obs-weight auto: the least share of each learning step's gradient norm the "
                        "observables hold (default: 0.3)")
    _add_criterion_options(p, "training", "instability criterion")
    p.add_argument("--replicas", type=_positive_int, default=32, help="parallel replicas R (default: 32)")
    _add_nproc_option(p, "refine", "the estimator's sums and the gradient are shared over torch.distributed (gloo)")
    _add_md_options(p, MDSettings(), ("nose-hoover", "langevin"), "seed of velocities, the held-out frames and "
                                                                  "data minibatches")
    p.add_argument("--steps-per-epoch", type=_positive_int, default=1000,
                   help="t: MD steps per epoch of either phase (default: 1000)")
    p.add_argument("--sample-every", type=_positive_int, default=10,
                   help="S: steps between samples for the estimator (default: 10)")
    p.add_argument("--check-every", type=_positive_int, default=50,
                   help="steps between stability checks (default: 50)")
    p.add_argument("--f-max", type=_fraction, default=0.2,
                   help="unstable fraction that ends a simulation phase (default: 0.2)")
    p.add_argument("--f-min", type=_fraction_or_zero, default=0.05,
                   help="unstable fraction that ends a learning phase (default: 0.05)")
    p.add_argument("--simulation-patience", type=_count, default=10,
                   help="epochs after which a simulation phase turns to learning once any replica is unstable, "
                        "even below --f-max (default: 10; 0 waits for --f-max as the paper)")
    p.add_argument("--learning-patience", type=_count, default=20,
                   help="learning epochs after which a learning phase ends even above --f-min, and the "
                        "replicas simulate on past the replayed window (default: 20; 0 waits for --f-min as "
                        "the paper)")
    p.add_argument("--qm-weight", type=_non_negative_float, default=10.0,
                   help="λ, weight of the energy/force loss on the data (default: 10)")
    p.add_argument("--qm-batch", type=_positive_int, default=64,
                   help="data frames drawn per learning epoch for the energy/force loss (default: 64)")
    _add_energy_force_weights(p)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="adam",
                   help="default: adam (the paper used SGD; see the docs for why adam is the default here)")
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="learning rate (default: 1e-4)")
    p.add_argument("--lr-decay", type=_positive_float, default=1.0,
                   help="learning rate factor per learning epoch (default: 1, no decay)")
    p.add_argument("--momentum", type=_non_negative_float, default=0.0, help="SGD momentum (default: 0)")
    p.add_argument("--clip-grad", type=_positive_float, default=None,
                   help="clip the gradient norm to this value (default: no clipping)")
    p.add_argument("--max-cycles", type=_positive_int, default=4,
                   help="stop after this many simulation+learning cycles (default: 4, as the paper)")
    p.add_argument("--max-epochs", type=_positive_int, default=100,
                   help="stop after this many learning epochs (default: 100)")
    p.add_argument("--max-sim-time", default="50ps",
                   help="stop when the simulation phases have run this long, e.g. 50ps (default: 50ps)")
    p.add_argument("--max-time", type=_positive_float, default=None, help="stop after this many minutes")
    p.add_argument("--train-frames", choices=["auto", "pretrain", "all"], default="auto",
                   help="auto (default): if the model was pretrained on --data (same frames, whatever the path), "
                        "use only its training frames so held-out frames stay held out, otherwise hold out "
                        "--holdout-fraction of the frames for the error report; pretrain: require the pretraining "
                        "frames; all: every frame of --data, none held out")
    p.add_argument("--holdout-fraction", type=_fraction_below_one, default=0.1,
                   help="with --train-frames auto and a model not pretrained on --data: fraction of the frames "
                        "held out (random, --seed) for the before/after error report (default: 0.1)")
    _add_environment_options(p, structure=True)
    _add_run_options(p, "replace an earlier output and run directory",
                     "continue an interrupted run from its checkpoint")
    p.set_defaults(func=_refine)


def _add_evaluate_parser(commands) -> None:
    from stable_md.observables import binned_observables

    p = commands.add_parser(
        "evaluate", help="compare models' MD stability and accuracy on identical held-out starts",
        description="The paper's evaluation protocol (appendix A.7-A.8): R replicas of every model start from the "
                    "same held-out data frames with the same velocities (Nosé-Hoover at --temperature, up to "
                    "--time). A replica that fails the stability criterion is stopped there. Reports the time to "
                    "instability per replica (median, mean, fraction unstable against time), h(r) or RDFs of the "
                    "stable part against the data's (Boltzmann-reweighted to --temperature when "
                    "--data-temperature differs, with the effective sample size), the VACF, diffusivity for "
                    "periodic systems, and energy/force MAE on held-out frames. Writes evaluation.json and PNG "
                    "figures into the output directory.")
    p.add_argument("models", nargs="+", help="stable-md model files (baseline, refined, ...)")
    p.add_argument("--data", required=True, help="data set (extended XYZ or MD17 .npz): held-out starts, "
                                                 "reference observable and held-out QM frames")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--label", action="append", default=None,
                   help="name of each model in tables and plots, in order (default: file names)")
    p.add_argument("--units", default=None, help="energy unit of --data (default: eV for xyz, kcal/mol for .npz)")
    p.add_argument("--replicas", type=_positive_int, default=64, help="replicas per model (default: 64)")
    _add_md_options(p, MDSettings(), INTEGRATORS, "seed of the initial velocities and of the bootstrap intervals")
    p.add_argument("--data-temperature", type=_positive_float, default=None,
                   help="temperature (K) the data were sampled at; when it differs from --temperature the "
                        "reference is Boltzmann-reweighted (default: assume the data are at --temperature)")
    p.add_argument("--time", default="10ps", help="maximum simulated time per replica, e.g. 10ps, 300ps (default: "
                                                  "10ps; the paper used 300ps)")
    _add_criterion_options(p, "evaluation", "stability criterion")
    p.add_argument("--check-every", type=_positive_int, default=100,
                   help="steps between stability checks and observable samples (default: 100)")
    p.add_argument("--rdf-window", type=_positive_int, default=20,
                   help="checks averaged by the rdf criterion (default: 20, i.e. 1 ps at the defaults)")
    p.add_argument("--obs", choices=binned_observables(), default=None,
                   help="observable compared with the data (default: hr for molecules, rdf for periodic boxes)")
    p.add_argument("--error-frames", type=_positive_int, default=1000,
                   help="held-out data frames for the energy/force MAE (default: 1000)")
    p.add_argument("--vacf-window", type=int, default=100,
                   help="steps recorded at every step at the start for the VACF (default: 100; 0: no VACF)")
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="models evaluated at once, one process and one thread each (default: 1; use the number "
                        "of cores)")
    p.add_argument("--nproc", type=_positive_int, default=1,
                   help="instead of --jobs: processes to split each model's replicas over, one core each "
                        "(default: 1); uses several cores for a single model")
    _add_run_options(p, "replace an earlier evaluation in the output directory",
                     "finish an interrupted evaluation, skipping models done")
    p.set_defaults(func=_evaluate)


def _add_data_parser(commands) -> None:
    from stable_md.refdata import xtb_md

    p = commands.add_parser("data", help="make reference data (GFN2-xTB MD, SPC/Fw water, an Amber14 peptide) or "
                                         "convert it",
                            description="Make reference data sets with real physics on this machine.")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    x = kinds.add_parser("xtb-md", help="GFN2-xTB Langevin MD of a molecule (tblite), frames to extended XYZ",
                         description=xtb_md.DESCRIPTION)
    xtb_md.add_arguments(x)
    x.set_defaults(func=_data_xtb)
    w = kinds.add_parser("water", help="flexible SPC/Fw water box in OpenMM, frames to extended XYZ",
                         description="N flexible SPC/Fw water molecules (Wu, Tepper & Voth 2006) at constant "
                                     "volume in OpenMM (PME, Langevin), labelled with OpenMM energies (eV) and "
                                     "forces (eV/Å). Resumes an existing output file. The OpenMM state stays "
                                     "beside it as OUTPUT.checkpoint.npz (positions, velocities, noise state: 8 kB for "
                                     "32 molecules): a later run with a larger --frames continues the same trajectory "
                                     "from it. Delete it once the data set is final.")
    w.add_argument("--molecules", type=_positive_int, default=64, help="water molecules (default: 64)")
    w.add_argument("--density", type=_positive_float, default=0.997, help="g/cm³ (default: 0.997)")
    _add_labelled_md_options(w, temperature=300.0, timestep=1.0, frames=1000,
                             seed_help="seed of the box and the Langevin noise")
    w.set_defaults(func=_data_water)
    a = kinds.add_parser("amber-peptide", help="capped alanine peptide (Ac-Ala3-NHMe) under Amber14 in OpenMM, "
                                               "frames to extended XYZ",
                         description="Ac-(Ala)n-NHMe (default n = 3: the paper's tetrapeptide) with L-alanines, built "
                                     "from a SMILES by RDKit with hydrogens added by OpenMM's Modeller, under "
                                     "amber14-all in vacuum or OBC2 implicit solvent, every bond flexible, Langevin "
                                     "at 500 K (the paper's temperature); frames labelled with OpenMM energies (eV) "
                                     "and forces (eV/Å). Resumes an existing output file from OUTPUT.checkpoint.npz, "
                                     "as data water does.")
    a.add_argument("--alanines", type=_positive_int, default=3, help="alanines between the caps (default: 3)")
    a.add_argument("--solvent", choices=["vacuum", "obc2"], default="vacuum",
                   help="vacuum (default) or obc2 (generalized Born implicit water)")
    _add_labelled_md_options(a, temperature=500.0, timestep=0.5, frames=2000,
                             seed_help="seed of the RDKit conformer and the Langevin noise")
    a.set_defaults(func=_data_peptide)
    c = kinds.add_parser("convert", help="write a data set as MD17-style .npz (compressed) or extended XYZ",
                         description="Read any data set stable-md reads and write it as an MD17-style .npz (keys "
                                     "R, z, E, F in kcal/mol and kcal/mol/Å, float32 R and F, compressed) or "
                                     "extended XYZ (eV). Several inputs are concatenated in order.")
    c.add_argument("inputs", nargs="+", help="data files (extended XYZ or .npz)")
    c.add_argument("-o", "--output", required=True, help=".npz or .extxyz/.xyz file to write")
    c.add_argument("--units", default=None, help="energy unit of the inputs (default: eV for xyz, kcal/mol for .npz)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    c.set_defaults(func=_data_convert)


def _add_labelled_md_options(p: argparse.ArgumentParser, temperature: float, timestep: float, frames: int,
                             seed_help: str) -> None:
    """The options of the OpenMM data generators (data water, data amber-peptide): one list of names."""
    p.add_argument("-o", "--output", required=True, help="extended XYZ file to write")
    p.add_argument("--temperature", type=_positive_float, default=temperature, help=f"K (default: {temperature:g})")
    p.add_argument("--timestep", type=_positive_float, default=timestep, help=f"fs (default: {timestep:g})")
    p.add_argument("--friction", type=_positive_float, default=1.0, help="Langevin friction, 1/ps (default: 1)")
    p.add_argument("--frames", type=_positive_int, default=frames, help=f"frames to write (default: {frames})")
    p.add_argument("--every", type=_positive_int, default=100, help="steps between frames (default: 100)")
    p.add_argument("--equilibration", type=int, default=20000,
                   help=f"unstored equilibration steps (default: 20000 = {20000 * timestep / 1000:g} ps at "
                        f"{timestep:g} fs)")
    p.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default: 0)")
    p.add_argument("--dense-frames", type=int, default=200,
                   help="frames one step apart with velocities after the regular ones, marked md_segment=dense: the "
                        "reference VACF that evaluate compares against; never training data (default: 200; 0: none)")
    p.add_argument("--no-resume", action="store_true", help="fail if the output exists instead of continuing it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _pretrain(args: argparse.Namespace) -> int:
    from stable_md.data import load_dataset
    from stable_md.pretrain import PretrainSettings, SplitSettings, pretrain

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; refusing to overwrite it (use --overwrite)")
    data = load_dataset(args.data, units=args.units, energy_key=args.energy_key, forces_key=args.forces_key)
    split = SplitSettings(n_train=args.n_train, n_val=args.n_val,
                          n_test=None if args.n_test < 0 else args.n_test, seed=args.seed)
    settings = PretrainSettings(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, energy_weight=args.energy_weight,
        force_weight=args.force_weight, patience=args.patience,
        max_time_s=None if args.max_time is None else 60.0 * args.max_time, seed=args.seed, dtype=args.dtype)
    print(f"stable-md pretrain: {args.arch} on {len(data)} frames of {data.source} "
          f"({data.n_atoms} atoms, species {data.species})")
    _, report = pretrain(data, args.arch, output, split=split, settings=settings,
                         hyperparameters=dict(args.hyper), units=args.units, overwrite=args.overwrite,
                         resume=args.resume, progress=not args.no_progress, announce=print, device=args.device)
    print(f"\nstopped by {report['stopped_by']} after {report['epochs']} epochs "
          f"(best epoch {report['best_epoch']}, {report['wall_time_s']:.0f} s, "
          f"{report['n_parameters']} parameters)")
    print(f"{'set':<12}{'frames':>8}{'energy MAE (meV)':>20}{'force MAE (meV/Å)':>20}")
    for name in ("validation", "test"):
        errors = report[name]
        if errors:
            print(f"{name:<12}{errors['frames']:>8}{errors['energy_mae_meV']:>20.2f}"
                  f"{errors['force_mae_meV_per_A']:>20.2f}")
    print(f"wrote {output} (log: {output.with_suffix('.log.jsonl')})")
    if report["stopped_by"] == "diverged":
        print(f"stable-md pretrain: the training loss became NaN or inf in epoch {report['epochs'] + 1}; the "
              f"model of the best epoch ({report['best_epoch']}) was written. Lower --lr (now {args.lr:g}) to train "
              f"further", file=sys.stderr)
        return 1
    return 0


def _info(args: argparse.Namespace) -> int:
    from stable_md.potentials import read_metadata

    metadata = read_metadata(args.model)
    if args.json:
        print(json.dumps(metadata, indent=2))
        return 0
    print(f"{args.model}: stable-md model file (format {metadata.get('format_version')}, "
          f"written by stable-md {metadata.get('stable_md_version')})")
    print(f"  architecture  {metadata['arch']}")
    print(f"  species       {metadata['species']}")
    print(f"  cutoff        {metadata['cutoff']} Å")
    print(f"  parameters    {metadata.get('n_parameters')}")
    print(f"  dtype         {metadata.get('dtype')}")
    print(f"  units         {metadata.get('units')}")
    print(f"  hyperparameters {json.dumps(metadata.get('hyperparameters', {}))}")
    for entry in metadata.get("history", []):
        report = entry.get("report", {})
        line = f"  history: {entry.get('stage')}"
        if "data" in entry:
            line += f" on {entry['data']}"
        test = report.get("test") or report.get("validation")
        if test:
            line += (f"; energy MAE {test['energy_mae_meV']:.1f} meV, "
                     f"force MAE {test['force_mae_meV_per_A']:.1f} meV/Å")
        print(line)
    return 0


def _import(args: argparse.Namespace) -> int:
    from stable_md.potentials import build_metadata, save_model
    from stable_md.potentials.importers import import_model

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; refusing to overwrite it (use --overwrite)")
    species = None
    if args.species:
        try:
            species = [int(z) for z in args.species.split(",")]
        except ValueError:
            raise ValueError(f"--species expects comma-separated atomic numbers, got {args.species!r}") from None
    extra = {} if args.reference is None else _guard_reference(args.reference)
    potential, hyper = import_model(args.format, args.source, trust_pickle=args.trust_pickle, species=species)
    unknown = sorted(set(extra.get("stability_reference", {}).get("numbers", [])) -
                     set(potential.species_numbers.tolist()))
    if unknown:
        raise ValueError(f"--reference {args.reference} holds elements {unknown} the imported model does not know")
    history = [{"stage": "import", "format": args.format, "source": str(args.source)}]
    save_model(potential, output, build_metadata(potential, hyper, history=history, extra=extra),
               overwrite=args.overwrite)
    print(f"wrote {output}: {args.format} model, species {potential.species_numbers.tolist()}, "
          f"cutoff {potential.cutoff} Å")
    return 0


def _guard_reference(path: str) -> dict:
    """The model-file entry a stability guard reads: the bonds of the frames in ``path``."""
    from stable_md.guard import REFERENCE_KEY, stored_reference_of
    from stable_md.structures import read_structures

    numbers, positions, cells = read_structures(path)
    return {REFERENCE_KEY: stored_reference_of(numbers, positions, None if cells is None else cells[0],
                                               f"{min(len(positions), 1000)} frames of {Path(path).resolve()}")}


def _export(args: argparse.Namespace) -> int:
    from stable_md.potentials.exporters import export_model

    output = export_model(args.model, args.format, args.output, template=args.template,
                          trust_pickle=args.trust_pickle, overwrite=args.overwrite)
    print(f"wrote {output}: {args.format} model file with the parameters of {args.model}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from stable_md.structures import starting_frames
    from stable_md.units import parse_time_fs

    try:
        from stable_md.simulate import SimulationSettings, run_simulation
    except ImportError as error:
        raise ImportError(f"simulate needs OpenMM: pip install 'stable-md[openmm]' ({error})") from error
    if args.overwrite and args.resume:
        raise ValueError("--overwrite and --resume exclude each other")
    from stable_md.devices import check_device

    _join_torchrun(args)
    check_device(args.device)
    total_time = parse_time_fs(args.time)
    if total_time < args.timestep:
        raise ValueError(f"--time {args.time} is shorter than one --timestep ({args.timestep} fs)")
    environment = _environment(args)
    if environment is not None:
        import numpy as np

        numbers, cell, reference = environment.numbers, None, None
        starts = np.repeat(environment.positions[None], args.replicas, axis=0)
        source = (f"{args.structure} ({environment.n_particles} particles; the model computes "
                  f"{len(numbers)} of them, {args.mm_system} the rest)")
    else:
        numbers, starts, cell, source, reference = starting_frames(
            structure=args.structure, data=args.data, n_replicas=args.replicas,
            energy_key=args.energy_key, forces_key=args.forces_key)
    settings = SimulationSettings(
        model=str(Path(args.model).resolve()), n_replicas=args.replicas, numbers=[int(z) for z in numbers],
        md=_md_settings(args), total_time=total_time, frame_interval=args.check_every, backend=args.force,
        periodic=cell is not None or (environment is not None and environment.box is not None),
        stability=args.stability, bond_threshold=args.threshold)
    print(f"stable-md simulate: {args.replicas} replicas of {len(numbers)} atoms from {source}, "
          f"{args.integrator} at {args.temperature:g} K, {args.timestep:g} fs steps, "
          f"{total_time / 1000:g} ps ({settings.n_steps} steps), {settings.md.mode} on {settings.md.platform}, "
          f"model on "
          f"{args.device}"
          + ("" if args.nproc == 1 else f", over {args.nproc} processes"))
    summary = run_simulation(settings, starts, args.output, cell=cell, overwrite=args.overwrite,
                             resume=args.resume, progress=not args.no_progress,
                             # a structure alone: the model file's stored bonds, or the structure's (run_simulation)
                             reference_positions=reference if args.data else None, nproc=args.nproc,
                             environment=environment)
    if summary is None:  # a torchrun rank other than 0
        return 0
    rate = summary["replica_steps_per_second"]
    print(f"{summary['steps']} steps in {summary['wall_seconds']:.1f} s "
          f"({rate:.1f} replica-steps/s, {summary['ns_per_day_all_replicas']:.3f} ns/day over all replicas)")
    print(f"unstable replicas: {summary['n_unstable']} of {args.replicas}")
    for entry in summary["replicas"]:
        if entry["status"] == "unstable":
            print(f"  replica {entry['replica']}: unstable at {entry['unstable_at_ps']:.3f} ps"
                  + (f" ({entry['reason']})" if "reason" in entry else ""))
    output = Path(args.output)
    print(f"wrote {output}/replica_*.dcd with {output}/topology.pdb (mdtraj.load(dcd, top=pdb)), "
          f"{output}/state.csv, {output}/summary.json")
    return 0


def _refine(args: argparse.Namespace) -> int:
    from stable_md.refinement import RefineSettings, refine
    from stable_md.units import parse_time_fs

    _join_torchrun(args)
    if args.overwrite and args.resume:
        raise ValueError("--overwrite and --resume exclude each other")
    model = Path(args.model)
    output = Path(args.output) if args.output else model.with_name(model.stem + ".stable.pt")
    observables = args.obs
    settings = RefineSettings(
        observables=observables, observable_weights=args.obs_weight or ["auto"], estimator=args.estimator,
        local_bins=args.local_bins, local_per_bin=args.local_per_bin,
        observable_share=args.obs_share, holdout_fraction=args.holdout_fraction, criterion=args.criterion,
        threshold=args.threshold, n_replicas=args.replicas, md=_md_settings(args),
        steps_per_epoch=args.steps_per_epoch, sample_every=args.sample_every, check_every=args.check_every,
        f_max=args.f_max, f_min=args.f_min, simulation_patience=args.simulation_patience or None,
        learning_patience=args.learning_patience or None,
        qm_weight=args.qm_weight, qm_batch=args.qm_batch, energy_weight=args.energy_weight,
        force_weight=args.force_weight,
        optimizer=args.optimizer, lr=args.lr, lr_decay=args.lr_decay, momentum=args.momentum,
        clip_grad=args.clip_grad, max_cycles=args.max_cycles, max_epochs=args.max_epochs,
        max_simulation_time=parse_time_fs(args.max_sim_time),
        max_wall_time=None if args.max_time is None else 60.0 * args.max_time,
        train_frames=args.train_frames)
    ranks = "" if args.nproc == 1 else f" over {args.nproc} processes"
    print(f"stable-md refine: {model} on {args.data}; observables {', '.join(settings.observables)} "
          f"({settings.estimator} estimator); "
          f"{settings.criterion} criterion at {settings.threshold:g} Å; {settings.n_replicas} replicas{ranks} at "
          f"{settings.md.temperature:g} K, t = {settings.steps_per_epoch} steps of {settings.md.timestep:g} fs")
    environment = _environment(args)
    if environment is None and args.structure is not None:
        raise ValueError("refine starts from the frames of --data; --structure is for MM surroundings, with "
                         "--mm-system and --model-atoms")
    if environment is not None:
        print(f"in MM surroundings: {environment.source}; the model computes atoms "
              f"{_ranges(environment.model_atoms)} of {environment.n_particles}")
    result = refine(model, args.data, output, settings, run_directory=args.run_dir, overwrite=args.overwrite,
                    resume=args.resume, progress=not args.no_progress,
                    announce=lambda line: print(line, flush=True), nproc=args.nproc, environment=environment)
    if not result.summary:  # a torchrun rank other than 0
        return 0
    summary = result.summary
    print(summary["message"])
    if summary["observable_weights"] is not None:
        share = summary["observable_gradient_share_median"]
        shown = ", ".join(f"{w:.4g}" for w in summary["observable_weights_median"])
        print(f"observable weights {shown}" + (", median over learning epochs," if settings.auto_weights else "")
              + f" ({summary['observable_weights_from']})"
              + ("" if share is None else f"; median observable share of the gradient {100 * share:.0f}%"))
    if summary.get("advice"):
        print(f"note: {summary['advice']}")
    split = summary["time_split"]
    print("time: " + ", ".join(f"{part.replace('_', '/')} {split['seconds'][part]:.0f} s" for part in split["seconds"])
          + ("" if split["first_learning_epoch_after_ps"] is None else
             f"; first learning epoch after {split['first_learning_epoch_after_ps']:g} ps of simulation"))
    before, after = summary["test_errors_before"], summary["test_errors_after"]
    if before and after:
        print(f"held-out force MAE: {before['force_mae_meV_per_A']:.1f} -> {after['force_mae_meV_per_A']:.1f} "
              f"meV/Å, energy MAE {before['energy_mae_meV']:.1f} -> {after['energy_mae_meV']:.1f} meV "
              f"({after['frames']} frames)")
    print(f"wrote {result.output}; log, checkpoint and plots in {Path(summary['figures'][0]).parent if summary['figures'] else ''}")
    for figure in summary["figures"]:
        print(f"  {figure}")
    if summary["refined"]:
        # Refine's own numbers come from the replicas it trained on; held-out stability needs evaluate.
        print(f"to compare stability on held-out starts: stable-md evaluate {shlex.quote(str(model))} "
              f"{shlex.quote(str(result.output))} --label before --label refined --data {shlex.quote(str(args.data))} "
              f"--temperature {settings.md.temperature:g} -o {shlex.quote(str(Path(result.output).with_suffix('')) + '.evaluation')}")
    stopped = summary["stopped_by"]
    return 0 if stopped in ("cycles", "epochs", "wall time", "simulation time") else 1


def _evaluate(args: argparse.Namespace) -> int:
    from stable_md.data import load_dataset
    from stable_md.evaluation import EvaluateSettings, evaluate, summary_table
    from stable_md.units import parse_time_fs

    from stable_md.distributed import started_by_torchrun

    if started_by_torchrun():
        raise ValueError("stable-md evaluate starts its own processes: run it without torchrun, with --nproc N")
    if args.vacf_window < 0:
        raise ValueError(f"--vacf-window must be >= 0 steps, got {args.vacf_window}")
    data = load_dataset(args.data, units=args.units)
    observable = args.obs or ("rdf" if data.periodic else "hr")
    settings = EvaluateSettings(
        n_replicas=args.replicas, md=_md_settings(args), total_time=parse_time_fs(args.time),
        criterion=args.criterion, threshold=args.threshold, check_every=args.check_every, observable=observable,
        data_temperature=args.data_temperature, error_frames=args.error_frames, vacf_window=args.vacf_window,
        rdf_window=args.rdf_window)
    print(f"stable-md evaluate: {len(args.models)} model(s), {settings.n_replicas} replicas each from held-out frames "
          f"of {data.source}; {settings.md.integrator} at {settings.md.temperature:g} K for up to "
          f"{settings.total_time / 1000:g} ps; {settings.criterion} criterion at {settings.threshold:g} Å")
    report = evaluate(args.models, data, args.output, settings, labels=args.label, jobs=args.jobs,
                      overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress, nproc=args.nproc)
    reweighting = report["reference"]["reweighting"]
    if reweighting:
        print(f"reference {observable}: data reweighted from {reweighting['from_temperature_K']:g} K to "
              f"{reweighting['to_temperature_K']:g} K, effective sample size {reweighting['effective_samples']:.0f} "
              f"of {reweighting['frames']} frames")
    print(f"held out: {report['held_out_note']}; energy/force errors on {report['error_frames']} of them")
    for line in summary_table(report):
        print(line)
    output = Path(args.output)
    print(f"wrote {output / 'evaluation.json'}")
    for figure in report["figures"]:
        print(f"  {figure}")
    return 0


def _check_xyz_output(path: str) -> None:
    """The generators write extended XYZ, so the output's name must say so."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".extxyz", ".xyz"):
        raise ValueError(f"-o {path}: the generator writes extended XYZ; name the output .extxyz or .xyz "
                         f"(`stable-md data convert` makes .npz from it)")


def _data_xtb(args: argparse.Namespace) -> int:
    from stable_md.refdata import xtb_md

    _check_xyz_output(args.output)
    return xtb_md.run_from_arguments(args)


def _data_water(args: argparse.Namespace) -> int:
    return _run_openmm_generator(args, "water", "water_md", "run_water_md", n_molecules=args.molecules,
                                 density=args.density)


def _data_peptide(args: argparse.Namespace) -> int:
    return _run_openmm_generator(args, "amber-peptide", "peptide_md", "run_peptide_md", n_alanines=args.alanines,
                                 solvent=args.solvent)


def _run_openmm_generator(args: argparse.Namespace, kind: str, module: str, function: str, **system) -> int:
    """Run one of the OpenMM data generators with the options every one has (_add_labelled_md_options)."""
    import importlib

    try:
        run = getattr(importlib.import_module(f"stable_md.refdata.{module}"), function)
    except ImportError as error:
        raise ImportError(f"data {kind} needs OpenMM: pip install 'stable-md[openmm]' ({error})") from error
    if args.equilibration < 0:
        raise ValueError(f"--equilibration must be >= 0 steps, got {args.equilibration}")
    if args.dense_frames < 0:
        raise ValueError(f"--dense-frames must be >= 0 frames, got {args.dense_frames}")
    _check_xyz_output(args.output)
    path = run(args.output, temperature=args.temperature, timestep_fs=args.timestep, friction=args.friction,
               n_frames=args.frames, every=args.every, equilibration_steps=args.equilibration, seed=args.seed,
               resume=not args.no_resume, progress=not args.quiet, dense_frames=args.dense_frames, **system)
    print(f"wrote {path}")
    return 0


def _data_convert(args: argparse.Namespace) -> int:
    from stable_md.data import concatenate, load_dataset, save_dataset

    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; refusing to overwrite it (use --overwrite)")
    data = concatenate([load_dataset(path, units=args.units) for path in args.inputs])
    save_dataset(data, output, overwrite=args.overwrite)
    dense = f" and a dense segment of {len(data.dense)} frames" if data.dense is not None else ""
    print(f"wrote {output}: {len(data)} frames of {data.n_atoms} atoms{dense} ({output.stat().st_size / 1e6:.1f} MB)")
    return 0


def _show_our_warnings(command: str) -> None:
    """Print stable-md's own warnings as one line each, ``stable-md <command>: warning: ...``, every time."""
    from stable_md.compatibility import OtherStructuresWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, OtherStructuresWarning):
            print(f"stable-md {command}: warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", OtherStructuresWarning)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            _show_our_warnings(args.command)
            return int(args.func(args) or 0)
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"stable-md {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stable-md {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
