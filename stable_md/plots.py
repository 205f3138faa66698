"""PNG figures of refine and evaluate runs (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

PHASE_COLOURS = {"simulation": "tab:blue", "learning": "tab:orange"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def unstable_fraction_figure(history: Sequence[dict], path: Path) -> Path:
    """Unstable fraction per epoch, coloured by phase (the paper's Fig. 3a), with the observable loss below."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[2, 1])
    epochs = np.array([row["epoch"] for row in history])
    fractions = np.array([row["unstable_fraction"] for row in history])
    phases = [row["phase"] for row in history]
    top.plot(epochs, fractions, color="0.6", lw=1, zorder=1)
    for phase, colour in PHASE_COLOURS.items():
        chosen = np.array([p == phase for p in phases])
        if chosen.any():
            top.scatter(epochs[chosen], fractions[chosen], color=colour, s=18, label=f"{phase} phase", zorder=2)
    for epoch, phase in zip(epochs, phases):
        if phase == "learning":
            top.axvspan(epoch - 0.5, epoch + 0.5, color=PHASE_COLOURS["learning"], alpha=0.12, lw=0)
    top.set_ylabel("fraction of replicas unstable")
    top.set_ylim(-0.02, 1.02)
    top.legend(loc="upper left", frameon=False)
    losses = np.array([row.get("observable_loss", np.nan) for row in history], dtype=float)
    for phase, colour in PHASE_COLOURS.items():
        chosen = np.array([p == phase for p in phases]) & np.isfinite(losses) & (losses > 0)
        if chosen.any():
            bottom.semilogy(epochs[chosen], losses[chosen], "o", ms=3, color=colour)
    bottom.set_ylabel("observable loss")
    bottom.set_xlabel("epoch (t steps each)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def observable_figure(x: np.ndarray, reference: np.ndarray, curves: dict[str, np.ndarray], path: Path,
                      x_label: str, y_label: str, title: Optional[str] = None) -> Path:
    """Reference vs model curves (top) and their differences from the reference (bottom)."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[2, 1])
    x = np.asarray(x)
    top.plot(x, reference, color="black", lw=1.5, label="reference (data)")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, values) in enumerate(curves.items()):
        values = np.asarray(values)
        top.plot(x, values, lw=1.2, color=colours[k % len(colours)], label=label)
        bottom.plot(x, values - reference, lw=1.0, color=colours[k % len(colours)])
    bottom.axhline(0.0, color="black", lw=0.8)
    top.set_ylabel(y_label)
    bottom.set_ylabel("difference")
    bottom.set_xlabel(x_label)
    top.legend(frameon=False)
    if title:
        top.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def refine_figures(history: Sequence[dict], terms, first_means: Optional[dict], last_means: Optional[dict],
                   directory: Path) -> list[Path]:
    """The refine run's figures: unstable fraction over training and each observable at the start and end."""
    paths = []
    if history:
        paths.append(unstable_fraction_figure(history, Path(directory) / "unstable_fraction.png"))
    if first_means and last_means:
        for term in terms:
            name = term.observable.name
            if name not in first_means or name not in last_means:
                continue
            x = term.observable.x if len(term.observable.x) == len(term.reference) else np.arange(len(term.reference))
            curves = {"samples, first epoch": np.asarray(first_means[name]),
                      "samples, last epoch": np.asarray(last_means[name])}
            paths.append(observable_figure(x, term.reference.numpy(), curves, Path(directory) / f"{name}.png",
                                           term.observable.x_label, term.observable.y_label or name))
    return paths
